"""fuse_qkv — sibling linears that read the same input become one GEMM and a split.

**Rewrites** (one rule; statistic ``groups``: GEMMs made, ``skipped_size``/``skipped_layout``):
  linear(x, W1, b1), ..., linear(x, Wk, bk)    (k >= min_group = 3, constant weights, same x)
  -> y = linear(x, cat([W1..Wk]), cat([b1..bk])); split(y, [N1..Nk], -1) -> getitem i
  The ``cat`` of constants is folded by the runtime (computed once, recomputed when a source
  parameter changes: ``Program``'s constant folding), so the weights are never stale. Typical
  hits: the Q, K and V projections of BERT/Llama/OPT (K and V narrower under GQA); Llama's
  gate/up pair only with ``min_group=2`` (slower by default: see the config).
**Source**: horizontal fusion of independent GEMMs on a shared input (TASO, Jia et al. SOSP
  2019; the fused QKV / gate-up projections of FasterTransformer, vLLM and gpt-fast). One
  GEMM instead of k: at batch 1 and short inputs each dispatch costs about as much as the
  GEMM itself (benchmarks/overhead.py); on a GPU one launch instead of k.
**Requires**: canonical graph (``aten.linear`` with frozen 2-D ``get_attr`` weights: every
  frontend freezes parameters). Runs after ``quantize_weights`` when both are in a pipeline:
  quantized linears are ``optc::`` ops and are not fused, and quantization keeps its
  per-module weights and names.
**Ensures**: each output column is the same dot product as before (the GEMM may block the
  reduction differently: fp32 rounding only). The originals stay referenced by the user's
  model, so the folded concatenation is a copy: only groups whose fused weight is at most
  ``max_weight_bytes`` fire (small models, where dispatch dominates; on a large model the
  saving is noise and the copy is not). The split chunks are strided views; every node whose
  layout that changes is re-propagated, and a group whose users cannot take the new layout
  (a ``view`` that needed a contiguous input) is left as it was. Must not fire on: weights that
  are inputs rather than constants, mixed bias/no-bias, mixed dtypes, a single linear.
**Order**: after fuse_attention and quantize_weights; before strength_reduce (split_heads).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import val as _val, attr_value as _attr
from optc.graph.shape import propagate_node, same_shape
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite

aten = torch.ops.aten


@dataclass(frozen=True)
class FuseQKVConfig(PassConfig):
    VERSION = 1
    max_weight_bytes: int = 8 << 20
    # Pairs (Llama's gate/up) are not fused by default: measured slower on llama-tiny
    # (benchmarks/overhead.py, eager/optc 1.057 with pairs vs 1.096 without, batch 1, seq 16):
    # the SiLU and the product then read strided rows of one buffer. Q/K/V triples feed views.
    min_group: int = 3


def _const(gm: fx.GraphModule, n: object) -> torch.Tensor | None:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        t = _attr(gm, n)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _member(gm: fx.GraphModule, n: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a fusable ``aten.linear`` node, else None."""
    if not (n.op == "call_function" and n.target is aten.linear.default) or n.kwargs:
        return None
    w = _const(gm, n.args[1])
    b_node = n.args[2] if len(n.args) > 2 else None
    b = _const(gm, b_node) if b_node is not None else None
    if w is None or w.dim() != 2 or not w.is_floating_point() or (b_node is not None and b is None):
        return None
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != w.dtype):
        return None
    return w, b


def _same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and same_shape(list(a.shape), list(b.shape))
                and same_shape(list(a.stride()), list(b.stride())))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same_layout(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor)


def _repropagate(starts: list[fx.Node], order: dict[fx.Node, int],
                 saved: dict[fx.Node, Any]) -> None:
    """Recompute fake values downstream of ``starts`` until layouts stop changing; records the
    old values in ``saved`` (to restore on failure). Raises if a node rejects its new inputs."""
    todo = sorted({u for s in starts for u in s.users if u.op == "call_function"},
                  key=order.__getitem__)
    seen = set(todo)
    while todo:
        u = todo.pop(0)
        old = u.meta.get("val")
        saved.setdefault(u, old)
        new = propagate_node(u)
        if _same_layout(old, new):
            continue
        for w in u.users:
            if w.op == "call_function" and w not in seen:
                seen.add(w)
                todo.append(w)
        todo.sort(key=order.__getitem__)


def _fuse(gm: fx.GraphModule, x: fx.Node, group: list[fx.Node], ws: list[torch.Tensor],
          has_bias: bool) -> bool:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(group, key=order.__getitem__)
    with g.inserting_before(first):
        w_cat = g.call_function(aten.cat.default, ([n.args[1] for n in group], 0))
        args: tuple = (x, w_cat)
        consts = [w_cat]
        if has_bias:
            b_cat = g.call_function(aten.cat.default, ([n.args[2] for n in group], 0))
            args = (x, w_cat, b_cat)
            consts.append(b_cat)
    sizes = [int(w.shape[0]) for w in ws]
    with g.inserting_before(first):
        fused = g.call_function(aten.linear.default, args)
        if len(set(sizes)) == 1:
            split = g.call_function(aten.split.Tensor, (fused, sizes[0], -1))
        else:
            split = g.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        items = [g.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    new_nodes = [*consts, fused, split, *items]
    for n in new_nodes:
        n.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        n.meta["optc_layer"] = first.meta.get("optc_layer")
        n.meta["optc_pass"] = "fuse_qkv"
        n.meta["optc_origin"] = tuple(m.name for m in group)
    for c in consts:
        propagate_node(c)
    propagate_node(fused)
    propagate_node(split)
    for i, it in enumerate(items):
        it.meta["val"] = split.meta["val"][i]
    for it, m in zip(items, group):
        m.replace_all_uses_with(it)
    order = {n: i for i, n in enumerate(g.nodes)}
    saved: dict[fx.Node, Any] = {}
    try:
        _repropagate(items, order, saved)
    except Exception:  # noqa: BLE001 - a user rejects the strided chunk: undo this group
        for it, m in zip(items, group):
            it.replace_all_uses_with(m)
        for n, v in saved.items():
            n.meta["val"] = v
        for n in reversed(new_nodes):
            g.erase_node(n)
        return False
    for m in group:
        g.erase_node(m)
    return True


def run(gm: fx.GraphModule, cfg: FuseQKVConfig) -> PassResult:
    stats: Counter[str] = Counter()
    g = gm.graph
    groups: dict[tuple, list[tuple[fx.Node, torch.Tensor]]] = {}   # key -> [(linear, weight)]
    for n in g.nodes:
        part = _member(gm, n)
        if part is None:
            continue
        w, b = part
        key = (n.args[0], w.dtype, w.device, w.shape[1], b is not None)
        groups.setdefault(key, []).append((n, w))
    for key, members in groups.items():
        if len(members) < max(2, cfg.min_group):
            continue
        ws = [w for _, w in members]
        if sum(w.nbytes for w in ws) > cfg.max_weight_bytes:
            stats["skipped_size"] += 1
            continue
        if not take_rewrite():
            break
        if _fuse(gm, key[0], [n for n, _ in members], ws, has_bias=key[4]):
            stats["groups"] += 1
        else:
            stats["skipped_layout"] += 1
    modified = stats["groups"] > 0
    if modified:
        g.eliminate_dead_code()
    return PassResult(gm, modified, +stats)


PASS = PassInfo(
    name="fuse_qkv", run=run, config_cls=FuseQKVConfig,
    summary="sibling linears on one input (Q/K/V) -> one GEMM + split (small weights)",
    source="horizontal GEMM fusion (TASO, SOSP 2019; fused QKV in FasterTransformer/vLLM)",
    lossless=True,
    after=("fuse_attention", "quantize_weights"),
)

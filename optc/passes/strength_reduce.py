"""strength_reduce — gathers and split chains that only pick contiguous rows become views.

**Rewrites** (rules, each with a statistic):
  embedding_arange: embedding(W, arange(a, b)) [-> unsqueeze(·, d)...]
                    -> slice(W, 0, a, b) [-> unsqueeze(·, d)...]        (learned positions)
  embedding_zeros:  embedding(W, zeros_like(ids)) -> expand(select(W, 0, 0), [*ids.shape, D])
                    when only broadcasting ops read it                  (BERT token types)
  split_heads:      split(y, C, -1) -> k x (getitem -> view(B, T, H, C/H) -> transpose(1, 2)
                    or permute(0, 2, 1, 3))
                    -> view(y, [B, T, k, H, C/H]) -> permute(2, 0, 3, 1, 4) -> unbind(0)
  GPT-2's and BERT's learned positions gather ``wpe[arange(T)]`` (a copy of the first T rows),
  BERT gathers row 0 of its token-type table for every token, and a fused QKV projection is
  cut into heads by seven ops. Each becomes views: no copy, fewer dispatches (at batch 1 and
  short inputs the dispatch cost is most of the runtime: benchmarks/overhead.py).
**Source**: strength reduction (Cocke & Kennedy 1977; LLVM InstCombine's gather-of-iota
  folds); the head split is gpt-fast's ``view + split`` spelling of ``qkv.split(dim)``.
**Requires**: canonical graph; static ``arange`` bounds (ints) for embedding_arange, static
  sizes for embedding_zeros.
**Ensures**: outputs bit-identical (every replacement is a view of the same elements, with the
  same sizes, strides and storage offset for split_heads). A fresh tensor only becomes a view
  when nothing mutates it or returns it (``remove_noops._safe_to_alias``) and nothing writes
  the table in place. Must not fire on: an arange with step != 1 or bounds outside the table,
  float indices, a split that is not over the last dim in equal chunks, heads that are not
  followed by exactly view -> transpose(1, 2) (or the same permute), a zero gather read by
  anything but broadcasting arithmetic or the fused add+norm ops (their ``x + residual``
  broadcasts on every implementation; a view of a stride-0 tensor could fail).
**Order**: after fuse_qkv (whose split it cuts into heads); independent of the fusions.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import val as _val, is_call as _is
from optc.graph.shape import propagate_node, same_shape
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite
from optc.passes.remove_noops import _safe_to_alias

aten = torch.ops.aten
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_ZEROS = {aten.zeros_like.default}


@dataclass(frozen=True)
class StrengthReduceConfig(PassConfig):
    VERSION = 1
    embedding_arange: bool = True
    embedding_zeros: bool = True
    split_heads: bool = True


def _new(g: fx.Graph, before: fx.Node, target: object, args: tuple, like: fx.Node) -> fx.Node:
    with g.inserting_before(before):
        n = g.call_function(target, args)
    n.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    n.meta["optc_layer"] = like.meta.get("optc_layer")
    n.meta["optc_pass"] = "strength_reduce"
    propagate_node(n)
    return n


def _table_ok(w: object, n: fx.Node) -> bool:
    """``w`` is a 2-D table nothing writes in place, ``n``'s result may become a view of it."""
    wv = _val(w)
    if not (isinstance(w, fx.Node) and isinstance(wv, torch.Tensor) and wv.dim() == 2):
        return False
    if any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable
           for u in w.users):
        return False
    return _safe_to_alias(n)


def _arange_bounds(a: fx.Node) -> tuple[int, int] | None:
    """(start, end) of an int64/int32 ``arange`` with step 1 and int bounds, else None."""
    av = _val(a)
    if not (isinstance(av, torch.Tensor) and av.dtype in (torch.int64, torch.int32)):
        return None
    args = list(a.args)
    if a.target is aten.arange.default:
        args = [0, *args]
    start, end, step = (args + [1])[:3] if len(args) >= 2 else (None, None, None)
    if not all(type(v) is int for v in (start, end, step)) or step != 1:
        return None
    return start, end


def _embedding_arange(g: fx.Graph, n: fx.Node) -> bool:
    w, idx = n.args[0], n.args[1]
    dims: list[int] = []                # unsqueezes between the arange and the gather
    while _is(idx, aten.unsqueeze.default):
        d, src_dim = idx.args[1], _val(idx.args[0]).dim()
        dims.append(d if d >= 0 else d + src_dim + 1)
        idx = idx.args[0]
    if not _is(idx, *_ARANGE) or not _table_ok(w, n):
        return False
    bounds = _arange_bounds(idx)
    rows = _val(w).shape[0]
    if bounds is None or not (0 <= bounds[0] <= bounds[1] <= rows) or type(rows) is not int:
        return False                    # out of range: eager raises, a slice would not
    if not take_rewrite():
        return False
    out = _new(g, n, aten.slice.Tensor, (w, 0, bounds[0], bounds[1]), n)
    for d in reversed(dims):
        out = _new(g, n, aten.unsqueeze.default, (out, d), n)
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return True


def _broadcast_readers() -> set:
    import optc.ops  # noqa: F401 - registers torch.ops.optc.*
    ops = torch.ops.optc
    return {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor,
            ops.add_layer_norm.default, ops.add_rms_norm.default}


def _embedding_zeros(g: fx.Graph, n: fx.Node) -> bool:
    w, idx = n.args[0], n.args[1]
    iv, nv = _val(idx), _val(n)
    if not (_is(idx, *_ZEROS) and isinstance(iv, torch.Tensor) and isinstance(nv, torch.Tensor)):
        return False
    if iv.dtype not in (torch.int64, torch.int32) or \
            idx.kwargs.get("dtype") not in (None, iv.dtype):
        return False
    if not _table_ok(w, n) or _val(w).shape[0] < 1:
        return False
    if not all(type(d) is int for d in nv.shape):
        return False                    # symbolic sizes: expand would need their nodes
    readers = _broadcast_readers()
    if not n.users or not all(_is(u, *readers) for u in n.users):
        return False
    if not take_rewrite():
        return False
    row = _new(g, n, aten.select.int, (w, 0, 0), n)
    out = _new(g, n, aten.expand.default, (row, list(nv.shape)), n)
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return True


def _split_heads(g: fx.Graph, n: fx.Node) -> bool:
    y, size = n.args[0], n.args[1]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    yv = _val(y)
    if not (isinstance(yv, torch.Tensor) and yv.dim() == 3 and type(size) is int and size > 0):
        return False
    c = yv.shape[2]
    if dim % 3 != 2 or type(c) is not int or c % size or c // size < 2:
        return False
    k = c // size
    items: dict[int, fx.Node] = {}
    for u in n.users:
        if not (u.target is operator.getitem and type(u.args[1]) is int) or u.args[1] in items:
            return False
        items[u.args[1]] = u
    if sorted(items) != list(range(k)):
        return False
    heads: list[fx.Node] = []
    shape = None
    for i in range(k):
        gi = items[i]
        if len(gi.users) != 1:
            return False
        v = next(iter(gi.users))
        vv = _val(v)
        if not (_is(v, aten.view.default) and len(v.users) == 1 and vv.dim() == 4):
            return False
        t = next(iter(v.users))
        if not (_is(t, aten.transpose.int) and sorted(d % 4 for d in t.args[1:3]) == [1, 2]
                or _is(t, aten.permute.default) and [d % 4 for d in t.args[1]] == [0, 2, 1, 3]):
            return False
        if shape is None:
            shape = list(v.args[1])
        elif not same_shape(list(vv.shape), list(_val(heads[0]).shape)):
            return False
        heads.append(v)
    if not take_rewrite():
        return False
    order = {x: i for i, x in enumerate(g.nodes)}
    anchor = min((next(iter(h.users)) for h in heads), key=order.__getitem__)  # first transpose
    r = _new(g, anchor, aten.view.default, (y, [*shape[:-2], k, *shape[-2:]]), n)
    p = _new(g, anchor, aten.permute.default, (r, [2, 0, 3, 1, 4]), n)
    ub = _new(g, anchor, aten.unbind.int, (p, 0), n)
    for i, h in enumerate(heads):
        tr = next(iter(h.users))
        with g.inserting_before(anchor):
            gi = g.call_function(operator.getitem, (ub, i))
        gi.meta["optc_layer"] = n.meta.get("optc_layer")
        gi.meta["val"] = ub.meta["val"][i]
        tv = _val(tr)
        gv = gi.meta["val"]
        assert same_shape(list(gv.stride()), list(tv.stride())) and \
            same_shape(list(gv.shape), list(tv.shape)), "split_heads: layout changed"
        tr.replace_all_uses_with(gi)
    for h in heads:
        tr = next(iter(h.users))
        gi = h.args[0]
        g.erase_node(tr)
        g.erase_node(h)
        g.erase_node(gi)
    g.erase_node(n)
    return True


def run(gm: fx.GraphModule, cfg: StrengthReduceConfig) -> PassResult:
    stats: Counter[str] = Counter()
    g = gm.graph
    for n in list(g.nodes):
        if n.graph is not g or n.op != "call_function":
            continue
        if n.target is aten.embedding.default:
            if cfg.embedding_arange and _embedding_arange(g, n):
                stats["embedding_arange"] += 1
            elif cfg.embedding_zeros and _embedding_zeros(g, n):
                stats["embedding_zeros"] += 1
        elif n.target is aten.split.Tensor and cfg.split_heads and _split_heads(g, n):
            stats["split_heads"] += 1
    if stats:
        g.eliminate_dead_code()
    return PassResult(gm, bool(stats), stats)


PASS = PassInfo(
    name="strength_reduce", run=run, config_cls=StrengthReduceConfig,
    summary="gathers of arange/zeros -> slice/expand views; qkv split into heads -> one view",
    source="strength reduction (Cocke & Kennedy 1977; InstCombine); GPT-2/BERT embeddings",
    lossless=True,
    after=("fuse_qkv",),
)

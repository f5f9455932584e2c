"""fuse_quant_siblings — quantized linears on one input become one call (one decode GEMV region).

**Rewrites** (two rules, in this order; statistics ``swiglu``, ``groups``, ``grouped_linears``):
  mul(silu(linear_q(x, Wg)), linear_q(x, Wu))          (either operand order of the mul)
      -> qswiglu(x, kind, Wg, ag, Wu, au, group, n)
  linear_q(x, W1), ..., linear_q(x, Wk)                (k >= 2 left on one x)
      -> ys = qlinear_group(x, kind, [W1..Wk], [a1..ak], group, [n1..nk]); ys[i]
  where linear_q is ``optc::linear_int8`` or ``optc::linear_int4`` (what quantize_weights
  writes) without bias, of one kind, group size and K, with constant (``get_attr``) weights.
  Typical hits per Llama layer: the gate/up pair (SwiGLU) and the Q/K/V projections.
**Source**: horizontal fusion of GEMMs on a shared input (TASO, Jia et al. SOSP 2019) and the
  fused gate/up + SiLU of decode engines (llama.cpp's and gpt-fast's fused MLP input). Here the
  point is the CPU thread pool: at decode every quantized linear is one GEMV and one parallel
  region, and under a passive OpenMP wait policy each region wakes a sleeping thread; a group is
  one region and one pass over x (``optc.ops.quant_group``).
**Requires**: quantize_weights ran (it runs first in every pipeline that has both).
**Ensures**: the packed weights are the same constants (nothing concatenated, no copy). Group
  outputs are bit-identical to the separate linears on every path. qswiglu is bit-identical on
  every path but the one-row native kernel, whose SiLU may differ in the last bf16 bit (its e^x
  is a ~2 ulp fp32 polynomial: ``optc.ops.quant_group``). Must not fire on: a linear with a
  bias, mixed kinds (int8 with int4) or group sizes, other formats (w8a8, bfp), a single linear,
  weights that are graph inputs, a gate/up product whose silu or linears have other users.
  Groups are cut at ``max_group`` weights (the native kernel's limit).
**Order**: after quantize_weights; before fuse_qkv (which fuses the float linears left).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.shape import propagate_node
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite

aten = torch.ops.aten
_KINDS = {"linear_int8": "int8", "linear_int4": "int4"}


@dataclass(frozen=True)
class FuseQuantSiblingsConfig(PassConfig):
    VERSION = 1
    swiglu: bool = True
    groups: bool = True
    max_group: int = 8          # optc_gemv_multi takes at most 8 weights


@dataclass(frozen=True)
class _Linear:
    node: fx.Node
    kind: str
    w: fx.Node
    aux: fx.Node
    group: int
    n: int
    k: int


def _linear(n: object) -> _Linear | None:
    """The parts of a bias-free int8/int4 quantized linear with constant weights, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "optc"):
        return None
    kind = _KINDS.get(n.target._opname)
    if kind is None or n.kwargs:
        return None
    x, w, aux, bias = n.args[:4]
    if bias is not None or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (w, aux)):
        return None
    wv, xv = w.meta.get("val"), x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(wv, torch.Tensor) or not isinstance(xv, torch.Tensor):
        return None
    if kind == "int4":
        group, n_out = int(n.args[4]), int(n.args[5])
    else:
        group, n_out = 0, int(wv.shape[0])
    return _Linear(n, kind, w, aux, group, n_out, int(xv.shape[-1]))


def _hoist_constants(first: fx.Node, members: list[_Linear]) -> None:
    """Move the members' get_attr nodes before ``first`` (they have no inputs): the fused node
    goes where the first member was and reads every member's weights."""
    for m in members:
        for c in (m.w, m.aux):
            if c is not first and _before(first, c):
                first.prepend(c)


def _before(a: fx.Node, b: fx.Node) -> bool:
    """a comes before b in the graph."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _meta(new: fx.Node, like: fx.Node, members: list[_Linear]) -> None:
    new.meta.update(nn_module_stack=like.meta.get("nn_module_stack", {}),
                    optc_layer=like.meta.get("optc_layer"), optc_pass="fuse_quant_siblings",
                    optc_origin=tuple(m.node.name for m in members))


def _swiglu(g: fx.Graph, stats: Counter[str]) -> None:
    for mul in list(g.nodes):
        if not (mul.op == "call_function" and mul.target is aten.mul.Tensor and len(mul.args) == 2
                and not mul.kwargs):
            continue
        a, b = mul.args
        for silu, up in ((a, b), (b, a)):
            if not (isinstance(silu, fx.Node) and silu.op == "call_function"
                    and silu.target is aten.silu.default and len(silu.users) == 1):
                continue
            lg, lu = _linear(silu.args[0]), _linear(up)
            if lg is None or lu is None or lg.node is lu.node:
                continue
            if len(lg.node.users) != 1 or len(lu.node.users) != 1:
                continue
            if (lg.node.args[0] is not lu.node.args[0] or lg.kind != lu.kind
                    or lg.group != lu.group or lg.n != lu.n or lg.k != lu.k):
                continue
            if not take_rewrite():
                return
            first = lg.node if _before(lg.node, lu.node) else lu.node
            _hoist_constants(first, [lg, lu])
            with g.inserting_before(first):
                new = g.call_function(torch.ops.optc.qswiglu.default, (
                    lg.node.args[0], lg.kind, lg.w, lg.aux, lu.w, lu.aux, lg.group, lg.n))
            _meta(new, mul, [lg, lu])
            propagate_node(new)
            mul.replace_all_uses_with(new)
            for dead in (mul, silu, lg.node, lu.node):
                g.erase_node(dead)
            stats["swiglu"] += 1
            break


def _groups(g: fx.Graph, cfg: FuseQuantSiblingsConfig, stats: Counter[str]) -> None:
    by_key: dict[tuple, list[_Linear]] = {}
    for n in g.nodes:
        lin = _linear(n)
        if lin is not None:
            by_key.setdefault((n.args[0], lin.kind, lin.group, lin.k), []).append(lin)
    size = max(cfg.max_group, 2)
    for (x, kind, group, _k), members in by_key.items():
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            if len(chunk) < 2:
                continue
            if not take_rewrite():
                return
            first = chunk[0].node
            _hoist_constants(first, chunk)
            with g.inserting_before(first):
                new = g.call_function(torch.ops.optc.qlinear_group.default, (
                    x, kind, [m.w for m in chunk], [m.aux for m in chunk], group,
                    [m.n for m in chunk]))
                items = [g.call_function(operator.getitem, (new, i)) for i in range(len(chunk))]
            _meta(new, first, chunk)
            propagate_node(new)
            for i, (it, m) in enumerate(zip(items, chunk)):
                _meta(it, m.node, [m])
                it.meta["val"] = new.meta["val"][i]
                m.node.replace_all_uses_with(it)
                g.erase_node(m.node)
            stats["groups"] += 1
            stats["grouped_linears"] += len(chunk)


def run(gm: fx.GraphModule, cfg: FuseQuantSiblingsConfig) -> PassResult:
    stats: Counter[str] = Counter()
    if cfg.swiglu:
        _swiglu(gm.graph, stats)
    if cfg.groups:
        _groups(gm.graph, cfg, stats)
    return PassResult(gm, bool(stats), stats)


PASS = PassInfo(
    name="fuse_quant_siblings", run=run, config_cls=FuseQuantSiblingsConfig,
    summary="quantized linears on one input (Q/K/V; gate/up + SiLU) -> one call, one GEMV region",
    source="horizontal GEMM fusion (TASO, SOSP 2019); fused gate/up + SiLU (llama.cpp, gpt-fast)",
    lossless=False,     # qswiglu's native SiLU may differ in the last bf16 bit
    after=("quantize_weights",),
)

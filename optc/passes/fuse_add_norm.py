"""fuse_add_norm — residual add + RMSNorm / LayerNorm become one ``optc::`` op.

**Rewrites** (rules, each with a statistic):
  add_rms_norm:   h = x + r ; y = rmsnorm(h) * w  ->  (h, y) = optc.add_rms_norm(x, r, w, eps)
  add_layer_norm: h = x + r ; y = layer_norm(h, [C], w, b, eps) -> (h, y) = optc.add_layer_norm(...)
  rms_norm:       y = rmsnorm(h) * w (no fusable add)  ->  y = optc.rms_norm(h, w, eps)
  where ``rmsnorm`` is HF Llama's spelling: [to(f32)] -> pow(·, 2) -> mean([-1], keepdim)
  -> add(eps) -> rsqrt -> mul -> [to(dtype)] -> mul(weight, ·), or ``aten.rms_norm``.
**Source**: the fused add+RMSNorm kernels of FlashAttention's ``layer_norm`` module and
  vLLM's ``fused_add_rms_norm``; pattern from HF ``LlamaRMSNorm`` / GPT-2 ``ln_1``/``ln_2``.
  One pass over the residual stream instead of four (add, square-mean, scale, weight).
**Requires**: canonical graph after ``remove_noops`` (fp32 round-trip casts removed).
**Ensures**: same values up to fp32 rounding of the reduction order (ATen's fused kernels);
  ``h`` keeps every other use (the residual stream). Must not fire on: a norm over another
  dim, an exponent other than 2, a broadcasting add, a weight that is not 1-D over the last dim.
**Order**: after remove_noops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import val as _val, is_call as _is
from optc.graph.shape import propagate_node, same_shape
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite

aten = torch.ops.aten
_TO = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


@dataclass(frozen=True)
class FuseAddNormConfig(PassConfig):
    VERSION = 1
    rms_norm: bool = True
    layer_norm: bool = True


def _strip_to(n: object) -> object:
    return n.args[0] if _is(n, *_TO) else n


def _last_dim_only(dims: object, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % ndim == ndim - 1


@dataclass
class NormMatch:
    h: fx.Node            # normalized input
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    out: fx.Node          # node whose value the fused op replaces
    kind: str             # "rms" | "layer"
    nodes: tuple[fx.Node, ...] = ()   # every node of the matched norm (for kernel headers)


def match_rms_norm(out: fx.Node) -> NormMatch | None:
    if _is(out, aten.rms_norm.default):
        h, shape = out.args[0], out.args[1]
        w = out.args[2] if len(out.args) > 2 else None
        eps = out.args[3] if len(out.args) > 3 else None
        hv = _val(h)
        # fp32 only: aten.rms_norm multiplies by the weight before rounding to a low-precision
        # dtype, optc's ops round first (HF's order), so bf16/fp16 would differ by an ulp
        if isinstance(hv, torch.Tensor) and hv.dtype == torch.float32 and len(shape) == 1 \
                and isinstance(w, fx.Node) and isinstance(eps, float):
            return NormMatch(h, w, None, eps, out, "rms", (out,))
        return None
    if not _is(out, aten.mul.Tensor):
        return None
    for w, normed in (out.args, out.args[::-1]):
        wv = _val(w)
        if not (isinstance(w, fx.Node) and isinstance(wv, torch.Tensor) and wv.dim() == 1):
            continue
        m = _strip_to(normed)
        if not _is(m, aten.mul.Tensor):
            continue
        for x, r in (m.args, m.args[::-1]):
            if not _is(r, aten.rsqrt.default):
                continue
            a = r.args[0]
            if not (_is(a, aten.add.Tensor) and isinstance(a.args[1], float)):
                continue
            mean = a.args[0]
            if not (_is(mean, aten.mean.dim) and len(mean.args) >= 3 and mean.args[2] is True):
                continue
            p = mean.args[0]
            if not (_is(p, aten.pow.Tensor_Scalar) and p.args[1] == 2 and p.args[0] is x):
                continue
            h = _strip_to(x)
            hv, xv = _val(h), _val(x)
            if not (isinstance(hv, torch.Tensor) and _last_dim_only(mean.args[1], hv.dim())):
                continue
            if xv.dtype != torch.float32 or not same_shape([hv.shape[-1]], [wv.shape[0]]):
                continue
            chain = tuple(dict.fromkeys(n for n in (x, p, mean, a, r, m, normed, out)
                                        if isinstance(n, fx.Node) and n is not h))
            return NormMatch(h, w, None, a.args[1], out, "rms", chain)
    return None


def match_layer_norm(out: fx.Node) -> NormMatch | None:
    if not _is(out, aten.layer_norm.default):
        return None
    h, shape = out.args[0], out.args[1]
    w = out.args[2] if len(out.args) > 2 else None
    b = out.args[3] if len(out.args) > 3 else None
    eps = out.args[4] if len(out.args) > 4 else 1e-5
    hv = _val(h)
    if not isinstance(hv, torch.Tensor) or len(shape) != 1:
        return None
    return NormMatch(h, w, b, float(eps), out, "layer", (out,))


def _fusable_add(h: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not _is(h, aten.add.Tensor) or h.kwargs.get("alpha", 1) != 1 or len(h.args) != 2:
        return None
    x, r = h.args
    xv, rv, hv = _val(x), _val(r), _val(h)
    if not all(isinstance(v, torch.Tensor) for v in (xv, rv, hv)):
        return None
    if xv.dtype != hv.dtype or rv.dtype != hv.dtype:
        return None
    if not (same_shape(list(xv.shape), list(hv.shape)) and same_shape(list(rv.shape), list(hv.shape))):
        return None   # broadcasting add: not a residual stream
    return x, r


def _emit(g: fx.Graph, after: fx.Node, target, args: tuple, meta_from: fx.Node,
          origin: tuple[fx.Node, ...]) -> fx.Node:
    with g.inserting_after(after):
        n = g.call_function(target, args)
    n.meta["nn_module_stack"] = meta_from.meta.get("nn_module_stack", {})
    n.meta["optc_layer"] = meta_from.meta.get("optc_layer")
    n.meta["optc_pass"] = "fuse_add_norm"
    n.meta["optc_origin"] = tuple(o.name for o in origin)
    propagate_node(n)
    return n


def _getitem(g: fx.Graph, src: fx.Node, i: int) -> fx.Node:
    import operator
    with g.inserting_after(src):
        n = g.call_function(operator.getitem, (src, i))
    n.meta["optc_layer"] = src.meta.get("optc_layer")
    n.meta["val"] = src.meta["val"][i]
    return n


def _anchor(m: NormMatch, order: dict[fx.Node, int]) -> fx.Node | None:
    """Where the fused op can go: after the last of its inputs, and before every use of ``h``
    outside the matched norm. None if no such place exists (e.g. a use of h sits between)."""
    deps = [d for d in (m.h, m.weight, m.bias) if isinstance(d, fx.Node)]
    anchor = max(deps, key=order.__getitem__)
    inner = set(m.nodes)
    if any(order[u] <= order[anchor] for u in m.h.users if u not in inner):
        return None
    return anchor


def run(gm: fx.GraphModule, cfg: FuseAddNormConfig) -> PassResult:
    import optc.ops  # noqa: F401 - registers torch.ops.optc.*
    ops = torch.ops.optc
    stats: Counter[str] = Counter()
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for out in list(g.nodes):
        if out.op != "call_function" or not out.users:
            continue
        m = (match_rms_norm(out) if cfg.rms_norm else None) or \
            (match_layer_norm(out) if cfg.layer_norm else None)
        if m is None:
            continue
        add = _fusable_add(m.h)
        anchor = _anchor(m, order) if add is not None else None
        if add is not None and anchor is None:
            stats["skipped_order"] += 1
        if add is not None and anchor is not None and take_rewrite():
            x, r = add
            if m.kind == "rms":
                fused = _emit(g, anchor, ops.add_rms_norm.default, (x, r, m.weight, m.eps), out,
                              (m.h,) + m.nodes)
            else:
                fused = _emit(g, anchor, ops.add_layer_norm.default, (x, r, m.weight, m.bias, m.eps),
                              out, (m.h,) + m.nodes)
            y = _getitem(g, fused, 1)
            h2 = _getitem(g, fused, 0)
            out.replace_all_uses_with(y)
            inner = set(m.nodes)    # the matched norm keeps reading h until it is removed as dead
            m.h.replace_all_uses_with(h2, delete_user_cb=lambda u: u not in inner and u is not fused)
            stats[f"add_{m.kind}_norm"] += 1
        elif m.kind == "rms" and m.weight is not None and take_rewrite():
            y = _emit(g, out, ops.rms_norm.default, (m.h, m.weight, m.eps), out, m.nodes)
            out.replace_all_uses_with(y)
            stats["rms_norm"] += 1
    modified = any(k != "skipped_order" for k in stats)
    if modified:
        g.eliminate_dead_code()
    return PassResult(gm, modified, stats)


PASS = PassInfo(
    name="fuse_add_norm", run=run, config_cls=FuseAddNormConfig,
    summary="residual add + RMSNorm/LayerNorm -> one fused optc op (and bare RMSNorm -> optc.rms_norm)",
    source="fused add+norm kernels (FlashAttention layer_norm, vLLM fused_add_rms_norm); HF Llama/GPT-2",
    lossless=True,
    after=("remove_noops",),
)

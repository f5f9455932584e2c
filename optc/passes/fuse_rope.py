"""fuse_rope — rotate-half rotary position embedding becomes one ``optc::rope`` op.

**Rewrites** (one rule; statistics ``rope``: ops made, ``skipped_dtype``, ``skipped_shape``):
  add(mul(x, cos), mul(cat([neg(x2), x1], -1), sin))  ->  optc.rope(x, cos, sin)
  where (x1, x2) are x's halves along the last dimension, spelled ``x.chunk(2, -1)`` (getitem 0
  and 1 of ``aten.chunk`` / ``aten.split`` / ``aten.split_with_sizes``) or HF's slices
  ``x[..., :D/2]`` / ``x[..., D/2:]``; each ``mul`` and the ``add`` in either operand order.
**Source**: RoFormer's rotary embedding (Su et al. 2021) in the rotate-half form of GPT-NeoX and
  HF Llama (``apply_rotary_pos_emb``); fused as in vLLM's and FlashInfer's rotary kernels. Six
  ops per rotated tensor (mul, split, neg, cat, mul, add) become one pass over the row.
**Requires**: canonical graph after ``remove_noops``; x 4-D (B, H, T, D) with D even; cos/sin
  broadcasting to x's shape; x, cos, sin and every op of the chain of one dtype (so the op's
  roundings are the chain's).
**Ensures**: bit-identical values (``optc.ops.rope``: each product and the sum rounded where
  eager rounds them). The intermediate nodes die unless something else reads them (they then
  stay, so nothing is computed wrong). Must not fire on: the other rotation (``cat([x1,
  -x2])``), a negated first half, halves of another tensor than the one multiplied by cos, a
  split along another dimension, a subtraction, mixed dtypes (bf16 x with fp32 tables), cos/sin
  that do not broadcast to x.
**Order**: after remove_noops (its casts removed) and fuse_attention (which reads q/k as they
  are); independent of the norm and quantization passes.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import is_call as _is, val as _val
from optc.graph.shape import propagate_node
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite

aten = torch.ops.aten
_SPLITS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


@dataclass(frozen=True)
class FuseRopeConfig(PassConfig):
    VERSION = 1


def _last_dim(dim: object, ndim: int) -> bool:
    return isinstance(dim, int) and dim % ndim == ndim - 1


def _half(n: object) -> tuple[fx.Node, int] | None:
    """(x, 0 or 1) when ``n`` is the first / second half of x along its last dimension."""
    if _is(n, operator.getitem) and isinstance(n.args[1], int) and n.args[1] in (0, 1):
        sp = n.args[0]
        if not _is(sp, *_SPLITS):
            return None
        x = sp.args[0]
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() != 4:
            return None
        d = xv.shape[-1]
        dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
        if not _last_dim(dim, 4):
            return None
        arg = sp.args[1]
        if sp.target is aten.chunk.default and arg != 2:
            return None
        if sp.target is aten.split.Tensor and arg != d // 2:
            return None
        if sp.target is aten.split_with_sizes.default and list(arg) != [d // 2, d // 2]:
            return None
        return x, n.args[1]
    if _is(n, aten.slice.Tensor):
        x = n.args[0]
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() != 4:
            return None
        d = xv.shape[-1]
        args = list(n.args[1:]) + [None] * (4 - len(n.args[1:]))
        dim, start, end = args[0] if args[0] is not None else 0, args[1] or 0, args[2]
        step = args[3] if args[3] is not None else 1
        if not _last_dim(dim, 4) or step != 1 or not isinstance(d, int) or d % 2:
            return None
        if start == 0 and end == d // 2:
            return x, 0
        if start == d // 2 and (end is None or isinstance(end, int) and end >= d):
            return x, 1
    return None


def _rotate_half_of(cat: object) -> fx.Node | None:
    """x when ``cat`` is ``cat([neg(x2), x1], -1)`` of x's halves, else None."""
    if not _is(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    dim = cat.args[1] if len(cat.args) > 1 else 0
    first, second = cat.args[0]
    if not _is(first, aten.neg.default):
        return None
    a, b = _half(first.args[0]), _half(second)
    if a is None or b is None or a[0] is not b[0] or a[1] != 1 or b[1] != 0:
        return None
    return a[0] if _last_dim(dim, 4) else None


def _match(add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) of a rotate-half RoPE rooted at ``add``."""
    if not _is(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        if not (_is(m1, aten.mul.Tensor) and _is(m2, aten.mul.Tensor)):
            continue
        for cat, sin in (m2.args, m2.args[::-1]):
            x = _rotate_half_of(cat)
            if x is None:
                continue
            for xx, cos in (m1.args, m1.args[::-1]):
                if xx is x and isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                    return x, cos, sin
    return None


def run(gm: fx.GraphModule, cfg: FuseRopeConfig) -> PassResult:
    import optc.ops  # noqa: F401 - registers torch.ops.optc.*
    stats: Counter[str] = Counter()
    g = gm.graph
    for add in list(g.nodes):
        if add.op != "call_function" or not add.users:
            continue
        hit = _match(add)
        if hit is None:
            continue
        x, cos, sin = hit
        xv, cv, sv, ov = _val(x), _val(cos), _val(sin), _val(add)
        if not all(isinstance(v, torch.Tensor) for v in (xv, cv, sv, ov)):
            continue
        if not (xv.dtype == cv.dtype == sv.dtype == ov.dtype):
            stats["skipped_dtype"] += 1
            continue
        try:
            fits = all(torch.broadcast_shapes(v.shape, xv.shape) == xv.shape for v in (cv, sv))
        except RuntimeError:
            fits = False
        if not fits or ov.shape != xv.shape:
            stats["skipped_shape"] += 1
            continue
        if not take_rewrite():
            break
        with g.inserting_before(add):
            n = g.call_function(torch.ops.optc.rope.default, (x, cos, sin))
        n.meta["nn_module_stack"] = add.meta.get("nn_module_stack", {})
        n.meta["optc_layer"] = add.meta.get("optc_layer")
        n.meta["optc_pass"] = "fuse_rope"
        n.meta["optc_origin"] = (add.name,)
        propagate_node(n)
        add.replace_all_uses_with(n)
        stats["rope"] += 1
    modified = stats["rope"] > 0
    if modified:
        g.eliminate_dead_code()
    return PassResult(gm, modified, stats)


PASS = PassInfo(
    name="fuse_rope", run=run, config_cls=FuseRopeConfig,
    summary="rotate-half rotary embedding (mul, split, neg, cat, mul, add) -> one optc.rope op",
    source="RoFormer (Su et al. 2021), GPT-NeoX/HF Llama rotate_half; vLLM/FlashInfer rotary kernels",
    lossless=True,
    after=("remove_noops", "fuse_attention"),
)

"""Canonicalization: one spelling per op, so a pass matches one form.

The canonical IR is pre-dispatch ATen (what ``torch.export`` produces and what Dynamo
graphs become after ``make_fx(pre_dispatch=True)``). Tracing already collapses method vs
function forms (``x.softmax`` / ``F.softmax(..., _stacklevel=3, dtype=None)`` both become
``aten.softmax.int``); the rules here collapse what tracing leaves apart:

- ``reshape(x)`` of a contiguous ``x`` -> ``view(x)``   (``view`` succeeds exactly there)
- ``addmm(b, x, t(W))`` / ``mm(x, t(W))`` / ``matmul(x, t(W))`` -> ``linear(x, W[, b])``
  (GPT-2's Conv1D gives ``addmm(b, x, W)``: that becomes ``linear(x, t(W), b)``)
- ``view(linear(view(x, [-1, C]), W, b), [*x.shape[:-1], N])`` -> ``linear(x, W, b)``
- ``_softmax(x, d, False)`` -> ``softmax(x, d)``
Rules are data: (name, targets, rewrite) with a per-rule statistic.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx as fx

from optc.graph.shape import propagate_node, same_shape

aten = torch.ops.aten
Rewrite = Callable[[fx.Node], "fx.Node | None"]

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _transposed_2d(n: object) -> fx.Node | None:
    """If ``n`` is a 2-D transpose of ``W``, return ``W``."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in _TRANSPOSES:
        return None
    src = n.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if n.target is aten.permute.default and list(n.args[1]) != [1, 0]:
        return None
    if n.target is aten.transpose.int and sorted(d % 2 for d in n.args[1:3]) != [0, 1]:
        return None
    return src


def _replace(old: fx.Node, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    g = old.graph
    with g.inserting_before(old):
        new = g.call_function(target, args, kwargs or {})
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})
    propagate_node(new)
    old.replace_all_uses_with(new)
    return new


def _reshape_to_view(n: fx.Node) -> fx.Node | None:
    x = n.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    if not guard_or_false(val.is_contiguous()):
        return None
    return _replace(n, aten.view.default, (x, n.args[1]))


def _t_of(g: fx.Graph, w: fx.Node, before: fx.Node) -> fx.Node:
    with g.inserting_before(before):
        t = g.call_function(aten.t.default, (w,))
    t.meta.update({k: v for k, v in w.meta.items() if k not in ("val",)})
    propagate_node(t)
    return t


def _addmm_to_linear(n: fx.Node) -> fx.Node | None:
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    bias, x, m2 = n.args[:3]
    bval = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    if not isinstance(bval, torch.Tensor) or bval.dim() != 1:
        return None
    w = _transposed_2d(m2)
    if w is None:
        w = _t_of(n.graph, m2, n)
    return _replace(n, aten.linear.default, (x, w, bias))


def _mm_to_linear(n: fx.Node) -> fx.Node | None:
    x, m2 = n.args[:2]
    w = _transposed_2d(m2)
    if w is None or w.op != "get_attr":
        return None   # only weights: a transposed activation is attention, not a linear layer
    return _replace(n, aten.linear.default, (x, w))


def _fold_linear_views(n: fx.Node) -> fx.Node | None:
    lin = n.args[0]
    if not (isinstance(lin, fx.Node) and lin.target is aten.linear.default and len(lin.users) == 1):
        return None
    inner = lin.args[0]
    if not (isinstance(inner, fx.Node) and inner.target is aten.view.default):
        return None
    x = inner.args[0]
    xv, outv = x.meta.get("val"), n.meta.get("val")
    if not (isinstance(xv, torch.Tensor) and isinstance(outv, torch.Tensor) and xv.dim() >= 2):
        return None
    linv = lin.meta["val"]
    if not same_shape(list(outv.shape), list(xv.shape[:-1]) + [linv.shape[-1]]):
        return None
    return _replace(n, aten.linear.default, (x, *lin.args[1:]))


def _softmax_canonical(n: fx.Node) -> fx.Node | None:
    x, dim, half_to_float = n.args[:3]
    if half_to_float:
        return None
    return _replace(n, aten.softmax.int, (x, dim))


RULES: tuple[tuple[str, frozenset, Rewrite], ...] = (
    ("reshape_to_view", frozenset({aten.reshape.default, aten._unsafe_view.default}), _reshape_to_view),
    ("addmm_to_linear", frozenset({aten.addmm.default}), _addmm_to_linear),
    ("mm_to_linear", frozenset({aten.mm.default, aten.matmul.default}), _mm_to_linear),
    ("fold_linear_views", frozenset({aten.view.default}), _fold_linear_views),
    ("softmax_canonical", frozenset({aten._softmax.default}), _softmax_canonical),
)


_ASSERTS = (aten._assert_tensor_metadata.default,)


def canonicalize(gm: fx.GraphModule) -> Counter[str]:
    """Apply the rules to a fixpoint; return per-rule hit counts."""
    stats: Counter[str] = Counter()
    for n in list(gm.graph.nodes):
        # torch.export's metadata asserts check what meta["val"] already states; the
        # verifier checks it after every pass instead
        if n.op == "call_function" and n.target in _ASSERTS and not n.users:
            gm.graph.erase_node(n)
            stats["drop_metadata_assert"] += 1
    for _ in range(4):
        changed = False
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or not n.users:
                continue
            for name, targets, rewrite in RULES:
                if n.target in targets and rewrite(n) is not None:
                    stats[name] += 1
                    changed = True
                    break
        gm.graph.eliminate_dead_code()
        if not changed:
            break
    gm.recompile()
    return stats

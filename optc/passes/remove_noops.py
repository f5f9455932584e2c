"""remove_noops — drop ops that do not change their input.

**Rewrites** (each a rule with a statistic):
  dropout(x, p, train=False) | dropout(x, 0.0, _)   -> x        (eval-mode dropout)
  alias(x)                                          -> x
  to(x, dtype=x.dtype, device=x.device)             -> x        (HF RMSNorm's fp32 upcast on fp32)
  view(x, x.shape) | expand(x, x.shape)             -> x
  contiguous(x) / clone(x, contiguous) on contiguous x, no mutation after -> x
  mul(x, 1) | div(x, 1) | sub(x, 0) | add(x, 0) on integers -> x  (Llama rotary's ``cos * 1.0``;
                                                       float x + 0.0 turns -0.0 into +0.0: kept)
**Source**: standard algebraic simplification (LLVM InstCombine, Inductor's remove_noop_ops);
  motivated by HF Llama (``attention_scaling`` = 1.0, fp32 round-trips) and GPT-2 (eval dropout).
**Requires**: canonical graph (pre-dispatch ATen, ``meta["val"]`` everywhere).
**Ensures**: outputs bit-identical to before. Ops producing fresh tensors are only removed
  when nothing mutates the result in place and neither it nor any view of it is a graph
  output (so no new aliasing becomes visible to the caller).
**Order**: first; later pattern passes then see one spelling of each computation.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import val as _val
from optc.graph.shape import same_shape
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite

aten = torch.ops.aten


@dataclass(frozen=True)
class RemoveNoopsConfig(PassConfig):
    VERSION = 1


def _is_view(u: fx.Node) -> bool:
    t = u.target
    if t is operator.getitem:
        return True
    return isinstance(t, torch._ops.OpOverload) and any(
        r.alias_info is not None and not r.alias_info.is_write for r in t._schema.returns)


def _safe_to_alias(n: fx.Node) -> bool:
    """A fresh-result op may become its input only if nothing mutates the result or lets it
    escape as an output, directly or through any chain of views of it."""
    todo, seen = [n], {n}
    while todo:
        for u in todo.pop().users:
            if u.op == "output":
                return False
            t = u.target
            if not isinstance(t, torch._ops.OpOverload) and t is not operator.getitem:
                return False            # unknown callable: may mutate or stash its input
            if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
                return False
            if _is_view(u) and u not in seen:
                seen.add(u)
                todo.append(u)
    return True


def _same_meta(n: fx.Node, x: object) -> bool:
    a, b = _val(n), _val(x)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and same_shape(list(a.shape), list(b.shape)))


def _dropout(n: fx.Node) -> fx.Node | None:
    x, p = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    return x if (not train or p == 0) and _same_meta(n, x) else None


def _identity_view(n: fx.Node) -> fx.Node | None:
    x = n.args[0]
    return x if _same_meta(n, x) else None


def _arg(n: fx.Node, name: str, default: object = None) -> object:
    """An argument by schema name, positional or keyword."""
    if name in n.kwargs:
        return n.kwargs[name]
    names = [a.name for a in n.target._schema.arguments]
    i = names.index(name) if name in names else -1
    return n.args[i] if 0 <= i < len(n.args) else default


def _to_same(n: fx.Node) -> fx.Node | None:
    x = n.args[0]
    if _arg(n, "copy", False):
        return None
    if n.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return x if _same_meta(n, x) else None


def _contiguous(n: fx.Node) -> fx.Node | None:
    x = n.args[0]
    v = _val(x)
    if n.target is aten.clone.default and n.kwargs.get("memory_format") != torch.contiguous_format:
        return None
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    if isinstance(v, torch.Tensor) and guard_or_false(v.is_contiguous()) and _same_meta(n, x) \
            and _safe_to_alias(n):
        return x
    return None


def _arith_identity(n: fx.Node) -> fx.Node | None:
    x, c = n.args[0], n.args[1] if len(n.args) > 1 else None
    if not isinstance(c, (int, float)) or isinstance(c, bool) or n.kwargs.get("alpha", 1) != 1:
        return None
    unit = 1 if n.target in (aten.mul.Tensor, aten.div.Tensor) else 0
    xv = _val(x)
    if n.target is aten.add.Tensor and isinstance(xv, torch.Tensor) and xv.is_floating_point():
        return None     # -0.0 + 0.0 == +0.0: adding zero is not an identity on floats
    if c == unit and _same_meta(n, x) and _safe_to_alias(n):
        return x
    return None


Rule = Callable[[fx.Node], "fx.Node | None"]
RULES: tuple[tuple[str, frozenset, Rule], ...] = (
    ("dropout_eval", frozenset({aten.dropout.default}), _dropout),
    ("identity_view", frozenset({aten.alias.default, aten.view.default, aten.expand.default,
                                 aten.reshape.default}), _identity_view),
    ("to_same_dtype", frozenset({aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                                 aten._to_copy.default}), _to_same),
    ("contiguous", frozenset({aten.contiguous.default, aten.clone.default}), _contiguous),
    ("arith_identity", frozenset({aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor,
                                  aten.sub.Tensor}), _arith_identity),
)


def run(gm: fx.GraphModule, cfg: RemoveNoopsConfig) -> PassResult:
    stats: Counter[str] = Counter()
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        for name, targets, rule in RULES:
            if n.target not in targets:
                continue
            if n.target is aten._to_copy.default and not _safe_to_alias(n):
                break
            repl = rule(n)
            if repl is not None and take_rewrite():
                n.replace_all_uses_with(repl)
                gm.graph.erase_node(n)
                stats[name] += 1
            break
    return PassResult(gm, bool(stats), stats)


PASS = PassInfo(
    name="remove_noops", run=run, config_cls=RemoveNoopsConfig,
    summary="drop eval dropout, identity views/casts/contiguous, x*1 and x+0",
    source="algebraic simplification (LLVM InstCombine; Inductor remove_noop_ops)",
    lossless=True,
)

"""Per-node cost annotation: FLOPs and bytes moved, as sympy expressions of symbolic sizes.

``annotate_costs(gm)`` sets ``meta["optc_cost"] = Cost(flops, bytes)``; ``evaluate(cost,
bindings)`` gives numbers for concrete sizes. The model is first-order: GEMM-like ops count
2·M·N·K, attention 4·B·H·Tq·Tk·D (``optc::attention``: over the pairs it keeps, about half
when causal), elementwise/reductions one FLOP per output element; bytes
are every tensor input read once plus the output written once (views and metadata ops move
nothing). Good enough to rank choices; the benchmarks measure the truth.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Mapping

import sympy
import torch
import torch.fx as fx

from optc.graph.shape import size_expr

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    bytes: sympy.Expr

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


ZERO = Cost(sympy.Integer(0), sympy.Integer(0))


def _numel(v: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[sympy.sympify(size_expr(s)) for s in v.shape]) if v.dim() else sympy.Integer(1)


def _nbytes(v: Any) -> sympy.Expr:
    if isinstance(v, torch.Tensor):
        return _numel(v) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sympy.Add(*[_nbytes(x) for x in v]) if v else sympy.Integer(0)
    return sympy.Integer(0)


def _is_view(t: Any) -> bool:
    if not isinstance(t, torch._ops.OpOverload):
        return t is operator.getitem
    rets = t._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


QUANT_LINEAR_OPS = frozenset({"linear_int8", "linear_int4", "linear_w8a8", "linear_bfp"})
QUANT_GROUP_OPS = frozenset({"qlinear_group", "qswiglu"})      # optc.ops.quant_group


def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def node_cost(n: fx.Node) -> Cost:
    if n.op != "call_function":
        return ZERO
    t = n.target
    out = n.meta.get("val")
    if _is_view(t):
        return ZERO
    ins = [_val(b) for a in (*n.args, *n.kwargs.values())
           for b in (a if isinstance(a, (list, tuple)) else (a,))]     # lists: qlinear_group
    tensors_in = [v for v in ins if isinstance(v, torch.Tensor)]
    nbytes = sympy.Add(*[_nbytes(v) for v in tensors_in]) + _nbytes(out)
    flops: sympy.Expr = sympy.Integer(0)
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "optc" and t._opname == "attention":
        flops = _attention_flops(n)
    elif isinstance(t, torch._ops.OpOverload) and t.namespace == "optc" \
            and t._opname in QUANT_LINEAR_OPS and isinstance(out, torch.Tensor):
        # optc.ops.quant: a GEMM over the dequantized weight; bytes are the packed tensors read
        flops = 2 * _numel(out) * sympy.sympify(size_expr(tensors_in[0].shape[-1]))
    elif isinstance(t, torch._ops.OpOverload) and t.namespace == "optc" \
            and t._opname in QUANT_GROUP_OPS:
        # one GEMM per weight (qswiglu: two of its output's size, then silu and the product)
        k = sympy.sympify(size_expr(tensors_in[0].shape[-1]))
        outs = list(out) if isinstance(out, (list, tuple)) else [out, out]
        flops = sympy.Add(*[2 * _numel(o) * k for o in outs]) + (
            0 if isinstance(out, (list, tuple)) else 2 * _numel(out))
    elif isinstance(out, torch.Tensor):
        if t in (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
                 aten.bmm.default):
            a = tensors_in[0] if t is not aten.addmm.default else tensors_in[1]
            k = sympy.sympify(size_expr(a.shape[-1]))
            flops = 2 * _numel(out) * k
        elif t is aten.scaled_dot_product_attention.default:
            q, k = tensors_in[0], tensors_in[1]
            flops = 4 * _numel(q) * sympy.sympify(size_expr(k.shape[-2]))
        elif out.is_floating_point():
            flops = _numel(out)
    elif isinstance(t, torch._ops.OpOverload) and t.namespace == "optc":
        # fused norms: ~4 FLOPs per output element (add, square-accumulate, scale, weight)
        flops = sympy.Add(*[_numel(v) for v in (out or ()) if isinstance(v, torch.Tensor)]) * 4
    return Cost(sympy.simplify(flops), sympy.simplify(nbytes))


def _attention_flops(n: fx.Node) -> sympy.Expr:
    """optc::attention: both products over the visible (query, key) pairs (causal: about half)."""
    from optc.ops.attention import attention_flops
    q, k, v = (_val(a) for a in n.args[:3])
    B, H, tq, d = (sympy.sympify(size_expr(s)) for s in q.shape)
    tk, dv = sympy.sympify(size_expr(k.shape[2])), sympy.sympify(size_expr(v.shape[3]))
    return sympy.sympify(attention_flops(B, H, tq, tk, d, dv, bool(n.args[4])))


def annotate_costs(gm: fx.GraphModule) -> Cost:
    total = ZERO
    for n in gm.graph.nodes:
        c = node_cost(n)
        n.meta["optc_cost"] = c
        total = total + c
    return Cost(sympy.simplify(total.flops), sympy.simplify(total.bytes))


def evaluate(expr: sympy.Expr, bindings: Mapping[sympy.Symbol, int] | None = None) -> int:
    v = expr.subs(dict(bindings or {})) if bindings else expr
    if not v.is_number:
        raise ValueError(f"cost {expr} has unbound symbols {sorted(map(str, v.free_symbols))}")
    return int(v)

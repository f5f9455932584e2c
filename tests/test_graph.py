"""optc.graph: the printer (golden text), the verifier (each invariant it guards), the cost
model (exact FLOPs and bytes, symbolic sizes) and the memory planner (offsets, lower bound)."""

from __future__ import annotations

import operator

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from expecttest import assert_expected_inline
from hypothesis import given, settings
from hypothesis import strategies as st

from optc.capture import capture_export
from optc.graph.cost import ZERO, annotate_costs, evaluate, node_cost
from optc.graph.printer import format_graph, target_str, val_str
from optc.graph.shape import fake_mode_of
from optc.graph.verifier import VerificationError, verify
from optc.runtime.memory_plan import ALIGN, Buffer, greedy_by_size, lower_bound

aten = torch.ops.aten


class TwoOps(nn.Module):
    """linear inside block 0 of a ModuleList, relu outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x).relu()


def _captured(dynamic: bool = False) -> fx.GraphModule:
    x = torch.randn(2, 3, 8)  # (B, T, C)
    shapes = {"x": {1: torch.export.Dim("T", min=2, max=64)}} if dynamic else None
    return capture_export(TwoOps(), (x,), dynamic_shapes=shapes).gm


def _node(gm: fx.GraphModule, target: object) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


# ---------------------------------------------------------------- printer


def test_printer_golden():
    gm = _captured()
    assert_expected_inline(format_graph(gm), """\
graph(%in0: f32[2,3,8]):
  %linear0 = aten.linear(%in0, $blocks.0.weight, $blocks.0.bias) : f32[2,3,4]  @L0
  %relu0 = aten.relu(%linear0) : f32[2,3,4]
  return (%relu0,)""")
    assert_expected_inline(format_graph(gm, layers=False), """\
graph(%in0: f32[2,3,8]):
  %linear0 = aten.linear(%in0, $blocks.0.weight, $blocks.0.bias) : f32[2,3,4]
  %relu0 = aten.relu(%linear0) : f32[2,3,4]
  return (%relu0,)""")


def test_printer_names_do_not_depend_on_tracer_names():
    gm = _captured()
    before = format_graph(gm)
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_function":
            n._rename(f"tracer_name_{100 - i}")
    assert format_graph(gm) == before


def test_printer_value_and_target_strings():
    gm = _captured(dynamic=True)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    sym = x.shape[1]
    assert val_str(x) == f"f32[2,{sym},8]"
    assert val_str(sym) == f"sym({sym})"
    assert val_str((x, None)) == f"(f32[2,{sym},8], )"
    assert val_str(torch.zeros(2, dtype=torch.bool)) == "b8[2]"
    assert target_str(aten.pow.Tensor_Scalar) == "aten.pow.Tensor_Scalar"
    assert target_str(aten.add.Tensor) == "aten.add"
    assert target_str(operator.getitem) == "getitem"
    assert target_str(len) == "len"


# ---------------------------------------------------------------- verifier


def test_verifier_accepts_a_captured_graph():
    verify(_captured(), allow_unknown_ops=False)
    verify(_captured(dynamic=True), allow_unknown_ops=False)


def test_verifier_catches_corrupted_shape():
    gm = _captured()
    lin = _node(gm, aten.linear.default)
    with fake_mode_of(gm):
        lin.meta["val"] = torch.empty(2, 3, 5)
    with pytest.raises(VerificationError, match=r"linear: shape \[2, 3, 5\] stored vs \[2, 3, 4\] propagated"):
        verify(gm)


def test_verifier_catches_corrupted_dtype():
    gm = _captured()
    relu = _node(gm, aten.relu.default)
    with fake_mode_of(gm):
        relu.meta["val"] = torch.empty(2, 3, 4, dtype=torch.float16)
    with pytest.raises(VerificationError, match="relu: dtype torch.float16 stored vs torch.float32"):
        verify(gm)


def test_verifier_catches_missing_val():
    gm = _captured()
    del _node(gm, aten.relu.default).meta["val"]
    with pytest.raises(VerificationError, match=r"relu \(call_function aten.relu.default\) has no meta\['val'\]"):
        verify(gm)


def test_verifier_catches_call_method():
    gm = _captured()
    relu = _node(gm, aten.relu.default)
    with gm.graph.inserting_after(relu):
        m = gm.graph.call_method("sigmoid", (relu,))
    m.meta["val"] = relu.meta["val"]
    relu.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m)
    with pytest.raises(VerificationError, match="sigmoid: call_method is not canonical"):
        verify(gm)


def test_verifier_catches_use_before_definition():
    gm = _captured()
    relu = _node(gm, aten.relu.default)
    lin = _node(gm, aten.linear.default)
    lin.prepend(relu)  # relu now reads linear before it is defined
    with pytest.raises(VerificationError, match="graph lint failed"):
        verify(gm)


def test_verifier_allowed_ops_at_a_stage():
    def plain_python(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    gm = _captured()
    relu = _node(gm, aten.relu.default)
    with gm.graph.inserting_after(relu):
        p = gm.graph.call_function(plain_python, (relu,))
    p.meta["val"] = relu.meta["val"]
    relu.replace_all_uses_with(p, delete_user_cb=lambda u: u is not p)
    verify(gm)  # unknown callables are allowed by default (they run as fallbacks)
    with pytest.raises(VerificationError, match="callable .*plain_python.* is not allowed at this stage"):
        verify(gm, allow_unknown_ops=False)


# ---------------------------------------------------------------- cost model


def test_linear_cost_is_exact():
    gm = _captured()
    lin = _node(gm, aten.linear.default)
    c = node_cost(lin)
    M, N, K = 2 * 3, 4, 8
    assert c.flops == 2 * M * N * K
    # bytes: x (M*K) + W (N*K) + b (N) read, out (M*N) written, fp32
    assert c.bytes == 4 * (M * K + N * K + N + M * N)
    relu = node_cost(_node(gm, aten.relu.default))
    assert relu.flops == M * N and relu.bytes == 4 * 2 * M * N  # one FLOP per element
    assert node_cost(next(n for n in gm.graph.nodes if n.op == "get_attr")) == ZERO
    total = annotate_costs(gm)
    assert (total.flops, total.bytes) == (c.flops + relu.flops, c.bytes + relu.bytes)
    assert lin.meta["optc_cost"] == c


def test_views_move_nothing():
    gm = _captured()
    lin = _node(gm, aten.linear.default)
    with gm.graph.inserting_after(lin):
        v = gm.graph.call_function(aten.view.default, (lin, [6, 4]))
    v.meta["val"] = lin.meta["val"].view(6, 4)
    assert node_cost(v) == ZERO


def test_symbolic_cost_evaluates_for_concrete_sizes():
    gm = _captured(dynamic=True)
    T = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[1].node.expr
    assert isinstance(T, sympy.Symbol)
    c = node_cost(_node(gm, aten.linear.default))
    assert c.flops.free_symbols == {T}
    for t in (2, 5, 64):
        M, N, K = 2 * t, 4, 8
        assert evaluate(c.flops, {T: t}) == 2 * M * N * K
        assert evaluate(c.bytes, {T: t}) == 4 * (M * K + N * K + N + M * N)
    with pytest.raises(ValueError, match=f"unbound symbols \\['{T}'\\]"):
        evaluate(c.flops)
    assert evaluate(sympy.Integer(7)) == 7


# ---------------------------------------------------------------- memory plan


def _a(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def test_greedy_by_size_exact_offsets():
    bufs = [Buffer(0, 1, 100), Buffer(1, 2, 200), Buffer(2, 3, 100), Buffer(3, 4, 64)]
    offsets, arena = greedy_by_size(bufs)
    # largest first: 200 B (256 aligned) at 0; the first 100 B overlaps it at t=1 -> 256; the
    # second 100 B overlaps only the 200 B one (t=2) -> 256 again (the first has died); the 64 B
    # one overlaps only the second 100 B (t=3) -> fits below it at 0.
    assert offsets == [256, 0, 256, 0]
    assert arena == 384
    assert lower_bound(bufs) == 384  # t=1: 128 + 256


def test_lower_bound_exact():
    assert lower_bound([]) == 0
    assert greedy_by_size([]) == ([], 0)
    # disjoint lifetimes: the largest alone
    assert lower_bound([Buffer(0, 0, 10), Buffer(1, 1, 1000), Buffer(2, 2, 64)]) == _a(1000)
    # all alive at t=2
    assert lower_bound([Buffer(0, 2, 1), Buffer(2, 5, 65), Buffer(1, 3, 64)]) == 64 + 128 + 64
    # end is inclusive: [0, 1] and [1, 1] overlap; [2, 2] starts after both
    assert lower_bound([Buffer(0, 1, 64), Buffer(1, 1, 64), Buffer(2, 2, 64)]) == 128


_buffers = st.lists(
    st.tuples(st.integers(0, 20), st.integers(0, 6), st.integers(1, 5000)).map(
        lambda t: Buffer(t[0], t[0] + t[1], t[2])),
    max_size=25)


@settings(max_examples=200, deadline=None)
@given(_buffers)
def test_greedy_by_size_invariants(bufs: list[Buffer]):
    offsets, arena = greedy_by_size(bufs)
    assert all(o % ALIGN == 0 for o in offsets)
    for i, (a, oa) in enumerate(zip(bufs, offsets)):
        assert oa + _a(a.size) <= arena
        for b, ob in zip(bufs[i + 1:], offsets[i + 1:]):
            alive_together = not (a.end < b.start or b.end < a.start)
            if alive_together:  # live at the same time -> disjoint bytes
                assert oa + _a(a.size) <= ob or ob + _a(b.size) <= oa, (a, oa, b, ob)
    assert lower_bound(bufs) <= arena <= sum(_a(b.size) for b in bufs)

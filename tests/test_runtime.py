"""Runtime: the Program (lowering, fallbacks for unknown ops, outputs never overwritten),
memory plans (per shape, LRU-bounded, between the lower bound and no reuse), the autograd
path, and the peak-memory meter."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses import FakeTensorMode

import models
import optc
from optc.graph.printer import target_str
from optc.runtime import program as program_mod
from optc.runtime.peak import measure_peak_bytes
from optc.runtime.program import Program, ShapeMismatch

aten = torch.ops.aten
MiB = 1 << 20


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8) -> (B*T*8,)
        # the output is a view of an intermediate: it must escape the arena too
        return (self.fc2(self.fc1(x).relu()) * 2).view(-1)


def _program(compiled: optc.CompiledModel, graph: int = -1) -> Program:
    prog = compiled.report.graphs[graph].program
    assert prog is not None
    return prog


# ---------------------------------------------------------------- a hand-built graph


def first_two_rows(t: torch.Tensor) -> torch.Tensor:
    """A plain Python callable the runtime does not know; returns a view of its input."""
    return t[:2]


def _hand_graph() -> fx.GraphModule:
    """x -> mul(x, 2) -> first_two_rows (escapes) ; add(mul, 1) -> mul(a, a) -> sum (escapes)."""
    fm = FakeTensorMode()
    g = fx.Graph()
    x = g.placeholder("x")
    with fm:
        x.meta["val"] = torch.empty(4, 3)

    def op(target: Callable, *args: Any) -> fx.Node:
        n = g.call_function(target, args)
        with fm:
            n.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
        return n

    doubled = op(aten.mul.Tensor, x, 2.0)
    rows = op(first_two_rows, doubled)
    shifted = op(aten.add.Tensor, doubled, 1.0)
    sq = op(aten.mul.Tensor, shifted, shifted)
    total = op(aten.sum.default, sq)
    g.output((rows, total))
    return fx.GraphModule(nn.Module(), g)


def test_unknown_callable_falls_back():
    prog = Program(_hand_graph())
    assert prog.stats.fallbacks == Counter({target_str(first_two_rows): 1})
    assert prog.stats.instructions == 5
    # mul(x, 2) may be aliased by the unknown op's result, which escapes: not planned; add and
    # the second mul are (both have out= forms); sum is a graph output: not planned
    assert prog.stats.planned_values == 2
    assert prog.stats.lowered["out_variant"] == 2
    x = torch.randn(4, 3)
    with torch.no_grad():
        rows, total = prog(x)
    assert torch.equal(rows, (x * 2)[:2])
    assert torch.equal(total, ((x * 2 + 1) ** 2).sum())


def test_outputs_survive_the_next_call_hand_graph():
    prog = Program(_hand_graph())
    with torch.no_grad():
        first = prog(torch.randn(4, 3))
        kept = [t.clone() for t in first]
        prog(torch.randn(4, 3))
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


def test_arena_never_exceeds_no_reuse_for_small_buffers():
    prog = Program(_hand_graph())
    with torch.no_grad():
        prog(torch.randn(4, 3))
    (plan,) = prog.plans.values()
    assert plan.arena_bytes <= plan.planned_bytes


def test_static_program_refuses_other_shapes():
    prog = Program(_hand_graph())
    with pytest.raises(ShapeMismatch, match=r"input shape \(5, 3\) != traced \(4, 3\)"):
        with torch.no_grad():
            prog(torch.randn(5, 3))


# ---------------------------------------------------------------- custom ops without out=


@pytest.fixture(scope="module")
def twice_op() -> Iterator[Any]:
    """``optc_test::twice``: a torch.library op optc knows nothing about (no out= variant)."""
    lib = torch.library.Library("optc_test", "FRAGMENT")  # noqa: TOR901 - test-only namespace
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("optc_test::twice", lambda x: torch.empty_like(x), lib=lib)
    yield torch.ops.optc_test.twice.default
    lib._destroy()


@pytest.mark.parametrize("frontend", ["dynamo", "export"])
def test_custom_op_falls_back(twice_op: Any, frontend: str, assert_matches_eager):
    class UsesTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(twice_op(self.lin(x))).relu()

    model = UsesTwice()
    x = torch.randn(2, 4)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend=frontend))
    out = compiled(x)
    with torch.no_grad():
        assert_matches_eager(out, model(x))
    assert compiled.report.graphs[0].fallbacks == Counter({"optc_test.twice": 1})
    assert compiled.report.summary()["fallback_ops"] == 1
    # its result is a fresh tensor the arena does not own; the linears around it are planned
    assert _program(compiled).stats.planned_values == 2


# ---------------------------------------------------------------- outputs and plans


def test_output_is_not_overwritten_by_the_next_call():
    model = MLP()
    compiled = optc.compile(model)
    x1, x2 = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    first = compiled(x1)
    kept = first.clone()
    second = compiled(x2)
    assert torch.equal(first, kept)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(second, model(x2))
    prog = _program(compiled)
    # fc1 and fc2 live in the arena; ``* 2`` escapes as the output's base; relu's result is
    # small and has no fast out= binding, so it is allocated (program.SMALL_UNPLANNED_BYTES)
    assert prog.stats.planned_values == 2 and prog.stats.unplanned_values == 2
    assert compiled.report.graphs[0].calls == Counter({"optc": 2})


def test_arena_between_lower_bound_and_no_reuse():
    model = models.build("llama-tiny")
    compiled = optc.compile(model)
    args, kwargs = models.example_inputs(model, seq=8)
    compiled(*args, **kwargs)
    (plan,) = _program(compiled).plans.values()
    assert plan.lower_bound_bytes <= plan.arena_bytes <= plan.planned_bytes
    assert plan.arena_bytes < plan.planned_bytes  # reuse happens on a real model


def test_plan_memory_off_plans_nothing(assert_matches_eager):
    model = MLP()
    compiled = optc.compile(model, config=optc.CompileConfig(plan_memory=False))
    x = torch.randn(2, 3, 8)
    out = compiled(x)
    prog = _program(compiled)
    assert prog.stats.planned_values == 0 and "out_variant" not in prog.stats.lowered
    assert not prog.plans
    with torch.no_grad():
        assert_matches_eager(out, model(x))




def _ids(seq: int, dynamic: bool = False) -> torch.Tensor:
    ids = torch.randint(0, 256, (1, seq))
    if dynamic:
        torch._dynamo.mark_dynamic(ids, 1)  # one graph with a symbolic sequence length
    return ids


def test_symbolic_program_serves_two_lengths_with_two_plans(assert_matches_eager):
    model = models.build("llama-tiny")
    compiled = optc.compile(model)
    for seq in (8, 12):
        ids = _ids(seq, dynamic=seq == 8)
        out = compiled(ids)
        with torch.no_grad():
            assert_matches_eager(out, model(ids))
    assert len(compiled.report.graphs) == 1
    prog = _program(compiled)
    assert prog.symbolic
    assert len(prog.plans) == 2
    a, b = prog.plans.values()
    assert a.arena_bytes < b.arena_bytes  # sized for each length
    assert compiled.report.graphs[0].calls == Counter({"optc": 2})


def _dynamic_mlp(max_plans: int | None, seqs: tuple[int, ...]) -> Program:
    compiled = optc.compile(MLP(), config=optc.CompileConfig(max_plans=max_plans))
    for seq in seqs:
        x = torch.randn(2, seq, 8)
        if seq == seqs[0]:
            torch._dynamo.mark_dynamic(x, 1)
        compiled(x)
    assert len(compiled.report.graphs) == 1
    return _program(compiled)


def test_max_plans_bounds_the_plan_cache():
    prog = _dynamic_mlp(2, (3, 4, 5))
    assert prog.symbolic and prog.max_plans == 2
    # LRU: the plan of the oldest length (3) was dropped; a plan is keyed by the values of the
    # symbols its buffer sizes use (here the sequence length)
    assert list(prog.plans) == [(4,), (5,)]


def test_max_plans_knob(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_MAX_PLANS", "1")
    prog = _dynamic_mlp(None, (3, 4))
    assert prog.max_plans == 1 and list(prog.plans) == [(4,)]


# ---------------------------------------------------------------- autograd


def test_autograd_runs_eager_and_gives_exact_gradients():
    model = MLP()
    compiled = optc.compile(model, inference=False)
    x = torch.randn(2, 3, 8)
    out = compiled(x)
    assert out.requires_grad
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert compiled.report.graphs[0].calls == Counter({"eager:autograd": 1})
    with torch.no_grad():  # the optimized path once autograd is off (Dynamo guards grad mode:
        compiled(x)        # a second graph)
    assert compiled.report.summary()["calls"] == {"eager:autograd": 1, "optc": 1}


# ---------------------------------------------------------------- fast bindings


def _sample_args() -> dict[Any, tuple]:
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    m, w, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    return {
        aten.add.Tensor: (a, b), aten.sub.Tensor: (a, b), aten.mul.Tensor: (a, b),
        aten.div.Tensor: (a, b), aten.neg.default: (a,), aten.rsqrt.default: (a.abs() + 1,),
        aten.pow.Tensor_Scalar: (a, 2), aten.tanh.default: (a,), aten.linear.default: (m, w, bias),
        aten.matmul.default: (m, w.t()), aten.mm.default: (a, b.t()),
        aten.bmm.default: (m, m.transpose(1, 2)), aten.mean.dim: (m, [-1], True),
        aten.softmax.int: (m, -1), aten.cat.default: ([a, b], -1), aten.gelu.default: (a,),
        aten.silu.default: (a,),
    }


def _more_args() -> dict[Any, tuple]:
    """Ops bound to a fast binding without ``out=`` (tuple results compared elementwise)."""
    m, ids = torch.randn(2, 3, 6), torch.tensor([[0, 2], [1, 1]])
    return {
        aten.unbind.int: (m, 1), aten.split.Tensor: (m, 2, -1),
        aten.split_with_sizes.default: (m, [2, 4], -1), aten.arange.default: (7,),
        aten.arange.start: (2, 7), aten.zeros_like.default: (ids,),
        aten.to.dtype: (ids, torch.float32), aten.rsub.Scalar: (m, 1.0),
        aten.embedding.default: (m[0], ids), aten.view.default: (m, [6, 6]),
        aten.transpose.int: (m, 1, 2), aten.select.int: (m, 0, 1),
        aten.layer_norm.default: (m, [6]), aten.relu.default: (m,),
    }


def test_fast_out_bindings_accept_out():
    """Every op the runtime calls through a torch-level binding with ``out=`` really takes it."""
    samples = _sample_args()
    fast_out = program_mod._FAST_OUT
    assert set(fast_out) <= set(samples), "add sample arguments for the new op"
    for op in fast_out:
        args = samples[op]
        ref = op(*args)
        out = torch.empty_like(ref)
        got = program_mod._FAST[op](*args, out=out)
        assert got is out or got.data_ptr() == out.data_ptr(), op
        assert torch.equal(out, ref), op


def test_fast_bindings_match_their_overloads():
    samples = {**_sample_args(), **_more_args()}
    assert set(program_mod._FAST) - set(samples) <= {
        aten.unsqueeze.default, aten.permute.default, aten.expand.default, aten.t.default,
        aten.reshape.default, aten.scaled_dot_product_attention.default}
    for op, args in samples.items():
        if op in program_mod._FAST:
            got, ref = program_mod._FAST[op](*args), op(*args)
            if isinstance(ref, torch.Tensor):
                assert got.dtype == ref.dtype and torch.equal(got, ref), op
            else:
                assert len(got) == len(ref) and all(map(torch.equal, got, ref)), op


# ---------------------------------------------------------------- peak memory


def test_measure_peak_bytes_counts_live_storage():
    def two_at_once() -> None:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(MiB, dtype=torch.uint8)
        del a, b
        c = torch.empty(MiB, dtype=torch.uint8)  # after both died: the peak stays at 2 MiB
        del c

    peak = measure_peak_bytes(two_at_once)
    assert 2 * MiB <= peak < 3 * MiB


def test_measure_peak_bytes_excludes_inputs():
    x = torch.zeros(MiB // 4)  # 1 MiB of fp32
    assert measure_peak_bytes(lambda t: t.add_(1), x) == 0  # in place: nothing new
    assert MiB <= measure_peak_bytes(lambda t: t + 1, x) < 2 * MiB


# ---------------------------------------------------------------- constant folding


class CatWeights(nn.Module):
    """A value computed from parameters only (as fuse_qkv's concatenated weights are)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 8))
        self.b = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, torch.cat([self.a, self.b * 2], 0))


@pytest.mark.parametrize("frontend", ["dynamo", "export"])
def test_constant_only_values_are_folded_and_refolded(frontend: str, assert_matches_eager):
    model = CatWeights()
    compiled = optc.compile(model, config=optc.CompileConfig(frontend=frontend))
    x = torch.randn(3, 8)
    first = compiled(x)
    prog = _program(compiled)
    assert prog.stats.folded_values == 2                       # b * 2 and the cat
    planned = prog.source_planned
    assert "_refold()" in planned and "cat" not in prog.source_plain.split("def")[0]
    with torch.no_grad():
        assert_matches_eager(first, model(x))
        model.a.mul_(-1)                                       # in place: version counter
        assert_matches_eager(compiled(x), model(x))
        model.b.data = torch.randn(4, 8)                       # new storage: data pointer
        assert_matches_eager(compiled(x), model(x))
        model.load_state_dict(CatWeights().state_dict())       # copy_ into the parameters
        assert_matches_eager(compiled(x), model(x))


class WritesBuffer(nn.Module):
    """A buffer the graph updates in place: values derived from it are not constants."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return x + self.steps * 2


def test_values_of_buffers_written_in_place_are_not_folded():
    model = WritesBuffer()
    compiled = optc.compile(model)
    x = torch.randn(2, 8)
    outs = [compiled(x) for _ in range(3)]
    assert _program(compiled).stats.folded_values == 0
    for k, out in enumerate(outs, start=1):
        assert torch.equal(out, x + 2 * k)


def test_constant_written_by_the_graph_is_not_folded():
    """get_attr c; add_(c, 1); y = x + c * 2: the mul reads c after this call's write, so it
    cannot be computed before the call (nor once)."""
    fm = FakeTensorMode()
    root = nn.Module()
    root.register_buffer("c", torch.zeros(3))
    g = fx.Graph()
    x = g.placeholder("x")
    c = g.get_attr("c")
    with fm:
        x.meta["val"] = torch.empty(2, 3)
        c.meta["val"] = fm.from_tensor(root.c)

    def op(target: Callable, *args: Any) -> fx.Node:
        n = g.call_function(target, args)
        with fm:
            n.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
        return n

    op(aten.add_.Tensor, c, 1.0)
    g.output((op(aten.add.Tensor, x, op(aten.mul.Tensor, c, 2.0)),))
    prog = Program(fx.GraphModule(root, g))
    assert prog.stats.folded_values == 0
    xs = torch.randn(2, 3)
    with torch.no_grad():
        for k in (1, 2, 3):
            (out,) = prog(xs)
            assert torch.equal(out, xs + 2.0 * k)

"""User API edges: graph breaks, capture failures, eager compilation, report, measure_memory."""

from __future__ import annotations

import torch
import torch.nn as nn

import optc
from optc.api import _DynamoGraph


class Broken(nn.Module):
    """Two linear blocks with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return torch.tanh(self.b(y)) + 1.0


def test_graph_break_gives_two_optc_graphs_and_is_reported(assert_matches_eager):
    m = Broken().eval()
    x = torch.randn(3, 8)
    compiled = optc.compile(m)
    out = compiled(x)
    with torch.no_grad():
        assert_matches_eager(out, m(x))
    rep = compiled.report
    assert len(rep.graphs) == 2                      # each side of the break compiled by optc
    assert sum(rep.graph_breaks.values()) == 1
    assert all(g.calls["optc"] == 1 and g.eager_reason is None for g in rep.graphs)
    assert rep.summary()["graph_breaks"] == 1


def test_capture_failure_runs_eagerly_and_is_reported(monkeypatch, assert_matches_eager):
    import optc.api as api

    def boom(gm, example_inputs, layout=None):
        raise RuntimeError("synthetic capture failure")

    monkeypatch.setattr(api, "capture_dynamo", boom)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    compiled = optc.compile(m)
    out = compiled(x)
    with torch.no_grad():
        assert_matches_eager(out, m(x))
    g = compiled.report.graphs[0]
    assert g.eager_reason is not None and "synthetic capture failure" in g.eager_reason
    assert g.calls["eager:capture"] == 1 and g.calls["optc"] == 0


def test_example_inputs_compile_at_once():
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
    x = torch.randn(2, 4)
    compiled = optc.compile(m, example_inputs=(x,))
    assert len(compiled.report.graphs) == 1 and compiled.report.first_call_s is not None
    assert isinstance(compiled.report.graphs[0], optc.api.GraphReport)


def test_measure_memory_reports_arena_and_transient():
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(32, 64)
    compiled = optc.compile(m)
    mem = compiled.measure_memory(x)
    prog = compiled.report.graphs[0].program
    plan = prog.plan_for((x,))
    assert mem["arena_bytes"] == plan.arena_bytes > 0
    # linear -> gelu: the 32x256 linear output (32 KiB) is still read while gelu writes its own
    # 32 KiB, so 64 KiB are live at once; the output (32x8 fp32 = 1 KiB) is allocated by its op
    assert plan.lower_bound_bytes == plan.arena_bytes == 64 * 1024
    assert plan.planned_bytes == 80 * 1024           # + the two 32x64 (8 KiB) buffers, no reuse
    assert mem["transient_peak_bytes"] >= 32 * 8 * 4


def test_compiled_model_forwards_attributes_and_is_a_module():
    m = nn.Linear(4, 4)
    compiled = optc.compile(m)
    assert isinstance(compiled, nn.Module)
    assert compiled.in_features == 4                 # attribute of the wrapped model
    assert compiled.weight is m.weight


def test_backend_graph_object_is_callable_with_dynamo_args():
    calls = []

    def backend(gm, example_inputs):
        g = optc.optc_backend(gm, example_inputs)
        assert isinstance(g, _DynamoGraph)
        calls.append(g)
        return g

    m = nn.Linear(4, 2).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = torch.compile(m, backend=backend)(x)
        torch.testing.assert_close(out, m(x), rtol=0, atol=0)
    assert calls and calls[0].report.calls["optc"] == 1


def test_fast_guards_scoped_and_module_changes_still_seen(assert_matches_eager):
    """optc.compile builds its guards with Dynamo's recursive dict-tag check, restores the global
    setting after the compiling call, and still sees attribute and parameter changes."""
    import models
    m = models.build("llama-tiny", seed=5)
    args, _ = models.example_inputs(m, seq=8)
    before = torch._dynamo.config.use_recursive_dict_tags_for_guards
    compiled = optc.compile(m)
    with torch.no_grad():
        assert_matches_eager(compiled(*args), m(*args))
        assert torch._dynamo.config.use_recursive_dict_tags_for_guards == before
        m.layers[0].attention_norm.eps = 0.5          # a Python float the graph depends on
        assert_matches_eager(compiled(*args), m(*args))
        m.output.weight = torch.nn.Parameter(torch.randn_like(m.output.weight))   # replaced
        assert_matches_eager(compiled(*args), m(*args))
        m.output.weight.mul_(2)                       # changed in place
        assert_matches_eager(compiled(*args), m(*args))
    assert compiled.report.summary()["calls"].get("optc", 0) == 4

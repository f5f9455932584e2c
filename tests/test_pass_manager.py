"""PassManager: ordering constraints, ablation switches, containment of a failing pass (graph
rolled back, reproducer written, compilation continues), verification after each pass,
numbered dumps, rewrite-budget bisection, per-pass records and logs."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import optc
from optc.capture import capture_symbolic_trace
from optc.config import CompileConfig, ConfigError, PassConfig
from optc.graph.printer import format_graph
from optc.graph.shape import fake_mode_of
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import PassFailure, PassManager, take_rewrite
from optc.passes.pipeline import DEFAULT_PIPELINE
from optc.passes.registry import PASSES

aten = torch.ops.aten


class Block(nn.Module):
    """Two no-ops (``x * 1.0`` and an fp32->fp32 cast) hiding a residual add + LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # (B, T, C) each
        h = x * 1.0 + r
        y = self.ln(h.to(torch.float32))
        return self.lin(y) + h


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 8), torch.randn(2, 3, 8)


@pytest.fixture
def gm() -> fx.GraphModule:
    return capture_symbolic_trace(Block(), _inputs()).gm


# Fake passes, registered only in a copied registry handed to the PassManager.

def _explode(gm: fx.GraphModule, cfg: PassConfig) -> PassResult:
    """Changes the graph, then raises: the manager must roll the change back."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (list(out.args[0]) + list(out.args[0]),)
    raise RuntimeError("boom")


def _corrupt_meta(gm: fx.GraphModule, cfg: PassConfig) -> PassResult:
    """Returns a graph whose stored shapes are wrong: the verifier must reject it."""
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    with fake_mode_of(gm):
        lin.meta["val"] = torch.empty(2, 3, 5)
    return PassResult(gm, True, Counter({"corrupted": 1}))


def _fake(name: str, run, after: tuple[str, ...] = ()) -> PassInfo:
    return PassInfo(name=name, run=run, config_cls=PassConfig, summary="test pass",
                    source="tests", lossless=True, after=after)


def _registry(*infos: PassInfo) -> dict[str, PassInfo]:
    reg = dict(PASSES)
    reg.update({i.name: i for i in infos})
    return reg


# ---------------------------------------------------------------- pipeline checks


def test_default_pipeline_satisfies_its_constraints():
    PassManager(PASSES, DEFAULT_PIPELINE)
    for info in PASSES.values():
        assert set(info.after) <= set(PASSES), info.name


def test_ordering_violation_raises_config_error():
    with pytest.raises(ConfigError, match=r"pass 'fuse_add_norm' must run after 'remove_noops' "
                                          r"\(declared in its PassInfo.after\)"):
        PassManager(PASSES, ("fuse_add_norm", "remove_noops"))
    PassManager(PASSES, ("fuse_add_norm",))  # a constraint binds only when both are present


def test_unknown_pass_lists_registered_passes():
    with pytest.raises(ConfigError, match=re.escape(
            f"unknown pass(es) ['nope']; registered: {sorted(PASSES)}")):
        PassManager(PASSES, ("remove_noops", "nope"))


def test_optc_compile_checks_the_pipeline_up_front():
    with pytest.raises(ConfigError, match="unknown pass"):
        optc.compile(nn.Linear(2, 2), config=CompileConfig(pipeline=("nope",)))


def test_bad_pipeline_order_raises_config_error_at_compile_with_export():
    with pytest.raises(ConfigError, match="must run after"):
        optc.compile(Block(), config=CompileConfig(pipeline=("fuse_add_norm", "remove_noops"),
                                                   frontend="export"))


# ---------------------------------------------------------------- records


def test_records_are_populated(gm: fx.GraphModule):
    before = format_graph(gm)
    res = PassManager(PASSES, DEFAULT_PIPELINE).run(gm, CompileConfig(), record_graphs=True)
    assert res.graph_before == before
    assert [r.name for r in res.records] == ["remove_noops", "fuse_add_norm", "fuse_attention",
                                             "fuse_rope", "fuse_qkv", "strength_reduce"]
    noops, fuse, attention, rope, qkv, reduce = res.records
    for r in (attention, rope, qkv, reduce):   # no attention, sibling linears or gathers in the block
        assert not r.modified and r.stats == Counter()
    # 6 call_functions: mul, add, to, layer_norm, linear, add; remove_noops drops mul and to;
    # fuse_add_norm turns add + layer_norm into add_layer_norm + 2 getitems
    assert (noops.nodes_before, noops.nodes_after) == (6, 4)
    assert (fuse.nodes_before, fuse.nodes_after) == (4, 5)
    assert noops.stats == Counter({"arith_identity": 1, "to_same_dtype": 1})
    assert fuse.stats == Counter({"add_layer_norm": 1})
    assert res.stats() == {"remove_noops": {"arith_identity": 1, "to_same_dtype": 1},
                           "fuse_add_norm": {"add_layer_norm": 1}}
    for r in (noops, fuse):
        assert r.modified and r.error is None and r.skipped is None and r.reproducer is None
        assert r.seconds > 0.0  # populated (never compared with a time)
    assert res.modified
    assert fuse.graph_after == format_graph(res.gm)
    assert "optc.add_layer_norm" in fuse.graph_after
    assert format_graph(gm) == before  # the input graph is never edited in place


def test_graph_after_only_when_recording(gm: fx.GraphModule):
    res = PassManager(PASSES, DEFAULT_PIPELINE).run(gm, CompileConfig())
    assert res.graph_before is None
    assert all(r.graph_after is None for r in res.records)


def test_unchanged_pass_keeps_graph(gm: fx.GraphModule):
    noop = _fake("noop", lambda g, c: PassResult(g, False))
    res = PassManager(_registry(noop), ("noop",)).run(gm, CompileConfig(), record_graphs=True)
    assert res.gm is gm
    assert not res.modified and res.records[0].graph_after is None
    assert res.records[0].nodes_before == res.records[0].nodes_after == 6


# ---------------------------------------------------------------- ablation


def test_optc_disable_skips_a_pass(gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_DISABLE", "remove_noops")
    res = PassManager(PASSES, DEFAULT_PIPELINE).run(gm, CompileConfig())
    noops, fuse = res.records[:2]
    assert noops.skipped == "disabled by OPTC_DISABLE"
    assert not noops.modified and noops.stats == Counter() and noops.nodes_after == noops.nodes_before
    # why the order matters: with the cast still between add and layer_norm, nothing fuses
    assert fuse.skipped is None and fuse.stats == Counter() and not fuse.modified


def test_config_can_disable_a_pass(gm: fx.GraphModule):
    cfg = CompileConfig(passes={"fuse_add_norm": {"enabled": False}})
    res = PassManager(PASSES, DEFAULT_PIPELINE).run(gm, cfg)
    assert res.records[1].skipped == "disabled in config"
    assert res.records[0].modified


# ---------------------------------------------------------------- a failing pass


def test_failing_pass_is_rolled_back_with_reproducer(gm: fx.GraphModule, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_REPRO_DIR", str(tmp_path))
    pm = PassManager(_registry(_fake("explode", _explode)), ("remove_noops", "explode", "fuse_add_norm"))
    res = pm.run(gm, CompileConfig(), record_graphs=True)
    noops, boom, fuse = res.records
    after_noops = noops.graph_after
    assert boom.error == "RuntimeError: boom"
    assert not boom.modified and boom.nodes_after == boom.nodes_before == 4
    # compilation went on with the graph as remove_noops left it
    assert fuse.error is None and fuse.stats == Counter({"add_layer_norm": 1})
    # the reproducer: the failing pass's input, its config, the traceback
    repro = boom.reproducer
    assert repro is not None and repro.parent == tmp_path and repro.name.startswith("optc_repro_explode_")
    assert sorted(p.name for p in repro.iterdir()) == [
        "README.txt", "graph_before.py", "graph_before.txt", "pass.json", "traceback.txt"]
    assert (repro / "graph_before.txt").read_text() == after_noops + "\n"
    assert json.loads((repro / "pass.json").read_text()) == {
        "pass": "explode", "config": {"enabled": True, "version": 1}}
    tb = (repro / "traceback.txt").read_text()
    assert "RuntimeError: boom" in tb and "_explode" in tb
    assert "OPTC_DISABLE=explode" in (repro / "README.txt").read_text()


def test_failing_pass_leaves_graph_text_identical(gm: fx.GraphModule):
    before = format_graph(gm)
    res = PassManager(_registry(_fake("explode", _explode)), ("explode",)).run(gm, CompileConfig())
    assert format_graph(res.gm) == before
    assert format_graph(gm) == before


def test_strict_mode_raises_pass_failure(gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch):
    pm = PassManager(_registry(_fake("explode", _explode)), ("explode",))
    with pytest.raises(PassFailure, match=r"pass 'explode' failed: RuntimeError: boom \(reproducer: .*\)"):
        pm.run(gm, CompileConfig(strict=True))
    monkeypatch.setenv("OPTC_STRICT", "1")
    with pytest.raises(PassFailure):
        pm.run(gm, CompileConfig())
    # the config wins over the environment
    assert pm.run(gm, CompileConfig(strict=False)).records[0].error == "RuntimeError: boom"


def test_invalid_graph_is_caught_by_verifier_and_rolled_back(gm: fx.GraphModule):
    before = format_graph(gm)
    pm = PassManager(_registry(_fake("corrupt", _corrupt_meta)), ("corrupt", "remove_noops"))
    res = pm.run(gm, CompileConfig())
    corrupt, noops = res.records
    assert corrupt.error == "VerificationError: linear: shape [2, 3, 5] stored vs [2, 3, 8] propagated"
    assert not corrupt.modified and corrupt.stats == Counter()
    assert noops.modified  # went on from the pre-pass graph
    assert "f32[2,3,8]" in format_graph(res.gm) and "[2,3,5]" not in format_graph(res.gm)
    # without verification nothing notices: the corruption goes through
    res = pm.run(capture_symbolic_trace(Block(), _inputs()).gm, CompileConfig(verify=False))
    assert res.records[0].error is None and "f32[2,3,5]" in format_graph(res.gm)
    assert format_graph(gm) == before


def test_failing_pass_at_api_level_still_gives_correct_outputs(monkeypatch: pytest.MonkeyPatch,
                                                               assert_matches_eager):
    monkeypatch.setitem(PASSES, "explode", _fake("explode", _explode, after=("remove_noops",)))
    model = Block()
    args = _inputs()
    compiled = optc.compile(model, config=CompileConfig(
        pipeline=("remove_noops", "explode", "fuse_add_norm")))
    out = compiled(*args)
    with torch.no_grad():
        assert_matches_eager(out, model(*args))
    (g,) = compiled.report.graphs
    assert g.calls == Counter({"optc": 1})
    assert [r.error for r in g.pipeline.records] == [None, "RuntimeError: boom", None]
    assert g.pipeline.stats() == {"remove_noops": {"arith_identity": 1, "to_same_dtype": 1},
                                  "fuse_add_norm": {"add_layer_norm": 1}}


# ---------------------------------------------------------------- dumps, bisection, logs


def test_dump_dir_writes_numbered_executable_files(gm: fx.GraphModule, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_DUMP_DIR", str(tmp_path / "dumps"))
    noop = _fake("noop", lambda g, c: PassResult(g, False))
    res = PassManager(_registry(noop), ("remove_noops", "noop", "fuse_add_norm")).run(gm, CompileConfig())
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    # numbered by pipeline position; a pass that changed nothing writes nothing
    assert files == ["000_capture.py", "000_capture.txt", "001_remove_noops.py", "001_remove_noops.txt",
                     "003_fuse_add_norm.py", "003_fuse_add_norm.txt"]
    classes = {}
    for name in files:
        if name.endswith(".py"):
            path = tmp_path / "dumps" / name
            ns: dict = {}
            exec(compile(path.read_text(), str(path), "exec"), ns)  # noqa: S102 - our own dump
            (classes[name],) = [v for v in ns.values() if isinstance(v, type)
                                and issubclass(v, nn.Module) and v is not nn.Module]
    # the last dump runs: give it the final graph's frozen tensors and compare
    dumped = classes["003_fuse_add_norm.py"]()
    for attr, t in [*res.gm.named_parameters(), *res.gm.named_buffers()]:
        setattr(dumped, attr, t)
    args = _inputs()
    with torch.no_grad():
        assert torch.equal(dumped(*args)[0], res.gm(*args)[0])
    assert (tmp_path / "dumps" / "003_fuse_add_norm.txt").read_text() == format_graph(res.gm) + "\n"
    assert "torch.ops.optc.add_layer_norm.default" in (tmp_path / "dumps" / "003_fuse_add_norm.py").read_text()


@pytest.mark.parametrize("limit, noops, fuse", [
    ("0", {}, {}),
    ("1", {"arith_identity": 1}, {}),  # the first rewrite in graph order, then the budget is spent
    ("2", {"arith_identity": 1, "to_same_dtype": 1}, {}),
    ("3", {"arith_identity": 1, "to_same_dtype": 1}, {"add_layer_norm": 1}),
])
def test_bisect_limit_caps_total_rewrites(gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch,
                                          limit: str, noops: dict, fuse: dict):
    monkeypatch.setenv("OPTC_BISECT_LIMIT", limit)
    res = PassManager(PASSES, DEFAULT_PIPELINE).run(gm, CompileConfig())
    assert dict(res.records[0].stats) == noops
    assert dict(res.records[1].stats) == fuse
    assert take_rewrite()  # the budget is scoped to the run


def test_bisect_limit_one_on_llama_tiny(monkeypatch: pytest.MonkeyPatch):
    import models
    monkeypatch.setenv("OPTC_BISECT_LIMIT", "1")
    model = models.build("llama-tiny")
    args, kwargs = models.example_inputs(model, seq=8)
    compiled = optc.compile(model, config=CompileConfig(frontend="export"))
    compiled(*args, **kwargs)
    stats = [dict(r.stats) for r in compiled.report.graphs[0].pipeline.records]
    assert [sum(s.values()) for s in stats[:2]] == [1, 0]  # remove_noops: 1 of its 12 rewrites
    assert stats[2] == {"unfused_left": 2}  # fuse_attention: budget spent, both attentions left


def test_logs_by_topic(gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setenv("OPTC_LOGS", "passes,stats,timing")
    noop = _fake("noop", lambda g, c: PassResult(g, False))
    res = PassManager(_registry(noop), ("remove_noops", "noop")).run(gm, CompileConfig())
    err = capsys.readouterr().err
    assert f"[optc:passes] remove_noops: changed\n{format_graph(res.gm)}\n" in err
    assert "[optc:passes] noop: no change\n" in err  # no graph printed for an unchanged pass
    assert "[optc:stats] remove_noops: {'arith_identity': 1, 'to_same_dtype': 1}" in err
    assert re.search(r"\[optc:timing\] remove_noops: \d+\.\d\d ms", err)
    monkeypatch.setenv("OPTC_LOGS", "")
    PassManager(PASSES, DEFAULT_PIPELINE).run(gm, CompileConfig())
    assert capsys.readouterr().err == ""


def test_pass_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PASSES["remove_noops"].name = "x"  # type: ignore[misc]

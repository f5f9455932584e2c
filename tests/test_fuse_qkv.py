"""fuse_qkv: golden Before/After graph, must-not-fire cases, numerics against eager, exact
statistics on the zoo and HF models, and weights changed after compiling (the runtime refolds
the concatenation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import assert_expected_inline

import optc
from optc.capture import capture_symbolic_trace
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import fuse_qkv
from optc.passes.fuse_qkv import FuseQKVConfig
from optc.passes.pipeline import DEFAULT_PIPELINE, pipeline_with

D = 8


class QKV(nn.Module):
    """Three projections of one input, widths (D, kv, kv): MHA when kv == D, GQA below."""

    def __init__(self, kv: int = D, bias: tuple[bool, bool, bool] = (True, True, True)) -> None:
        super().__init__()
        self.q = nn.Linear(D, D, bias=bias[0])
        self.k = nn.Linear(D, kv, bias=bias[1])
        self.v = nn.Linear(D, kv, bias=bias[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum(-1) + self.k(x).sum(-1) * 2 + self.v(x).sum(-1) * 3


def _x() -> torch.Tensor:
    return torch.randn(2, 3, D)


def run_pass(model: nn.Module, args: tuple, cfg: FuseQKVConfig = FuseQKVConfig()
             ) -> tuple[str, str, dict[str, int]]:
    gm = capture_symbolic_trace(model, args).gm
    before = format_graph(gm)
    res = fuse_qkv.run(gm, cfg)
    assert res.modified == bool(res.stats.get("groups"))
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats)


def test_fuse_qkv_golden(assert_matches_eager):
    model = QKV()
    _, after, stats = run_pass(model, (_x(),))
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8]):
  %cat0 = aten.cat([$q.weight, $k.weight, $v.weight], 0) : f32[24,8]
  %cat1 = aten.cat([$q.bias, $k.bias, $v.bias], 0) : f32[24]
  %linear0 = aten.linear(%in0, %cat0, %cat1) : f32[2,3,24]
  %split0 = aten.split(%linear0, 8, -1) : (f32[2,3,8], f32[2,3,8], f32[2,3,8])
  %getitem0 = getitem(%split0, 0) : f32[2,3,8]
  %getitem1 = getitem(%split0, 1) : f32[2,3,8]
  %getitem2 = getitem(%split0, 2) : f32[2,3,8]
  %sum0 = aten.sum.dim_IntList(%getitem0, [-1]) : f32[2,3]
  %sum1 = aten.sum.dim_IntList(%getitem1, [-1]) : f32[2,3]
  %mul0 = aten.mul(%sum1, 2) : f32[2,3]
  %add0 = aten.add(%sum0, %mul0) : f32[2,3]
  %sum2 = aten.sum.dim_IntList(%getitem2, [-1]) : f32[2,3]
  %mul1 = aten.mul(%sum2, 3) : f32[2,3]
  %add1 = aten.add(%add0, %mul1) : f32[2,3]
  return [%add1]""")
    assert stats == {"groups": 1}
    compiled = optc.compile(model, config={"frontend": "symbolic_trace"})
    x = _x()
    with torch.no_grad():
        assert_matches_eager(compiled(x), model(x))
    program = compiled.report.graphs[0].program
    assert program.stats.folded_values == 2          # the two cats run once, not per call
    assert "cat" not in program.source_planned.split("def run_plain")[0].replace("_refold", "")


def test_gqa_widths_split_with_sizes(assert_matches_eager):
    model = QKV(kv=4)
    _, after, stats = run_pass(model, (_x(),))
    assert stats == {"groups": 1}
    assert "aten.split_with_sizes(%linear0, [8, 4, 4], -1)" in after
    compiled = optc.compile(model)
    x = _x()
    with torch.no_grad():
        assert_matches_eager(compiled(x), model(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


class WeightInput(nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w) + F.linear(x, w * 2)


class NeedsContiguous(nn.Module):
    """A view that merges the last two dims: valid on the contiguous result of each linear,
    not on a strided chunk of the fused one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).view(2, 3 * D) + self.b(x).view(2, 3 * D)


@pytest.mark.parametrize("case", ["single", "two_inputs", "weight_input", "mixed_bias",
                                  "too_big", "needs_contiguous"])
def test_must_not_fire(case: str, assert_matches_eager):
    if case == "single":
        model, args = nn.Linear(D, D), (_x(),)
    elif case == "two_inputs":
        model, args = TwoInputs(), (_x(), _x())
    elif case == "weight_input":
        model, args = WeightInput(), (_x(), torch.randn(D, D))
    elif case == "mixed_bias":
        model, args = QKV(bias=(True, False, True)), (_x(),)
    elif case == "too_big":
        model, args = QKV(), (_x(),)
    else:
        model, args = NeedsContiguous(), (_x(),)
    cfg = FuseQKVConfig(max_weight_bytes=100) if case == "too_big" else \
        FuseQKVConfig(min_group=2) if case == "needs_contiguous" else FuseQKVConfig()
    before, after, stats = run_pass(model, args, cfg)
    assert after == before            # mixed_bias: q and v would pair, below min_group=3
    expected = {"too_big": {"skipped_size": 1},
                "needs_contiguous": {"skipped_layout": 1}}.get(case, {})
    assert stats == expected
    compiled = optc.compile(model)
    with torch.no_grad():
        assert_matches_eager(compiled(*args), model(*args))


def test_weights_changed_after_compile_are_refolded(assert_matches_eager):
    model = QKV()
    compiled = optc.compile(model)
    x = _x()
    before = compiled(x)
    with torch.no_grad():
        model.k.weight.mul_(3)                      # in place: bumps the version counter
    after = compiled(x)
    with torch.no_grad():
        assert_matches_eager(after, model(x))
        assert (after - before).abs().max() > 0.1
        model.v.bias.data = torch.randn(D)          # new storage, same version counter
        assert_matches_eager(compiled(x), model(x))


def test_quantized_linears_are_not_fused():
    assert pipeline_with("quantize_weights") == (*DEFAULT_PIPELINE[:4], "quantize_weights",
                                                 *DEFAULT_PIPELINE[4:])
    model = QKV()
    cfg = {"pipeline": list(pipeline_with("quantize_weights")),
           "passes": {"quantize_weights": {"rules": [{"mode": "int8"}]}}}
    compiled = optc.compile(model, config=cfg, example_inputs=(_x(),))
    stats = compiled.report.summary()["pass_stats"][0]
    assert stats["quantize_weights"] == {"quantized.int8": 3}
    assert "fuse_qkv" not in stats                   # nothing left to fuse


def test_fusing_qkv_before_quantizing_is_refused():
    with pytest.raises(optc.ConfigError, match="must run after 'quantize_weights'"):
        optc.compile(QKV(), config={"pipeline": [*DEFAULT_PIPELINE, "quantize_weights"]},
                     example_inputs=(_x(),))


def test_pairs_fuse_with_min_group_2(assert_matches_eager):
    model = QKV(bias=(True, False, True))     # q and v share bias-ness: a pair
    _, after, stats = run_pass(model, (_x(),), FuseQKVConfig(min_group=2))
    assert stats == {"groups": 1} and after.count("aten.linear(") == 2
    compiled = optc.compile(model, config={"passes": {"fuse_qkv": {"min_group": 2}}})
    x = _x()
    with torch.no_grad():
        assert_matches_eager(compiled(x), model(x))
    assert compiled.report.summary()["pass_stats"][0]["fuse_qkv"] == {"groups": 1}


@pytest.mark.parametrize("name,expected", [
    ("llama-tiny", {"groups": 2}), ("gpt2-tiny", {}), ("bert-tiny", {"groups": 2}),
    ("opt-tiny", {"groups": 2})])
def test_zoo_statistics(name: str, expected: dict, stats_on):
    assert stats_on(f"zoo:{name}", "fuse_qkv") == expected


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"groups": 2}), ("bert", {"groups": 2}), ("opt", {"groups": 2}), ("gpt2", {})])
def test_hf_statistics(arch: str, expected: dict, stats_on):
    assert stats_on(f"hf:{arch}", "fuse_qkv") == expected

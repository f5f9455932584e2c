"""fuse_add_norm: golden Before/After graphs per rule, a must-not-fire case per guard, numerics
against eager, exact statistics on the zoo and HF models."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import assert_expected_inline

import models
import optc
from models.hf import build_hf, hf_example_inputs
from models.llama import RMSNorm
from optc.capture import capture_export, capture_symbolic_trace
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import fuse_add_norm, remove_noops
from optc.passes.fuse_add_norm import FuseAddNormConfig

C = 8  # hidden size of the minimal modules


def _xr(shape_r: tuple[int, ...] = (2, 3, C), dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, C, dtype=dtype), torch.randn(*shape_r, dtype=dtype)  # (B, T, C)


class AddNorm(nn.Module):
    """``h = x + r; return norm(h), h`` with a pluggable norm: the residual-stream shape."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + r
        return self.norm(h), h


class HandRMSNorm(nn.Module):
    """HF LlamaRMSNorm written out, with the knobs the guards look at."""

    def __init__(self, dim: int = -1, exponent: float = 2, weight_shape: tuple[int, ...] = (C,)) -> None:
        super().__init__()
        self.dim, self.exponent = dim, exponent
        self.weight = nn.Parameter(torch.rand(*weight_shape) + 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        var = h.pow(self.exponent).mean(self.dim, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + 1e-6))


class AtenRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (C,), self.weight, 1e-6)


def _llama_norm() -> RMSNorm:
    norm = RMSNorm(C, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # not all ones: a dropped weight must show
    return norm


def _layer_norm(**kw: object) -> nn.LayerNorm:
    norm = nn.LayerNorm(C, **kw)
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return norm


def run_pass(model: nn.Module, args: tuple, cfg: FuseAddNormConfig = FuseAddNormConfig()
             ) -> tuple[str, str, dict[str, int]]:
    """(graph after remove_noops, graph after fuse_add_norm, statistics): the pipeline order."""
    gm = capture_symbolic_trace(model, args).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    gm.graph.eliminate_dead_code()
    before = format_graph(gm)
    res = fuse_add_norm.run(gm, cfg)
    assert res.modified == bool(res.stats)
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats)


def compiled_vs_eager(model: nn.Module, args: tuple, check) -> optc.CompiledModel:
    compiled = optc.compile(model)
    with torch.no_grad():
        out, ref = compiled(*args), model(*args)
    for o, r in zip(out, ref):
        check(o, r)
    return compiled


# ---------------------------------------------------------------- golden graphs, one per rule


def test_add_rms_norm_golden(assert_matches_eager):
    model = AddNorm(_llama_norm())
    before, after, stats = run_pass(model, _xr())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add0 = aten.add(%in0, %in1) : f32[2,3,8]
  %pow0 = aten.pow.Tensor_Scalar(%add0, 2) : f32[2,3,8]
  %mean0 = aten.mean.dim(%pow0, [-1], True) : f32[2,3,1]
  %add1 = aten.add(%mean0, 1e-05) : f32[2,3,1]
  %rsqrt0 = aten.rsqrt(%add1) : f32[2,3,1]
  %mul0 = aten.mul(%add0, %rsqrt0) : f32[2,3,8]
  %mul1 = aten.mul($norm.weight, %mul0) : f32[2,3,8]
  return [%mul1, %add0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add_rms_norm0 = optc.add_rms_norm(%in0, %in1, $norm.weight, 1e-05) : (f32[2,3,8], f32[2,3,8])
  %getitem0 = getitem(%add_rms_norm0, 0) : f32[2,3,8]
  %getitem1 = getitem(%add_rms_norm0, 1) : f32[2,3,8]
  return [%getitem1, %getitem0]""")
    assert stats == {"add_rms_norm": 1}
    compiled = compiled_vs_eager(model, _xr(), assert_matches_eager)
    assert compiled.report.summary()["pass_stats"][0]["fuse_add_norm"] == {"add_rms_norm": 1}


def test_add_rms_norm_of_aten_rms_norm_golden(assert_matches_eager):
    model = AddNorm(AtenRMSNorm())
    before, after, stats = run_pass(model, _xr())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add0 = aten.add(%in0, %in1) : f32[2,3,8]
  %rms_norm0 = aten.rms_norm(%add0, [8], $norm.weight, 1e-06) : f32[2,3,8]
  return [%rms_norm0, %add0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add_rms_norm0 = optc.add_rms_norm(%in0, %in1, $norm.weight, 1e-06) : (f32[2,3,8], f32[2,3,8])
  %getitem0 = getitem(%add_rms_norm0, 0) : f32[2,3,8]
  %getitem1 = getitem(%add_rms_norm0, 1) : f32[2,3,8]
  return [%getitem1, %getitem0]""")
    assert stats == {"add_rms_norm": 1}
    compiled_vs_eager(model, _xr(), assert_matches_eager)


def test_add_layer_norm_golden(assert_matches_eager):
    model = AddNorm(_layer_norm())
    before, after, stats = run_pass(model, _xr())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add0 = aten.add(%in0, %in1) : f32[2,3,8]
  %layer_norm0 = aten.layer_norm(%add0, [8], $norm.weight, $norm.bias) : f32[2,3,8]
  return [%layer_norm0, %add0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add_layer_norm0 = optc.add_layer_norm(%in0, %in1, $norm.weight, $norm.bias, 1e-05) : (f32[2,3,8], f32[2,3,8])
  %getitem0 = getitem(%add_layer_norm0, 0) : f32[2,3,8]
  %getitem1 = getitem(%add_layer_norm0, 1) : f32[2,3,8]
  return [%getitem1, %getitem0]""")
    assert stats == {"add_layer_norm": 1}
    compiled_vs_eager(model, _xr(), assert_matches_eager)


def test_add_layer_norm_without_affine(assert_matches_eager):
    model = AddNorm(_layer_norm(elementwise_affine=False))
    _, after, stats = run_pass(model, _xr())
    assert stats == {"add_layer_norm": 1}
    assert "optc.add_layer_norm(%in0, %in1, None, None, 1e-05)" in after
    compiled_vs_eager(model, _xr(), assert_matches_eager)


def test_rms_norm_without_add_golden(assert_matches_eager):
    model = _llama_norm()
    before, after, stats = run_pass(model, (torch.randn(2, 3, C),))
    assert_expected_inline(before, """\
graph(%in0: f32[2,3,8]):
  %pow0 = aten.pow.Tensor_Scalar(%in0, 2) : f32[2,3,8]
  %mean0 = aten.mean.dim(%pow0, [-1], True) : f32[2,3,1]
  %add0 = aten.add(%mean0, 1e-05) : f32[2,3,1]
  %rsqrt0 = aten.rsqrt(%add0) : f32[2,3,1]
  %mul0 = aten.mul(%in0, %rsqrt0) : f32[2,3,8]
  %mul1 = aten.mul($weight, %mul0) : f32[2,3,8]
  return [%mul1]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8]):
  %rms_norm0 = optc.rms_norm(%in0, $weight, 1e-05) : f32[2,3,8]
  return [%rms_norm0]""")
    assert stats == {"rms_norm": 1}
    compiled_vs_eager(model, (torch.randn(2, 3, C),), assert_matches_eager)


def test_bf16_add_rms_norm_is_bit_exact_with_hf():
    # optc.ops.norms: the CPU kernel is torch.rms_norm, which decomposes into HF's own
    # pow/mean/add/rsqrt/mul in fp32, then rounds to bf16 before the weight: HF's exact bits.
    model = AddNorm(_llama_norm()).to(torch.bfloat16)
    _, _, stats = run_pass(model, _xr(dtype=torch.bfloat16))
    assert stats == {"add_rms_norm": 1}
    compiled_vs_eager(model, _xr(dtype=torch.bfloat16), lambda o, r: torch.testing.assert_close(o, r, rtol=0, atol=0))


def test_bf16_add_of_aten_rms_norm_is_exact():
    model = AddNorm(AtenRMSNorm()).to(torch.bfloat16)
    compiled_vs_eager(model, _xr(dtype=torch.bfloat16),
                      lambda o, r: torch.testing.assert_close(o, r, rtol=0, atol=0))


# ---------------------------------------------------------------- must not fire


@pytest.mark.parametrize("case, model, shape_r, expected", [
    # a norm over another dim than the last
    ("mean_over_dim_1", AddNorm(HandRMSNorm(dim=1)), (2, 3, C), {}),
    # an exponent other than 2 is not an RMS
    ("pow_3", AddNorm(HandRMSNorm(exponent=3)), (2, 3, C), {}),
    # a weight that is not 1-D over the last dim
    ("weight_2d", AddNorm(HandRMSNorm(weight_shape=(3, C))), (2, 3, C), {}),
    # a broadcasting add is not the residual stream: the norm alone is still an RMSNorm ...
    ("broadcast_add_rms", AddNorm(HandRMSNorm()), (C,), {"rms_norm": 1}),
    # ... while a LayerNorm without a fusable add stays as it is
    ("broadcast_add_layer", AddNorm(_layer_norm()), (3, C), {}),
    # a LayerNorm over the last two dims
    ("layer_norm_2d", AddNorm(nn.LayerNorm((3, C))), (2, 3, C), {}),
])
def test_must_not_fire(case: str, model: nn.Module, shape_r: tuple[int, ...], expected: dict,
                       assert_matches_eager):
    # positive inputs: pow 3 of a negative h would make the mean negative and rsqrt NaN
    args = tuple(a.abs() for a in _xr(shape_r))
    before, after, stats = run_pass(model, args)
    assert stats == expected, case
    if not expected:
        assert after == before, case
    assert "optc.add_" not in after
    compiled_vs_eager(model, args, assert_matches_eager)


def test_add_with_alpha_is_not_fused():
    class AlphaAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = _layer_norm()

        def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return self.norm(torch.add(x, r, alpha=2.0))

    before, after, stats = run_pass(AlphaAdd(), _xr())
    assert stats == {} and after == before


@pytest.mark.parametrize("cfg, model, expected", [
    (FuseAddNormConfig(rms_norm=False), AddNorm(HandRMSNorm()), {}),
    (FuseAddNormConfig(layer_norm=False), AddNorm(_layer_norm()), {}),
    (FuseAddNormConfig(layer_norm=False), AddNorm(HandRMSNorm()), {"add_rms_norm": 1}),
])
def test_config_switches_rules(cfg: FuseAddNormConfig, model: nn.Module, expected: dict):
    _, _, stats = run_pass(model, _xr(), cfg)
    assert stats == expected


def test_residual_keeps_its_other_uses():
    """``h`` feeds the norm and the next residual add: both read the fused op's ``h``."""

    class TwoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = _llama_norm(), _llama_norm()

        def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            h = x + r
            h2 = h + self.n1(h) * 0.5
            return self.n2(h2)

    _, after, stats = run_pass(TwoBlocks(), _xr())
    assert stats == {"add_rms_norm": 2}
    assert_expected_inline(after, """\
graph(%in0: f32[2,3,8], %in1: f32[2,3,8]):
  %add_rms_norm0 = optc.add_rms_norm(%in0, %in1, $n1.weight, 1e-05) : (f32[2,3,8], f32[2,3,8])
  %getitem0 = getitem(%add_rms_norm0, 0) : f32[2,3,8]
  %getitem1 = getitem(%add_rms_norm0, 1) : f32[2,3,8]
  %mul0 = aten.mul(%getitem1, 0.5) : f32[2,3,8]
  %add_rms_norm1 = optc.add_rms_norm(%getitem0, %mul0, $n2.weight, 1e-05) : (f32[2,3,8], f32[2,3,8])
  %getitem2 = getitem(%add_rms_norm1, 1) : f32[2,3,8]
  return [%getitem2]""")


def test_weight_computed_after_the_add():
    class GemmaRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(C))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            var = h.pow(2).mean(-1, keepdim=True)
            return (h * torch.rsqrt(var + 1e-6)) * (1.0 + self.weight)

    gm = capture_symbolic_trace(AddNorm(GemmaRMSNorm()), _xr()).gm
    res = fuse_add_norm.run(gm, FuseAddNormConfig())
    verify(res.gm)


# ---------------------------------------------------------------- statistics on real models


def _stats(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
    gm = capture_export(model, args, kwargs).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    gm.graph.eliminate_dead_code()
    return dict(fuse_add_norm.run(gm, FuseAddNormConfig()).stats)


@pytest.mark.parametrize("name, expected", [
    # block 0's attention_norm reads the embedding (no add): rms_norm; ffn_norm of block 0,
    # both norms of block 1 and the final norm each follow a residual add: add_rms_norm x4
    ("llama-tiny", {"rms_norm": 1, "add_rms_norm": 4}),
    # block 0's ln_1 follows wte(ids) + wpe(pos), a broadcasting add ((B, T, C) + (T, C)):
    # not fused; ln_2 of block 0, ln_1/ln_2 of block 1 and ln_f follow residual adds: 4
    ("gpt2-tiny", {"add_layer_norm": 4}),
    # OPT: the same pre-norm layout and the same broadcasting position-embedding add
    ("opt-tiny", {"add_layer_norm": 4}),
    # BERT post-norm: emb_norm after the token-type add, and 2 norms after residual adds per
    # block: 1 + 2 x 2
    ("bert-tiny", {"add_layer_norm": 5}),
])
def test_stats_zoo(name: str, expected: dict):
    model = models.build(name)
    assert _stats(model, *models.example_inputs(model, seq=8)) == expected


def test_stats_hf_gpt2():
    # HF adds position embeddings of shape (B, T, C), so block 0's ln_1 fuses too: 5
    model = build_hf("gpt2")
    assert _stats(model, *hf_example_inputs(model, seq=8)) == {"add_layer_norm": 5}


def test_llama_tiny_compiled_numerics(assert_matches_eager):
    model = models.build("llama-tiny")
    args, kwargs = models.example_inputs(model, seq=8)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend="export"))
    with torch.no_grad():
        assert_matches_eager(compiled(*args, **kwargs), model(*args, **kwargs))
    records = compiled.report.graphs[0].pipeline.records
    assert records[1].stats == Counter({"rms_norm": 1, "add_rms_norm": 4})
    assert all(r.error is None for r in records)

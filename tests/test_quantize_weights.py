"""quantize_weights: golden graphs per mode, must-not-fire cases per guard, exact statistics,
SQNR floors per mode, fold exactness, plan sharing across graphs, calibration plumbing."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import assert_expected_inline

import models
import optc
from models.llama import RMSNorm
from optc.capture import capture_export, capture_symbolic_trace
from optc.config import ConfigError
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import fuse_add_norm, quantize_weights, remove_noops
from optc.passes.pipeline import pipeline_with
from optc.passes.quantize_weights import LayerRule, QuantizeWeightsConfig, analyze, role_of
from optc.quant import formats
from optc.quant.calibrate import collect
from optc.quant.serialize import QuantStore

PIPELINE = pipeline_with("quantize_weights")


class Block(nn.Module):
    """RMSNorm -> q, k (attention-like q @ kᵀ of activations: never a linear) -> SwiGLU MLP.
    One of each fold: q/k into the norm, w1/w3 by an explicit multiply (their input is a
    matmul of activations), w2 into the rows of w3."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 1e-5)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)                                                  # (B, T, C)
        a = (self.wq(h) @ self.wk(h).transpose(-1, -2)).softmax(-1)       # (B, T, T)
        y = a @ x                                                         # (B, T, C)
        return self.w2(F.silu(self.w1(y)) * self.w3(y))


def _outlier_batches(n: int = 4, dim: int = 64) -> list[torch.Tensor]:
    """Inputs with a few large channels, the activation structure AWQ exploits."""
    g = torch.Generator().manual_seed(1)
    boost = torch.ones(dim)
    boost[[3, 17, 40]] = 12.0
    return [torch.randn(2, 8, dim, generator=g) * boost for _ in range(n)]


def run_pass(model: nn.Module, args: tuple, cfg: QuantizeWeightsConfig, calibration: Any = None
             ) -> tuple[str, str, dict[str, int], Any]:
    """(graph before, graph after, statistics, gm) of remove_noops -> fuse_add_norm -> quantize."""
    gm = capture_symbolic_trace(model, args).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    fuse_add_norm.run(gm, fuse_add_norm.FuseAddNormConfig())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    before = format_graph(gm)
    gm.meta["optc_quant"] = QuantStore(collect(model, calibration) if calibration else None)
    res = quantize_weights.run(gm, cfg)
    res.gm.graph.eliminate_dead_code()
    res.gm.recompile()
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats), res.gm


def _config(qcfg: QuantizeWeightsConfig, **kw: Any) -> dict:
    return {"pipeline": list(PIPELINE), "passes": {"quantize_weights": qcfg.to_dict()}, "strict": True, **kw}


def _op_names(gm) -> list[str]:
    return [n.target._opname for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", "") == "optc"
            and n.meta.get("optc_pass") == "quantize_weights"]


# ---------------------------------------------------------------- golden graphs, one per mode


def test_int8_golden():
    model = Block()
    x = torch.randn(2, 8, 64)
    before, after, stats, gm = run_pass(model, (x,), QuantizeWeightsConfig.uniform("int8"))
    assert_expected_inline(before, """\
graph(%in0: f32[2,8,64]):
  %rms_norm0 = optc.rms_norm(%in0, $norm.weight, 1e-05) : f32[2,8,64]
  %linear0 = aten.linear(%rms_norm0, $wq.weight) : f32[2,8,64]
  %linear1 = aten.linear(%rms_norm0, $wk.weight) : f32[2,8,64]
  %transpose0 = aten.transpose(%linear1, -1, -2) : f32[2,64,8]
  %matmul0 = aten.matmul(%linear0, %transpose0) : f32[2,8,8]
  %softmax0 = aten.softmax(%matmul0, -1) : f32[2,8,8]
  %matmul1 = aten.matmul(%softmax0, %in0) : f32[2,8,64]
  %linear2 = aten.linear(%matmul1, $w1.weight) : f32[2,8,128]
  %silu0 = aten.silu(%linear2) : f32[2,8,128]
  %linear3 = aten.linear(%matmul1, $w3.weight) : f32[2,8,128]
  %mul0 = aten.mul(%silu0, %linear3) : f32[2,8,128]
  %linear4 = aten.linear(%mul0, $w2.weight) : f32[2,8,64]
  return [%linear4]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,8,64]):
  %rms_norm0 = optc.rms_norm(%in0, $norm.weight, 1e-05) : f32[2,8,64]
  %linear_int80 = optc.linear_int8(%rms_norm0, $wq.w_int8, $wq.scales, None) : f32[2,8,64]
  %linear_int81 = optc.linear_int8(%rms_norm0, $wk.w_int8, $wk.scales, None) : f32[2,8,64]
  %transpose0 = aten.transpose(%linear_int81, -1, -2) : f32[2,64,8]
  %matmul0 = aten.matmul(%linear_int80, %transpose0) : f32[2,8,8]
  %softmax0 = aten.softmax(%matmul0, -1) : f32[2,8,8]
  %matmul1 = aten.matmul(%softmax0, %in0) : f32[2,8,64]
  %linear_int82 = optc.linear_int8(%matmul1, $w1.w_int8, $w1.scales, None) : f32[2,8,128]
  %silu0 = aten.silu(%linear_int82) : f32[2,8,128]
  %linear_int83 = optc.linear_int8(%matmul1, $w3.w_int8, $w3.scales, None) : f32[2,8,128]
  %mul0 = aten.mul(%silu0, %linear_int83) : f32[2,8,128]
  %linear_int84 = optc.linear_int8(%mul0, $w2.w_int8, $w2.scales, None) : f32[2,8,64]
  return [%linear_int84]""")
    assert stats == {"quantized.int8": 5}


def test_int4_awq_golden():
    model = Block()
    before, after, stats, gm = run_pass(model, (torch.randn(2, 8, 64),),
                                        QuantizeWeightsConfig.uniform("int4", 32, awq=True),
                                        calibration=_outlier_batches())
    assert_expected_inline(after, """\
graph(%in0: f32[2,8,64]):
  %rms_norm0 = optc.rms_norm(%in0, $norm.weight@folded, 1e-05) : f32[2,8,64]
  %linear_int40 = optc.linear_int4(%rms_norm0, $wq.w_int4, $wq.scales_zeros, None, 32, 64) : f32[2,8,64]
  %linear_int41 = optc.linear_int4(%rms_norm0, $wk.w_int4, $wk.scales_zeros, None, 32, 64) : f32[2,8,64]
  %transpose0 = aten.transpose(%linear_int41, -1, -2) : f32[2,64,8]
  %matmul0 = aten.matmul(%linear_int40, %transpose0) : f32[2,8,8]
  %softmax0 = aten.softmax(%matmul0, -1) : f32[2,8,8]
  %matmul1 = aten.matmul(%softmax0, %in0) : f32[2,8,64]
  %mul0 = aten.mul(%matmul1, $w1.awq_inv_scale) : f32[2,8,64]
  %linear_int42 = optc.linear_int4(%mul0, $w1.w_int4, $w1.scales_zeros, None, 32, 128) : f32[2,8,128]
  %silu0 = aten.silu(%linear_int42) : f32[2,8,128]
  %linear_int43 = optc.linear_int4(%mul0, $w3.w_int4, $w3.scales_zeros, None, 32, 128) : f32[2,8,128]
  %mul1 = aten.mul(%silu0, %linear_int43) : f32[2,8,128]
  %linear_int44 = optc.linear_int4(%mul1, $w2.w_int4, $w2.scales_zeros, None, 32, 64) : f32[2,8,64]
  return [%linear_int44]""")
    assert stats == {"quantized.int4": 5, "awq.norm": 2, "awq.mul": 2, "awq.rows": 1}


def test_bfp_golden():
    model = Block()
    before, after, stats, gm = run_pass(model, (torch.randn(2, 8, 64),),
                                        QuantizeWeightsConfig.uniform("bfp", 16))
    assert_expected_inline(after, """\
graph(%in0: f32[2,8,64]):
  %rms_norm0 = optc.rms_norm(%in0, $norm.weight, 1e-05) : f32[2,8,64]
  %linear_bfp0 = optc.linear_bfp(%rms_norm0, $wq.mantissa, $wq.exponent, $wq.perm, None, 16, 0, 64) : f32[2,8,64]
  %linear_bfp1 = optc.linear_bfp(%rms_norm0, $wk.mantissa, $wk.exponent, $wk.perm, None, 16, 0, 64) : f32[2,8,64]
  %transpose0 = aten.transpose(%linear_bfp1, -1, -2) : f32[2,64,8]
  %matmul0 = aten.matmul(%linear_bfp0, %transpose0) : f32[2,8,8]
  %softmax0 = aten.softmax(%matmul0, -1) : f32[2,8,8]
  %matmul1 = aten.matmul(%softmax0, %in0) : f32[2,8,64]
  %linear_bfp2 = optc.linear_bfp(%matmul1, $w1.mantissa, $w1.exponent, $w1.perm, None, 16, 0, 128) : f32[2,8,128]
  %silu0 = aten.silu(%linear_bfp2) : f32[2,8,128]
  %linear_bfp3 = optc.linear_bfp(%matmul1, $w3.mantissa, $w3.exponent, $w3.perm, None, 16, 0, 128) : f32[2,8,128]
  %mul0 = aten.mul(%silu0, %linear_bfp3) : f32[2,8,128]
  %linear_bfp4 = optc.linear_bfp(%mul0, $w2.mantissa, $w2.exponent, $w2.perm, None, 16, 0, 64) : f32[2,8,64]
  return [%linear_bfp4]""")
    # w2's input is silu(w1 y) * w3 y: its permutation goes into the rows of w1 and w3 (and the
    # op gets the identity); q, k read the norm's output, w1, w3 a matmul's: their ops gather
    assert stats == {"quantized.bfp": 5, "bfp_perm.rows": 1, "bfp_perm.gather": 4}


def test_w8a8_and_mixed_rules_per_layer():
    model = Block()
    cfg = QuantizeWeightsConfig(rules=(
        LayerRule("int8"),
        LayerRule("w8a8", roles=("q", "k")),
        LayerRule("none", modules=("w2",)),
    ))
    _, _, stats, gm = run_pass(model, (torch.randn(2, 8, 64),), cfg)
    assert stats == {"quantized.int8": 2, "quantized.w8a8": 2, "skip.unselected": 1}


# ---------------------------------------------------------------- must not fire


class ActivationWeight(nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)          # a "linear" whose weight is an activation


class Odd(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(k, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("case,model,args,cfg,expected", [
    ("activation as weight", ActivationWeight(), (torch.randn(2, 8), torch.randn(4, 8)),
     QuantizeWeightsConfig.uniform("int8"), {"skip.weight_not_constant": 1}),
    ("K=40 not a multiple of any int4 group", Odd(40), (torch.randn(2, 40),),
     QuantizeWeightsConfig.uniform("int4", 32), {"fallback.unsupported_shape": 1}),
    ("K=96 without group fallback", Odd(96), (torch.randn(2, 96),),
     QuantizeWeightsConfig.uniform("int4", 128, group_fallback=False), {"fallback.unsupported_shape": 1}),
    ("K=40 not a multiple of a BFP block", Odd(40), (torch.randn(2, 40),),
     QuantizeWeightsConfig.uniform("bfp", 32), {"fallback.unsupported_shape": 1}),
    ("rule selects nothing", Odd(64), (torch.randn(2, 64),),
     QuantizeWeightsConfig(rules=(LayerRule("int8", modules=("other.*",)),)), {"skip.unselected": 1}),
])
def test_must_not_fire(case, model, args, cfg, expected):
    before, after, stats, _ = run_pass(model, args, cfg)
    assert stats == expected, case
    assert after == before, case


def test_group_fallback_picks_largest_dividing_group():
    before, after, stats, gm = run_pass(Odd(96), (torch.randn(2, 96),), QuantizeWeightsConfig.uniform("int4", 128))
    assert stats == {"group_fallback": 1, "quantized.int4": 1}
    assert "optc.linear_int4(%in0, $fc.w_int4, $fc.scales_zeros, $fc.bias, 32, 16)" in after   # g128 -> g32


def test_attention_matmul_and_lm_head_untouched():
    """Zoo Llama: q @ kᵀ is SDPA (never a linear); the lm_head stays float unless a rule names it."""
    model = models.build("llama-tiny")
    args, kw = models.example_inputs(model, seq=8)
    c = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int8")), example_inputs=(args, kw))
    gm = c.report.graphs[0].pipeline.gm
    stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
    assert stats == {"quantized.int8": 14, "skip.unselected": 1}
    attention = {torch.ops.aten.scaled_dot_product_attention.default, torch.ops.optc.attention.default}
    assert sum(n.target in attention for n in gm.graph.nodes) == 2
    lin = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.args[1].meta["optc_param"] for n in lin] == ["output.weight"]


# ---------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = QuantizeWeightsConfig(rules=(LayerRule("int4", 64, awq=True), LayerRule("bfp", 16, layers=(1,)),
                                       LayerRule("int8", roles=("lm_head",))), awq_grid=10)
    import json
    d = json.loads(json.dumps(cfg.to_dict()))
    assert QuantizeWeightsConfig.from_dict(d) == cfg
    assert cfg.needs_calibration() and not QuantizeWeightsConfig.uniform("int8").needs_calibration()
    for bad, msg in [({"mode": "int3"}, "mode"), ({"mode": "bfp", "group_size": 16, "awq": True}, "awq"),
                     ({"mode": "int8", "roles": ["attn"]}, "role"), ({"mode": "int4"}, "group_size"),
                     ({"mode": "int8", "colour": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=msg):
            QuantizeWeightsConfig.from_dict({"rules": [bad]})
    with pytest.raises(ConfigError, match="bfp_order"):
        QuantizeWeightsConfig(bfp_order="random")


def test_roles():
    cases = {("layers.0.attention.wq", 0): "q", ("model.layers.1.self_attn.o_proj", 1): "o",
             ("transformer.h.0.attn.c_attn", 0): "qkv", ("transformer.h.0.attn.c_proj", 0): "o",
             ("transformer.h.0.mlp.c_proj", 0): "down", ("layers.0.feed_forward.w1", 0): "gate",
             ("encoder.layer.0.attention.output.dense", 0): "o", ("encoder.layer.0.output.dense", 0): "down",
             ("output", None): "lm_head", ("lm_head", None): "lm_head", ("pooler.dense", None): "other"}
    assert {k: role_of(*k) for k in cases} == cases


def test_rules_select_by_layer_and_role():
    model = models.build("llama-tiny")
    args, kw = models.example_inputs(model, seq=8)
    cfg = QuantizeWeightsConfig(rules=(LayerRule("int8", layers=(1,)), LayerRule("int4", 32, roles=("q", "k")),
                                       LayerRule("int8", roles=("lm_head",))))
    c = optc.compile(model, config=_config(cfg), example_inputs=(args, kw))
    stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
    # layer 0: q, k int4 (5 others float); layer 1: q, k int4, 5 int8; lm_head int8
    assert stats == {"quantized.int4": 4, "quantized.int8": 6, "skip.unselected": 5}


# ---------------------------------------------------------------- numerics


def _sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    return formats.sqnr_db(ref, out)


# Floors for the logits of the zoo llama-tiny at dim 128, hidden 256 (random Normal(0, 0.02) weights, 2 layers, every
# linear but the lm_head quantized), against eager fp32. The weight-rounding SQNR of a Gaussian
# weight row is ~43 dB for int8 per channel (step max|w|/127 with max ≈ 3σ: 10·log10(127²·12/9)),
# ~20 dB for int4 g128 asymmetric (range ≈ 5σ over 15 steps) and ~22 dB at g32 (range ≈ 4σ), and
# ~37–39 dB for BFP with 8-bit mantissas over 16 channels; W8A8 adds per-token activation rounding
# (~40 dB). Errors of independent layers add, and logits pass through 14 quantized linears: the
# floors sit ~6 dB (int8, w8a8, bfp) and ~4 dB (int4) under what the weight-rounding estimates
# allow, and far above what a wrong scale, zero point or permutation gives (< 5 dB).
SQNR_FLOORS = {
    ("int8", None): 30.0, ("w8a8", None): 28.0, ("int4", 128): 12.0, ("int4", 32): 14.0, ("bfp", 16): 26.0,
}


@pytest.mark.parametrize("mode,group", list(SQNR_FLOORS))
def test_compiled_llama_sqnr_floor(mode, group):
    model = models.build("llama-tiny", dim=128, hidden_dim=256)     # every K a multiple of 128
    args, kw = models.example_inputs(model, batch=2, seq=16)
    c = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform(mode, group)), example_inputs=(args, kw))
    with torch.no_grad():
        out, ref = c(*args), model(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
    assert stats[f"quantized.{mode}"] == 14
    assert c.report.summary()["fallback_ops"] == 0
    assert _sqnr(out, ref) >= SQNR_FLOORS[(mode, group)]


def test_hf_gpt2_conv1d_transposed_weights():
    """HF GPT-2's Conv1D arrives as addmm -> linear(x, t(W), b): quantized from Wᵀ, biases kept."""
    from models.hf import build_hf, hf_example_inputs
    model = build_hf("gpt2")
    args, kw = hf_example_inputs(model, seq=8)
    c = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int8")), example_inputs=(args, kw))
    stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
    assert stats == {"quantized.int8": 8, "skip.unselected": 1}
    with torch.no_grad():
        out, ref = c(*args, **kw).logits, model(*args, **kw).logits
    assert _sqnr(out, ref) >= SQNR_FLOORS[("int8", None)]


def test_bf16_model_keeps_dtype():
    model = models.build("llama-tiny", dtype=torch.bfloat16)
    args, kw = models.example_inputs(model, seq=8)
    c = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int4", 32, lm_head=True)),
                     example_inputs=(args, kw))
    with torch.no_grad():
        out, ref = c(*args), model(*args)
    assert out.dtype == torch.bfloat16
    assert _sqnr(out.float(), ref.float()) >= SQNR_FLOORS[("int4", 32)] - 3   # bf16 activations: ~3 dB of rounding


# ---------------------------------------------------------------- fold exactness


@pytest.fixture
def exact_format(monkeypatch):
    """A lossless stand-in "format": quantize keeps W * in_scale in fp32 (a gathered
    permutation is the identity on a float weight), the op is aten.linear. AWQ's search still
    rounds with the real format, so the scales are the ones real quantization gets."""
    from optc.quant import awq
    real_quantize = formats.quantize

    def real_fake_quantize(weight, scheme):
        layout = "blocks" if scheme.mode == "bfp" else None
        return formats.dequantize(real_quantize(weight, scheme, layout=layout)).to(weight.dtype)

    def quantize(weight, scheme, *, in_scale=None, perm=None):
        w = weight.float() * (in_scale if in_scale is not None else 1.0)
        return formats.QuantizedWeight(scheme, tuple(weight.shape), {"weight": w.to(weight.dtype).contiguous()})

    def linear_call(q, bias):
        return torch.ops.aten.linear.default, ("weight",), ()
    monkeypatch.setattr(awq, "fake_quantize", real_fake_quantize)
    monkeypatch.setattr(formats, "quantize", quantize)
    monkeypatch.setattr(formats, "linear_call", linear_call)


@pytest.mark.parametrize("name,mode,group", [
    ("llama-tiny", "int4", 32), ("gpt2-tiny", "int4", 32), ("llama-tiny", "bfp", 16), ("gpt2-tiny", "bfp", 16),
])
def test_folds_are_exact(exact_format, assert_matches_eager, name, mode, group):
    """With lossless weights, AWQ's scale folds (norm weights/biases, rows of w3, explicit
    multiplies) and BFP's permutation folds (rows of w1/w3, of c_fc through GELU) give eager's
    outputs up to fp rounding."""
    model = models.build(name, **({"hidden_dim": 128} if name == "llama-tiny" else {}))
    args, kw = models.example_inputs(model, batch=2, seq=16)
    calib = [models.example_inputs(model, batch=2, seq=32, seed=s)[0] for s in range(3)]
    # clipping changes the weights by design: off, so that only the folds are under test
    qcfg = QuantizeWeightsConfig.uniform(mode, group, awq=mode == "int4", lm_head=True, awq_clip=False,
                                         awq_grid=5)
    c = optc.compile(model, config=_config(qcfg), calibration=calib, example_inputs=(args, kw))
    stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
    with torch.no_grad():
        assert_matches_eager(c(*args, **kw), model(*args, **kw))
    plan = next(iter(c.quant.plans.values()))
    if mode == "int4":
        assert stats.get("awq.norm", 0) > 0 and stats.get("awq.mul", 0) > 0
        assert stats.get("awq.rows", 0) == (2 if name == "llama-tiny" else 0)
        assert any(v["alpha"] > 0 for v in plan.awq.values()), "AWQ chose alpha=0 everywhere: nothing folded"
        assert any(p.endswith("norm.weight") or "ln" in p for p in plan.replaced)
    else:
        assert stats.get("bfp_perm.rows", 0) == 2 and stats.get("bfp_perm.gather", 0) > 0


# ---------------------------------------------------------------- plumbing


def test_awq_refused_without_calibration():
    model = models.build("llama-tiny")
    with pytest.raises(ConfigError, match="calibration"):
        optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int4", 32, awq=True)))
    # the pass itself, reached without optc.compile's check (torch.compile backend, strict)
    gm = capture_symbolic_trace(Block(), (torch.randn(2, 8, 64),)).gm
    with pytest.raises(ConfigError, match="calibration"):
        quantize_weights.run(gm, QuantizeWeightsConfig.uniform("int4", 32, awq=True))


def test_rtn_needs_no_calibration_and_ignores_it():
    model = models.build("llama-tiny")
    args, kw = models.example_inputs(model, seq=8)
    c1 = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int8")), example_inputs=(args, kw))
    c2 = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int8")), example_inputs=(args, kw),
                      calibration=[args[0]])
    with torch.no_grad():
        assert torch.equal(c1(*args), c2(*args))


def test_calibration_statistics_are_exact():
    model = Block()
    batches = _outlier_batches(3)
    calib = collect(model, batches, max_rows=20)
    h = torch.cat([model.norm(b).reshape(-1, 64) for b in batches])     # input rows of wq / wk
    st = calib.stats["wq"]
    assert st.n_rows == 48 and st.rows.shape == (20, 64) and calib.batches == 3
    torch.testing.assert_close(st.abs_mean, h.abs().mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st.abs_max, h.abs().amax(0), rtol=0, atol=0)
    assert all((h == r).all(1).any() for r in st.rows)                  # sampled rows are real rows
    assert torch.equal(calib.stats["wk"].rows, st.rows)                 # same input, same sample
    assert set(calib.stats) == {"wq", "wk", "w1", "w3", "w2"}
    # a dict batch with an attention mask: padding rows are left out
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 8)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.fc(x)
    x, mask = batches[0], torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    st = collect(Masked(), [{"x": x, "attention_mask": mask}]).stats["fc"]
    assert st.n_rows == 13
    torch.testing.assert_close(st.abs_mean, x[mask.bool()].abs().mean(0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="iterable"):
        collect(model, torch.randn(2, 8, 64))
    with pytest.raises(ConfigError, match="empty"):
        collect(model, [])


@pytest.mark.parametrize("frontend", ["dynamo", "export", "symbolic_trace"])
def test_calibration_keys_match_sites_on_every_frontend(frontend):
    """Statistics are keyed by module name (hooks on the eager model); every quantizable linear
    of every frontend's graph finds its statistics through its nn_module_stack, and its weight's
    optc_param is the model's parameter name."""
    model = Block() if frontend == "symbolic_trace" else models.build("llama-tiny")
    args = (torch.randn(2, 8, 64),) if frontend == "symbolic_trace" else models.example_inputs(model, seq=8)[0]
    calib = collect(model, [args])
    if frontend == "export":
        gm = capture_export(model, args).gm
    elif frontend == "symbolic_trace":
        gm = capture_symbolic_trace(model, args).gm
    else:   # the canonical Dynamo graph, before any quantization
        c = optc.compile(model, config={"pipeline": ["remove_noops"]}, example_inputs=args)
        gm = c.report.graphs[0].pipeline.gm
    layout = analyze(gm, QuantizeWeightsConfig.uniform("int8", lm_head=True), Counter())
    expected = {k for k, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {s.module for s in layout.sites} == expected
    assert expected <= set(calib.stats)
    assert {s.weight_param for s in layout.sites} == {k + ".weight" for k in expected}


def test_dynamo_graphs_share_one_plan(monkeypatch):
    """Two input shapes -> two captures; the plan (AWQ's search, the rounding) is computed once,
    and both programs hold the same quantized tensors (no second copy of the weights)."""
    model = models.build("llama-tiny")
    calls = []
    real = quantize_weights.compute_plan
    monkeypatch.setattr(quantize_weights, "compute_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    c = optc.compile(model, config=_config(QuantizeWeightsConfig.uniform("int8")))
    with torch.no_grad():
        for seq in (8, 12):
            args, _ = models.example_inputs(model, seq=seq)
            c(*args)
    assert len(c.report.graphs) == 2 and len(c.quant.plans) == 1 and len(calls) == 1
    bufs = [{id(t) for k, t in g.pipeline.gm.named_buffers() if k.startswith("quant_")}
            for g in c.report.graphs if g.pipeline]
    assert all(b == bufs[0] for b in bufs)


def test_bisection_applies_whole_fold_groups(monkeypatch, exact_format, assert_matches_eager):
    """OPTC_BISECT_LIMIT counts fold groups (a scale folded into another group's rows ties the
    two together): every prefix of them is still exact."""
    model = models.build("llama-tiny", n_layers=1, hidden_dim=128)   # w2's K a multiple of 32
    args, kw = models.example_inputs(model, seq=8)
    calib = [models.example_inputs(model, seq=16, seed=s)[0] for s in range(2)]
    qcfg = QuantizeWeightsConfig.uniform("int4", 32, awq=True, lm_head=True, awq_clip=False, awq_grid=5)
    cfg = {"pipeline": ["quantize_weights"], "passes": {"quantize_weights": qcfg.to_dict()}, "strict": True}
    skipped = []
    for limit in (1, 3):
        monkeypatch.setenv("OPTC_BISECT_LIMIT", str(limit))
        torch._dynamo.reset()
        c = optc.compile(model, config=cfg, calibration=calib, example_inputs=(args, kw))
        with torch.no_grad():
            assert_matches_eager(c(*args), model(*args))
        skipped.append(c.report.graphs[0].pipeline.stats()["quantize_weights"].get("skip.bisect", 0))
    # groups: {q,k,v}, {o}, {w1,w3 + w2 folded into w3's rows}, {lm_head}
    assert skipped == [5, 1]

"""fuse_attention: golden Before/After graphs per rule, a must-not-fire case per guard, numerics
against eager, exact statistics on the zoo and HF models (both attention implementations),
bisection, and what ``optc inspect`` shows per attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import assert_expected_inline

import models
import optc
from models.hf import HF_ARCHS, build_hf, hf_example_inputs
from optc.capture import capture_export
from optc.codegen.inventory import kernels_for_graph
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import fuse_attention, remove_noops
from optc.passes.fuse_attention import FuseAttentionConfig, unfused_attention_patterns

B, H, HKV, T, D = 2, 4, 2, 6, 8


def qkv(hkv: int = H, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return (torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, hkv, T, D, dtype=dtype),
            torch.randn(B, hkv, T, D, dtype=dtype))


def run_pass(model: nn.Module, args: tuple, cfg: FuseAttentionConfig = FuseAttentionConfig()
             ) -> tuple[str, str, dict[str, int]]:
    """(graph after remove_noops, graph after fuse_attention, statistics): the pipeline order."""
    gm = capture_export(model, args).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    gm.graph.eliminate_dead_code()
    before = format_graph(gm)
    res = fuse_attention.run(gm, cfg)
    res.gm.graph.eliminate_dead_code()
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats)


def compiled_vs_eager(model: nn.Module, args: tuple, check) -> optc.CompiledModel:
    compiled = optc.compile(model)
    with torch.no_grad():
        check(compiled(*args), model(*args))
    (rec,) = [r for r in compiled.report.graphs[0].pipeline.records if r.name == "fuse_attention"]
    assert rec.error is None
    return compiled


# ---------------------------------------------------------------- the spellings


class NanoGPT(nn.Module):
    """nanoGPT's slow path: q @ k^T * scale, masked_fill with an in-graph tril, softmax method."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, H, T, T)
        att = att.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
        return att.softmax(dim=-1) @ v


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv, verbatim."""
    b, h_kv, n, d = x.shape
    x = x[:, :, None, :, :].expand(b, h_kv, n_rep, n, d)
    return x.reshape(b, h_kv * n_rep, n, d)


class HFEager(nn.Module):
    """transformers' eager_attention_forward (Llama): repeat_kv, matmul * scaling + causal
    mask, fp32 softmax cast back, dropout(p=0) in eval, matmul."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
        w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        return torch.matmul(w, v)


def hf_mask(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[:, 0] = True
    return torch.zeros(1, 1, T, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class PaddedDiv(nn.Module):
    """Scale by division on q before the matmul, k given pre-transposed (B, H, D, T), a bool
    padding mask applied with masked_fill, F.softmax function form."""

    def forward(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, pad: torch.Tensor
                ) -> torch.Tensor:
        s = torch.matmul(q / math.sqrt(D), kt)
        s = s.masked_fill(pad, float("-inf"))
        return torch.matmul(F.softmax(s, dim=-1), v)


class Sdpa(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.kw = kw

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


class GptFast(nn.Module):
    """gpt-fast / the zoo Llama: repeat_interleave for GQA, then causal SDPA."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------- golden graphs, one per rule


def test_nanogpt_causal_tril_golden(assert_matches_eager):
    model, args = NanoGPT(), qkv()
    before, after, stats = run_pass(model, args)
    assert_expected_inline(before, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,4,6,8], %in2: f32[2,4,6,8]):
  %transpose0 = aten.transpose(%in1, -2, -1) : f32[2,4,8,6]
  %matmul0 = aten.matmul(%in0, %transpose0) : f32[2,4,6,6]
  %mul0 = aten.mul(%matmul0, 0.353553) : f32[2,4,6,6]
  %ones0 = aten.ones([6, 6]) : f32[6,6]
  %tril0 = aten.tril(%ones0) : f32[6,6]
  %eq0 = aten.eq.Scalar(%tril0, 0) : b8[6,6]
  %masked_fill0 = aten.masked_fill.Scalar(%mul0, %eq0, -inf) : f32[2,4,6,6]
  %softmax0 = aten.softmax(%masked_fill0, -1) : f32[2,4,6,6]
  %matmul1 = aten.matmul(%softmax0, %in2) : f32[2,4,6,8]
  return (%matmul1,)""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,4,6,8], %in2: f32[2,4,6,8]):
  %attention0 = optc.attention(%in0, %in1, %in2, None, True, 0.353553, 1) : f32[2,4,6,8]
  return (%attention0,)""")
    assert stats == {"eager": 1, "causal_tril": 1, "scale_mul": 1}
    compiled = compiled_vs_eager(model, args, assert_matches_eager)
    assert compiled.report.summary()["pass_stats"][0]["fuse_attention"] == stats


def test_hf_eager_repeat_kv_golden(assert_matches_eager):
    model, args = HFEager(), (*qkv(HKV), hf_mask())
    before, after, stats = run_pass(model, args)
    assert_expected_inline(before, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,2,6,8], %in2: f32[2,2,6,8], %in3: f32[1,1,6,6]):
  %unsqueeze0 = aten.unsqueeze(%in1, 2) : f32[2,2,1,6,8]
  %expand0 = aten.expand(%unsqueeze0, [2, 2, 2, 6, 8]) : f32[2,2,2,6,8]
  %reshape0 = aten.reshape(%expand0, [2, 4, 6, 8]) : f32[2,4,6,8]
  %unsqueeze1 = aten.unsqueeze(%in2, 2) : f32[2,2,1,6,8]
  %expand1 = aten.expand(%unsqueeze1, [2, 2, 2, 6, 8]) : f32[2,2,2,6,8]
  %reshape1 = aten.reshape(%expand1, [2, 4, 6, 8]) : f32[2,4,6,8]
  %transpose0 = aten.transpose(%reshape0, 2, 3) : f32[2,4,8,6]
  %matmul0 = aten.matmul(%in0, %transpose0) : f32[2,4,6,6]
  %mul0 = aten.mul(%matmul0, 0.353553) : f32[2,4,6,6]
  %add0 = aten.add(%mul0, %in3) : f32[2,4,6,6]
  %softmax0 = aten.softmax(%add0, -1, f32) : f32[2,4,6,6]
  %matmul1 = aten.matmul(%softmax0, %reshape1) : f32[2,4,6,8]
  return (%matmul1,)""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,2,6,8], %in2: f32[2,2,6,8], %in3: f32[1,1,6,6]):
  %attention0 = optc.attention(%in0, %in1, %in2, %in3, False, 0.353553, 2) : f32[2,4,6,8]
  return (%attention0,)""")
    assert stats == {"eager": 1, "mask_add": 1, "scale_mul": 1, "repeat_kv": 1}
    compiled_vs_eager(model, args, assert_matches_eager)


def test_bool_padding_mask_scale_on_q_pretransposed_k_golden(assert_matches_eager):
    q, k, v = qkv()
    pad = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    pad[-1, ..., -2:] = True                       # the last row's last two keys are padding
    model, args = PaddedDiv(), (q, k.transpose(-2, -1), v, pad)
    _, after, stats = run_pass(model, args)
    assert_expected_inline(after, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,4,8,6], %in2: f32[2,4,6,8], %in3: b8[2,1,1,6]):
  %transpose0 = aten.transpose(%in1, -2, -1) : f32[2,4,6,8]
  %logical_not0 = aten.logical_not(%in3) : b8[2,1,1,6]
  %attention0 = optc.attention(%in0, %transpose0, %in2, %logical_not0, False, 0.353553, 1) : f32[2,4,6,8]
  return (%attention0,)""")
    assert stats == {"eager": 1, "mask_fill": 1, "scale_div": 1, "k_view": 1}
    compiled_vs_eager(model, args, assert_matches_eager)


@pytest.mark.parametrize("kw, mask, expected", [
    # bool mask, explicit scale, GQA through enable_gqa (HF sdpa attention with a mask)
    (dict(scale=0.2, enable_gqa=True), "bool", {"sdpa": 1}),
    # an additive float mask, the default scale 1/sqrt(D)
    ({}, "add", {"sdpa": 1}),
    (dict(is_causal=True), None, {"sdpa": 1}),
])
def test_sdpa_forms(kw: dict, mask: str | None, expected: dict, assert_matches_eager):
    q, k, v = qkv(HKV if kw.get("enable_gqa") else H)
    m = {"bool": torch.rand(B, 1, T, T) > 0.3, "add": torch.randn(B, H, T, T), None: None}[mask]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True
    model, args = Sdpa(**kw), (q, k, v, m)
    _, after, stats = run_pass(model, args)
    assert stats == expected
    assert "optc.attention(" in after and "scaled_dot_product_attention" not in after
    compiled_vs_eager(model, args, assert_matches_eager)


def test_repeat_interleave_gqa_golden(assert_matches_eager):
    model, args = GptFast(), qkv(HKV)
    _, after, stats = run_pass(model, args)
    assert_expected_inline(after, """\
graph(%in0: f32[2,4,6,8], %in1: f32[2,2,6,8], %in2: f32[2,2,6,8]):
  %attention0 = optc.attention(%in0, %in1, %in2, None, True, 0.353553, 2) : f32[2,4,6,8]
  return (%attention0,)""")
    assert stats == {"sdpa": 1, "repeat_interleave": 1}
    compiled_vs_eager(model, args, assert_matches_eager)


def test_bf16_upcast_softmax_and_cast_back():
    class Upcast(nn.Module):
        def forward(self, q, k, v):
            s = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)
            return s.softmax(-1).to(v.dtype) @ v

    args = qkv(dtype=torch.bfloat16)
    _, after, stats = run_pass(HFEager(), (*qkv(HKV, torch.bfloat16), hf_mask(torch.bfloat16)))
    assert stats == {"eager": 1, "softmax_cast": 1, "softmax_dtype": 1, "mask_add": 1,
                     "scale_mul": 1, "repeat_kv": 1}
    _, after, stats = run_pass(Upcast(), args)
    assert stats == {"eager": 1, "softmax_cast": 1, "scale_div": 1, "upcast": 1}
    # bf16: the fused op keeps scores and probabilities in fp32, eager rounds p to bf16 before
    # p @ v: both are within a few bf16 ulps (2^-7 relative) of the fp64 truth
    compiled = optc.compile(Upcast())
    with torch.no_grad():
        out, ref = compiled(*args), Upcast()(*args)
    q, k, v = (a.double() for a in args)
    truth = ((q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(-1) @ v
    assert (out.double() - truth).abs().max() <= (ref.double() - truth).abs().max() + 2**-7


def test_output_layout_a_view_needs_gets_a_contiguous_copy(assert_matches_eager):
    """q laid out (B, T, H, D) gives the op's output that layout; a user viewing the output as
    the contiguous (B, H, T, D) matmul result it replaced reads a contiguous copy instead."""

    class ViewsOutput(nn.Module):
        def forward(self, x, k, v):
            q = x.view(B, T, H, D).transpose(1, 2)            # (B, H, T, D), not contiguous
            y = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
            return y.view(B, H * T, D)                         # needs the contiguous layout

    k, v = qkv()[1:]
    model, args = ViewsOutput(), (torch.randn(B, T, H * D), k, v)
    _, after, stats = run_pass(model, args)
    assert stats == {"eager": 1}
    assert "aten.contiguous(%attention0)" in after
    compiled_vs_eager(model, args, assert_matches_eager)


# ---------------------------------------------------------------- must not fire


class Variant(nn.Module):
    """Eager attention with one knob turned past what a guard accepts."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        if self.case == "scale_after_mask":
            s = (s + mask) * 0.5
        elif self.case == "mask_fill_value":
            s = s.masked_fill(mask < -1, -1e4)              # not far enough below real scores
        elif self.case == "mask_shape":
            s = s + mask.expand(3, B, H, T, T)[:, :1].reshape(3, H, T, T)  # broadcasts batch up
        else:
            s = s * 0.5 + mask
        p = s.softmax(-2 if self.case == "softmax_dim" else -1)
        if self.case == "dropout_train":
            p = F.dropout(p, 0.1, training=True)
        out = p @ v
        return (out, p) if self.case == "shared_intermediate" else out


@pytest.mark.parametrize("case", ["softmax_dim", "shared_intermediate", "mask_shape",
                                  "dropout_train", "scale_after_mask", "mask_fill_value"])
def test_eager_must_not_fire(case: str, assert_matches_eager):
    model = Variant(case)
    q, k, v = (a[:1] for a in qkv()) if case == "mask_shape" else qkv()
    args = (q, k, v, torch.randn(B, 1, T, T))
    before, after, stats = run_pass(model, args)
    assert stats == {f"skipped.{case}": 1, "unfused_left": 1}, stats
    assert after == before
    if case != "dropout_train":
        compiled_vs_eager(model, args,
                          lambda o, r: [assert_matches_eager(a, b) for a, b in zip(o, r)]
                          if isinstance(o, tuple) else assert_matches_eager(o, r))


def test_sdpa_with_dropout_must_not_fire():
    _, _, stats = run_pass(Sdpa(dropout_p=0.1), qkv())
    assert stats == {"skipped.dropout_train": 1, "unfused_left": 1}


def test_a_plain_matmul_chain_is_not_attention():
    class MatMuls(nn.Module):
        def forward(self, a, b, c):
            return torch.relu(a @ b.transpose(-2, -1)) @ c

    before, after, stats = run_pass(MatMuls(), qkv())
    assert stats == {} and after == before


@pytest.mark.parametrize("cfg, model, args, expected", [
    (FuseAttentionConfig(sdpa=False), GptFast(), qkv(HKV), {"unfused_left": 1}),
    (FuseAttentionConfig(eager=False), NanoGPT(), qkv(), {"unfused_left": 1}),
    (FuseAttentionConfig(unrepeat_kv=False), GptFast(), qkv(HKV), {"sdpa": 1}),
])
def test_config_switches_rules(cfg, model, args, expected):
    assert run_pass(model, args, cfg)[2] == expected


def test_bisection_limit_fuses_one_attention(monkeypatch):
    monkeypatch.setenv("OPTC_BISECT_LIMIT", "1")
    model = models.build("llama-tiny")
    compiled = optc.compile(model, config=optc.CompileConfig(pipeline=("fuse_attention",)))
    args, kwargs = models.example_inputs(model, seq=8)
    with torch.no_grad():
        compiled(*args, **kwargs)
    stats = dict(compiled.report.graphs[0].pipeline.records[0].stats)
    assert stats == {"sdpa": 1, "repeat_interleave": 1, "unfused_left": 1}


# ---------------------------------------------------------------- statistics on real models


def _stats(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, int], torch.fx.GraphModule]:
    gm = capture_export(model, args, kwargs).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    gm.graph.eliminate_dead_code()
    res = fuse_attention.run(gm, FuseAttentionConfig())
    res.gm.graph.eliminate_dead_code()
    return dict(res.stats), res.gm


@pytest.mark.parametrize("name, expected", [
    # gpt-fast style GQA: repeat_interleave of K/V, then causal SDPA, in each of 2 layers
    ("llama-tiny", {"sdpa": 2, "repeat_interleave": 2}),
    ("gpt2-tiny", {"sdpa": 2}),
    ("opt-tiny", {"sdpa": 2}),
    ("bert-tiny", {"sdpa": 2}),        # additive padding mask
])
def test_stats_zoo(name: str, expected: dict):
    model = models.build(name)
    stats, gm = _stats(model, *models.example_inputs(model, seq=8))
    assert stats == expected
    assert unfused_attention_patterns(gm) == 0


# Per HF architecture (2 layers each), both attention implementations. Eager: GPT-2 and BERT
# scale the scores, OPT scales q before its head reshape (kept as q: scale 1), Llama repeats
# K/V (repeat_kv) for GQA; all add HF's additive where(mask, 0, finfo.min) mask.
HF_EXPECTED = {
    ("gpt2", "eager"): {"eager": 2, "mask_add": 2, "scale_mul": 2},
    ("llama", "eager"): {"eager": 2, "mask_add": 2, "scale_mul": 2, "repeat_kv": 2},
    ("bert", "eager"): {"eager": 2, "mask_add": 2, "scale_mul": 2},
    ("opt", "eager"): {"eager": 2, "mask_add": 2},
    ("gpt2", "sdpa"): {"sdpa": 2},
    ("llama", "sdpa"): {"sdpa": 2, "repeat_kv": 2},
    ("bert", "sdpa"): {"sdpa": 2},
    ("opt", "sdpa"): {"sdpa": 2},
}


@pytest.mark.parametrize("arch, impl", list(HF_EXPECTED))
def test_stats_hf(arch: str, impl: str):
    model = build_hf(arch, attn_implementation=impl)
    stats, gm = _stats(model, *hf_example_inputs(model, seq=8))
    assert stats == HF_EXPECTED[arch, impl]
    assert unfused_attention_patterns(gm) == 0          # no "unfused_left" statistic either


def test_hf_llama_eager_bf16_fuses_the_fp32_softmax(assert_matches_eager):
    model = build_hf("llama", attn_implementation="eager").to(torch.bfloat16)
    stats, _ = _stats(model, *hf_example_inputs(model, seq=8))
    assert stats == {"eager": 2, "softmax_dtype": 2, "softmax_cast": 2, "mask_add": 2,
                     "scale_mul": 2, "repeat_kv": 2}


# ---------------------------------------------------------------- what inspect shows


def test_inspect_shows_rules_per_attention_and_a_labelled_estimate(capsys):
    from optc.cli import main
    assert main(["inspect", "hf:llama:attn_implementation=eager,num_hidden_layers=1,seq=8"]) == 0
    out = capsys.readouterr().out
    assert "-- attention: 1 x optc.attention" in out
    assert "%attention0 @L0: eager + mask_add + scale_mul + repeat_kv; q (1, 4, 8, 16), " \
           "k (1, 2, 8, 16), kv_group 2, causal=False, mask=add" in out
    assert "FlashAttention-2 on NVIDIA H100 SXM5" in out and "estimate" in out


def test_kernel_inventory_names_pass_and_nodes():
    model = models.build("llama-tiny")
    compiled = optc.compile(model)
    args, kwargs = models.example_inputs(model, seq=8)
    with torch.no_grad():
        compiled(*args, **kwargs)
    ks = {k["op"]: k for k in kernels_for_graph(compiled.report.graphs[0].pipeline.gm)}
    src = ks["optc.attention"]["source"]
    assert ks["optc.attention"]["count"] == 2
    assert src.startswith("# optc kernel attention\n# pass: fuse_attention\n# nodes: ")
    assert "repeat_interleave" in src.splitlines()[2] and "def attention_fwd_kernel(" in src


def test_zoo_llama_kv_cache_prefill_and_decode_fuse():
    """The static-cache Llama attends over the whole cache with causal[input_pos] (a bool
    mask) after repeat_interleave of the cache: both graphs fuse, reading the cache itself."""
    from optc.runtime.generate import generate
    model = models.build("llama-tiny", seed=4)
    ids = torch.randint(0, 256, (1, 12))
    ref = generate(model, ids, 6).tokens
    compiled = optc.compile(model)
    assert torch.equal(generate(compiled, ids, 6).tokens, ref)
    assert len(compiled.report.graphs) == 2                 # prefill (T=12), decode (T=1)
    for g, tq in zip(compiled.report.graphs, (12, 1)):
        rec = next(r for r in g.pipeline.records if r.name == "fuse_attention")
        assert dict(rec.stats) == {"sdpa": 2, "repeat_interleave": 2}
        for n in (n for n in g.pipeline.gm.graph.nodes if n.target is torch.ops.optc.attention.default):
            q, k, _, mask, causal, _, group = n.args
            assert k.target is torch.ops.aten.index_copy_.default       # the cache, un-repeated
            assert mask.meta["val"].dtype == torch.bool and not causal and group == 2
            assert tuple(mask.meta["val"].shape) == (1, 1, tq, 18)


# ---------------------------------------------------------------- any combination of spellings

from hypothesis import given, settings, strategies as st  # noqa: E402


class Spelled(nn.Module):
    """Eager attention assembled from independently chosen spellings of each step."""

    def __init__(self, scale_at: str, div: bool, mask: str, upcast: bool, dropout: bool) -> None:
        super().__init__()
        self.scale_at, self.div, self.mask, self.upcast, self.dropout = scale_at, div, mask, upcast, dropout

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x / math.sqrt(D) if self.div else x * D**-0.5

    def forward(self, q, k, v, m):
        kt = k.transpose(-2, -1)
        q = self._scale(q) if self.scale_at == "q" else q
        kt = self._scale(kt) if self.scale_at == "k" else kt
        s = q @ kt
        s = self._scale(s) if self.scale_at == "scores" else s
        if self.mask == "add":
            s = s + m
        elif self.mask == "fill":
            s = s.masked_fill(m < -1.5, float("-inf"))
        elif self.mask == "tril":
            s = s.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
        p = s.float().softmax(-1).to(v.dtype) if self.upcast else F.softmax(s, dim=-1)
        p = F.dropout(p, 0.0) if self.dropout else p
        return p @ v


@settings(max_examples=12, deadline=None, database=None)
@given(scale_at=st.sampled_from(["q", "k", "scores"]), div=st.booleans(),
       mask=st.sampled_from(["none", "add", "fill", "tril"]), upcast=st.booleans(),
       dropout=st.booleans())
def test_any_spelling_fuses_and_matches_eager(scale_at, div, mask, upcast, dropout,
                                              assert_matches_eager):
    torch._dynamo.reset()    # per example: conftest's reset runs once per test, not per example
    model = Spelled(scale_at, div, mask, upcast, dropout)
    m = torch.randn(1, 1, T, T)
    m[..., 0] = 0.0                                  # key 0 always visible (no empty row)
    args = (*qkv(), m)
    _, after, stats = run_pass(model, args)
    assert stats["eager"] == 1 and "unfused_left" not in stats, stats
    assert stats.get("scale_div" if div else "scale_mul") == 1
    assert stats.get({"add": "mask_add", "fill": "mask_fill", "tril": "causal_tril"}.get(mask, "eager")) == 1
    assert "matmul" not in after and "softmax" not in after
    compiled_vs_eager(model, args, assert_matches_eager)

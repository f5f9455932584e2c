"""fuse_rope and optc::rope: golden graphs for both spellings of rotate_half, a must-not-fire
case per guard, exact statistics, bit-exact numerics against eager (the op's contract), the
native and ATen CPU paths, and the Triton kernel under the interpreter."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn
from expecttest import assert_expected_inline

import models
import optc
from optc.capture import capture_symbolic_trace
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.ops import OPS, native
from optc.ops.rope import rope_cpu, rope_reference
from optc.passes import fuse_rope, remove_noops
from optc.passes.fuse_rope import FuseRopeConfig

D = 8


def rotate_half_chunk(x):           # models/llama.py's spelling
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_slices(x):          # HF transformers' spelling
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rope(nn.Module):
    """q and k rotated with shared (T, D) tables; ``variant`` breaks one guard."""

    def __init__(self, rotate=rotate_half_chunk, variant: str = "ok") -> None:
        super().__init__()
        self.rotate, self.variant = rotate, variant

    def forward(self, q, k, cos, sin):
        v = self.variant
        if v == "other_rotation":
            rot = lambda x: torch.cat((x[..., :D // 2], -x[..., D // 2:]), dim=-1)  # noqa: E731
        elif v == "neg_first_half":
            rot = lambda x: torch.cat((-x[..., :D // 2], x[..., D // 2:]), dim=-1)  # noqa: E731
        else:
            rot = self.rotate
        if v == "other_tensor":
            return q * cos + rot(k) * sin
        if v == "sub":
            return q * cos - rot(q) * sin
        if v == "split_other_dim":
            a, b = q.chunk(2, dim=2)
            return q * cos + torch.cat((-b, a), dim=2) * sin
        return q * cos + rot(q) * sin, sin * rot(k) + cos * k     # operand orders swapped in k


def _inputs(dtype=torch.float32, t=3, table_dtype=None, table_shape=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t, D, generator=g).to(dtype)
    k = torch.randn(2, 4, t, D, generator=g).to(dtype)
    shape = table_shape or (t, D)
    cos = torch.randn(*shape, generator=g).to(table_dtype or dtype)
    sin = torch.randn(*shape, generator=g).to(table_dtype or dtype)
    return q, k, cos, sin


def run_pass(model, args):
    gm = capture_symbolic_trace(model, args).gm
    remove_noops.run(gm, remove_noops.RemoveNoopsConfig())
    gm.graph.eliminate_dead_code()
    before = format_graph(gm)
    res = fuse_rope.run(gm, FuseRopeConfig())
    assert res.modified == bool(res.stats["rope"])
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats)


@pytest.mark.parametrize("rotate,spelling", [(rotate_half_chunk, "aten.chunk"),
                                             (rotate_half_slices, "aten.slice")])
def test_golden(rotate, spelling):
    before, after, stats = run_pass(Rope(rotate), _inputs())
    assert spelling in before and "aten.cat" in before and "aten.neg" in before
    assert_expected_inline(after, """\
graph(%in0: f32[2,4,3,8], %in1: f32[2,4,3,8], %in2: f32[3,8], %in3: f32[3,8]):
  %rope0 = optc.rope(%in0, %in2, %in3) : f32[2,4,3,8]
  %rope1 = optc.rope(%in1, %in2, %in3) : f32[2,4,3,8]
  return [%rope0, %rope1]""")
    assert stats == {"rope": 2}


@pytest.mark.parametrize("variant", ["other_rotation", "neg_first_half", "other_tensor", "sub",
                                     "split_other_dim"])
def test_must_not_fire(variant):
    _, after, stats = run_pass(Rope(variant=variant), _inputs())
    assert "optc.rope" not in after and stats.get("rope", 0) == 0


def test_must_not_fire_on_mixed_dtypes_or_wider_tables():
    _, after, stats = run_pass(Rope(), _inputs(torch.bfloat16, table_dtype=torch.float32))
    assert "optc.rope" not in after and stats == {"skipped_dtype": 2}
    # tables (2, 4, 3, 8) broadcast to x but (B, 1, T, D) x a (1, 4, T, D) table would widen
    q, k, cos, sin = _inputs(table_shape=(1, 4, 3, D))
    q, k = q[:, :1], k[:, :1]                  # x (2, 1, 3, 8): the output is wider than x
    _, after, stats = run_pass(Rope(), (q, k, cos, sin))
    assert "optc.rope" not in after and stats == {"skipped_shape": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotate", [rotate_half_chunk, rotate_half_slices])
def test_compiled_bit_exact_with_eager(dtype, rotate):
    model = Rope(rotate)
    args = _inputs(dtype, t=5)
    compiled = optc.compile(model)
    with torch.no_grad():
        out, ref = compiled(*args), model(*args)
    for o, r in zip(out, ref):
        assert torch.equal(o, r) and o.dtype == r.dtype
    assert compiled.report.summary()["pass_stats"][0]["fuse_rope"] == {"rope": 2}


def test_llama_stats_and_exact_logits_against_the_unfused_pipeline():
    """On the zoo's Llama every layer's q and k are fused, and the logits are the same bits
    as compiling without the pass (the other passes' roundings are unchanged)."""
    from optc.passes.pipeline import DEFAULT_PIPELINE
    m = models.build("llama-tiny", seed=0).to(torch.bfloat16)
    n_layers = len(m.layers)
    without = optc.compile(m, config=optc.CompileConfig(
        pipeline=tuple(p for p in DEFAULT_PIPELINE if p != "fuse_rope")))
    with_rope = optc.compile(m)
    ids, pos = torch.randint(0, 100, (1, 6)), torch.arange(6)
    with torch.no_grad():
        m.setup_caches(1, 16)
        a = without(ids, pos)
        m.setup_caches(1, 16)
        b = with_rope(ids, pos)
    assert torch.equal(a, b)
    stats = with_rope.report.summary()["pass_stats"][0]["fuse_rope"]
    assert stats == {"rope": 2 * n_layers}


# ---- the op ------------------------------------------------------------------------------------

@pytest.mark.skipif(not native.features() & native.DECODE, reason="needs AVX-512 BF16")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,table", [((1, 32, 1, 64), (1, 1, 1, 64)), ((2, 4, 5, 64), (5, 64)),
                                         ((1, 3, 7, 130), (1, 3, 7, 130)), ((1, 2, 3, 2), (3, 2))])
def test_native_rope_bit_exact(dtype, shape, table):
    g = torch.Generator().manual_seed(1)
    B, H, T, Dh = shape
    x = torch.randn(B, T, H, Dh, generator=g).to(dtype).transpose(1, 2)   # a projection's view
    cos, sin = (torch.randn(*table, generator=g).to(dtype) for _ in range(2))
    out = native.rope(x, cos, sin)
    assert out is not None and torch.equal(out, rope_reference(x, cos, sin))
    assert out.stride() == x.stride()


@pytest.mark.parametrize("case", ["fp16", "mixed", "strided_last", "3d"])
def test_rope_cpu_falls_back_exactly(case):
    x = torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    if case == "fp16":
        x, cos, sin = x.half(), cos.half(), sin.half()
    elif case == "mixed":
        cos = cos.double()
    elif case == "strided_last":
        x = torch.randn(1, 2, 8, 3).transpose(-1, -2)
    if case == "3d":
        with pytest.raises(ValueError, match="must be \\(B, H, T, D\\)"):
            rope_cpu(x[0], cos, sin)
        return
    assert native.rope(x, cos, sin) is None
    out = rope_cpu(x, cos, sin)
    ref = rope_reference(x, cos, sin)
    assert torch.equal(out, ref) and out.dtype == ref.dtype


def test_rope_cpu_under_autograd_keeps_the_graph():
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    out = rope_cpu(x, torch.randn(3, 8), torch.randn(3, 8))
    assert out.grad_fn is not None


def test_rope_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        OPS["rope"].triton(torch.randn(1, 2, 3, 8), torch.randn(3, 8), torch.randn(3, 8))


# The interpreter's fp32 -> bf16 cast truncates where eager rounds to nearest
# (triton/runtime/interpreter.py), so each of the three bf16 roundings may be 1 ulp low: within
# 2^-6 relative of the eager value; fp32 and fp16 (rounded to nearest there) are exact.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, torch
    from optc.ops import OPS
    from optc.ops.rope import rope_reference
    failures, n = [], 0
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, table in (((2, 3, 4, 8), (4, 8)), ((1, 4, 1, 12), (1, 1, 1, 12))):
            B, H, T, Dh = shape
            x = torch.randn(B, T, H, Dh).to(dtype).transpose(1, 2)
            cos, sin = torch.randn(*table).to(dtype), torch.randn(*table).to(dtype)
            out, ref = OPS["rope"].triton(x, cos, sin), rope_reference(x, cos, sin)
            n += 1
            tol = (2**-6, 2**-6) if dtype == torch.bfloat16 else (0, 0)
            try:
                torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])
            except AssertionError as e:
                failures.append(f"{dtype} {shape}: {e}")
    print(json.dumps({"checks": n, "failures": failures}))
""")


def test_rope_kernel_under_interpreter(interpreted):
    assert interpreted(INTERPRETER_SCRIPT) == {"checks": 6, "failures": []}

"""optc::attention: CPU numerics against an fp64 reference, layout, fake, errors, decode entry
point, cost/roofline arithmetic, generated Triton source, and the Triton kernels (prefill and
flash-decoding) under TRITON_INTERPRET=1 at tiny shapes.

The interpreter must be on before ``@triton.jit`` decorates a kernel, and this process may
already have imported kernel modules without it, so interpreted runs happen in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sympy
import torch
from expecttest import assert_expected_inline
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.codegen.generator import KernelOrigin
from optc.ops import OPS, get_op_def
from optc.ops import attention as A

# Tolerance of the CPU path vs an fp64 reference, per dtype: fp32 attention reduces over at
# most a few dozen keys here (a few ulps); bf16/fp16 outputs are rounded once from an fp32
# accumulator (half an ulp: 2^-9 / 2^-12 relative), and the inputs of the two products are
# what the reference sees, so one ulp of the output's scale bounds the difference.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 2**-7), torch.float16: (2**-10, 2**-10)}
# The unfused path rounds the scores and the probabilities to the input dtype, as eager does:
# a score s (|s| <= ~8 here) is off by up to half an ulp, 2^-9 |s| in bf16, which moves its
# probability by that factor: ~2^-6 relative, so 2^-5 on outputs of magnitude <= 2 (fp16: 2^-8).
UNFUSED_TOL = {**TOL, torch.bfloat16: (2**-5, 2**-5), torch.float16: (2**-8, 2**-8)}


def reference(q, k, v, mask=None, causal=False, scale=None, kv_group=1):
    """softmax(scale * q k^T + mask) v in fp64, K/V repeated for GQA; also the LSE."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = k.repeat_interleave(kv_group, 1).double(), v.repeat_interleave(kv_group, 1).double()
    s = q.double() @ k.transpose(-2, -1) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


def make(B=2, H=4, Hkv=4, tq=7, tk=9, D=16, Dv=None, dtype=torch.float32, mask=None, bthd=False):
    """q/k/v/mask; ``bthd``: q/k/v as (B, T, H, D) projections viewed (B, H, T, D)."""
    def t(h, n, d):
        x = torch.randn(B, n, h, d).to(dtype)
        return x.transpose(1, 2) if bthd else x.transpose(1, 2).contiguous()
    q, k, v = t(H, tq, D), t(Hkv, tk, D), t(Hkv, tk, Dv or D)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, tq, tk) > 0.3
        m[..., 0] = True                        # every row sees a key
    elif mask == "add":
        m = torch.randn(B, H, 1, tk).to(dtype)  # a per-head key bias (ALiBi-like), broadcast
    return q, k, v, m


def _close(out, ref, dtype, tol=TOL):
    rtol, atol = tol[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


# ---- CPU ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", list(A.CPU_PATHS))
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mask", [None, "bool", "add"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_paths_match_reference(path, dtype, mask, causal):
    for hkv in (4, 2):      # plain and GQA (group 2)
        q, k, v, m = make(Hkv=hkv, dtype=dtype, mask=mask)
        out = A.CPU_PATHS[path](q, k, v, m, causal, 0.3, 4 // hkv)
        _close(out, reference(q, k, v, m, causal, 0.3, 4 // hkv)[0], dtype,
               UNFUSED_TOL if path == "unfused" else TOL)


@pytest.mark.parametrize("bthd", [False, True], ids=["bhtd", "bthd"])
def test_output_has_q_layout_like_aten_flash(bthd):
    q, k, v, _ = make(bthd=bthd)
    for fn in [OPS["attention"].cpu, *A.CPU_PATHS.values()]:
        out = fn(q, k, v, None, True, 0.25, 1)
        assert out.stride() == torch.empty_like(q).stride()
    want = torch.empty_like(q).stride()
    with FakeTensorMode():
        fq, fk, fv = (torch.empty_strided(t.shape, t.stride()) for t in (q, k, v))
        assert torch.ops.optc.attention(fq, fk, fv, None, True, 0.25, 1).stride() == want


def test_value_head_dim_may_differ_and_tq_tk_differ():
    q, k, v, m = make(tq=3, tk=11, Dv=8, mask="bool")
    out = torch.ops.optc.attention(q, k, v, m, True, 0.5, 1)       # through the dispatcher
    assert out.shape == (2, 4, 3, 8)
    _close(out, reference(q, k, v, m, True, 0.5)[0], torch.float32)


def test_registry_and_fake():
    d = get_op_def(torch.ops.optc.attention.default)
    assert d is OPS["attention"] and d.cpu is A.attention_cpu and d.triton is A.attention_triton
    with FakeTensorMode():
        q, k, v = torch.empty(2, 8, 5, 64, dtype=torch.bfloat16), \
            torch.empty(2, 2, 9, 64, dtype=torch.bfloat16), torch.empty(2, 2, 9, 32, dtype=torch.bfloat16)
        out = torch.ops.optc.attention(q, k, v, torch.empty(1, 1, 5, 9, dtype=torch.bool), False, 0.1, 4)
        assert out.shape == (2, 8, 5, 32) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, match", [
    (dict(kv_group=3), "need H = H_kv"),
    (dict(mask=torch.ones(3, 1, 7, 9, dtype=torch.bool)), "does not broadcast"),
    (dict(q=torch.randn(2, 4, 16)), "must be 4-D"),
    (dict(k=torch.randn(2, 4, 9, 8)), "do not fit"),
])
def test_bad_operands_name_what_is_wrong(bad, match):
    q, k, v, _ = make()
    args = dict(q=q, k=k, v=v, mask=None, kv_group=1) | bad
    with pytest.raises(ValueError, match=match):
        OPS["attention"].cpu(args["q"], args["k"], args["v"], args["mask"], False, 1.0,
                             args["kv_group"])


def test_decode_attention_cpu_returns_lse_and_honours_seq_lens():
    q, k, v, _ = make(B=2, H=8, Hkv=2, tq=1, tk=40)
    mask = torch.rand(2, 1, 1, 40) > 0.2
    mask[..., 0] = True
    lens = torch.tensor([25, 40])
    out, lse = A.decode_attention(q, k, v, mask=mask, seq_lens=lens)
    keep = mask & (torch.arange(40) < lens[:, None])[:, None, None, :]
    ref, ref_lse = reference(q, k, v, keep, kv_group=4)
    _close(out, ref, torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


# ---- cost and roofline -----------------------------------------------------------------------

def test_causal_pairs_and_flops():
    assert A.causal_pairs(4, 4) == 10 and A.causal_pairs(2, 5) == 3 and A.causal_pairs(5, 2) == 9
    assert all(A.causal_pairs(tq, tk) == sum(min(i + 1, tk) for i in range(tq))
               for tq in range(1, 6) for tk in range(1, 6))
    t = sympy.Symbol("s0", positive=True, integer=True)
    assert sympy.simplify(A.causal_pairs(t, t) - t * (t + 1) / 2) == 0
    assert A.attention_flops(1, 2, 3, 5, 8, 8, False) == 2 * 2 * 15 * 16


def test_roofline_estimate_on_h100():
    # B1 H32 T2048 D128 bf16 causal: FLOPs over the 2048*2049/2 kept pairs, two products
    est = A.roofline(1, 32, 8, 2048, 2048, 128, torch.bfloat16, causal=True, gpu="H100")
    flops = 2 * 32 * (2048 * 2049 // 2) * 256
    assert est["flops"] == flops and est["bound"] == "compute"
    assert est["predicted_s"] == pytest.approx(flops / 989.4e12)
    assert "estimate" in est["label"] and est["kernel"] == "FlashAttention-2"
    # Q, K/V (8 heads: GQA reads each once) in bf16, O written, fp32 LSE, the bool mask once
    est = A.roofline(1, 32, 8, 2048, 2048, 128, torch.bfloat16, causal=False, mask_bytes=2048**2)
    assert est["bytes"] == 2 * (32 + 8) * 2048 * 128 * 2 + 4 * 32 * 2048 + 2048**2
    dec = A.roofline(1, 32, 8, 1, 4096, 128, torch.bfloat16, causal=False, gpu="H100")
    assert dec["kernel"] == "flash-decoding" and dec["bound"] == "memory"
    with pytest.raises(ValueError, match="unknown GPU"):
        A.roofline(1, 1, 1, 1, 1, 16, torch.float32, causal=False, gpu="TPU")


# ---- generated Triton source -----------------------------------------------------------------

ORIGIN = KernelOrigin("attention", pass_name="fuse_attention", nodes=("matmul_1", "softmax", "matmul_2"))


def test_golden_prefill_source_causal_bool_mask_fp32():
    src = A.kernel_source(A.AttentionSpec("bool", causal=True, dot_fp32=True), ORIGIN)
    body = src.split("    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)\n")[1].split("    out = ")[0]
    assert src.splitlines()[:3] == ["# optc kernel attention", "# pass: fuse_attention",
                                    "# nodes: matmul_1, softmax, matmul_2"]
    assert_expected_inline(body, """\
    lo, hi = 0, tl.minimum(t_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + cols0
        col_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
        keep = row_ok[:, None] & col_ok[None, :]
        keep = keep & (cols[None, :] <= rows[:, None])
        keep = keep & (tl.load(mask_ptr + b * stride_mb + h * stride_mh + rows[:, None] * stride_mq + cols[None, :] * stride_mk, mask=keep, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: stay finite
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
""")


SPECS = [A.AttentionSpec(m, c, f) for m in A.MASK_KINDS for c in (False, True) for f in (False, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mask}-c{int(s.causal)}-f{int(s.dot_fp32)}")
def test_every_prefill_variant_is_well_formed(spec):
    src = A.kernel_source(spec)
    compile(src, "<kernel>", "exec")
    lines = src.splitlines()
    groups = [ln.strip() for ln in lines if ln.startswith("    # ") and ln.strip() in
              ("# pointers", "# dimensions", "# scalars", "# meta-parameters")]
    assert groups == ["# pointers", "# dimensions", "# scalars", "# meta-parameters"]
    assert all(f"    {c}: tl.constexpr," in src or f"{c}: tl.constexpr" in src
               for c in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    memops = [ln for ln in lines if "tl.load(" in ln or "tl.store(" in ln]
    assert memops and all("mask=" in ln or "mask=" in nxt for ln, nxt in
                          zip(lines, lines[1:] + [""]) if ln in memops)
    assert ("mask_ptr" in src) == (spec.mask != "none")
    assert ("(pid_m + 1) * BLOCK_M" in src) == spec.causal          # causal block skipping
    assert "h_kv = h // kv_group" in src                             # GQA head mapping
    assert (".to(tl.float32)" in src.split("acc = tl.zeros")[0]) == spec.dot_fp32
    assert "tl.store(lse_ptr" in src


@pytest.mark.parametrize("spec", [A.DecodeSpec(m, s, f) for m in A.MASK_KINDS
                                  for s in (False, True) for f in (False, True)],
                         ids=lambda s: f"{s.mask}-len{int(s.seq_lens)}-f{int(s.dot_fp32)}")
def test_every_decode_variant_is_well_formed(spec):
    src = A.decode_kernel_source(spec)
    compile(src, "<kernel>", "exec")
    assert f"def {spec.split_entry}(" in src and f"def {spec.merge_entry}(" in src
    assert ("seq_lens_ptr" in src) == spec.seq_lens and ("mask_ptr" in src) == (spec.mask != "none")
    assert "h = h_kv * kv_group + r // t_q" in src                   # a GQA group per program


# ---- kernels under the interpreter -------------------------------------------------------------

# Tolerances of interpreted Triton vs the fp64 reference, per dtype (rtol, atol):
#  fp32: IEEE fp32 dots and fp32 softmax state: a few fp32 ulps.
#  fp16: the dots read fp16 q/k/v and p is rounded to fp16 before p @ v (as on tensor cores):
#        each weight off by <= 2^-11 relative, so the output by <= 2^-11 * sum|p||v| plus its
#        own rounding: 2^-8 covers |v| up to ~4.
#  bf16: computed in fp32 (the interpreter's bf16 tl.dot is wrong), but its fp32 -> bf16 cast
#        truncates instead of rounding (see tests/test_codegen.py): < 1 ulp = 2^-7 relative.
#  lse: fp32 in every case.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, math, sys, time
    import torch
    sys.path.insert(0, "tests")
    from test_ops_attention import make, reference
    from optc.ops import OPS
    from optc.ops import attention as A
    from optc.ops.attention import LaunchConfig

    TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2**-8, 2**-8), torch.bfloat16: (2**-7, 2**-9)}
    failures, n = [], 0

    def check(label, out, lse, ref, ref_lse, dtype):
        global n
        n += 1
        try:
            assert out.dtype == dtype, out.dtype
            torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
            torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-5, atol=2e-5)
        except AssertionError as e:
            failures.append(f"{label}: {e}")

    torch.manual_seed(0)
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    # (dtype, mask, causal, Hkv, tq, tk, D, BLOCK_M/N): every dtype, mask kind, causal or not,
    # GQA, odd T (masked tails), Tq != Tk, head dims 32..128 (96: a masked BLOCK_D of 128)
    CASES = [(f32, None, True, 4, 19, 19, 32, 16), (f32, "bool", False, 2, 19, 23, 64, 16),
             (f32, "add", True, 1, 33, 33, 96, 16), (f32, "bool", True, 2, 5, 37, 128, 16),
             (f16, None, False, 2, 17, 29, 64, 16), (f16, "add", True, 4, 21, 21, 32, 32),
             (b16, "bool", True, 4, 19, 19, 64, 16), (b16, None, True, 2, 40, 40, 32, 32),
             (b16, "add", False, 1, 9, 18, 128, 16)]
    for dtype, mask, causal, hkv, tq, tk, D, blk in CASES:
        q, k, v, m = make(B=1, H=4, Hkv=hkv, tq=tq, tk=tk, D=D, dtype=dtype, mask=mask, bthd=True)
        out, lse = A.launch_attention(q, k, v, m, causal=causal, scale=0.3, kv_group=4 // hkv,
                                      config=LaunchConfig(blk, blk, 1, 1))
        ref, ref_lse = reference(q, k, v, m, causal, 0.3, 4 // hkv)
        check(f"prefill {dtype} mask={mask} causal={causal} Hkv={hkv} T={tq}x{tk} D={D}",
              out, lse, ref, ref_lse, dtype)
        assert out.stride() == q.stride()

    # flash-decoding: 1-2 query tokens, GQA group 4, keys split 3 ways, seq_lens and masks
    for dtype, mask, tq, lens in ((f32, None, 1, (50, 70)), (f32, "bool", 2, (70, 33)),
                                  (f16, "add", 1, (70, 64)), (b16, "bool", 1, (5, 70))):
        q, k, v, m = make(B=2, H=8, Hkv=2, tq=tq, tk=70, D=32, dtype=dtype, mask=mask)
        seq = torch.tensor(lens)
        out, lse = A.decode_attention(q, k, v, mask=m, seq_lens=seq, num_splits=3, block_n=16)
        keep = (torch.arange(70) < seq[:, None])[:, None, None, :]
        full = keep if m is None else (keep & m if m.dtype == torch.bool
                                       else m.masked_fill(~keep, float("-inf")))
        ref, ref_lse = reference(q, k, v, full, False, 1 / math.sqrt(32), 4)
        check(f"decode {dtype} mask={mask} tq={tq} lens={lens}", out, lse, ref, ref_lse, dtype)

    # through the op's Triton wrapper: decode kernel for 1 non-causal token, prefill otherwise
    for tq, causal in ((1, False), (6, True)):
        q, k, v, m = make(B=1, H=4, Hkv=2, tq=tq, tk=24, D=32, mask="bool")
        out = OPS["attention"].triton(q, k, v, m, causal, 0.2, 2)
        ref, ref_lse = reference(q, k, v, m, causal, 0.2, 2)
        check(f"op wrapper tq={tq}", out, ref_lse.float(), ref, ref_lse, torch.float32)
    print(json.dumps({"checks": n, "failures": failures}))
""")


def test_kernels_under_interpreter_match_reference(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPTC_CACHE_DIR": str(tmp_path)}
    env.pop("OPTC_LOGS", None)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == [] and result["checks"] == 15, result
    # every kernel went through the on-disk cache: one module per variant used
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 11


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_on_gpu_match_cpu(dtype):
    q, k, v, m = (t.cuda() if t is not None else None for t in
                  make(B=2, H=8, Hkv=2, tq=300, tk=300, D=128, dtype=dtype, mask="bool"))
    out, lse = A.launch_attention(q, k, v, m, causal=True, scale=0.1, kv_group=4)
    ref, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), m.cpu(), True, 0.1, 4)
    tol = {torch.float32: 1e-4, torch.float16: 2**-8, torch.bfloat16: 2**-6}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-4, atol=1e-4)


# ---- shape-generic property ------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, database=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), tq=st.integers(1, 9),
       tk=st.integers(1, 9), D=st.sampled_from([4, 8, 16]), mask=st.sampled_from([None, "bool", "add"]),
       causal=st.booleans(), bthd=st.booleans())
def test_cpu_op_matches_reference_for_any_shape(B, hkv, group, tq, tk, D, mask, causal, bthd):
    q, k, v, m = make(B=B, H=hkv * group, Hkv=hkv, tq=tq, tk=tk, D=D, mask=mask, bthd=bthd)
    if m is not None and m.dtype != torch.bool:
        m = m[:, :1]                                  # (B, 1, 1, Tk): broadcast over heads
    out = torch.ops.optc.attention(q, k, v, m, causal, 0.7, group)
    _close(out, reference(q, k, v, m, causal, 0.7, group)[0], torch.float32)


# ---- the causal-prefix mask (a prefill from position 0 into a KV cache) ----------------------

def _prefix_mask(tq: int, tk: int) -> torch.Tensor:
    return (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None])[None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk", [(16, 16), (100, 100), (300, 300), (100, 300), (130, 512)])
def test_causal_prefix_mask_runs_as_is_causal(dtype, tq, tk):
    """The mask of a prefill into a cache of tk slots runs as is_causal over the first tq keys:
    the masked call's bits where tk == tq; where tk > tq the key blocks are cut differently, so
    within fp32 rounding of the sums (bf16 outputs: one rounding step, 2^-8 of the largest)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, tq, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, tk, 64, generator=g).to(dtype) for _ in range(2))
    mask = _prefix_mask(tq, tk)
    assert A.causal_prefix(mask, tq, tk)
    out = A.attention_cpu(q, k, v, mask, False, 0.125, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125,
                                                           enable_gqa=True)
    if tk == tq:
        assert torch.equal(out, ref)
    else:
        tol = 2 ** -8 * ref.abs().max().item() if dtype == torch.bfloat16 else 1e-6
        assert (out.float() - ref.float()).abs().max().item() <= tol


def test_causal_prefix_must_not_fire():
    m = _prefix_mask(32, 64)
    assert not A.causal_prefix(m, 32, 48)                      # shape is not (tq, tk)
    assert not A.causal_prefix(m.float(), 32, 64)              # additive masks: not checked
    assert not A.causal_prefix(m.expand(2, 1, 32, 64), 32, 64)  # per-batch masks
    shifted = (torch.arange(64)[None, :] <= torch.arange(32)[:, None] + 5)[None, None]
    assert not A.causal_prefix(shifted, 32, 64)                # a chunk after 5 cached tokens
    holed = m.clone()
    holed[0, 0, 20, 3] = False                                 # padding: one key hidden
    assert not A.causal_prefix(holed, 32, 64)
    assert not A.causal_prefix(_prefix_mask(64, 32), 64, 32)   # fewer keys than queries
    assert not A.causal_prefix(None, 32, 64)
    # and the op then takes the masked kernel: the shifted chunk still sees its 5 earlier keys
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, t, 16, generator=g) for t in (32, 64, 64))
    out = A.attention_cpu(q, k, v, shifted, False, 0.25, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=shifted, scale=0.25)
    assert torch.equal(out, ref)

"""optc.ops.native's decode-step kernels (decode.cpp): add + RMSNorm and few-query attention.

add_rms_norm is held to ATen's exact bits (the op's contract: HF LlamaRMSNorm's roundings with
ATen's summation order), on every row-length class of that order (shorter than one 8-lane
vector, tails of 1-7 elements, a partial ilp row, one and several cascade levels), for bf16 and
fp32 rows with weights of either dtype; and it must decline (None: the caller's ATen path) the
shapes whose order it does not reproduce.

Attention tolerances, against an fp64 reference: the kernel sums in fp32 with fp32
probabilities, and its exp is Cephes' polynomial (~2 ulp): fp32 outputs within 1e-5 of
unit-scale values (measured 9e-7, the same as ATen's flash kernel); bf16 outputs add the output
rounding (2^-9 relative), so within 2^-8 relative plus 1e-3, and never worse than 1.5x ATen's
own flash kernel error on the same inputs plus that rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from optc.ops import attention as A
from optc.ops import native, norms

pytestmark = pytest.mark.skipif(
    native._compiler() is None or not native.features() & native.DECODE,
    reason="needs a C++ compiler and a CPU with AVX-512 F/BW/VL and BF16")


def _aten(x, r, w, eps):
    h = x if r is None else x + r
    return h, norms._rms_norm(h, w, eps)


# ---- add + RMSNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("wdtype", ["same", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [8, 9, 31, 32, 33, 100, 257, 768, 2048, 4095, 5000])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_add_rms_norm_bit_exact_with_aten(threads, dtype, wdtype, c, rows):
    g = torch.Generator().manual_seed(c * 100 + rows)
    wd = dtype if wdtype == "same" else wdtype
    x = (torch.randn(rows, c, generator=g) * 3).to(dtype)
    r = torch.randn(rows, c, generator=g).to(dtype)
    w = torch.randn(c, generator=g).to(wd)
    h, y = native.add_rms_norm(x, r, w, 1e-6)
    h0, y0 = _aten(x, r, w, 1e-6)
    assert torch.equal(h, h0) and h.dtype == h0.dtype
    assert torch.equal(y, y0) and y.dtype == y0.dtype
    none, y1 = native.add_rms_norm(x, None, w, 1e-5)
    assert none is None and torch.equal(y1, _aten(x, None, w, 1e-5)[1])


def test_add_rms_norm_long_rows_of_many_rows_exact():
    """Several rows of 65536: ATen parallelizes over the rows, each row's sum keeps its order."""
    x = torch.randn(2, 65536, dtype=torch.bfloat16)
    w = torch.randn(65536, dtype=torch.bfloat16)
    assert torch.equal(native.add_rms_norm(x, x, w, 1e-6)[1], _aten(x, x, w, 1e-6)[1])


def test_add_rms_norm_nan_and_inf_propagate_like_aten():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    w = torch.randn(64, dtype=torch.bfloat16)
    h, y = native.add_rms_norm(x, x, w, 1e-6)
    h0, y0 = _aten(x, x, w, 1e-6)
    torch.testing.assert_close(h, h0, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, y0, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["short", "long_single_row", "strided", "broadcast_residual",
                                  "mixed_dtypes", "fp16", "weight_shape"])
def test_add_rms_norm_declines_what_it_does_not_reproduce(case):
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(64, dtype=torch.bfloat16)
    if case == "short":            # ATen sums fp32 rows of 5-7 in another order
        x, r, w = x[:, :7].float().contiguous(), r[:, :7].float().contiguous(), w[:7].float()
    elif case == "long_single_row":    # ATen splits one long row over its threads
        x = torch.randn(1, 40000, dtype=torch.bfloat16)
        r, w = torch.randn_like(x), torch.randn(40000, dtype=torch.bfloat16)
    elif case == "strided":
        x = torch.randn(64, 2, dtype=torch.bfloat16).t()
    elif case == "broadcast_residual":
        r = torch.randn(1, 64, dtype=torch.bfloat16)
    elif case == "mixed_dtypes":
        r = r.float()
    elif case == "fp16":
        x, r, w = x.half(), r.half(), w.half()
    elif case == "weight_shape":
        w = torch.randn(1, 64, dtype=torch.bfloat16)
    assert native.add_rms_norm(x, r, w, 1e-6) is None
    if case != "weight_shape":     # the op itself still gives ATen's result, through ATen
        h, y = norms.add_rms_norm_cpu(x, r, w, 1e-6)
        assert torch.equal(y, norms._rms_norm(x + r, w, 1e-6))


def test_norm_ops_use_the_native_kernel_and_autograd_falls_back(monkeypatch):
    calls = []
    real = native.add_rms_norm
    monkeypatch.setattr(native, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    w = torch.randn(256, dtype=torch.bfloat16)
    norms.add_rms_norm_cpu(x, x, w, 1e-6)
    norms.rms_norm_cpu(x, w, 1e-6)
    assert len(calls) == 2
    wg = w.float().requires_grad_()
    y = norms.rms_norm_cpu(x, wg, 1e-6)           # autograd: the ATen path, with a graph
    assert len(calls) == 2 and y.grad_fn is not None


# ---- attention ----------------------------------------------------------------------------------

def _ref_attention(q, k, v, mask, causal, scale, group):
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    tq, tk = s.shape[-2:]
    keep = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        s = s + mask.double()
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)   # no key: 0
    return p @ v


SHAPES = [  # B, H, H_kv, Tq, Tk, D, Dv
    (1, 32, 4, 1, 256, 64, 64),     # TinyLlama decode
    (2, 8, 8, 3, 37, 64, 64),
    (1, 4, 2, 1, 1, 16, 16),
    (1, 6, 3, 5, 100, 80, 48),      # D and Dv not multiples of 64, tails everywhere
    (1, 2, 1, 16, 17, 128, 256),    # the most query rows it takes, the widest value
    (1, 12, 12, 1, 1000, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_row", "add", "add_fp32_strided"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_against_fp64(threads, dtype, shape, mask_kind, causal):
    B, H, hkv, tq, tk, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(B, tq, H, d, generator=g).to(dtype).transpose(1, 2)   # a projection's view
    k = torch.randn(B, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(B, hkv, tk, dv, generator=g).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, tq, tk, generator=g) > 0.3
    elif mask_kind == "bool_row":                  # decode's cache mask (1, 1, 1, S)
        mask = (torch.arange(tk) < max(1, tk // 2))[None, None, None]
    elif mask_kind == "add":
        mask = (torch.randn(1, H, 1, tk, generator=g) * 2).to(dtype)
    elif mask_kind == "add_fp32_strided":          # a strided key axis
        mask = (torch.randn(B, 1, tk, tq, generator=g) * 2).transpose(-1, -2)
    scale = 1 / math.sqrt(d)
    out = native.attention(q, k, v, mask, causal, scale)
    assert out is not None and out.dtype == dtype and out.shape == (B, H, tq, dv)
    if dv == d:
        assert out.stride() == q.stride()          # empty_like(q), as ATen's kernel
    ref = _ref_attention(q, k, v, mask, causal, scale, H // hkv)
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-5
    else:
        flash = A._flash_cpu(q, k, v, mask, causal, scale, H // hkv)
        flash_err = (flash.double() - ref).abs().max().item()
        bound = ref.abs().max().item() * 2 ** -8 + 1e-3
        assert err <= bound and err <= 1.5 * flash_err + bound / 2, (err, flash_err)


def test_attention_all_masked_rows_are_zero():
    q = torch.randn(1, 2, 1, 16)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert torch.equal(native.attention(q, k, v, mask, False, 0.25), torch.zeros(1, 2, 1, 16))


@pytest.mark.parametrize("case", ["long_query", "odd_d_bf16", "fp16", "wide_head", "int_mask",
                                  "strided_last_dim"])
def test_attention_declines(case):
    q, k, v, mask = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), None
    if case == "long_query":
        q = torch.randn(1, 2, native.DECODE_MAX_TQ + 1, 16)
    elif case == "odd_d_bf16":
        q, k, v = (torch.randn(1, 2, n, 15, dtype=torch.bfloat16) for n in (1, 8, 8))
    elif case == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "wide_head":
        q, k, v = (torch.randn(1, 2, n, 272) for n in (1, 8, 8))
    elif case == "int_mask":
        mask = torch.ones(1, 1, 1, 8, dtype=torch.int32)
    elif case == "strided_last_dim":
        k = torch.randn(1, 2, 16, 8).transpose(-1, -2)
    assert native.attention(q, k, v, mask, False, 0.25) is None
    if case not in ("int_mask",):    # the op still answers, through ATen's flash kernel
        out = A.attention_cpu(q, k, v, mask, False, 0.25, 1)
        ref = _ref_attention(q, k, v, mask, False, 0.25, 1)
        assert (out.double() - ref).abs().max().item() < 2e-2


def test_attention_op_takes_the_native_path_for_decode_only(monkeypatch):
    seen = []
    real = native.attention
    monkeypatch.setattr(native, "attention", lambda *a: seen.append(a[0].shape[2]) or real(*a))
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    A.attention_cpu(torch.randn(1, 4, 1, 16), k, v, None, False, 0.25, 2)
    A.attention_cpu(torch.randn(1, 4, 40, 16), k, v, None, True, 0.25, 2)   # prefill: flash
    assert seen == [1]
    qg = torch.randn(1, 4, 1, 16, requires_grad=True)
    out = A.attention_cpu(qg, k, v, None, False, 0.25, 2)                   # autograd: ATen
    assert seen == [1] and out.grad_fn is not None

"""Quantized linear ops: ``y = x @ dequantize(W).T + bias`` for each format of ``optc.quant``.

    optc::linear_int8(x, w_int8, scales, bias?) -> y
    optc::linear_int4(x, w_int4, scales_zeros, bias?, group_size, n) -> y
    optc::linear_w8a8(x, w_int8, scales, bias?) -> y
    optc::linear_bfp(x, w, scales, index, bias?, block_size, planes, n) -> y
        planes = 0: w = mantissa (N, K) int8, scales = exponent (N, K/B) int8, index = perm (K,)
        planes = 1|2: w = int4 planes, scales = scales_zeros, index = perm per plane

``x`` is (..., K) of any float dtype; ``y`` is (..., n) of the same dtype. The tensor layouts are
``optc.quant.formats``'s; ``n`` is the true N where the int4 tile layout pads rows to 64.

CPU paths (bf16 compute, fp32 accumulation, output cast back to x's dtype): ATen's packed
kernels are fast only with bf16 activations (FACTS.md: 7-14 ms with fp32 activations vs
0.26-0.29 ms with bf16 at 1x4096x4096), so every path casts x to bf16 and back. The rounding of
x to bf16 (2^-9 relative) is far below the weights' quantization noise (int8: 2^-7 of the
range). Which path runs is a decision table per (kind, M) in ``CPU_PATHS``, from
``benchmarks/quant_kernels.py`` (numbers in ``DECISION_NOTES``); no call ever measures.

The Triton kernels are rendered from ``optc.codegen.templates.quant_gemm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from optc.ops.registry import define
from optc.quant import formats as fmt

BF16 = torch.bfloat16

# ---- CPU ------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _bf16(t: Tensor) -> Tensor:
    return t if t.dtype == BF16 else t.to(BF16)


def _finish(y: Tensor, x: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """(M, >=n) result -> (..., n) in x's dtype, bias added."""
    if y.shape[1] != n:
        y = y[:, :n]
    y = y.to(x.dtype) if y.dtype != x.dtype else y
    if not y.is_contiguous():
        y = y.contiguous()
    if bias is not None:
        y = y.add_(bias) if bias.dtype == y.dtype else (y + bias).to(x.dtype)
    return y.view(*x.shape[:-1], n)


def int4_weight_bf16(w_int4: Tensor, scales_zeros: Tensor, group_size: int, k: int) -> Tensor:
    """The (Np, K) bf16 weight of a tile-64 int4 tensor: ``(q - 8) s + z`` in fp32, rounded."""
    u = fmt.unpack_int4(w_int4, k)
    s, z = fmt._group_rows(scales_zeros, group_size)
    return (u.float().sub_(8).mul_(s).add_(z)).to(BF16)


def _int8_cpu(x2: Tensor, w: Tensor, scales: Tensor, path: str) -> Tensor:
    if path == "int8pack":
        return torch._weight_int8pack_mm(_bf16(x2), w, scales)
    return F.linear(_bf16(x2), w.to(BF16)).mul_(scales)               # "dequant"


def _int4_cpu(x2: Tensor, w: Tensor, sz: Tensor, group_size: int, path: str) -> Tensor:
    if path == "int4pack":
        return torch._weight_int4pack_mm_for_cpu(_bf16(x2), w, group_size, sz)
    return F.linear(_bf16(x2), int4_weight_bf16(w, sz, group_size, x2.shape[1]))  # "dequant"


def quantize_rows(x2: Tensor) -> tuple[Tensor, Tensor]:
    """W8A8's run-time activation quantization: per row, symmetric int8, fp32 scale (M, 1)."""
    xf = x2.float()
    amax = xf.abs().amax(1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(xf / sx).clamp_(-127, 127).to(torch.int8), sx


def linear_int8_cpu(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    x2 = _rows(x)
    n, k = w_int8.shape
    y = _int8_cpu(x2, w_int8, scales, cpu_path("int8", x2.shape[0], n, k))
    return _finish(y, x, bias, n)


def linear_int4_cpu(x: Tensor, w_int4: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                    group_size: int, n: int) -> Tensor:
    x2 = _rows(x)
    y = _int4_cpu(x2, w_int4, scales_zeros, group_size,
                  cpu_path("int4", x2.shape[0], n, x2.shape[1]))
    return _finish(y, x, bias, n)


def linear_w8a8_cpu(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    x2 = _rows(x)
    xq, sx = quantize_rows(x2)
    acc = torch._int_mm(xq, w_int8.t())           # (M, N) int32, exact; (N, K).t() is fastest
    y = acc.float().mul_(sx).mul_(scales.float())
    return _finish(y, x, bias, w_int8.shape[0])


def bfp_weight_bf16(mantissa: Tensor, exponent: Tensor, block_size: int) -> Tensor:
    """m * 2^e as bf16 (exact: |m| <= 127 fits bf16's 8-bit significand)."""
    return torch.ldexp(mantissa.float(), exponent.float().repeat_interleave(block_size, 1)).to(BF16)


def linear_bfp_cpu(x: Tensor, w: Tensor, scales: Tensor, index: Tensor, bias: Tensor | None,
                   block_size: int, planes: int, n: int) -> Tensor:
    x2 = _bf16(_rows(x)).index_select(1, index)   # permuted (and repeated once per plane)
    if planes:
        y = torch._weight_int4pack_mm_for_cpu(x2, w, block_size, scales)
    else:
        y = F.linear(x2, bfp_weight_bf16(w, scales, block_size))
    return _finish(y, x, bias, n)


# Decision table: kind -> ((largest M, path), ...), first match wins; see DECISION_NOTES.
CPU_PATHS: dict[str, tuple[tuple[int, str], ...]] = {
    "int8": ((1 << 62, "int8pack"),),
    "int4": ((1 << 62, "int4pack"),),
}
DECISION_NOTES = "(filled from benchmarks/quant_kernels.py)"


def cpu_path(kind: str, m: int, n: int, k: int) -> str:
    """The CPU path for one call: the decision table, then the kernels' shape limits."""
    path = next(p for max_m, p in CPU_PATHS[kind] if m <= max_m)
    if path == "int8pack" and k % 16:
        return "dequant"          # _weight_int8pack_mm reads garbage unless K % 16 == 0
    return path


# ---- fake -----------------------------------------------------------------------------------

def _out_fake(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def linear_int8_fake(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return _out_fake(x, w_int8.shape[0])


def linear_int4_fake(x: Tensor, w_int4: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                     group_size: int, n: int) -> Tensor:
    return _out_fake(x, n)


def linear_w8a8_fake(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return _out_fake(x, w_int8.shape[0])


def linear_bfp_fake(x: Tensor, w: Tensor, scales: Tensor, index: Tensor, bias: Tensor | None,
                    block_size: int, planes: int, n: int) -> Tensor:
    return _out_fake(x, n)


# ---- registration ---------------------------------------------------------------------------

LINEAR_INT8 = define("linear_int8", cpu=linear_int8_cpu, fake=linear_int8_fake, triton=None,
                     summary="y = x @ (q * s).T + b; int8 weight, per-channel scale")
LINEAR_INT4 = define("linear_int4", cpu=linear_int4_cpu, fake=linear_int4_fake, triton=None,
                     summary="y = x @ ((q - 8) s + z).T + b; int4 weight, group scale + zero")
LINEAR_W8A8 = define("linear_w8a8", cpu=linear_w8a8_cpu, fake=linear_w8a8_fake, triton=None,
                     summary="y = (q8(x) @ q.T) sx s + b; int8 x int8 -> int32, per-token sx")
LINEAR_BFP = define("linear_bfp", cpu=linear_bfp_cpu, fake=linear_bfp_fake, triton=None,
                    summary="y = x[..., perm] @ (m 2^e).T + b; block floating point weight")

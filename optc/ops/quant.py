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
range). Which path runs is a decision table per (kind, M) in ``CPU_PATHS``, generated from
``benchmarks/quant_kernels.py`` (measured numbers below); no call ever measures.

CPU paths per kind (``CPU_IMPLS``): ATen's packed kernels (``int8pack``, ``int4pack``), a
dequantize-once-then-bf16-GEMM path (``dequant``), and optc's native kernels
(``optc.ops.native``, ``gemv.cpp``), which read the packed weights in place:

- ``int8 / native``: int8 GEMV, one sequential weight stream per thread, fp32 FMAs on exact
  int8 x bf16 products;
- ``int4 / gemv``: int4 GEMV with AVX512-BF16 ``vdpbf16ps`` (nibbles become bf16 ``128 + u``
  with one OR, the offset removed per group);
- ``int4 / amx``: the same decode feeding AMX ``tdpbf16ps`` tiles, all M rows per decoded tile.
  It is the first weight-only path that is near bf16 dense at prefill M (0.7-1.0x at M=128
  instead of 0.4-0.5x): the weight is decoded once per 256 rows, and the multiply-adds run on
  the AMX unit.
- ``int8 / amx``: an AMX GEMM with the operands' roles swapped (C^T = W x^T): the int8 rows
  become bf16 A tiles as they are (exact), x is packed once as B tiles, and the C tiles sum
  over the whole K (one per-channel scale at the end). From M=4 up it is 1.0-1.4x bf16 dense
  on the TinyLlama shapes, where the dequantize path was 0.4-0.8x.

- ``int8 / panel``, ``int4 / panel``: the prefill path where AMX is not there (the 2-core AMD
  EPYC VM: AVX512-BF16, no AMX): a bf16 GEMM on ``vdpbf16ps`` whose B operand is the weight
  decoded to bf16, 64 channels x 256 k at a time, once per call and used by every row from L1
  (6 rows x 64 channels of fp32 accumulators in registers). Its numbers are the dequant path's
  (the same bf16-rounded int4 weights; the int8 codes exactly, scaled after the sum) without
  writing and re-reading a bf16 copy of the weight.

Each native path falls back to the ATen / dequant path it replaced when the kernel is not
there (no compiler, ``OPTC_NATIVE=0``, a CPU without AVX512-BF16 or AMX).

Measured with ``python -m benchmarks.quant_kernels --ms 1,2,4,16,64,128,512,2048``: fp32
activations, 2 threads, on the 2-core Xeon VM (AVX-512, AMX), 2026-12-01. M <= 16 was
re-measured after the call-overhead fix. ``benchmarks/results/quant_kernels.md`` has every
cell. Wall ms, minimum of 5 interleaved rounds; GB/s is the weight bytes read per call::

    K->N         M   bf16 | int8pack  native  dequant | int4pack  gemv   amx  dequant (g128)
    2048->5632   1   0.95 |  0.51     0.36    -       |  0.41     0.29   0.31   -
                          |  (23 GB/s  32)            |  (15 GB/s 21)
    2048->32000  1   5.57 |  3.75     2.38    -       |  2.08     1.41   1.45   -
    2048->5632   16  1.46 |  5.39     3.81    4.67    |  5.35     4.57   1.42   6.04
    2048->5632   128 5.31 |  28.7     22.4    7.54    |  25.5     23.9   5.37   9.02
    2048->5632   512 19.6 |  109      88.3    24.1    |  99.6     95.6   18.7   20.1

The table (``CPU_PATHS``) picks per kind and M the path with the best median speed over the
TinyLlama shapes relative to dense bf16. Decode (M=1) on the DRAM-bound shapes:

- native int8 is 1.2-1.6x ``_weight_int8pack_mm``;
- the int4 GEMV is 1.4-1.5x ``_weight_int4pack_mm_for_cpu``, at 21-25 GB/s.

The int8 rows of both tables come from a later run with the int8 AMX GEMM
(``benchmarks/results/quant_kernels_int8_amx.md``, same command, 2026-12-01 22:50; its bf16
dense column moved by up to 1.7x against the earlier run's, so compare within a run). In it,
``int8 / amx`` against dense bf16 (min ms)::

    K->N         M=16        M=128       M=512       M=2048
    2048->2048   0.46/0.59   1.73/2.12   6.88/6.71   26.9/26.3
    2048->5632   1.02/1.46   4.75/5.55   17.2/20.2   76.6/38.1
    2048->32000  5.81/8.34   20.5/27.9   109/108     433/423

A focused interleaved re-run of M=512/2048 (4 rounds) read 0.82-1.18x dense bf16 on the
TinyLlama shapes (1.04x for 2048->5632 at M=2048).

Medians against dense fp32 / bf16 are in ``DENSE_RATIOS``. Weight-only int8 above M=128 is
0.98x bf16 dense up to 512 and 0.78x beyond, and int4 at M >= 128 is 0.66-0.71x;
``slower_than_dense`` reports both and
``optc inspect`` prints the note. W8A8 ``_int_mm`` (VNNI/AMX) is faster than
bf16 dense at M = 2..128. BFP: the two-plane int4 form (block 32) runs ATen's int4 kernel,
1.1x bf16 at M=1. Block 16 runs dequantize + bf16 GEMM, 0.06x dense at M=1, and is worth it for
its memory only.

Without AMX the other table (``CPU_PATHS_NO_AMX``, ``DENSE_RATIOS_NO_AMX``; ``cpu_tables``
picks by ``native.features()``) comes from the AMD EPYC VM, 2026-12-02: ``python -m
benchmarks.quant_kernels --shapes 2048x2048,2048x256,2048x5632,5632x2048 --ms
1,2,4,8,16,32,64,128,512,2048 --rounds 3 --out benchmarks/results/quant_kernels_epyc``. There
the int4 GEMV wins up to M=32 (it decodes once per 4 rows, but its decode is cheap on this
core), the panel GEMM from M=64 (int8: from M=16; ``_weight_int8pack_mm`` at M=2-8). With bf16
activations (a bf16 model's prefill; ``--dtypes bf16 --ms 128,512,2048``,
``quant_kernels_epyc_bf16.md``), min ms::

    K->N         M     bf16 | int8 panel  dequant | int4 panel  dequant (g128)
    2048->2048   128   1.51 |  1.40       1.80    |  1.30       2.06
    2048->5632   512   14.5 |  14.8       15.7    |  14.6       17.3
    5632->2048   512   14.7 |  14.9       15.6    |  14.0       17.6
    2048->5632   2048  56.4 |  57.4       58.6    |  54.6       63.2
    5632->2048   2048  56.9 |  58.7       58.0    |  55.8       70.3

so int4 prefill is 0.97-1.16x dense bf16 on these shapes and int8 0.94-1.08x (the dequant path
was 0.81-0.98x and 0.82-0.98x). The fp32-activation table's M=2048 ratios (0.84 / 0.89) are
lower: there the path writes an fp32 output, 46 MB at 2048x5632, freshly allocated per call
(``torch.empty(2048, 5632).fill_(1)`` alone took 13-18 ms here), where dense bf16 writes 23 MB.
This host's speed drifts up to 1.7x within minutes (the same panel call: 64 ms, then 110 ms):
compare within one run.

The Triton kernels are rendered from ``optc.codegen.templates.quant_gemm``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from optc import knobs
from optc.codegen.generator import (
    KernelOrigin, arg_list, fill, load_kernel, render, row_offset, sym, texpr,
)
from optc.codegen.templates import quant_gemm as T
from optc.ops import native
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


DEQUANT_ROWS = 512   # output channels dequantized at a time: ~1-2 MB of temporaries, cache-resident


_SCRATCH = threading.local()


def _scratch_bf16(*shape: int) -> Tensor:
    """A bf16 buffer of ``shape`` carved from one per-thread allocation that only grows: the
    dequantize-then-GEMM paths write a whole bf16 weight per call, and a fresh 23 MB tensor per
    call costs its page faults every time (measured on TinyLlama prefill at T=2048: int4
    dequant linears 4.3-5.9 s with fresh buffers). Callers bound the size
    (``DEQUANT_WHOLE_BYTES``); the result is dead once the GEMM that reads it returns, so
    never for an input that requires grad (autograd would keep it)."""
    numel = math.prod(shape)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=BF16)
    return buf[:numel].view(shape)


def int4_weight_t_bf16(w_int4: Tensor, scales_zeros: Tensor, group_size: int, k: int, *,
                       scratch: bool = False) -> Tensor:
    """The transposed (K, Np) bf16 weight of a tile-64 int4 tensor, ``(u - 8) s + z``: optc's
    native kernel (``optc.ops.native``, bit-identical, ~memory speed) when it is available,
    else :func:`int4_weight_t_bf16_torch`. ``scratch``: written into the per-thread scratch
    buffer (valid until the next scratch use on this thread)."""
    out = _scratch_bf16(k, w_int4.shape[0]) if scratch else None
    wt = native.int4_weight_t_bf16(w_int4, scales_zeros, group_size, k, out=out)
    return wt if wt is not None else int4_weight_t_bf16_torch(w_int4, scales_zeros, group_size, k)


def int4_weight_t_bf16_torch(w_int4: Tensor, scales_zeros: Tensor, group_size: int, k: int
                             ) -> Tensor:
    """The transposed (K, Np) bf16 weight of a tile-64 int4 tensor, ``(u - 8) s + z``, in torch.

    Per chunk of ``DEQUANT_ROWS`` output channels: nibbles into tile order (B, K, 64) uint8,
    ``u - 8`` by uint8 wrap-around read as int8 -> bf16 (exact) -> one same-dtype ``addcmul``
    with the stored bf16 scales and zeros (fp32 inside, one rounding, as the reference) -> a
    copy into the (K, Np) result. (Folding -8 s into the zero and rounding that to bf16 shifts
    whole groups coherently: 46 dB instead of 55 dB against the reference.) Measured (process CPU time, 2048x5632 g128, 2 threads, busy 2-core VM): 19 ms in
    chunks of 512 vs 136 ms for the same ops on the whole matrix at once (the temporaries then
    go through DRAM, and fresh multi-MB buffers page-fault); chunks of 128 were 46 ms. Also
    rejected: ``addcmul`` on uint8 (mixed dtypes leave the vectorized loop, ~4x slower),
    ``out=`` into strided views (~20x slower), a batched matmul over tiles (~8x slower),
    ``torch.compile`` of the same code (10-20 s to compile, not faster here).
    """
    np_ = w_int4.shape[0]
    ng = k // group_size
    s, z = scales_zeros[..., 0], scales_zeros[..., 1]                 # (K/g, Np) each
    out = torch.empty(k, np_, dtype=BF16, device=w_int4.device)
    for n0 in range(0, np_, DEQUANT_ROWS):
        n1 = min(n0 + DEQUANT_ROWS, np_)
        nb = (n1 - n0) // 64
        b = w_int4[n0:n1].view(nb, k, 32)
        u = torch.cat([b & 15, b >> 4], 2).sub_(8).view(torch.int8).to(BF16)  # W^T tiles
        s4, z4 = (t[:, n0:n1].reshape(ng, nb, 64).transpose(0, 1).unsqueeze(2).contiguous()
                  for t in (s, z))                                     # (nb, K/g, 1, 64)
        w = torch.addcmul(z4, u.view(nb, ng, group_size, 64), s4)      # (nb, K/g, g, 64)
        out[:, n0:n1].view(k, nb, 64).copy_(w.view(nb, k, 64).transpose(0, 1))
    return out


def bfp_weight_bf16(mantissa: Tensor, exponent: Tensor, block_size: int) -> Tensor:
    """m * 2^e as (N, K) bf16, exact (|m| <= 127 fits bf16's 8-bit significand).

    In chunks of ``DEQUANT_ROWS`` rows: an int8 -> bf16 cast (fast, vectorized) and an in-place
    multiply by the block's power of two (same dtype; a mixed int8 x bf16 multiply is not
    vectorized), into contiguous row slices of the result.
    """
    n, k = mantissa.shape
    scale = torch.ldexp(torch.ones((), dtype=BF16, device=mantissa.device),
                        exponent.to(BF16)).unsqueeze(-1)               # (N, K/B, 1)
    out = torch.empty(n, k, dtype=BF16, device=mantissa.device)
    for n0 in range(0, n, DEQUANT_ROWS):
        n1 = min(n0 + DEQUANT_ROWS, n)
        rows = out[n0:n1].view(n1 - n0, -1, block_size)
        rows.copy_(mantissa[n0:n1].view(n1 - n0, -1, block_size)).mul_(scale[n0:n1])
    return out


def quantize_rows(x2: Tensor) -> tuple[Tensor, Tensor]:
    """W8A8's run-time activation quantization: per row, symmetric int8, fp32 scale (M, 1)."""
    xf = x2.float()
    amax = xf.abs().amax(1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(xf / sx).clamp_(-127, 127).to(torch.int8), sx


# One function per (kind, path): (x2 (M, K) any float dtype, *format tensors, *ints) -> (M, >=n)
def _int8pack(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    return torch._weight_int8pack_mm(_bf16(x2), w, scales)


def _int8_dequant(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    # int8 is exact in bf16; scale after. The bf16 copy goes to the scratch buffer when it fits.
    wb = (_scratch_bf16(*w.shape).copy_(w) if 2 * w.numel() <= DEQUANT_WHOLE_BYTES
          and not x2.requires_grad else w.to(BF16))
    return F.linear(_bf16(x2), wb).mul_(scales)


def _int4pack(x2: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(_bf16(x2), w, group_size, sz)


DEQUANT_CHUNK_BYTES = 8 << 20    # chunk size when a W^T is dequantized in column chunks ...
DEQUANT_WHOLE_BYTES = 32 << 20   # ... which a W^T larger than this (in bf16) is


def _int4_dequant(x2: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """Dequantize to bf16 once per call, then oneDNN's bf16 GEMM. A weight larger than
    ``DEQUANT_WHOLE_BYTES`` in bf16 (an lm_head: 2048 x 32000 is 131 MB) goes in chunks of
    ``DEQUANT_CHUNK_BYTES`` through one reused buffer, each chunk's GEMM writing its columns of
    the result: a fresh 131 MB tensor costs ~50 ms of page faults, more than its dequantization.
    Measured (2 threads, quiet machine, native dequant): the whole 2048 x 32000 W^T at once
    74 ms (2.2 GB/s) vs 2.2 ms for a 23 MB 2048 x 5632 one (13 GB/s); lm_head at M=128: 69 ms
    chunked vs 170 ms with the torch dequantization. Smaller weights are not chunked: their
    whole-W^T path was faster (7.3 ms vs ~12 ms chunked at 2048 x 5632, M=128)."""
    k, np_ = x2.shape[1], w.shape[0]
    xb = _bf16(x2)
    if 2 * k * np_ > DEQUANT_WHOLE_BYTES:
        y = _int4_dequant_chunked(xb, w, sz, group_size)
        if y is not None:
            return y
    # autograd would keep the weight for backward: only a graph-free call may use the scratch
    return torch.mm(xb, int4_weight_t_bf16(w, sz, group_size, k, scratch=not x2.requires_grad))


def _int4_dequant_chunked(xb: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor | None:
    """``_int4_dequant`` column chunk by column chunk (native kernel only; None without it)."""
    if native.library() is None:
        return None
    k, np_ = xb.shape[1], w.shape[0]
    cols = max(64, DEQUANT_CHUNK_BYTES // (2 * k) // 64 * 64)
    y = torch.empty(xb.shape[0], np_, dtype=BF16)
    buf = torch.empty(k, cols, dtype=BF16)
    for n0 in range(0, np_, cols):
        wt = native.int4_weight_t_bf16(w, sz, group_size, k, cols=(n0, min(n0 + cols, np_)), out=buf)
        if wt is None:
            return None
        torch.mm(xb, wt, out=y[:, n0:n0 + wt.shape[1]])
    return y


# optc's native kernels (optc.ops.native, gemv.cpp) straight from the packed weights. Each falls
# back, when the kernel is unavailable (no compiler, OPTC_NATIVE=0, a CPU without AVX512-BF16 /
# AMX), to what the decision table chose before these kernels existed (its earlier
# quant_kernels run: int8pack for M <= 4, int4pack for M <= 16, else dequant).
def _int8_native(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    y = native.int8_matmul(_bf16(x2), w, scales, x2.dtype)
    if y is not None:
        return y
    return (_int8pack if x2.shape[0] <= 4 and x2.shape[1] % 16 == 0 else _int8_dequant)(x2, w, scales)


def _int8_amx(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    y = native.int8_matmul(_bf16(x2), w, scales, x2.dtype, amx=True)
    return y if y is not None else _int8_native(x2, w, scales) if x2.shape[0] <= 16 \
        else _int8_dequant(x2, w, scales)


def _int4_gemv(x2: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor:
    y = native.int4_matmul(_bf16(x2), w, sz, group_size, w.shape[0], x2.dtype, amx=False)
    return y if y is not None else _int4pack(x2, w, sz, group_size)


def _int4_amx(x2: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor:
    y = native.int4_matmul(_bf16(x2), w, sz, group_size, w.shape[0], x2.dtype, amx=True)
    if y is not None:
        return y
    return (_int4_gemv if x2.shape[0] <= 2 else _int4pack if x2.shape[0] <= 16 else _int4_dequant)(
        x2, w, sz, group_size)


def _int4_panel(x2: Tensor, w: Tensor, sz: Tensor, group_size: int) -> Tensor:
    y = native.panel_matmul("int4", _bf16(x2), w, sz, group_size, w.shape[0], x2.dtype)
    return y if y is not None else _int4_dequant(x2, w, sz, group_size)


def _int8_panel(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    y = native.panel_matmul("int8", _bf16(x2), w, scales, 0, w.shape[0], x2.dtype)
    return y if y is not None else _int8_native(x2, w, scales) if x2.shape[0] <= 16 \
        else _int8_dequant(x2, w, scales)


def _w8a8_int_mm(x2: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    xq, sx = quantize_rows(x2)
    acc = torch._int_mm(xq, w.t())           # (M, N) int32, exact; the (N, K) .t() is fastest
    return acc.float().mul_(sx).mul_(scales.float())


def _bfp_planes(x2: Tensor, w: Tensor, sz: Tensor, index: Tensor, block_size: int) -> Tensor:
    # one gather permutes x and repeats it once per plane
    return torch._weight_int4pack_mm_for_cpu(_bf16(x2).index_select(1, index), w, block_size, sz)


def _bfp_planes_dequant(x2: Tensor, w: Tensor, sz: Tensor, index: Tensor, block_size: int
                        ) -> Tensor:
    k = x2.shape[1]
    wt = int4_weight_t_bf16(w, sz, block_size, index.numel())          # (P*K, Np), planes
    if wt.shape[0] != k:                                               # two planes: 16 h + l
        wt = wt[:k].add_(wt[k:])                                       # exact: |m| <= 127
    return torch.mm(_bf16(x2).index_select(1, index[:k]), wt)


def _bfp_dequant(x2: Tensor, m: Tensor, e: Tensor, perm: Tensor, block_size: int) -> Tensor:
    return F.linear(_bf16(x2).index_select(1, perm), bfp_weight_bf16(m, e, block_size))


CPU_IMPLS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "int8": {"int8pack": _int8pack, "dequant": _int8_dequant, "native": _int8_native,
             "amx": _int8_amx, "panel": _int8_panel},
    "int4": {"int4pack": _int4pack, "dequant": _int4_dequant, "gemv": _int4_gemv,
             "amx": _int4_amx, "panel": _int4_panel},
    "w8a8": {"int_mm": _w8a8_int_mm},
    "bfp_planes": {"int4pack": _bfp_planes, "dequant": _bfp_planes_dequant},
    "bfp_blocks": {"dequant": _bfp_dequant},
}

# Decision table: kind -> ((largest M, path), ...), first match wins. Generated by
# ``python -m benchmarks.quant_kernels --table`` from its results (module docstring).
CPU_PATHS: dict[str, tuple[tuple[int, str], ...]] = {
    "int8": ((2, "native"), (1 << 62, "amx")),
    "int4": ((1, "gemv"), (512, "amx"), (1 << 62, "dequant")),
    "w8a8": ((1 << 62, "int_mm"),),
    "bfp_planes": ((16, "int4pack"), (1 << 62, "dequant")),
    "bfp_blocks": ((1 << 62, "dequant"),),
}
# kind -> ((largest M, dense fp32 time / path time, dense bf16 time / path time), ...) for the
# path CPU_PATHS picks: median over the TinyLlama-1.1B linear shapes. Below 1: slower than the
# unquantized linear of that dtype, reported by ``slower_than_dense`` (and ``optc inspect``).
DENSE_RATIOS: dict[str, tuple[tuple[int, float, float], ...]] = {
    "int8": ((1, 2.70, 3.32), (2, 1.60, 1.83), (4, 2.18, 1.27), (16, 3.68, 1.28), (64, 3.52, 1.32),
             (128, 3.38, 1.17), (512, 3.16, 0.98), (1 << 62, 2.84, 0.78)),
    "int4": ((1, 3.08, 3.13), (2, 2.76, 2.97), (4, 4.92, 2.65), (16, 5.50, 1.77), (64, 2.85, 0.97),
             (128, 2.58, 0.71), (512, 2.33, 0.66), (1 << 62, 4.20, 0.77)),
    "w8a8": ((1, 1.46, 1.36), (2, 1.43, 1.51), (4, 2.79, 1.51), (16, 4.22, 1.38), (64, 3.99, 1.35),
             (128, 3.88, 1.01), (512, 3.31, 0.89), (1 << 62, 3.37, 0.65)),
    "bfp_planes": ((1, 1.09, 1.13), (2, 0.86, 0.85), (4, 1.17, 0.62), (16, 0.55, 0.18),
                   (64, 0.34, 0.15), (128, 0.44, 0.12), (512, 1.10, 0.27), (1 << 62, 2.08, 0.36)),
    "bfp_blocks": ((1, 0.06, 0.06), (2, 0.06, 0.07), (4, 0.12, 0.07), (16, 0.19, 0.07),
                   (64, 0.33, 0.11), (128, 0.49, 0.11), (512, 1.04, 0.26), (1 << 62, 2.01, 0.33)),
}


# The same tables measured on the 2-core AMD EPYC VM (AVX-512 with AVX512-BF16, no AMX), where
# the AMX paths do not exist and their fallbacks lose to the AVX512-BF16 panel GEMM (``panel``)
# from M of a few dozen up (``benchmarks/results/quant_kernels_epyc.md``, module docstring).
CPU_PATHS_NO_AMX: dict[str, tuple[tuple[int, str], ...]] = {
    "int8": ((1, "native"), (8, "int8pack"), (1 << 62, "panel")),
    "int4": ((32, "gemv"), (1 << 62, "panel")),
    "w8a8": ((1 << 62, "int_mm"),),
    "bfp_planes": ((32, "int4pack"), (1 << 62, "dequant")),
    "bfp_blocks": ((1 << 62, "dequant"),),
}
DENSE_RATIOS_NO_AMX: dict[str, tuple[tuple[int, float, float], ...]] = {
    "int8": ((1, 10.58, 3.90), (2, 11.90, 2.20), (4, 8.10, 1.58), (8, 3.67, 1.15), (16, 4.79, 1.13),
             (32, 4.27, 1.08), (64, 4.30, 1.00), (128, 4.29, 0.98), (512, 4.33, 0.94),
             (1 << 62, 3.95, 0.84)),
    "int4": ((1, 16.22, 6.01), (2, 22.62, 4.19), (4, 21.08, 3.92), (8, 10.07, 2.61),
             (16, 7.47, 1.71), (32, 5.37, 1.29), (64, 4.97, 1.13), (128, 4.76, 1.07),
             (512, 4.52, 0.99), (1 << 62, 4.30, 0.89)),
    "w8a8": ((1, 7.15, 2.72), (2, 5.58, 0.99), (4, 5.41, 0.87), (8, 3.71, 0.91), (16, 4.35, 1.03),
             (32, 4.81, 1.14), (64, 5.52, 1.29), (128, 6.30, 1.41), (512, 6.34, 1.38),
             (1 << 62, 3.42, 0.70)),
    "bfp_planes": ((1, 3.80, 1.43), (2, 5.58, 1.03), (4, 3.89, 0.76), (8, 1.63, 0.43),
                   (16, 1.23, 0.29), (32, 0.94, 0.22), (64, 0.89, 0.22), (128, 1.61, 0.37),
                   (512, 1.61, 0.36), (1 << 62, 2.57, 0.53)),
    "bfp_blocks": ((1, 0.13, 0.05), (2, 0.25, 0.06), (4, 0.25, 0.06), (8, 0.20, 0.06),
                   (16, 0.28, 0.08), (32, 0.40, 0.09), (64, 0.62, 0.14), (128, 0.93, 0.21),
                   (512, 1.90, 0.41), (1 << 62, 2.63, 0.59)),
}


def cpu_tables() -> tuple[dict[str, tuple[tuple[int, str], ...]],
                          dict[str, tuple[tuple[int, float, float], ...]]]:
    """(decision table, dense ratios) measured on a machine like this one: with AMX (the Xeon
    runs: ``CPU_PATHS``, ``DENSE_RATIOS``) or without (``CPU_PATHS_NO_AMX``, ...). Which path
    wins differs between the two by up to 4x at prefill M."""
    if native.features() & native.AMX:
        return CPU_PATHS, DENSE_RATIOS
    return CPU_PATHS_NO_AMX, DENSE_RATIOS_NO_AMX


def slower_than_dense(kind: str, m: int, dtype: torch.dtype) -> str | None:
    """A note when the CPU path for (kind, M) was measured slower than dense ``F.linear`` in
    ``dtype`` (fp32 models compare with fp32, half-precision ones with bf16), else None."""
    paths, dense_ratios = cpu_tables()
    max_m, r32, r16 = next(r for r in dense_ratios[kind] if m <= r[0])
    dense, ratio = ("fp32", r32) if dtype == torch.float32 else ("bf16", r16)
    if ratio >= 1:
        return None
    path = next(p for bound, p in paths[kind] if m <= bound)
    return (f"{kind} at M={m} ({path} path) runs at {ratio:.2f}x the speed of {dense} "
            f"F.linear: slower than dense (measured by benchmarks/quant_kernels.py)")


def cpu_path(kind: str, m: int, k: int) -> str:
    """The CPU path for one call: the decision table, then the kernels' shape limits."""
    path = next(p for max_m, p in cpu_tables()[0][kind] if m <= max_m)
    if path == "int8pack" and k % 16:
        return "dequant"          # _weight_int8pack_mm reads garbage unless K % 16 == 0
    return path


def describe_cpu_node(node: Any, kind: str | None = None) -> str:
    """The CPU path an FX node of one of these ops runs, and whether it is slower than dense
    (for ``optc inspect``): exact for a static M, every bucket for a symbolic one. ``kind``:
    the weights' format where the op's name does not say it (``optc.ops.quant_group``)."""
    kind = kind or node.target._opname.removeprefix("linear_")
    if kind == "bfp":
        kind = "bfp_planes" if node.args[-2] else "bfp_blocks"
    x = node.args[0].meta.get("val")
    if not isinstance(x, Tensor):
        return f"{kind}: unknown input"
    if not any(isinstance(d, torch.SymInt) for d in x.shape):
        k = int(x.shape[-1])
        m = x.numel() // max(k, 1)
        note = slower_than_dense(kind, m, x.dtype)
        path = cpu_path(kind, m, k)
        return f"M={m}: {path} path" + (f"; {note}" if note else "") + _native_note(kind, {path})
    paths, dense_ratios = cpu_tables()
    parts = [f"M<={b}: {p}" if b < 1 << 62 else p for b, p in paths[kind]]
    slow = [str(b) if b < 1 << 62 else "larger" for b, *_ in dense_ratios[kind]
            if slower_than_dense(kind, b, x.dtype)]
    return "symbolic M: " + ", else ".join(parts) + (
        f"; slower than dense at M in buckets {', '.join(slow)}" if slow else "") + _native_note(
        kind, {p for _, p in paths[kind]})


def _native_note(kind: str, paths: set[str]) -> str:
    """Whether the native kernels behind these paths run here, or what runs instead."""
    notes = []
    if paths & {"native", "gemv", "amx", "panel"}:
        feats = native.features()
        need = {"native": native.INT8_GEMV, "gemv": native.INT4_GEMV, "amx": native.AMX,
                "panel": native.INT4_GEMV}
        missing = sorted(p for p in paths & need.keys() if not feats & need[p])
        if missing:
            st = native.status()
            notes.append(f"native {'/'.join(missing)} kernel unavailable here ({st['state']}: "
                         f"{st.get('reason', '')[:120]}), its ATen/dequant fallback runs")
        else:
            notes.append("native C++ kernel")
    if kind in ("int4", "bfp_planes") and "dequant" in paths:
        if native.library() is not None:
            notes.append("int4 dequantization: native C++ kernel")
        else:
            st = native.status()
            notes.append(f"int4 dequantization: torch ops (native kernel {st['state']}: "
                         f"{st.get('reason', '')})")
    return "".join(f"; {n}" for n in notes)


def kind_of(q: fmt.QuantizedWeight) -> str:
    return "bfp_" + q.layout if q.scheme.mode == "bfp" else q.scheme.mode


def run_cpu_path(q: fmt.QuantizedWeight, x: Tensor, bias: Tensor | None,
                 path: str | None = None) -> Tensor:
    """The op's CPU computation with an explicit path (benchmarks, tests); None: the table's."""
    op, names, trailing = fmt.linear_call(q, bias)
    kind = kind_of(q)
    x2 = _rows(x)
    path = path or cpu_path(kind, x2.shape[0], x2.shape[1])
    ints = trailing[:1] if kind in ("int4", "bfp_planes", "bfp_blocks") else ()
    y = CPU_IMPLS[kind][path](x2, *[q.tensors[n] for n in names], *ints)
    return _finish(y, x, bias, q.shape[0])


# The decode path: M <= 16 with no bias goes straight to the native kernel, which takes x as it
# is and returns (..., N) (no reshapes, no copies); each torch call in between costs 2-4 us on
# this machine and there are ~150 of these per token.
def linear_int8_cpu(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None and (x.dtype == BF16 or x.dtype == torch.float32):
        k = x.shape[-1]
        path = cpu_path("int8", x.numel() // k, k) if k else ""
        if path == "native" or path == "panel":
            xb = x if x.dtype == BF16 else x.to(BF16)
            if path == "panel":
                y = native.panel_matmul("int8", xb, w_int8, scales, 0, w_int8.shape[0], x.dtype)
            else:
                y = native.int8_matmul(xb, w_int8, scales, x.dtype)
            if y is not None:
                return y
    x2 = _rows(x)
    y = CPU_IMPLS["int8"][cpu_path("int8", x2.shape[0], x2.shape[1])](x2, w_int8, scales)
    return _finish(y, x, bias, w_int8.shape[0])


def linear_int4_cpu(x: Tensor, w_int4: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                    group_size: int, n: int) -> Tensor:
    if bias is None and (x.dtype == BF16 or x.dtype == torch.float32):
        k = x.shape[-1]
        path = cpu_path("int4", x.numel() // k, k) if k else ""
        if path == "gemv" or path == "amx" or path == "panel":
            xb = x if x.dtype == BF16 else x.to(BF16)
            if path == "panel":
                y = native.panel_matmul("int4", xb, w_int4, scales_zeros, group_size, n, x.dtype)
            else:
                y = native.int4_matmul(xb, w_int4, scales_zeros, group_size, n, x.dtype,
                                       amx=path == "amx")
            if y is not None:
                return y
    x2 = _rows(x)
    y = CPU_IMPLS["int4"][cpu_path("int4", x2.shape[0], x2.shape[1])](
        x2, w_int4, scales_zeros, group_size)
    return _finish(y, x, bias, n)


def linear_w8a8_cpu(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    x2 = _rows(x)
    return _finish(_w8a8_int_mm(x2, w_int8, scales), x, bias, w_int8.shape[0])


def linear_bfp_cpu(x: Tensor, w: Tensor, scales: Tensor, index: Tensor, bias: Tensor | None,
                   block_size: int, planes: int, n: int) -> Tensor:
    x2 = _rows(x)
    kind = "bfp_planes" if planes else "bfp_blocks"
    y = CPU_IMPLS[kind][cpu_path(kind, x2.shape[0], x2.shape[1])](x2, w, scales, index, block_size)
    return _finish(y, x, bias, n)


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


# ---- Triton --------------------------------------------------------------------------------

TRITON_KINDS = ("int8", "int4", "w8a8", "bfp")


@dataclass(frozen=True)
class QuantGemmSpec:
    """One kernel variant: the weight format (bias is a constexpr switch inside)."""

    kind: str   # "int8" | "int4" | "w8a8" | "bfp" (blocks layout)

    def __post_init__(self) -> None:
        assert self.kind in TRITON_KINDS, self.kind

    @property
    def name(self) -> str:
        return f"linear_{self.kind}"


# Explicit launch configs per M bucket (no autotune: it does not run under the interpreter,
# and a fixed table keeps the kernel cache key stable): (largest M, BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages). Decode (M <= 16) uses the smallest tile tl.dot allows, so one M-tile
# covers the batch and each weight byte is read once; prefill uses large square tiles.
TRITON_CONFIGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (16, 16, 64, 128, 4, 3),
    (64, 64, 64, 64, 4, 3),
    (1 << 62, 128, 128, 64, 8, 3),
)


def triton_config(kind: str, m: int, group: int) -> dict[str, int]:
    _, bm, bn, bk, warps, stages = next(c for c in TRITON_CONFIGS if m <= c[0])
    if kind == "int4":
        bk = min(bk, group)        # a K step must stay inside one group
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
            "num_stages": stages}


def _tile(name: str, axis: int) -> sympy.Symbol:
    """A 1-D index vector broadcast along one axis of a 2-D tile: rm[:, None], rn[None, :]."""
    return sym(f"{name}[:, None]" if axis == 0 else f"{name}[None, :]")


@lru_cache(maxsize=None)
def kernel_source(spec: QuantGemmSpec, origin: KernelOrigin | None = None) -> str:
    """The generated module for ``spec``; its entry point is ``f"{spec.name}_kernel"``."""
    origin = origin or KernelOrigin(spec.name, pass_name="(direct call)")
    rm, rn_row = _tile("rm", 0), _tile("rn", 1)
    rk_row, rk_col = _tile("rk", 1), _tile("rk", 0)
    k = sym("K")
    x_offset = texpr(row_offset(rm, sym("stride_xm"), rk_row))
    w_rowmajor = texpr(row_offset(rn_row, k, rk_col))            # (N, K) weight, (K, N) tile
    load_x = fill(T.LOAD_X, x_offset=x_offset)
    dims = ["M", "N", "K", "stride_xm", "stride_ym"]
    if spec.kind == "int8":
        pointers = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr"]
        load_w, epilogue = fill(T.LOAD_W_INT8, w_offset=w_rowmajor), T.EPILOGUE_SCALE
    elif spec.kind == "w8a8":
        pointers = ["x_ptr", "sx_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr"]
        load_w, epilogue = fill(T.LOAD_W_INT8, w_offset=w_rowmajor), T.EPILOGUE_W8A8
    elif spec.kind == "int4":
        pointers = ["x_ptr", "w_ptr", "sz_ptr", "b_ptr", "y_ptr"]
        dims.append("stride_sz_g")
        tile = sympy.floor(rn_row / fmt.TILE_N) * 32 * k + 32 * rk_col + sympy.Mod(rn_row, 32)
        load_w, epilogue = fill(T.LOAD_W_INT4, w_offset=texpr(tile)), T.EPILOGUE_NONE
    else:
        pointers = ["x_ptr", "w_ptr", "e_ptr", "perm_ptr", "b_ptr", "y_ptr"]
        load_x = fill(T.LOAD_X_PERM, x_offset=texpr(row_offset(rm, sym("stride_xm"),
                                                                _tile("kp", 1))))
        e_offset = texpr(rn_row * sympy.floor(k / sym("GROUP")) + sympy.floor(rk_col / sym("GROUP")))
        load_w = fill(T.LOAD_W_BFP, w_offset=w_rowmajor, e_offset=e_offset)
        epilogue = T.EPILOGUE_NONE
    return render("quant_gemm", origin=origin, params=dict(
        entry=f"{spec.name}_kernel",
        pointers=arg_list(pointers),
        dimensions=arg_list(dims),
        acc_dtype="tl.int32" if spec.kind == "w8a8" else "tl.float32",
        load_x=load_x,
        load_w=load_w,
        dot=T.DOT_INT8 if spec.kind == "w8a8" else T.DOT_FLOAT,
        epilogue=epilogue,
        y_offset=texpr(row_offset(rm, sym("stride_ym"), rn_row)),
    ))


def _device_of(*tensors: Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"optc Triton quantized linear: operands on {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not knobs.TRITON_INTERPRET.get():
        raise ValueError(f"optc Triton quantized linear: needs CUDA tensors, got {device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    return device


def launch_quant_gemm(kind: str, x: Tensor, weights: tuple[Tensor, ...], bias: Tensor | None,
                      group: int, n: int, *, config: dict[str, int] | None = None,
                      origin: KernelOrigin | None = None) -> Tensor:
    """Check -> allocate -> launch the ``kind`` kernel; ``weights`` in the op's order."""
    import triton

    device = _device_of(x, bias, *weights)
    if not x.is_floating_point():
        raise ValueError(f"optc Triton quantized linear: x must be floating point, got {x.dtype}")
    x2 = _rows(x)
    m, k = x2.shape
    y = torch.empty((m, n), dtype=x.dtype, device=device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    cfg = dict(config or triton_config(kind, m, group))
    interp = knobs.TRITON_INTERPRET.get()
    if kind == "w8a8":
        xq, sx = quantize_rows(x2)
        ptrs: list[Tensor] = [xq, sx.reshape(-1).contiguous(), *weights]
    else:
        ptrs = [x2, *weights]
    ptrs += [bias if bias is not None else y, y]
    dims = [m, n, k, x2.stride(0), y.stride(0)]
    if kind == "int4":
        dims.append(weights[1].stride(0))
    kernel = load_kernel(kernel_source(QuantGemmSpec(kind), origin), f"linear_{kind}_kernel")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    kernel[grid](*ptrs, *dims, HAS_BIAS=bias is not None,
                 DOT_FP32=interp or x.dtype == torch.float32, GROUP=group, **cfg)
    return y.view(*x.shape[:-1], n)


def linear_int8_triton(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return launch_quant_gemm("int8", x, (w_int8, scales), bias, 1, w_int8.shape[0])


def linear_int4_triton(x: Tensor, w_int4: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                       group_size: int, n: int) -> Tensor:
    return launch_quant_gemm("int4", x, (w_int4, scales_zeros), bias, group_size, n)


def linear_w8a8_triton(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return launch_quant_gemm("w8a8", x, (w_int8, scales), bias, 1, w_int8.shape[0])


def linear_bfp_triton(x: Tensor, w: Tensor, scales: Tensor, index: Tensor, bias: Tensor | None,
                      block_size: int, planes: int, n: int) -> Tensor:
    if planes:
        raise fmt.QuantFormatError(
            "optc::linear_bfp on Triton reads the 'blocks' layout; this weight is in the CPU "
            "'planes' layout: quantize it with layout='blocks' (or on the CUDA device)")
    return launch_quant_gemm("bfp", x, (w, scales, index), bias, block_size, n)


# ---- per-node specialization (OpDef.specialize) -----------------------------------------------

def _specialize_gemv(kind: str, cpu: Callable[..., Tensor], w: Any, aux: Any, bias: Any,
                     group_size: int, n: int) -> Callable[..., Tensor] | None:
    """For a node whose packed weight is a constant, no bias, and whose table picks the native
    GEMV at M=1: a callable that sends one-row bf16 calls straight to a bound kernel
    (``native.gemv_bound``) and everything else to ``cpu``, the general function."""
    if not (isinstance(w, Tensor) and isinstance(aux, Tensor)) or bias is not None:
        return None
    if cpu_path(kind, 1, w.shape[1] * (2 if kind == "int4" else 1)) != \
            ("gemv" if kind == "int4" else "native"):
        return None
    fast = native.gemv_bound(kind, w, aux, group_size, n)
    if fast is None:
        return None

    def run(x: Tensor, *rest: Any) -> Tensor:
        y = fast(x) if rest[0] is w and rest[1] is aux else None
        return y if y is not None else cpu(x, *rest)
    run.__name__ = run.__qualname__ = f"{cpu.__name__}_bound"
    run.__module__ = cpu.__module__
    return run


def specialize_linear_int8(x: Any, w_int8: Any, scales: Any, bias: Any) -> Callable | None:
    return _specialize_gemv("int8", linear_int8_cpu, w_int8, scales, bias, 0,
                            w_int8.shape[0] if isinstance(w_int8, Tensor) else 0)


def specialize_linear_int4(x: Any, w_int4: Any, scales_zeros: Any, bias: Any, group_size: int,
                           n: int) -> Callable | None:
    return _specialize_gemv("int4", linear_int4_cpu, w_int4, scales_zeros, bias, group_size, n)


# ---- registration ---------------------------------------------------------------------------

LINEAR_INT8 = define(
    "linear_int8", cpu=linear_int8_cpu, fake=linear_int8_fake, triton=linear_int8_triton,
    summary="y = x @ (q * s).T + b; int8 weight, per-channel scale",
    specialize=specialize_linear_int8)
LINEAR_INT4 = define(
    "linear_int4", cpu=linear_int4_cpu, fake=linear_int4_fake, triton=linear_int4_triton,
    summary="y = x @ ((q - 8) s + z).T + b; int4 weight, group scale + zero",
    specialize=specialize_linear_int4)
LINEAR_W8A8 = define(
    "linear_w8a8", cpu=linear_w8a8_cpu, fake=linear_w8a8_fake, triton=linear_w8a8_triton,
    summary="y = (q8(x) @ q.T) sx s + b; int8 x int8 -> int32, per-token sx")
LINEAR_BFP = define(
    "linear_bfp", cpu=linear_bfp_cpu, fake=linear_bfp_fake, triton=linear_bfp_triton,
    summary="y = x[..., perm] @ (m 2^e).T + b; block floating point weight")

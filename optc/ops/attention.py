"""Exact attention as one op: ``optc::attention``, its CPU path, its FlashAttention-2 Triton
kernel, and the flash-decoding entry point ``decode_attention``.

    optc::attention(q, k, v, mask?, causal, scale, kv_group) -> out

Layout (the contract of the pass, the fake, and every implementation):
  * ``q`` (B, H, Tq, D); ``k`` (B, H_kv, Tk, D); ``v`` (B, H_kv, Tk, Dv); any strides.
  * GQA: ``H = H_kv * kv_group``; query head ``h`` reads K/V head ``h // kv_group`` (the order
    of HF's ``repeat_kv`` and of ``repeat_interleave(kv_group, dim=1)``). K/V are passed
    un-repeated.
  * ``mask``: None, bool (True = attend) or float (added to the scaled scores), broadcastable
    to (B, H, Tq, Tk). ``causal``: row i sees keys j <= i (top-left aligned, SDPA's
    ``is_causal``); with a mask too, a key must pass both.
  * ``out`` (B, H, Tq, Dv) in q's dtype with q's memory layout (``empty_like(q)``, as ATen's
    CPU flash kernel and its meta function do).
Numerics: ``softmax(scale * q @ k^T + mask) @ v`` with fp32 accumulation (exact attention, not
an approximation); low-precision inputs differ from eager's unfused chain only by where that
chain rounds to bf16/fp16. A row with no visible key (all masked) has no defined value: the
flash paths (ATen's CPU kernel, the Triton kernels) give 0, the unfused path NaN as eager does.

CPU implementation: ATen's flash kernel (``F.scaled_dot_product_attention`` dispatches to
``_scaled_dot_product_flash_attention_for_cpu``: blocked online softmax, GQA without repeating
K/V), chosen over the unfused chain (matmul, softmax, matmul) by this measurement (``python
-m benchmarks.attention --cpu-paths``; B=1, H=8, D=64, H_kv=8, "gqa" H_kv=2; q/k/v as (B, T, H,
D) projections viewed as (B, H, T, D); CPU time of one thread, min of 3 interleaved rounds x 3
calls, so other tenants of this shared 2-core VM do not count; ms; causal/gqa are causal
prefill, "mask" a random bool mask, "decode" Tq=1 against Tk keys with a bool mask)::

                          T=16      64     128     256     512    1024    2048
    fp32  causal  flash      0.024   0.115   0.384   1.355   5.308  15.011  50.138
    fp32  causal  unfused    0.076   0.186   0.578   3.504  14.642  62.849 262.639
    fp32  gqa     flash      0.021   0.137   0.443   1.466   5.117  14.441  47.570
    fp32  gqa     unfused    0.053   0.223   0.638   2.516   9.984  66.848 266.458
    fp32  mask    flash      0.028   0.127   0.538   1.866   6.727  25.258 103.620
    fp32  mask    unfused    0.051   0.193   0.942   3.531  20.715  93.994 322.881
    fp32  decode  flash      0.016   0.021   0.027   0.040   0.092   0.244   0.574
    fp32  decode  unfused    0.038   0.044   0.051   0.062   0.136   0.295   0.635
    bf16  causal  flash      0.036   0.092   0.217   0.698   2.180   6.575  20.294
    bf16  causal  unfused    0.116   0.215   0.670   1.658   5.391  31.148 145.420
    bf16  gqa     flash      0.031   0.075   0.206   0.689   2.019   5.993  19.855
    bf16  gqa     unfused    0.119   0.186   0.497   1.550   5.548  35.628 148.292
    bf16  mask    flash      0.041   0.090   0.307   0.975   3.139  12.931  72.240
    bf16  mask    unfused    0.118   0.211   0.781   2.753  10.049  53.920 290.068
    bf16  decode  flash      0.045   0.061   0.053   0.084   0.106   0.241   0.454
    bf16  decode  unfused    0.204   0.274   0.346   0.554   0.970   1.673   4.630

The flash kernel is fastest in every case, by 1.1-5.6x in fp32 and 2.2-10x in bf16 (the
unfused chain writes and re-reads a (Tq, Tk) score matrix per head), so it is the CPU path for every
dtype and shape; ``--cpu-paths --threads 2 --wall`` (2 threads, wall clock, machine busy)
ordered them the same but for one cell within noise (fp32 causal T=128: 0.45 vs 0.39 ms, where
CPU time says 0.38 vs 0.58). FACTS.md's earlier "bf16 unfused as fast or faster at T=1024"
did not reproduce (6.6 vs 31 ms causal, 12.9 vs 54 ms masked). The unfused path stays in
``CPU_PATHS`` as the measured alternative and the second implementation the tests compare.

Decode (one query row): ``optc.ops.native.attention`` (decode.cpp; it takes up to
``native.DECODE_MAX_TQ`` = 16 rows, tested so) first. It reads each key once for a whole GQA group (16 keys across the lanes,
vdpbf16ps on bf16 pairs), keeps fp32 probabilities (ATen's flash kernel rounds them to bf16
before the second product), and has no blocking set-up. TinyLlama's decode shape, 32 heads over
4 K/V heads, 256 keys, D=64, bf16, 1 thread: 46-62 us against ATen flash's 80-117 us, same
process, interleaved (/tmp micro-benchmark, noisy host). Inside a decode step it went from
171-183 to 120-130 us a call. Longer queries, fp16, head sizes above 256, odd bf16 head sizes,
strided head dimensions, and autograd go to ATen's kernel as before.

The Triton implementation renders ``optc.codegen.templates.attention`` (FlashAttention-2
forward: grid (query blocks, B*H), online softmax, causal block skipping, GQA head mapping,
masked tails, bool/additive masks, fp32/fp16/bf16 with fp32 accumulation, returns the
log-sum-exp) and, for a few query tokens against many keys, ``attention_decode``
(flash-decoding: keys split across programs, partial results merged by their LSE).
``decode_attention`` is that decode path as a plain function for the KV-cache runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from optc import knobs
from optc.codegen.generator import KernelOrigin, fill, load_kernel, render
from optc.codegen.templates import attention as T
from optc.codegen.templates import attention_decode as TD
from optc.ops import native
from optc.ops.registry import define


# ---- shapes and checks -----------------------------------------------------------------------

def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kv_group: int) -> None:
    """Operands follow the layout contract above; a clear error otherwise. Plain size
    comparisons: this runs on every call of the CPU path (a few microseconds matter when
    decoding one token)."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(f"optc.attention: q, k, v must be 4-D (B, H, T, D), got "
                         f"{tuple(qs)}, {tuple(ks)}, {tuple(vs)}")
    if kv_group < 1 or qs[1] != ks[1] * kv_group:
        raise ValueError(f"optc.attention: q has {qs[1]} heads but k has {ks[1]} and kv_group="
                         f"{kv_group}; need H = H_kv * kv_group")
    if ks[0] != qs[0] or vs[0] != qs[0] or vs[1] != ks[1] or vs[2] != ks[2] or ks[3] != qs[3]:
        raise ValueError(f"optc.attention: k {tuple(ks)} / v {tuple(vs)} do not fit "
                         f"q {tuple(qs)} (want k (B, H_kv, Tk, D), v (B, H_kv, Tk, Dv))")
    if mask is not None:
        full = (qs[0], qs[1], qs[2], ks[2])
        ms = mask.shape
        if len(ms) > 4 or any(m != 1 and m != f for m, f in zip(reversed(ms), reversed(full))):
            raise ValueError(f"optc.attention: mask {tuple(ms)} does not broadcast to "
                             f"(B, H, Tq, Tk) = {full}")


def causal_pairs(tq: Any, tk: Any) -> Any:
    """(query, key) pairs a top-left causal mask keeps: sum over rows i of min(i + 1, tk).
    Works on ints and sympy expressions (the cost model's symbolic sizes)."""
    if isinstance(tq, int) and isinstance(tk, int):
        m = min(tq, tk)
        return m * (m + 1) // 2 + (tq - m) * tk
    if sympy.simplify(sympy.sympify(tq) - tk) == 0:
        return tq * (tq + 1) / 2
    m = sympy.Min(tq, tk)
    return m * (m + 1) / 2 + (tq - m) * tk


def attention_flops(B: Any, H: Any, tq: Any, tk: Any, d: Any, dv: Any, causal: bool) -> Any:
    """Multiply-adds x 2 of the two products q @ k^T and p @ v over the visible pairs."""
    pairs = causal_pairs(tq, tk) if causal else tq * tk
    return 2 * B * H * pairs * (d + dv)


# ---- CPU -------------------------------------------------------------------------------------

def _with_causal(mask: Tensor, tq: int, tk: int) -> Tensor:
    keep = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril_()
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float,
               kv_group: int) -> Tensor:
    """ATen's CPU flash kernel through SDPA (which turns a bool mask into an additive one)."""
    if mask is not None and causal:
        mask, causal = _with_causal(mask, q.shape[2], k.shape[2]), False
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)      # the CPU kernel takes bool or q's dtype only
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=kv_group > 1)


def _unfused_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float, kv_group: int) -> Tensor:
    """matmul -> scale -> mask -> softmax -> matmul, in place where it can be. GQA folds the
    group into the query rows, (B, H_kv, group*Tq, D), so K/V are not repeated either."""
    B, H, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg = q.reshape(B, hkv, kv_group * tq, q.shape[3])
    s = torch.matmul(qg, k.transpose(-2, -1)).view(B, H, tq, tk).mul_(scale)  # (B, H, Tq, Tk)
    if causal:
        s.masked_fill_(torch.ones(tq, tk, dtype=torch.bool).triu_(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else s.add_(mask)
    p = torch.softmax(s, -1).view(B, hkv, kv_group * tq, tk)
    out = torch.empty_like(q) if v.shape[3] == q.shape[3] else \
        q.new_empty(B, H, tq, v.shape[3])
    return out.copy_(torch.matmul(p, v).view(B, H, tq, v.shape[3]))


# The candidates measured for the docstring's table (benchmarks/attention.py --cpu-paths).
CPU_PATHS: dict[str, Callable[..., Tensor]] = {"flash": _flash_cpu, "unfused": _unfused_cpu}


# A prefill from position 0 into a KV cache passes the mask "query i sees slots 0..i" over all
# S >= Tq cache slots (models/llama.py, HF's static caches). ATen's CPU flash kernel visits every
# key block under a mask, but skips the blocks above the diagonal with is_causal, and the slots
# past Tq are never visible: the same attention as is_causal over the first Tq slots. Measured
# (bf16, H=32 over 4 K/V heads, D=64, 2 threads, /tmp micro-benchmark): Tq=S=2048 250 ms masked
# vs 140 ms causal; Tq=1000, S=2048 125 vs 41 ms; Tq=S=512 18.0 vs 17.2 ms. With S == Tq the
# output has the masked call's bits (blocks above the diagonal add exact zeros, scaled by exactly
# 1: tests compare bit for bit); with S > Tq the key blocks are cut differently, so the fp32
# sums may round differently (seen: 1 bf16 ulp; 3e-8 in fp32). The check: one comparison of the
# (Tq, S) bool mask with the pattern, ~0.1% of what it saves at Tq=2048.
CAUSAL_PREFIX_MIN_TQ = 16


@lru_cache(maxsize=4)
def _causal_pattern(tq: int, tk: int) -> Tensor:
    return torch.arange(tk)[None, :] <= torch.arange(tq)[:, None]


def causal_prefix(mask: Tensor | None, tq: int, tk: int) -> bool:
    """Whether ``mask`` is a CPU bool mask, the same for every batch and head, that lets query
    row i see exactly the keys 0..i (keys >= Tq: none)."""
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu" or tk < tq \
            or mask.dim() < 2 or tuple(mask.shape[-2:]) != (tq, tk) \
            or any(d != 1 for d in mask.shape[:-2]):
        return False
    return torch.equal(mask.reshape(tq, tk), _causal_pattern(tq, tk))


def attention_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                  scale: float, kv_group: int) -> Tensor:
    _check(q, k, v, mask, kv_group)
    tq = q.shape[2]
    if not causal and tq >= CAUSAL_PREFIX_MIN_TQ and causal_prefix(mask, tq, k.shape[2]):
        return F.scaled_dot_product_attention(q, k[:, :, :tq], v[:, :, :tq], is_causal=True,
                                              scale=scale, enable_gqa=kv_group > 1)
    if q.shape[2] == 1 and (not torch.is_grad_enabled() or not (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        # decode (one query row): one native call. Longer queries keep ATen's flash kernel,
        # whose bits equal eager SDPA's (tests of lossless passes compare bit for bit).
        out = native.attention(q, k, v, mask, causal, scale)
        if out is not None:
            return out
    if mask is None or (mask.dtype == torch.bool or mask.dtype == q.dtype) and not causal:
        # the common cases straight to the kernel: Python overhead counts when decoding
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=kv_group > 1)
    return _flash_cpu(q, k, v, mask, causal, scale, kv_group)   # fastest everywhere measured


# ---- fake ------------------------------------------------------------------------------------

def attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                   scale: float, kv_group: int) -> Tensor:
    _check(q, k, v, mask, kv_group)
    if v.shape[3] == q.shape[3]:
        return torch.empty_like(q)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


# ---- Triton: shared pieces -------------------------------------------------------------------

MASK_KINDS = ("none", "bool", "add")
LOG2E = 1.4426950408889634


def mask_kind(mask: Any) -> str:
    """ "none" | "bool" | "add" for a mask tensor (or FakeTensor) or None."""
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "add"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs: IEEE fp32 dots (not TF32). bf16 under the interpreter: its tl.dot multiplies
    # bf16 bit patterns as integers (FACTS.md), so cast first; fp16 is correct there.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and knobs.TRITON_INTERPRET.get())


def _precision(dot_fp32: bool) -> dict[str, str]:
    if dot_fp32:
        return {"cast": ".to(tl.float32)", "dot_args": ', input_precision="ieee"'}
    return {"cast": "", "dot_args": ""}


def _loop(kind: str, offset: str, causal: bool, dot_fp32: bool) -> str:
    """The shared key loop with its mask lines (causal, bool or additive mask, or none)."""
    lines = [T.CAUSAL] if causal else []
    if kind == "bool":
        lines.append(fill(T.MASK_BOOL, offset=offset))
    elif kind == "add":
        lines.append(fill(T.MASK_ADD, offset=offset))
    return fill(T.LOOP, mask="\n".join(lines) or "        # no mask", **_precision(dot_fp32))


_MASK_STRIDES = "stride_mb, stride_mh, stride_mq, stride_mk,"


def _device_ok(*tensors: Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"optc Triton attention: operands on {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not knobs.TRITON_INTERPRET.get():
        raise ValueError(f"optc Triton attention: needs CUDA tensors, got {device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    return device


def _mask_operand(mask: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[list, list]:
    """([mask],[4 strides]) of the mask broadcast to (B, H, Tq, Tk) (stride 0 = broadcast)."""
    if mask is None:
        return [], []
    m = mask.expand(shape)
    return [m], list(m.stride())


def _block_d(head_dim: int) -> int:
    if head_dim > 256:
        raise ValueError(f"optc Triton attention: head_dim {head_dim} > 256 is not supported")
    return max(16, 1 << (head_dim - 1).bit_length())   # tl.dot needs >= 16 lanes


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def launch_config(head_dim: int, device: torch.device) -> LaunchConfig:
    """Explicit configurations (``triton.autotune`` does not run under the interpreter):
    FlashAttention-2's Triton defaults on a GPU (BLOCK_M 128 / BLOCK_N 64 up to D=64), the
    smallest tl.dot tile under the interpreter. Not tuned on a GPU here (none available)."""
    if device.type != "cuda":
        return LaunchConfig(16, 16, 1, 1)
    if head_dim <= 64:
        return LaunchConfig(128, 64, 4, 3)
    return LaunchConfig(64, 64, 8, 2)


# ---- Triton: prefill (FlashAttention-2) ------------------------------------------------------

@dataclass(frozen=True)
class AttentionSpec:
    """One variant of the prefill kernel."""

    mask: str          # "none" | "bool" | "add"
    causal: bool
    dot_fp32: bool     # loads cast to fp32 and IEEE fp32 dots

    def __post_init__(self) -> None:
        assert self.mask in MASK_KINDS, self.mask

    @property
    def entry(self) -> str:
        return "attention_fwd_kernel"


@lru_cache(maxsize=None)
def kernel_source(spec: AttentionSpec, origin: KernelOrigin | None = None) -> str:
    """The generated prefill module for ``spec``; its entry point is ``spec.entry``."""
    origin = origin or KernelOrigin("attention", pass_name="(direct call)")
    has_mask = spec.mask != "none"
    pointers = ["q_ptr", "k_ptr", "v_ptr"] + ["mask_ptr"] * has_mask + ["out_ptr", "lse_ptr"]
    return render("attention", origin=origin, params=dict(
        entry=spec.entry,
        pointers=", ".join(pointers),
        mask_strides=_MASK_STRIDES if has_mask else "# (no mask)",
        kv_range=T.KV_RANGE_CAUSAL if spec.causal else T.KV_RANGE,
        loop=_loop(spec.mask, T.MASK_OFFSET, spec.causal, spec.dot_fp32),
        cast=_precision(spec.dot_fp32)["cast"],
    ))


def launch_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                     causal: bool = False, scale: float | None = None, kv_group: int = 1,
                     config: LaunchConfig | None = None, origin: KernelOrigin | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Check -> allocate -> launch the FlashAttention-2 kernel. Returns ``(out, lse)``:
    ``out`` as ``optc::attention``, ``lse`` (B, H, Tq) fp32, natural log."""
    device = _device_ok(q, k, v, mask)
    _check(q, k, v, mask, kv_group)
    if v.shape[3] != q.shape[3]:
        raise ValueError("optc Triton attention: v's head dim must equal q's")
    B, H, tq, D = q.shape
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(B, H, tq, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    cfg = config or launch_config(D, device)
    spec = AttentionSpec(mask_kind(mask), causal, dot_in_fp32(q.dtype))
    masks, mask_strides = _mask_operand(mask, (B, H, tq, tk))
    kernel = load_kernel(kernel_source(spec, origin), spec.entry)
    grid = (triton_cdiv(tq, cfg.block_m), B * H)
    kernel[grid](q, k, v, *masks, out, lse,
                 H, kv_group, tq, tk, D, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                 *mask_strides, scale * LOG2E,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- Triton: decode (flash-decoding) ---------------------------------------------------------

@dataclass(frozen=True)
class DecodeSpec:
    """One variant of the split + merge decode kernels."""

    mask: str          # "none" | "bool" | "add"
    seq_lens: bool     # per-sequence valid K/V prefix
    dot_fp32: bool

    def __post_init__(self) -> None:
        assert self.mask in MASK_KINDS, self.mask

    split_entry = "attention_decode_split_kernel"
    merge_entry = "attention_decode_merge_kernel"


@lru_cache(maxsize=None)
def decode_kernel_source(spec: DecodeSpec, origin: KernelOrigin | None = None) -> str:
    origin = origin or KernelOrigin("attention_decode", pass_name="(direct call)")
    has_mask = spec.mask != "none"
    pointers = ["q_ptr", "k_ptr", "v_ptr"] + ["mask_ptr"] * has_mask + \
        ["seq_lens_ptr"] * spec.seq_lens + ["part_out_ptr", "part_lse_ptr"]
    return render("attention_decode", origin=origin, params=dict(
        split_entry=spec.split_entry, merge_entry=spec.merge_entry,
        pointers=", ".join(pointers),
        mask_strides=_MASK_STRIDES if has_mask else "# (no mask)",
        kv_len=TD.KV_LEN_SEQ_LENS if spec.seq_lens else TD.KV_LEN,
        loop=_loop(spec.mask, TD.MASK_OFFSET, False, spec.dot_fp32),
        cast=_precision(spec.dot_fp32)["cast"],
    ))


def _num_splits(batch_kv_heads: int, tk: int, block_n: int, device: torch.device) -> int:
    # enough programs for ~2 waves on the GPU's SMs, but no split shorter than one key block
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    return max(1, min(triton_cdiv(tk, block_n), triton_cdiv(2 * sms, batch_kv_heads)))


def _seq_len_mask(seq_lens: Tensor, tk: int) -> Tensor:
    return (torch.arange(tk, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                     kv_group: int | None = None, mask: Tensor | None = None,
                     seq_lens: Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None, origin: KernelOrigin | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Attention of a few query tokens against a long K/V (a KV cache): flash-decoding.

    Args:
      q: (B, H, Tq, D) query tokens (Tq small: 1 for decoding).
      k, v: (B, H_kv, S, D) keys/values, e.g. a static cache of S slots; not repeated for GQA.
      scale: score scale; default 1/sqrt(D).
      kv_group: H // H_kv (default); query head h reads K/V head h // kv_group.
      mask: optional bool (True = attend) or additive float mask broadcastable to (B, H, Tq, S).
      seq_lens: optional (B,) integer tensor: sequence b sees only keys [0, seq_lens[b]); on the
        GPU the keys past it are never read.
      num_splits / block_n: the split of the keys across programs and the key block size
        (defaults: ~2 waves of the GPU's SMs; 64 on a GPU, 16 under the interpreter).
    Returns:
      ``(out, lse)``: out (B, H, Tq, D) in q's dtype and layout; lse (B, H, Tq) fp32, the
      natural-log log-sum-exp of each row's scaled, masked scores.
    On CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) this runs the split and merge
    Triton kernels; on CPU otherwise, ATen's CPU flash kernel, which returns the LSE as well.
    """
    B, H, tq, D = q.shape
    kv_group = H // k.shape[1] if kv_group is None else kv_group
    _check(q, k, v, mask, kv_group)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tk = k.shape[2]
    if q.device.type == "cpu" and not knobs.TRITON_INTERPRET.get():
        return _decode_cpu(q, k, v, scale, kv_group, mask, seq_lens)
    device = _device_ok(q, k, v, mask, seq_lens)
    if v.shape[3] != D:
        raise ValueError("optc Triton attention: v's head dim must equal q's")
    cfg = launch_config(D, device)
    block_n = block_n or cfg.block_n
    splits = num_splits or _num_splits(B * k.shape[1], tk, block_n, device)
    split_len = triton_cdiv(triton_cdiv(tk, splits), block_n) * block_n
    splits = max(1, triton_cdiv(tk, split_len))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, tq, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    part_out = torch.empty(B, H, tq, splits, D, dtype=torch.float32, device=device)
    part_lse = torch.empty(B, H, tq, splits, dtype=torch.float32, device=device)
    spec = DecodeSpec(mask_kind(mask), seq_lens is not None, dot_in_fp32(q.dtype))
    src = decode_kernel_source(spec, origin)
    split_kernel = load_kernel(src, spec.split_entry)
    merge_kernel = load_kernel(src, spec.merge_entry)
    masks, mask_strides = _mask_operand(mask, (B, H, tq, tk))
    lens = [seq_lens.to(torch.int32)] if seq_lens is not None else []
    block_m = max(16, 1 << (kv_group * tq - 1).bit_length())
    split_kernel[(B * k.shape[1], splits)](
        q, k, v, *masks, *lens, part_out, part_lse,
        k.shape[1], kv_group, tq, tk, D, split_len, *q.stride(), *k.stride(), *v.stride(),
        *mask_strides, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), num_warps=cfg.num_warps)
    merge_kernel[(B * H * tq,)](
        part_out, part_lse, out, lse, H, tq, splits, D, *out.stride(),
        BLOCK_S=max(2, 1 << (splits - 1).bit_length()), BLOCK_D=_block_d(D))
    return out, lse


def _decode_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, kv_group: int,
                mask: Tensor | None, seq_lens: Tensor | None) -> tuple[Tensor, Tensor]:
    if seq_lens is not None:
        keep = _seq_len_mask(seq_lens, k.shape[2])
        mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                          else mask.masked_fill(~keep, float("-inf")))
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        mask = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                     scale: float, kv_group: int) -> Tensor:
    """``optc::attention`` on CUDA: flash-decoding for a few non-causal query tokens,
    FlashAttention-2 otherwise."""
    if q.shape[2] <= DECODE_MAX_TQ and not causal:
        return decode_attention(q, k, v, scale=scale, kv_group=kv_group, mask=mask)[0]
    return launch_attention(q, k, v, mask, causal=causal, scale=scale, kv_group=kv_group)[0]


DECODE_MAX_TQ = 4   # query tokens up to which the split-K decode kernel is used


# ---- roofline estimate -----------------------------------------------------------------------

@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peak numbers (dense tensor-core FLOP/s; fp32 = CUDA-core FP32; HBM bytes/s)."""

    name: str
    flops: dict[str, float]
    bytes_per_s: float


GPUS: dict[str, GpuPeak] = {
    # NVIDIA H100 SXM5 datasheet: BF16/FP16 989.4 TFLOP/s dense, FP32 66.9, HBM3 3.35 TB/s
    "H100": GpuPeak("NVIDIA H100 SXM5", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
                    3.35e12),
    # H200: H100's compute, HBM3e 4.8 TB/s
    "H200": GpuPeak("NVIDIA H200 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
                    4.8e12),
    # A100 SXM4 80GB: BF16/FP16 312 TFLOP/s dense, FP32 19.5, HBM2e 2.039 TB/s
    "A100": GpuPeak("NVIDIA A100 SXM4 80GB", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
                    2.039e12),
}
_DTYPE_KEY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def roofline(B: int, H: int, H_kv: int, tq: int, tk: int, D: int, dtype: torch.dtype, *,
             causal: bool, mask_bytes: int = 0, gpu: str = "H100") -> dict[str, Any]:
    """An *estimate* of the Triton kernel's time on ``gpu`` from its datasheet peaks, not a
    measurement: FLOPs of the two products over the visible pairs; HBM bytes of an IO-ideal
    schedule (Q, K, V and the mask read once, O and the fp32 LSE written once: the programs
    of one head run together and share its K/V blocks through L2, and GQA reads each K/V head
    once); time = max(FLOPs / peak FLOP/s, bytes / peak bandwidth). A roofline bounds the
    time from below: FlashAttention-2 reaches 50-73 % of peak FLOP/s on A100."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; accepted: {', '.join(GPUS)}")
    peak = GPUS[gpu]
    elt = torch.empty((), dtype=dtype).element_size()
    flops = int(attention_flops(B, H, tq, tk, D, D, causal))
    nbytes = 2 * B * (H * tq + H_kv * tk) * D * elt + 4 * B * H * tq + mask_bytes
    t_flops = flops / peak.flops[_DTYPE_KEY[dtype]]
    t_bytes = nbytes / peak.bytes_per_s
    decode = tq <= DECODE_MAX_TQ and not causal
    return {"gpu": peak.name, "kernel": "flash-decoding" if decode else "FlashAttention-2",
            "flops": flops, "bytes": nbytes, "predicted_s": max(t_flops, t_bytes),
            "bound": "compute" if t_flops >= t_bytes else "memory",
            "label": "estimate (roofline from datasheet peaks, not measured)"}


# ---- registration ----------------------------------------------------------------------------

ATTENTION = define(
    "attention", cpu=attention_cpu, fake=attention_fake, triton=attention_triton,
    summary="softmax(scale * q k^T + mask [causal]) v, GQA K/V un-repeated (exact, fp32 accumulation)")

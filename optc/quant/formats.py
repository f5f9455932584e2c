"""Weight quantization formats: what is stored, how it is computed, how it is read back.

Every format quantizes a linear weight ``W`` of shape ``(N, K)`` (out, in features); the op
``linear_call`` names computes ``y = x @ dequantize(q).T + bias``. Conventions shared by all:

* Scales are **bf16 values**. They are rounded to bf16 *before* the integers are computed
  (no double rounding), so the stored scale is exactly the one every kernel uses: the CPU
  kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) read bf16 scales with
  bf16 activations, their fast case (FACTS.md). The cost is a step up to 2^-9 coarser than
  ideal, against a quantization step of 2^-7 (int8) or 2^-4 (int4) of the range.
* Rounding is to nearest (ties to even, ``torch.round``); integers saturate at the ends.
* ``dequantize`` returns fp32 ``(N, K)`` in the original input-channel order.

Formats (``tensors`` keys in op-argument order; ``Np`` = N rounded up to 64):

``int8`` -- symmetric, per output channel::
    s[n] = bf16(max_k |W[n,k]| / 127);  q = clamp(round(W / s), -127, 127)      W ~ q * s
    w_int8 (N, K) int8, scales (N,) bf16

``int4`` -- asymmetric, group-wise along K (group g in 32/64/128, K % g == 0), the
    "float zero point" convention of the tinygemm kernels that ATen's CPU kernel shares::
    s = bf16((max - min) / 15);  z = bf16(min + 8 s)     per (group, n)
    q = clamp(round((W - (z - 8 s)) / s), 0, 15)                              W ~ (q - 8) s + z
    w_int4 (Np, K/2) uint8 in the *tile-64 layout* (below), scales_zeros (K/g, Np, 2) bf16
    ([..., 0] = s, [..., 1] = z). Rows past N are zero padding (the output is sliced).

``w8a8`` -- the int8 weight above, plus a per-token activation scale taken at run time::
    sx[m] = max_k |x[m,k]| / 127;  xq = clamp(round(x / sx), -127, 127)
    y = (xq @ q.T) (exact int32)  * sx[m] * s[n] + bias

``bfp`` -- block floating point (block B in 16/32 along K, K % B == 0), a shared 8-bit
    exponent per block and signed ``mantissa_bits``-bit mantissas (|m| <= qmax = 2^(bits-1)-1)::
    e = smallest integer with max|W_block| * 2^-e <= qmax (clamped to [-126, 123])
    m = clamp(round(W * 2^-e), -qmax, qmax)                                   W ~ m * 2^e
    An optional input-channel permutation ``perm`` orders K before blocking (outlier channels
    gathered into their own blocks, "Accurate Block Quantization in LLMs with Outliers"); the
    op gathers ``x[..., perm]`` itself. Two layouts of the same numbers:
      - ``"blocks"`` (Triton, and CPU for B=16): mantissa (N, K) int8, exponent (N, K/B) int8,
        perm (K,) int64 (identity when none was given).
      - ``"planes"`` (CPU, B=32): the mantissas as int4 planes for ATen's int4 kernel. With
        bits <= 4 one plane ``m + 8`` (scale 2^e, zero 0); otherwise two, ``m = 16 h + l``
        with ``l = m mod 16`` in [0, 15] and ``h`` in [-8, 7]: plane H = h + 8 (scale 16*2^e,
        zero 0) over K' in [0, K) and plane L = l (scale 2^e, zero 8*2^e) over [K, 2K). Every
        scale and zero is a power of two times a small integer, exact in bf16, so one int4
        GEMM over the planes with ``x`` repeated per plane computes exactly sum_k x m 2^e.
        w_int4 (Np, P*K/2) uint8 tile-64, scales_zeros (P*K/B, Np, 2) bf16, index (P*K,)
        int64 = ``perm`` repeated per plane (the op's one gather both permutes and repeats x).

Tile-64 layout (ATen ``_convert_weight_to_int4pack_for_cpu``, found by probing torch 2.13 and
checked in tests): rows in blocks of 64; block b is a (K, 32) byte array whose byte (k, j)
holds ``q[64b + j, k]`` in the low nibble and ``q[64b + 32 + j, k]`` in the high nibble. The
Triton int4 kernel reads the same bytes, so one layout serves both devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

MODES = ("int8", "int4", "w8a8", "bfp")
INT4_GROUPS = (32, 64, 128)
BFP_BLOCKS = (16, 32)
TILE_N = 64            # rows per block of the tile-64 int4 layout
BFP_EXP_RANGE = (-126, 123)   # 2^e, 8*2^e and 16*2^e stay normal, finite bf16 numbers


class QuantFormatError(ValueError):
    """A scheme, a weight or a stored QuantizedWeight does not fit a format."""


@dataclass(frozen=True)
class QuantScheme:
    """One layer's quantization format; JSON-able and validated."""

    VERSION: ClassVar[int] = 1
    mode: str                       # "int8" | "int4" | "w8a8" | "bfp"
    group_size: int | None = None   # int4: 32/64/128 (required); bfp: block 16/32 (required)
    mantissa_bits: int = 8          # bfp only: signed mantissa width, 2..8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantFormatError(f"QuantScheme.mode={self.mode!r}: expected one of {MODES}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int)):
            raise QuantFormatError(f"QuantScheme.group_size={g!r}: expected an int or None")
        if self.mode == "int4" and g not in INT4_GROUPS:
            raise QuantFormatError(f"int4 needs group_size in {INT4_GROUPS}, got {g!r}")
        if self.mode == "bfp" and g not in BFP_BLOCKS:
            raise QuantFormatError(f"bfp needs group_size (block) in {BFP_BLOCKS}, got {g!r}")
        if self.mode in ("int8", "w8a8") and g is not None:
            raise QuantFormatError(f"{self.mode} is per output channel: group_size must be None, "
                                   f"got {g!r}")
        b = self.mantissa_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QuantFormatError(f"QuantScheme.mantissa_bits={b!r}: expected an int in 2..8")
        if self.mode != "bfp" and b != 8:
            raise QuantFormatError(f"mantissa_bits applies to bfp only (mode {self.mode!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group_size,
                "mantissa_bits": self.mantissa_bits, "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise QuantFormatError(f"QuantScheme version {version}, this optc reads "
                                   f"{cls.VERSION}: re-quantize the model")
        unknown = set(d) - {"mode", "group_size", "mantissa_bits"}
        if unknown:
            raise QuantFormatError(f"QuantScheme: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @property
    def label(self) -> str:
        """Short name for tables: int8, int4-g128, w8a8, bfp8-b32."""
        if self.mode == "int4":
            return f"int4-g{self.group_size}"
        if self.mode == "bfp":
            return f"bfp{self.mantissa_bits}-b{self.group_size}"
        return self.mode


@dataclass
class QuantizedWeight:
    scheme: QuantScheme
    shape: tuple[int, int]                    # (N, K) of the original weight
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def layout(self) -> str:
        """``"planes"`` / ``"blocks"`` for bfp (see the module docstring), else the mode."""
        if self.scheme.mode != "bfp":
            return self.scheme.mode
        return "planes" if "w_int4" in self.tensors else "blocks"


# ---- checks ----------------------------------------------------------------------------------

def unsupported_reason(shape: tuple[int, ...], scheme: QuantScheme) -> str | None:
    """Why a weight of ``shape`` cannot take ``scheme`` (None: it can). The pass's guard."""
    if len(shape) != 2 or min(shape) < 1:
        return f"weight shape {tuple(shape)} is not a non-empty (N, K) matrix"
    g = scheme.group_size
    if g is not None and shape[1] % g:
        return f"K={shape[1]} is not a multiple of the {scheme.label} group/block size {g}"
    return None


def _check_weight(weight: Tensor, scheme: QuantScheme) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise QuantFormatError(f"quantize: expected a floating-point weight tensor, got "
                               f"{getattr(weight, 'dtype', type(weight))}")
    reason = unsupported_reason(tuple(weight.shape), scheme)
    if reason:
        raise QuantFormatError(f"quantize: {reason}")
    if not torch.isfinite(weight).all():
        raise QuantFormatError("quantize: the weight has inf/nan entries")


def bfp_layout(scheme: QuantScheme, device: torch.device) -> str:
    """The bfp layout ``quantize`` produces for a device (CPU: planes where the int4 kernel's
    group sizes allow it, i.e. block 32; everything else: blocks)."""
    return "planes" if device.type == "cpu" and scheme.group_size == 32 else "blocks"


def bfp_planes(mantissa_bits: int) -> int:
    return 1 if mantissa_bits <= 4 else 2


# ---- int4 tile-64 packing --------------------------------------------------------------------

def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def padded_n(n: int) -> int:
    return -(-n // TILE_N) * TILE_N


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) integers in [0, 15] -> (Np, K/2) uint8, tile-64 layout, zero rows padded."""
    n, k = q.shape
    if k % 2:
        raise QuantFormatError(f"pack_int4: K={k} must be even")
    q = _pad_rows(q.to(torch.uint8), padded_n(n))
    blocks = q.view(-1, 2, 32, k)                               # (Np/64, half, j, K)
    byte = blocks[:, 0] | (blocks[:, 1] << 4)                   # (Np/64, 32, K)
    return byte.transpose(1, 2).contiguous().view(-1, k // 2)   # (Np/64, K, 32) -> (Np, K/2)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """Inverse of ``pack_int4``: (Np, K/2) uint8 -> (Np, K) uint8 in [0, 15]."""
    b = packed.view(-1, k, 32).transpose(1, 2)                  # (Np/64, 32, K)
    return torch.stack([b & 15, b >> 4], 1).reshape(-1, k)      # (Np, K)


def _group_rows(sz: Tensor, g: int) -> Tensor:
    """(K/g, Np, 2) scales_zeros -> per-element (Np, K) scale and zero, fp32."""
    s, z = sz.float().unbind(-1)                                 # (K/g, Np) each
    return s.t().repeat_interleave(g, 1), z.t().repeat_interleave(g, 1)


# ---- quantize --------------------------------------------------------------------------------

def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()


def _int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    amax = w.abs().amax(1)
    s = _bf16(torch.where(amax > 0, amax / 127, torch.ones_like(amax)))
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s.to(torch.bfloat16)


def _int4_groups(w: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q (N, K) in [0, 15], s (N, K/g), z (N, K/g)), s and z bf16 values held in fp32."""
    n, k = w.shape
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)                            # (N, K/g)
    # a constant group gets a tiny step: q lands on an end and (q - 8) s + z ~ z ~ lo
    s = _bf16(torch.where(hi > lo, (hi - lo) / 15, torch.full_like(lo, 2.0 ** -100)))
    z = _bf16(lo + 8 * s)
    q = torch.round((wg - (z - 8 * s)[..., None]) / s[..., None]).clamp_(0, 15).view(n, k)
    return q, s, z


def _int4_tensors(q: Tensor, s: Tensor, z: Tensor) -> dict[str, Tensor]:
    np_ = padded_n(q.shape[0])
    sz = torch.stack([_pad_rows(s, np_).t(), _pad_rows(z, np_).t()], -1)  # (K/g, Np, 2)
    return {"w_int4": pack_int4(q), "scales_zeros": sz.to(torch.bfloat16).contiguous()}


def _bfp_blocks(w: Tensor, block: int, bits: int) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    wb = w.view(n, k // block, block)
    amax = wb.abs().amax(-1)                                     # (N, K/B)
    lo, hi = BFP_EXP_RANGE
    ratio = torch.where(amax > 0, amax / qmax, torch.full_like(amax, 2.0 ** lo))
    e = torch.ceil(torch.log2(ratio)).clamp_(lo, hi)
    # log2 is inexact near powers of two: settle on the smallest e with amax * 2^-e <= qmax
    e = torch.where((torch.ldexp(amax, -(e - 1)) <= qmax) & (e > lo), e - 1, e)
    e = torch.where((torch.ldexp(amax, -e) > qmax) & (e < hi), e + 1, e)
    m = torch.round(torch.ldexp(wb, -e[..., None])).clamp_(-qmax, qmax)
    return m.view(n, k).to(torch.int8), e.to(torch.int8)


def _bfp_to_planes(m: Tensor, e: Tensor, block: int, bits: int, perm: Tensor
                   ) -> dict[str, Tensor]:
    n, k = m.shape
    np_ = padded_n(n)
    p2 = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.float())  # 2^e, (N, K/B)
    zero = torch.zeros_like(p2)
    m = m.to(torch.int16)
    if bfp_planes(bits) == 1:
        planes, scales, zeros = [m + 8], [p2], [zero]
    else:
        low = m & 15                                             # m mod 16, in [0, 15]
        high = (m - low) // 16                                   # in [-8, 7]
        planes, scales, zeros = [high + 8, low], [16 * p2, p2], [zero, 8 * p2]
    s = torch.cat([_pad_rows(t, np_).t() for t in scales])       # (P*K/B, Np)
    z = torch.cat([_pad_rows(t, np_).t() for t in zeros])
    return {"w_int4": pack_int4(torch.cat(planes, 1)),
            "scales_zeros": torch.stack([s, z], -1).to(torch.bfloat16).contiguous(),
            "index": perm.repeat(len(planes)).contiguous()}


def quantize(weight: Tensor, scheme: QuantScheme, *, in_scale: Tensor | None = None,
             perm: Tensor | None = None, layout: str | None = None) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) to ``scheme``; the tensors live on ``weight.device``.

    ``in_scale`` (K,) > 0 (AWQ): quantize ``weight * in_scale``; the caller divides the
    activation by it. ``perm`` (K,): bfp input-channel order (the op gathers ``x[..., perm]``).
    ``layout`` (bfp only): ``"planes"`` | ``"blocks"``; default ``bfp_layout(scheme, device)``.
    """
    _check_weight(weight, scheme)
    n, k = weight.shape
    w = weight.detach().float()
    if in_scale is not None:
        if tuple(in_scale.shape) != (k,) or not bool((in_scale > 0).all()):
            raise QuantFormatError(f"quantize: in_scale must be ({k},) and > 0, got shape "
                                   f"{tuple(in_scale.shape)}")
        w = w * in_scale.to(w)
    if perm is not None and scheme.mode != "bfp":
        raise QuantFormatError(f"quantize: perm is for bfp blocks, not {scheme.mode}")
    if layout is not None and scheme.mode != "bfp":
        raise QuantFormatError(f"quantize: layout is for bfp, not {scheme.mode}")
    g = scheme.group_size
    if scheme.mode in ("int8", "w8a8"):
        q, s = _int8_per_channel(w)
        tensors = {"w_int8": q, "scales": s}
    elif scheme.mode == "int4":
        tensors = _int4_tensors(*_int4_groups(w, g))
    else:
        if perm is None:
            perm = torch.arange(k, device=w.device)
        perm = perm.to(device=w.device, dtype=torch.int64)
        if tuple(perm.shape) != (k,) or not torch.equal(perm.sort().values,
                                                        torch.arange(k, device=w.device)):
            raise QuantFormatError(f"quantize: perm must be a permutation of range({k})")
        m, e = _bfp_blocks(w[:, perm], g, scheme.mantissa_bits)
        layout = layout or bfp_layout(scheme, w.device)
        if layout == "planes":
            if g not in (32, 64, 128):
                raise QuantFormatError(f"bfp planes need a block the int4 kernel groups by "
                                       f"(32), got {g}")
            tensors = _bfp_to_planes(m, e, g, scheme.mantissa_bits, perm)
        elif layout == "blocks":
            tensors = {"mantissa": m, "exponent": e, "perm": perm.contiguous()}
        else:
            raise QuantFormatError(f"quantize: layout {layout!r}: expected 'planes' or 'blocks'")
    return QuantizedWeight(scheme, (n, k), tensors)


# ---- dequantize ------------------------------------------------------------------------------

def _tensor(q: QuantizedWeight, name: str) -> Tensor:
    try:
        return q.tensors[name]
    except KeyError:
        raise QuantFormatError(f"{q.scheme.label} weight lacks tensor {name!r} (has "
                               f"{sorted(q.tensors)})") from None


def bfp_mantissa_exponent(q: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor]:
    """(mantissa (N, K) int8, exponent (N, K/B) int8, perm (K,)) of a bfp weight, any layout."""
    n, k = q.shape
    if q.layout == "blocks":
        return _tensor(q, "mantissa"), _tensor(q, "exponent"), _tensor(q, "perm")
    b, planes = q.scheme.group_size, bfp_planes(q.scheme.mantissa_bits)
    u = unpack_int4(_tensor(q, "w_int4"), planes * k)[:n].to(torch.int16)   # (N, P*K)
    s = _tensor(q, "scales_zeros")[..., 0].float()[:, :n]                    # (P*K/B, N)
    base = s[-(k // b):].t()                     # the last plane's scale is 2^e
    e = torch.frexp(base).exponent - 1
    m = (u - 8) if planes == 1 else 16 * (u[:, :k] - 8) + u[:, k:]
    return m.to(torch.int8), e.to(torch.int8), _tensor(q, "index")[:k]


def dequantize(q: QuantizedWeight) -> Tensor:
    """(N, K) fp32 in the original channel order; ``in_scale`` is not undone."""
    n, k = q.shape
    mode, g = q.scheme.mode, q.scheme.group_size
    if mode in ("int8", "w8a8"):
        return _tensor(q, "w_int8").float() * _tensor(q, "scales").float()[:, None]
    if mode == "int4":
        u = unpack_int4(_tensor(q, "w_int4"), k).float()
        s, z = _group_rows(_tensor(q, "scales_zeros"), g)
        return ((u - 8) * s + z)[:n]
    m, e, perm = bfp_mantissa_exponent(q)
    wp = torch.ldexp(m.float(), e.float().repeat_interleave(g, 1))
    return wp[:, torch.argsort(perm)]


def fake_quantize(weight: Tensor, scheme: QuantScheme) -> Tensor:
    """``dequantize(quantize(weight, scheme))`` in the weight's dtype, without packing (AWQ's
    search calls it once per candidate scale)."""
    _check_weight(weight, scheme)
    w, g = weight.detach().float(), scheme.group_size
    if scheme.mode in ("int8", "w8a8"):
        q, s = _int8_per_channel(w)
        out = q.float() * s.float()[:, None]
    elif scheme.mode == "int4":
        q, s, z = _int4_groups(w, g)
        out = ((q.view(w.shape[0], -1, g) - 8) * s[..., None] + z[..., None]).view(w.shape)
    else:
        m, e = _bfp_blocks(w, g, scheme.mantissa_bits)
        out = torch.ldexp(m.float(), e.float().repeat_interleave(g, 1))
    return out.to(weight.dtype)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2), in dB."""
    ref, err = reference.double(), (reference.double() - approx.double())
    noise = float(err.pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def linear_call(q: QuantizedWeight, bias: Tensor | None) -> tuple[Any, tuple[str, ...], tuple]:
    """(optc op, names of ``q.tensors`` in argument order, trailing non-tensor arguments).

    The graph node is ``op(x, *[get_attr(name) for name in names], bias_or_None, *trailing)``.
    """
    from optc.ops import quant as ops   # ops import formats; formats needs ops only here
    n, _ = q.shape
    mode, g = q.scheme.mode, q.scheme.group_size
    if bias is not None and tuple(bias.shape) != (n,):
        raise QuantFormatError(f"bias of shape {tuple(bias.shape)} for a weight with N={n}")
    if mode == "int8":
        return ops.LINEAR_INT8.op, ("w_int8", "scales"), ()
    if mode == "w8a8":
        return ops.LINEAR_W8A8.op, ("w_int8", "scales"), ()
    if mode == "int4":
        return ops.LINEAR_INT4.op, ("w_int4", "scales_zeros"), (g, n)
    if q.layout == "planes":
        return ops.LINEAR_BFP.op, ("w_int4", "scales_zeros", "index"), (
            g, bfp_planes(q.scheme.mantissa_bits), n)
    return ops.LINEAR_BFP.op, ("mantissa", "exponent", "perm"), (g, 0, n)

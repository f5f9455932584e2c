"""Rotate-half rotary position embedding as one op: ``optc::rope``.

    optc::rope(x, cos, sin) -> out        out = x * cos + rotate_half(x) * sin

with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2], -1)`` (HF Llama's ``apply_rotary_pos_emb``,
GPT-NeoX's rotary). Contract, shared by every implementation and the fake:
  * ``x`` (B, H, T, D), D even, any strides; ``cos``/``sin`` broadcast to x's shape (e.g.
    (1, 1, T, D) or (T, D)) and of x's dtype (``fuse_rope`` fires only then).
  * ``out`` has x's shape and dtype, allocated ``empty_like(x)`` (x's memory layout: a
    transposed projection view stays in its (B, T, H, D) order).
Numerics: exactly eager's. Each product and the sum are rounded to the dtype where eager's
``mul``/``mul``/``add`` round them (the negation is exact), so the result is bit-identical to
the unfused chain on every implementation.

CPU implementation: ``optc.ops.native.rope`` (decode.cpp, one pass, AVX-512), else the ATen
chain itself. Why it exists: in a TinyLlama decode step the unfused chain is 6 ATen calls per
rotated tensor (mul, chunk, neg, cat, mul, add), 2 per layer, ~3 ms of a ~45 ms int4 token, and
each of those calls runs ~2-3x slower there than alone (the matmuls' weight streams evict the
caches the dispatcher runs from; see ``optc.ops.native``).

Triton implementation: ``optc.codegen.templates.rope`` (one program per (b, h, t) row).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from optc import knobs
from optc.codegen.generator import KernelOrigin, load_kernel, render
from optc.ops import native
from optc.ops.registry import define


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"optc.rope: x must be (B, H, T, D) with D even, got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"optc.rope: {name} {tuple(t.shape)} does not broadcast to x "
                             f"{tuple(x.shape)}")


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The unfused chain the op replaces (HF's spelling), for tests and the fallback."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_cpu(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if not torch.is_grad_enabled() or not (x.requires_grad or cos.requires_grad
                                           or sin.requires_grad):
        out = native.rope(x, cos, sin)
        if out is not None:
            return out
    _check(x, cos, sin)
    ref = rope_reference(x, cos, sin)
    if ref.requires_grad:
        return ref
    return torch.empty_like(x, dtype=ref.dtype).copy_(ref)   # the contract's layout


def rope_fake(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _check(x, cos, sin)
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype,
                                                         torch.promote_types(cos.dtype, sin.dtype)))


@lru_cache(maxsize=None)
def kernel_source(origin: KernelOrigin | None = None) -> str:
    origin = origin or KernelOrigin("rope", pass_name="(direct call)")
    return render("rope", origin=origin, params={"entry": "rope_kernel"})


def rope_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Check -> allocate -> launch. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    import triton

    _check(x, cos, sin)
    if x.device.type != "cuda" and not knobs.TRITON_INTERPRET.get():
        raise ValueError(f"optc Triton rope: needs CUDA tensors, got {x.device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"optc Triton rope: cos/sin must be {x.dtype}, got {cos.dtype}/{sin.dtype}")
    if x.stride(3) != 1:
        x = x.contiguous()
    c4, s4 = cos.expand(x.shape), sin.expand(x.shape)
    if c4.stride(3) != 1:
        c4 = c4.contiguous()
    if s4.stride(3) != 1:
        s4 = s4.contiguous()
    out = torch.empty_like(x)
    if out.stride(3) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    B, H, T, D = x.shape
    if out.numel() == 0:
        return out
    kernel = load_kernel(kernel_source(), "rope_kernel")
    kernel[(B * H * T,)](x, c4, s4, out, H, T, D // 2, *x.stride()[:3], *c4.stride()[:3],
                         *s4.stride()[:3], *out.stride()[:3],
                         BLOCK_H=triton.next_power_of_2(max(D // 2, 1)))
    return out


ROPE = define("rope", cpu=rope_cpu, fake=rope_fake, triton=rope_triton,
              summary="rotate-half rotary embedding: x * cos + rotate_half(x) * sin, eager's bits")

"""Normalization ops, optionally fused with the residual add in front of them.

    optc::rms_norm(x, weight, eps) -> y
    optc::add_rms_norm(x, residual, weight, eps) -> (h, y)
    optc::add_layer_norm(x, residual, weight?, bias?, eps) -> (h, y)

Numerics, shared by the CPU, Triton and fake implementations:
  * ``h = x + residual`` in eager type promotion and broadcasting; every output is contiguous.
  * rms (HF ``LlamaRMSNorm``): ``v = mean(float32(h)^2, -1)``;
    ``y = weight * (float32(h) * rsqrt(v + eps)).to(h.dtype)``; dtype ``promote(h, weight)``.
  * layer: ``F.layer_norm(h, (C,), weight, bias, eps)``; dtype ``h.dtype``.

CPU implementation: ATen only, chosen by measurement (torch.utils.benchmark, the 2-core
AVX-512 machine of FACTS.md, 2 threads, min of 5 interleaved rounds, µs, ``add_rms_norm``)::

                                    (1,1,2048)   (1,16,2048)   (1,512,2048)
                                    fp32  bf16   fp32  bf16    fp32  bf16
    HF code on x + residual         17.7  21.1   32.9  47.7    704   894
    mean(h*h) etc., in place        15.1  19.7   28.1  46.8    526   901
    torch.rms_norm(h).mul_(w)       13.4  16.3   27.3  42.2    534   876    <- chosen

All three are bit-exact with HF. ``torch.rms_norm`` is not a fused kernel on CPU: it
decomposes into HF's own pow/mean/add/rsqrt/mul in C++ (hence the same bits, and less Python
overhead). Rejected: ``torch.rms_norm(h, weight)`` multiplies by the weight before rounding to
the input dtype (1 bf16 ulp off HF), and ``vector_norm``-based statistics (sqrt, then square)
are off by fp32 rounding, neither faster. The in-place ``.mul_(weight)`` saves one output-sized
allocation over ``weight * y``.

Native kernel first (``optc.ops.native.add_rms_norm``, decode.cpp): one call instead of the
~8 dispatches above, with the same bits (it adds the squares in ATen's summation order and
rounds where ATen rounds; the tests compare it with this composite bit for bit). Inside a
decode step it matters more than the table says: right after a quantized matmul has streamed
its weight through the caches, the composite took 80-116 us and the native call 13-17 us
(the raw kernel; /tmp micro-benchmark, not committed). It declines (None) what it does not
reproduce, which then runs the composite: strided or broadcast operands, fp16, rows under 8
elements, one row of 32768 or more (ATen splits that sum over threads), autograd.

At (1,512,2048) allocation dominates. With glibc's default malloc, freed multi-MiB blocks
are often handed back to the OS, so the next call's fresh buffers are paid for in page faults:
every variant, layer norm too, swung between ~0.5 and ~5 ms from run to run, and
``ru_minflt`` counted up to ~2000 minor faults per call (two fresh 4 MiB buffers) in the slow
runs. The table was taken with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised
so that it compares compute. Fewer temporaries matter more than the choice of kernel here, and
a runtime that reuses buffers matters most.

``add_layer_norm`` runs ``torch.layer_norm`` (ATen's fused, vectorized kernel) on ``x + r``:
17 / 24 µs fp32 / bf16 at (1,16,2048), within noise of ``F.layer_norm`` and
``native_layer_norm``; it is the reference itself, so it is exact by definition.

The Triton kernels are rendered from ``optc.codegen.templates.norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from optc import knobs
from optc.codegen.generator import (
    KernelOrigin, arg_list, fill, load_kernel, render, row_offset, sym, texpr,
)
from optc.codegen.templates import norm as T
from optc.ops import native
from optc.ops.registry import define


# ---- CPU -----------------------------------------------------------------------------------

def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    y = torch.rms_norm(h, (h.shape[-1],), None, eps)  # fresh, h.dtype, HF's bits
    return y.mul_(weight) if weight.dtype == y.dtype else weight * y  # bf16 model, fp32 weight


def _no_grad(*ts: Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in ts)


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if _no_grad(x, weight):
        hy = native.add_rms_norm(x, None, weight, eps)     # one call, ATen's bits
        if hy is not None:
            return hy[1]
    return _rms_norm(_contiguous(x), weight, eps)


def add_rms_norm_cpu(x: Tensor, residual: Tensor, weight: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    if _no_grad(x, residual, weight):
        hy = native.add_rms_norm(x, residual, weight, eps)
        if hy is not None:
            return hy
    h = x + residual
    if not h.is_contiguous():
        h = h.contiguous()
    return h, _rms_norm(h, weight, eps)


def add_layer_norm_cpu(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
    # inlined (no helper calls): this runs twice per layer, and at batch 1 with short inputs
    # each Python call is a visible part of the op's ~7 us
    h = x + residual
    if not h.is_contiguous():
        h = h.contiguous()
    return h, torch.layer_norm(h, h.shape[-1:], weight, bias, eps)


# ---- fake ----------------------------------------------------------------------------------

def _add_fake(x: Tensor, residual: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    return x.new_empty(shape, dtype=torch.result_type(x, residual))


def rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor,
                      eps: float) -> tuple[Tensor, Tensor]:
    h = _add_fake(x, residual)
    return h, h.new_empty(h.shape, dtype=torch.promote_types(h.dtype, weight.dtype))


def add_layer_norm_fake(x: Tensor, residual: Tensor, weight: Tensor | None,
                        bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    h = _add_fake(x, residual)
    return h, torch.empty_like(h)


# ---- Triton --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NormSpec:
    """One kernel variant of the family: what it normalizes and which operands it has."""

    kind: str        # "rms" | "layer"
    residual: bool   # fused `h = x + residual`, h stored as a second output
    weight: bool
    bias: bool

    def __post_init__(self) -> None:
        assert self.kind in ("rms", "layer"), self.kind
        assert self.kind == "layer" or (self.weight and not self.bias), self

    @property
    def name(self) -> str:
        return ("add_" if self.residual else "") + f"{self.kind}_norm"


@lru_cache(maxsize=None)
def kernel_source(spec: NormSpec, origin: KernelOrigin | None = None) -> str:
    """The generated module for ``spec``; its entry point is ``f"{spec.name}_kernel"``."""
    origin = origin or KernelOrigin(spec.name, pass_name="(direct call)")
    pid, cols = sym("pid"), sym("cols")

    def row(t: str) -> str:  # row `pid`, lane `cols` of a row-major (N, n_cols) operand
        return texpr(row_offset(pid, sym(f"stride_{t}_row"), cols))

    ins, outs = ["x"] + ["res"] * spec.residual, ["h"] * spec.residual + ["y"]
    params = ["w"] * spec.weight + ["b"] * spec.bias
    if spec.residual:
        load = fill(T.LOAD_ADD, x_offset=row("x"), res_offset=row("res"), h_offset=row("h"))
    else:
        load = fill(T.LOAD, x_offset=row("x"))
    if spec.kind == "rms":
        normalize = fill(T.RMS, w_offset=texpr(cols))
    else:
        normalize = "\n".join([T.LAYER] + [fill(T.WEIGHT, w_offset=texpr(cols))] * spec.weight
                              + [fill(T.BIAS, b_offset=texpr(cols))] * spec.bias)
    return render("norm", origin=origin, params=dict(
        entry=f"{spec.name}_kernel",
        pointers=arg_list([f"{t}_ptr" for t in ins + params + outs]),
        dimensions=arg_list(["n_cols"] + [f"stride_{t}_row" for t in ins + outs]),
        scalars=arg_list(["eps"]),
        load=load,
        normalize=normalize,
        y_offset=row("y"),
    ))


def _check_device(*tensors: Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"optc Triton norm: operands on {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not knobs.TRITON_INTERPRET.get():
        raise ValueError(f"optc Triton norm: needs CUDA tensors, got {device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    return device


def _rows(t: Tensor, n_cols: int) -> Tensor:
    """A (N, n_cols) view with unit column stride (a copy only when no such view exists)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 or n_cols == 1 else t.contiguous()


def launch_norm(spec: NormSpec, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, eps: float, *, block_c: int | None = None,
                origin: KernelOrigin | None = None) -> tuple[Tensor | None, Tensor]:
    """Check → allocate → launch the kernel of ``spec``; returns ``(h or None, y)``."""
    import triton

    device = _check_device(x, residual, weight, bias)
    if (residual is not None) != spec.residual or (weight is not None) != spec.weight \
            or (bias is not None) != spec.bias:
        raise ValueError(f"operands do not match {spec}")
    shape = x.shape if residual is None else torch.broadcast_shapes(x.shape, residual.shape)
    n_cols = shape[-1]
    for p in (weight, bias):
        if p is not None and tuple(p.shape) != (n_cols,):
            raise ValueError(f"expected a ({n_cols},) weight/bias, got {tuple(p.shape)}")
    h_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    y_dtype = torch.promote_types(h_dtype, weight.dtype) if spec.kind == "rms" else h_dtype
    # allocate
    h = torch.empty(shape, dtype=h_dtype, device=device) if spec.residual else None
    y = torch.empty(shape, dtype=y_dtype, device=device)
    x2 = _rows(x.expand(shape), n_cols)
    n_rows = x2.shape[0]
    if n_rows == 0 or n_cols == 0:
        return h, y
    block = block_c or triton.next_power_of_2(n_cols)
    if block < n_cols:
        raise ValueError(f"BLOCK_C={block} < n_cols={n_cols}")
    # launch: arguments in the kernel's groups (pointers / dimensions / scalars / meta)
    ins, outs = [x2], [y.view(-1, n_cols)]
    if residual is not None:
        ins.append(_rows(residual.expand(shape), n_cols))
        outs.insert(0, h.view(-1, n_cols))
    params = [_contiguous(p) for p in (weight, bias) if p is not None]
    pointers = ins + params + outs                    # x, [res,] [w,] [b,] [h,] y
    dims = [n_cols] + [t.stride(0) for t in ins + outs]
    entry = f"{spec.name}_kernel"
    kernel = load_kernel(kernel_source(spec, origin), entry)
    kernel[(n_rows,)](*pointers, *dims, float(eps), BLOCK_C=block,
                      num_warps=min(max(block // 256, 1), 16))
    return h, y


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return launch_norm(NormSpec("rms", False, True, False), x, None, weight, None, eps)[1]


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor,
                        eps: float) -> tuple[Tensor, Tensor]:
    h, y = launch_norm(NormSpec("rms", True, True, False), x, residual, weight, None, eps)
    assert h is not None
    return h, y


def add_layer_norm_triton(x: Tensor, residual: Tensor, weight: Tensor | None,
                          bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    spec = NormSpec("layer", True, weight is not None, bias is not None)
    h, y = launch_norm(spec, x, residual, weight, bias, eps)
    assert h is not None
    return h, y


# ---- registration --------------------------------------------------------------------------

RMS_NORM = define("rms_norm", cpu=rms_norm_cpu, fake=rms_norm_fake, triton=rms_norm_triton,
                  summary="y = weight * rmsnorm(x) (HF Llama numerics)")
ADD_RMS_NORM = define(
    "add_rms_norm", cpu=add_rms_norm_cpu, fake=add_rms_norm_fake, triton=add_rms_norm_triton,
    summary="h = x + residual; y = weight * rmsnorm(h) (HF Llama numerics); returns (h, y)")
ADD_LAYER_NORM = define(
    "add_layer_norm", cpu=add_layer_norm_cpu, fake=add_layer_norm_fake,
    triton=add_layer_norm_triton,
    summary="h = x + residual; y = layer_norm(h, weight, bias); returns (h, y)")

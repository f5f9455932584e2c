"""optc::rms_norm / add_rms_norm / add_layer_norm: CPU numerics, fake shapes, dispatch, registry.

The Triton implementations are tested in test_codegen.py (under the interpreter).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.ops import OPS, OpDef, get_op_def
from optc.ops import norms

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 3, 48), (1, 1, 100), (4, 2048), (1, 7, 1)]

# Tolerance, relative and absolute: one ulp of bf16 / fp16 (the most that rounding an fp32 value
# differently can move a result) and 8 ulps of fp32 (an fp32 statistic reduced in another order
# is a few ulps off). The CPU implementations run HF's own ATen ops in HF's order, so today they
# are bit-exact (test_cpu_bit_exact_with_hf); this bound is the contract should a torch release
# fuse rms_norm on CPU.
ULP = {torch.float32: 2.0**-23 * 8, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def hf_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim but for the module state."""
    input_dtype = h.dtype
    hidden_states = h.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype | None = None):
    x = torch.randn(shape, dtype=dtype)
    r = torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    b = torch.randn(shape[-1]).to(weight_dtype or dtype)
    return x, r, w, b


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = ULP[out.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# ---- CPU numerics ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_cpu_matches_hf(dtype, shape):
    x, r, w, _ = _inputs(shape, dtype)
    h, y = OPS["add_rms_norm"].cpu(x, r, w, 1e-6)
    assert torch.equal(h, x + r)
    _close(y, hf_rms_norm(x + r, w, 1e-6))
    _close(OPS["rms_norm"].cpu(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_add_layer_norm_cpu_matches_torch(dtype, affine):
    x, r, w, b = _inputs((2, 3, 100), dtype)
    w = w if affine != "none" else None
    b = b if affine == "weight+bias" else None
    h, y = OPS["add_layer_norm"].cpu(x, r, w, b, 1e-5)
    assert torch.equal(h, x + r)
    _close(y, F.layer_norm(x + r, (100,), w, b, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_bit_exact_with_hf(dtype):
    # Same ATen ops as HF in the same order (see optc/ops/norms.py): identical bits.
    x, r, w, _ = _inputs((3, 5, 2048), dtype)
    assert torch.equal(norms.add_rms_norm_cpu(x, r, w, 1e-6)[1], hf_rms_norm(x + r, w, 1e-6))
    assert torch.equal(norms.rms_norm_cpu(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))


def test_rms_norm_fp32_weight_on_bf16_promotes_like_hf():
    x, r, w, _ = _inputs((2, 64), torch.bfloat16, weight_dtype=torch.float32)
    h, y = norms.add_rms_norm_cpu(x, r, w, 1e-6)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.equal(y, hf_rms_norm(x + r, w, 1e-6))


def test_cpu_outputs_contiguous_for_strided_inputs():
    x = torch.randn(4, 3, 64).transpose(0, 1)               # (3, 4, 64), not contiguous
    r, w = torch.randn(3, 4, 64), torch.randn(64)
    h, y = norms.add_rms_norm_cpu(x, r, w, 1e-6)
    assert h.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, hf_rms_norm(x + r, w, 1e-6))
    y = norms.rms_norm_cpu(x, w, 1e-6)
    assert y.is_contiguous() and torch.equal(y, hf_rms_norm(x, w, 1e-6))


def test_cpu_empty_and_broadcast_residual():
    w = torch.randn(48)
    h, y = norms.add_rms_norm_cpu(torch.empty(0, 48), torch.empty(0, 48), w, 1e-6)
    assert h.shape == y.shape == (0, 48)
    x, r = torch.randn(2, 3, 48), torch.randn(48)
    h, y = norms.add_rms_norm_cpu(x, r, w, 1e-6)
    assert torch.equal(y, hf_rms_norm(x + r, w, 1e-6))


# ---- fake implementations --------------------------------------------------------------------

@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_fake_shapes_and_dtypes(dtype, weight_dtype):
    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=dtype)
        r = torch.empty(64, dtype=dtype)                       # broadcast residual
        w = torch.empty(64, dtype=weight_dtype)
        h, y = torch.ops.optc.add_rms_norm(x, r, w, 1e-6)
        y1 = torch.ops.optc.rms_norm(x, w, 1e-6)
        h2, y2 = torch.ops.optc.add_layer_norm(x, r, w, None, 1e-5)
        h3, y3 = torch.ops.optc.add_layer_norm(x, r, None, None, 1e-5)
    rms_dtype = torch.promote_types(dtype, weight_dtype)
    for t in (h, y, y1, h2, y2, h3, y3):
        assert t.shape == (2, 5, 64) and t.is_contiguous()
    assert (h.dtype, y.dtype, y1.dtype) == (dtype, rms_dtype, rms_dtype)
    assert (h2.dtype, y2.dtype, h3.dtype, y3.dtype) == (dtype,) * 4


def test_fake_matches_real_metadata():
    x, r, w, b = _inputs((2, 3, 48), torch.bfloat16, weight_dtype=torch.float32)
    for name, args in [("add_rms_norm", (x, r, w, 1e-6)), ("rms_norm", (x, w, 1e-6)),
                       ("add_layer_norm", (x, r, w, b, 1e-5))]:
        real = OPS[name].cpu(*args)
        with FakeTensorMode() as mode:
            fake = OPS[name].op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                  for a in args])
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for a, f in zip(real, fake):
            assert (a.shape, a.dtype, a.stride()) == (f.shape, f.dtype, f.stride()), name


# ---- torch.library contract and dispatch -----------------------------------------------------

@pytest.mark.parametrize("case", ["add_rms_norm", "rms_norm", "add_layer_norm",
                                  "add_layer_norm_no_affine", "add_rms_norm_bf16_fp32_weight"])
def test_opcheck(case):
    x, r, w, b = _inputs((2, 3, 48), torch.float32)
    op, args = {
        "add_rms_norm": (torch.ops.optc.add_rms_norm.default, (x, r, w, 1e-6)),
        "rms_norm": (torch.ops.optc.rms_norm.default, (x, w, 1e-6)),
        "add_layer_norm": (torch.ops.optc.add_layer_norm.default, (x, r, w, b, 1e-5)),
        "add_layer_norm_no_affine": (torch.ops.optc.add_layer_norm.default,
                                     (x, r, None, None, 1e-5)),
        "add_rms_norm_bf16_fp32_weight": (torch.ops.optc.add_rms_norm.default,
                                          (x.bfloat16(), r.bfloat16(), w, 1e-6)),
    }[case]
    torch.library.opcheck(op, args)


def test_dispatcher_calls_cpu_impl():
    x, r, w, b = _inputs((2, 3, 48), torch.bfloat16)
    for name, args in [("add_rms_norm", (x, r, w, 1e-6)), ("rms_norm", (x, w, 1e-6)),
                       ("add_layer_norm", (x, r, w, b, 1e-5))]:
        via_torch = getattr(torch.ops.optc, name)(*args)
        direct = OPS[name].cpu(*args)
        for a, d in zip(via_torch if isinstance(via_torch, tuple) else (via_torch,),
                        direct if isinstance(direct, tuple) else (direct,)):
            assert torch.equal(a, d), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optc::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optc::{name}", "CUDA")


def test_registry_records():
    assert set(OPS) >= {"rms_norm", "add_rms_norm", "add_layer_norm"}
    d = OPS["add_rms_norm"]
    assert isinstance(d, OpDef) and d.name == "add_rms_norm"
    assert d.op is torch.ops.optc.add_rms_norm.default
    assert d.cpu is norms.add_rms_norm_cpu and d.triton is norms.add_rms_norm_triton
    with pytest.raises(AttributeError):
        d.name = "x"  # frozen
    assert get_op_def(torch.ops.optc.add_rms_norm.default) is d
    assert get_op_def(torch.ops.optc.add_rms_norm) is d
    assert get_op_def(torch.ops.aten.add.Tensor) is None          # must not match aten
    assert get_op_def(torch.ops.aten.rms_norm.default) is None    # same name, other namespace
    assert get_op_def("add_rms_norm") is None
    assert get_op_def(norms.add_rms_norm_cpu) is None


def test_importing_twice_is_harmless():
    # A fresh interpreter: import, drop optc.ops from sys.modules, import again (what a
    # reload or a second import path does); the ops must stay registered and usable.
    code = """
import sys, torch
import optc.ops
first = optc.ops.OPS["add_rms_norm"].op
for name in [m for m in sys.modules if m.startswith("optc.ops")]:
    del sys.modules[name]
import optc.ops
assert {"add_layer_norm", "add_rms_norm", "rms_norm"} <= set(optc.ops.OPS), optc.ops.OPS
assert optc.ops.OPS["add_rms_norm"].op is first
x = torch.randn(2, 8)
h, y = torch.ops.optc.add_rms_norm(x, x, torch.ones(8), 1e-6)
assert torch.equal(h, x + x)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_triton_wrapper_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, r, w, _ = _inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        OPS["add_rms_norm"].triton(x, r, w, 1e-6)

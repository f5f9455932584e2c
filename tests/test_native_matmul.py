"""optc.ops.native's quantized matmuls (gemv.cpp) against the dequantized weight in fp64.

Tolerances: every product (an int8 or int4 code times a bf16 activation) is exact in fp32; the
sums are fp32. The int4 kernels sum ``x * (128 + u)`` and remove ``128 * sum(x)`` per group,
so their fp32 error grows with the activations' mean: measured ~1e-5 relative (norm) for
N(0, 1) activations, ~3e-5 with a mean of 4. fp32 outputs must be within 2e-4 (an order above
that, three below the int4 quantization error); bf16 outputs add one rounding (2^-9 relative
per element, ~1.6e-3 in norm), so within 3e-3.
"""

from __future__ import annotations

import pytest
import torch

from optc.ops import native
from optc.ops import quant as Q
from optc.quant import formats as fmt
from optc.quant.formats import QuantScheme

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="needs a C++ compiler")

FP32_TOL, BF16_TOL = 2e-4, 3e-3


def _has(bit: int) -> bool:
    return bool(native.features() & bit)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _quant(n: int, k: int, scheme: QuantScheme, seed: int = 0) -> fmt.QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return fmt.quantize(torch.randn(n, k, generator=g) * 0.05, scheme)


def _x(m: int, k: int, mean: float = 0.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) + mean).to(torch.bfloat16)


def _ref(x: torch.Tensor, q: fmt.QuantizedWeight) -> torch.Tensor:
    return x.double() @ fmt.dequantize(q).double().t()


@pytest.mark.skipif(not _has(native.INT8_GEMV), reason="needs AVX-512")
@pytest.mark.parametrize("n,k", [(64, 16), (101, 256), (256, 1040)])
@pytest.mark.parametrize("m", [1, 3, 4, 7])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_int8(threads, n, k, m, out):
    q = _quant(n, k, QuantScheme("int8"))
    x = _x(m, k, mean=2.0)
    y = native.int8_matmul(x, q.tensors["w_int8"], q.tensors["scales"], out)
    assert y.shape == (m, n) and y.dtype == out
    assert _rel(y, _ref(x, q)) < (FP32_TOL if out == torch.float32 else BF16_TOL)


@pytest.mark.skipif(not _has(native.AMX), reason="needs AMX")
@pytest.mark.parametrize("n,k", [(16, 32), (33, 96), (101, 256), (256, 1056), (40, 4160)])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 48])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_int8_amx(threads, n, k, m, out):
    """The AMX int8 GEMM: channel counts that fill no 16- or 32-channel block (33, 101, 40),
    odd and partial token tiles (5, 17, 33), and K beyond one 2048 slice (4160: two full slices
    and a 64-k one, partial sums carried between them)."""
    q = _quant(n, k, QuantScheme("int8"))
    x = _x(m, k, mean=2.0)
    y = native.int8_matmul(x, q.tensors["w_int8"], q.tensors["scales"], out, amx=True)
    assert y.shape == (m, n) and y.dtype == out
    assert _rel(y, _ref(x, q)) < (FP32_TOL if out == torch.float32 else BF16_TOL)


@pytest.mark.skipif(not _has(native.AMX), reason="needs AMX")
@pytest.mark.parametrize("m", [255, 256, 257, 300, 530])
def test_int8_amx_token_chunks(m):
    """Several chunks of 16 token tiles and an odd last tile: every row exactly once, each
    right (a row summed twice, or a transposition slip, is off by its whole value)."""
    q = _quant(48, 64, QuantScheme("int8"))
    x = _x(m, 64)
    y = native.int8_matmul(x, q.tensors["w_int8"], q.tensors["scales"], torch.float32, amx=True)
    ref = _ref(x, q)
    per_row = ((y.double() - ref).norm(dim=1) / ref.norm(dim=1))
    assert per_row.max().item() < FP32_TOL


def test_int8_amx_refuses_k_not_a_multiple_of_32():
    q = _quant(64, 48, QuantScheme("int8"))          # K % 16 == 0: the GEMV reads it
    x = _x(20, 48)
    assert native.int8_matmul(x, q.tensors["w_int8"], q.tensors["scales"], torch.bfloat16,
                              amx=True) is None
    y = Q.run_cpu_path(q, x.float(), None, "amx")   # the path falls back (GEMV / dequant)
    assert _rel(y, _ref(x, q)) < BF16_TOL


@pytest.mark.parametrize("amx", [False, True], ids=["avx512bf16", "amx"])
@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (100, 256, 64), (192, 384, 128),
                                       (130, 256, 32)])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("mean", [0.0, 4.0])
def test_int4(threads, amx, n, k, group, m, mean):
    if not _has(native.INT4_AMX if amx else native.INT4_GEMV):
        pytest.skip("needs AMX" if amx else "needs AVX512-BF16")
    q = _quant(n, k, QuantScheme("int4", group))
    x = _x(m, k, mean)
    ref = _ref(x, q)
    args = (x, q.tensors["w_int4"], q.tensors["scales_zeros"], group, n)
    y32 = native.int4_matmul(*args, torch.float32, amx=amx)
    y16 = native.int4_matmul(*args, torch.bfloat16, amx=amx)
    assert y32.shape == y16.shape == (m, n) and y16.dtype == torch.bfloat16
    assert _rel(y32, ref) < FP32_TOL
    assert _rel(y16, ref) < BF16_TOL


@pytest.mark.skipif(not _has(native.INT4_AMX), reason="needs AMX")
@pytest.mark.parametrize("m", [255, 256, 257, 300, 530])
def test_int4_amx_row_chunks(m):
    """Several chunks of 16 row tiles, and a last tile that overlaps the one before it: every
    row exactly once (a row summed twice would be off by its whole value)."""
    q = _quant(64, 64, QuantScheme("int4", 32))
    x = _x(m, 64)
    y = native.int4_matmul(x, q.tensors["w_int4"], q.tensors["scales_zeros"], 32, 64,
                           torch.float32, amx=True)
    ref = _ref(x, q)
    per_row = ((y.double() - ref).norm(dim=1) / ref.norm(dim=1))
    assert per_row.max().item() < FP32_TOL


def test_refuses_what_it_cannot_read():
    q8 = _quant(64, 40, QuantScheme("int8"))
    x = _x(1, 40)
    assert native.int8_matmul(x, q8.tensors["w_int8"], q8.tensors["scales"],
                              torch.bfloat16) is None                      # K % 16 != 0
    q8 = _quant(64, 64, QuantScheme("int8"))
    assert native.int8_matmul(_x(1, 64).float(), q8.tensors["w_int8"], q8.tensors["scales"],
                              torch.bfloat16) is None                      # fp32 activations
    q4 = _quant(64, 128, QuantScheme("int4", 32))
    w, sz = q4.tensors["w_int4"], q4.tensors["scales_zeros"]
    x = _x(2, 128)
    assert native.int4_matmul(x.t().contiguous().t(), w, sz, 32, 64, torch.bfloat16,
                              amx=False) is None                           # not contiguous
    assert native.int4_matmul(x, w, sz.float(), 32, 64, torch.bfloat16, amx=False) is None
    assert native.int4_matmul(x, w, sz, 32, 65, torch.bfloat16, amx=False) is None  # n > Np
    # a group of 256 (the format allows up to 128): the AMX kernel buffers 4 chunks of 32
    w256 = torch.zeros(64, 128, dtype=torch.uint8)
    sz256 = torch.ones(1, 64, 2, dtype=torch.bfloat16)
    assert native.int4_matmul(_x(1, 256), w256, sz256, 256, 64, torch.bfloat16, amx=True) is None


def _panel(kind: str, x: torch.Tensor, q: fmt.QuantizedWeight, out: torch.dtype
           ) -> torch.Tensor | None:
    t = q.tensors
    if kind == "int8":
        return native.panel_matmul("int8", x, t["w_int8"], t["scales"], 0, q.shape[0], out)
    return native.panel_matmul("int4", x, t["w_int4"], t["scales_zeros"], q.scheme.group_size,
                               q.shape[0], out)


def _panel_ref(x: torch.Tensor, q: fmt.QuantizedWeight) -> torch.Tensor:
    """What the panel GEMM multiplies: the int8 codes exactly (times the scale), the int4
    weight as the dequant path rounds it to bf16 (``int4_weight_t_bf16``)."""
    w = fmt.dequantize(q)
    return x.double() @ (w if q.scheme.mode == "int8" else w.to(torch.bfloat16)).double().t()


@pytest.mark.skipif(not _has(native.INT4_GEMV), reason="needs AVX512-BF16")
@pytest.mark.parametrize("kind,n,k,group", [
    ("int8", 64, 16, 0), ("int8", 101, 336, 0), ("int8", 130, 2048, 0),   # gather tail: 336 % 64
    ("int4", 64, 256, 128), ("int4", 100, 320, 32), ("int4", 130, 576, 64), ("int4", 64, 384, 128)])
@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_panel_gemm(threads, kind, n, k, group, m, out):
    """The AVX512-BF16 panel GEMM: row counts around its 6-row micro-tile (5, 6, 7, 13), channel
    counts that fill no 64-channel block (101, 100, 130), K with a partial last 256-k panel
    (336, 320, 576, 384; 336 also a 16-k tail past the last 64 k, decoded by gathers), all three
    int4 group sizes. Its products are exact (bf16
    codes and weights times bf16 x) and its sums fp32: FP32_TOL as the other kernels."""
    q = _quant(n, k, QuantScheme("int8") if kind == "int8" else QuantScheme("int4", group))
    x = _x(m, k, mean=2.0)
    y = _panel(kind, x, q, out)
    assert y is not None and y.shape == (m, n) and y.dtype == out
    assert _rel(y, _panel_ref(x, q)) < (FP32_TOL if out == torch.float32 else BF16_TOL)


@pytest.mark.skipif(not _has(native.INT4_GEMV), reason="needs AVX512-BF16")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_panel_gemm_row_chunks(kind):
    """2 * 2049 rows of K=2048 are 8 MiB of x: the GEMM cuts them into two chunks of rows (its
    x budget), each decoding the panels again. Every row exactly once and each right."""
    k, m = 2048, 2049 * 2 + 5
    q = _quant(64, k, QuantScheme("int8") if kind == "int8" else QuantScheme("int4", 128))
    x = _x(m, k)
    y = _panel(kind, x, q, torch.float32)
    ref = _panel_ref(x, q)
    per_row = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert per_row.max().item() < FP32_TOL


@pytest.mark.skipif(not _has(native.INT4_GEMV), reason="needs AVX512-BF16")
def test_panel_gemm_declines_what_it_cannot_read():
    q8, q4 = _quant(64, 40, QuantScheme("int8")), _quant(64, 256, QuantScheme("int4", 64))
    assert _panel("int8", _x(8, 40), q8, torch.float32) is None          # K % 16 != 0
    assert _panel("int4", _x(8, 256).float(), q4, torch.float32) is None  # fp32 x: caller casts
    assert _panel("int4", _x(8, 512)[:, :256], q4, torch.float32) is None  # strided x
    with pytest.raises(ValueError, match="kind"):
        native.panel_matmul("int2", _x(8, 256), q4.tensors["w_int4"], q4.tensors["scales_zeros"],
                            64, 64, torch.float32)


@pytest.mark.parametrize("kind,path", [("int8", "native"), ("int8", "amx"), ("int4", "gemv"),
                                       ("int4", "amx"), ("int8", "panel"),
                                       ("int4", "panel")])
def test_paths_fall_back_without_the_library(monkeypatch, kind, path):
    """OPTC_NATIVE=0: each native path runs the torch/ATen path it replaces, same numbers."""
    q = _quant(128, 256, QuantScheme("int8") if kind == "int8" else QuantScheme("int4", 64))
    x = torch.randn(3, 256)
    ref = _ref(x.to(torch.bfloat16), q)
    with_native = Q.run_cpu_path(q, x, None, path)
    monkeypatch.setenv("OPTC_NATIVE", "0")
    assert native.library() is None and native.features() == 0
    without = Q.run_cpu_path(q, x, None, path)
    assert with_native.dtype == without.dtype == torch.float32
    assert _rel(without, ref) < BF16_TOL and _rel(with_native, ref) < BF16_TOL


def test_table_paths_exist():
    """Every path either decision table names is an implementation of that kind."""
    for table in (Q.CPU_PATHS, Q.CPU_PATHS_NO_AMX):
        assert table.keys() == Q.CPU_IMPLS.keys()
        for kind, buckets in table.items():
            for _, path in buckets:
                assert path in Q.CPU_IMPLS[kind], (kind, path)


# ---- per-node specialization (native.gemv_bound via OpDef.specialize) -------------------------

@pytest.mark.skipif(not _has(native.INT4_GEMV), reason="needs AVX512-BF16")
def test_bound_gemv_equals_general_path_and_declines_other_inputs():
    q4 = _quant(128, 256, QuantScheme("int4", 64))
    q8 = _quant(128, 256, QuantScheme("int8"))
    w4, sz = q4.tensors["w_int4"], q4.tensors["scales_zeros"]
    w8, s8 = q8.tensors["w_int8"], q8.tensors["scales"]
    b4 = Q.specialize_linear_int4(None, w4, sz, None, 64, 100)     # n < Np: padded channels
    b8 = Q.specialize_linear_int8(None, w8, s8, None)
    assert b4 is not None and b8 is not None
    for x in (_x(1, 256).view(1, 1, 256), _x(3, 256), _x(1, 256).float(),
              _x(2, 256).t().contiguous().t()):                    # 1 row, 3 rows, fp32, strided
        assert torch.equal(b4(x, w4, sz, None, 64, 100), Q.linear_int4_cpu(x, w4, sz, None, 64, 100))
        assert torch.equal(b8(x, w8, s8, None), Q.linear_int8_cpu(x, w8, s8, None))
    one = _x(1, 256)
    assert native.gemv_bound("int4", w4, sz, 64, 100)(one).shape == (1, 100)
    for bad in (_x(2, 256), one.float(), _x(1, 128)):
        assert native.gemv_bound("int4", w4, sz, 64, 100)(bad) is None
    # other weights than the bound ones (another node's call): the general path
    q4b = _quant(128, 256, QuantScheme("int4", 64), seed=5)
    w4b, szb = q4b.tensors["w_int4"], q4b.tensors["scales_zeros"]
    assert torch.equal(b4(one, w4b, szb, None, 64, 100), Q.linear_int4_cpu(one, w4b, szb, None, 64, 100))
    # not specialized: a bias, a runtime weight, a layout the kernel cannot read
    assert Q.specialize_linear_int4(None, w4, sz, torch.zeros(100), 64, 100) is None
    from optc.ops.registry import RUNTIME
    assert Q.specialize_linear_int4(None, RUNTIME, sz, None, 64, 100) is None
    assert Q.specialize_linear_int4(None, w4, sz.float(), None, 64, 100) is None


@pytest.mark.skipif(not _has(native.INT4_GEMV), reason="needs AVX512-BF16")
def test_program_binds_the_specialized_gemv():
    import models
    from optc.presets import PRESETS
    m = models.build("llama-tiny", seed=0)
    c = PRESETS["optc-int4-g128-bf16"].compile(m, copy=False)     # m itself, cast to bf16
    m.setup_caches(1, 16)
    with torch.no_grad():
        c(torch.randint(0, 100, (1, 4)), torch.arange(4))
    (g,) = c.report.graphs
    bound = [f for k, f in g.program._globals.items()
             if k.startswith("f") and getattr(f, "__name__", "") == "linear_int4_cpu_bound"]
    n_linears = sum(1 for n in g.program.gm.graph.nodes
                    if n.op == "call_function" and "linear_int4" in str(n.target))
    assert n_linears > 0 and len(bound) == n_linears

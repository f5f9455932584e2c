"""optc's native CPU kernels (``dequant.cpp``, ``gemv.cpp``): built on first use, cached, optional.

- ``dequant.cpp``: tile-64 int4 -> transposed bf16 weight (the prefill dequantize-then-GEMM path);
- ``gemv.cpp``: quantized matmuls straight from the packed weights: int8 and int4 GEMV for
  decode (AVX-512 / AVX512-BF16), int4 and int8 GEMMs on AMX tiles for M from a few rows up,
  and for CPUs without AMX an AVX512-BF16 panel GEMM (int8 and int4) for prefill;
- ``decode.cpp``: the small ops of a decode step as one call each: add + RMSNorm (ATen's exact
  bits) and attention for a few query rows (``optc.ops.norms``, ``optc.ops.attention``).

The C++ files have a plain C ABI and include only ATen/Parallel.h (torch's thread pool), so they
compile in a few seconds with the system C++ compiler (``$CXX``, else ``c++``/``g++``) at
``-O3 -march=native``; it is loaded with ctypes, which releases the GIL during calls. The shared
library is cached under ``<optc cache>/native/<hash>/`` keyed by the source, the compiler's
version, the flags, this CPU's instruction-set flags and the torch version (a cache shared
between machines never loads a binary built for another CPU). Writes are atomic (build into a temporary file, then ``os.replace``); a library
that does not load is deleted and rebuilt once.

Without a compiler, or with ``OPTC_NATIVE=0``, :func:`library` is None and callers use their
torch paths; :func:`status` says which and why (``optc inspect`` prints it).

    from optc.ops import native
    wt = native.int4_weight_t_bf16(w_int4, scales_zeros, group_size, k)   # None: use torch
    y = native.int4_matmul(x2_bf16, w_int4, scales_zeros, group_size, n, amx=True)  # None: torch
    y = native.panel_matmul("int4", x2_bf16, w_int4, scales_zeros, group_size, n, torch.bfloat16)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from optc import knobs

SOURCES = tuple(Path(__file__).with_name(f) for f in ("dequant.cpp", "gemv.cpp", "decode.cpp"))
# part of the cache key, not compiled
HEADERS = tuple(Path(__file__).with_name(f) for f in ("bf16.h", "vmath.h"))
# -ffp-contract=off: no product is fused into a following sum unless the source says so
# (decode.cpp's RMSNorm rounds each product where ATen does, to give ATen's bits).
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off")
ABI_VERSION = 9
_status: dict[str, str] = {"state": "not built"}


def _torch_flags() -> tuple[list[str], list[str]]:
    """Include flags, and link flags (after the source: linkers drop libraries named before the
    objects that need them) for ATen/Parallel.h, against this torch. ``at::parallel_for`` is an
    inline ``#pragma omp parallel``: with ``-fopenmp`` and torch's lib directory as rpath, the
    library needs ``libgomp.so.1``, which the loader resolves to the copy torch already loaded,
    so there is one OpenMP pool (checked: ``ldd`` / ``/proc/self/maps`` show one libgomp)."""
    root = Path(torch.__file__).parent
    return [f"-I{root / 'include'}"], [f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10",
                                        f"-Wl,-rpath,{root / 'lib'}"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _source_text() -> str:
    return "\n".join(p.read_text() for p in SOURCES + HEADERS)


def _key(cxx: str, source: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = "?"
    inc, link = _torch_flags()
    blob = "\n".join([source, cxx, version, " ".join(FLAGS + tuple(inc + link)), _cpu_flags(),
                      torch.__version__, str(ABI_VERSION)])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _build(cxx: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build.", suffix=".so")
    os.close(fd)
    try:
        inc, link = _torch_flags()
        proc = subprocess.run([cxx, *FLAGS, *inc, *map(str, SOURCES), "-o", tmp, *link],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.optc_native_abi_version() != ABI_VERSION:
        raise OSError(f"{path}: ABI version {lib.optc_native_abi_version()} != {ABI_VERSION}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, args in (("optc_int4_tile64_to_bf16_t", [p, p, p] + [i64] * 6),
                       ("optc_gemv_int8", [p, p, p, p, i32] + [i64] * 4),
                       ("optc_gemm_int8_amx", [p, p, p, p, i32] + [i64] * 4),
                       ("optc_gemv_int4", [p, p, p, p, i32] + [i64] * 6 + [i32]),
                       ("optc_gemm_panel", [i32, p, p, p, p, i32] + [i64] * 6),
                       ("optc_gemv_multi", [i32, p, i32, p, p, p, p, p, i64, i64, i32]),
                       ("optc_gemv_features", []),
                       ("optc_decode_features", []),
                       ("optc_add_rms_norm", [p] * 5 + [i32] * 3 + [i64] * 2 + [ctypes.c_float]),
                       ("optc_decode_attention", [p] * 5 + [i32] * 3 + [i64] * 7 + [p] * 5
                        + [i32, ctypes.c_float]),
                       ("optc_rope", [p] * 4 + [i32] + [p] * 5)):
        f = getattr(lib, name)
        f.restype, f.argtypes = ctypes.c_int, args
    return lib


@lru_cache(maxsize=None)
def _library(cache_root: str) -> ctypes.CDLL | None:
    cxx = _compiler()
    if cxx is None:
        _status.update(state="unavailable", reason="no C++ compiler found ($CXX, c++, g++, clang++)")
        return None
    path = Path(cache_root) / "native" / _key(cxx, _source_text()) / "liboptc_native.so"
    try:
        if not path.exists():
            _build(cxx, path)
        try:
            lib = _load(path)
        except OSError:                      # truncated / corrupt cache entry: rebuild once
            path.unlink(missing_ok=True)
            _build(cxx, path)
            lib = _load(path)
    except Exception as e:  # noqa: BLE001 - any failure means: use the torch paths, and say why
        _status.update(state="unavailable", reason=f"{type(e).__name__}: {e}"[:500])
        return None
    _status.update(state="loaded", reason=str(path))
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native library, building it on first use; None when disabled or unavailable."""
    if not knobs.NATIVE.get():
        _status.update(state="disabled", reason="OPTC_NATIVE=0")
        return None
    return _library(str(knobs.cache_dir()))


def status() -> dict[str, str]:
    """{"state": "loaded" | "unavailable" | "disabled" | "not built", "reason": ...}."""
    return dict(_status)


def int4_weight_t_bf16(w_int4: Tensor, scales_zeros: Tensor, group_size: int, k: int, *,
                       cols: tuple[int, int] | None = None, out: Tensor | None = None
                       ) -> Tensor | None:
    """W^T (K, Np) bf16 of a tile-64 int4 weight, bit-identical to
    ``optc.ops.quant.int4_weight_t_bf16_torch``, or only its output columns ``cols = (n0, n1)``
    (multiples of 64) as a (K, n1 - n0) tensor, written into ``out`` when given (a reused chunk
    buffer: a fresh multi-100-MB tensor costs more in page faults than the dequantization).
    None when the native library is not available or the tensors are not contiguous CPU tensors
    of the expected layout (then use the torch path)."""
    np_ = w_int4.shape[0]
    if (w_int4.device.type != "cpu" or w_int4.dtype != torch.uint8 or w_int4.dim() != 2
            or w_int4.shape[1] * 2 != k or np_ % 64 or group_size <= 0 or k % group_size
            or scales_zeros.dtype != torch.bfloat16
            or tuple(scales_zeros.shape) != (k // group_size, np_, 2)
            or not w_int4.is_contiguous() or not scales_zeros.is_contiguous()):
        return None
    lib = library()
    if lib is None:
        return None
    n0, n1 = cols if cols is not None else (0, np_)
    if n0 % 64 or n1 % 64 or not 0 <= n0 < n1 <= np_:
        raise ValueError(f"cols must be multiples of 64 within [0, {np_}], got {cols}")
    width = n1 - n0
    if out is None:
        out = torch.empty(k, width, dtype=torch.bfloat16)
    elif (out.dtype != torch.bfloat16 or out.device.type != "cpu" or out.shape[0] != k
          or out.shape[1] < width or out.stride(1) != 1):
        raise ValueError(f"out must be a CPU bf16 ({k}, >= {width}) tensor with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    rc = lib.optc_int4_tile64_to_bf16_t(w_int4.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(),
                                        k, np_, group_size, n0 // 64, n1 // 64, out.stride(0))
    if rc != 0:
        raise RuntimeError(f"optc native int4 dequant rejected its arguments (code {rc}): "
                           f"w {tuple(w_int4.shape)}, scales_zeros {tuple(scales_zeros.shape)}, "
                           f"group {group_size}, k {k}, cols {cols}")
    return out[:, :width] if out.shape[1] != width else out


# bits of optc_gemv_features(), and DECODE for optc_decode_features() (decode.cpp's kernels)
INT8_GEMV, INT4_GEMV, INT4_AMX, DECODE = 1, 2, 4, 8
AMX = INT4_AMX        # the AMX kernels (int4 and int8 GEMM): compiled in and granted


_HOT: dict[str | None, tuple[ctypes.CDLL | None, int]] = {}


def _hot() -> tuple[ctypes.CDLL | None, int]:
    """(library, features) for the per-call paths: ``library()`` resolves the cache directory
    and reads knobs (~20 us), too slow for a decode step's ~150 matmuls, so its answer is kept
    per value of ``OPTC_NATIVE``. :func:`reset` forgets it."""
    key = os.environ.get(knobs.NATIVE.name)
    hit = _HOT.get(key)
    if hit is None:
        lib = library()
        hit = _HOT[key] = (lib, 0 if lib is None else int(lib.optc_gemv_features())
                           | (DECODE if lib.optc_decode_features() else 0))
    return hit


def reset() -> None:
    """Forget the loaded library (the next call builds or loads it again), e.g. after the
    cache directory changed."""
    _library.cache_clear()
    _HOT.clear()


def features() -> int:
    """Which kernels this build has on this CPU (``INT8_GEMV | INT4_GEMV | INT4_AMX | DECODE``):
    0 without the library. AMX also needs the kernel to grant the process AMX state."""
    return _hot()[1]


_VALID: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}


def _weights_ok(key: tuple, a: Tensor, b: Tensor, check: Callable[[], bool]) -> bool:
    """``check()`` of a quantized weight pair, remembered per pair: the layout checks cost more
    than a decode GEMV's Python path may (~10 us of ~25), and optc's packed weights are its own
    constants, never reshaped in place. A hit needs both tensors to be the very objects
    checked (weak references: a recycled ``id`` is not mistaken for them)."""
    hit = _VALID.get(key)
    if hit is not None and hit[0]() is a and hit[1]() is b:
        return True
    if not check():
        return False
    if len(_VALID) > 4096:
        _VALID.clear()
    _VALID[key] = (weakref.ref(a), weakref.ref(b))
    return True


def _rows_of(x: Tensor, k: int) -> int:
    """Rows of a contiguous CPU bf16 activation (..., k), or 0 where the kernels cannot read it."""
    if x.dtype != torch.bfloat16 or not x.is_cpu or not x.is_contiguous() or x.dim() == 0 \
            or x.shape[-1] != k:
        return 0
    return x.numel() // k if k else 0


def _int8_layout_ok(w_int8: Tensor, scales: Tensor) -> bool:
    """The (N, K) int8 weight and (N,) bf16 scales the int8 GEMV reads (K % 16)."""
    if w_int8.dim() != 2:
        return False
    n, k = w_int8.shape
    return (w_int8.dtype == torch.int8 and scales.dtype == torch.bfloat16 and k % 16 == 0
            and scales.dim() == 1 and scales.shape[0] == n and w_int8.is_cpu and scales.is_cpu
            and w_int8.is_contiguous() and scales.is_contiguous())


def _int4_layout_ok(w_int4: Tensor, scales_zeros: Tensor, group_size: int, n: int) -> bool:
    """The tile-64 int4 weight and its (K/G, Np, 2) bf16 scales/zeros the int4 kernels read."""
    if w_int4.dim() != 2:
        return False
    np_, k = w_int4.shape[0], 2 * w_int4.shape[1]
    return (w_int4.dtype == torch.uint8 and np_ % 64 == 0 and group_size > 0
            and group_size % 2 == 0 and k % group_size == 0 and 0 < n <= np_
            and scales_zeros.dtype == torch.bfloat16
            and tuple(scales_zeros.shape) == (k // group_size, np_, 2)
            and w_int4.is_cpu and scales_zeros.is_cpu and w_int4.is_contiguous()
            and scales_zeros.is_contiguous())


def int8_matmul(x: Tensor, w_int8: Tensor, scales: Tensor, out_dtype: torch.dtype, *,
                amx: bool = False) -> Tensor | None:
    """``x (..., K) bf16 @ (w_int8 (N, K) * scales (N,)).T`` as (..., N), bf16 when ``out_dtype``
    is bf16 else fp32 (fp32 sums of exact products). Without ``amx`` the AVX-512 GEMV (meant for
    a few rows: it reads the weight once per 4 rows); with it the AMX GEMM (K % 32; None where
    AMX is unavailable). None when the kernel is not available or the arguments are not the
    layout it reads (K % 16, contiguous CPU tensors)."""
    n, k = w_int8.shape if w_int8.dim() == 2 else (0, 0)
    m = _rows_of(x, k)
    if m == 0 or not _weights_ok(
            (id(w_int8), id(scales)), w_int8, scales, lambda: _int8_layout_ok(w_int8, scales)):
        return None
    lib, feats = _hot()
    if not feats & (AMX if amx else INT8_GEMV) or (amx and k % 32):
        return None
    bf = out_dtype == torch.bfloat16
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16 if bf else torch.float32)
    fn = lib.optc_gemm_int8_amx if amx else lib.optc_gemv_int8
    rc = fn(x.data_ptr(), w_int8.data_ptr(), scales.data_ptr(), y.data_ptr(), int(bf), m, k, n, n)
    if rc != 0:
        raise RuntimeError(f"optc native int8 {'AMX GEMM' if amx else 'GEMV'} rejected its "
                           f"arguments (code {rc}): x {tuple(x.shape)}, w {tuple(w_int8.shape)}")
    return y


def int4_matmul(x: Tensor, w_int4: Tensor, scales_zeros: Tensor, group_size: int, n: int,
                out_dtype: torch.dtype, *, amx: bool) -> Tensor | None:
    """``x (..., K) bf16 @ dequantize(tile-64 int4).T`` as (..., n): with ``amx`` the AMX GEMM
    (any M; None where AMX is unavailable or the group is not 32, 64, 96 or 128), else the
    AVX512-BF16 GEMV (meant for M of 1-2: it decodes the weight once per 4 rows). Output bf16
    when ``out_dtype`` is bf16 else fp32. None when the kernel is not available or the
    arguments are not the layout it reads."""
    np_, half_k = w_int4.shape if w_int4.dim() == 2 else (0, 0)
    k = 2 * half_k
    m = _rows_of(x, k)
    if m == 0 or not _weights_ok(
            (id(w_int4), id(scales_zeros), group_size, n), w_int4, scales_zeros,
            lambda: _int4_layout_ok(w_int4, scales_zeros, group_size, n)):
        return None
    lib, feats = _hot()
    amx_group = group_size % 32 == 0 and group_size <= 128       # gemv.cpp buffers 4 chunks
    if not feats & (INT4_AMX if amx else INT4_GEMV) or (amx and not amx_group):
        return None
    bf = out_dtype == torch.bfloat16
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16 if bf else torch.float32)
    rc = lib.optc_gemv_int4(x.data_ptr(), w_int4.data_ptr(), scales_zeros.data_ptr(),
                            y.data_ptr(), int(bf), m, k, np_, n, group_size, n, int(amx))
    if rc != 0:
        raise RuntimeError(f"optc native int4 matmul rejected its arguments (code {rc}): "
                           f"x {tuple(x.shape)}, w {tuple(w_int4.shape)}, group {group_size}")
    return y



def panel_matmul(kind: str, x: Tensor, w: Tensor, aux: Tensor, group_size: int, n: int,
                 out_dtype: torch.dtype) -> Tensor | None:
    """``x (..., K) bf16 @ dequantize(W).T`` as (..., n) by the AVX512-BF16 panel GEMM (gemv.cpp
    ``panel_gemm``: each 64-channel x 256-k panel of the weight decoded once per call to bf16
    and used by every row; the prefill path where AMX is not there). ``kind`` "int8" (aux =
    scales, n = N) or "int4" (tile-64, aux = scales_zeros). The numbers are the dequant path's
    (bf16 weights as ``int4_weight_t_bf16`` rounds them, fp32 sums). Output bf16 when
    ``out_dtype`` is bf16 else fp32. None when the kernel is not available or the arguments
    are not the layout it reads."""
    if kind == "int8":
        n, k = w.shape if w.dim() == 2 else (0, 0)
        np_, code, ok = n, 0, lambda: _int8_layout_ok(w, aux)
    elif kind == "int4":
        np_, k = (w.shape[0], 2 * w.shape[1]) if w.dim() == 2 else (0, 0)
        code, ok = 1, lambda: _int4_layout_ok(w, aux, group_size, n)
    else:
        raise ValueError(f"panel_matmul: kind must be 'int8' or 'int4', got {kind!r}")
    m = _rows_of(x, k)
    if m == 0 or not _weights_ok((id(w), id(aux), kind, group_size, n), w, aux, ok):
        return None
    lib, feats = _hot()
    if not feats & INT4_GEMV:             # panel_gemm needs AVX512-BF16, as the int4 GEMV
        return None
    bf = out_dtype == torch.bfloat16
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16 if bf else torch.float32)
    rc = lib.optc_gemm_panel(code, x.data_ptr(), w.data_ptr(), aux.data_ptr(), y.data_ptr(),
                             int(bf), m, k, np_, n, group_size if code else 0, n)
    if rc != 0:
        raise RuntimeError(f"optc native {kind} panel GEMM failed (code {rc}): x "
                           f"{tuple(x.shape)}, w {tuple(w.shape)}, group {group_size}")
    return y

def _gemv_shape(kind: str, feats: int, w: Tensor, aux: Tensor, group_size: int, n: int
                ) -> tuple[int, int, int] | None:
    """(K, Np, N) of one constant weight the one-row GEMV kernels can read, else None."""
    if kind == "int8":
        if not feats & INT8_GEMV or not _int8_layout_ok(w, aux):
            return None
        return w.shape[1], w.shape[0], w.shape[0]
    if kind == "int4":
        if not feats & INT4_GEMV or not _int4_layout_ok(w, aux, group_size, n):
            return None
        return 2 * w.shape[1], w.shape[0], n
    raise ValueError(f"one-row GEMV: kind must be 'int8' or 'int4', got {kind!r}")


def gemv_bound(kind: str, w: Tensor, aux: Tensor, group_size: int, n: int
               ) -> Callable[[Tensor], Tensor | None] | None:
    """The one-row decode GEMV of one constant weight as ``f(x) -> y or None``: the layout
    checks, the library lookup and the weight pointers are done here, once; ``f`` checks only x
    (a contiguous CPU bf16 (..., K) with one row: else None, and the caller takes its general
    path) and returns bf16 (..., n). ``kind``: "int8" (aux = scales, n = N) or "int4" (aux =
    scales_zeros). None when the kernel cannot read this weight. About half the Python time of
    ``int8_matmul``/``int4_matmul`` per call (measured: 16 -> ~8 us hot on this machine), and a
    decode step makes ~150 of these calls."""
    lib, feats = _hot()
    if lib is None:
        return None
    shape = _gemv_shape(kind, feats, w, aux, group_size, n)
    if shape is None:
        return None
    k, np_, n = shape
    if kind == "int8":
        fn, tail = lib.optc_gemv_int8, (1, 1, k, n, n)
    else:
        fn, tail = lib.optc_gemv_int4, (1, 1, k, np_, n, group_size, n, 0)
    wp, ap = w.data_ptr(), aux.data_ptr()
    bf16, empty = torch.bfloat16, torch.empty

    def run(x: Tensor) -> Tensor | None:
        if x.dtype != bf16 or not x.is_cpu or not x.is_contiguous() or x.shape[-1] != k \
                or x.numel() != k or w.data_ptr() != wp or aux.data_ptr() != ap:
            return None
        y = empty(*x.shape[:-1], n, dtype=bf16)
        rc = fn(x.data_ptr(), wp, ap, y.data_ptr(), *tail)
        if rc != 0:
            raise RuntimeError(f"optc native {kind} GEMV rejected its arguments (code {rc}): "
                               f"x {tuple(x.shape)}, w {tuple(w.shape)}")
        return y
    return run


def gemv_multi_bound(kind: str, ws: list[Tensor], auxs: list[Tensor], group_size: int,
                     ns: list[int], *, swiglu: bool = False
                     ) -> Callable[[Tensor], list[Tensor] | Tensor | None] | None:
    """One-row GEMVs of several constant weights of one K as one native call (one parallel
    region, one pass over x): ``f(x) -> [y_i]``, or with ``swiglu`` (two weights of one N)
    ``f(x) -> silu(y_0) * y_1``, bf16 (..., n). The checks of :func:`gemv_bound` are done here
    once; ``f`` checks only x and returns None where it is not a contiguous CPU bf16 row.
    None when the kernel cannot read these weights (then call them one by one)."""
    lib, feats = _hot()
    nw = len(ws)
    if lib is None or not 1 <= nw <= 8 or len(auxs) != nw or len(ns) != nw:
        return None
    shapes = [_gemv_shape(kind, feats, w, a, group_size, n) for w, a, n in zip(ws, auxs, ns)]
    if any(sh is None for sh in shapes):
        return None
    ks, nps, outs = zip(*shapes)
    if len(set(ks)) != 1 or list(outs) != list(ns) or \
            (swiglu and (nw != 2 or len(set(zip(nps, outs))) != 1)):
        return None
    k, sw = ks[0], int(swiglu)
    code, g = (0, 0) if kind == "int8" else (1, group_size)
    ptrs, sizes = ctypes.c_void_p * nw, ctypes.c_int64 * nw
    pairs = [(t, t.data_ptr()) for t in (*ws, *auxs)]
    w_arr, a_arr = ptrs(*(p for _, p in pairs[:nw])), ptrs(*(p for _, p in pairs[nw:]))
    np_arr, n_arr = sizes(*nps), sizes(*outs)
    fn, bf16, empty = lib.optc_gemv_multi, torch.bfloat16, torch.empty

    def run(x: Tensor) -> list[Tensor] | Tensor | None:
        if x.dtype != bf16 or not x.is_cpu or not x.is_contiguous() or x.shape[-1] != k \
                or x.numel() != k or any(t.data_ptr() != p for t, p in pairs):
            return None
        lead = x.shape[:-1]
        ys = [empty(*lead, n, dtype=bf16) for n in outs]
        rc = fn(code, x.data_ptr(), nw, w_arr, a_arr, ptrs(*(y.data_ptr() for y in ys)), np_arr,
                n_arr, k, g, sw)
        if rc != 0:
            raise RuntimeError(f"optc native multi-GEMV rejected its arguments (code {rc}): "
                               f"{kind}, x {tuple(x.shape)}, weights "
                               f"{[tuple(w.shape) for w in ws]}")
        return ys[0] if swiglu else ys
    return run


# ---- decode-step kernels (decode.cpp) ----------------------------------------------------------

_DT = {torch.float32: 0, torch.bfloat16: 1}


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
                 ) -> tuple[Tensor | None, Tensor] | None:
    """``(h, y)`` of ``optc::add_rms_norm`` (``residual`` None: ``optc::rms_norm``, h None),
    bit-identical to the ATen composite in ``optc.ops.norms``; None (use ATen) unless x,
    residual and weight are contiguous CPU tensors of fp32/bf16, x and residual of one dtype
    and shape, the weight (C,), C >= 8. The checks are the cheap attribute reads (``is_cpu``,
    int compares): this runs twice per layer per decoded token."""
    dt = _DT.get(x.dtype)
    dtw = _DT.get(weight.dtype)
    c = x.shape[-1] if x.dim() else 0
    if (dt is None or dtw is None or c < 8 or not x.is_cpu or not weight.is_cpu
            or weight.dim() != 1 or weight.shape[0] != c or not x.is_contiguous()
            or not weight.is_contiguous()
            or residual is not None and (residual.dtype != x.dtype or not residual.is_cpu
                                         or residual.shape != x.shape
                                         or not residual.is_contiguous())):
        return None     # (c < 8: ATen sums fp32 rows of 5-7 in another order, measured)
    rows = x.numel() // c
    if rows == 1 and c >= 32768:
        return None     # ATen splits one long row's sum over its threads: another order
    lib, feats = _hot()
    if not feats & DECODE:
        return None
    ydt = x.dtype if dtw == dt else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty_like(x) if ydt == x.dtype else torch.empty_like(x, dtype=ydt)
    if residual is None:
        rc = lib.optc_add_rms_norm(x.data_ptr(), None, weight.data_ptr(), None, y.data_ptr(),
                                   dt, dtw, _DT[ydt], rows, c, eps)
        h = None
    else:
        h = torch.empty_like(x)
        rc = lib.optc_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                   h.data_ptr(), y.data_ptr(), dt, dtw, _DT[ydt],
                                   rows, c, eps)
    if rc == 9:             # built without the instructions it needs: ATen
        return None
    if rc != 0:
        raise RuntimeError(f"optc native add_rms_norm rejected its arguments (code {rc}): "
                           f"x {tuple(x.shape)} {x.dtype}, weight {weight.dtype}")
    return h, y


DECODE_MAX_TQ = 16      # query rows up to which attention() runs (decode and short verifies)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
              ) -> Tensor | None:
    """``optc::attention`` for up to ``DECODE_MAX_TQ`` query rows (fp32 sums and probabilities);
    None (use ATen's flash kernel) for longer queries, other dtypes, head sizes above 256, a
    mask of another dtype than bool / q's, or operands whose last dimension is strided. Shapes
    are checked by the caller (``optc.ops.attention._check``)."""
    B, H, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    dt = _DT.get(q.dtype)
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    if (tq > DECODE_MAX_TQ or dt is None or k.dtype != q.dtype or v.dtype != q.dtype or d > 256
            or dv > 256 or tk == 0 or B == 0 or not q.is_cpu or not k.is_cpu or not v.is_cpu
            or qs[3] != 1 or ks[3] != 1 or vs[3] != 1):
        return None
    kind, mdt, mptr, mst = 0, 0, None, (0, 0, 0, 0)
    if mask is not None:
        if not mask.is_cpu:
            return None
        if mask.dtype == torch.bool:
            kind = 1
        elif mask.dtype in _DT:
            kind, mdt = 2, _DT[mask.dtype]
        else:
            return None
        mst = mask.stride()                     # broadcast dimensions get stride 0
        if mask.dim() < 4 or any(n == 1 for n in mask.shape):
            mst = mask.expand(B, H, tq, tk).stride()
        mptr = mask.data_ptr()
    lib, feats = _hot()
    if not feats & DECODE:
        return None
    out = torch.empty_like(q) if dv == d else q.new_empty(B, H, tq, dv)
    arr = ctypes.c_int64 * 4
    rc = lib.optc_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mptr, out.data_ptr(), dt, kind, mdt,
        B, H, hkv, tq, tk, d, dv, arr(*qs), arr(*ks), arr(*vs),
        arr(*mst), arr(*out.stride()), int(causal), scale)
    if rc == 9:
        return None
    if rc != 0:
        raise RuntimeError(f"optc native decode attention rejected its arguments (code {rc}): "
                           f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return out


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor | None:
    """``optc::rope`` (``x * cos + rotate_half(x) * sin``) bit-identical to eager, into
    ``empty_like(x)``; None (use the ATen composite) unless x is a 4-D CPU tensor of fp32/bf16
    with an even, unit-stride last dimension, and cos/sin are of its dtype and broadcast to it."""
    dt = _DT.get(x.dtype)
    if (dt is None or x.dim() != 4 or cos.dtype != x.dtype or sin.dtype != x.dtype
            or not x.is_cpu or not cos.is_cpu or not sin.is_cpu or x.shape[3] % 2
            or x.stride(3) != 1 and x.shape[3] > 1):
        return None
    try:
        c4, s4 = cos.expand(x.shape), sin.expand(x.shape)
    except RuntimeError:
        return None
    if c4.stride(3) != 1 and x.shape[3] > 1 or s4.stride(3) != 1 and x.shape[3] > 1:
        return None
    lib, feats = _hot()
    if not feats & DECODE:
        return None
    out = torch.empty_like(x)
    if out.stride(3) != 1 and x.shape[3] > 1:
        return None
    arr = ctypes.c_int64 * 4
    rc = lib.optc_rope(x.data_ptr(), c4.data_ptr(), s4.data_ptr(), out.data_ptr(), dt,
                       arr(*x.shape), arr(*x.stride()), arr(*c4.stride()), arr(*s4.stride()),
                       arr(*out.stride()))
    if rc == 9:
        return None
    if rc != 0:
        raise RuntimeError(f"optc native rope rejected its arguments (code {rc}): x {tuple(x.shape)}")
    return out

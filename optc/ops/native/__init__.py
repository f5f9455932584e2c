"""optc's native CPU kernels (``dequant.cpp``): built on first use, cached, optional.

The C++ file has a plain C ABI and includes only ATen/Parallel.h (torch's thread pool), so it
compiles in about a second with the system C++ compiler (``$CXX``, else ``c++``/``g++``) at
``-O3 -march=native``; it is loaded with ctypes, which releases the GIL during calls. The shared
library is cached under ``<optc cache>/native/<hash>/`` keyed by the source, the compiler's
version, the flags, this CPU's instruction-set flags and the torch version (a cache shared
between machines never loads a binary built for another CPU). Writes are atomic (build into a temporary file, then ``os.replace``); a library
that does not load is deleted and rebuilt once.

Without a compiler, or with ``OPTC_NATIVE=0``, :func:`library` is None and callers use their
torch paths; :func:`status` says which and why (``optc inspect`` prints it).

    from optc.ops import native
    wt = native.int4_weight_t_bf16(w_int4, scales_zeros, group_size, k)   # None: use torch
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from optc import knobs

SOURCE = Path(__file__).with_name("dequant.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
ABI_VERSION = 3
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
        proc = subprocess.run([cxx, *FLAGS, *inc, str(SOURCE), "-o", tmp, *link],
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
    f = lib.optc_int4_tile64_to_bf16_t
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    return lib


@lru_cache(maxsize=None)
def _library(cache_root: str) -> ctypes.CDLL | None:
    cxx = _compiler()
    if cxx is None:
        _status.update(state="unavailable", reason="no C++ compiler found ($CXX, c++, g++, clang++)")
        return None
    path = Path(cache_root) / "native" / _key(cxx, SOURCE.read_text()) / "liboptc_native.so"
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

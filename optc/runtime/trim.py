"""Give freed heap memory back to the operating system after a compile.

Compiling allocates large temporaries (quantize_weights works in fp32 per layer, the cast
presets make a new copy of every weight) between long-lived allocations (quantized weights,
graph metadata). glibc only trims the top of its heap, so the freed memory below a live block
stays resident: measured on the TinyLlama-1.1B shape, optc-int4-g128-bf16 left the process
at 4.24 GB RSS after compiling with 3.08 GB live; ``malloc_trim(0)`` returns the free pages
(``MADV_DONTNEED``) and costs a few milliseconds. Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    except OSError:
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where glibc provides it; True if memory was returned."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False

"""Measure the peak bytes of tensor storage a call allocates (eager or compiled).

A dispatch mode records every storage an op returns that did not exist before the call,
and a weakref finalizer subtracts it when the storage dies; the maximum of the running sum
is the peak. Parameters and inputs are excluded (they exist before and after). CPU has no
``torch.cuda.max_memory_allocated``; this counts the same thing for any device. Storages
a Program writes into its arena are excluded (``measure_program_peak``): the arena is
reported on its own.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageTracker(TorchDispatchMode):
    def __init__(self, external: Iterable[torch.Tensor]):
        super().__init__()
        self.external = {id(t.untyped_storage()) for t in external}
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self.live or key in self.external:
                continue
            n = st.nbytes()
            self.live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measure_peak_bytes(fn: Callable[..., Any], *args: Any, external: Iterable[torch.Tensor] = (),
                       **kwargs: Any) -> int:
    """Peak bytes of new storage alive at once during ``fn(*args, **kwargs)``."""
    ext = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)] + list(external)
    tracker = _StorageTracker(ext)
    with tracker:
        out = fn(*args, **kwargs)
    del out
    return tracker.peak


def measure_program_peak(program: Any, inputs: tuple) -> int:
    """Peak bytes a Program's ops allocate beyond its arena, inputs and constants."""
    ext: list[torch.Tensor] = [t for t in inputs if isinstance(t, torch.Tensor)]
    ext += [v for v in program._globals.values() if isinstance(v, torch.Tensor)]
    if program.planned and not torch.is_grad_enabled():
        ext += program.plan_for(inputs).slots
    return measure_peak_bytes(program, *inputs, external=ext)


def module_tensors(m: torch.nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]

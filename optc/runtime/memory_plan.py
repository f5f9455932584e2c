"""Static memory planning for intermediates: liveness + greedy-by-size offsets in one arena.

Stages: (1) the lowering marks which values may live in the arena (functional ops with an
``out=`` form, dense strides, not escaping as outputs) and gives each a live interval
[def, last use] extended over every view/alias of it; (2) for concrete sizes, this module
places intervals with the greedy-by-size heuristic (largest first, lowest offset that
overlaps no placed buffer alive at the same time), as TFLite/XLA do. The liveness lower
bound (peak sum of simultaneously live bytes) is reported beside the arena size. Optimal
placement (CP-SAT NoOverlap2D) and tier placement are left to the ``plan_memory`` search.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64  # bytes: cache line, and AVX-512 vector width


@dataclass(frozen=True)
class Buffer:
    start: int   # instruction index of the definition
    end: int     # last instruction index that reads it (inclusive)
    size: int    # bytes


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def lower_bound(buffers: list[Buffer]) -> int:
    """Max over time of the bytes live at once (aligned sizes): no placement can beat it."""
    events: dict[int, int] = {}
    for b in buffers:
        events[b.start] = events.get(b.start, 0) + aligned(b.size)
        events[b.end + 1] = events.get(b.end + 1, 0) - aligned(b.size)
    peak = cur = 0
    for t in sorted(events):
        cur += events[t]
        peak = max(peak, cur)
    return peak


def greedy_by_size(buffers: list[Buffer]) -> tuple[list[int], int]:
    """Offsets for each buffer and the arena size."""
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, buffers[i].start))
    placed: list[tuple[int, int, Buffer]] = []   # (offset, aligned size, buffer)
    offsets = [0] * len(buffers)
    arena = 0
    for i in order:
        b = buffers[i]
        need = aligned(b.size)
        conflicts = sorted((off, sz) for off, sz, o in placed
                           if not (o.end < b.start or b.end < o.start))
        off = 0
        for c_off, c_sz in conflicts:
            if off + need <= c_off:
                break
            off = max(off, c_off + c_sz)
        offsets[i] = off
        placed.append((off, need, b))
        arena = max(arena, off + need)
    return offsets, arena

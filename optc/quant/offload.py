"""Moving the float weights that quantization replaced out of RAM. They stay the model's.

After ``quantize_weights`` replaced a linear, the compiled graphs no longer read its float
weight. The user's module still holds it, and so does the captured graph, which holds the same
Parameter objects. On the TinyLlama-1.1B shape that is 2.1 GB of bf16 beside 0.6 GB of int4.

torchao frees such weights by replacing the module's weights in place. optc keeps the module
whole, because three things still read the true values: its eager forward, its
``state_dict``, and a later re-capture. So each such tensor's storage goes to a file-backed
mapping instead:
1. the bytes are written to a file in optc's cache directory;
2. the file is mapped (``torch.from_file(shared=True)``) and swapped in with ``.data``;
3. the file is unlinked at once.

Its blocks are freed when the mapping goes: at exit, or when the parameter is replaced. The
Parameter objects stay the same objects, with the same shape, dtype, strides and values, so
Dynamo's guards still hold and nothing recompiles. A later read pages the bytes back in from
disk: slower, same numbers.

``offload`` skips a tensor, and says why, where moving it would not free its memory or might
not be safe:
- not a contiguous CPU tensor that owns its whole storage (a view of a larger tensor: the base
  would stay alive);
- under ``MIN_BYTES``;
- a cache directory on tmpfs (the file would be RAM again);
- not enough free disk for the file plus a margin.

Any failure to write or map leaves the tensor as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

MIN_BYTES = 1 << 20                  # smaller tensors free too little to be worth a file each
DISK_MARGIN_BYTES = 1 << 30          # leave this much of the cache directory's disk free
# id(tensor) -> (weak reference to it, its mapped storage): the storage is held so its identity
# is never reused while the entry lives; an entry whose tensor died or moved to another storage
# is dropped when next looked at
_MAPPED: dict[int, tuple[weakref.ref, torch.UntypedStorage]] = {}


def weak_entry(table: dict, t: Tensor) -> weakref.ref:
    """A weak reference to ``t`` that removes ``table[id(t)]`` when ``t`` dies, unless the key
    has since been taken by another entry (a recycled id)."""
    key = id(t)

    def forget(ref: weakref.ref) -> None:
        hit = table.get(key)
        if hit is not None and hit[0] is ref:
            del table[key]
    return weakref.ref(t, forget)


def is_offloaded(t: Tensor) -> bool:
    """Whether ``t``'s storage is (still) the file mapping ``offload`` gave it."""
    hit = _MAPPED.get(id(t))
    if hit is None:
        return False
    if hit[0]() is t and t.untyped_storage()._cdata == hit[1]._cdata:
        return True
    del _MAPPED[id(t)]
    return False


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux /proc/mounts), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    p = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def why_not(t: Tensor) -> str | None:
    """Why ``t`` is not offloaded (a statistics key), or None when it can be."""
    if is_offloaded(t):
        return "already"
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_sparse or t.is_quantized:
        return "layout"
    nbytes = t.numel() * t.element_size()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes:
        return "shared_storage"
    if nbytes < MIN_BYTES:
        return "small"
    return None


def offload(tensors: list[Tensor], directory: Path) -> Counter[str]:
    """Move each tensor's storage to an unlinked file mapping under ``directory`` (module
    docstring). Statistics: ``offloaded`` (tensors), ``offloaded_mib``, ``offload_skipped.<why>``."""
    stats: Counter[str] = Counter()
    todo = []
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        why = why_not(t)
        if why is None:
            todo.append(t)
        else:
            stats[f"offload_skipped.{why}"] += 1
    if not todo:
        return stats
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        stats["offload_skipped.no_directory"] += len(todo)
        return stats
    if _fs_type(directory) in ("tmpfs", "ramfs"):
        stats["offload_skipped.tmpfs"] += len(todo)
        return stats
    need = sum(t.numel() * t.element_size() for t in todo)
    if shutil.disk_usage(directory).free < need + DISK_MARGIN_BYTES:
        stats["offload_skipped.disk_full"] += len(todo)
        return stats
    for t in todo:
        if _offload_one(t, directory):
            stats["offloaded"] += 1
            stats["offloaded_mib"] += round(t.numel() * t.element_size() / 2**20)
        else:
            stats["offload_skipped.io_error"] += 1
    if stats["offloaded"]:
        # the old storages were freed, but glibc keeps freed blocks below live ones resident
        from optc.runtime.trim import release_free_memory
        release_free_memory()
    return stats


def _offload_one(t: Tensor, directory: Path) -> bool:
    from optc.quant import serialize       # (imports this module)
    fp = serialize.remembered(t)           # still true after the move: carried over
    fd, name = tempfile.mkstemp(dir=directory, prefix=".weights.", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(t.detach().view(torch.uint8).reshape(-1).numpy()))
        mapped = torch.from_file(name, shared=True, size=t.numel(), dtype=t.dtype)
        with torch.no_grad():
            t.data = mapped.view(t.shape)
        _MAPPED[id(t)] = (weak_entry(_MAPPED, t), t.untyped_storage())
        if fp is not None:
            serialize.remember(t, fp)
        return True
    except (OSError, RuntimeError, ValueError):
        return False
    finally:
        try:
            os.unlink(name)          # the mapping keeps the blocks; they go with it
        except OSError:
            pass

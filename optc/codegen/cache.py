"""On-disk cache of generated kernel modules, with a per-process memo in front of it.

Layout under ``optc.knobs.cache_dir() / "kernels"`` (read at call time, so
``OPTC_CACHE_DIR`` can change between calls)::

    <key>.py     the generated module, exactly the rendered source
    <key>.json   metadata: key, entry, config, optc/triton versions, cache format

``key`` is the sha256 of (cache format, optc version, triton version, config, source): a new
Triton, a new optc or a changed template all miss instead of reusing a stale kernel.

Writes are atomic (temporary file in the same directory, then ``os.replace``); the ``.py`` is
written before the ``.json``, so the metadata file marks a complete entry. Loading validates
the entry: the metadata parses and names this key, the file's text hashes back to the key, the
module executes and defines the entry point. An entry failing any check is deleted, logged
under the ``codegen`` topic and rebuilt, and counted in ``stats().rebuilds``.

Why real files: ``@triton.jit`` reads its function's source with ``inspect.getsource``, which
needs the code object's file on disk. Why ``exec`` of the verified text rather than an import
by path: what runs is exactly the text whose hash was checked, and no ``.pyc`` is written next
to it that a rebuilt entry of the same size and mtime could be mistaken for.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import linecache
import os
import sys
import tempfile
import types
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Mapping

from optc import knobs

FORMAT = 1  # bump when the layout or the key recipe changes


@dataclass(frozen=True)
class CacheStats:
    memo_hits: int   # found in this process's memo
    hits: int        # found on disk and valid
    misses: int      # not on disk: written
    rebuilds: int    # on disk but invalid: deleted and written again


class BadEntry(Exception):
    """A cache entry on disk that cannot be used as it is."""


@cache
def _versions() -> tuple[str, str]:
    try:
        optc_version = importlib.metadata.version("optc")
    except importlib.metadata.PackageNotFoundError:
        optc_version = "unknown"  # running from a source tree; the source text still keys it
    import triton
    return optc_version, triton.__version__


def cache_key(source: str, config: Mapping[str, Any] | None = None) -> str:
    optc_version, triton_version = _versions()
    blob = json.dumps({"format": FORMAT, "optc": optc_version, "triton": triton_version,
                       "config": dict(config or {}), "source": source}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _log(msg: str) -> None:
    if knobs.log_enabled("codegen"):
        print(f"[optc:codegen] {msg}", file=sys.stderr)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class KernelCache:
    """Kernel modules on disk under ``root`` (default: the knob, read per call) + a memo."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._memo: dict[tuple[str, str, str, bool], Any] = {}
        self._counts: Counter[str] = Counter()

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else knobs.cache_dir() / "kernels"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.py", self.root / f"{key}.json"

    def stats(self) -> CacheStats:
        c = self._counts
        return CacheStats(c["memo_hits"], c["hits"], c["misses"], c["rebuilds"])

    def reset(self) -> None:
        """Forget the memo and the counters (tests; the files on disk stay)."""
        self._memo.clear()
        self._counts.clear()

    def load(self, source: str, entry: str, config: Mapping[str, Any] | None = None) -> Any:
        """``entry`` from the module ``source``: memo, else a valid disk entry, else build it."""
        config = dict(config or {})
        key = cache_key(source, config)
        root = self.root
        # @triton.jit picks interpreter or compiler when the module executes: keep one of each
        memo_key = (str(root), key, entry, knobs.TRITON_INTERPRET.get())
        if memo_key in self._memo:
            self._counts["memo_hits"] += 1
            return self._memo[memo_key]
        py, meta = root / f"{key}.py", root / f"{key}.json"
        if py.exists() or meta.exists():
            try:
                fn = self._read(key, entry, py, meta)
            except BadEntry as e:
                _log(f"kernel {key[:12]} ({entry}) rebuilt: {e}")
                for p in (py, meta):
                    p.unlink(missing_ok=True)
                self._counts["rebuilds"] += 1
            else:
                _log(f"kernel {key[:12]} ({entry}) hit: {py}")
                self._counts["hits"] += 1
                self._memo[memo_key] = fn
                return fn
        else:
            _log(f"kernel {key[:12]} ({entry}) miss: writing {py}")
            self._counts["misses"] += 1
        root.mkdir(parents=True, exist_ok=True)
        optc_version, triton_version = _versions()
        _atomic_write(py, source)
        _atomic_write(meta, json.dumps({
            "key": key, "entry": entry, "config": config, "format": FORMAT,
            "optc_version": optc_version, "triton_version": triton_version,
        }, indent=1, sort_keys=True) + "\n")
        fn = self._read(key, entry, py, meta)  # a fresh entry that fails is a generator bug
        self._memo[memo_key] = fn
        return fn

    def _read(self, key: str, entry: str, py: Path, meta_path: Path) -> Any:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            text = py.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BadEntry(f"unreadable: {e}") from e
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise BadEntry("metadata does not name this key")
        if not isinstance(meta.get("config"), dict) or cache_key(text, meta["config"]) != key:
            raise BadEntry("source does not hash to its key")
        name = f"optc_kernel_{key[:32]}"
        module = types.ModuleType(name)
        module.__file__ = str(py)
        linecache.checkcache(str(py))  # a rebuilt file must not be read back from stale lines
        try:
            exec(compile(text, str(py), "exec"), module.__dict__)
        except Exception as e:  # whatever the text raises, the entry is unusable
            raise BadEntry(f"module does not execute: {type(e).__name__}: {e}") from e
        if not hasattr(module, entry):
            raise BadEntry(f"module defines no {entry!r}")
        sys.modules[name] = module  # Triton's compile workers look kernels up by module name
        return getattr(module, entry)


DEFAULT = KernelCache()


def load(source: str, entry: str, config: Mapping[str, Any] | None = None) -> Any:
    return DEFAULT.load(source, entry, config)


def stats() -> CacheStats:
    return DEFAULT.stats()


def reset() -> None:
    DEFAULT.reset()

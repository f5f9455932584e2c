"""Every OPTC_* environment variable, typed, in one table.

Read knobs through the accessors here (never ``os.environ`` elsewhere) so that the
full set of switches is visible in one place and documented by ``optc knobs``.
Values are read at call time, not import time, so tests can ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Knob(Generic[T]):
    name: str
    default: T
    parse: Callable[[str], T]
    help: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}={raw!r} is not valid: {e}. {self.help}") from None


def _csv(raw: str) -> frozenset[str]:
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0/1/true/false")


def _positive_int(raw: str) -> int:
    v = int(raw)
    if v < 1:
        raise ValueError("expected an integer >= 1")
    return v


def _nonneg_int(raw: str) -> int:
    v = int(raw)
    if v < 0:
        raise ValueError("expected an integer >= 0")
    return v


def _path(raw: str) -> Path | None:
    return Path(raw).expanduser()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc"


LOG_TOPICS = frozenset({"passes", "stats", "timing", "codegen", "runtime", "capture"})

LOGS: Knob[frozenset[str]] = Knob(
    "OPTC_LOGS", frozenset(), _csv,
    f"comma-separated log topics to print to stderr: {', '.join(sorted(LOG_TOPICS))}",
)
DISABLE: Knob[frozenset[str]] = Knob(
    "OPTC_DISABLE", frozenset(), _csv, "comma-separated pass names to skip (ablation)",
)
DUMP_DIR: Knob[Path | None] = Knob(
    "OPTC_DUMP_DIR", None, _path,
    "directory for numbered, executable graph dumps (000_capture.py, 001_<pass>.py, ...)",
)
VERIFY: Knob[bool | None] = Knob(
    "OPTC_VERIFY", None, _bool,
    "verify the graph after every pass (default: on under pytest, off otherwise)",
)
STRICT: Knob[bool] = Knob(
    "OPTC_STRICT", False, _bool, "a pass that raises aborts compilation instead of being skipped",
)
CACHE_DIR: Knob[Path | None] = Knob(
    "OPTC_CACHE_DIR", None, _path, "on-disk kernel cache directory (default ~/.cache/optc)",
)
REPRO_DIR: Knob[Path | None] = Knob(
    "OPTC_REPRO_DIR", None, _path,
    "where reproducers of failing passes are written (default: a new temporary directory)",
)
MAX_PLANS: Knob[int] = Knob(
    "OPTC_MAX_PLANS", 8, _positive_int, "memory plans kept per compiled graph (one per input-shape set)",
)
BISECT_LIMIT: Knob[int | None] = Knob(
    "OPTC_BISECT_LIMIT", None, _nonneg_int,
    "apply at most this many rewrites in total across passes (bisection down to one rewrite)",
)
NATIVE: Knob[bool] = Knob(
    "OPTC_NATIVE", True, _bool,
    "build and use optc's native C++ CPU kernels (optc/ops/native); 0 runs the torch paths only",
)
TRITON_INTERPRET: Knob[bool] = Knob(
    "TRITON_INTERPRET", False, _bool,
    "Triton's own interpreter switch; read here only to know whether Triton can run on CPU",
)

ALL: tuple[Knob, ...] = (
    LOGS, DISABLE, DUMP_DIR, VERIFY, STRICT, CACHE_DIR, REPRO_DIR, MAX_PLANS, BISECT_LIMIT,
    NATIVE, TRITON_INTERPRET,
)


def log_enabled(topic: str) -> bool:
    assert topic in LOG_TOPICS, topic
    return topic in LOGS.get()


def verify_enabled() -> bool:
    v = VERIFY.get()
    if v is not None:
        return v
    return "PYTEST_CURRENT_TEST" in os.environ


def cache_dir() -> Path:
    return CACHE_DIR.get() or _default_cache_dir()

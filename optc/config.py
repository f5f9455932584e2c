"""Frozen, versioned, serializable configs: one per pass, plus the whole compile config.

A config is exactly what the search explores, what the logs print and what
``optc.compile(model, config=...)`` replays, so every config round-trips through
``to_dict``/``from_dict`` (JSON-safe) and validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="PassConfig")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is accepted."""


def _check_types(obj: Any) -> None:
    """Validate simple field types (bool/int/float/str and tuples of them) by annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, hint = getattr(obj, f.name), hints.get(f.name)
        allowed = _simple_types(hint)
        if allowed is None:
            continue
        if isinstance(v, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(v, tuple(allowed))
        if not ok:
            raise ConfigError(f"{type(obj).__name__}.{f.name}={v!r}: expected "
                              f"{' | '.join(t.__name__ for t in allowed)}")


def _simple_types(hint: Any) -> list[type] | None:
    if hint in (bool, str):
        return [hint]
    if hint is int:
        return [int]
    if hint is float:
        return [float, int]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        out: list[type] = []
        for a in args:
            sub = [type(None)] if a is type(None) else _simple_types(a)
            if sub is None:
                return None
            out += sub
        return out
    if typing.get_origin(hint) is tuple:
        return [tuple]
    return None


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses add fields; ``VERSION`` bumps on a field change."""

    VERSION: ClassVar[int] = 1
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_types(self)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["version"] = self.VERSION
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(
                f"{cls.__name__}: config version {version} but this optc reads version "
                f"{cls.VERSION}; re-run the search or drop the stale config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {sorted(unknown)}; accepted: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)


def _jsonable(v: Any) -> Any:
    if isinstance(v, PassConfig):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


FRONTENDS = ("dynamo", "export", "symbolic_trace")


@dataclass(frozen=True)
class CompileConfig:
    """The whole compilation: which pipeline, each pass's config, and runtime options.

    ``passes`` maps a pass name to its config dict; passes not named run with their
    defaults if they are in ``pipeline``. ``pipeline=None`` means the default pipeline.
    """

    VERSION: ClassVar[int] = 1
    pipeline: tuple[str, ...] | None = None
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    frontend: str = "dynamo"
    strict: bool | None = None          # None: OPTC_STRICT decides
    verify: bool | None = None          # None: on under pytest / OPTC_VERIFY
    plan_memory: bool = True            # static arena for intermediates
    max_plans: int | None = None        # None: OPTC_MAX_PLANS decides
    # Dynamo frontend: build guards with Dynamo's recursive dict-tag check (see optc.api);
    # False keeps Dynamo's full per-call guard evaluation
    fast_guards: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pipeline, list):
            object.__setattr__(self, "pipeline", tuple(self.pipeline))
        _check_types(self)
        if self.frontend not in FRONTENDS:
            raise ConfigError(f"CompileConfig.frontend={self.frontend!r}; accepted: {FRONTENDS}")
        if self.max_plans is not None and self.max_plans < 1:
            raise ConfigError("CompileConfig.max_plans must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["version"] = self.VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileConfig":
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"CompileConfig version {version}; this optc reads {cls.VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"CompileConfig: unknown field(s) {sorted(unknown)}; "
                              f"accepted: {sorted(names)}")
        if d.get("pipeline") is not None:
            d["pipeline"] = tuple(d["pipeline"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

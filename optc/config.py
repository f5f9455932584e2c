"""Frozen, versioned, serializable configs: one per pass, plus the whole compile config.

A config is exactly what the search explores, what the logs print and what
``optc.compile(model, config=...)`` replays, so every config round-trips through
``to_dict``/``from_dict`` (JSON-safe) and validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="PassConfig")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is accepted."""


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses add fields; ``VERSION`` bumps on a field change."""

    VERSION: ClassVar[int] = 1
    enabled: bool = True

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

    def __post_init__(self) -> None:
        if self.frontend not in FRONTENDS:
            raise ConfigError(f"CompileConfig.frontend={self.frontend!r}; accepted: {FRONTENDS}")
        if self.max_plans is not None and self.max_plans < 1:
            raise ConfigError("CompileConfig.max_plans must be >= 1")
        if self.pipeline is not None:
            object.__setattr__(self, "pipeline", tuple(self.pipeline))

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

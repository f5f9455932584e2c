"""What every pass is: ``run(gm, cfg) -> PassResult`` plus its registration record."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from optc.config import PassConfig


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    # Per-rule statistics, e.g. {"rule.add_rmsnorm": 4}. Exact counts: tests assert on them.
    stats: Counter[str] = field(default_factory=Counter)


PassFn = Callable[[fx.GraphModule, PassConfig], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: PassFn
    config_cls: type[PassConfig]
    summary: str                      # one line for `optc passes`
    source: str                       # paper / model that motivated it
    lossless: bool                    # exact up to floating-point reassociation
    after: tuple[str, ...] = ()       # must run after these passes when both are in a pipeline

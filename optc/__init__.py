"""optc: an optimizing compiler for PyTorch models (mostly transformer LLMs).

    import optc
    compiled = optc.compile(model)            # called exactly like model
    torch.compile(model, backend="optc")      # same pipeline, per Dynamo graph
"""

from __future__ import annotations

from optc.api import CompiledModel, CompileReport, compile, last_report, optc_backend
from optc.config import CompileConfig, ConfigError, PassConfig

__all__ = ["compile", "CompiledModel", "CompileReport", "CompileConfig", "ConfigError",
           "PassConfig", "optc_backend", "last_report"]
__version__ = "0.1.0"

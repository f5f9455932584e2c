"""PassManager: runs a pipeline of registered passes with verification, timing, statistics,
dumps, crash reproducers and rewrite-budget bisection.

A pass that raises (or leaves a graph the verifier rejects) is reported with a reproducer
directory and the graph is left exactly as it was before that pass; compilation continues
unless strict mode is on.
"""

from __future__ import annotations

import contextvars
import json
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx

from optc import knobs
from optc.config import CompileConfig, ConfigError
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes.base import PassInfo, PassResult


class PassFailure(RuntimeError):
    """A pass raised in strict mode."""


@dataclass
class PassRecord:
    name: str
    modified: bool = False
    stats: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    skipped: str | None = None          # why it did not run ("disabled by OPTC_DISABLE", ...)
    error: str | None = None            # one line; the reproducer has the rest
    reproducer: Path | None = None
    graph_after: str | None = None      # compact text, when recording and modified


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    records: list[PassRecord]
    graph_before: str | None = None

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def stats(self) -> dict[str, dict[str, int]]:
        return {r.name: dict(r.stats) for r in self.records if r.stats}


# ---- bisection: a global budget of rewrites, consulted by passes before each rewrite --------
_budget: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("optc_budget", default=None)


def take_rewrite() -> bool:
    """Passes call this before each rewrite; False means the bisection budget is spent."""
    b = _budget.get()
    if b is None:
        return True
    if b[0] <= 0:
        return False
    b[0] -= 1
    return True


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    new = fx.GraphModule(gm, g)
    new.meta.update(gm.meta)
    return new


def _log(topic: str, msg: str) -> None:
    if knobs.log_enabled(topic):
        print(f"[optc:{topic}] {msg}", file=sys.stderr)


def _dump(idx: int, name: str, gm: fx.GraphModule) -> None:
    d = knobs.DUMP_DIR.get()
    if d is None:
        return
    d.mkdir(parents=True, exist_ok=True)
    src = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    header = ("# optc dump: graph after '%s' (executable: defines the GraphModule class)\n"
              "import torch\nfrom torch import device\nimport operator\n"
              "import optc.ops  # noqa: F401  (registers optc:: ops)\n\n" % name)
    src = re.sub(r"^class [^(]+\(", "class Dumped(", src, count=1, flags=re.M)
    (d / f"{idx:03d}_{name}.py").write_text(header + src)
    (d / f"{idx:03d}_{name}.txt").write_text(format_graph(gm) + "\n")


def _write_reproducer(info: PassInfo, cfg_dict: dict, gm: fx.GraphModule, tb: str) -> Path:
    base = knobs.REPRO_DIR.get()
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"optc_repro_{info.name}_", dir=base))
    (d / "graph_before.txt").write_text(format_graph(gm) + "\n")
    (d / "graph_before.py").write_text(gm.print_readable(print_output=False))
    (d / "pass.json").write_text(json.dumps({"pass": info.name, "config": cfg_dict}, indent=2))
    (d / "traceback.txt").write_text(tb)
    (d / "README.txt").write_text(
        f"Pass '{info.name}' failed. graph_before.* is its input, pass.json its config.\n"
        f"Re-run only this pass with: OPTC_STRICT=1 and pipeline=['{info.name}'];\n"
        f"skip it with OPTC_DISABLE={info.name}.\n")
    return d


class PassManager:
    def __init__(self, registry: dict[str, PassInfo], pipeline: tuple[str, ...]):
        unknown = [p for p in pipeline if p not in registry]
        if unknown:
            raise ConfigError(f"unknown pass(es) {unknown}; registered: {sorted(registry)}")
        for i, name in enumerate(pipeline):
            for dep in registry[name].after:
                if dep in pipeline and pipeline.index(dep) > i:
                    raise ConfigError(f"pass '{name}' must run after '{dep}' (declared in its "
                                      f"PassInfo.after); fix the pipeline order")
        self.registry = registry
        self.pipeline = pipeline

    def run(self, gm: fx.GraphModule, cfg: CompileConfig, *, record_graphs: bool = False
            ) -> PipelineResult:
        strict = cfg.strict if cfg.strict is not None else knobs.STRICT.get()
        do_verify = cfg.verify if cfg.verify is not None else knobs.verify_enabled()
        disabled = knobs.DISABLE.get()
        limit = knobs.BISECT_LIMIT.get()
        token = _budget.set([limit] if limit is not None else None)
        result = PipelineResult(gm, [], format_graph(gm) if record_graphs else None)
        _dump(0, "capture", gm)
        try:
            for idx, name in enumerate(self.pipeline, start=1):
                info = self.registry[name]
                rec = PassRecord(name, nodes_before=_count_nodes(result.gm))
                result.records.append(rec)
                pcfg_dict = cfg.passes.get(name, {})
                pcfg = info.config_cls.from_dict(pcfg_dict)
                if name in disabled:
                    rec.skipped = "disabled by OPTC_DISABLE"
                elif not pcfg.enabled:
                    rec.skipped = "disabled in config"
                if rec.skipped:
                    rec.nodes_after = rec.nodes_before
                    _log("passes", f"{name}: skipped ({rec.skipped})")
                    continue
                work = _copy(result.gm)
                t0 = time.perf_counter()
                try:
                    pr: PassResult = info.run(work, pcfg)
                    if pr.modified:
                        pr.gm.graph.eliminate_dead_code()
                        pr.gm.recompile()
                        if do_verify:
                            verify(pr.gm)
                except Exception as e:  # noqa: BLE001 - any pass failure is contained here
                    rec.seconds = time.perf_counter() - t0
                    tb = traceback.format_exc()
                    rec.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    rec.reproducer = _write_reproducer(info, pcfg.to_dict(), result.gm, tb)
                    rec.nodes_after = rec.nodes_before
                    _log("passes", f"{name}: FAILED ({rec.error}); graph left unchanged; "
                                   f"reproducer in {rec.reproducer}")
                    if strict:
                        raise PassFailure(f"pass '{name}' failed: {rec.error} "
                                          f"(reproducer: {rec.reproducer})") from e
                    continue
                rec.seconds = time.perf_counter() - t0
                rec.modified, rec.stats = pr.modified, Counter(pr.stats)
                rec.nodes_after = _count_nodes(pr.gm)
                if pr.modified:
                    result.gm = pr.gm
                    if record_graphs or knobs.log_enabled("passes"):
                        rec.graph_after = format_graph(pr.gm)
                    _dump(idx, name, pr.gm)
                _log("passes", f"{name}: {'changed' if pr.modified else 'no change'}"
                     + (f"\n{rec.graph_after}" if rec.graph_after and knobs.log_enabled("passes") else ""))
                _log("stats", f"{name}: {dict(rec.stats)}")
                _log("timing", f"{name}: {rec.seconds * 1e3:.2f} ms")
        finally:
            _budget.reset(token)
        return result

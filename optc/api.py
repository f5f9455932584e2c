"""User API: ``optc.compile(model)`` and the ``torch.compile(model, backend="optc")`` backend.

Both run the same pipeline on each captured graph: capture -> PassManager -> Program.
Anything optc cannot handle runs eagerly and is reported: a graph that fails to capture,
a call under autograd, inputs of parameters optc did not freeze.
"""

from __future__ import annotations

import functools
import operator
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters as _dynamo_counters
from torch.utils import _pytree as pytree

from optc import knobs
from optc.capture import Captured, CaptureError, capture_dynamo, capture_export, capture_symbolic_trace
from optc.config import CompileConfig, ConfigError
from optc.graph.cost import annotate_costs
from optc.passes.manager import PassManager, PipelineResult
from optc.passes.pipeline import DEFAULT_PIPELINE
from optc.passes.registry import PASSES
from optc.runtime.program import Program, ShapeMismatch
from optc.runtime.trim import release_free_memory

# Dynamo keeps one cache per code object; HF models share code objects across instances and
# sizes, so the default limit of 8 is hit quickly and Dynamo then silently runs eager.
_RECOMPILE_LIMIT = 64


@dataclass
class GraphReport:
    """What happened to one captured graph."""
    frontend: str
    nodes_captured: int = 0
    canon_stats: dict[str, int] = field(default_factory=dict)
    pipeline: PipelineResult | None = None
    program: Program | None = None
    capture_s: float = 0.0
    passes_s: float = 0.0
    lower_s: float = 0.0
    eager_reason: str | None = None       # set when the whole graph runs eagerly
    calls: Counter[str] = field(default_factory=Counter)   # "optc" / "eager:<why>"
    flops: Any = None
    bytes: Any = None
    keep_inputs: bool = False             # remember the last runtime inputs (for measuring)
    last_inputs: tuple | None = None

    @property
    def fallbacks(self) -> Counter[str]:
        return self.program.stats.fallbacks if self.program else Counter()


@dataclass
class CompileReport:
    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: Counter[str] = field(default_factory=Counter)   # reason -> count
    first_call_s: float | None = None

    def summary(self) -> dict[str, Any]:
        # each graph's most recently used plan (the LRU keeps it last)
        plans = [next(reversed(g.program.plans.values()))
                 for g in self.graphs if g.program and g.program.plans]
        return {
            "graphs": len(self.graphs),
            "graph_breaks": sum(self.graph_breaks.values()),
            "eager_graphs": sum(1 for g in self.graphs if g.eager_reason),
            "fallback_ops": sum(sum(g.fallbacks.values()) for g in self.graphs),
            "calls": dict(sum((g.calls for g in self.graphs), Counter())),
            "arena_bytes": sum(p.arena_bytes for p in plans),
            "lower_bound_bytes": sum(p.lower_bound_bytes for p in plans),
            "pass_stats": [g.pipeline.stats() for g in self.graphs if g.pipeline],
        }


# Reports of graphs compiled through torch.compile(backend="optc"), newest last.
_BACKEND_REPORTS: list[GraphReport] = []


def last_report() -> GraphReport | None:
    return _BACKEND_REPORTS[-1] if _BACKEND_REPORTS else None


def _log(topic: str, msg: str) -> None:
    if knobs.log_enabled(topic):
        print(f"[optc:{topic}] {msg}", file=sys.stderr)


def _resolve_config(config: CompileConfig | dict | None) -> CompileConfig:
    if config is None:
        cfg = CompileConfig()
    elif isinstance(config, dict):
        cfg = CompileConfig.from_dict(config)
    elif isinstance(config, CompileConfig):
        cfg = config
    else:
        raise ConfigError(f"config must be an optc.CompileConfig or a dict, got {type(config).__name__}")
    # fail now, not inside Dynamo at the first call: pass names, order, per-pass configs
    pipeline = cfg.pipeline if cfg.pipeline is not None else DEFAULT_PIPELINE
    PassManager(PASSES, pipeline)
    for name, d in cfg.passes.items():
        if name not in PASSES:
            raise ConfigError(f"config for unknown pass '{name}'; registered: {sorted(PASSES)}")
        PASSES[name].config_cls.from_dict(d)
    return cfg


def optimize_graph(captured: Captured, cfg: CompileConfig, report: GraphReport,
                   record_graphs: bool = False, quant: Any = None) -> Program:
    """Passes + lowering for one canonical graph. ``quant``: the model's ``QuantStore``
    (calibration statistics, quantized weights shared by its graphs), for quantize_weights."""
    if quant is not None:
        captured.gm.meta["optc_quant"] = quant
    pipeline = cfg.pipeline if cfg.pipeline is not None else DEFAULT_PIPELINE
    t0 = time.perf_counter()
    result = PassManager(PASSES, pipeline).run(captured.gm, cfg, record_graphs=record_graphs)
    report.pipeline = result
    report.passes_s = time.perf_counter() - t0
    total = annotate_costs(result.gm)
    report.flops, report.bytes = total.flops, total.bytes
    t0 = time.perf_counter()
    max_plans = cfg.max_plans or knobs.MAX_PLANS.get()
    program = Program(result.gm, plan_memory=cfg.plan_memory, max_plans=max_plans)
    report.lower_s = time.perf_counter() - t0
    report.program = program
    _log("runtime", f"program: {program.stats}")
    if "quantize_weights" in pipeline:
        release_free_memory()   # quantization's fp32 temporaries: see optc/runtime/trim.py
    return program


class _DynamoGraph:
    """What the backend returns to Dynamo for one graph: runs the Program, or eager when it must."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: CompileConfig,
                 report: GraphReport, record_graphs: bool = False, quant: Any = None):
        self.eager = gm.forward
        self.quant = quant
        self.report = report
        self.cfg = cfg
        self.gm = gm
        self.record_graphs = record_graphs
        # keyed by the identities of the frozen parameters: another module instance sharing
        # this code object passes other parameters and gets its own variant
        self.variants: OrderedDict[tuple, tuple[Captured, Program]] = OrderedDict()
        self._layout = None     # the input layout learned at the first capture
        self._add_variant(example_inputs)

    def _add_variant(self, inputs: Sequence[Any]) -> tuple[Captured, Program] | None:
        strict = self.cfg.strict if self.cfg.strict is not None else knobs.STRICT.get()
        t0 = time.perf_counter()
        try:
            cap = capture_dynamo(self.gm, inputs, self._layout)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            if strict:
                raise
            self.report.eager_reason = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
            _log("capture", self.report.eager_reason)
            return None
        self.report.capture_s = time.perf_counter() - t0
        self.report.nodes_captured = sum(1 for n in cap.gm.graph.nodes if n.op == "call_function")
        self.report.canon_stats = dict(cap.canon_stats)
        program = optimize_graph(cap, self.cfg, self.report, self.record_graphs, self.quant)
        self._layout = cap.layout
        key = self._key(inputs, cap)
        self.variants[key] = (cap, program)
        self._select(cap, program)
        while len(self.variants) > 4:
            self.variants.popitem(last=False)
        return cap, program

    @staticmethod
    def _key(args: Sequence[Any], cap: Captured) -> tuple:
        return (tuple(id(args[i]) for i, _ in cap.frozen),
                tuple(args[i].item() for i, _ in cap.baked))

    def _select(self, cap: Captured, program: Program) -> None:
        self._fidx = [i for i, _ in cap.frozen]
        self._fobj = [t for _, t in cap.frozen]
        self._bidx = [i for i, _ in cap.baked]
        self._bval = [v for _, v in cap.baked]
        self._cap = cap
        self._ridx = cap.runtime_inputs
        self._program = program

    def __call__(self, *args: Any) -> Any:
        if not self.variants:
            self.report.calls["eager:capture"] += 1
            return self.eager(*args)
        if not all(map(operator.is_, map(args.__getitem__, self._fidx), self._fobj)) or \
                (self._bidx and [args[i].item() for i in self._bidx] != self._bval):
            key = self._key(args, self._cap)
            hit = self.variants.get(key) or self._add_variant(args)
            if hit is None:
                self.report.calls["eager:capture"] += 1
                return self.eager(*args)
            self.variants.move_to_end(key)
            self._select(*hit)
        if torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # optc is an inference compiler: under autograd the original graph runs, so
            # gradients stay exact; call under torch.no_grad() to get the optimized path.
            self.report.calls["eager:autograd"] += 1
            return self.eager(*args)
        self.report.calls["optc"] += 1
        if self.report.keep_inputs:
            self.report.last_inputs = tuple(map(args.__getitem__, self._ridx))
        try:
            return self._program(*map(args.__getitem__, self._ridx))
        except ShapeMismatch:
            self.report.calls["eager:shape"] += 1
            return self.eager(*args)


# Dynamo's guards cost ~100 us per call on a 2-layer model (one TENSOR_MATCH and five
# dynamic-marking checks per parameter), as much as the whole optc runtime saves. Dynamo's
# `use_recursive_dict_tags_for_guards` skips a module subtree's guards while the dict tags of
# its modules are unchanged (any attribute or parameter assignment changes them). It assumes
# tensors are not changed in place in metadata (`p.data = other_shape`, `resize_`) and function
# dunders are not rebound. optc.compile turns it on only while Dynamo builds guards for optc's
# own graphs (set in the backend, restored when the call that compiled returns), so other
# torch.compile users in the process keep Dynamo's default.
_FAST_GUARDS_SAVED: list[bool] = []


def _fast_guards_on() -> None:
    cfg = torch._dynamo.config
    _FAST_GUARDS_SAVED.append(cfg.use_recursive_dict_tags_for_guards)
    cfg.use_recursive_dict_tags_for_guards = True


def _fast_guards_restore() -> None:
    if _FAST_GUARDS_SAVED:
        torch._dynamo.config.use_recursive_dict_tags_for_guards = _FAST_GUARDS_SAVED[0]
        _FAST_GUARDS_SAVED.clear()


def optc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                 config: CompileConfig | dict | None = None,
                 sink: list[GraphReport] | None = None, record_graphs: bool = False,
                 fast_guards: bool = False, quant: Any = None) -> Callable:
    """The Dynamo backend (``torch.compile(model, backend="optc")``, via the entry point).

    ``fast_guards`` (set by ``optc.compile``): build this graph's guards with Dynamo's
    recursive dict-tag check; the caller restores the setting after the call."""
    if fast_guards:
        _fast_guards_on()
    cfg = _resolve_config(config)
    report = GraphReport("dynamo")
    (sink if sink is not None else _BACKEND_REPORTS).append(report)
    if sink is None:
        del _BACKEND_REPORTS[:-64]
    return _DynamoGraph(gm, example_inputs, cfg, report, record_graphs, quant)


class CompiledModel(torch.nn.Module):
    """A compiled model: called like the original (args and kwargs); ``.report`` says what ran."""

    def __init__(self, model: torch.nn.Module, cfg: CompileConfig, inference: bool = True,
                 record_graphs: bool = False, quant: Any = None):
        super().__init__()
        self.record_graphs = record_graphs
        self.quant = quant          # optc.quant.serialize.QuantStore, or None
        self.model = model
        self.config = cfg
        self.inference = inference
        self.report = CompileReport()
        if cfg.frontend == "dynamo":
            _raise_recompile_limit()
            backend = functools.partial(optc_backend, config=cfg, sink=self.report.graphs,
                                        record_graphs=record_graphs, fast_guards=cfg.fast_guards,
                                        quant=quant)
            self._compiled: Callable = torch.compile(model, backend=backend)
        else:
            self._compiled = self._call_captured
            self._captures: OrderedDict[tuple, tuple[Captured, Program, GraphReport]] = OrderedDict()
        self.__dict__["_call"] = self._compiled   # plain attribute: skips nn.Module.__getattr__

    # ---- export / symbolic_trace frontends: one capture per input-shape set ---------------
    def _capture(self, args: tuple, kwargs: dict) -> tuple[Captured, Program, GraphReport]:
        report = GraphReport(self.config.frontend)
        t0 = time.perf_counter()
        if self.config.frontend == "export":
            cap = capture_export(self.model, args, kwargs)
        else:
            cap = capture_symbolic_trace(self.model, args, kwargs)
        report.capture_s = time.perf_counter() - t0
        report.canon_stats = dict(cap.canon_stats)
        report.nodes_captured = sum(1 for n in cap.gm.graph.nodes if n.op == "call_function")
        self.report.graphs.append(report)
        return cap, optimize_graph(cap, self.config, report, self.record_graphs, self.quant), report

    def _call_captured(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = (spec, tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in flat))
        hit = self._captures.get(key)
        if hit is None:
            hit = self._capture(tuple(args), dict(kwargs))
            self._captures[key] = hit
            max_plans = self.config.max_plans or knobs.MAX_PLANS.get()
            while len(self._captures) > max_plans:
                self._captures.popitem(last=False)
        cap, program, report = hit
        report.calls["optc"] += 1
        if report.keep_inputs:
            report.last_inputs = tuple(flat)
        out = program(*flat)
        return pytree.tree_unflatten(list(out), cap.out_spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The per-call path: it runs on every decode step, so it does no more than it must
        # (no nn.Module attribute writes, no Counter copies unless Dynamo compiled).
        d = self.__dict__
        breaks = _GRAPH_BREAKS()
        before = dict(breaks) if breaks else None
        first = self.report.first_call_s is None
        t0 = time.perf_counter() if first else 0.0
        try:
            if self.inference and torch.is_grad_enabled():
                with torch.no_grad():
                    out = d["_call"](*args, **kwargs)
            else:
                out = d["_call"](*args, **kwargs)
        finally:
            if _FAST_GUARDS_SAVED:              # this call compiled: guards are built by now
                _fast_guards_restore()
        if first:
            self.report.first_call_s = time.perf_counter() - t0
        if breaks != (before or {}):            # Dynamo compiled (and broke a graph) in this call
            self.report.graph_breaks.update(Counter(breaks) - Counter(before or {}))
        return out

    def save_quantized(self, path: str) -> None:
        """Write the quantized weights (and AWQ's results) to directory ``path``; reload them with
        ``optc.compile(model, quantized=path)``. See ``optc.quant.serialize``."""
        from optc.config import ConfigError
        from optc.quant.serialize import save
        if self.quant is None:
            raise ConfigError("save_quantized: this model was compiled without quantize_weights")
        save(self.quant, self.config, path)

    def measure_memory(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        """Arena bytes and the peak of what ops allocate beyond it, for this input.

        Measured on each graph's Program directly (a dispatch mode makes Dynamo skip compiled
        code, so the model-level call cannot be measured that way). With several graphs the
        transient peaks are summed: an upper bound."""
        from optc.runtime.peak import measure_program_peak
        if not self.report.graphs:
            self(*args, **kwargs)     # compile first, so the graphs exist to be told to record
        for g in self.report.graphs:
            g.keep_inputs = True
        try:
            self(*args, **kwargs)
        finally:
            for g in self.report.graphs:
                g.keep_inputs = False
        arena = transient = 0
        for g in self.report.graphs:
            if g.program is None or g.last_inputs is None:
                continue
            with torch.no_grad():
                transient += measure_program_peak(g.program, g.last_inputs)
            arena += g.program.plan_for(g.last_inputs).arena_bytes if g.program.planned else 0
            g.last_inputs = None
        return {"arena_bytes": arena, "transient_peak_bytes": transient}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)


def _GRAPH_BREAKS() -> dict[str, int]:
    """Dynamo's graph-break counter (reason -> count), the live dict."""
    return _dynamo_counters["graph_break"]


def _raise_recompile_limit() -> None:
    """HF models share code objects across instances and sizes; each optc.compile of another
    config adds a cache entry to the same code object, and past Dynamo's limit (8) Dynamo
    silently runs eager. Raise the limit (never lower it) when a model is compiled."""
    cfg = torch._dynamo.config
    if cfg.recompile_limit < _RECOMPILE_LIMIT:
        _log("capture", f"raising torch._dynamo.config.recompile_limit "
                        f"{cfg.recompile_limit} -> {_RECOMPILE_LIMIT}")
        cfg.recompile_limit = _RECOMPILE_LIMIT


def compile(model: torch.nn.Module, *, config: CompileConfig | dict | None = None,
            example_inputs: tuple | tuple[tuple, dict] | None = None,
            inference: bool = True, record_graphs: bool = False, calibration: Any = None,
            quantized: str | None = None, offload_weights: bool = False) -> CompiledModel:
    """Compile ``model``; returns a module called exactly like it.

    ``example_inputs``: ``(args, kwargs)`` or a tuple of positional args. With it, compilation
    happens now (the first call's cost is paid here); the ``export`` and ``symbolic_trace``
    frontends capture on the first call either way. ``inference=True`` runs calls under
    ``torch.no_grad()`` (optc optimizes inference; under autograd the original graph runs).
    ``record_graphs`` keeps the printed graph after each pass that changed it (for inspection).
    ``calibration``: an iterable of model inputs, run eagerly now to collect the statistics
    AWQ needs (quantize_weights); ``quantized``: a directory written by
    ``CompiledModel.save_quantized`` to reuse (``config=None`` takes the config saved there).
    ``offload_weights``: once ``quantize_weights`` has replaced a linear, its float weight (which
    ``model`` still holds) moves from RAM to a file-backed mapping: same Parameter, same values,
    read back from disk if ``model`` itself runs (``optc.quant.offload``; the pass reports
    ``offloaded`` / ``offload_skipped.*``). Without quantize_weights in the pipeline it does nothing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optc.compile expects a torch.nn.Module, got {type(model).__name__}; "
                        "wrap a function in an nn.Module or use torch.compile(fn, backend='optc')")
    from optc.quant.serialize import open_store   # quantize_weights: calibration, saved weights
    cfg, quant = open_store(model, _resolve_config(config) if config is not None else None,
                            calibration=calibration, quantized=quantized,
                            offload_weights=offload_weights)
    cfg = _resolve_config(cfg)
    compiled = CompiledModel(model, cfg, inference=inference, record_graphs=record_graphs,
                             quant=quant)
    if example_inputs is not None:
        args, kwargs = _split_example(example_inputs)
        compiled(*args, **kwargs)
    return compiled


def _split_example(ex: Any) -> tuple[tuple, dict]:
    if isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[0], tuple) and isinstance(ex[1], dict):
        return ex
    if isinstance(ex, tuple):
        return ex, {}
    if isinstance(ex, dict):
        return (), ex
    return (ex,), {}

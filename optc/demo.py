"""``optc demo``: compile a built-in model and print a before/after table.

Rows: eager PyTorch and optc (default pipeline). Columns: steady-state latency (median of
repeated calls, after warm-up), first-call time (optc: capture + passes + lowering + Dynamo),
peak memory of intermediates (measured by storage tracking; optc: arena + what ops allocate
themselves), and the max |difference| of the output vs eager.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from optc.cli import ModelSpec, _fmt_bytes, _max_diff, resolve_model
from optc.runtime.peak import measure_peak_bytes, module_tensors


def _median_ms(fn: Callable[[], Any], *, min_time: float = 2.0, max_iters: int = 200) -> float:
    for _ in range(3):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while (time.perf_counter() < t_end or len(times) < 5) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_demo(spec: ModelSpec, threads: int | None = None) -> str:
    import optc
    if threads:
        torch.set_num_threads(threads)
    m, args, kwargs = spec.model, spec.args, spec.kwargs
    ext = module_tensors(m)
    with torch.no_grad():
        ref = m(*args, **kwargs)
        eager_ms = _median_ms(lambda: m(*args, **kwargs))
        eager_peak = measure_peak_bytes(m, *args, external=ext, **kwargs)

        t0 = time.perf_counter()
        compiled = optc.compile(m, example_inputs=(args, kwargs))
        compile_s = time.perf_counter() - t0
        out = compiled(*args, **kwargs)
        optc_ms = _median_ms(lambda: compiled(*args, **kwargs))
        mem = compiled.measure_memory(*args, **kwargs)
    rep = compiled.report
    arena, transient = mem["arena_bytes"], mem["transient_peak_bytes"]
    lower = sum(p.lower_bound_bytes for g in rep.graphs if g.program for p in g.program.plans.values())
    diff = _max_diff(ref, out)
    scale = max(abs(t).max().item() for t in [ref] if isinstance(t, torch.Tensor)) \
        if isinstance(ref, torch.Tensor) else 1.0
    stats = "; ".join(f"{k}: {v}" for g in rep.graphs if g.pipeline for k, v in g.pipeline.stats().items())
    n_params = sum(p.numel() for p in m.parameters())
    shape = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    shape.update({f"arg{i}": tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)})
    lines = [
        f"optc demo: {spec.label}  ({n_params / 1e6:.1f} M parameters, input {shape}, "
        f"{torch.get_num_threads()} threads, fp32)",
        f"passes: {stats or 'none fired'}; graphs: {len(rep.graphs)}, graph breaks: "
        f"{sum(rep.graph_breaks.values())}",
        "",
        f"| {'':<6} | {'latency ms':>10} | {'first call s':>12} | {'peak intermediates':>20} | {'max |diff| vs eager':>19} |",
        f"|{'-' * 8}|{'-' * 12}|{'-' * 14}|{'-' * 22}|{'-' * 21}|",
        f"| {'eager':<6} | {eager_ms:>10.2f} | {'-':>12} | {_fmt_bytes(eager_peak):>20} | {'0':>19} |",
        f"| {'optc':<6} | {optc_ms:>10.2f} | {compile_s:>12.2f} | "
        f"{_fmt_bytes(arena + transient):>20} | {diff:>19.3g} |",
        "",
        f"speedup {eager_ms / optc_ms:.2f}x; optc memory = arena {_fmt_bytes(arena)} (liveness lower "
        f"bound {_fmt_bytes(lower)}) + allocated by ops {_fmt_bytes(transient)}; "
        f"|diff| relative to output scale {diff / max(scale, 1e-30):.2g}",
    ]
    return "\n".join(lines)


def main(model: str = "zoo:llama-small:seq=128", threads: int | None = None) -> int:
    spec = resolve_model(model)
    print(run_demo(spec, threads))
    return 0

"""Static memory plan vs the liveness lower bound vs eager's measured peak, per zoo model.

For each model: the arena the greedy-by-size planner built, the liveness lower bound of the
same buffers, the bytes the planned buffers would take without reuse, what the program's ops
still allocate themselves (measured), and eager's measured peak of intermediates (storage
tracking; the output counts in both). Also the compile time of ``optc.compile`` (capture +
passes + lowering + first run), which for ``--big`` includes the TinyLlama-1.1B shape.

    python -m benchmarks.memory_plan [--seq 128] [--big]
"""

from __future__ import annotations

import argparse
import time

import torch

import models
import optc
from optc.cli import _fmt_bytes
from optc.runtime.peak import measure_peak_bytes, module_tensors


def row(name: str, seq: int) -> dict:
    t0 = time.perf_counter()
    m = models.build(name)
    build_s = time.perf_counter() - t0
    args, kwargs = models.example_inputs(m, batch=1, seq=seq)
    with torch.no_grad():
        eager_peak = measure_peak_bytes(m, *args, external=module_tensors(m), **kwargs)
        t0 = time.perf_counter()
        c = optc.compile(m, example_inputs=(args, kwargs))
        compile_s = time.perf_counter() - t0
        mem = c.measure_memory(*args, **kwargs)
    g = c.report.graphs[0]
    plan = next(reversed(g.program.plans.values()))
    return {"model": name, "seq": seq, "build_s": build_s, "compile_s": compile_s,
            "capture_s": g.capture_s, "passes_s": g.passes_s, "lower_s": g.lower_s,
            "arena": plan.arena_bytes, "lower_bound": plan.lower_bound_bytes,
            "no_reuse": plan.planned_bytes, "transient": mem["transient_peak_bytes"],
            "eager_peak": eager_peak, "planned": g.program.stats.planned_values,
            "unplanned": g.program.stats.unplanned_values}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--big", action="store_true", help="also the TinyLlama-1.1B shape (~5 GB RAM)")
    ap.add_argument("--models", default=None, help="comma-separated zoo names (overrides the set)")
    ns = ap.parse_args()
    torch.set_num_threads(2)
    names = [n for n in models.ZOO_NAMES if n.endswith("-tiny")] + ["llama-small"]
    if ns.big:
        names.append("tinyllama-1.1b")
    if ns.models:
        names = ns.models.split(",")
    print(f"| model | seq | arena | lower bound | arena/LB | no reuse | ops allocate | optc total | "
          f"eager peak | planned/unplanned values | compile s (capture/passes/lower) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        seq = min(ns.seq, models.model_args(n).max_seq_len)
        r = row(n, seq)
        lb = r["lower_bound"] or 1
        print(f"| {n} | {seq} | {_fmt_bytes(r['arena'])} | {_fmt_bytes(r['lower_bound'])} | "
              f"{r['arena'] / lb:.3f} | {_fmt_bytes(r['no_reuse'])} | {_fmt_bytes(r['transient'])} | "
              f"{_fmt_bytes(r['arena'] + r['transient'])} | {_fmt_bytes(r['eager_peak'])} | "
              f"{r['planned']}/{r['unplanned']} | {r['compile_s']:.2f} ({r['capture_s']:.2f}/"
              f"{r['passes_s']:.2f}/{r['lower_s']:.2f}) |", flush=True)


if __name__ == "__main__":
    main()

"""Runtime overhead: is a compiled zoo model (lossless passes only) at least as fast as eager?

Batch 1, short inputs, where Python overhead matters most. Each model is timed eager,
through ``optc.compile`` (default pipeline: all lossless) and with ``torch.compile``
(Inductor) as a peer, interleaved in one process so machine noise hits every row alike.
Reports medians and the ratio eager/optc (> 1 means optc is faster).

    python -m benchmarks.overhead [--seq 16] [--models llama-tiny,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import torch

import models
import optc


def _timeit(fn: Callable[[], Any], rounds: int, inner: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def bench(name: str, seq: int, rounds: int, inductor: bool) -> dict[str, Any]:
    m = models.build(name)
    args, kwargs = models.example_inputs(m, batch=1, seq=seq)
    compiled = optc.compile(m, example_inputs=(args, kwargs))
    runs: dict[str, Callable[[], Any]] = {
        "eager": lambda: m(*args, **kwargs),
        "optc": lambda: compiled(*args, **kwargs),
    }
    if inductor:
        ind = torch.compile(m)
        runs["inductor"] = lambda: ind(*args, **kwargs)
    with torch.no_grad():
        for fn in runs.values():          # warm-up (and Inductor's compile)
            for _ in range(5):
                fn()
        one = _timeit(runs["eager"], 3, 3)
        inner = max(1, int(0.05 / max(one, 1e-6)))
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):           # interleave: noise hits all rows alike
            for k, fn in runs.items():
                times[k].append(_timeit(fn, 1, inner))
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    row = {"model": name, "seq": seq, **{f"{k}_us": round(v, 1) for k, v in med.items()},
           "eager_over_optc": round(med["eager"] / med["optc"], 3)}
    if inductor:
        row["eager_over_inductor"] = round(med["eager"] / med["inductor"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--models", default="llama-tiny,gpt2-tiny,bert-tiny,opt-tiny,llama-small")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    rows = [bench(n, ns.seq, ns.rounds, not ns.no_inductor) for n in ns.models.split(",")]
    print(f"# runtime overhead, batch 1, seq {ns.seq}, {ns.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    cols = [c for c in rows[0] if c not in ("model", "seq")]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"threads": ns.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

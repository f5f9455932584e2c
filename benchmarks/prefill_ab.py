"""Long-prompt prefill of a few configurations on the TinyLlama-1.1B shape, interleaved.

The harness runs each configuration once, one after the other, so a host whose speed drifts
by 1.5x within minutes (this VM) can put a 30% swing into a same-run ratio. Here every round
runs each configuration in a fresh process of its own, in turn, and prints each process's
steady times: the spread across rounds shows how much of a difference is the host.

    python -m benchmarks.prefill_ab [--T 2048] [--rounds 2] [--configs eager-bf16,optc-bf16,...]

``eager-bf16`` is the model cast to bf16 and run eagerly; any other name is an optc preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(config: str, T: int, calls: int) -> list[float]:
    """Steady prefill times (s) of ``config`` at T tokens, in this process."""
    import torch

    import models
    from optc.presets import PRESETS
    from optc.runtime.generate import cache_owner
    torch.set_num_threads(2)
    model = models.build("tinyllama-1.1b", seed=0)
    run = model.to(torch.bfloat16) if config == "eager-bf16" else \
        PRESETS[config].compile(model, copy=False)
    cache_owner(run).setup_caches(1, T)
    ids = torch.randint(0, model.args.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)
    times = []
    with torch.no_grad():
        run(ids, pos)                                   # first call: compiles
        for _ in range(calls):
            t0 = time.perf_counter()
            run(ids, pos)
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=3, help="steady calls per process")
    ap.add_argument("--configs", default="eager-bf16,optc-bf16,optc-int4-g128-bf16,optc-int8-bf16")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # worker mode
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.T, a.calls)))
        return 0
    results: dict[str, list[list[float]]] = {}
    for r in range(a.rounds):
        for config in a.configs.split(","):
            out = subprocess.run([sys.executable, "-m", "benchmarks.prefill_ab", "--one", config,
                                  "--T", str(a.T), "--calls", str(a.calls)],
                                 capture_output=True, text=True, check=True).stdout
            times = json.loads(out.strip().splitlines()[-1])
            results.setdefault(config, []).append(times)
            print(f"round {r + 1} {config:22s} T={a.T}: " + ", ".join(f"{t:.2f}" for t in times)
                  + " s", flush=True)
    print("min per configuration: " + ", ".join(
        f"{c} {min(min(ts) for ts in runs):.2f} s" for c, runs in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

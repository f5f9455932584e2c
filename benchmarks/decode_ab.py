"""Decode speed of a few configurations on the TinyLlama-1.1B shape, interleaved.

The harness runs each configuration once, one after the other, and this VM's speed drifts by
1.5x within minutes, so a same-run ratio there carries that drift. Here every round runs each
configuration in a fresh process of its own, in turn (the harness's configurations, through
``benchmarks.configs.prepare``), and prints
each process's decode speed: the spread across rounds shows how much of a ratio is the host.

    python -m benchmarks.decode_ab [--rounds 3] [--configs torchao-int4,optc-int4-g128-bf16]
                                   [--wait-policies PASSIVE,default]

``--wait-policies``: libgomp's ``OMP_WAIT_POLICY`` per process, each configuration run under
each (``default``: the variable unset, libgomp's spin-then-sleep, what a user's process gets
and the harness's; ``PASSIVE``: what the harness forced up to 2026-12-02). Under PASSIVE every
parallel region of a decode step wakes the sleeping second thread, and this VM's wake-up
latency moves with the host.

Each process: a 128-token prompt, one warm-up generation (compiles), then 64 new tokens greedy;
tok/s is tokens per second of the 63 steady decode steps (the harness's measure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def one(config: str, new_tokens: int) -> dict[str, float]:
    """Decode speed of ``config`` in this process."""
    import torch

    import models
    from benchmarks import configs
    from optc.runtime.generate import generate
    torch.set_num_threads(2)
    model = models.build("tinyllama-1.1b", seed=0)
    ctx = configs.Context(task="lm", tmp=Path(tempfile.mkdtemp(prefix="decode_ab-")), threads=2)
    run = configs.prepare(config, model, ctx)
    prompt = torch.randint(0, model.args.vocab_size, (1, 128),
                           generator=torch.Generator().manual_seed(0))
    need = 128 + new_tokens
    generate(run, prompt, 8, max_seq_len=need)                   # compiles prefill and decode
    g = generate(run, prompt, new_tokens, max_seq_len=need)
    steps = sorted(g.decode_s[1:])
    return {"tok_s": len(steps) / sum(steps), "min_ms": steps[0] * 1e3,
            "median_ms": steps[len(steps) // 2] * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--configs", default="torchao-int4,optc-int4-g128-bf16")
    ap.add_argument("--wait-policies", default="default",
                    help="OMP_WAIT_POLICY values, comma-separated; 'default' leaves it unset")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # worker mode
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.new_tokens)))
        return 0
    policies = a.wait_policies.split(",")
    names = [(c, p) for p in policies for c in a.configs.split(",")]
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        for config, policy in names:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, "-m", "benchmarks.decode_ab", "--one", config,
                                  "--new-tokens", str(a.new_tokens)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results.setdefault((config, policy), []).append(res["tok_s"])
            print(f"round {r + 1} {config:24s} {policy:8s} {res['tok_s']:6.2f} tok/s  step min "
                  f"{res['min_ms']:.1f} ms, median {res['median_ms']:.1f} ms", flush=True)
    for policy in policies:
        base = (names[0][0], policy)
        for config, p in names:
            if p == policy and (config, p) != base:
                ratios = [x / b for x, b in zip(results[(config, p)], results[base])]
                print(f"{policy}: {config} / {base[0]}, per round: "
                      + ", ".join(f"{q:.2f}x" for q in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

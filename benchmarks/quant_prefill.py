"""A quantized preset on the model cast to another dtype: decode and long-prefill time, once.

The harness's quantized presets keep the user's fp32 activations, so at T=2048 their attention
and norms run in fp32 and prefill is slower than bf16 eager (benchmarks/results/full.md). This
measures the same preset config on the TinyLlama-1.1B shape cast to bf16 first (what a user
with a bf16 model gets), outside the harness: one process, one steady call per number.

    python -m benchmarks.quant_prefill [--dtype bf16] [--preset optc-int4-g128] [--T 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

import models
import optc
from optc.presets import PRESETS
from optc.runtime.generate import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tinyllama-1.1b")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--preset", default="optc-int4-g128")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    model = models.build(ns.model, seed=0)
    if ns.dtype == "bf16":
        model = model.to(torch.bfloat16)
    compiled = optc.compile(model, config=PRESETS[ns.preset].config)
    ids = torch.randint(0, model.args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    generate(compiled, ids, 48, max_seq_len=256)                     # compiles prefill + decode
    g = generate(compiled, ids, 48, setup=False)
    print(f"{ns.model} {ns.dtype} {ns.preset}: decode {47 / sum(g.decode_s):.2f} tok/s, "
          f"prefill(128) {g.prefill_s:.3f} s")
    model.setup_caches(1, ns.T)
    x = torch.randint(0, model.args.vocab_size, (1, ns.T), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(ns.T)
    with torch.no_grad():
        for i in range(2):
            t0 = time.perf_counter()
            compiled(x, pos)
            print(f"prefill T={ns.T} {'first' if i == 0 else 'steady'} call {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

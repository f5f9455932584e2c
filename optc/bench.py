"""``optc bench MODEL``: the benchmark harness for one model, with a progress bar.

    optc bench tiny-lm                  # the trained tiny LM: decode speed + accuracy, every config
    optc bench tinyllama-1.1b --suite full
    optc bench minilm --configs eager-fp32,optc,onnxruntime
    optc bench zoo:llama-small          # any zoo Llama (speed only) or zoo BERT encoder

Runs exactly what ``python -m benchmarks run`` runs for that model (each configuration in its own
process, peers and optc presets, the roofline), writes ``bench-MODEL.{json,md,png}`` to ``--out``
and prints the markdown report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_bench(model: str, *, suite: str = "quick", configs: list[str] | None = None, threads: int = 2,
              out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    from benchmarks import harness
    from benchmarks.report import markdown
    jobs = harness.jobs_for_model(model, suite, configs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="config", dynamic_ncols=True)

    def tick(i: int, n: int, job: harness.Job, row: dict[str, Any] | None) -> None:
        if bar is None:
            return
        if row is None:
            bar.set_description(job.config or job.task)
        else:
            bar.update(1)
            if "error" in row:
                bar.write(f"{job.label}: FAILED: {row['error'][:200]}")

    name = "bench-" + model.removeprefix("zoo:")
    try:
        result = harness.run_suite(suite, threads=threads, out_dir=out or harness.RESULTS_DIR, name=name,
                                   progress=tick, command=f"optc bench {model} --suite {suite}", jobs=jobs)
    finally:
        if bar is not None:
            bar.close()
    print(markdown(result))
    return result

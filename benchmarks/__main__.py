"""``python -m benchmarks run --suite quick|full`` (one entry point) and ``report FILE.json``.

    python -m benchmarks run --suite quick                  # <= 10 min: writes benchmarks/results/quick.*
    python -m benchmarks run --suite full                   # <= 60 min: benchmarks/results/full.*
    python -m benchmarks run --suite quick --tiny --out /tmp/b   # tiny shapes (the harness test)
    python -m benchmarks run --suite full --configs eager-fp32,optc --models tiny-lm
    python -m benchmarks report benchmarks/results/full.json     # re-render .md/.png from the JSON

On a shared machine run under ``flock /tmp/optc-bench.lock`` so benchmarks never overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, SUITES, Job, run_suite


def _csv(raw: str | None) -> list[str] | None:
    return [x for x in raw.split(",") if x] if raw else None


def _print_progress(i: int, n: int, job: Job, row: dict[str, Any] | None) -> None:
    if row is None:
        print(f"[{i + 1}/{n}] {time.strftime('%H:%M:%S')} {job.label} ...", flush=True)
        return
    status = f"FAILED: {row['error'][:200]}" if "error" in row else "ok"
    print(f"       {row.get('process_wall_s', 0):.0f} s, {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("run", help="run a suite; write NAME.json/.md/.png")
    rp.add_argument("--suite", choices=SUITES, default="quick")
    rp.add_argument("--tiny", action="store_true", help="tiny shapes (tests the harness in seconds)")
    rp.add_argument("--configs", default=None, help="comma-separated configuration names to keep")
    rp.add_argument("--models", default=None, help="comma-separated model names to keep")
    rp.add_argument("--threads", type=int, default=2)
    rp.add_argument("--out", type=Path, default=RESULTS_DIR)
    rp.add_argument("--name", default=None, help="file name stem (default: the suite name)")
    rp.add_argument("--note", default="", help="a line printed at the top of the report")
    rp.add_argument("--budget-min", type=float, default=None,
                    help="wall-clock budget in minutes (default: quick 9.5, full 58)")
    pp = sub.add_parser("report", help="re-render the .md and .png of a results JSON")
    pp.add_argument("json", type=Path)
    ns = ap.parse_args(argv)
    if ns.cmd == "report":
        from benchmarks import report
        result = json.loads(ns.json.read_text())
        paths = report.write(result, ns.json.parent, ns.json.stem)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_suite(ns.suite, tiny=ns.tiny, configs=_csv(ns.configs), models=_csv(ns.models),
                       threads=ns.threads, out_dir=ns.out, name=ns.name, note=ns.note,
                       progress=_print_progress, command=command,
                       budget_s=ns.budget_min * 60 if ns.budget_min else None)
    failed = [r for r in result["rows"] if "error" in r]
    print(f"done in {result['wall_s'] / 60:.1f} min: {len(result['rows'])} rows, {len(failed)} failed; "
          f"wrote {ns.out / (ns.name or result['suite'])}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantized linear CPU paths vs dense ``F.linear``, per shape and M: the data behind
``optc.ops.quant.CPU_PATHS``.

For each linear shape K->N (the TinyLlama-1.1B projections and 4096x4096) and each M (1 is
decode, larger M is prefill), every CPU path of every format (``CPU_IMPLS``) and the dense
fp32 / bf16 ``F.linear`` are timed on the same random weight (N(0, 0.02)), interleaved round
by round so machine noise hits all rows alike; min and median over rounds. Activations are
fp32 unless ``--dtypes`` says otherwise (the paths cast to bf16 inside; that cast is timed).
For M=1 the bandwidth reached is reported: bytes of the weight format read per call / time.
Caveat: one weight is called over and over, so a weight that fits the 32 MB L3 (2048->256:
2 MB fp32) is read from cache, not DRAM, unlike in a model whose layers evict each other;
the large shapes (>= 23 MB in bf16) are DRAM-bound as in a model.

    flock /tmp/optc-bench.lock .venv/bin/python -m benchmarks.quant_kernels            # full
    .venv/bin/python -m benchmarks.quant_kernels --quick                               # smoke
    ... --shapes 2048x5632,4096x4096 --ms 1,128 --rounds 7 --threads 2
    .venv/bin/python -m benchmarks.quant_kernels --table [--metric cpu_min_ms]   # from the JSON

Paths named ``amx`` are skipped where AMX is not there (they would time their fallbacks); the
report names the CPU and whether it has AMX, and ``optc/ops/quant.py`` keeps one table per kind
of machine (``CPU_PATHS`` from the AMX Xeon's runs, ``CPU_PATHS_NO_AMX`` from the EPYC's).
``--table`` prints ``CPU_PATHS`` and ``DENSE_RATIOS`` for ``optc/ops/quant.py``: per kind and
measured M, the path with the highest median speed relative to dense bf16 over the
TinyLlama-1.1B shapes (int4: both group sizes), and that path's median speed relative to
dense fp32 / bf16 F.linear.

Writes ``benchmarks/results/quant_kernels.json`` (every sample row) and ``.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import machine_info
from optc.ops import native
from optc.ops import quant as Q
from optc.quant import formats as fmt

TINYLLAMA = [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048), (2048, 32000)]
SHAPES = TINYLLAMA + [(4096, 4096)]
MS = [1, 4, 16, 64, 128, 512, 2048]
FORMATS: list[tuple[fmt.QuantScheme, str | None]] = [
    (fmt.QuantScheme("int8"), None),
    (fmt.QuantScheme("int4", 128), None),
    (fmt.QuantScheme("int4", 32), None),
    (fmt.QuantScheme("w8a8"), None),
    (fmt.QuantScheme("bfp", 32), "planes"),
    (fmt.QuantScheme("bfp", 16), "blocks"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sample(fn: Callable[[], Any], inner: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call; CPU time does not count the time this
    process waits for a core, so it ranks paths on a shared machine where wall time cannot."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


def _inner(fn: Callable[[], Any], target_s: float) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (>= 1)."""
    t = _sample(fn, 1)[0]
    return max(1, min(1000, int(target_s / max(t, 1e-7))))


def candidates(w: torch.Tensor, x: torch.Tensor) -> list[tuple[str, str, Callable[[], Any], int]]:
    """(format label, path, call, bytes of weight data read) for one shape and input."""
    wf, wb = w, w.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out: list[tuple[str, str, Callable[[], Any], int]] = [
        ("dense", "fp32", lambda: F.linear(x.float(), wf), wf.numel() * 4),
        ("dense", "bf16", lambda: F.linear(xb, wb), wb.numel() * 2),
    ]
    for scheme, layout in FORMATS:
        if fmt.unsupported_reason(tuple(w.shape), scheme):
            continue
        q = fmt.quantize(w, scheme, layout=layout)
        for path in Q.CPU_IMPLS[Q.kind_of(q)]:
            if path == "amx" and not native.features() & native.AMX:
                continue      # it would time its fallback, not AMX
            out.append((scheme.label, path,
                        lambda q=q, path=path: Q.run_cpu_path(q, x, None, path), q.nbytes()))
    return out


def run(shapes: list[tuple[int, int]], ms: list[int], dtypes: list[str], rounds: int,
        target_s: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        for dname in dtypes:
            for m in ms:
                x = torch.randn(m, k).to(DTYPES[dname])
                cands = candidates(w, x)
                inner = [_inner(c[2], target_s) for c in cands]
                samples: list[list[tuple[float, float]]] = [[] for _ in cands]
                for _ in range(rounds):
                    for i, c in enumerate(cands):
                        samples[i].append(_sample(c[2], inner[i]))
                for (label, path, _, nbytes), s in zip(cands, samples):
                    wall, cpu = [w for w, _ in s], [c for _, c in s]
                    rows.append({"K": k, "N": n, "M": m, "dtype": dname, "format": label,
                                 "path": path, "min_ms": min(wall) * 1e3,
                                 "median_ms": statistics.median(wall) * 1e3,
                                 "cpu_min_ms": min(cpu) * 1e3,
                                 "weight_GBps": nbytes / min(wall) / 1e9})
                print(f"K={k} N={n} M={m} {dname}: " + ", ".join(
                    f"{r['format']}/{r['path']} {r['min_ms']:.3f}|{r['cpu_min_ms']:.3f}"
                    for r in rows[-len(cands):]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], key: str = "min_ms") -> str:
    lines = [f"# Quantized linear CPU paths ({meta['when']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, {meta['machine']}, {meta.get('cpu', '')}, "
             f"AMX {'yes' if meta.get('amx') else 'no'})", "",
             f"Load average at the end of the run: {meta.get('load_avg')}. "
             f"{meta.get('note', '')}", "",
             f"`{key}`: minimum over interleaved rounds of the wall time (`min_ms`) or of the "
             "process CPU time (`cpu_min_ms`, both threads summed), per call; `xfp32` / `xbf16` = "
             "dense time / path time (> 1: faster than dense); GB/s = weight bytes read per "
             "call / min wall time (M=1).", ""]
    keys = sorted({(r["K"], r["N"], r["dtype"]) for r in rows})
    for k, n, d in keys:
        sub = [r for r in rows if (r["K"], r["N"], r["dtype"]) == (k, n, d)]
        cols = sorted({(r["format"], r["path"]) for r in sub}, key=lambda c: (c[0] != "dense", c))
        ms = sorted({r["M"] for r in sub})
        lines += [f"## K={k} -> N={n}, {d} activations", "",
                  "| format / path | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|" + "---|" * len(ms)]
        for f_, p in cols:
            cells = []
            for m in ms:
                r = next((r for r in sub if (r["format"], r["path"], r["M"]) == (f_, p, m)), None)
                if r is None:
                    cells.append("")
                    continue
                dense = {q["path"]: q[key] for q in sub if q["format"] == "dense" and q["M"] == m}
                cell = f"{r[key]:.3f}"
                if f_ != "dense":
                    cell += f" ({dense['fp32'] / r[key]:.2f}x / {dense['bf16'] / r[key]:.2f}x)"
                if m == 1:
                    cell += f" {r['weight_GBps']:.0f} GB/s"
                cells.append(cell)
            lines.append(f"| {f_} / {p} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Cells: `ms (xfp32 / xbf16)`.")
    return "\n".join(lines) + "\n"


KIND_OF_LABEL = {"int8": "int8", "int4-g128": "int4", "int4-g32": "int4", "w8a8": "w8a8",
                 "bfp8-b32": "bfp_planes", "bfp8-b16": "bfp_blocks"}


def table(rows: list[dict[str, Any]], metric: str = "min_ms", dtype: str = "fp32") -> str:
    """The decision table and the dense ratios as Python literals (see the module docstring).

    Per (kind, M) and path: the speed relative to dense per TinyLlama shape (dense time / path
    time), then the median over the shapes, which one disturbed shape on a shared machine
    cannot move much; the path with the highest median bf16 ratio wins.
    """
    rows = [r for r in rows if (r["K"], r["N"]) in TINYLLAMA and r["dtype"] == dtype]
    ms = sorted({r["M"] for r in rows})
    dense = {(r["K"], r["N"], r["M"], r["path"]): r[metric] for r in rows if r["format"] == "dense"}

    def ratios(kind: str, path: str, m: int) -> tuple[float, float]:
        sel = [r for r in rows if r["M"] == m and r["path"] == path
               and KIND_OF_LABEL.get(r["format"]) == kind]
        r32 = statistics.median(dense[(r["K"], r["N"], m, "fp32")] / r[metric] for r in sel)
        r16 = statistics.median(dense[(r["K"], r["N"], m, "bf16")] / r[metric] for r in sel)
        return r32, r16

    paths_out, ratios_out = [], []
    for kind in dict.fromkeys(KIND_OF_LABEL.values()):
        paths = sorted({r["path"] for r in rows if KIND_OF_LABEL.get(r["format"]) == kind})
        best = [(m, max(paths, key=lambda p: ratios(kind, p, m)[1])) for m in ms]
        buckets: list[tuple[int, str]] = []
        for m, p in best:
            if buckets and buckets[-1][1] == p:
                buckets[-1] = (m, p)
            else:
                buckets.append((m, p))
        buckets[-1] = (1 << 62, buckets[-1][1])
        paths_out.append(f"    {kind!r}: ({', '.join(f'({b}, {p!r})' for b, p in buckets)},),"
                         .replace(str(1 << 62), "1 << 62"))
        rat = []
        for i, (m, p) in enumerate(best):
            r32, r16 = ratios(kind, p, m)
            bound = "1 << 62" if i == len(best) - 1 else str(m)
            rat.append(f"({bound}, {r32:.2f}, {r16:.2f})")
        ratios_out.append(f"    {kind!r}: ({', '.join(rat)},),")
    return ("CPU_PATHS = {\n" + "\n".join(paths_out) + "\n}\nDENSE_RATIOS = {\n"
            + "\n".join(ratios_out) + "\n}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,... (default: TinyLlama-1.1B + 4096x4096)")
    ap.add_argument("--ms", default=None, help=f"M values (default {MS})")
    ap.add_argument("--dtypes", default="fp32", help="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample-s", type=float, default=0.02, help="target seconds per sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one small shape, M in {1, 64}")
    ap.add_argument("--out", default="benchmarks/results/quant_kernels")
    ap.add_argument("--table", action="store_true",
                    help="print CPU_PATHS / DENSE_RATIOS from OUT.json instead of measuring")
    ap.add_argument("--metric", default="min_ms", choices=("min_ms", "cpu_min_ms"))
    ap.add_argument("--note", default="", help="a line for the report (e.g. how busy the machine was)")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).with_suffix(".json").read_text())["rows"], a.metric))
        return
    torch.set_num_threads(a.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES
    ms = [int(m) for m in a.ms.split(",")] if a.ms else MS
    if a.quick:
        shapes, ms, a.rounds = [(512, 512)], [1, 64], 2
    rows = run(shapes, ms, a.dtypes.split(","), a.rounds, a.sample_s)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "threads": a.threads,
            "torch": torch.__version__, "machine": platform.machine(),
            "load_avg": list(os.getloadavg()), "rounds": a.rounds, "note": a.note,
            "cpu": machine_info(a.threads)["cpu"], "amx": bool(native.features() & native.AMX)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        markdown(rows, meta, "min_ms") + "\n" + markdown(rows, meta, "cpu_min_ms"))
    print(f"wrote {out}.json, {out}.md (load average at the end: {meta['load_avg']})")


if __name__ == "__main__":
    main()

"""Attention: which CPU path is fastest, and prefill latency / peak memory fused vs unfused.

    python -m benchmarks.attention --cpu-paths   # the decision table of optc/ops/attention.py
    python -m benchmarks.attention [--quick]     # -> benchmarks/results/attention.{json,md}

On a shared machine run it under ``flock /tmp/optc-bench.lock`` so benchmarks do not overlap.

``--cpu-paths`` times each CPU implementation of ``optc::attention`` (``CPU_PATHS``) on the
same inputs, interleaved, by process CPU time of one thread (other tenants do not count), or
with ``--threads 2 --wall`` by wall clock on two threads.

The default run measures, at T = 512, 1024, 2048, 4096 (``--quick``: 512, 1024), fp32 and bf16,
batch 1, latency (wall clock, 2 threads or ``--threads N``, min over repeats; process CPU time
alongside: on a busy machine use ``--threads 1``, where OpenMP workers cannot spin waiting for
a descheduled peer, and read the CPU times) and peak memory
(bytes of tensor storage alive at once, ``optc.runtime.peak``; for optc the arena plus what ops
allocate beyond it):
  * attention alone: nanoGPT-style causal attention written out (q @ k^T * scale, masked_fill
    with an in-graph tril, softmax, @ v; H=8, D=64) run eagerly ("unfused") and through
    ``optc.compile`` ("fused": the pass turns it into one ``optc.attention(causal=True)``);
  * whole models: zoo ``llama-small`` (8 layers, dim 512, GQA 8/4, max_seq_len 4096) and HF
    GPT-2 with ``attn_implementation="eager"`` (4 layers, dim 512, 8 heads; unfused eager
    attention), each eager, through optc without ``fuse_attention`` and through optc (default
    pipeline). The zoo Llama's attention is an SDPA call, which eager already runs on ATen's
    fused CPU kernel (with K/V repeated for GQA); its unfused reference is eager with SDPA
    forced to the math backend (matmul, softmax, matmul).
It also records the ``fuse_attention`` rule statistics of every HF architecture, both
attention implementations.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import models
import optc
from models.hf import HF_ARCHS, build_hf, hf_example_inputs
from optc.ops.attention import CPU_PATHS
from optc.passes.pipeline import DEFAULT_PIPELINE
from optc.runtime.peak import measure_peak_bytes, module_tensors

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- CPU path table --------------------------------------------------------------------------

def _inputs(kind: str, t: int, dtype: torch.dtype) -> tuple:
    """(q, k, v, mask, causal, scale, kv_group) of one --cpu-paths case; q/k/v laid out as a
    model produces them ((B, T, H, D) projections viewed as (B, H, T, D))."""
    g = torch.Generator().manual_seed(0)
    hkv = 2 if kind == "gqa" else 8
    tq = 1 if kind == "decode" else t
    q = torch.randn(1, tq, 8, 64, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, t, hkv, 64, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    mask = torch.rand(1, 1, tq, t, generator=g) > 0.2 if kind in ("mask", "decode") else None
    return q, k, v, mask, kind in ("causal", "gqa"), 0.125, 8 // hkv


def cpu_paths(sizes: tuple[int, ...], threads: int = 1, wall: bool = False, rounds: int = 3,
              inner: int = 3) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    clock = time.perf_counter if wall else time.process_time
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for kind in ("causal", "gqa", "mask", "decode"):
            for t in sizes:
                args = _inputs(kind, t, dtype)
                best = {name: math.inf for name in CPU_PATHS}
                for _ in range(rounds):
                    for name, fn in CPU_PATHS.items():
                        t0 = clock()
                        for _ in range(inner):
                            fn(*args)
                        best[name] = min(best[name], (clock() - t0) / inner)
                row = {"dtype": dtype_name, "kind": kind, "T": t,
                       **{k: round(v * 1e3, 3) for k, v in best.items()}}
                row["fastest"] = min(CPU_PATHS, key=best.__getitem__)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def cpu_table_text(rows: list[dict[str, Any]]) -> str:
    sizes = sorted({r["T"] for r in rows})
    head = f"    {'dtype':<5} {'case':<7} {'path':<8}" + "".join(f"{t:>9}" for t in sizes)
    lines = [head]
    for dtype in DTYPES:
        for kind in ("causal", "gqa", "mask", "decode"):
            for path in CPU_PATHS:
                cells = {r["T"]: r[path] for r in rows if r["dtype"] == dtype and r["kind"] == kind}
                lines.append(f"    {dtype:<5} {kind:<7} {path:<8}"
                             + "".join(f"{cells[t]:>9.3f}" for t in sizes))
    return "\n".join(lines)


# ---- attention alone -------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """The attention of nanoGPT's CausalSelfAttention (slow path) on given q, k, v."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, H, T, T)
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
        att = att.masked_fill(causal == 0, float("-inf"))
        return att.softmax(dim=-1) @ v                                       # (B, H, T, D)


def _clock(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(min wall s, min process-CPU s) over ``reps`` calls."""
    wall, cpu = math.inf, math.inf
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def _reps(t: int) -> int:
    # timed repeats per row; one at T=4096, where an unfused call takes 2-14 s (keeps the full
    # run near 15 minutes on this VM)
    return 3 if t <= 1024 else 2 if t <= 2048 else 1


def _stats(compiled: optc.CompiledModel) -> dict[str, int]:
    """fuse_attention's statistics on the newest graph (the one that served the last call)."""
    g = compiled.report.graphs[-1]
    return next((dict(r.stats) for r in g.pipeline.records if r.name == "fuse_attention"), {})


def _optc_peak(compiled: optc.CompiledModel, args: tuple, kwargs: dict) -> int:
    mem = compiled.measure_memory(*args, **kwargs)
    return mem["arena_bytes"] + mem["transient_peak_bytes"]


def attention_alone(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        model = CausalSelfAttention()
        compiled = optc.compile(model)
        for t in sizes:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, t, 8, 64, generator=g).to(dtype).transpose(1, 2)
                       for _ in range(3))
            with torch.no_grad():
                ref = model(q, k, v)
                out = compiled(q, k, v)          # compiles (a recompile per new T at first)
                err = (out.float() - ref.float()).abs().max().item()
                runs = {"unfused": lambda: model(q, k, v), "fused": lambda: compiled(q, k, v)}
                times = {name: [] for name in runs}
                for _ in range(_reps(t)):        # interleaved rounds
                    for name, fn in runs.items():
                        times[name].append(_clock(fn, 1))
                peaks = {"unfused": measure_peak_bytes(model, q, k, v),
                         "fused": _optc_peak(compiled, (q, k, v), {})}
            for name in runs:
                rows.append({"what": "attention", "dtype": dtype_name, "T": t, "variant": name,
                             "wall_s": min(w for w, _ in times[name]),
                             "cpu_s": min(c for _, c in times[name]),
                             "peak_bytes": peaks[name], "max_abs_diff": err,
                             "rules": _stats(compiled) if name == "fused" else {}})
                print(json.dumps(rows[-1]), flush=True)
        torch._dynamo.reset()
    return rows


# ---- whole models ----------------------------------------------------------------------------

def _build(name: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[int], tuple]]:
    if name == "llama-small":
        m = models.build("llama-small", max_seq_len=4096, dtype=dtype)
        return m, lambda t: models.example_inputs(m, seq=t)
    m = build_hf("gpt2", attn_implementation="eager", n_embd=512, n_head=8, n_layer=4,
                 n_positions=4096).to(dtype)
    return m, lambda t: hf_example_inputs(m, seq=t)


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _math_sdpa(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with SDPA forced to ATen's math backend: matmul -> softmax -> matmul, unfused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)
    return call


def whole_models(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    without = tuple(p for p in DEFAULT_PIPELINE if p != "fuse_attention")
    for name in ("llama-small", "hf-gpt2-eager"):
        for dtype_name, dtype in DTYPES.items():
            model, inputs = _build(name, dtype)
            variants: dict[str, Callable[..., Any]] = {"eager": model}
            if name == "llama-small":     # its SDPA call is ATen's fused kernel in eager
                variants["eager, SDPA math backend (unfused)"] = _math_sdpa(model)
            variants["optc without fuse_attention"] = optc.compile(
                model, config={"pipeline": list(without)})
            variants["optc"] = optc.compile(model)
            for t in sizes:
                args, kwargs = inputs(t)
                with torch.no_grad():
                    ref = _logits(model(*args, **kwargs)).float()
                    errs = {}
                    for vname, fn in variants.items():       # warm-up / compile
                        errs[vname] = (_logits(fn(*args, **kwargs)).float() - ref).abs().max().item()
                    times: dict[str, list] = {v: [] for v in variants}
                    for _ in range(_reps(t)):
                        for vname, fn in variants.items():
                            times[vname].append(_clock(lambda: fn(*args, **kwargs), 1))
                    ext = module_tensors(model)
                    peaks = {}
                    for vname, fn in variants.items():
                        peaks[vname] = _optc_peak(fn, args, kwargs) \
                            if isinstance(fn, optc.CompiledModel) else \
                            measure_peak_bytes(fn, *args, external=ext, **kwargs)
                for vname, fn in variants.items():
                    rows.append({"what": name, "dtype": dtype_name, "T": t, "variant": vname,
                                 "wall_s": min(w for w, _ in times[vname]),
                                 "cpu_s": min(c for _, c in times[vname]),
                                 "peak_bytes": peaks[vname], "max_abs_diff": errs[vname],
                                 "rules": _stats(fn) if isinstance(fn, optc.CompiledModel) else {}})
                    print(json.dumps(rows[-1]), flush=True)
            del variants, model
            torch._dynamo.reset()
    return rows


# ---- rule statistics -------------------------------------------------------------------------

def rule_stats() -> list[dict[str, Any]]:
    rows = []
    for arch in HF_ARCHS:
        for impl in ("eager", "sdpa"):
            model = build_hf(arch, attn_implementation=impl)
            args, kwargs = hf_example_inputs(model, seq=16)
            compiled = optc.compile(model)
            with torch.no_grad():
                compiled(*args, **kwargs)
            rows.append({"arch": arch, "attn_implementation": impl, "stats": _stats(compiled)})
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()
    return rows


# ---- report ----------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(rows: list[dict[str, Any]], rules: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# Attention fusion: prefill latency and peak memory ({meta['machine']})", "",
           f"Command: `{meta['command']}`. {meta['note']}", "",
           f"Latency: wall clock, min over repeats, {meta['threads']} thread(s) (process CPU time in "
           "parentheses). Peak: MiB "
           "of tensor storage alive at once (optc: arena + op allocations). Speedup = the "
           "unfused reference / fused (optc) wall time; the unfused reference is the eager "
           "attention (attention alone), eager with SDPA's math backend (llama-small, whose "
           "eager SDPA call already runs ATen's fused kernel), and eager (HF GPT-2 eager).", ""]
    for what in dict.fromkeys(r["what"] for r in rows):
        sub = [r for r in rows if r["what"] == what]
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        out += [f"## {what}", "",
                "| dtype | T | " + " | ".join(f"{v} ms" for v in variants) + " | speedup | "
                + " | ".join(f"{v} peak MiB" for v in variants) + " | max abs diff |",
                "|" + "---|" * (3 + 2 * len(variants) + 1)]
        for dtype in DTYPES:
            for t in sorted({r["T"] for r in sub}):
                cells = {r["variant"]: r for r in sub if r["dtype"] == dtype and r["T"] == t}
                if not cells:
                    continue
                fused = cells["fused" if "fused" in cells else "optc"]
                slow = cells[next(v for v in ("unfused", "eager, SDPA math backend (unfused)",
                                              "eager") if v in cells)]
                out.append(
                    f"| {dtype} | {t} | "
                    + " | ".join(f"{cells[v]['wall_s'] * 1e3:.1f} ({cells[v]['cpu_s'] * 1e3:.0f})"
                                 for v in variants)
                    + f" | {slow['wall_s'] / fused['wall_s']:.2f}x | "
                    + " | ".join(_mib(cells[v]["peak_bytes"]) for v in variants)
                    + f" | {max(c['max_abs_diff'] for c in cells.values()):.2g} |")
        out.append("")
    if rules:
        out += ["## fuse_attention rule statistics per HF architecture (tiny configs, seq 16)", "",
                "| arch | attn_implementation | statistics |", "|---|---|---|"]
        for r in rules:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(r["stats"].items()))
            out.append(f"| {r['arch']} | {r['attn_implementation']} | {stats} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-paths", action="store_true", help="time the CPU implementations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 for --cpu-paths, 2 otherwise)")
    ap.add_argument("--wall", action="store_true", help="--cpu-paths: wall clock, not CPU time")
    ap.add_argument("--quick", action="store_true", help="T = 512, 1024 only")
    ap.add_argument("--note", default="", help="free text for the report (e.g. machine busy)")
    ns = ap.parse_args(argv)
    if ns.cpu_paths:
        rows = cpu_paths((16, 64, 128, 256, 512, 1024, 2048), ns.threads or 1, ns.wall)
        print(cpu_table_text(rows))
        return 0
    torch.set_num_threads(ns.threads or 2)
    sizes = (512, 1024) if ns.quick else (512, 1024, 2048, 4096)
    rows = attention_alone(sizes) + whole_models(sizes)
    rules = rule_stats()
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}", "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.attention" + (" --quick" if ns.quick else "")
                       + (f" --threads {ns.threads}" if ns.threads else ""),
            "note": ns.note}
    RESULTS.mkdir(exist_ok=True)
    stem = "attention_quick" if ns.quick else "attention"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "rules": rules},
                                                     indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, rules, meta))
    print(markdown(rows, rules, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

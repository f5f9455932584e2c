"""Render a harness result: ``NAME.json`` (everything), ``NAME.md`` (tables), ``NAME.png`` (plot).

    python -m benchmarks report benchmarks/results/full.json     # re-render from the JSON

Ratios are "times better", > 1 meaning better: speed ÷ the reference's speed, the reference's time
or memory ÷ this row's. Each speed or memory number is shown as ``value (×eager-fp32 / ×best peer)``,
the best peer being the best row of that column among the peers (not optc) of the same model. The
decode ceiling is memory bandwidth (STREAM-like read) ÷ bytes read per token of the model as run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

HIGHER, LOWER = 1, -1


def _get(row: dict[str, Any], key: str) -> float | None:
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def _ratio(v: float | None, ref: float | None, direction: int) -> float | None:
    if v is None or ref is None or v <= 0 or ref <= 0:
        return None
    return v / ref if direction == HIGHER else ref / v


def derive(result: dict[str, Any]) -> None:
    """Add ``row["derived"]``: ratios to eager-fp32 and best peer, roofline ceiling and fraction."""
    rows = result["rows"]
    streams = [r["bandwidth_gbs"] for r in rows if r["task"] == "stream" and "error" not in r]
    best = {k: max(s[k] for s in streams) for k in streams[0]} if streams else None
    result["bandwidth_gbs"] = best          # best of the measurements at the start and the end
    bw = best["read"] if best else None
    lengths = sorted({T for r in rows for T in _prefill(r)}, key=int)
    metrics = {"lm": [("decode_tok_s", HIGHER), ("prefill_s", LOWER), ("decode_peak_rss_mib", LOWER),
                      ("decode_steady_rss_mib", LOWER)]
               + [(f"prefill.{T}.{k}", LOWER) for T in lengths for k in ("s", "peak_rss_mib")],
               "encoder": [("latency_s", LOWER), ("peak_rss_mib", LOWER)]}
    from benchmarks.configs import all_configs
    kinds = {n: c.kind for n, c in all_configs().items()}
    for task, cols in metrics.items():
        for model in sorted({r["model"] for r in rows if r["task"] == task}):
            group = [r for r in rows if r["task"] == task and r["model"] == model]
            fp32 = next((r for r in group if r["config"] == "eager-fp32"), None)
            peers = [r for r in group if kinds.get(r["config"]) == "peer" and "error" not in r]
            for key, direction in cols:
                vals = [v for v in (_get(r, key) for r in peers) if v is not None and v > 0]
                best = (max(vals) if direction == HIGHER else min(vals)) if vals else None
                for r in group:
                    d = r.setdefault("derived", {})
                    for name, ref in (("fp32", _get(fp32, key) if fp32 else None), ("best_peer", best)):
                        ratio = _ratio(_get(r, key), ref, direction)
                        if ratio is not None:
                            d[f"{key}/{name}"] = _round(ratio)
            for r in group:
                r["derived"]["kind"] = kinds.get(r["config"], "?")
                total = _get(r, "bytes_per_token.total")
                if task == "lm" and bw and total:
                    ceil = bw * 1e9 / total
                    r["derived"]["ceiling_tok_s"] = _round(ceil)
                    tok = _get(r, "decode_tok_s")
                    r["derived"]["ceiling_fraction"] = _round(tok / ceil) if tok else None


def _prefill(r: dict[str, Any]) -> dict[str, Any]:
    """The row's prefill results by length (absent when the row failed before measuring)."""
    p = r.get("prefill")
    return p if isinstance(p, dict) else {}


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _scaled(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def _fmt(v: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def _cell(r: dict[str, Any], key: str, fmt: str = "{:.4g}", scale: float = 1.0) -> str:
    v = _get(r, key)
    if v is None:
        err = _cell_error(r, key)
        return err or "–"
    d = r.get("derived", {})
    a, b = d.get(f"{key}/fp32"), d.get(f"{key}/best_peer")
    ratios = f" ({_fmt(a, '{:.2f}')}× / {_fmt(b, '{:.2f}')}×)" if a is not None or b is not None else ""
    return fmt.format(v * scale) + ratios


def _cell_error(r: dict[str, Any], key: str) -> str | None:
    if key.startswith("prefill.") and key.count(".") == 2:
        entry = _prefill(r).get(key.split(".")[1], {})
        if "error" in entry:
            return "error (see below)"
    return None


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, Callable[[dict[str, Any]], str]]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f(r) if "error" not in r else (f(r) if h in ("model", "config") else "")
                                     for h, f in cols) + " |")
        if "error" in r:
            out[-1] = f"| {r['model']} | {r['config']} | **failed**: see errors below |" + " |" * (len(cols) - 3)
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = result["rows"]
    lm = [r for r in rows if r["task"] == "lm"]
    enc = [r for r in rows if r["task"] == "encoder"]
    bw = result.get("bandwidth_gbs") or {}
    lines = [f"# optc benchmarks: suite `{result['suite']}`", ""]
    if result.get("note"):
        lines += [f"**{result['note']}**", ""]
    lines += [
        f"Command: `{result['command']}`  ",
        f"Started {result['started']}, {result['wall_s'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, ISA {', '.join(m['isa']) or '?'}; torch {m['torch']}, "
        f"`torch.set_num_threads({m['threads']})`, OMP_WAIT_POLICY={m['omp_wait_policy']}, "
        f"commit {m['git_commit']}. Load average before/after: {result['load_average']['before']} / "
        f"{result['load_average']['after']} (above ~0.5 other processes shared the cores).",
        "",
        "Each configuration ran in its own process (cold compile caches). Numbers are medians of the "
        "steady runs after a first call; **compile** is what the first call took beyond a steady one. "
        "Ratios in parentheses are *times better* than eager fp32 / than the best peer of the same model "
        "(> 1 = faster or smaller). Peak RSS is the process's resident peak during that phase (weights as "
        "run + caches + activations + runtime), reset before the phase; for decode, **peak** includes the "
        "first call (where a lazy compiler quantizes) and **steady** is the later runs' alone.",
        "",
        f"Memory bandwidth (STREAM-like, {_fmt(next((r.get('gib') for r in rows if r['task'] == 'stream'), None))} "
        f"GiB fp32 arrays, best of repeats, and best of the runs at the suite's start and end: "
        f"{', '.join(str(r['bandwidth_gbs']['read']) for r in rows if r['task'] == 'stream' and 'error' not in r)} "
        f"GB/s read): read {bw.get('read', '–')} GB/s, copy {bw.get('copy', '–')}, "
        f"triad {bw.get('triad', '–')}. Decode ceiling = read bandwidth ÷ bytes read per token (weights "
        "as run, one embedding row, whole static KV cache); a fraction above 100% means the bandwidth "
        "measurement was disturbed by other load.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in lm):
        group = [r for r in lm if r["model"] == model]
        acc = any("perplexity" in r for r in group)
        p0 = next((r for r in group if "params" in r), {})
        lines += [f"## Decode: `{model}` ({_fmt(p0.get('params', 0) / 1e6, '{:.2f}')} M parameters"
                  f"{'' if acc else ', random weights: speed only'}), batch 1, "
                  f"{group[0]['prompt_len']}-token prompt, {group[0]['new_tokens']} new tokens greedy", ""]
        cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
            ("model", lambda r: r["model"]), ("config", lambda r: r["config"]),
            ("decode tok/s", lambda r: _cell(r, "decode_tok_s")),
            ("prefill ms", lambda r: _cell(r, "prefill_s", "{:.1f}", 1e3)),
            ("compile s", lambda r: _fmt(_get(r, "compile_s"), "{:.1f}")),
            ("peak RSS MiB", lambda r: _cell(r, "decode_peak_rss_mib", "{:.0f}")),
            ("steady RSS MiB", lambda r: _cell(r, "decode_steady_rss_mib", "{:.0f}")),
            ("MB/token", lambda r: _fmt(_scaled(_get(r, "bytes_per_token.total"), 1e-6), "{:.1f}")),
            ("ceiling tok/s", lambda r: _fmt(r.get("derived", {}).get("ceiling_tok_s"), "{:.1f}")),
            ("% of ceiling", lambda r: _fmt(_scaled(r.get("derived", {}).get("ceiling_fraction"), 100),
                                           "{:.0f}%")),
            ("graphs / recompiles", lambda r: f"{r.get('graphs_first_call', '–')} / {r.get('recompiles_steady', '–')}"),
        ]
        if acc:
            cols += [("perplexity", lambda r: _fmt(_get(r, "perplexity"), "{:.3f}")),
                     ("top-1 agree", lambda r: _fmt(_get(r, "top1_agreement"), "{:.4f}")),
                     ("greedy agree (prefix)", lambda r: f"{_fmt(_get(r, 'greedy_agreement'), '{:.3f}')} "
                                                        f"({_fmt(_get(r, 'greedy_prefix'), '{:.3f}')})")]
        lines += _table(group, cols) + [""]
        if acc and p0.get("eval_tokens"):
            lines += [f"Accuracy on {p0['eval_tokens']} held-out tokens (seq 256); top-1 vs fp32 eager argmax; "
                      "greedy: generated tokens equal to fp32 eager's no-cache greedy decode, over every run's "
                      "prompt (in parentheses: mean fraction before the first difference).", ""]
        pre = sorted({T for r in group for T in _prefill(r)}, key=int)
        if pre:
            lines += [f"## Prefill: `{model}`, batch 1", ""]
            pcols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
                ("model", lambda r: r["model"]), ("config", lambda r: r["config"])]
            for T in pre:
                pcols += [(f"T={T} ms", lambda r, T=T: _cell(r, f"prefill.{T}.s", "{:.1f}", 1e3)),
                          (f"T={T} first call s", lambda r, T=T: _fmt(_get(r, f"prefill.{T}.first_call_s"),
                                                                      "{:.1f}")),
                          (f"T={T} peak RSS MiB", lambda r, T=T: _cell(r, f"prefill.{T}.peak_rss_mib", "{:.0f}"))]
            lines += _table(group, pcols) + [""]
    if enc:
        e0 = enc[0]
        lines += [f"## Encoder: `{e0['model']}`, batch {e0['batch']} x {e0['seq']} tokens", ""]
        ecols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
            ("model", lambda r: r["model"]), ("config", lambda r: r["config"]),
            ("latency ms", lambda r: _cell(r, "latency_s", "{:.1f}", 1e3)),
            ("compile s", lambda r: _fmt(_get(r, "compile_s"), "{:.1f}")),
            ("prepare s", lambda r: _fmt(_get(r, "prepare_s"), "{:.1f}")),
            ("peak RSS MiB", lambda r: _cell(r, "peak_rss_mib", "{:.0f}")),
            ("cosine mean", lambda r: _fmt(_get(r, "cosine_mean"), "{:.6f}")),
            ("cosine min", lambda r: _fmt(_get(r, "cosine_min"), "{:.6f}")),
        ]
        lines += _table(enc, ecols) + [
            "", f"Cosine similarity of mean-pooled sentence embeddings vs fp32 eager on "
                f"{e0.get('sentences', '?')} sentences (models/data/sentences.txt).", ""]
    errors = [(r, r["error"]) for r in rows if "error" in r]
    errors += [(r, f"prefill T={T}: {e['error']}") for r in rows for T, e in _prefill(r).items()
               if isinstance(e, dict) and "error" in e]
    if errors:
        lines += ["## Errors (exact messages)", ""]
        lines += [f"- `{r['task']}:{r['model']}:{r['config']}`: `{msg.strip()[:600]}`" for r, msg in errors]
        lines += [""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Decode speed vs accuracy for the LM rows that have accuracy; False if there are none."""
    rows = [r for r in result["rows"] if r["task"] == "lm" and "perplexity" in r and "decode_tok_s" in r]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "perplexity", "held-out perplexity (lower is better)"),
                           (axes[1], "top1_agreement", "top-1 agreement with fp32 eager")):
        for i, r in enumerate(rows):
            kind = r.get("derived", {}).get("kind", "peer")
            ax.scatter(r["decode_tok_s"], r[key], marker="o" if kind == "optc" else "s",
                       color="tab:red" if kind == "optc" else "tab:blue")
            ax.annotate(r["config"], (r["decode_tok_s"], r[key]), textcoords="offset points", xytext=(4, 4 - 9 * (i % 3)),
                        fontsize=8)
        ax.set_xlabel("decode tokens/s (batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    model = rows[0]["model"]
    fig.suptitle(f"{model}: decode speed vs accuracy (blue squares: peers, red circles: optc), "
                 f"{result['machine']['threads']} threads, suite {result['suite']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    derive(result)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    if plot(result, paths["png"]):
        result["plot"] = paths["png"].name
    else:
        paths.pop("png")
    md = markdown(result)
    if "plot" in result:
        md += f"\n![decode speed vs accuracy]({result['plot']})\n"
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(md)
    return paths

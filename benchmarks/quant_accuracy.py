"""Accuracy and size of every weight-quantization mode, on the trained tiny LM and all-MiniLM-L6-v2.

    python -m benchmarks.quant_accuracy                  # both models, every mode (~10 min, 2 cores)
    python -m benchmarks.quant_accuracy --skip-minilm    # the tiny LM only

Tiny LM (``models/tiny_lm``, fp32): perplexity on the fixed held-out tokens of
``models.metrics`` (``EVAL_TOKENS``: 64 windows of 256), its change against fp32, top-1
next-token agreement with fp32, and the mean KL(fp32 || quantized) per token (a low-noise
measure of how far the logits moved: it separates modes whose perplexities differ by less
than their sampling noise). all-MiniLM-L6-v2: mean and minimum cosine similarity of the
sentence embeddings of the committed sentence set against fp32. Calibration (AWQ): 8
windows of 256 tokens of the training split (the harness's ``calibration_batches``); for
MiniLM the first two batches of sentences (64 sentences, with their attention masks).

Sizes, per mode: ``memory`` = bytes of every tensor the compiled program reads (quantized
weights, scales, folded norms, and the float parameters no rule quantizes: embeddings,
norms); ``saved`` = bytes ``save_quantized`` writes (quantized tensors + folded parameters +
JSON); ``deployable`` = saved + the float parameters a model still needs from its checkpoint
(in their own dtype). The fp32 row is the model itself.

Rows: the six quantization presets of ``optc.presets`` (every linear and the lm_head), then
ablations that explain them: AWQ's scale search without its clipping search, int4 with the
lm_head kept in fp32, BFP without outlier reordering. Why AWQ helps little here is measured
too (``awq_diagnostics``): the spread of each linear's per-channel mean |x| (AWQ gains when a
few channels are far larger than the rest) and, per fold group, the α chosen and the output
error it leaves relative to round-to-nearest on the calibration rows.

Writes ``benchmarks/results/quant_accuracy.{json,md}``. Accuracy numbers do not depend on
the machine's load; the compile times printed do (labelled in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Mode:
    name: str
    make: Callable[[], Any]        # -> (CompileConfig or None, needs calibration)
    note: str = ""


def _modes() -> list[Mode]:
    from optc.config import CompileConfig
    from optc.passes.pipeline import pipeline_with
    from optc.passes.quantize_weights import LayerRule, QuantizeWeightsConfig
    from optc.presets import PRESETS

    def preset(name: str) -> Callable[[], Any]:
        return lambda: (PRESETS[name].config, PRESETS[name].needs_calibration)

    def custom(qcfg: QuantizeWeightsConfig) -> Callable[[], Any]:
        cfg = CompileConfig(pipeline=pipeline_with("quantize_weights"),
                            passes={"quantize_weights": qcfg.to_dict()})
        return lambda: (cfg, qcfg.needs_calibration())
    names = ("optc-int8", "optc-int4-g128", "optc-int4-g128-awq", "optc-int4-g32", "optc-w8a8", "optc-bfp")
    return [
        Mode("fp32", lambda: (None, False), "the model itself (reference)"),
        *[Mode(n, preset(n), PRESETS[n].description) for n in names],
        Mode("ablation: int4-g128 AWQ scales only", custom(QuantizeWeightsConfig.uniform(
            "int4", 128, awq=True, lm_head=True, awq_clip=False)), "AWQ's α search, no clipping search"),
        Mode("ablation: int4-g128 RTN, lm_head fp32", custom(QuantizeWeightsConfig(rules=(
            LayerRule("int4", 128),))), "every linear but the lm_head"),
        Mode("ablation: bfp without reordering", custom(QuantizeWeightsConfig.uniform(
            "bfp", 32, lm_head=True, bfp_order="none")), "channels in model order"),
        # 8-bit mantissas leave little for reordering to win; 4-bit ones show what it does
        Mode("ablation: bfp 4-bit mantissas", custom(QuantizeWeightsConfig(rules=(
            LayerRule("bfp", 32, 4), LayerRule("bfp", 32, 4, roles=("lm_head",))))), "reordered"),
        Mode("ablation: bfp 4-bit mantissas, no reordering", custom(QuantizeWeightsConfig(rules=(
            LayerRule("bfp", 32, 4), LayerRule("bfp", 32, 4, roles=("lm_head",))), bfp_order="none")),
            "channels in model order"),
    ]


# ---- sizes -------------------------------------------------------------------------------------

def _graph_tensors(compiled: Any) -> dict[int, tuple[str, torch.Tensor]]:
    """storage pointer -> (attribute name, tensor) of every tensor the compiled graphs read."""
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for g in compiled.report.graphs:
        gm = g.pipeline.gm
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = gm
                for part in str(n.target).split("."):
                    t = getattr(t, part)
                if isinstance(t, torch.Tensor):
                    out[t.untyped_storage().data_ptr()] = (str(n.target), t)
    return out


def _sizes(model: torch.nn.Module, compiled: Any | None) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if compiled is None or compiled.quant is None:
        return {"memory": params, "saved": 0, "deployable": params}
    with tempfile.TemporaryDirectory() as d:
        compiled.save_quantized(d)
        saved = sum(f.stat().st_size for f in Path(d).iterdir())
    read = _graph_tensors(compiled).values()
    # the model's own parameters still read (not quantized, not replaced by a folded copy)
    own = sum(t.untyped_storage().nbytes() for name, t in read
              if isinstance(t, torch.nn.Parameter) and not name.startswith("quant_"))
    return {"memory": sum(t.untyped_storage().nbytes() for _, t in read), "saved": saved,
            "deployable": saved + own}


def _compile(model: torch.nn.Module, mode: Mode, calibration: Callable[[], Any], example: Any
             ) -> tuple[Any, dict[str, float]]:
    """(compiled model or None for fp32, {calibration_s, quantize_s}): the seconds spent
    collecting statistics and in the quantize_weights pass (AWQ's searches, rounding)."""
    import optc
    cfg, needs = mode.make()
    if cfg is None:
        return None, {}
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = optc.compile(model, config=cfg, calibration=calibration() if needs else None)
    calib_s = time.perf_counter() - t0
    args, kwargs = example
    compiled(*args, **kwargs)
    rec = next(r for r in compiled.report.graphs[0].pipeline.records if r.name == "quantize_weights")
    return compiled, {"calibration_s": round(calib_s, 2), "quantize_s": round(rec.seconds, 2)}


def _pass_stats(compiled: Any) -> dict[str, int]:
    return dict(compiled.report.graphs[0].pipeline.stats().get("quantize_weights", {}))


# ---- tiny LM -------------------------------------------------------------------------------------

@torch.no_grad()
def tiny_lm(modes: list[Mode]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from benchmarks.worker import calibration_batches
    from models.metrics import EVAL_SEQ, next_token_predictions, perplexity, split_ids, token_agreement
    from models.train_tiny import load_tiny_lm

    model, _ = load_tiny_lm()
    ids = split_ids("heldout")
    calib = lambda: calibration_batches(model.args.vocab_size)          # noqa: E731
    windows = ids[: (ids.numel() - 1) // EVAL_SEQ * EVAL_SEQ].reshape(-1, EVAL_SEQ)  # KL inputs

    def log_probs(m: Any) -> torch.Tensor:
        return torch.cat([m(windows[i:i + 8]).log_softmax(-1) for i in range(0, windows.shape[0], 8)])
    ref_ppl = perplexity(model, ids, seq=EVAL_SEQ)
    ref_pred = next_token_predictions(model, ids, seq=EVAL_SEQ)
    ref_lp = log_probs(model)
    rows = []
    awq_plans = {}
    for mode in modes:
        compiled, seconds = _compile(model, mode, calib, ((windows[:8],), {}))
        m = compiled if compiled is not None else model
        ppl = perplexity(m, ids, seq=EVAL_SEQ)
        kl = F.kl_div(log_probs(m), ref_lp, log_target=True, reduction="none").sum(-1).mean().item()
        row = {"mode": mode.name, "note": mode.note, "perplexity": round(ppl, 4),
               "ppl_delta_pct": round(100 * (ppl / ref_ppl - 1), 3),
               "top1_agreement": round(token_agreement(next_token_predictions(m, ids, seq=EVAL_SEQ), ref_pred), 4),
               "kl_per_token": round(kl, 6), **seconds, **_sizes(model, compiled)}
        if compiled is not None:
            row["pass_stats"] = _pass_stats(compiled)
            plan = next(iter(compiled.quant.plans.values()))
            if plan.awq:
                awq_plans[mode.name] = plan
        rows.append(row)
        print(f"  tiny-lm {mode.name:40s} ppl {row['perplexity']:8.3f} ({row['ppl_delta_pct']:+.2f} %)  "
              f"top1 {row['top1_agreement']:.4f}  KL {row['kl_per_token']:.5f}  "
              f"mem {row['memory'] / 1e6:6.2f} MB  {seconds}", flush=True)
    return rows, _awq_diagnostics(model, calib(), awq_plans)


def _awq_diagnostics(model: torch.nn.Module, calibration: list, plans: dict[str, Any]) -> dict[str, Any]:
    from optc.quant.calibrate import collect
    calib = collect(model, calibration)
    spread = {name: float(st.abs_mean.max() / st.abs_mean.median()) for name, st in calib.stats.items()}
    out: dict[str, Any] = {
        "abs_mean_max_over_median": {k: round(v, 2) for k, v in spread.items()},
        "abs_mean_max_over_median_range": [round(min(spread.values()), 2), round(max(spread.values()), 2)],
    }
    for name, plan in plans.items():
        units = json.loads(plan.signature)["units"]
        groups = [{"members": units[i][0], "fold": units[i][2], "alpha": v["alpha"],
                   "error_vs_rtn": round(v["error"] / v["rtn_error"], 4) if v["rtn_error"] else None}
                  for i, v in sorted(plan.awq.items())]
        ratios = [g["error_vs_rtn"] for g in groups if g["error_vs_rtn"] is not None]
        out[name] = {"groups": groups, "median_alpha": statistics.median(g["alpha"] for g in groups),
                     "mean_error_vs_rtn": round(statistics.fmean(ratios), 4)}
    return out


# ---- MiniLM ------------------------------------------------------------------------------------

@torch.no_grad()
def minilm(modes: list[Mode]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from models.metrics import embedding_cosine, load_minilm, load_sentences, minilm_batches, sentence_embeddings
    model, tok = load_minilm()
    n = len(load_sentences())
    batches = minilm_batches(tok)
    ref = sentence_embeddings(model, batches, n)
    rows = []
    awq_plans: dict[str, Any] = {}
    for mode in modes:
        if mode.name.startswith("ablation: int4-g128 RTN, lm_head"):
            continue          # no lm_head in an encoder
        compiled, seconds = _compile(model, mode, lambda: batches[:2], ((), batches[0]))
        if compiled is not None and next(iter(compiled.quant.plans.values())).awq:
            awq_plans[mode.name] = next(iter(compiled.quant.plans.values()))
        emb = sentence_embeddings(compiled if compiled is not None else model, batches, n)
        mean, low = embedding_cosine(emb, ref)
        row = {"mode": mode.name, "cosine_mean": round(mean, 6), "cosine_min": round(low, 6),
               **seconds, **_sizes(model, compiled)}
        if compiled is not None:
            row["pass_stats"] = _pass_stats(compiled)
        rows.append(row)
        print(f"  minilm  {mode.name:40s} cosine mean {mean:.6f} min {low:.6f}  "
              f"mem {row['memory'] / 1e6:6.2f} MB  {seconds}", flush=True)
    return rows, _awq_diagnostics(model, batches[:2], awq_plans)


# ---- report ------------------------------------------------------------------------------------

def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}" if b else "–"


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Weight quantization: accuracy and size", "",
             f"`{res['command']}` — {res['machine']}, torch {res['torch']}. Accuracy does not depend on "
             "machine load; the seconds (the quantize_weights pass: AWQ's searches and the rounding) "
             "were taken on a shared machine with other jobs running.", "",
             "## Trained tiny LM (models/tiny_lm, 4.95 M parameters, fp32 activations)", "",
             f"Held-out: {res['tiny_lm_tokens']} tokens (models.metrics.EVAL_TOKENS), windows of 256. "
             "KL = mean KL(fp32 ‖ mode) per token.", "",
             "| mode | perplexity | Δ ppl | top-1 agreement | KL/token | memory MB | saved MB | deployable MB | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["tiny_lm"]:
        lines.append(f"| {r['mode']} | {r['perplexity']:.3f} | {r['ppl_delta_pct']:+.2f} % | "
                     f"{r['top1_agreement']:.4f} | {r['kl_per_token']:.5f} | {_mb(r['memory'])} | "
                     f"{_mb(r['saved'])} | {_mb(r['deployable'])} | {r.get('quantize_s', '–')} |")
    lines += _awq_lines(res.get("awq_diagnostics", {}), "tiny LM")
    lines += _comparisons(res["tiny_lm"], "kl_per_token", "KL/token", lower_is_better=True)
    if res.get("minilm"):
        lines += ["", "## all-MiniLM-L6-v2 (sentence embeddings, committed sentence set)", "",
                  "| mode | cosine mean | cosine min | memory MB | saved MB |", "|---|---|---|---|---|"]
        for r in res["minilm"]:
            lines.append(f"| {r['mode']} | {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} | "
                         f"{_mb(r['memory'])} | {_mb(r['saved'])} |")
        lines += _awq_lines(res.get("minilm_awq_diagnostics", {}), "MiniLM")
        lines += _comparisons(res["minilm"], "cosine_mean", "mean cosine", lower_is_better=False)
    lines += ["", "Sizes: memory = distinct tensors the compiled program reads; saved = what "
              "`save_quantized` writes; deployable = saved + float parameters still read from the "
              "model's checkpoint. Pass statistics per mode are in the JSON."]
    return "\n".join(lines) + "\n"


def _awq_lines(d: dict[str, Any], model: str) -> list[str]:
    if not d:
        return []
    lo, hi = d["abs_mean_max_over_median_range"]
    lines = ["", f"AWQ on the {model}: AWQ's scales gain where a few input channels carry much larger "
             f"activations than the rest; here the largest per-channel mean |x| of a linear's input is "
             f"{lo}–{hi}× its median.", ""]
    for name, v in d.items():
        if isinstance(v, dict) and "groups" in v:
            lines.append(f"- {name}: median α {v['median_alpha']}, mean output error vs RTN on the "
                         f"calibration rows {v['mean_error_vs_rtn']:.3f} ({len(v['groups'])} fold groups)")
    return lines


# (mode, baseline) pairs the ablations answer
_PAIRS = (("optc-int4-g128-awq", "optc-int4-g128"), ("ablation: int4-g128 AWQ scales only", "optc-int4-g128"),
          ("optc-bfp", "ablation: bfp without reordering"),
          ("ablation: bfp 4-bit mantissas", "ablation: bfp 4-bit mantissas, no reordering"))


def _comparisons(rows: list[dict[str, Any]], key: str, label: str, lower_is_better: bool) -> list[str]:
    """What each ablation pair says, as the relative change of ``key`` (of 1 - key for cosines)."""
    by = {r["mode"]: r for r in rows}
    lines = ["", f"Pairs ({label}; change relative to the second):", ""]
    for a, b in _PAIRS:
        if a in by and b in by:
            va, vb = by[a][key], by[b][key]
            da, db = (va, vb) if lower_is_better else (1 - va, 1 - vb)    # distance from fp32
            change = f"{100 * (da / db - 1):+.1f} % distance from fp32" if db else "n/a"
            lines.append(f"- {a} vs {b}: {va:.6g} vs {vb:.6g} ({change})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "quant_accuracy")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    modes = _modes()
    from models.metrics import EVAL_TOKENS
    res: dict[str, Any] = {
        "command": "python -m benchmarks.quant_accuracy" + (" --skip-minilm" if ns.skip_minilm else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {ns.threads} threads",
        "torch": torch.__version__, "tiny_lm_tokens": EVAL_TOKENS}
    print("tiny LM:", flush=True)
    res["tiny_lm"], res["awq_diagnostics"] = tiny_lm(modes)
    if not ns.skip_minilm:
        print("all-MiniLM-L6-v2:", flush=True)
        res["minilm"], res["minilm_awq_diagnostics"] = minilm(modes)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {ns.out}.json and .md")
    return 0


if __name__ == "__main__":
    # libgomp's busy-waiting makes 2 torch threads crawl when another process shares the cores
    # (small ops measured ~100x slower: 107 ms vs 1 ms for one 384x384 fake_quantize); passive
    # waiting costs nothing on a quiet machine. It must be set before OpenMP starts: re-exec.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.quant_accuracy", *sys.argv[1:]])
    sys.exit(main())

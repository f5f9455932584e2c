"""One measurement in its own process: ``python -m benchmarks.worker JOB.json RESULT.json``.

The harness starts one worker per (model, configuration), so each row's peak RSS is its own. A
job is a JSON dict (see ``benchmarks.harness.Job``); the result is a JSON dict of numbers, or
``{"error": ...}`` with the exception when the configuration fails (the row shows it).

Tasks:
  lm       load the model (fp32), [reference outputs of fp32 eager], prepare the configuration,
           then: greedy decode (batch 1, prompt_len tokens, new_tokens new) `repeats` times after a
           first call that compiles; [perplexity / top-1 / greedy agreement vs fp32]; prefill
           latency at each length in `prefill`; bytes per decoded token (roofline)
  encoder  batch x seq latency (first call, then median), and cosine similarity of sentence
           embeddings vs fp32 eager
  stream   memory bandwidth (benchmarks.roofline.stream)

Peak memory is the process's peak RSS (VmHWM) during each phase, reset before the phase
(``/proc/self/clear_refs``), so what loading and preparing the model left behind is not counted,
only what the phase holds: weights as run, caches, activations, compiled code. The decode
phase reports two: its peak with the first call (a lazy compiler such as optc quantizes there,
with the float weights still in RAM) and the steady runs' peak alone.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch


# ---- memory -------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset the peak-RSS watermark to the current RSS (Linux >= 4.0); False if not possible."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    return round(_status_kib("VmHWM") / 1024, 1)


# ---- models -------------------------------------------------------------------------------------
def load_lm(job: dict[str, Any]) -> torch.nn.Module:
    """fp32 causal LM: the trained tiny LM, or a zoo Llama with random weights (read from the
    harness's weight file when there is one: building a 1.1 B model draws 4.4 GB of random numbers,
    ~20 s, which every worker would otherwise repeat)."""
    import models
    if job["model"] == "tiny-lm":
        from models.train_tiny import load_tiny_lm
        return load_tiny_lm()[0]
    if models.family_of(job["model"]) != "llama":
        raise ValueError(f"decode rows need a zoo Llama (static KV cache); {job['model']!r} is not one")
    if not job.get("weights"):
        return models.build(job["model"], seed=0)
    from safetensors.torch import load_file

    from models.llama import rope_tables
    model = models.build(job["model"], device="meta").to_empty(device="cpu")
    model.load_state_dict(load_file(job["weights"]), strict=True)
    cos, sin = rope_tables(model.args)        # non-persistent: not in the file
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model.eval()


def save_lm_weights(name: str, path: str) -> None:
    """What the harness runs once per big zoo model: build with seed 0, save the fp32 weights."""
    import models
    from safetensors.torch import save_file
    model = models.build(name, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_encoder(job: dict[str, Any]) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], int]:
    """(fp32 encoder, fixed batches, number of real sentences in them)."""
    from models.metrics import load_minilm, load_sentences, minilm_batches
    b, t = job["batch"], job["seq"]
    if job["model"] == "minilm":
        model, tok = load_minilm()
        sentences = load_sentences()
        return model, minilm_batches(tok, sentences, batch=b, seq=t), len(sentences)
    import models
    model = models.build(job["model"], seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(job.get("batches", 2)):
        ids = torch.randint(0, model.args.vocab_size, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[:, t - (i + 1) * t // 8:] = 0          # padding, as real batches have
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches, b * len(batches)


def lm_prompts(job: dict[str, Any], vocab: int) -> list[torch.Tensor]:
    """One (1, prompt_len) prompt per run, consecutive slices of the held-out split."""
    from models.metrics import split_ids
    n, runs = job["prompt_len"], job["repeats"] + 1
    ids = split_ids("heldout", n * runs) % vocab   # random-weight zoo models may have a small vocab
    return [ids[i * n:(i + 1) * n].unsqueeze(0) for i in range(runs)]


def calibration_batches(vocab: int, count: int = 8, seq: int = 256) -> list[torch.Tensor]:
    """(1, seq) token-id batches from the tiny LM's training split (never evaluated on)."""
    from models.metrics import split_ids
    ids = split_ids("train", count * seq) % vocab
    return [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(count)]


# ---- tasks --------------------------------------------------------------------------------------
def _graphs_compiled() -> int:
    """Graphs Dynamo compiled so far in this process (torch.compile and optc's Dynamo path alike)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def run_lm(job: dict[str, Any], ctx_tmp: Path) -> dict[str, Any]:
    from benchmarks import configs, roofline
    from models.metrics import (EVAL_SEQ, common_prefix_fraction, greedy_reference, next_token_predictions,
                                perplexity, split_ids, token_agreement)
    from optc.runtime.generate import cache_owner, generate

    started = time.perf_counter()
    res: dict[str, Any] = {}
    model = load_lm(job)
    vocab = model.args.vocab_size
    res["params"] = sum(p.numel() for p in model.parameters())
    prompts = lm_prompts(job, vocab)
    n_new = job["new_tokens"]
    ref: dict[str, Any] = {}
    if job.get("accuracy"):
        t0 = time.perf_counter()
        eval_ids = split_ids("heldout", job["eval_tokens"])
        with torch.no_grad():
            ref["preds"] = next_token_predictions(model, eval_ids, seq=EVAL_SEQ)
            ref["greedy"] = [greedy_reference(model, p, n_new) for p in prompts]
        res["reference_s"] = round(time.perf_counter() - t0, 2)

    ctx = configs.Context(task="lm", tmp=ctx_tmp, threads=job["threads"],
                          calibration=lambda: calibration_batches(vocab))
    t0 = time.perf_counter()
    runnable = configs.prepare(job["config"], model, ctx)
    res["prepare_s"] = round(time.perf_counter() - t0, 2)
    res.update(ctx.info)
    del model
    owner = cache_owner(runnable)

    # decode: a first call (compiles prefill and decode graphs), then steady runs on the same cache
    reset_peak()
    g0 = _graphs_compiled()
    first = generate(runnable, prompts[0], n_new)
    g1 = _graphs_compiled()
    first_peak = peak_mib()
    reset_peak()           # the steady runs alone: what the model holds as it runs
    runs = [generate(runnable, p, n_new, setup=False) for p in prompts[1:]]
    g2 = _graphs_compiled()
    res["decode_steady_rss_mib"] = peak_mib()
    res["decode_peak_rss_mib"] = max(first_peak, res["decode_steady_rss_mib"])
    steady_prefill = statistics.median(r.prefill_s for r in runs)
    steady_step = statistics.median(s for r in runs for s in r.decode_s)
    res["decode_tok_s"] = round(statistics.median(r.decode_tokens_per_s() for r in runs), 3)
    res["decode_tok_s_runs"] = [round(r.decode_tokens_per_s(), 3) for r in runs]
    res["prefill_s"] = round(steady_prefill, 4)
    res["first_call_s"] = round(first.prefill_s + first.decode_s[0], 3)
    # compile time: what the first prefill and the first decode step took beyond a steady one
    res["compile_s"] = round(max(0.0, first.prefill_s - steady_prefill)
                             + max(0.0, first.decode_s[0] - steady_step), 3)
    res["graphs_first_call"] = g1 - g0
    res["recompiles_steady"] = g2 - g1      # must be 0: steady runs reuse the compiled graphs
    res["bytes_per_token"] = roofline.bytes_per_token(runnable)
    res["cache_len"] = owner.cache_len

    if ref:
        gen = torch.cat([r.new_tokens for r in [first, *runs]])
        want = torch.cat(ref["greedy"])
        res["greedy_agreement"] = round(token_agreement(gen, want), 4)
        res["greedy_prefix"] = round(common_prefix_fraction(gen, want), 4)
        eval_ids = split_ids("heldout", job["eval_tokens"])
        t0 = time.perf_counter()
        res["perplexity"] = round(perplexity(runnable, eval_ids, seq=EVAL_SEQ), 4)
        res["perplexity_s"] = round(time.perf_counter() - t0, 2)   # includes a compile, if any
        res["top1_agreement"] = round(token_agreement(
            next_token_predictions(runnable, eval_ids, seq=EVAL_SEQ), ref["preds"]), 4)
        res["eval_tokens"] = eval_ids.numel() - 1

    # prefill at longer prompts: a cache of exactly T positions, first call, then steady calls
    res["prefill"] = {T: {"error": why} for T, why in job.get("prefill_skipped", {}).items()}
    prev: tuple[int, float] | None = None      # (T, seconds of one steady call) of the last length
    for T in job.get("prefill_lengths", []):
        entry: dict[str, Any] = {}
        res["prefill"][str(T)] = entry
        if prev is not None:
            # a configuration too slow to finish in the job's time gets a cell saying so, not a kill
            # that loses the whole row: estimate linearly in T (attention's T^2 is small at 2048)
            estimate = prev[1] * T / prev[0] * (job["prefill_repeats"] + 1)
            left = job.get("time_limit_s", float("inf")) - (time.perf_counter() - started) - 15
            if estimate > left:
                entry["error"] = (f"skipped: ~{estimate:.0f} s estimated from T={prev[0]}, "
                                  f"{max(0, left):.0f} s left in the job")
                continue
        try:
            ids = (split_ids("heldout", T) % vocab).unsqueeze(0)
            pos = torch.arange(T)
            reset_peak()
            owner.setup_caches(1, T)
            times = []
            with torch.no_grad():
                for _ in range(job["prefill_repeats"] + 1):
                    t0 = time.perf_counter()
                    runnable(ids, pos)
                    times.append(time.perf_counter() - t0)
            entry["first_call_s"] = round(times[0], 3)
            entry["s"] = round(statistics.median(times[1:]), 4)
            entry["peak_rss_mib"] = peak_mib()
            prev = (T, entry["s"])
        except Exception as e:  # noqa: BLE001 - one failing length is a cell with its error
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
    return res


def run_encoder(job: dict[str, Any], ctx_tmp: Path) -> dict[str, Any]:
    from benchmarks import configs
    from models.metrics import embedding_cosine, sentence_embeddings

    res: dict[str, Any] = {}
    model, batches, count = load_encoder(job)
    res["params"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    ref = sentence_embeddings(model, batches, count)
    res["reference_s"] = round(time.perf_counter() - t0, 2)

    def calibration() -> list[torch.Tensor]:
        return [b["input_ids"] for b in batches[:2]]

    ctx = configs.Context(task="encoder", tmp=ctx_tmp, threads=job["threads"], calibration=calibration,
                          example=((), batches[0]))
    t0 = time.perf_counter()
    runnable = configs.prepare(job["config"], model, ctx)
    res["prepare_s"] = round(time.perf_counter() - t0, 2)
    res.update(ctx.info)
    del model
    reset_peak()
    times = []
    with torch.no_grad():
        for _ in range(job["repeats"] + 1):
            t0 = time.perf_counter()
            runnable(**batches[0])
            times.append(time.perf_counter() - t0)
    res["peak_rss_mib"] = peak_mib()
    res["first_call_s"] = round(times[0], 3)
    res["latency_s"] = round(statistics.median(times[1:]), 4)
    res["compile_s"] = round(max(0.0, times[0] - res["latency_s"]), 3)
    emb = sentence_embeddings(runnable, batches, count)
    res["cosine_mean"], res["cosine_min"] = (round(x, 6) for x in embedding_cosine(emb, ref))
    res["sentences"] = count
    return res


def run_stream(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.roofline import stream
    return {"bandwidth_gbs": stream(job["gib"], job["threads"], job.get("repeats", 5)), "gib": job["gib"]}


def run(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    tmp = Path(job["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if job["task"] == "lm":
            res = run_lm(job, tmp)
        elif job["task"] == "encoder":
            res = run_encoder(job, tmp)
        elif job["task"] == "stream":
            res = run_stream(job)
        elif job["task"] == "weights":
            save_lm_weights(job["model"], job["weights"])
            res = {}
        else:
            raise ValueError(f"unknown task {job['task']!r}")
    except Exception as e:  # noqa: BLE001 - a failing configuration is a row with its error
        res = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    res["threads"] = torch.get_num_threads()
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    res = run(job)
    Path(argv[1]).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))

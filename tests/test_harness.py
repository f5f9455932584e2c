"""The benchmark harness runs (tiny shapes), turns failures into rows, and counts bytes right.

No test here asserts on a time: only that numbers exist, are positive, and that the lossless
configurations agree with fp32 eager.
"""

from __future__ import annotations

import json

import pytest
import torch

import models
import optc
from benchmarks import harness, report, roofline
from benchmarks.configs import all_configs, config_names
from optc.presets import PRESETS, Preset
from optc.runtime.generate import generate


def test_suites_pick_up_every_config_and_new_presets(monkeypatch):
    full = harness.suite_jobs("full")
    lm_configs = {j.config for j in full if j.model == "tinyllama-1.1b"}
    assert lm_configs == set(config_names("lm")) >= {"eager-fp32", "eager-bf16", "inductor-fp32",
                                                     "torchao-int8", "torchao-int4", *PRESETS}
    assert {j.config for j in full if j.task == "encoder"} >= {"onnxruntime", "inductor-fp32", "optc"}
    long = {j.config: j.params["prefill_lengths"] == [512, 2048] and "prefill_skipped" not in j.params
            for j in full if j.model == "tinyllama-1.1b"}
    # T=2048: eager, the fastest prefill peer, the lossless and bf16-activation presets, and one
    # fp32-activation quantized preset (what fp32 activations cost there)
    assert {c for c, both in long.items() if both} == {
        "eager-fp32", "eager-bf16", "inductor-bf16", "optc", "optc-bf16", "optc-int4-g128",
        *(p for p in PRESETS if p.endswith("-bf16"))}
    assert {"optc-int8-bf16", "optc-int4-g128-bf16"} <= set(PRESETS)
    assert all(j.params["prefill_lengths"] == [512] and set(j.params["prefill_skipped"]) == {"2048"}
               for j in full if j.model == "tinyllama-1.1b" and not long[j.config])
    # a preset registered later shows up with no harness change; causal_lm_only stays off encoders
    monkeypatch.setitem(PRESETS, "optc-test-new", Preset("optc-test-new", "test", causal_lm_only=True))
    jobs = harness.suite_jobs("full")
    assert {j.task for j in jobs if j.config == "optc-test-new"} == {"lm"}
    assert all_configs()["optc-test-new"].kind == "optc"
    quick = harness.suite_jobs("quick", configs=["eager-fp32"], models=["tiny-lm"])
    assert [(j.task, j.model, j.config) for j in quick] == [
        ("stream", "stream", "start"), ("lm", "tiny-lm", "eager-fp32"), ("stream", "stream", "end")]
    with pytest.raises(ValueError, match="unknown suite"):
        harness.suite_jobs("huge")


def test_tiny_run_end_to_end(tmp_path):
    keep = {("stream", "start"), ("tiny-lm", "eager-fp32"), ("tiny-lm", "optc"), ("bert-tiny", "eager-fp32")}
    jobs = [j for j in harness.suite_jobs("quick", tiny=True) if (j.model, j.config) in keep]
    llama = next(j for j in harness.suite_jobs("quick", tiny=True) if j.model == "llama-tiny")
    jobs[1].params = {**jobs[1].params, "prefill_lengths": [32, 64],    # tiny-lm eager-fp32: prefill too
                      "prefill_skipped": {"128": "not in this suite"}}
    jobs.append(harness.Job("lm", "llama-tiny", "no-such-config", llama.params, 120))
    result = {"suite": "test", "started": "now", "wall_s": 1.0, "command": "pytest", "note": "",
              "machine": harness.machine_info(2), "load_average": {"before": [0], "after": [0]},
              "jobs": [], "rows": harness.run_jobs(jobs, threads=2)}
    paths = report.write(result, tmp_path, "test")
    rows = {(r["model"], r["config"]): r for r in json.loads(paths["json"].read_text())["rows"]}

    assert rows[("stream", "start")]["bandwidth_gbs"]["read"] > 0
    fp32, opt = rows[("tiny-lm", "eager-fp32")], rows[("tiny-lm", "optc")]
    for r in (fp32, opt):
        assert "error" not in r, r.get("traceback")
        assert r["decode_tok_s"] > 0 and r["prefill_s"] > 0 and r["decode_peak_rss_mib"] > 0
        assert r["threads"] == 2 and r["recompiles_steady"] == 0
        assert r["greedy_agreement"] == 1.0 and r["eval_tokens"] == 2048
        assert 0 < r["derived"]["ceiling_fraction"]
    assert fp32["top1_agreement"] == 1.0 and fp32["derived"]["decode_tok_s/fp32"] == 1.0
    assert opt["top1_agreement"] >= 0.999                     # lossless: at most a near-tie flips
    assert opt["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-4)
    assert 10 < fp32["perplexity"] < 100                      # the trained model, not noise (vocab 4096)
    assert opt["graphs_first_call"] == 2                      # one prefill graph, one decode graph
    assert opt["bytes_per_token"] == fp32["bytes_per_token"]  # same tensors read
    pre = fp32["prefill"]
    assert pre.pop("128") == {"error": "not in this suite"}      # a skipped length is a cell saying why
    assert set(pre) == {"32", "64"} and all(e["s"] > 0 and e["peak_rss_mib"] > 0 for e in pre.values())
    enc = rows[("bert-tiny", "eager-fp32")]
    assert enc["cosine_min"] == pytest.approx(1.0, abs=1e-6) and enc["latency_s"] > 0
    bad = rows[("llama-tiny", "no-such-config")]
    assert "unknown configuration 'no-such-config'" in bad["error"]

    md = paths["md"].read_text()
    assert "## Decode: `tiny-lm`" in md and "## Prefill: `tiny-lm`" in md and "## Encoder" in md
    assert "no-such-config" in md.split("## Errors")[1]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_timeout_is_a_row(tmp_path):
    row = harness.run_job(harness.Job("lm", "tiny-lm", "eager-fp32", harness._LM, timeout_s=0.5), 1, tmp_path)
    assert row["error"].startswith("timed out after") and row["config"] == "eager-fp32"


def test_report_ratios_best_peer_and_failed_rows():
    rows = [
        {"task": "lm", "model": "m", "config": "eager-fp32", "decode_tok_s": 10.0, "decode_peak_rss_mib": 400.0},
        {"task": "lm", "model": "m", "config": "eager-bf16", "decode_tok_s": 20.0, "decode_peak_rss_mib": 200.0},
        {"task": "lm", "model": "m", "config": "optc", "decode_tok_s": 30.0, "decode_peak_rss_mib": 100.0},
        {"task": "lm", "model": "m", "config": "torchao-int4", "error": "RuntimeError: boom"},
    ]
    result = {"rows": rows}
    report.derive(result)
    d = rows[2]["derived"]
    assert d["decode_tok_s/fp32"] == 3.0 and d["decode_tok_s/best_peer"] == 1.5
    assert d["decode_peak_rss_mib/fp32"] == 4.0 and d["decode_peak_rss_mib/best_peer"] == 2.0
    assert rows[1]["derived"]["decode_tok_s/best_peer"] == 1.0


def _expected_bytes(m: torch.nn.Module) -> int:
    emb = m.tok_embeddings.weight
    tensors = [t for n, t in [*m.named_parameters(), *m.named_buffers()] if t is not emb]
    return sum(t.numel() * t.element_size() for t in tensors) + emb.shape[1] * emb.element_size()


def test_bytes_per_token_eager_compiled_and_quantized():
    m = models.build("llama-tiny")
    ids = torch.randint(0, 256, (1, 8))
    generate(m, ids, 3)
    got = roofline.bytes_per_token(m)
    assert got["total"] == _expected_bytes(m)
    a = m.layers[0].attention.kv_cache
    assert got["kv_cache"] == 2 * len(m.layers) * a.k_cache.numel() * 4
    assert got["embedding_rows"] == m.args.dim * 4
    assert roofline.bytes_per_token(torch.compile(m)) == got         # the wrapper: same module
    compiled = optc.compile(m)
    generate(compiled, ids, 3)
    assert roofline.bytes_per_token(compiled) == got                 # the optc decode graph's constants
    assert roofline.bytes_per_token(m.to(torch.bfloat16))["total"] == _expected_bytes(m)   # bf16 halves


def test_bytes_per_token_counts_torchao_packed_weights():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    m = models.build("llama-tiny", dtype=torch.bfloat16)
    before = roofline.bytes_per_token(m)
    quantize_(m, Int8WeightOnlyConfig())
    after = roofline.bytes_per_token(m)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    # int8 data (1 byte per weight) replaces bf16 (2 bytes): counted by the inner tensors, not by
    # the wrapper's dtype (bf16); per-row scales add a little
    assert before["weights"] - linear < after["weights"] < before["weights"] - linear // 2


def test_stream_reports_bandwidth():
    bw = roofline.stream(gib=1 / 64, threads=1, repeats=1)
    assert set(bw) == {"copy", "triad", "read"} and all(v > 0 for v in bw.values())


def test_optc_bench_jobs_for_one_model(capsys):
    jobs = harness.jobs_for_model("tiny-lm", "quick", configs=["eager-fp32", "optc"])
    assert [(j.task, j.model, j.config) for j in jobs] == [
        ("stream", "stream", "start"), ("lm", "tiny-lm", "eager-fp32"), ("lm", "tiny-lm", "optc"),
        ("stream", "stream", "end")]
    small = harness.jobs_for_model("zoo:llama-small", "full")
    assert {j.config for j in small if j.task == "lm"} == set(config_names("lm"))
    assert all(j.params["prefill_lengths"] == [512] for j in small if j.task == "lm")   # max_seq_len 1024
    assert {j.task for j in harness.jobs_for_model("bert-tiny")} == {"stream", "encoder"}
    from optc.cli import main
    assert main(["bench", "gpt2-tiny"]) == 2
    assert "Llama decoders" in capsys.readouterr().err


def test_time_budget_turns_unstarted_jobs_into_rows():
    jobs = harness.suite_jobs("quick", tiny=True, configs=["eager-fp32"])[1:3]   # 2 LM jobs
    rows = harness.run_jobs(jobs, budget_s=1e-3)
    assert [r["config"] for r in rows] == ["eager-fp32", "eager-fp32"]
    assert all(r["error"].startswith("not run: the suite's time budget") for r in rows)


def test_big_model_weight_file_round_trip(tmp_path):
    from benchmarks.worker import load_lm, save_lm_weights
    path = str(tmp_path / "w.safetensors")
    save_lm_weights("llama-tiny", path)
    loaded = load_lm({"model": "llama-tiny", "weights": path})
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), models.build("llama-tiny", seed=0)(ids))   # rope tables too


def test_preset_casts_a_copy_unless_handed_the_model():
    from optc.presets import PRESETS
    model = models.build("llama-tiny")
    PRESETS["optc-bf16"].compile(model)
    assert next(model.parameters()).dtype == torch.float32          # the caller's model kept
    compiled = PRESETS["optc-bf16"].compile(model, copy=False)
    assert next(model.parameters()).dtype == torch.bfloat16         # cast in place
    assert compiled.model is model

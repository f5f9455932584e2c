"""Saving and loading quantized models: bit-identical outputs without re-quantizing, and a
clear error (never other numbers) for a corrupt file, other weights or another config."""

from __future__ import annotations

import json

import pytest
import torch

import models
import optc
from optc.config import ConfigError
from optc.passes import quantize_weights
from optc.passes.pipeline import pipeline_with
from optc.passes.quantize_weights import LayerRule, QuantizeWeightsConfig
from optc.quant import serialize

# every kind of record a plan holds: AWQ folds into norms, w3's rows and an explicit multiply
# (o), clipping, a BFP permutation gathered by its op (layer 1), and the lm_head
QCFG = QuantizeWeightsConfig(rules=(LayerRule("int4", 32, awq=True), LayerRule("bfp", 16, layers=(1,)),
                                    LayerRule("int8", roles=("lm_head",))), awq_grid=4)
CFG = {"pipeline": list(pipeline_with("quantize_weights")), "strict": True,
       "passes": {"quantize_weights": QCFG.to_dict()}}


def _model() -> torch.nn.Module:
    return models.build("llama-tiny", hidden_dim=128)     # every K a multiple of 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, inputs, outputs) of a model quantized with calibration and saved."""
    torch._dynamo.reset()
    model = _model()
    args, _ = models.example_inputs(model, batch=2, seq=8)
    calib = [models.example_inputs(model, seq=16, seed=s)[0] for s in range(2)]
    c = optc.compile(model, config=CFG, calibration=calib, example_inputs=args)
    with torch.no_grad():
        out = c(*args)
    d = tmp_path_factory.mktemp("quantized")
    c.save_quantized(str(d))
    torch._dynamo.reset()
    return d, args, out


def test_round_trip_is_bit_identical_and_does_not_requantize(saved, monkeypatch):
    d, args, out = saved
    def refuse(*a, **k):
        raise AssertionError("compute_plan ran: quantization was redone")
    monkeypatch.setattr(quantize_weights, "compute_plan", refuse)
    for config in (None, CFG):          # None: the config saved in the directory
        torch._dynamo.reset()
        c = optc.compile(_model(), config=config, quantized=str(d), example_inputs=args)
        with torch.no_grad():
            assert torch.equal(c(*args), out)
        stats = c.report.graphs[0].pipeline.stats()["quantize_weights"]
        assert stats["quantized.int4"] == 7 and stats["quantized.bfp"] == 7 and stats["quantized.int8"] == 1
    assert sorted(p.name for p in d.iterdir()) == [serialize.META_FILE, serialize.TENSORS_FILE]


def test_saved_json_records_what_was_done(saved):
    d, _, _ = saved
    meta = json.loads((d / serialize.META_FILE).read_text())
    assert meta["format"] == serialize.FORMAT and meta["version"] == serialize.FORMAT_VERSION
    (plan,) = meta["plans"]
    assert len(plan["weights"]) == 15
    assert meta["calibration"]["batches"] == 2
    assert {w["scheme"]["mode"] for w in plan["weights"].values()} == {"int4", "bfp", "int8"}
    assert "layers.0.attention_norm.weight" in plan["replaced"]        # AWQ folded into the norm
    assert set(plan["awq"]) and all(0 <= v["alpha"] <= 1 for v in plan["awq"].values())


def test_other_weights_are_refused(saved):
    d, args, _ = saved
    model = _model()
    with torch.no_grad():
        model.layers[1].attention.wq.weight[0, 0] += 1.0
    with pytest.raises(ConfigError, match="other weights.*layers.1.attention.wq.weight"):
        optc.compile(model, quantized=str(d))


def test_other_config_is_refused(saved):
    d, _, _ = saved
    other = dict(CFG, passes={"quantize_weights": QuantizeWeightsConfig.uniform("int8").to_dict()})
    with pytest.raises(ConfigError, match="differ from those saved"):
        optc.compile(_model(), config=other, quantized=str(d))


def test_other_graph_layout_is_refused(saved):
    """The saved weights, in a model with one more layer: the fingerprints agree, the graph's
    layout does not; loading is strict, so the call fails instead of running unquantized."""
    d, _, _ = saved
    model = models.build("llama-tiny", hidden_dim=128, n_layers=3)
    model.load_state_dict(_model().state_dict(), strict=False)
    args, _ = models.example_inputs(model, seq=8)
    c = optc.compile(model, quantized=str(d))
    assert c.config.strict is True
    with pytest.raises(Exception, match="another graph layout"):
        c(*args)


def test_corrupt_or_missing_files_are_refused(saved, tmp_path):
    d, _, _ = saved
    with pytest.raises(ConfigError, match="not a saved optc quantization"):
        optc.compile(_model(), quantized=str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = bytearray((d / serialize.TENSORS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / serialize.TENSORS_FILE).write_bytes(bytes(blob))
    (bad / serialize.META_FILE).write_text((d / serialize.META_FILE).read_text())
    with pytest.raises(ConfigError, match="does not match the hash"):
        optc.compile(_model(), quantized=str(bad))
    (bad / serialize.META_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        optc.compile(_model(), quantized=str(bad))
    meta = json.loads((d / serialize.META_FILE).read_text())
    (bad / serialize.META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ConfigError, match="version"):
        optc.compile(_model(), quantized=str(bad))


def test_save_needs_a_quantized_graph(tmp_path):
    model = _model()
    c = optc.compile(model, config=CFG, calibration=[models.example_inputs(model, seq=8)[0]])
    with pytest.raises(ConfigError, match="call the compiled model once"):
        c.save_quantized(str(tmp_path))
    with pytest.raises(ConfigError, match="without quantize_weights"):
        optc.compile(model).save_quantized(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_tells_weights_apart():
    w = torch.randn(64, 32)
    v = w.clone()
    v[17, 5] += 1e-3
    assert serialize.fingerprint(w) == serialize.fingerprint(w.clone())
    assert serialize.fingerprint(w) != serialize.fingerprint(v)
    assert serialize.fingerprint(w) != serialize.fingerprint(w.to(torch.bfloat16))

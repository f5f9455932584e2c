"""optc.quant.offload: the float weights quantization replaced leave RAM, and stay the model's.

Checked: the tensor keeps its object, shape, dtype and every bit, its storage becomes a file
mapping (the file already unlinked); what it skips and why (exact statistics); the pass
offloads exactly the quantized linears' weights, once across graphs; compiled and eager
outputs are bit-identical to a compile without offloading; a later graph reuses the plan
without reading the weights again, and a changed weight is still noticed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import models
import optc
from optc.passes.pipeline import pipeline_with
from optc.passes.quantize_weights import QuantizeWeightsConfig
from optc.quant import offload as O
from optc.quant import serialize


@pytest.fixture
def small_ok(monkeypatch):
    """Offload tiny test tensors too (the real floor is 1 MiB)."""
    monkeypatch.setattr(O, "MIN_BYTES", 0)


def _mapped_file(t: torch.Tensor) -> str | None:
    return t.untyped_storage().filename


def test_offload_keeps_the_tensor_and_its_bits(tmp_path):
    p = torch.nn.Parameter(torch.randn(1024, 1024).to(torch.bfloat16), requires_grad=False)
    before = p.detach().clone()
    ident = id(p)
    stats = O.offload([p, p], tmp_path)                  # listed twice: done once
    assert stats == {"offloaded": 1, "offloaded_mib": 2}
    assert id(p) == ident and p.shape == (1024, 1024) and p.dtype == torch.bfloat16
    assert isinstance(p, torch.nn.Parameter) and torch.equal(p, before)
    name = _mapped_file(p)
    assert name is not None and Path(name).parent == tmp_path
    assert not os.path.exists(name)                      # unlinked: the mapping keeps the blocks
    assert list(tmp_path.iterdir()) == []
    assert O.is_offloaded(p)
    assert O.offload([p], tmp_path) == {"offload_skipped.already": 1}
    p.data = before.clone()                              # replaced by the user: in RAM again
    assert not O.is_offloaded(p) and _mapped_file(p) is None


def test_offloaded_tensor_is_still_writable_and_usable(tmp_path, small_ok):
    w = torch.randn(64, 32)
    lin = torch.nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(3, 32)
    y = lin(x)
    assert O.offload([lin.weight], tmp_path)["offloaded"] == 1
    assert torch.equal(lin(x), y)
    with torch.no_grad():
        lin.weight.mul_(2)                               # writes go to the mapping
    assert torch.equal(lin.weight, w * 2)


def test_what_it_skips(tmp_path, monkeypatch):
    base = torch.randn(1024, 1024)
    cases = [torch.randn(8, 8),                          # small
             base[:512],                                 # a view of a larger storage
             torch.randn(1024, 1024).t()]                # not contiguous
    assert O.offload(cases, tmp_path) == {"offload_skipped.small": 1,
                                          "offload_skipped.shared_storage": 1,
                                          "offload_skipped.layout": 1}
    big = torch.randn(1024, 1024)
    monkeypatch.setattr(O.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(1 << 40, 0, 1 << 20))
    assert O.offload([big], tmp_path) == {"offload_skipped.disk_full": 1}
    monkeypatch.setattr(O, "_fs_type", lambda d: "tmpfs")
    assert O.offload([big], tmp_path) == {"offload_skipped.tmpfs": 1}
    assert _mapped_file(big) is None


def test_fs_type_reads_the_longest_mount():
    assert O._fs_type(Path("/proc")) == "proc"
    if os.path.isdir("/dev/shm"):
        assert O._fs_type(Path("/dev/shm")) == "tmpfs"


def test_fingerprint_is_remembered_and_changes_are_noticed(tmp_path, monkeypatch, small_ok):
    calls = []
    real = serialize._fingerprint
    monkeypatch.setattr(serialize, "_fingerprint", lambda t: calls.append(1) or real(t))
    for offloaded in (False, True):
        calls.clear()
        w = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
        fp = serialize.fingerprint(w)
        if offloaded:
            O.offload([w], tmp_path)
            serialize.remember(w, fp)
        assert serialize.fingerprint(w) == fp and len(calls) == 1       # remembered
        with torch.no_grad():
            w[3, 4] += 1.0                                              # in place: version bump
        assert serialize.fingerprint(w) != fp and len(calls) == 2
        fp2 = serialize.fingerprint(w)
        w.data = torch.randn(64, 32)                                    # another storage
        assert serialize.fingerprint(w) != fp2 and len(calls) == 3


QCFG = QuantizeWeightsConfig.uniform("int8", lm_head=True)
CFG = {"pipeline": list(pipeline_with("quantize_weights")), "strict": True,
       "passes": {"quantize_weights": QCFG.to_dict()}}


def _run(offload: bool, monkeypatch) -> tuple:
    torch._dynamo.reset()
    model = models.build("llama-tiny")
    args, _ = models.example_inputs(model, batch=1, seq=8)
    with torch.no_grad():
        eager_before = model(*args)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    real = serialize._fingerprint
    monkeypatch.setattr(serialize, "_fingerprint", lambda t: calls.append(1) or real(t))
    c = optc.compile(model, config=CFG, offload_weights=offload)
    with torch.no_grad():
        out = c(*args)
        fps_first = len(calls)
        args2, _ = models.example_inputs(model, batch=1, seq=5, seed=3)   # another graph
        out2 = c(*args2)
        eager_after = model(*args)
    return model, c, out, out2, eager_before, eager_after, weights, fps_first, len(calls)


def test_compile_offloads_the_quantized_weights_once(monkeypatch, small_ok, tmp_path):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    model, c, out, out2, eager_before, eager_after, weights, fp1, fp2 = _run(True, monkeypatch)
    _, _, ref, ref2, *_ = _run(False, monkeypatch)
    assert torch.equal(out, ref) and torch.equal(out2, ref2)     # the graphs never read them
    assert torch.equal(eager_after, eager_before)                # the user's model: same bits
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    graphs = c.report.graphs
    assert len(graphs) >= 2
    first = graphs[0].pipeline.stats()["quantize_weights"]
    linears = first["quantized.int8"]
    assert linears > 0 and first["offloaded"] == linears
    offloaded = [n for n, p in model.named_parameters() if O.is_offloaded(p)]
    assert len(offloaded) == linears and all(n.endswith(".weight") for n in offloaded)
    assert not any(O.is_offloaded(p) for n, p in model.named_parameters() if "norm" in n)
    later = graphs[1].pipeline.stats()["quantize_weights"]
    assert later.get("offloaded", 0) == 0 and later["offload_skipped.already"] == linears
    assert fp2 == fp1                  # the later graph's plan lookup read no weight again
    assert list((tmp_path / "offload").iterdir()) == []


def test_offload_is_off_by_default_and_presets_turn_it_on(monkeypatch, small_ok):
    from optc.presets import PRESETS
    model, c, *_ = _run(False, monkeypatch)
    assert not any(O.is_offloaded(p) for p in model.parameters())
    assert "offloaded" not in c.report.graphs[0].pipeline.stats()["quantize_weights"]
    quantizing = {n for n, p in PRESETS.items() if "quantize_weights" in (p.config.pipeline or ())}
    assert quantizing and {n for n, p in PRESETS.items() if p.offload_weights} == quantizing

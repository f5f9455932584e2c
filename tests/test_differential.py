"""Differential tests: every supported model, compiled by optc, matches eager PyTorch.

Models: the tiny zoo models (``models.build``) and the tiny Hugging Face GPT-2, Llama, BERT and
OPT (``models.hf.build_hf``, both attention implementations). Paths: ``optc.compile`` (dynamo
and export frontends) and ``torch.compile(model, backend="optc")`` (the backend found by its
entry point, by name). Besides values (tolerance: ``RTOL`` in conftest.py, with its reason),
each test checks the report: one graph, no graph break, the optimized program actually ran and
no pass raised — a model that silently ran eager would otherwise pass any numerics check.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import optc
from models import ZOO_NAMES, build, example_inputs
from models.hf import HF_ARCHS, build_hf, hf_example_inputs

TINY_NAMES = [name for name in ZOO_NAMES if name.endswith("-tiny")]
ATTN_IMPLS = ["sdpa", "eager"]

# (batch, seq) of the first call, of a call with new shapes (Dynamo recompiles with a dynamic
# sequence length; the export frontend captures again), and of a third call that the dynamic
# graph serves with a new memory plan.
FIRST, SECOND, THIRD = (1, 8), (2, 13), (2, 5)


def _eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def _assert_pipeline_clean(report: optc.api.GraphReport) -> None:
    """The graph went through optc: no whole-graph eager fallback, no pass raised."""
    assert report.eager_reason is None, report.eager_reason
    assert report.program is not None
    errors = {r.name: r.error for r in report.pipeline.records if r.error is not None}
    assert not errors, f"passes raised: {errors}"


def _assert_compiled_ok(compiled: optc.CompiledModel, *, graphs: int) -> None:
    report = compiled.report
    assert sum(report.graph_breaks.values()) == 0, report.graph_breaks
    assert len(report.graphs) == graphs
    for g in report.graphs:
        _assert_pipeline_clean(g)
    # the newest graph served the newest call through the optimized program
    assert report.graphs[-1].calls["optc"] >= 1, report.graphs[-1].calls
    assert not [k for k in report.graphs[-1].calls if k.startswith("eager:")]


def _assert_attention_fused(compiled: optc.CompiledModel) -> None:
    """fuse_attention fused every attention (both layers) and left no pattern unfused."""
    for g in compiled.report.graphs:
        stats = next(r.stats for r in g.pipeline.records if r.name == "fuse_attention")
        assert stats["eager"] + stats["sdpa"] == 2 and "unfused_left" not in stats, dict(stats)


class _BackendWatch:
    """Counts what Dynamo did while ``torch.compile(backend="optc")`` ran (its counters are global)."""

    def __init__(self) -> None:
        self.breaks0 = sum(counters["graph_break"].values())
        self.graphs0 = counters["stats"]["unique_graphs"]

    @property
    def breaks(self) -> int:
        return sum(counters["graph_break"].values()) - self.breaks0

    @property
    def graphs(self) -> int:
        return counters["stats"]["unique_graphs"] - self.graphs0


def _check_backend_call(fn: Callable, model: torch.nn.Module, args: tuple, kwargs: dict,
                        assert_matches_eager: Callable) -> None:
    with torch.no_grad():
        out = fn(*args, **kwargs)
    assert_matches_eager(out, _eager(model, args, kwargs))
    report = optc.last_report()
    _assert_pipeline_clean(report)
    assert report.calls["optc"] >= 1, report.calls


# ---------------------------------------------------------------- zoo models


@pytest.mark.parametrize("frontend", ["dynamo", "export"])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_zoo_optc_compile_matches_eager(name: str, frontend: str, assert_matches_eager):
    model = build(name)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend=frontend))
    args, kwargs = example_inputs(model, batch=FIRST[0], seq=FIRST[1])
    assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    _assert_compiled_ok(compiled, graphs=1)

    # new batch and sequence length: dynamo recompiles (dynamic seq), export captures again
    args, kwargs = example_inputs(model, batch=SECOND[0], seq=SECOND[1], seed=1)
    assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    _assert_compiled_ok(compiled, graphs=2)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_zoo_torch_compile_backend_matches_eager(name: str, assert_matches_eager):
    model = build(name)
    watch = _BackendWatch()
    fn = torch.compile(model, backend="optc")
    for i, (batch, seq) in enumerate([FIRST, SECOND]):
        args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=i)
        _check_backend_call(fn, model, args, kwargs, assert_matches_eager)
        assert watch.graphs == i + 1
    assert watch.breaks == 0


def test_dynamic_graph_serves_third_shape_with_new_plan(assert_matches_eager):
    model = build("bert-tiny")   # bert: the padding mask is a second, shape-varying input
    compiled = optc.compile(model)
    for i, (batch, seq) in enumerate([FIRST, SECOND, THIRD]):
        args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=i)
        assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    _assert_compiled_ok(compiled, graphs=2)   # no recompile for the third shape
    dynamic = compiled.report.graphs[-1]
    assert dynamic.calls == Counter(optc=2)
    assert len(dynamic.program.plans) == 2    # one memory plan per concrete shape set


# ---------------------------------------------------------------- Hugging Face models


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_optc_compile_matches_eager(arch: str, impl: str, assert_matches_eager):
    model = build_hf(arch, attn_implementation=impl)
    compiled = optc.compile(model)
    args, kwargs = hf_example_inputs(model, batch=FIRST[0], seq=FIRST[1])
    assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    _assert_compiled_ok(compiled, graphs=1)

    args, kwargs = hf_example_inputs(model, batch=SECOND[0], seq=SECOND[1], seed=1)
    assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    _assert_compiled_ok(compiled, graphs=2)
    _assert_attention_fused(compiled)     # 0 unfused attention patterns, eager and sdpa alike


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_torch_compile_backend_matches_eager(arch: str, impl: str, assert_matches_eager):
    model = build_hf(arch, attn_implementation=impl)
    watch = _BackendWatch()
    fn = torch.compile(model, backend="optc")
    for i, (batch, seq) in enumerate([FIRST, SECOND]):
        args, kwargs = hf_example_inputs(model, batch=batch, seq=seq, seed=i)
        _check_backend_call(fn, model, args, kwargs, assert_matches_eager)
        assert watch.graphs == i + 1
    assert watch.breaks == 0


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_export_frontend_matches_eager(arch: str, assert_matches_eager):
    # the causal LMs' use_cache=False is a non-tensor input the exported graph keeps
    model = build_hf(arch)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend="export"))
    for i, (batch, seq) in enumerate([FIRST, SECOND]):
        args, kwargs = hf_example_inputs(model, batch=batch, seq=seq, seed=i)
        assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
        _assert_compiled_ok(compiled, graphs=i + 1)


# HF models of one arch share code objects, so each of these adds a cache entry to the same
# Dynamo frames; more than Dynamo's default recompile limit (8) of them must still all run
# through optc rather than silently falling back to eager. Head dims differ (16 and 8), so
# Dynamo also lifts the attention scale, a float attribute, to a graph input.
MANY_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("gpt2", "sdpa", dict(n_layer=1)),
    ("gpt2", "eager", dict(n_layer=3)),
    ("gpt2", "eager", dict(n_embd=32, n_head=4)),
    ("llama", "sdpa", dict(num_hidden_layers=1)),
    ("llama", "eager", dict(num_hidden_layers=3)),
    ("llama", "sdpa", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=1)),
    ("bert", "sdpa", dict(num_hidden_layers=1)),
    ("bert", "eager", dict(num_hidden_layers=3)),
    ("bert", "sdpa", dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)),
    ("opt", "sdpa", dict(num_hidden_layers=1)),
    ("opt", "eager", dict(num_hidden_layers=3)),
    ("opt", "eager", dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_attention_heads=4)),
]


def test_many_models_in_one_process_all_run_through_optc(assert_matches_eager):
    assert len(MANY_CONFIGS) > 8
    compiled_models = []
    for i, (arch, impl, overrides) in enumerate(MANY_CONFIGS):
        model = build_hf(arch, attn_implementation=impl, seed=i, **overrides)
        compiled = optc.compile(model)
        args, kwargs = hf_example_inputs(model, seq=6 + i % 4)
        assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
        _assert_compiled_ok(compiled, graphs=1)
        compiled_models.append((model, compiled, args, kwargs))
    # the earlier models still run through optc after all the later compiles (HF's global
    # registries grow as models are added, so Dynamo may recompile them: also through optc)
    for model, compiled, args, kwargs in compiled_models:
        assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
        assert sum((g.calls for g in compiled.report.graphs), Counter()) == Counter(optc=2)
        _assert_compiled_ok(compiled, graphs=len(compiled.report.graphs))


# ---------------------------------------------------------------- instances and autograd


# Regression: Dynamo's placeholder meta (which input is a buffer, which a wrapped scalar) is gone
# by the time a second instance makes _DynamoGraph re-capture at call time; optc must reuse the
# input layout it learned at the first capture.


@pytest.mark.parametrize("path", ["optc.compile", "torch.compile"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])   # llama: rope buffers too
def test_two_instances_with_different_weights_give_their_own_outputs(
        name: str, path: str, assert_matches_eager):
    a, b = build(name, seed=0), build(name, seed=1)
    if path == "optc.compile":
        ca, cb = optc.compile(a), optc.compile(b)
    else:   # one Dynamo graph serves both instances: optc keeps a program per parameter set
        ca, cb = torch.compile(a, backend="optc"), torch.compile(b, backend="optc")
    args, kwargs = example_inputs(a, seq=8)
    ref_a, ref_b = _eager(a, args, kwargs), _eager(b, args, kwargs)
    assert (ref_a - ref_b).abs().max() > 0.1   # the weights do differ
    with torch.no_grad():
        for _ in range(2):   # interleaved, so neither instance's program is just the latest one
            assert_matches_eager(ca(*args, **kwargs), ref_a)
            assert_matches_eager(cb(*args, **kwargs), ref_b)
    if path == "optc.compile":
        for c in (ca, cb):
            _assert_compiled_ok(c, graphs=1)
            assert c.report.graphs[0].calls == Counter(optc=2)
    else:
        assert optc.last_report().calls == Counter(optc=4)


class _Scaled(nn.Module):
    """A float attribute that differs between instances, like an attention scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


@pytest.mark.parametrize("path", ["optc.compile", "torch.compile"])
def test_instances_differing_in_a_float_attribute_give_their_own_outputs(path: str,
                                                                         assert_matches_eager):
    # From the second instance on, Dynamo passes the float as a 0-d tensor graph input (one
    # graph for all later instances); optc must not run eager nor reuse another instance's value.
    instances = [_Scaled(s) for s in (0.25, 0.5, 0.75)]
    x = torch.randn(2, 8)
    fns = [optc.compile(m) if path == "optc.compile" else torch.compile(m, backend="optc")
           for m in instances]
    with torch.no_grad():
        for _ in range(2):
            for m, fn in zip(instances, fns):
                assert_matches_eager(fn(x), m(x))
                if path == "optc.compile":
                    _assert_compiled_ok(fn, graphs=1)
                else:
                    _assert_pipeline_clean(optc.last_report())
                    assert not [k for k in optc.last_report().calls if k.startswith("eager:")]


@pytest.mark.parametrize("frontend", ["dynamo", "export"])
def test_weights_loaded_in_place_after_compile_are_used(frontend: str, assert_matches_eager):
    # load_state_dict copies into the same parameter tensors: nothing optc derived from the
    # weights at compile time (a transposed or concatenated copy) may go stale
    model = build("llama-tiny", seed=0)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend=frontend))
    args, kwargs = example_inputs(model, seq=8)
    before = compiled(*args, **kwargs)
    model.load_state_dict(build("llama-tiny", seed=1).state_dict())
    after = compiled(*args, **kwargs)
    assert_matches_eager(after, _eager(model, args, kwargs))
    assert (after - before).abs().max() > 0.1
    _assert_compiled_ok(compiled, graphs=1)


@pytest.mark.parametrize("kind", ["zoo", "hf"])
def test_autograd_call_runs_eager_graph_and_is_counted(kind: str, assert_matches_eager):
    if kind == "zoo":
        model = build("llama-tiny")
        args, kwargs = example_inputs(model, seq=8)
    else:
        model = build_hf("gpt2")
        args, kwargs = hf_example_inputs(model, seq=8)
    compiled = optc.compile(model, inference=False)
    assert torch.is_grad_enabled()
    out = compiled(*args, **kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert logits.requires_grad
    assert_matches_eager(out, _eager(model, args, kwargs))
    assert compiled.report.graphs[0].calls == Counter({"eager:autograd": 1})
    assert sum(compiled.report.graph_breaks.values()) == 0
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    # the same compiled model under no_grad takes the optimized path (a grad-mode recompile)
    with torch.no_grad():
        assert_matches_eager(compiled(*args, **kwargs), _eager(model, args, kwargs))
    assert compiled.report.graphs[-1].calls["optc"] == 1


# ---------------------------------------------------------------- backend registration


def test_backend_is_found_by_name_without_importing_optc():
    # A fresh interpreter: only the entry point can make backend="optc" resolve.
    code = textwrap.dedent("""
        import sys, torch
        assert "optc" not in sys.modules
        fn = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="optc")
        x = torch.randn(4, 8)
        assert torch.equal(fn(x), torch.relu(x) * 2 + 1)
        import optc
        assert optc.last_report().calls["optc"] == 1, optc.last_report().calls
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")

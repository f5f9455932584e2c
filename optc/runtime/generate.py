"""Greedy generation over a static KV cache, for eager, optc-compiled and torch.compile'd models.

    gen = generate(model, prompt_ids, max_new_tokens=64)   # model: zoo Llama (or a compiled one)
    gen.tokens          # (B, T + N): prompt followed by the generated tokens
    gen.prefill_s       # wall time of the prompt step (includes compilation on a first call)
    gen.decode_s        # wall time of each later step, one per generated token after the first

The model contract is the zoo Llama's (gpt-fast style): ``setup_caches(max_batch, max_seq_len)``
allocates the cache, then ``model(ids, input_pos)`` takes (B, T) token ids at positions
``input_pos`` (T,) and returns (B, T, vocab) logits. Every decode step has the same shapes, so a
compiler captures one prefill graph and one decode graph; positions are a tensor, not a Python
int, so they never specialize a graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    tokens: torch.Tensor                       # (B, T + N)
    prompt_len: int
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]

    def decode_tokens_per_s(self, skip: int = 0) -> float:
        """Steady decode speed: generated tokens per second of decode steps (``skip`` first ones
        left out, e.g. a step that compiled)."""
        steps = self.decode_s[skip:]
        if not steps:
            raise ValueError("no decode steps to time")
        return self.tokens.shape[0] * len(steps) / sum(steps)


def cache_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module that has ``setup_caches``: the model itself, or the one an optc
    ``CompiledModel`` (``.model``) or a ``torch.compile`` wrapper (``._orig_mod``) wraps."""
    m = model
    for _ in range(4):
        if hasattr(type(m), "setup_caches"):
            return m
        inner = m.__dict__.get("_modules", {}).get("model") or m.__dict__.get("_modules", {}).get("_orig_mod")
        if inner is None:
            break
        m = inner
    raise TypeError(f"{type(model).__name__} has no KV cache: generate() needs a model with "
                    "setup_caches(max_batch, max_seq_len) and forward(ids, input_pos), "
                    "e.g. a zoo Llama (models.build('llama-tiny'))")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, *,
             max_seq_len: int | None = None, setup: bool = True) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens after ``prompt_ids`` (B, T).

    ``setup=False`` reuses the cache already allocated (its size must fit); by default the cache
    is (re)allocated for ``max_seq_len`` positions (default T + max_new_tokens). Reallocating
    keeps the buffers' identity only per call, so a compiled model sees new buffers and
    re-captures: reuse the cache (``setup=False``) to time steady-state runs.
    """
    if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"prompt_ids must be a (B, T) integer tensor, got {tuple(prompt_ids.shape)} "
                         f"{prompt_ids.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, T = prompt_ids.shape
    need = T + max_new_tokens
    owner = cache_owner(model)
    if setup:
        owner.setup_caches(B, max_seq_len or need)
    if owner.cache_len < need:
        raise ValueError(f"the KV cache holds {owner.cache_len} positions but prompt + new tokens "
                         f"need {need}: pass max_seq_len >= {need}")
    device = prompt_ids.device
    out = torch.empty(B, need, dtype=prompt_ids.dtype, device=device)
    out[:, :T] = prompt_ids
    t0 = time.perf_counter()
    logits = model(prompt_ids, torch.arange(T, device=device))
    nxt = logits[:, -1].argmax(-1)                       # (B,)
    out[:, T] = nxt
    prefill_s = time.perf_counter() - t0
    gen = Generation(out, T, prefill_s)
    pos = torch.empty(1, dtype=torch.int64, device=device)
    for i in range(1, max_new_tokens):
        t0 = time.perf_counter()
        pos.fill_(T + i - 1)
        logits = model(out[:, T + i - 1:T + i], pos)     # (B, 1, vocab)
        nxt = logits[:, -1].argmax(-1)
        out[:, T + i] = nxt
        gen.decode_s.append(time.perf_counter() - t0)
    return gen

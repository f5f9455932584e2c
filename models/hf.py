"""Hugging Face transformers models, built offline from a config with tiny sizes and random weights.

Nothing is downloaded: each model comes from a config object via `from_config`, so these are the
real HF module trees (masking utilities, ModelOutput returns, attention-implementation dispatch)
that users hand to optc, at test-friendly sizes.

    model = build_hf("llama", attn_implementation="eager")
    args, kwargs = hf_example_inputs(model, batch=2, seq=16)
    logits = model(*args, **kwargs).logits           # bert: .last_hidden_state
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, OPTConfig

HF_ARCHS: tuple[str, ...] = ("gpt2", "llama", "bert", "opt")

# Tiny sizes shared by every arch: hidden 64, 2 layers, 4 heads, vocab 256, 128 positions.
# Dropout is zeroed so the models are deterministic even if someone calls .train().
_TINY: dict[str, tuple[type, dict[str, Any]]] = {
    "gpt2": (
        GPT2Config,
        dict(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,  # defaults (50256) lie outside the tiny vocab
        ),
    ),
    "llama": (
        LlamaConfig,
        dict(
            vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        ),
    ),
    "bert": (
        BertConfig,
        dict(
            vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
    ),
    "opt": (
        OPTConfig,
        dict(
            vocab_size=256, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0,
        ),
    ),
}  # fmt: skip


def build_hf(arch: str, *, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny HF model in eval mode: GPT2LMHeadModel, LlamaForCausalLM (GQA), BertModel or OPTForCausalLM.

    `overrides` replace config fields (e.g. num_hidden_layers=3). Weights depend only on the
    arguments; the caller's global RNG is left untouched.
    """
    if arch not in _TINY:
        raise ValueError(f"unknown HF arch {arch!r}; accepted: {', '.join(HF_ARCHS)}")
    config_cls, tiny = _TINY[arch]
    # HF configs accept (and silently keep) unknown keywords, so misspelt overrides are caught here.
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} field(s) {', '.join(unknown)}; accepted: {', '.join(fields)}"
        )
    config = config_cls(**{**tiny, **overrides})
    auto_cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def hf_example_inputs(
    model: nn.Module, *, batch: int = 1, seq: int = 16, seed: int = 0
) -> tuple[tuple, dict[str, Any]]:
    """((), kwargs) to call a `build_hf` model with: input_ids, plus use_cache=False for causal LMs
    (no KV cache object in the outputs) or a padding mask for bert (last quarter of the last row)."""
    config = model.config
    if config.model_type not in HF_ARCHS:
        raise ValueError(f"unsupported HF model type {config.model_type!r}; accepted: {', '.join(HF_ARCHS)}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)  # (B, T)
    if config.model_type != "bert":
        return (), {"input_ids": input_ids, "use_cache": False}
    attention_mask = torch.ones(batch, seq, dtype=torch.long)  # (B, T)
    attention_mask[-1, seq - seq // 4 :] = 0
    return (), {"input_ids": input_ids, "attention_mask": attention_mask.to(device)}

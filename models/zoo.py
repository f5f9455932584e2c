"""The model zoo: every named config of every family, built by name.

    model = build("llama-tiny", seed=0)
    args, kwargs = example_inputs(model, batch=2, seq=16)
    logits = model(*args, **kwargs)                  # (B, T, vocab); bert: hidden state (B, T, C)

Weights depend only on (name, overrides, seed): they are drawn on CPU in fp32 from a private RNG
state, then moved and cast, so the same seed gives the same weights on every device and dtype
(up to rounding), and the caller's global RNG is left untouched. `device="meta"` builds
real-size models with no storage and no init cost (parameter counts, tracing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from models import bert, gpt2, llama, opt


@dataclass(frozen=True)
class Family:
    args_cls: type
    model_cls: type[nn.Module]
    configs: dict[str, dict]
    causal_lm: bool  # forward(input_ids) -> logits; otherwise an encoder that takes attention_mask


FAMILIES: dict[str, Family] = {
    "gpt2": Family(gpt2.ModelArgs, gpt2.GPT, gpt2.CONFIGS, causal_lm=True),
    "llama": Family(llama.ModelArgs, llama.Llama, llama.CONFIGS, causal_lm=True),
    "bert": Family(bert.ModelArgs, bert.Bert, bert.CONFIGS, causal_lm=False),
    "opt": Family(opt.ModelArgs, opt.OPT, opt.CONFIGS, causal_lm=True),
}

ZOO_NAMES: tuple[str, ...] = tuple(name for family in FAMILIES.values() for name in family.configs)


def family_of(name: str) -> str:
    """The family ("gpt2", "llama", "bert", "opt") of a named config."""
    for family_name, family in FAMILIES.items():
        if name in family.configs:
            return family_name
    raise ValueError(f"unknown model {name!r}; accepted names: {', '.join(ZOO_NAMES)}")


def model_args(name: str, **overrides: Any) -> Any:
    """The family's ModelArgs for a named config, with fields replaced by `overrides`."""
    family = FAMILIES[family_of(name)]
    fields = [f.name for f in dataclasses.fields(family.args_cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown ModelArgs field(s) {', '.join(unknown)} for {name!r}; "
            f"accepted fields: {', '.join(fields)}"
        )
    return family.args_cls(**{**family.configs[name], **overrides})


def build(
    name: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Build the named model in eval mode; `overrides` replace ModelArgs fields (e.g. n_layers=3)."""
    family = FAMILIES[family_of(name)]
    args = model_args(name, **overrides)
    device = torch.device(device)
    if device.type == "meta":
        # Shapes only: no storage, and init is a no-op, so real-size models build in milliseconds.
        with torch.device("meta"):
            model = family.model_cls(args)
    else:
        # Draw weights on CPU from a private RNG state (see the module docstring), then move.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            model = family.model_cls(args)
    return model.to(device=device, dtype=dtype).eval()


def example_inputs(
    model: nn.Module, *, batch: int = 1, seq: int = 16, seed: int = 0
) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) to call a zoo model with: random token ids, plus a padding mask for bert.

    The mask pads the last quarter of the last sequence so the masking path is exercised.
    """
    family = _family_of_model(model)
    args = model.args
    if not 1 <= seq <= args.max_seq_len:
        raise ValueError(f"seq must be in [1, {args.max_seq_len}] for this model, got {seq}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)  # (B, T)
    if family.causal_lm:
        return (input_ids.to(device),), {}
    attention_mask = torch.ones(batch, seq, dtype=torch.long)  # (B, T)
    attention_mask[-1, seq - seq // 4 :] = 0
    return (input_ids.to(device),), {"attention_mask": attention_mask.to(device)}


def _family_of_model(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(model, family.model_cls):
            return family
    accepted = ", ".join(f.model_cls.__name__ for f in FAMILIES.values())
    raise ValueError(f"not a zoo model: {type(model).__name__}; accepted classes: {accepted}")

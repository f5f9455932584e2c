"""OPT (the layout of every OPT size except 350m): pre-LayerNorm blocks, ReLU FFN, tied lm_head.

Learned positions carry OPT's offset of 2: the table has `max_seq_len + 2` rows and position t
reads row t + 2 (the first two rows are a fairseq leftover). Module names follow HF's
`OPTForCausalLM` (q_proj/k_proj/v_proj/out_proj, fc1/fc2, self_attn_layer_norm/final_layer_norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITION_OFFSET = 2


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    vocab_size: int = 50272
    max_seq_len: int = 2048
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS: dict[str, dict] = {
    "opt-tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=256, vocab_size=256, max_seq_len=128),
    "opt-125m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=3072, vocab_size=50272, max_seq_len=2048),
}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.dim)
        self.k_proj = nn.Linear(args.dim, args.dim)
        self.v_proj = nn.Linear(args.dim, args.dim)
        self.out_proj = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.self_attn = Attention(args)
        self.final_layer_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.fc1 = nn.Linear(args.dim, args.hidden_dim)
        self.fc2 = nn.Linear(args.hidden_dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class OPT(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.embed_positions = nn.Embedding(args.max_seq_len + POSITION_OFFSET, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.final_layer_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one parameter, counted once
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device) + POSITION_OFFSET  # (T,)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_layer_norm(x))  # (B, T, vocab)


def _init_weights(module: nn.Module) -> None:
    # Normal(0, 0.02) like HF's OPTPreTrainedModel; draws from the global RNG that
    # `models.zoo.build` seeds. LayerNorms keep their default ones/zeros.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)

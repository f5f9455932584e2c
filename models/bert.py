"""BERT encoder: post-LayerNorm blocks, exact (erf) GELU, word + position + token-type embeddings.

`forward(input_ids, attention_mask=None)` returns the last hidden state (B, T, C), like HF's
`BertModel(...).last_hidden_state` without the pooler. The (B, T) 1/0 padding mask becomes an
additive (B, 1, 1, T) mask for non-causal SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS: dict[str, dict] = {
    "bert-tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=256, vocab_size=256, max_seq_len=128),
    # sentence-transformers/all-MiniLM-L6-v2
    "minilm-l6": dict(dim=384, n_layers=6, n_heads=12, hidden_dim=1536, vocab_size=30522, max_seq_len=512),
    # bert-base-uncased
    "bert-base": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=3072, vocab_size=30522, max_seq_len=512),
}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.query = nn.Linear(args.dim, args.dim)
        self.key = nn.Linear(args.dim, args.dim)
        self.value = nn.Linear(args.dim, args.dim)
        self.out = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.hidden_dim)
        self.fc2 = nn.Linear(args.hidden_dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.ffn = FeedForward(args)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Post-norm: normalize after each residual add.
        x = self.attn_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.word_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.position_embeddings = nn.Embedding(args.max_seq_len, args.dim)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.dim)
        self.emb_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.apply(_init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, T, C)
        x = self.emb_norm(x + self.token_type_embeddings(token_type_ids))  # (B, T, C)
        mask = None
        if attention_mask is not None:
            # 1 = attend, 0 = padding -> 0 / most-negative added to the scores of padded keys.
            keep = attention_mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, T)
            mask = (1.0 - keep) * torch.finfo(x.dtype).min  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask)
        return x  # (B, T, C)


def _init_weights(module: nn.Module) -> None:
    # Normal(0, 0.02) like HF's BertPreTrainedModel; draws from the global RNG that
    # `models.zoo.build` seeds. LayerNorms keep their default ones/zeros.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)

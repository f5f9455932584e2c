"""Llama (gpt-fast style): RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU MLP.

RMSNorm and RoPE are written the way Hugging Face's `modeling_llama.py` writes them (fp32 norm,
rotate-half RoPE from precomputed cos/sin tables), so the captured graphs look like HF's.
The lm_head (`output`) is not tied to the embedding.

Static KV cache (gpt-fast): `model.setup_caches(max_batch, max_seq_len)` gives every attention
layer a `KVCache`; then `model(input_ids, input_pos)` with `input_pos` a (T,) int64 tensor of the
tokens' positions writes K/V at those positions in place and attends over the whole cache, with
`causal[input_pos]` masking the positions not yet written. Shapes never change between decode
steps, so a compiler sees one decode graph. Without `input_pos` the model runs without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS: dict[str, dict] = {
    "llama-tiny": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=256, max_seq_len=128
    ),
    # ~30 M parameters: big enough that kernels, not Python, dominate; the README demo's model
    "llama-small": dict(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1408, vocab_size=4096, max_seq_len=1024
    ),
    "tinyllama-1.1b": dict(
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        hidden_dim=5632,
        vocab_size=32000,
        max_seq_len=2048,
        rope_theta=10000.0,
        norm_eps=1e-5,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # normalize in fp32 even for bf16/fp16 models, as HF does
        var = x.pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim), halves duplicated for rotate-half RoPE."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)
    t = torch.arange(args.max_seq_len, dtype=torch.float32)  # (S,)
    freqs = torch.outer(t, inv_freq)  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, T, D/2)
    return torch.cat((-x2, x1), dim=-1)  # (B, H, T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos, sin: (T, D), broadcast over batch and heads
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer. Layout, stated once:
    (B, n_kv_heads, S, head_dim), position-major along S; row s holds the token at position s."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)  # (B, KV, S, D)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,); k, v: (B, KV, T, D). In place, so the buffers keep their identity.
        k_cache, v_cache = self.k_cache, self.v_cache
        if k.shape[0] != k_cache.shape[0]:  # fewer sequences than the cache was made for
            k_cache, v_cache = k_cache[: k.shape[0]], v_cache[: k.shape[0]]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache  # (B, KV, S, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if input_pos is not None:
            assert self.kv_cache is not None, "call setup_caches() before passing input_pos"
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, KV, S, D)
        # GQA: each K/V head serves n_heads // n_kv_heads consecutive query heads (HF's repeat_kv).
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:  # mask: (1, 1, T, S) bool, True where key position <= query position
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        # Derived from args, so not saved in the state dict.
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D)
        self.register_buffer("causal_mask", None, persistent=False)  # (S, S) bool, setup_caches
        self.apply(_init_weights)

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache for `max_batch` sequences of up to `max_seq_len` tokens
        (in the model's dtype unless `dtype` is given), replacing any previous cache."""
        if not 1 <= max_seq_len <= self.args.max_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {self.args.max_seq_len}], got {max_seq_len}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        w = self.output.weight
        dtype = dtype or w.dtype
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch, a.n_kv_heads, max_seq_len, a.head_dim, dtype, w.device)
        causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=w.device))
        self.register_buffer("causal_mask", causal, persistent=False)  # (S, S)

    @property
    def cache_len(self) -> int:
        """Positions the KV cache holds (0 without one)."""
        return 0 if self.causal_mask is None else self.causal_mask.shape[0]

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        mask = None
        if input_pos is None:
            cos = self.rope_cos[:T].to(x.dtype)  # (T, D)
            sin = self.rope_sin[:T].to(x.dtype)  # (T, D)
        else:
            if self.causal_mask is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_caches() first")
            cos = self.rope_cos[input_pos].to(x.dtype)  # (T, D)
            sin = self.rope_sin[input_pos].to(x.dtype)  # (T, D)
            mask = self.causal_mask[input_pos][None, None]  # (1, 1, T, S)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.output(self.norm(x))  # (B, T, vocab)


def _init_weights(module: nn.Module) -> None:
    # Normal(0, 0.02) like HF's LlamaPreTrainedModel; draws from the global RNG that
    # `models.zoo.build` seeds. RMSNorm weights stay at one.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)

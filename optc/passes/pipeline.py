"""The default pipeline, in order, with why each pass stands where it does."""

from __future__ import annotations

DEFAULT_PIPELINE: tuple[str, ...] = (
    # First: removes eval dropout, fp32->fp32 casts and identity views so every later pattern
    # sees one spelling (HF RMSNorm's upcast disappears on fp32 models).
    "remove_noops",
    # After remove_noops: matches residual add + RMSNorm/LayerNorm on the cleaned graph.
    "fuse_add_norm",
    # After remove_noops (eval dropout and identity casts gone): the attention chain is then
    # matmul -> scale -> mask -> softmax -> matmul with nothing in between. Lossless, so in the
    # default pipeline. Independent of fuse_add_norm (it matches no norm or residual add).
    "fuse_attention",
    # After fuse_attention (which reads q/k as they are): rotate-half RoPE -> one op. Lossless
    # (eager's bits), so in the default pipeline.
    "fuse_rope",
    # After fuse_attention (which reads the separate Q/K/V heads) and after quantize_weights
    # when that runs (quantization keeps its per-module weights): sibling linears -> one GEMM.
    "fuse_qkv",
    # After fuse_qkv: cuts its split (and GPT-2's c_attn split) into heads with one view.
    "strength_reduce",
)

# Opt-in passes and the default pass they must precede (their place in ``pipeline_with``).
# fuse_quant_siblings groups the quantized linears (after quantize_weights, listed first) before
# fuse_qkv sees the float ones left.
_INSERT_BEFORE: dict[str, str] = {"quantize_weights": "fuse_qkv", "fuse_quant_siblings": "fuse_qkv"}


def pipeline_with(*extra: str) -> tuple[str, ...]:
    """The default pipeline with opt-in passes at their place: ``quantize_weights`` runs after
    the lossless fusions that read separate projections and before ``fuse_qkv``, and
    ``fuse_quant_siblings`` right after it (pass them in that order)."""
    out = list(DEFAULT_PIPELINE)
    for name in extra:
        at = _INSERT_BEFORE.get(name)
        out.insert(out.index(at) if at in out else len(out), name)
    return tuple(out)

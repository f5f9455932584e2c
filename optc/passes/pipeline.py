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
)

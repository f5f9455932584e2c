"""The one table of registered passes. A new pass adds its module's ``PASS`` here."""

from __future__ import annotations

from optc.passes import (fuse_add_norm, fuse_attention, fuse_qkv, fuse_quant_siblings, fuse_rope,
                         quantize_weights, remove_noops, strength_reduce)
from optc.passes.base import PassInfo

PASSES: dict[str, PassInfo] = {p.name: p for p in (
    remove_noops.PASS,
    fuse_add_norm.PASS,
    fuse_attention.PASS,
    fuse_rope.PASS,
    fuse_qkv.PASS,
    strength_reduce.PASS,
    quantize_weights.PASS,
    fuse_quant_siblings.PASS,
)}

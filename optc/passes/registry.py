"""The one table of registered passes. A new pass adds its module's ``PASS`` here."""

from __future__ import annotations

from optc.passes import fuse_add_norm, fuse_attention, quantize_weights, remove_noops
from optc.passes.base import PassInfo

PASSES: dict[str, PassInfo] = {p.name: p for p in (
    remove_noops.PASS,
    fuse_add_norm.PASS,
    fuse_attention.PASS,
    quantize_weights.PASS,
)}

"""Channel reordering for block floating point: gather outlier channels into their own blocks.

Source: Trukhanov & Soloveychik, "Accurate Block Quantization in LLMs with Outliers" (2024).
A BFP block shares one exponent, set by its largest element; one outlier channel in a block
costs every other channel of the block its low mantissa bits. Reordering the channels at
compile time so that each block holds channels of similar magnitude keeps the outliers from
spoiling the rest, at no runtime cost when the permutation is folded into the op that
produces the channels (``optc.passes.quantize_weights`` does that where it is exact, and
otherwise lets the BFP op gather its input).

    perm = outlier_perm(weight.abs().amax(0))      # weights: order by column magnitude
    perm = outlier_perm(calib.abs_max)             # activations (e.g. KV-cache channels)
    # channel j of the reordered tensor is channel perm[j] of the original

For weights the criterion is the weight column magnitude (the shared exponent of a weight
block is set by weights, not activations); activation magnitudes are the criterion for
quantizing activations such as the KV cache, and ``outlier_perm`` serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor


def outlier_perm(magnitude: Tensor) -> Tensor:
    """(K,) int64: channels sorted by decreasing ``magnitude`` (ties keep their order), so
    every block of consecutive channels holds channels of similar magnitude."""
    if magnitude.dim() != 1:
        raise ValueError(f"magnitude must be 1-D (one value per channel), got {tuple(magnitude.shape)}")
    return torch.argsort(magnitude.float(), descending=True, stable=True)


def weight_magnitude(weight: Tensor) -> Tensor:
    """(K,) max |W[:, k]| of a (N, K) weight: what sets the exponent of a block holding column k."""
    return weight.detach().float().abs().amax(0)


def inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv

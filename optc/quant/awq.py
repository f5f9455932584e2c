"""AWQ: activation-aware per-input-channel weight scales, searched on calibration rows.

Source: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (2023). A few input channels carry much larger activations than the rest; the
weights that multiply them matter most, and scaling those weight columns up before rounding
(and the activations down by the same factor) shrinks their relative rounding error. No
backpropagation: per linear (or per group of linears reading the same input) the scale is

    s = mean|x|^α  (per input channel, normalized so that sqrt(max(s) * min(s)) = 1)

with α chosen on a grid over [0, 1] to minimize the layers' output error on calibration rows X:

    err(α) = Σ_layers ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖²

α = 0 is s = 1, plain round-to-nearest, so the search never does worse than RTN on the
calibration rows. The caller folds 1/s into the op that produces X where that is exact, or
multiplies X by 1/s explicitly (``optc.passes.quantize_weights``).

Weight clipping (AWQ's second search, ``search_clip``): per output channel and quantization
group, shrink the group's range to r · [min, max] (r ∈ {1, 0.95, ..., 0.55}) before rounding,
choosing r to minimize that group's contribution to the output error on the calibration rows.
Clamping the weights and then rounding with the format's own min/max scales is exactly how
AWQ applies it, so the format needs no clip parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from optc.quant.formats import QuantScheme, fake_quantize


@dataclass(frozen=True)
class AwqResult:
    alpha: float
    scale: Tensor                      # (K,) fp32, > 0: quantize W * scale, feed X / scale
    errors: tuple[float, ...]          # err(α) for each grid point, α = i / grid

    @property
    def rtn_error(self) -> float:
        return self.errors[0]

    @property
    def error(self) -> float:
        return min(self.errors)


def scale_for(abs_mean: Tensor, alpha: float) -> Tensor:
    # clamp: channels never active in calibration would get s = 0 (AWQ clamps at 1e-4 too)
    s = abs_mean.float().clamp(min=1e-4).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _row_sample(w: Tensor, max_out: int | None, seed: int) -> tuple[Tensor, float]:
    """(rows of w, weight making the error an estimate of all rows'): every format rounds each
    output channel on its own, so a random subset of rows gives an unbiased error estimate."""
    n = w.shape[0]
    if max_out is None or n <= max_out:
        return w, 1.0
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_out].sort().values
    return w[idx], n / max_out


@torch.no_grad()
def search(weights: Sequence[Tensor], schemes: Sequence[QuantScheme], rows: Tensor,
           abs_mean: Tensor, *, grid: int = 20, max_out: int | None = 512, seed: int = 0
           ) -> AwqResult:
    """The α in {0, 1/grid, ..., 1} minimizing the summed output error of ``weights`` (each
    (N_i, K), quantized with ``schemes[i]``) on ``rows`` (R, K); ties go to the smaller α.
    ``max_out``: estimate each weight's error on that many random output channels (the
    search's cost is the rounding of ``grid + 1`` scaled weights; None: every channel)."""
    if len(weights) != len(schemes) or not weights:
        raise ValueError("search needs one scheme per weight, and at least one weight")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    x = rows.float()
    sampled = [_row_sample(w.float(), max_out, seed + i) for i, w in enumerate(weights)]
    refs = [x @ w.t() for w, _ in sampled]               # (R, N_i)
    errors: list[float] = []
    best = (float("inf"), 0.0, torch.ones_like(abs_mean, dtype=torch.float32))
    for i in range(grid + 1):
        alpha = i / grid
        s = scale_for(abs_mean, alpha)
        xs = x / s
        err = 0.0
        for (w, weight), scheme, ref in zip(sampled, schemes, refs):
            wq = fake_quantize(w * s, scheme)
            err += weight * float((ref - xs @ wq.t()).pow(2).sum())
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return AwqResult(best[1], best[2], tuple(errors))


@torch.no_grad()
def search_clip(weight: Tensor, scheme: QuantScheme, rows: Tensor, *, steps: int = 10,
                max_shrink: float = 0.5) -> Tensor:
    """The clipped weight: each (output channel, group) of ``weight`` (N, K) clamped to
    r · [min, max] with r ∈ {1, 1 - max_shrink/steps, ...} minimizing
    Σ_rows (x_g · (w_g − Q(clamp(w)))_g)², the group's share of the output error (rows (R, K)
    are the inputs ``weight`` sees). The group is the scheme's (the whole row for int8)."""
    n, k = weight.shape
    g = scheme.group_size or k
    w = weight.float().reshape(n, k // g, g)                  # (N, G, g)
    x = rows.float().reshape(rows.shape[0], k // g, g).transpose(0, 1)   # (G, R, g)
    # Σ_rows (x_g · d)² = d (X_gᵀ X_g) dᵀ: one (g, g) Gram matrix per group instead of an
    # (R, N, G) tensor of partial outputs (2x fewer flops at R = 256, N x K memory)
    gram = x.transpose(1, 2) @ x                              # (G, g, g)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    best_err = torch.full((n, k // g), float("inf"))
    best = w.clone()
    for i in range(steps):
        r = 1.0 - max_shrink * i / steps
        wc = torch.maximum(torch.minimum(w, hi * r), lo * r)
        d = (w - fake_quantize(wc.reshape(n, k), scheme).reshape(n, k // g, g)).transpose(0, 1)
        err = ((d @ gram) * d).sum(-1).t()                    # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], wc, best)
    return best.reshape(n, k).to(weight.dtype)

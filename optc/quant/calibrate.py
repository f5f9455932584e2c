"""Calibration statistics for activation-aware quantization, collected on the eager model.

    calib = collect(model, batches)          # batches: model inputs (tensor / tuple / dict each)
    calib.stats["layers.0.attention.wq"]     # LinearStats of that module's input

Forward pre-hooks on every linear layer (``nn.Linear`` and HF's ``Conv1D``) record, per input
channel, the mean and max of |x|, and a bounded uniform random subsample of input rows (AWQ's
error search runs on those rows). Statistics are keyed by the module's qualified name, which
the pass recovers from each linear node's ``nn_module_stack``: collecting on the eager model
before capture makes the statistics independent of the frontend (Dynamo, export,
symbolic_trace), and a weight tied to another module (GPT-2's lm_head) still gets the inputs
of the module that uses it.

For a dict batch with a 2-D ``attention_mask``, inputs of shape (B, T, K) keep only the rows
of real tokens (mask 1): padding would otherwise dilute the per-channel magnitudes.

Row sampling is bottom-k: every row gets a random key from a generator seeded identically in
every hook, and the ``max_rows`` rows with the smallest keys are kept. That is a uniform sample
without replacement of the whole stream, and modules that read the same input (q, k, v) keep
the same rows, so a search over a group of them sees one consistent sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch import Tensor

from optc.config import ConfigError


@dataclass
class LinearStats:
    in_features: int
    abs_mean: Tensor            # (K,) fp32: mean |x| per input channel over every row seen
    abs_max: Tensor             # (K,) fp32
    rows: Tensor                # (R, K) fp32: uniform sample of input rows, R <= max_rows
    n_rows: int                 # rows seen


@dataclass
class Calibration:
    stats: dict[str, LinearStats] = field(default_factory=dict)
    batches: int = 0
    max_rows: int = 256
    seed: int = 0

    def digest(self) -> str:
        """A short hash of every statistic: what a saved quantization records it came from."""
        h = hashlib.sha256()
        for name in sorted(self.stats):
            s = self.stats[name]
            h.update(name.encode())
            for t in (s.abs_mean, s.abs_max, s.rows):
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def is_linear_module(m: nn.Module) -> bool:
    """``nn.Linear``, or HF GPT-2's ``Conv1D`` (weight stored (K, N), captured as addmm)."""
    if isinstance(m, nn.Linear):
        return True
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2


class _Recorder:
    def __init__(self, in_features: int, max_rows: int, seed: int, mask: list[Tensor | None]):
        self.k = in_features
        self.mask = mask           # shared box: the attention mask of the batch being run
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.max = torch.zeros(in_features)
        self.rows = torch.empty(0, in_features)
        self.keys = torch.empty(0)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        x = args[0] if args else (kwargs or {}).get("input")
        if not isinstance(x, Tensor) or x.shape[-1] != self.k:
            return
        mask = self.mask[0]
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device).bool()]                   # padding rows are not activations
        x = x.detach().reshape(-1, self.k).float().cpu()      # (rows, K)
        a = x.abs()
        self.sum += a.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, a.amax(0))
        self.n += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self.gen)
        rows, keys = torch.cat([self.rows, x]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def stats(self) -> LinearStats:
        return LinearStats(self.k, (self.sum / max(self.n, 1)).float(), self.max, self.rows.clone(),
                           self.n)


def _call(model: nn.Module, batch: Any, mask: list[Tensor | None]) -> None:
    if isinstance(batch, dict):
        m = batch.get("attention_mask")
        mask[0] = m if isinstance(m, Tensor) and m.dim() == 2 else None
        try:
            model(**batch)
        finally:
            mask[0] = None
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[Any], *, max_rows: int = 256, seed: int = 0
            ) -> Calibration:
    """Run ``model`` eagerly on every batch and record each linear layer's input statistics.

    A batch is a tensor (``model(batch)``), a tuple/list of positional arguments, or a dict of
    keyword arguments. The model is left unchanged (hooks are removed, training mode restored).
    """
    if isinstance(batches, (Tensor, dict)) or not hasattr(batches, "__iter__"):
        raise ConfigError("calibration must be an iterable of model inputs (e.g. a list of "
                          f"(B, T) token-id tensors), got {type(batches).__name__}")
    if max_rows < 1:
        raise ConfigError(f"calibration max_rows must be >= 1, got {max_rows}")
    recorders: dict[str, _Recorder] = {}
    handles = []
    mask: list[Tensor | None] = [None]
    for name, m in model.named_modules():
        if is_linear_module(m):
            k = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
            recorders[name] = rec = _Recorder(k, max_rows, seed, mask)
            handles.append(m.register_forward_pre_hook(rec, with_kwargs=True))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            _call(model, batch, mask)
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ConfigError("calibration is empty: pass at least one batch of model inputs")
    return Calibration({k: r.stats() for k, r in recorders.items() if r.n}, n, max_rows, seed)

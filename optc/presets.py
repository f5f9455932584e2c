"""Named optc configurations: what the benchmark harness, ``optc bench`` and the demo run.

A preset is a complete, replayable recipe: the ``CompileConfig`` (pipeline and per-pass
configs), the dtype the model is cast to before compiling, and whether it needs calibration
data. The harness iterates ``PRESETS``, so a pass that adds a preset here shows up in every
benchmark table without the harness being rewritten.

    preset = PRESETS["optc"]
    compiled = preset.compile(model, calibration=batches)   # casts, compiles, returns CompiledModel
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from optc.config import CompileConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: CompileConfig = field(default_factory=CompileConfig)
    dtype: torch.dtype | None = None     # cast the model (a copy) to this before compiling
    lossless: bool = True                # outputs equal eager up to fp rounding, same dtype
    needs_calibration: bool = False      # compile(..., calibration=...) is required
    causal_lm_only: bool = False         # meaningful only for decoder LMs (e.g. KV-cache layouts)
    # the float weights quantization replaced leave RAM (optc.compile(offload_weights=True))
    offload_weights: bool = False

    def compile(self, model: torch.nn.Module, *, calibration: Any = None,
                example_inputs: Any = None, copy: bool = True) -> torch.nn.Module:
        """Cast (if the preset says so) and compile ``model``. With ``copy`` (the default) the
        cast happens on a copy and ``model`` is left as it was; ``copy=False`` casts ``model``
        itself (``model.to(dtype)``, as the peers in the benchmarks do): no second set of
        weights is ever alive, for callers that hand the model over."""
        import copy as copy_mod

        import optc
        if self.needs_calibration and calibration is None:
            raise ValueError(f"preset {self.name!r} needs calibration data: "
                             "pass calibration=[batch of token ids, ...]")
        if self.dtype is not None:
            model = (copy_mod.deepcopy(model) if copy else model).to(self.dtype)
            from optc.runtime.trim import release_free_memory
            release_free_memory()       # the old-dtype weights just freed (optc/runtime/trim.py)
        kwargs: dict[str, Any] = {"config": self.config, "example_inputs": example_inputs,
                                  "offload_weights": self.offload_weights}
        if calibration is not None:
            kwargs["calibration"] = calibration
        return optc.compile(model, **kwargs)


def _register(*presets: Preset) -> dict[str, Preset]:
    out: dict[str, Preset] = {}
    for p in presets:
        if p.name in out:
            raise ValueError(f"duplicate preset {p.name!r}")
        out[p.name] = p
    return out


def _quant_presets() -> tuple[Preset, ...]:
    """quantize_weights in the default pipeline, one scheme for every linear and the lm_head
    (as torchao's weight-only configs do); fp32 activations unless the name ends in -bf16. The
    float weights the quantized linears replaced are offloaded (``optc.quant.offload``): torchao
    frees them by replacing the module's weights; optc keeps them, out of RAM."""
    from optc.passes.pipeline import pipeline_with
    from optc.passes.quantize_weights import QuantizeWeightsConfig

    def q(name: str, description: str, mode: str, group: int | None = None, awq: bool = False,
          dtype: torch.dtype | None = None) -> Preset:
        qcfg = QuantizeWeightsConfig.uniform(mode, group, awq=awq, lm_head=True)
        cfg = CompileConfig(pipeline=pipeline_with("quantize_weights", "fuse_quant_siblings"),
                            passes={"quantize_weights": qcfg.to_dict()})
        return Preset(name, description, cfg, dtype=dtype, lossless=False, needs_calibration=awq,
                      offload_weights=True)
    return (
        q("optc-int8", "int8 weight-only, per output channel (RTN)", "int8"),
        q("optc-int4-g128", "int4 weight-only, group 128, asymmetric (RTN)", "int4", 128),
        q("optc-int4-g128-awq", "int4 weight-only, group 128, AWQ scales + clipping", "int4", 128, awq=True),
        q("optc-int4-g32", "int4 weight-only, group 32 (RTN)", "int4", 32),
        q("optc-w8a8", "int8 weights x int8 activations (per-token dynamic scales)", "w8a8"),
        q("optc-bfp", "block floating point: 8-bit mantissas, shared exponent per 32 channels, "
          "outlier channels reordered", "bfp", 32),
        # bf16 activations (the model cast to bf16 first, as torchao's CPU int4 path requires):
        # ATen's int8/int4 CPU kernels are fast with bf16 activations only, and bf16 prefill
        # does not regress against bf16 eager where the fp32-activation presets do at T=2048
        q("optc-int8-bf16", "int8 weight-only (RTN) on the model cast to bf16", "int8",
          dtype=torch.bfloat16),
        q("optc-int4-g128-bf16", "int4 weight-only, group 128 (RTN) on the model cast to bf16",
          "int4", 128, dtype=torch.bfloat16),
    )


# One table. Passes add their presets here (keep the default first: it is the lossless baseline).
PRESETS: dict[str, Preset] = _register(
    Preset("optc", "default pipeline: lossless passes only, fp32"),
    Preset("optc-bf16", "default pipeline on the model cast to bf16", dtype=torch.bfloat16,
           lossless=False),
    *_quant_presets(),
)

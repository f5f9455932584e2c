"""Every configuration the harness measures: the peers, then one row per optc preset.

A configuration turns a freshly loaded fp32 model into the thing that is timed. Peers are fixed
here; optc rows come from ``optc.presets.PRESETS`` at run time, so a pass that registers a preset
shows up in every table without this file changing.

    names = config_names("lm")                      # peers + applicable presets, in table order
    runnable = prepare("torchao-int8", model, Context(task="lm", ...))

Peers, with why each is set up the way it is:
  eager-fp32 / eager-bf16     the model as written (bf16: weights and activations, fp32 norms)
  inductor-fp32 / -bf16       ``torch.compile`` (Inductor, default mode) of the same static-cache
                              forward: one prefill graph and one decode graph
  torchao-int8[-inductor]     torchao weight-only int8 (per row) on the bf16 model: its CPU kernel
                              takes bf16 activations (FACTS.md: fp32 activations are slower)
  torchao-int4[-inductor]     torchao int4, group 128, on the bf16 model; on CPU only the
                              prototype ``PrototypeInt4WeightOnlyConfig`` packs for the CPU kernel
                              (the stable config needs CUDA's mslk)
  onnxruntime                 (encoder) ``torch.onnx.export`` + ``onnxruntime.transformers``'
                              BERT optimizer (fused attention, layer norm, GELU), fp32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

Model = torch.nn.Module


@dataclass
class Context:
    task: str                                  # "lm" | "encoder"
    tmp: Path                                  # scratch directory of this worker
    threads: int
    calibration: Callable[[], Any] = lambda: None   # called only for presets that need it
    example: tuple = ()                        # (args, kwargs) of one timed call (encoder)
    info: dict[str, Any] = field(default_factory=dict)   # what preparing found out (reported)


@dataclass(frozen=True)
class Config:
    name: str
    kind: str                                  # "peer" | "optc"
    tasks: tuple[str, ...]
    prepare: Callable[[Model, Context], Any]
    description: str


def _bf16(model: Model) -> Model:
    return model.to(torch.bfloat16)


def _inductor(model: Model) -> Any:
    return torch.compile(model)


def _torchao(bits: int, inductor: bool) -> Callable[[Model, Context], Any]:
    def prepare(model: Model, ctx: Context) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        model = model.to(torch.bfloat16)
        if bits == 8:
            quantize_(model, Int8WeightOnlyConfig())
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128))
        return torch.compile(model) if inductor else model
    return prepare


def _onnxruntime(model: Model, ctx: Context) -> Any:
    """Export, run the transformer optimizer, and return a callable like the HF encoder (returns
    the last hidden state)."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    (args, kwargs) = ctx.example
    names = list(kwargs)
    raw, opt = ctx.tmp / "encoder.onnx", ctx.tmp / "encoder.opt.onnx"

    class Wrapped(torch.nn.Module):   # positional inputs and one tensor output, for the exporter
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            out = self.inner(**dict(zip(names, xs)))
            return out if isinstance(out, torch.Tensor) else out[0]   # HF: last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Wrapped().eval(), tuple(kwargs[n] for n in names), str(raw), dynamo=False,
                          input_names=names, output_names=["last_hidden_state"], opset_version=17)
    if hasattr(model, "config"):     # HF
        heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    else:                            # zoo
        heads, hidden = model.args.n_heads, model.args.dim
    optimized = optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=hidden)
    optimized.save_model_to_file(str(opt))
    ctx.info["ort_fused_ops"] = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    so = ort.SessionOptions()
    so.intra_op_num_threads = ctx.threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(opt), so, providers=["CPUExecutionProvider"])

    def run(**inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: inputs[n].numpy() for n in names}
        return torch.from_numpy(session.run(None, feed)[0])
    return run


def _preset(name: str) -> Callable[[Model, Context], Any]:
    def prepare(model: Model, ctx: Context) -> Any:
        from optc.presets import PRESETS
        preset = PRESETS[name]
        calibration = ctx.calibration() if preset.needs_calibration else None
        # the worker hands the model over (it drops its reference next): cast in place, as the
        # peers do, so a cast preset's peak RSS does not hold a second copy of the weights
        compiled = preset.compile(model, calibration=calibration, copy=False)
        ctx.info["preset"] = {"dtype": str(preset.dtype) if preset.dtype else None,
                              "lossless": preset.lossless, "config": preset.config.to_dict()}
        return compiled
    return prepare


PEERS: tuple[Config, ...] = (
    Config("eager-fp32", "peer", ("lm", "encoder"), lambda m, c: m, "PyTorch eager, fp32"),
    Config("eager-bf16", "peer", ("lm", "encoder"), lambda m, c: _bf16(m), "PyTorch eager, bf16"),
    Config("inductor-fp32", "peer", ("lm", "encoder"), lambda m, c: _inductor(m),
           "torch.compile (Inductor), fp32"),
    Config("inductor-bf16", "peer", ("lm", "encoder"), lambda m, c: _inductor(_bf16(m)),
           "torch.compile (Inductor), bf16"),
    Config("torchao-int8", "peer", ("lm",), _torchao(8, False), "torchao int8 weight-only, eager"),
    Config("torchao-int8-inductor", "peer", ("lm",), _torchao(8, True),
           "torchao int8 weight-only + Inductor"),
    Config("torchao-int4", "peer", ("lm",), _torchao(4, False), "torchao int4 g128 weight-only, eager"),
    Config("torchao-int4-inductor", "peer", ("lm",), _torchao(4, True),
           "torchao int4 g128 weight-only + Inductor"),
    Config("onnxruntime", "peer", ("encoder",), _onnxruntime,
           "ONNX Runtime, transformer optimizer, fp32"),
)


def all_configs() -> dict[str, Config]:
    """Peers, then every optc preset (read now, so new presets are picked up)."""
    from optc.presets import PRESETS
    out = {c.name: c for c in PEERS}
    for p in PRESETS.values():
        if p.name in out:
            raise ValueError(f"optc preset {p.name!r} has the name of a peer configuration")
        tasks = ("lm",) if p.causal_lm_only else ("lm", "encoder")
        out[p.name] = Config(p.name, "optc", tasks, _preset(p.name), p.description)
    return out


def config_names(task: str) -> list[str]:
    return [n for n, c in all_configs().items() if task in c.tasks]


def prepare(name: str, model: Model, ctx: Context) -> Any:
    configs = all_configs()
    if name not in configs:
        raise ValueError(f"unknown configuration {name!r}; known: {', '.join(configs)}")
    cfg = configs[name]
    if ctx.task not in cfg.tasks:
        raise ValueError(f"configuration {name!r} does not apply to task {ctx.task!r}")
    return cfg.prepare(model, ctx)

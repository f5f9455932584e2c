"""Which kernels a final graph needs: per ``optc::`` op, its CPU implementation and the
Triton kernel generated for it (source header names the pass and FX nodes; cache key)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch.fx as fx

from optc.codegen.cache import cache_key
from optc.codegen.generator import KernelOrigin


def _norm_source(name: str, node: fx.Node, origin: KernelOrigin) -> str:
    from optc.ops.norms import NormSpec, kernel_source
    if name == "add_layer_norm":
        spec = NormSpec("layer", True, node.args[2] is not None, node.args[3] is not None)
    else:
        spec = NormSpec("rms", name.startswith("add_"), True, False)
    return kernel_source(spec, origin)


def _attention_source(name: str, node: fx.Node, origin: KernelOrigin) -> str:
    # the FlashAttention-2 prefill kernel; the flash-decoding pair is rendered at its first
    # launch (optc.ops.attention.decode_kernel_source)
    from optc.ops.attention import AttentionSpec, dot_in_fp32, kernel_source, mask_kind
    q, mask, causal = node.args[0], node.args[3], node.args[4]
    mval = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    spec = AttentionSpec(mask_kind(mval), bool(causal), dot_in_fp32(q.meta["val"].dtype))
    return kernel_source(spec, origin)


def _quant_linear_source(name: str, node: fx.Node, origin: KernelOrigin) -> str:
    from optc.ops.quant import QuantGemmSpec, kernel_source
    return kernel_source(QuantGemmSpec(name.removeprefix("linear_")), origin)


def _quant_group_source(name: str, node: fx.Node, origin: KernelOrigin) -> str:
    # qlinear_group / qswiglu launch the dequant-GEMM kernel of their weights' kind per weight
    from optc.ops.quant import QuantGemmSpec, kernel_source
    return kernel_source(QuantGemmSpec(node.args[1]), origin)


def _rope_source(name: str, node: fx.Node, origin: KernelOrigin) -> str:
    from optc.ops.rope import kernel_source
    return kernel_source(origin)


# op name -> function rendering the Triton source for one node of that op
TRITON_SOURCES: dict[str, Callable[[str, fx.Node, KernelOrigin], str]] = {
    "rms_norm": _norm_source, "add_rms_norm": _norm_source, "add_layer_norm": _norm_source,
    "attention": _attention_source, "rope": _rope_source,
    "linear_int8": _quant_linear_source, "linear_int4": _quant_linear_source,
    "linear_w8a8": _quant_linear_source, "linear_bfp": _quant_linear_source,
    "qlinear_group": _quant_group_source, "qswiglu": _quant_group_source,
}


def _quant_cpu_note(node: fx.Node) -> str:
    from optc.ops.quant import describe_cpu_node
    return describe_cpu_node(node)


def _quant_group_cpu_note(node: fx.Node) -> str:
    from optc.ops.quant_group import describe_cpu_node
    return describe_cpu_node(node)


# op name -> function describing the CPU implementation's choice for one node of that op
CPU_NOTES: dict[str, Callable[[fx.Node], str]] = {
    "linear_int8": _quant_cpu_note, "linear_int4": _quant_cpu_note,
    "linear_w8a8": _quant_cpu_note, "linear_bfp": _quant_cpu_note,
    "qlinear_group": _quant_group_cpu_note, "qswiglu": _quant_group_cpu_note,
}


def kernels_for_graph(gm: fx.GraphModule) -> list[dict[str, Any]]:
    from optc.ops import get_op_def
    counts: Counter[str] = Counter()
    first: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        d = get_op_def(n.target) if n.op == "call_function" else None
        if d is not None:
            counts[d.name] += 1
            first.setdefault(d.name, n)
    out = []
    for name, count in counts.items():
        d = get_op_def(first[name].target)
        node = first[name]
        origin = KernelOrigin(name, node.meta.get("optc_pass", "?"), tuple(node.meta.get("optc_origin", ())))
        render = TRITON_SOURCES.get(name)
        if render is not None:
            src = render(name, node, origin)
            triton = f"generated, {len(src.splitlines())} lines, cache key {cache_key(src)[:12]}"
        else:
            src, triton = None, "none (CPU only)"
        out.append({"op": f"optc.{name}", "count": count,
                    "cpu": f"{d.cpu.__module__}.{d.cpu.__name__}", "triton": triton, "source": src})
        if name in CPU_NOTES:   # which CPU path runs, and whether it is slower than dense
            out[-1]["cpu"] += f" [{CPU_NOTES[name](node)}]"
    return out

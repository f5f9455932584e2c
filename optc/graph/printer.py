"""A stable, compact graph printer: shapes and dtypes inline, names normalized.

Used by golden tests and the CLI. Node names are renumbered per op (``linear0``,
``linear1``...) in graph order, so the text does not depend on tracer naming; parameters
print as ``$`` + their module path.

    %linear0 = aten.linear(%layer_norm0, $layers.0.attention.wq.weight) : f32[1,8,64]  @L0
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

_DTYPE = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8",
}


def dtype_str(d: torch.dtype) -> str:
    return _DTYPE.get(d, str(d).replace("torch.", ""))


def val_str(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dims = ",".join(str(s) for s in v.shape)
        return f"{dtype_str(v.dtype)}[{dims}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(val_str(x) for x in v) + ")"
    if isinstance(v, torch.SymInt):
        return f"sym({v})"
    return "" if v is None else type(v).__name__


def target_str(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        name = t._opname
        return f"{ns}.{name}" if t._overloadname in ("default", "Tensor", "int") else \
            f"{ns}.{name}.{t._overloadname}"
    if t is operator.getitem:
        return "getitem"
    if hasattr(t, "__module__") and hasattr(t, "__name__"):
        mod = t.__module__ or ""
        return f"{mod.split('.')[0]}.{t.__name__}" if mod and mod != "builtins" else t.__name__
    return str(t)


def _short(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return t._opname.lstrip("_")
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", "op").lstrip("_")


def node_names(graph: fx.Graph) -> dict[fx.Node, str]:
    counts: Counter[str] = Counter()
    names: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            base = "in"
        elif n.op == "get_attr":
            names[n] = "$" + str(n.meta.get("optc_param", n.target))
            continue
        elif n.op == "output":
            continue
        else:
            base = _short(n.target)
        names[n] = f"%{base}{counts[base]}"
        counts[base] += 1
    return names


def _arg(a: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(a, fx.Node):
        return names.get(a, a.name)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x, names) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, float):
        return repr(round(a, 6))
    if isinstance(a, torch.dtype):
        return dtype_str(a)
    if isinstance(a, torch.device):
        return str(a)
    return repr(a)


def format_graph(gm: fx.GraphModule | fx.Graph, *, layers: bool = True) -> str:
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    names = node_names(graph)
    lines: list[str] = []
    ins = [f"{names[n]}: {val_str(n.meta.get('val'))}" for n in graph.nodes if n.op == "placeholder"]
    lines.append(f"graph({', '.join(ins)}):")
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            lines.append(f"  return {_arg(n.args[0], names)}")
            continue
        args = [_arg(a, names) for a in n.args]
        args += [f"{k}={_arg(v, names)}" for k, v in n.kwargs.items()
                 if k not in ("device", "pin_memory", "layout")]
        line = f"  {names[n]} = {target_str(n.target)}({', '.join(args)}) : {val_str(n.meta.get('val'))}"
        layer = n.meta.get("optc_layer")
        if layers and layer is not None:
            line += f"  @L{layer}"
        lines.append(line)
    return "\n".join(lines)

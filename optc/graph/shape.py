"""Shape propagation on canonical graphs: fake values for new nodes, symbolic size helpers."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map


def fake_mode_of(gm: fx.GraphModule):
    fm = gm.meta.get("optc_fake_mode")
    if fm is None:
        vals = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
        fm = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        gm.meta["optc_fake_mode"] = fm
    return fm


def _val(a: Any) -> Any:
    return a.meta["val"] if isinstance(a, fx.Node) else a


def propagate_node(n: fx.Node) -> Any:
    """Compute ``n.meta["val"]`` by running its target on the fake values of its inputs."""
    gm = n.graph.owning_module
    fm = fake_mode_of(gm) if gm is not None else None
    args = tree_map(_val, n.args)
    kwargs = tree_map(_val, n.kwargs)
    if n.op == "get_attr":
        t = _get_attr(gm, str(n.target))
        n.meta["val"] = fm.from_tensor(t, static_shapes=True) if fm is not None else t
        return n.meta["val"]
    assert n.op == "call_function", n.op
    if fm is not None:
        with fm:
            val = n.target(*args, **kwargs)
    else:
        val = n.target(*args, **kwargs)
    n.meta["val"] = val
    return val


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def same_shape(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
            ex = x.node.expr if isinstance(x, torch.SymInt) else x
            ey = y.node.expr if isinstance(y, torch.SymInt) else y
            if ex != ey:
                return False
        elif x != y:
            return False
    return True


def size_expr(s: Any) -> Any:
    """int or sympy expression of one size."""
    return s.node.expr if isinstance(s, torch.SymInt) else int(s)

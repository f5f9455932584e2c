"""Node predicates the pattern passes share: a node's fake value, "is a call of", and the
object a ``get_attr`` names (one definition, imported by each pass)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx


def val(n: object) -> Any:
    """``n.meta["val"]`` (FakeTensor, SymInt, tuple...) for a node, None for anything else."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_call(n: object, *targets: object) -> bool:
    """``n`` is a ``call_function`` node of one of ``targets``."""
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def attr_value(gm: fx.GraphModule, n: fx.Node) -> Any:
    """The object a ``get_attr`` node names (a dotted path under ``gm``)."""
    obj: Any = gm
    for part in str(n.target).split("."):
        obj = getattr(obj, part)
    return obj

"""Graph verifier: lint, re-propagated fake values vs stored meta, allowed ops.

Run after capture and after every pass when verification is on (always under pytest).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from optc.graph.shape import fake_mode_of, same_shape
from torch.utils._pytree import tree_map


class VerificationError(AssertionError):
    """The graph broke an invariant; the message names the node and the invariant."""


# Non-OpOverload call targets a canonical graph may contain.
ALLOWED_CALLABLES = frozenset({operator.getitem, torch._C._set_grad_enabled})
ALLOWED_NAMESPACES = frozenset({"aten", "optc", "prims", "quantized_decomposed"})


def _check_val(n: fx.Node, stored: Any, fresh: Any) -> None:
    if isinstance(stored, torch.Tensor):
        if not isinstance(fresh, torch.Tensor):
            raise VerificationError(f"{n.format_node()}: stored a Tensor, re-propagation gave {type(fresh)}")
        if stored.dtype != fresh.dtype:
            raise VerificationError(f"{n.name}: dtype {stored.dtype} stored vs {fresh.dtype} propagated")
        if not same_shape(list(stored.shape), list(fresh.shape)):
            raise VerificationError(f"{n.name}: shape {list(stored.shape)} stored vs "
                                    f"{list(fresh.shape)} propagated")
    elif isinstance(stored, (tuple, list)) and isinstance(fresh, (tuple, list)):
        if len(stored) != len(fresh):
            raise VerificationError(f"{n.name}: {len(stored)} outputs stored vs {len(fresh)}")
        for s, f in zip(stored, fresh):
            _check_val(n, s, f)


def verify(gm: fx.GraphModule, *, allow_unknown_ops: bool = True, repropagate: bool = True) -> None:
    graph = gm.graph
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises RuntimeError/AssertionError variously
        raise VerificationError(f"graph lint failed: {e}") from e
    fm = fake_mode_of(gm)
    for n in graph.nodes:
        if n.op in ("call_method", "call_module"):
            raise VerificationError(f"{n.name}: {n.op} is not canonical (expected call_function)")
        if n.op == "output":
            continue
        if "val" not in n.meta:
            raise VerificationError(f"{n.name} ({n.op} {n.target}) has no meta['val']")
        if n.op != "call_function":
            continue
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace not in ALLOWED_NAMESPACES and not allow_unknown_ops:
                raise VerificationError(f"{n.name}: op {t} is not allowed at this stage")
        elif t not in ALLOWED_CALLABLES and not allow_unknown_ops:
            raise VerificationError(f"{n.name}: callable {t} is not allowed at this stage")
        if not repropagate or fm is None or n.target is torch._C._set_grad_enabled:
            continue
        if not isinstance(t, (torch._ops.OpOverload)) and t is not operator.getitem:
            continue
        args = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, n.args)
        kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, n.kwargs)
        with fm:
            fresh = t(*args, **kwargs)
        _check_val(n, n.meta["val"], fresh)

"""The registry of optc's own operators, ``torch.ops.optc.*``.

Each op is a ``torch.library.custom_op("optc::NAME", mutates_args=())`` with
  * a fake (meta) implementation: shapes and dtypes only, for FakeTensor propagation,
    Dynamo and ``torch.export``;
  * a CPU implementation in ATen ops, registered for the "cpu" device so that calls through
    the dispatcher work, and kept as a plain function (``OpDef.cpu``) that the runtime calls
    directly on CPU tensors, skipping the dispatcher;
  * optionally a Triton implementation (``OpDef.triton``: check → allocate → launch a
    generated kernel), registered for "cuda" and also callable on CPU tensors under
    ``TRITON_INTERPRET=1``.

Registration happens when ``optc.ops`` is imported and touches nothing but the torch library
and ``OPS``. Defining an op a second time (a re-import, ``importlib.reload``) reuses the
operator torch already has instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._ops import OpOverload, OpOverloadPacket

NAMESPACE = "optc"


@dataclass(frozen=True)
class OpDef:
    name: str                              # "add_rms_norm"
    op: OpOverload                         # torch.ops.optc.add_rms_norm.default
    cpu: Callable[..., Any]                # plain CPU function, the op's schema as signature
    triton: Callable[..., Any] | None      # plain wrapper for CUDA tensors (or interpreter)
    summary: str
    # Optional: given one node's arguments (constants as their values, runtime values as
    # ``RUNTIME``), a CPU callable with ``cpu``'s signature specialized to those constants
    # (checks done once), or None. The runtime binds it in place of ``cpu`` for that node.
    specialize: Callable[..., Callable[..., Any] | None] | None = None


RUNTIME = object()      # stands for a value known only at run time, in ``specialize`` calls


OPS: dict[str, OpDef] = {}


def _existing(name: str) -> OpOverload | None:
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name).default
    except AttributeError:
        return None


def define(name: str, *, cpu: Callable[..., Any], fake: Callable[..., Any],
           triton: Callable[..., Any] | None, summary: str,
           specialize: Callable[..., Callable[..., Any] | None] | None = None) -> OpDef:
    """Register ``optc::name`` (schema inferred from ``cpu``'s annotations) and record it."""
    if name in OPS:
        return OPS[name]
    op = _existing(name)
    if op is None:
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", cpu, mutates_args=(),
                                         device_types="cpu")
        custom.register_fake(fake)
        if triton is not None:
            custom.register_kernel("cuda", triton)
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
    d = OpDef(name=name, op=op, cpu=cpu, triton=triton, summary=summary, specialize=specialize)
    OPS[name] = d
    return d


def get_op_def(target: object) -> OpDef | None:
    """The OpDef of an FX node target (``OpOverload`` or ``OpOverloadPacket``), else None."""
    if isinstance(target, OpOverload):
        target = target.overloadpacket
    if not isinstance(target, OpOverloadPacket):
        return None
    namespace, _, name = target._qualified_op_name.partition("::")
    return OPS.get(name) if namespace == NAMESPACE else None

"""Groups of weight-only quantized linears that read one input: ``optc::qlinear_group`` (sibling
projections, e.g. Q/K/V) and ``optc::qswiglu`` (``silu(x Wg^T) * (x Wu^T)``, Llama's MLP input).

Both are made by the ``fuse_quant_siblings`` pass from ``optc::linear_int8`` / ``linear_int4``
nodes (no bias) and keep those nodes' packed weights as they are: nothing is concatenated or
copied, so the quantized store stays the one owner of the weights.

Why: at decode (one row of x) each quantized linear is one native GEMV, and each GEMV is one
parallel region of torch's thread pool. With ``OMP_WAIT_POLICY=PASSIVE`` (which the benchmark
harness forced until 2026-12-02), and under libgomp's default once its spin count ran out,
every region wakes a sleeping thread.
Measured on the 2-core Xeon VM (TinyLlama-1.1B's 155 int4 GEMVs, 2 threads): 41.7 ms per token
with PASSIVE against 36.9 ms with spinning threads, and a 2048 x 256 K/V projection took
0.058 ms on two threads against 0.043 ms on one. One call covers all the weights of a group in
one region and one pass over x (``optc_gemv_multi``), and SwiGLU applies ``silu * mul`` to each
thread's channels inside the same region (two ATen calls less per layer).

  * CPU, one bf16 row, the table picks the GEMV at M=1 (``quant.cpu_path``): one native call.
    ``qlinear_group`` outputs are bit-identical to the separate GEMVs (same loop per channel).
    ``qswiglu`` rounds where the separate ops round (each product to bf16, silu to bf16, the
    product to bf16); its e^-g is a ~2-ulp fp32 polynomial (vmath.h), so silu can differ from
    ATen's in the last bf16 bit where the fp32 value sits on a rounding edge.
  * Anything else (prefill rows, fp32 activations, no native library): each linear through
    ``linear_int8_cpu`` / ``linear_int4_cpu`` as before, then ATen's silu and mul: the unfused
    bits.
  * Triton (CUDA or ``TRITON_INTERPRET=1``): the same composition over the generated
    dequant-GEMM kernel (``launch_quant_gemm``), one launch per weight.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from optc.ops import native
from optc.ops.quant import (cpu_path, linear_int4_cpu, linear_int4_triton, linear_int8_cpu,
                            linear_int8_triton)
from optc.ops.registry import define

KINDS = ("int8", "int4")


def _check(kind: str, w: Sequence[Tensor], aux: Sequence[Tensor], n: Sequence[int]) -> None:
    if kind not in KINDS:
        raise ValueError(f"optc quantized group: kind must be one of {KINDS}, got {kind!r}")
    if not len(w) == len(aux) == len(n) or not w:
        raise ValueError(f"optc quantized group: {len(w)} weights, {len(aux)} scale tensors and "
                         f"{len(n)} output sizes: need the same number, at least one")


def _one(kind: str, x: Tensor, w: Tensor, aux: Tensor, group_size: int, n: int) -> Tensor:
    if kind == "int8":
        return linear_int8_cpu(x, w, aux, None)
    return linear_int4_cpu(x, w, aux, None, group_size, n)


def _one_triton(kind: str, x: Tensor, w: Tensor, aux: Tensor, group_size: int, n: int) -> Tensor:
    if kind == "int8":
        return linear_int8_triton(x, w, aux, None)
    return linear_int4_triton(x, w, aux, None, group_size, n)


# ---- qlinear_group ----------------------------------------------------------------------------

def qlinear_group_cpu(x: Tensor, kind: str, w: list[Tensor], aux: list[Tensor], group_size: int,
                      n: list[int]) -> list[Tensor]:
    _check(kind, w, aux, n)
    return [_one(kind, x, wi, ai, group_size, ni) for wi, ai, ni in zip(w, aux, n)]


def qlinear_group_fake(x: Tensor, kind: str, w: list[Tensor], aux: list[Tensor], group_size: int,
                       n: list[int]) -> list[Tensor]:
    _check(kind, w, aux, n)
    return [x.new_empty((*x.shape[:-1], ni)) for ni in n]


def qlinear_group_triton(x: Tensor, kind: str, w: list[Tensor], aux: list[Tensor],
                         group_size: int, n: list[int]) -> list[Tensor]:
    _check(kind, w, aux, n)
    return [_one_triton(kind, x, wi, ai, group_size, ni) for wi, ai, ni in zip(w, aux, n)]


# ---- qswiglu ----------------------------------------------------------------------------------

def qswiglu_cpu(x: Tensor, kind: str, w_gate: Tensor, aux_gate: Tensor, w_up: Tensor,
                aux_up: Tensor, group_size: int, n: int) -> Tensor:
    _check(kind, [w_gate, w_up], [aux_gate, aux_up], [n, n])
    g = _one(kind, x, w_gate, aux_gate, group_size, n)
    if g.requires_grad:
        return F.silu(g) * _one(kind, x, w_up, aux_up, group_size, n)
    # in place on the gate's fresh result: the bits of silu(g) * u without two more allocations
    # of its size (at prefill, 2048 x 5632 bf16 = 23 MB each, page-faulted on every call)
    return F.silu(g, inplace=True).mul_(_one(kind, x, w_up, aux_up, group_size, n))


def qswiglu_fake(x: Tensor, kind: str, w_gate: Tensor, aux_gate: Tensor, w_up: Tensor,
                 aux_up: Tensor, group_size: int, n: int) -> Tensor:
    _check(kind, [w_gate, w_up], [aux_gate, aux_up], [n, n])
    return x.new_empty((*x.shape[:-1], n))


def qswiglu_triton(x: Tensor, kind: str, w_gate: Tensor, aux_gate: Tensor, w_up: Tensor,
                   aux_up: Tensor, group_size: int, n: int) -> Tensor:
    _check(kind, [w_gate, w_up], [aux_gate, aux_up], [n, n])
    return F.silu(_one_triton(kind, x, w_gate, aux_gate, group_size, n)) * \
        _one_triton(kind, x, w_up, aux_up, group_size, n)


# ---- per-node specialization ------------------------------------------------------------------

def _bind(kind: str, w: Sequence[Any], aux: Sequence[Any], group_size: int, n: Sequence[int],
          swiglu: bool) -> Callable[[Tensor], Any] | None:
    """The native multi-GEMV bound to constant weights, if the decision table runs the GEMV at
    M=1 for this K and the library can read every weight; else None."""
    if not all(isinstance(t, Tensor) for t in (*w, *aux)) or kind not in KINDS:
        return None
    k = w[0].shape[1] * (2 if kind == "int4" else 1)
    if cpu_path(kind, 1, k) != ("gemv" if kind == "int4" else "native"):
        return None
    return native.gemv_multi_bound(kind, list(w), list(aux), group_size, list(n), swiglu=swiglu)


def specialize_qlinear_group(x: Any, kind: str, w: Any, aux: Any, group_size: int,
                             n: Any) -> Callable | None:
    if not isinstance(w, (list, tuple)) or not isinstance(aux, (list, tuple)):
        return None
    fast = _bind(kind, w, aux, group_size, n, swiglu=False)
    if fast is None:
        return None
    ws, auxs = tuple(w), tuple(aux)

    def run(x: Tensor, kind_: str, w_: list[Tensor], aux_: list[Tensor], group_: int,
            n_: list[int]) -> list[Tensor]:
        same = len(w_) == len(ws) and all(a is b for a, b in zip(w_, ws)) and \
            all(a is b for a, b in zip(aux_, auxs))
        y = fast(x) if same else None
        return y if y is not None else qlinear_group_cpu(x, kind_, w_, aux_, group_, n_)
    run.__name__ = run.__qualname__ = "qlinear_group_cpu_bound"
    run.__module__ = __name__
    return run


def specialize_qswiglu(x: Any, kind: str, w_gate: Any, aux_gate: Any, w_up: Any, aux_up: Any,
                       group_size: int, n: int) -> Callable | None:
    fast = _bind(kind, (w_gate, w_up), (aux_gate, aux_up), group_size, (n, n), swiglu=True)
    if fast is None:
        return None

    def run(x: Tensor, kind_: str, wg: Tensor, ag: Tensor, wu: Tensor, au: Tensor, group_: int,
            n_: int) -> Tensor:
        same = wg is w_gate and ag is aux_gate and wu is w_up and au is aux_up
        y = fast(x) if same else None
        return y if y is not None else qswiglu_cpu(x, kind_, wg, ag, wu, au, group_, n_)
    run.__name__ = run.__qualname__ = "qswiglu_cpu_bound"
    run.__module__ = __name__
    return run


def describe_cpu_node(node: Any) -> str:
    """``optc inspect``'s note: which path one node runs on the CPU."""
    from optc.ops.quant import describe_cpu_node as one
    x = node.args[0].meta.get("val")
    kind = node.args[1]
    count = len(node.args[2]) if node.target._opname == "qlinear_group" else 2
    per = one(node, kind=kind)
    if not isinstance(x, Tensor) or kind not in KINDS:
        return per
    k = int(x.shape[-1])
    gemv = cpu_path(kind, 1, k) == ("gemv" if kind == "int4" else "native") and \
        x.dtype == torch.bfloat16
    fused = f"one native call for {count} weights" + (
        " + silu*mul" if node.target._opname == "qswiglu" else "")
    if any(isinstance(d, torch.SymInt) for d in x.shape):
        return (f"M=1: {fused}; " if gemv else "") + f"other M, each weight: {per}"
    if x.numel() // max(k, 1) == 1 and gemv:
        return f"M=1: {fused}"
    return f"each weight: {per}"


QLINEAR_GROUP = define(
    "qlinear_group", cpu=qlinear_group_cpu, fake=qlinear_group_fake, triton=qlinear_group_triton,
    summary="[x @ dequant(W_i).T for each i]; quantized linears on one input, one call",
    specialize=specialize_qlinear_group)
QSWIGLU = define(
    "qswiglu", cpu=qswiglu_cpu, fake=qswiglu_fake, triton=qswiglu_triton,
    summary="silu(x @ dequant(Wg).T) * (x @ dequant(Wu).T); quantized SwiGLU input, one call",
    specialize=specialize_qswiglu)

"""The batch-1 decode ceiling: memory bandwidth ÷ bytes read per generated token.

    bw = stream(gib=1.0, threads=2)           # {"copy": GB/s, "triad": ..., "read": ...}
    n = bytes_per_token(model_as_run)         # weights + KV cache one decode step reads

``stream`` is STREAM-like (McCalpin): copy ``b = a`` (2 arrays moved), triad ``a = b + s*c``
(3 arrays), and read ``sum(a)`` (1 array), on fp32 arrays of ``gib`` GiB each (far beyond any
cache), best of ``repeats``. The ceiling uses the read bandwidth: decoding streams weights in and
writes almost nothing.

``bytes_per_token`` counts the tensors of the model *as run*: parameters and buffers of an eager
or torch.compile'd module (torchao's quantized weights by their packed inner tensors), or the
constants of the optc Program that ran the most calls (the decode graph, after its passes). Every
tensor is read once per step, except an embedding table, of which one row per token is read. The
static KV cache is a buffer, counted whole: attention reads every position, masked or not.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def stream(gib: float = 1.0, threads: int = 2, repeats: int = 5) -> dict[str, float]:
    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    a = torch.ones(n)
    b = torch.full((n,), 2.0)
    c = torch.full((n,), 0.5)
    nbytes = a.numel() * 4
    kernels = {
        "copy": (lambda: b.copy_(a), 2),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3),
        "read": (lambda: a.sum(), 1),
    }
    best = {k: float("inf") for k in kernels}
    for _ in range(repeats):       # interleaved, so a noisy moment hits every kernel alike
        for k, (fn, _) in kernels.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: round(arrays * nbytes / best[k] / 1e9, 2) for k, (_, arrays) in kernels.items()}


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; a wrapper subclass (torchao) by the tensors inside it."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def _embedding_row(t: torch.Tensor) -> int:
    return tensor_bytes(t) // max(1, t.shape[0])


def _module_bytes(model: torch.nn.Module) -> dict[str, int]:
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    out = {"weights": 0, "kv_cache": 0, "embedding_rows": 0}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or t is None:
            continue
        seen.add(id(t))
        if id(t) in emb:
            out["embedding_rows"] += _embedding_row(t)
        elif name.endswith(("k_cache", "v_cache")):
            out["kv_cache"] += tensor_bytes(t)
        else:
            out["weights"] += tensor_bytes(t)
    return out


def _program_bytes(compiled: Any) -> dict[str, int]:
    graphs = [g for g in compiled.report.graphs if g.program is not None]
    if not graphs:
        raise ValueError("the optc model has no compiled graph yet: run it first")
    g = max(graphs, key=lambda g: g.calls["optc"])   # the decode graph: called once per token
    out = {"weights": 0, "kv_cache": 0, "embedding_rows": 0}
    seen: set[int] = set()
    for n in g.program.gm.graph.nodes:
        if n.op != "get_attr":
            continue
        obj: Any = g.program.gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or id(obj) in seen:
            continue
        seen.add(id(obj))
        users = {str(u.target) for u in n.users}
        if users and all("embedding" in u for u in users):
            out["embedding_rows"] += _embedding_row(obj)
        elif str(n.meta.get("optc_param", "")).endswith(("k_cache", "v_cache")):
            out["kv_cache"] += tensor_bytes(obj)
        else:
            out["weights"] += tensor_bytes(obj)
    return out


def bytes_per_token(model: Any) -> dict[str, int]:
    """{"weights", "kv_cache", "embedding_rows", "total"} bytes one batch-1 decode step reads."""
    from optc.api import CompiledModel
    if isinstance(model, CompiledModel):
        out = _program_bytes(model)
    else:
        inner = getattr(model, "_orig_mod", model)     # torch.compile wrapper
        out = _module_bytes(inner)
    out["total"] = sum(out.values())
    return out


def ceiling(bytes_token: float, bandwidth_gbs: float) -> float:
    """Tokens per second if every step only had to stream its bytes at `bandwidth_gbs`."""
    return bandwidth_gbs * 1e9 / bytes_token

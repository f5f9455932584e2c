"""Program: the final graph lowered to a flat list of prebound calls over a static arena.

Lowering turns every node into one straight-line Python statement bound to its
implementation (not the FX Interpreter): ``optc::`` ops call their CPU implementation
directly on CPU tensors and their Triton wrapper on CUDA tensors; ATen ops call the
operator; values the planner placed call the op's ``out=`` form into their arena slot.
Anything else (an unknown Python callable, another library's custom op) runs as the
original call: a *fallback*, counted and reported.

Memory: one arena per concrete input-shape set (``Plan``), kept in an LRU of at most
``max_plans`` entries; a graph with symbolic sizes reuses the same code for every shape.
Values that escape (graph outputs and their aliases) are never planned, so returned
tensors are never overwritten by a later call.
"""

from __future__ import annotations

import operator
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from optc.graph.printer import target_str
from optc.graph.shape import size_expr
from optc.runtime.memory_plan import Buffer, aligned, greedy_by_size, lower_bound

ALWAYS_LOWERED = frozenset({operator.getitem, torch._C._set_grad_enabled})

aten = torch.ops.aten
# ATen overload -> the torch-level binding generated from the same schema. Python bindings
# skip OpOverload's Python layer: measured 0.6-1 us less per call (about 1.0 vs 1.9 us for
# add, 0.9 vs 2.0 us for view on 2 cores), which is most of a tiny op's cost.
_FAST: dict[torch._ops.OpOverload, Callable] = {
    aten.view.default: torch.Tensor.view, aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze, aten.permute.default: torch.permute,
    aten.expand.default: torch.Tensor.expand, aten.t.default: torch.t,
    aten.reshape.default: torch.reshape, aten.select.int: torch.select,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div, aten.neg.default: torch.neg, aten.rsqrt.default: torch.rsqrt,
    aten.pow.Tensor_Scalar: torch.pow, aten.tanh.default: torch.tanh, aten.relu.default: torch.relu,
    aten.linear.default: torch._C._nn.linear, aten.matmul.default: torch.matmul,
    aten.mm.default: torch.mm, aten.bmm.default: torch.bmm, aten.mean.dim: torch.mean,
    aten.softmax.int: torch.softmax, aten.cat.default: torch.cat,
    aten.gelu.default: torch._C._nn.gelu, aten.silu.default: torch._C._nn.silu,
    aten.layer_norm.default: torch.layer_norm, aten.embedding.default: torch.embedding,
    aten.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
    aten.unbind.int: torch.unbind, aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split_with_sizes, aten.arange.default: torch.arange,
    aten.arange.start: torch.arange, aten.zeros_like.default: torch.zeros_like,
    aten.to.dtype: torch.Tensor.to, aten.rsub.Scalar: torch.rsub,
}
# ... of which these accept ``out=`` (checked in tests/test_runtime.py)
_FAST_OUT = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.tanh.default, aten.linear.default,
    aten.matmul.default, aten.mm.default, aten.bmm.default, aten.mean.dim, aten.softmax.int,
    aten.cat.default, aten.gelu.default, aten.silu.default,
})


class ShapeMismatch(RuntimeError):
    """Inputs do not fit a graph specialized to other shapes (the caller re-captures)."""


@dataclass
class Plan:
    key: tuple
    arena_bytes: int
    lower_bound_bytes: int
    planned_bytes: int             # sum of (aligned) planned sizes: what no reuse would cost
    slots: list[torch.Tensor]


@dataclass
class ProgramStats:
    instructions: int = 0
    lowered: Counter[str] = field(default_factory=Counter)    # kind -> count
    fallbacks: Counter[str] = field(default_factory=Counter)  # target -> count
    planned_values: int = 0
    unplanned_values: int = 0
    folded_values: int = 0       # computed from constants once, recomputed when they change


def _out_overload(t: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The ``out=`` form of a functional ATen op with one tensor result, if it has one."""
    if t.namespace != "aten" or t._schema.is_mutable:
        return None
    rets = t._schema.returns
    if len(rets) != 1 or str(rets[0].type) != "Tensor" or rets[0].alias_info is not None:
        return None
    packet = t.overloadpacket
    names = [f"{t._overloadname}_out", "out"] if t._overloadname != "default" else ["out"]
    for name in names:
        cand = getattr(packet, name, None) if name in packet.overloads() else None
        if cand is None:
            continue
        s = cand._schema
        outs = [a for a in s.arguments if a.is_out]
        ins = [a for a in s.arguments if not a.is_out]
        if len(outs) == 1 and outs[0].name == "out" and \
                [a.name for a in ins] == [a.name for a in t._schema.arguments]:
            return cand
    return None


# Below this size a result without a fast ``out=`` binding is allocated rather than planned:
# OpOverload's generic out= call costs 3-5 us more than the fast binding (aten.embedding.out
# 9.4 us vs torch.embedding 4.4 us, 16x64 fp32 rows, 1 thread), more than a small allocation
# (about 1 us). Large results stay planned: their allocation (page faults) costs more.
SMALL_UNPLANNED_BYTES = 256 << 10


# A constant-only value larger than this is computed on every call instead of kept (keeping it
# would hold a second copy of weights-sized data for the program's lifetime).
FOLD_MAX_BYTES = 16 << 20


def _foldable(n: fx.Node, folded: dict[fx.Node, None]) -> bool:
    """A pure ATen op on constants (``get_attr``) or other folded values, with one tensor
    result no larger than FOLD_MAX_BYTES; views stay per call (they cost nothing)."""
    t, v = n.target, n.meta.get("val")
    if not (isinstance(t, torch._ops.OpOverload) and t.namespace == "aten") or _is_alias_op(n):
        return False
    if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
        return False
    if not isinstance(v, torch.Tensor) or not _small_enough(v, FOLD_MAX_BYTES):
        return False
    ins = n.all_input_nodes
    return bool(ins) and all(a.op == "get_attr" or a in folded for a in ins)


def _small_enough(v: torch.Tensor, limit: int) -> bool:
    if not all(isinstance(s, int) for s in v.shape):
        return False
    return v.numel() * v.element_size() <= limit


def _is_alias_op(n: fx.Node) -> bool:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in t._schema.returns)
    return t is operator.getitem


def _lit(v: Any, consts: dict[str, Any], names: dict[fx.Node, str]) -> str:
    if isinstance(v, fx.Node):
        return names[v]
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_lit(x, consts, names) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    if v is None or isinstance(v, (bool, int, str)):
        return repr(v)
    if isinstance(v, float) and v == v and abs(v) != float("inf"):
        return repr(v)
    key = f"k{len(consts)}"
    consts[key] = v
    return key


class Program:
    def __init__(self, gm: fx.GraphModule, *, plan_memory: bool = True, max_plans: int = 8):
        self.gm = gm
        self.max_plans = max_plans
        self.stats = ProgramStats()
        self.plans: OrderedDict[tuple, Plan] = OrderedDict()
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        out_node = next(n for n in nodes if n.op == "output")
        body = [n for n in nodes if n.op == "call_function"]
        self.stats.instructions = len(body)
        index = {n: i for i, n in enumerate(body)}

        # ---- aliasing and liveness -------------------------------------------------------
        base: dict[fx.Node, set[fx.Node]] = {}
        for n in nodes:
            if n.op != "call_function":
                base[n] = {n}
            elif _is_alias_op(n):
                src = n.args[0]
                base[n] = set(base.get(src, {src})) if isinstance(src, fx.Node) else {n}
            elif self._lowerable(n):
                base[n] = {n}
            else:   # unknown op: its result may alias any input
                base[n] = {n}.union(*(base.get(a, {a}) for a in n.all_input_nodes))
        last_use: dict[fx.Node, int] = {}
        for n in body:
            for a in n.all_input_nodes:
                for b in base.get(a, {a}):
                    last_use[b] = max(last_use.get(b, -1), index[n])
        escaping: set[fx.Node] = set()
        for a in out_node.all_input_nodes:
            escaping |= base.get(a, {a})

        # ---- constant folding -----------------------------------------------------------------
        # Values computed from constants only (fuse_qkv's concatenated weights) run once and are
        # kept; each planned call first compares the source constants' version counters and
        # data pointers with the ones they were folded from (load_state_dict, in-place edits and
        # ``p.data = ...`` all change one) and refolds if any moved. The plain path (autograd)
        # computes them inline, so gradients still reach the parameters.
        # A constant the graph itself writes in place (a buffer updated by a mutable op, directly
        # or through a view) is not a constant: nothing derived from it is folded.
        written: set[fx.Node] = set()
        for n in body:
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                for a in n.all_input_nodes:
                    written |= base.get(a, {a})
        folded: dict[fx.Node, None] = {}
        for n in body:
            if _foldable(n, folded) and n not in escaping and \
                    not any(a in written for a in n.all_input_nodes):
                folded[n] = None
        self.stats.folded_values = len(folded)

        # ---- what goes in the arena --------------------------------------------------------
        self.planned: list[fx.Node] = []
        self.buffers_static: list[tuple[int, int]] = []   # (start, end) per planned value
        out_forms: dict[fx.Node, torch._ops.OpOverload] = {}
        arena_device: torch.device | None = None   # one arena: values on other devices allocate
        for n in body:
            v = n.meta.get("val")
            if n in folded:
                continue
            if not isinstance(v, torch.Tensor) or n in escaping or not plan_memory:
                if isinstance(v, torch.Tensor) and not _is_alias_op(n):
                    self.stats.unplanned_values += 1
                continue
            if not isinstance(n.target, torch._ops.OpOverload) or _is_alias_op(n):
                if not _is_alias_op(n):
                    self.stats.unplanned_values += 1
                continue
            form = _out_overload(n.target)
            if form is not None and n.target not in _FAST_OUT and \
                    _small_enough(v, SMALL_UNPLANNED_BYTES - 1):
                form = None     # the generic out= call costs more than allocating a small result
            if form is None or not is_non_overlapping_and_dense(v) or v.storage_offset() != 0 \
                    or (arena_device is not None and v.device != arena_device):
                self.stats.unplanned_values += 1
                continue
            arena_device = v.device
            out_forms[n] = form
            self.planned.append(n)
            self.buffers_static.append((index[n], max(last_use.get(n, index[n]), index[n])))
        self.stats.planned_values = len(self.planned)
        slot_of = {n: k for k, n in enumerate(self.planned)}

        # ---- code generation ---------------------------------------------------------------
        names: dict[fx.Node, str] = {}
        consts: dict[str, Any] = {}
        for k, n in enumerate(self.placeholders):
            names[n] = f"a{k}"
        for n in nodes:
            if n.op == "get_attr":
                key = f"c{len(consts)}"
                obj: Any = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                consts[key] = obj
                names[n] = key
        for i, n in enumerate(body):
            names[n] = f"v{i}"
        dead_after: dict[int, list[str]] = {}
        outputs = set(out_node.all_input_nodes)
        for n in body:
            if n in outputs or not n.users:
                continue
            end = max(index[u] for u in n.users if u.op != "output")
            dead_after.setdefault(end, []).append(names[n])

        lines_planned: list[str] = []
        lines_plain: list[str] = []
        lines_fold: list[str] = []
        fold_names = {names[n] for n in folded}
        if folded:
            srcs = sorted({names[a] for n in folded for a in n.all_input_nodes
                           if a.op == "get_attr"})
            key = ", ".join(f"{c}._version, {c}.data_ptr()" for c in srcs)
            lines_planned.append(f"if ({key},) != _FV[0]:")
            lines_planned.append("    _refold()")
        for i, n in enumerate(body):
            fn_name = f"f{i}"
            args = ", ".join([_lit(a, consts, names) for a in n.args]
                             + [f"{k}={_lit(v, consts, names)}" for k, v in n.kwargs.items()])
            if n.target is operator.getitem:
                stmt = f"{names[n]} = {_lit(n.args[0], consts, names)}[{_lit(n.args[1], consts, names)}]"
                self.stats.lowered["getitem"] += 1
                lines_planned.append(stmt)
                lines_plain.append(stmt)
            else:
                fn, kind = self._bind(n)
                consts[fn_name] = fn
                if kind.startswith("fallback"):
                    self.stats.fallbacks[target_str(n.target)] += 1
                else:
                    self.stats.lowered[kind] += 1
                plain = f"{names[n]} = {fn_name}({args})"
                lines_plain.append(plain)
                if n in folded:
                    lines_fold.append(plain)
                elif n in out_forms:
                    consts[f"o{i}"] = _FAST[n.target] if n.target in _FAST_OUT else out_forms[n]._op
                    sep = ", " if args else ""
                    lines_planned.append(f"{names[n]} = o{i}({args}{sep}out=S[{slot_of[n]}])")
                    self.stats.lowered["out_variant"] += 1
                else:
                    lines_planned.append(plain)
            if i in dead_after:
                lines_plain.append(f"del {', '.join(dead_after[i])}")
                live = [v for v in dead_after[i] if v not in fold_names]  # folded: globals
                if live:
                    lines_planned.append(f"del {', '.join(live)}")
        if folded:
            lines_fold.append(f"_FV[0] = ({key},)")    # last: a failed fold refolds next call
        ret = _lit(out_node.args[0], consts, names)
        params = ", ".join(names[p] for p in self.placeholders)
        self._globals = dict(consts)
        self._globals["_FV"] = [None]
        self._globals["_refold"] = self._refold
        self.source_planned = self._emit("run_planned", params, lines_planned, ret, with_slots=True)
        self.source_plain = self._emit("run_plain", params, lines_plain, ret, with_slots=False)
        fold_ret = "{" + ", ".join(f"{v!r}: {v}" for v in sorted(fold_names)) + "}"
        self.source_fold = self._emit("run_fold", "", lines_fold, fold_ret, with_slots=False)
        ns: dict[str, Any] = {}
        code = compile("\n".join((self.source_planned, self.source_plain, self.source_fold)),
                       f"<optc program {id(self):x}>", "exec")
        exec(code, self._globals, ns)  # noqa: S102 - generated straight-line code, as torch.fx does
        self._run_planned: Callable = ns["run_planned"]
        self._run_plain: Callable = ns["run_plain"]
        self._run_fold: Callable = ns["run_fold"]

        # ---- symbolic sizes -----------------------------------------------------------------
        self._bind_dims: list[tuple[int, int | None, sympy.Symbol]] = []   # (input idx, dim, sym)
        for k, p in enumerate(self.placeholders):
            v = p.meta.get("val")
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                self._bind_dims.append((k, None, v.node.expr))
            elif isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    e = size_expr(s)
                    if isinstance(e, sympy.Symbol):
                        self._bind_dims.append((k, d, e))
        self.symbolic = bool(self._bind_dims)
        # A plan depends only on the symbols in the planned values' sizes and strides. Dynamo
        # also passes strides and storage offsets as SymInts (a decode step's one-token slice of
        # the output buffer moves its offset every step): those must not make a new plan.
        used: set[sympy.Symbol] = set()
        for n in self.planned:
            v = n.meta["val"]
            for s in (*v.shape, *v.stride()):
                e = size_expr(s)
                if not isinstance(e, int):
                    used |= e.free_symbols
        key_syms: set[sympy.Symbol] = set()
        self._key_dims: list[tuple[int, int | None]] = []
        for k, d, sym in self._bind_dims:
            if sym in used and sym not in key_syms:
                key_syms.add(sym)
                self._key_dims.append((k, d))
        self._static_shapes = [tuple(int(s) for s in p.meta["val"].shape)
                               if isinstance(p.meta.get("val"), torch.Tensor) and not self.symbolic
                               else None for p in self.placeholders]

    def _refold(self) -> None:
        """(Re)compute the folded constants into the program's globals."""
        with torch.no_grad():
            self._globals.update(self._run_fold())

    @staticmethod
    def _emit(name: str, params: str, lines: list[str], ret: str, with_slots: bool) -> str:
        sig = f"{params}, S" if with_slots and params else ("S" if with_slots else params)
        body = "\n".join("    " + l for l in lines) or "    pass"
        return f"def {name}({sig}):\n{body}\n    return {ret}\n"

    def _lowerable(self, n: fx.Node) -> bool:
        t = n.target
        if t in ALWAYS_LOWERED:
            return True
        return isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "optc", "prims")

    def _const_or_runtime(self, a: Any) -> Any:
        """A node argument for ``OpDef.specialize``: a constant's value, ``RUNTIME`` for any
        other node, the literal itself otherwise; lists and tuples element by element."""
        from optc.graph.match import attr_value
        from optc.ops.registry import RUNTIME
        if isinstance(a, (list, tuple)):
            return type(a)(self._const_or_runtime(b) for b in a)
        if not isinstance(a, fx.Node):
            return a
        return attr_value(self.gm, a) if a.op == "get_attr" else RUNTIME

    def _bind(self, n: fx.Node) -> tuple[Callable, str]:
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and t.namespace == "optc":
            from optc.ops import get_op_def
            d = get_op_def(t)
            devs = {a.meta["val"].device.type for a in n.all_input_nodes
                    if isinstance(a.meta.get("val"), torch.Tensor)}
            if d is not None and devs <= {"cpu"}:
                if d.specialize is not None:
                    fn = d.specialize(*(self._const_or_runtime(a) for a in n.args))
                    if fn is not None:
                        return fn, "optc.cpu"
                return d.cpu, "optc.cpu"
            if d is not None and d.triton is not None and devs == {"cuda"}:
                return d.triton, "optc.triton"
            return t, "fallback"
        if t is torch._C._set_grad_enabled:
            return t, "grad_mode"
        if isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "prims"):
            return _FAST.get(t, t._op), "aten"
        return t, "fallback"

    # ---- plans -------------------------------------------------------------------------------
    def _key(self, inputs: tuple) -> tuple:
        if self.symbolic:
            return tuple(inputs[k] if d is None else inputs[k].shape[d] for k, d in self._key_dims)
        return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in inputs)

    def _make_plan(self, key: tuple, inputs: tuple) -> Plan:
        bindings: dict[sympy.Symbol, int] = {}
        for k, d, sym in self._bind_dims:
            x = inputs[k]
            bindings[sym] = int(x) if d is None else int(x.shape[d])

        def ev(s: Any) -> int:
            e = size_expr(s)
            return int(e) if isinstance(e, int) else int(e.subs(bindings))

        metas = []
        bufs = []
        for n, (start, end) in zip(self.planned, self.buffers_static):
            v = n.meta["val"]
            shape = [ev(s) for s in v.shape]
            stride = [ev(s) for s in v.stride()]
            numel = 1
            for s in shape:
                numel *= s
            extent = 1 + sum((sz - 1) * st for sz, st in zip(shape, stride)) if numel else 0
            metas.append((shape, stride, v.dtype, v.device, extent))
            bufs.append(Buffer(start, end, extent * v.element_size()))
        offsets, arena_bytes = greedy_by_size(bufs)
        device = metas[0][3] if metas else torch.device("cpu")
        arena = torch.empty(max(arena_bytes, 1), dtype=torch.uint8, device=device)
        slots = []
        for (shape, stride, dtype, _, extent), off, b in zip(metas, offsets, bufs):
            raw = arena[off:off + b.size].view(dtype)
            slots.append(torch.as_strided(raw, shape, stride))
        return Plan(key, arena_bytes, lower_bound(bufs), sum(aligned(b.size) for b in bufs), slots)

    def plan_for(self, inputs: tuple) -> Plan:
        key = self._key(inputs)
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            return plan
        if not self.symbolic:
            for x, want in zip(inputs, self._static_shapes):
                if want is not None and tuple(x.shape) != want:
                    raise ShapeMismatch(f"input shape {tuple(x.shape)} != traced {want}")
        plan = self._make_plan(key, inputs)
        self.plans[key] = plan
        while len(self.plans) > self.max_plans:
            self.plans.popitem(last=False)
        return plan

    def __call__(self, *inputs: Any) -> Any:
        if torch.is_grad_enabled() or not self.planned:
            if not self.symbolic:
                for x, want in zip(inputs, self._static_shapes):
                    if want is not None and tuple(x.shape) != want:
                        raise ShapeMismatch(f"input shape {tuple(x.shape)} != traced {want}")
            return self._run_plain(*inputs)   # out= forms do not support autograd
        return self._run_planned(*inputs, self.plan_for(inputs).slots)

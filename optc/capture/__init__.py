"""Capture: Dynamo / torch.export / fx.symbolic_trace -> one canonical graph.

Canonical graph contract (what every pass may rely on):
- pre-dispatch ATen ops (``torch.ops.aten.*``), ``operator.getitem``, and ``optc::*`` ops;
- placeholders are the runtime inputs only (tensors and SymInts); parameters and buffers are
  frozen to ``get_attr`` nodes (``meta["optc_param"]`` holds their dotted module name);
- every node has ``meta["val"]`` (FakeTensor / SymInt / tuple) and ``meta["optc_layer"]``;
- the rules of ``canonicalize.py`` have been applied.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.fx.experimental.symbolic_shapes  # noqa: F401 - ShapeEnv, used below
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from optc.capture.canonicalize import canonicalize
from optc.graph.meta import annotate_layers, normalize_module_path


class CaptureError(RuntimeError):
    """The model could not be captured into a graph; the message says why and what to try."""


@dataclass(frozen=True)
class DynamoLayout:
    """How a Dynamo graph's inputs split, learned at its first capture. Dynamo drops the
    placeholders' ``grapharg`` meta after compiling, so re-captures (another module instance
    reaching the same graph) must reuse this instead of reading it again."""
    state: dict[int, str]          # position -> dotted name of a parameter / buffer
    scalars: frozenset[int]        # positions of tensor-wrapped Python scalars (.item())


@dataclass
class Captured:
    gm: fx.GraphModule
    frontend: str
    # Positions (in the frontend's flat input list) of the runtime inputs, in placeholder order.
    runtime_inputs: list[int]
    # (position, tensor) of every frozen parameter/buffer: checked by identity at call time.
    frozen: list[tuple[int, torch.Tensor]]
    # (position, value) of Python scalars Dynamo passed as 0-d tensors ("unspecialized"
    # floats such as an attention scale): baked into the graph, checked at call time
    baked: list[tuple[int, float | int]] = field(default_factory=list)
    canon_stats: Counter[str] = field(default_factory=Counter)
    layout: DynamoLayout | None = None
    in_spec: Any = None    # export / symbolic_trace: pytree spec of (args, kwargs)
    out_spec: Any = None


def _retrace(fn: Callable, fake_inputs: Sequence[Any], fake_mode, record_module_stack: bool = False
             ) -> fx.GraphModule:
    ctx = fake_mode if fake_mode is not None else _nullctx()
    with fx_traceback.preserve_node_meta(), ctx:
        return make_fx(fn, pre_dispatch=True, tracing_mode="symbolic",
                       record_module_stack=record_module_stack)(*fake_inputs)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _freeze(gm: fx.GraphModule, frozen: dict[int, tuple[str, torch.Tensor]]) -> None:
    """Turn the placeholders at the given positions into get_attr nodes on ``gm``."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_non_ph = next(n for n in gm.graph.nodes if n.op != "placeholder")
    used: set[str] = set()
    for i, (name, t) in frozen.items():
        ph = phs[i]
        attr = "p_" + "".join(c if c.isalnum() else "_" for c in name)
        while attr in used:
            attr += "_"
        used.add(attr)
        gm.register_buffer(attr, t, persistent=False) if not isinstance(t, torch.nn.Parameter) \
            else gm.register_parameter(attr, t)
        with gm.graph.inserting_before(first_non_ph):
            ga = gm.graph.get_attr(attr)
        ga.meta.update(ph.meta)
        ga.meta["optc_param"] = name
        ph.replace_all_uses_with(ga)
        gm.graph.erase_node(ph)


def _finish(gm: fx.GraphModule, fake_mode) -> Counter[str]:
    gm.meta["optc_fake_mode"] = fake_mode
    stats = canonicalize(gm)
    annotate_layers(gm)
    gm.graph.lint()
    gm.recompile()
    return stats


def _dynamo_layout(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> DynamoLayout:
    state: dict[int, str] = {}
    scalars: set[int] = set()
    for i, (ph, real) in enumerate(zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                       example_inputs)):
        ga = ph.meta.get("grapharg")
        src_name = ga.source.name if ga is not None and hasattr(ga, "source") else ph.name
        if isinstance(real, torch.nn.Parameter) or "_buffers[" in src_name or "._buffers" in src_name:
            state[i] = normalize_module_path(src_name)
        elif getattr(ga, "pass_arg_as_tensor", False) and ph.users and \
                all(u.op == "call_method" and u.target == "item" for u in ph.users):
            scalars.add(i)
    return DynamoLayout(state, frozenset(scalars))


def _bake_scalars(gm: fx.GraphModule, example_inputs: Sequence[Any], layout: DynamoLayout
                  ) -> tuple[fx.GraphModule, list]:
    """Replace ``x.item()`` of Dynamo's tensor-wrapped Python scalars by their value.

    Dynamo lifts a float attribute that differs between module instances (an attention
    scale) to a 0-d tensor input read with ``.item()``; a fake-tensor re-trace cannot read
    it. The value is baked in and the caller re-captures when it changes."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    todo = [(i, ph) for i, ph in enumerate(phs) if i in layout.scalars]
    if not todo:
        return gm, []
    g = fx.Graph()
    env = g.graph_copy(gm.graph, {})
    g.output(env)
    new = fx.GraphModule(gm, g)
    new_phs = [n for n in new.graph.nodes if n.op == "placeholder"]
    baked = []
    for i, _ in todo:
        value = example_inputs[i].item()
        for item in list(new_phs[i].users):
            for u in list(item.users):
                u.args = torch.utils._pytree.tree_map(lambda a: value if a is item else a, u.args)
                u.kwargs = torch.utils._pytree.tree_map(lambda a: value if a is item else a, u.kwargs)
            new.graph.erase_node(item)
        baked.append((i, value))
    new.recompile()
    return new, baked


def capture_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any],
                   layout: DynamoLayout | None = None) -> Captured:
    """Canonicalize a graph handed to a Dynamo backend (parameters arrive as inputs).

    ``layout``: from the graph's first capture, when capturing it again for other inputs."""
    layout = layout or _dynamo_layout(gm, example_inputs)
    gm, baked = _bake_scalars(gm, example_inputs, layout)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [n.meta.get("example_value") for n in phs]
    if any(v is None for v in fake_inputs):
        raise CaptureError("Dynamo graph placeholders lack example values; cannot re-trace")
    fake_mode = detect_fake_mode(fake_inputs) or detect_fake_mode(list(example_inputs))
    out = _retrace(fx.Interpreter(gm).run, fake_inputs, fake_mode)
    frozen: dict[int, tuple[str, torch.Tensor]] = {}
    runtime: list[int] = []
    for i, real in enumerate(example_inputs):
        if i in layout.state:
            frozen[i] = (layout.state[i], real)
        elif i in layout.scalars:
            frozen[i] = (f"scalar{i}", real)    # dropped: its value is baked in
        else:
            runtime.append(i)
    baked_idx = {b for b, _ in baked}
    _freeze(out, frozen)
    stats = _finish(out, fake_mode)
    return Captured(out, "dynamo", runtime,
                    [(i, t) for i, (_, t) in frozen.items() if i not in baked_idx], baked=baked,
                    canon_stats=stats, layout=layout)


def _functional(model: torch.nn.Module, names: list[str], n_state: int, in_spec: Any,
                out_box: list) -> Callable:
    def fn(*flat: Any) -> Any:
        state = dict(zip(names, flat[:n_state]))
        args, kwargs = pytree.tree_unflatten(list(flat[n_state:]), in_spec)
        out = torch.func.functional_call(model, state, args, kwargs, strict=False)
        leaves, spec = pytree.tree_flatten(out)
        out_box.append(spec)
        return leaves
    return fn


def capture_symbolic_trace(model: torch.nn.Module, args: tuple, kwargs: dict | None = None
                           ) -> Captured:
    """``fx.symbolic_trace`` (simple modules only), then to canonical ATen."""
    before = {k: b.clone() for k, b in model.named_buffers()}
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - symbolic_trace raises many kinds; all mean "cannot"
        raise CaptureError(
            f"fx.symbolic_trace failed on {type(model).__name__}: {type(e).__name__}: {e}. "
            "It works on simple modules only; use frontend='dynamo' (the default) or 'export'"
        ) from e
    changed = [k for k, b in model.named_buffers() if not torch.equal(b, before[k])]
    if changed:
        # fx.symbolic_trace ran the in-place update on the real buffer and left it out of
        # the graph: undo it and refuse, rather than replay a graph that lost it
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(before[k])
        raise CaptureError(
            f"{type(model).__name__}.forward updates buffer(s) {changed} in place, which "
            "fx.symbolic_trace cannot capture: use frontend='dynamo'")
    for n in traced.graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if n.op in ("call_method", "call_function") and isinstance(name, str) \
                and name.endswith("_") and not name.startswith("_") and n.args \
                and _is_module_state(n.args[0]):
            # in-place updates of module state are not replayed faithfully by the functional
            # re-trace below; refuse before tracing so the module is left untouched
            raise CaptureError(
                f"{type(model).__name__}.forward updates module state in place ({name}); the "
                "symbolic_trace frontend supports pure modules only: use frontend='dynamo'")
    return _capture_functional(traced, args, kwargs or {}, "symbolic_trace")


_VIEW_METHODS = frozenset({"view", "reshape", "transpose", "permute", "t", "expand", "unsqueeze",
                           "squeeze", "narrow", "select", "flatten", "view_as"})


def _is_module_state(a: Any) -> bool:
    """Is ``a`` (in a symbolic_trace graph) a parameter/buffer, or a view of one?"""
    while isinstance(a, fx.Node):
        if a.op == "get_attr":
            return True
        is_view = (a.op == "call_method" and a.target in _VIEW_METHODS) or \
            (a.op == "call_function" and a.target is operator.getitem)
        if not is_view or not a.args:
            return False
        a = a.args[0]
    return False


def _capture_functional(model: torch.nn.Module, args: tuple, kwargs: dict, frontend: str
                        ) -> Captured:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    names = list(state)
    flat_in, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    fake_mode = torch._subclasses.FakeTensorMode(
        shape_env=torch.fx.experimental.symbolic_shapes.ShapeEnv(), allow_non_fake_inputs=True)
    def fakify(x: Any) -> Any:
        return fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
    fake_flat = [fakify(state[n]) for n in names] + [fakify(x) for x in flat_in]
    out_box: list = []
    out = _retrace(_functional(model, names, len(names), in_spec, out_box), fake_flat, fake_mode,
                   record_module_stack=True)
    _freeze(out, {i: (n, state[n]) for i, n in enumerate(names)})
    stats = _finish(out, fake_mode)
    n_state = len(names)
    runtime = list(range(n_state, n_state + len(flat_in)))
    return Captured(out, frontend, runtime, [], canon_stats=stats, in_spec=in_spec,
                    out_spec=out_box[-1] if out_box else None)


def capture_export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic_shapes: Any = None) -> Captured:
    """``torch.export`` (strict=False), then canonicalize its ATen graph."""
    try:
        ep = torch.export.export(model, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes,
                                 strict=False)
    except Exception as e:  # noqa: BLE001 - export raises many kinds; all mean "cannot"
        raise CaptureError(
            f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {str(e)[:300]}. "
            "Causal LMs need use_cache=False; or use frontend='dynamo' (the default)") from e
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise CaptureError("the exported graph mutates buffers or inputs; optc's export frontend "
                           "supports pure inference graphs only: use frontend='dynamo'")
    gm = ep.graph_module
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = sig.input_specs
    frozen: dict[int, tuple[str, torch.Tensor]] = {}
    runtime: list[int] = []
    from torch.export.graph_signature import InputKind
    for i, spec in enumerate(specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            t = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            frozen[i] = (spec.target, t)
        elif spec.kind in (InputKind.CONSTANT_TENSOR,):
            frozen[i] = (spec.target, ep.constants[spec.target])
        else:
            runtime.append(i)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in phs])
    gm = fx.GraphModule(gm, gm.graph)   # own copy: we rewrite it
    _freeze(gm, frozen)
    stats = _finish(gm, fake_mode)
    # runtime input positions refer to the user's flat (args, kwargs) list
    return Captured(gm, "export", list(range(len(runtime))), [], canon_stats=stats,
                    in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec)

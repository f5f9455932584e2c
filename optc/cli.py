"""The ``optc`` command line: ``optc passes`` and ``optc inspect MODEL``.

MODEL is one of
  zoo:NAME[:key=value,...]        a built-in zoo model (``optc inspect zoo:llama-tiny``)
  hf:ARCH[:key=value,...]         a transformers architecture, small config, random weights
  path/to/file.py:factory         ``factory()`` returns a module, or (module, args[, kwargs])
``seq=`` and ``batch=`` set the example input; other keys override the model config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPEC_HELP = ("accepted MODEL forms: zoo:NAME[:key=value,...] (NAME one of {zoo}), "
             "hf:ARCH[:key=value,...] (ARCH one of {hf}), or path/to/file.py:factory")


class SpecError(ValueError):
    pass


@dataclass
class ModelSpec:
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    label: str


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _kv(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise SpecError(f"'{part}' is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _accepted() -> str:
    import models
    from models.hf import HF_ARCHS
    return SPEC_HELP.format(zoo=", ".join(models.ZOO_NAMES), hf=", ".join(HF_ARCHS))


def resolve_model(spec: str) -> ModelSpec:
    """Turn a MODEL string into a model and example inputs; SpecError says what is accepted."""
    import models
    from models.hf import HF_ARCHS, build_hf, hf_example_inputs
    try:
        if spec.startswith("zoo:") or spec.startswith("hf:"):
            kind, rest = spec.split(":", 1)
            name, _, opts = rest.partition(":")
            kw = _kv(opts)
            seq, batch = int(kw.pop("seq", 16)), int(kw.pop("batch", 1))
            if kind == "zoo":
                if name not in models.ZOO_NAMES:
                    raise SpecError(f"unknown zoo model '{name}'")
                m = models.build(name, **kw)
                args, kwargs = models.example_inputs(m, batch=batch, seq=seq)
            else:
                if name not in HF_ARCHS:
                    raise SpecError(f"unknown hf architecture '{name}'")
                m = build_hf(name, **kw)
                args, kwargs = hf_example_inputs(m, batch=batch, seq=seq)
            return ModelSpec(m, tuple(args), dict(kwargs), spec)
        path, sep, factory = spec.rpartition(":")
        if not sep or not path.endswith(".py"):
            raise SpecError(f"'{spec}' is not a model spec")
        if not Path(path).is_file():
            raise SpecError(f"file '{path}' does not exist")
        mod_spec = importlib.util.spec_from_file_location("optc_user_model", path)
        assert mod_spec is not None and mod_spec.loader is not None
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        fn = getattr(mod, factory, None)
        if fn is None:
            raise SpecError(f"'{path}' has no function '{factory}'")
        made = fn()
        if isinstance(made, torch.nn.Module):
            raise SpecError(f"{factory}() returned only a module; return (module, args) or "
                            "(module, args, kwargs) so optc has example inputs")
        m, args, kwargs = (tuple(made) + ({},))[:3]
        return ModelSpec(m.eval(), tuple(args), dict(kwargs), spec)
    except SpecError as e:
        raise SpecError(f"bad MODEL '{spec}': {e}; {_accepted()}") from None
    except (ValueError, TypeError) as e:
        raise SpecError(f"bad MODEL '{spec}': {e}; {_accepted()}") from None


# ---- commands --------------------------------------------------------------------------------
def cmd_passes(_: argparse.Namespace) -> int:
    from optc.passes.pipeline import DEFAULT_PIPELINE
    from optc.passes.registry import PASSES
    width = max(len(n) for n in PASSES)
    for name, info in PASSES.items():
        tag = "default" if name in DEFAULT_PIPELINE else "opt-in"
        kind = "lossless" if info.lossless else "lossy"
        print(f"{name:<{width}}  [{tag}, {kind}]  {info.summary}  — source: {info.source}")
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def inspect_model(spec: ModelSpec, passes: list[str] | None, frontend: str,
                  gpu: str = "H100") -> dict[str, Any]:
    """Compile with graph recording; gather everything ``optc inspect`` prints."""
    import optc
    from optc.codegen.inventory import kernels_for_graph
    from optc.graph.cost import evaluate
    from optc.runtime.peak import measure_peak_bytes, module_tensors

    cfg = optc.CompileConfig(pipeline=tuple(passes) if passes is not None else None, frontend=frontend)
    compiled = optc.compile(spec.model, config=cfg, record_graphs=True)
    with torch.no_grad():
        eager_out = spec.model(*spec.args, **spec.kwargs)
        out = compiled(*spec.args, **spec.kwargs)
        ext = module_tensors(spec.model)
        eager_peak = measure_peak_bytes(spec.model, *spec.args, external=ext, **spec.kwargs)
        optc_mem = compiled.measure_memory(*spec.args, **spec.kwargs)
    diff = _max_diff(eager_out, out)
    rep = compiled.report
    graphs = []
    for g in rep.graphs:
        entry: dict[str, Any] = {"frontend": g.frontend, "nodes_captured": g.nodes_captured,
                                 "canonicalize": g.canon_stats, "eager_reason": g.eager_reason}
        if g.pipeline is not None:
            entry["graph_before"] = g.pipeline.graph_before
            entry["passes"] = [{
                "name": r.name, "modified": r.modified, "rewrites": sum(r.stats.values()),
                "stats": dict(r.stats), "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                "ms": round(r.seconds * 1e3, 2), "skipped": r.skipped, "error": r.error,
                "reproducer": str(r.reproducer) if r.reproducer else None,
                "graph_after": r.graph_after} for r in g.pipeline.records]
            entry["kernels"] = kernels_for_graph(g.pipeline.gm)
        if g.program is not None:
            st = g.program.stats
            plan = next(reversed(g.program.plans.values()), None)
            entry["runtime"] = {"instructions": st.instructions, "lowered": dict(st.lowered),
                                "fallbacks": dict(st.fallbacks), "planned_values": st.planned_values,
                                "unplanned_values": st.unplanned_values,
                                "arena_bytes": plan.arena_bytes if plan else 0,
                                "lower_bound_bytes": plan.lower_bound_bytes if plan else 0,
                                "no_reuse_bytes": plan.planned_bytes if plan else 0}
            bindings = _bindings(g.program, plan)
            try:
                entry["cost"] = {"flops": evaluate(g.flops, bindings), "bytes": evaluate(g.bytes, bindings),
                                 "flops_expr": str(g.flops), "bytes_expr": str(g.bytes)}
            except ValueError:
                entry["cost"] = {"flops_expr": str(g.flops), "bytes_expr": str(g.bytes)}
            if g.pipeline is not None:
                entry["attention"] = _attention_entries(g.pipeline.gm, bindings, gpu)
        graphs.append(entry)
    arena = sum(g.get("runtime", {}).get("arena_bytes", 0) for g in graphs)
    return {"model": spec.label, "frontend": frontend, "graphs": graphs,
            "graph_breaks": dict(rep.graph_breaks), "max_abs_diff_vs_eager": diff,
            "memory": {"eager_peak_bytes": eager_peak, "optc_arena_bytes": arena,
                       "optc_transient_peak_bytes": optc_mem["transient_peak_bytes"]}}


def _attention_entries(gm: Any, bindings: dict, gpu: str) -> list[dict[str, Any]]:
    """Per optc.attention node: the fuse_attention rules that built it, its shapes, and a
    roofline *estimate* of its Triton kernel on ``gpu`` (not a measurement)."""
    import sympy

    from optc.graph.cost import evaluate
    from optc.graph.printer import node_names
    from optc.graph.shape import size_expr
    from optc.ops.attention import mask_kind, roofline
    names = node_names(gm.graph)
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "_opname", None) != "attention" \
                or getattr(n.target, "namespace", None) != "optc":
            continue
        q, k, _, mask, causal, _, group = n.args[:7]
        try:
            qs, ks = ([evaluate(sympy.sympify(size_expr(s)), bindings) for s in a.meta["val"].shape]
                      for a in (q, k))
        except ValueError:     # symbolic sizes and no concrete input seen
            qs = ks = None
        mval = mask.meta.get("val") if mask is not None else None
        e: dict[str, Any] = {"node": names[n], "layer": n.meta.get("optc_layer"),
                             "rules": list(n.meta.get("optc_attention_rules", ())),
                             "q": qs, "k": ks, "causal": bool(causal), "kv_group": group,
                             "mask": mask_kind(mval)}
        if qs is not None:
            mask_bytes = 0
            if mval is not None:
                try:
                    mask_bytes = evaluate(sympy.sympify(size_expr(mval.numel())), bindings) \
                        * mval.element_size()
                except ValueError:
                    mask_bytes = 0
            e["roofline"] = roofline(qs[0], qs[1], ks[1], qs[2], ks[2], qs[3], q.meta["val"].dtype,
                                     causal=bool(causal), mask_bytes=mask_bytes, gpu=gpu)
        out.append(e)
    return out


def _bindings(program: Any, plan: Any) -> dict:
    if plan is None:
        return {}
    out = {}
    for k, d, sym in program._bind_dims:
        v = plan.key[k]
        out[sym] = int(v) if d is None else int(v[d])
    return out


def _max_diff(a: Any, b: Any) -> float:
    from torch.utils._pytree import tree_leaves
    la = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if hasattr(a, "to_tuple"):
        la = [t for t in tree_leaves(a.to_tuple()) if isinstance(t, torch.Tensor)]
        lb = [t for t in tree_leaves(b.to_tuple()) if isinstance(t, torch.Tensor)]
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(la, lb)), default=0.0)


def print_inspect(info: dict[str, Any], print_after_all: bool) -> None:
    print(f"== optc inspect {info['model']}  (frontend {info['frontend']}, {len(info['graphs'])} graph(s), "
          f"{sum(info['graph_breaks'].values())} graph break(s))")
    for reason, n in info["graph_breaks"].items():
        print(f"   graph break x{n}: {reason}")
    for gi, g in enumerate(info["graphs"]):
        print(f"\n-- graph {gi}: {g['nodes_captured']} ops captured; canonicalize: "
              + (", ".join(f"{k}={v}" for k, v in g["canonicalize"].items()) or "nothing to do"))
        if g.get("eager_reason"):
            print(f"   runs EAGER: {g['eager_reason']}")
            continue
        if g.get("graph_before"):
            print("\n-- before passes:\n" + g["graph_before"])
        for p in g.get("passes", []):
            if p["graph_after"] and (p["modified"] or print_after_all):
                print(f"\n-- after {p['name']} ({p['rewrites']} rewrites):\n{p['graph_after']}")
            elif print_after_all:
                print(f"\n-- after {p['name']}: unchanged"
                      + (f" ({p['skipped']})" if p["skipped"] else "")
                      + (f" (FAILED: {p['error']})" if p["error"] else ""))
        print("\n-- passes:")
        w = max([16, *(len(p["name"]) for p in g.get("passes", []))])
        print(f"   {'pass':<{w}} {'status':<10} {'rewrites':>8} {'nodes':>13} {'ms':>8}  stats")
        for p in g.get("passes", []):
            status = ("failed" if p["error"] else "skipped" if p["skipped"]
                      else "changed" if p["modified"] else "no-op")
            stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
            nodes = f"{p['nodes_before']}->{p['nodes_after']}"
            print(f"   {p['name']:<{w}} {status:<10} {p['rewrites']:>8} {nodes:>13} {p['ms']:>8.2f}  {stats}")
            if p["error"]:
                print(f"      error: {p['error']}; reproducer: {p['reproducer']}")
        c = g.get("cost", {})
        if "flops" in c:
            print(f"\n-- cost model (this input): {c['flops'] / 1e6:.3f} MFLOP, {_fmt_bytes(c['bytes'])} moved"
                  f"   [symbolic: flops={c['flops_expr']}]")
        rt = g.get("runtime")
        if rt:
            lowered = ", ".join(f"{k}={v}" for k, v in rt["lowered"].items())
            fb = ", ".join(f"{k} x{v}" for k, v in rt["fallbacks"].items()) or "none"
            print(f"-- runtime: {rt['instructions']} instructions ({lowered}); fallbacks: {fb}")
            lb = rt["lower_bound_bytes"]
            ratio = f"{rt['arena_bytes'] / lb:.3f}x lower bound" if lb else "n/a"
            print(f"-- memory plan: {rt['planned_values']} values in arena, {rt['unplanned_values']} "
                  f"allocated by their op; arena {_fmt_bytes(rt['arena_bytes'])} ({ratio}; "
                  f"{_fmt_bytes(rt['no_reuse_bytes'])} without reuse)")
        attn = g.get("attention") or []
        if attn:
            print(f"-- attention: {len(attn)} x optc.attention (rules that fired per attention; "
                  "Triton time is a roofline estimate from datasheet peaks, not measured)")
        for a in attn:
            where = f" @L{a['layer']}" if a["layer"] is not None else ""
            shape = f"q {tuple(a['q'])}, k {tuple(a['k'])}" if a["q"] else "symbolic shapes"
            print(f"   {a['node']}{where}: {' + '.join(a['rules'])}; {shape}, kv_group "
                  f"{a['kv_group']}, causal={a['causal']}, mask={a['mask']}")
            r = a.get("roofline")
            if r:
                print(f"      {r['kernel']} on {r['gpu']}: {r['flops'] / 1e6:.3f} MFLOP, "
                      f"{_fmt_bytes(r['bytes'])}, {r['predicted_s'] * 1e6:.3g} us "
                      f"({r['bound']}-bound) [{r['label']}]")
        ks = g.get("kernels") or []
        print("-- kernels: " + ("none (no optc ops in the graph)" if not ks else ""))
        for k in ks:
            print(f"   {k['op']} x{k['count']}: CPU {k['cpu']}; Triton kernel {k['triton']}")
    mem = info["memory"]
    print(f"\n-- memory: eager peak {_fmt_bytes(mem['eager_peak_bytes'])}; optc arena "
          f"{_fmt_bytes(mem['optc_arena_bytes'])} + transient {_fmt_bytes(mem['optc_transient_peak_bytes'])}")
    print(f"-- max |optc - eager| = {info['max_abs_diff_vs_eager']:.3g}")


def cmd_inspect(ns: argparse.Namespace) -> int:
    try:
        spec = resolve_model(ns.model)
    except SpecError as e:
        print(f"optc: {e}", file=sys.stderr)
        return 2
    passes = [p for p in ns.passes.split(",") if p] if ns.passes is not None else None
    from optc.config import ConfigError
    try:
        info = inspect_model(spec, passes, ns.frontend, ns.gpu)
    except ConfigError as e:
        print(f"optc: {e}", file=sys.stderr)
        return 2
    if ns.format == "json":
        print(json.dumps(info, indent=2, default=str))
    else:
        print_inspect(info, ns.print_after_all)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from optc.demo import main as demo_main
    try:
        return demo_main(ns.model, ns.threads)
    except SpecError as e:
        print(f"optc: {e}", file=sys.stderr)
        return 2


def cmd_bench(ns: argparse.Namespace) -> int:
    from optc.bench import run_bench
    configs = [c for c in ns.configs.split(",") if c] if ns.configs else None
    try:
        run_bench(ns.model, suite=ns.suite, configs=configs, threads=ns.threads, out=ns.out)
    except ValueError as e:
        print(f"optc: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="optc", description="optc: optimizing compiler for PyTorch models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("passes", help="list passes, one line each, with their source").set_defaults(fn=cmd_passes)
    ip = sub.add_parser("inspect", help="show what each pass does to a model's graph")
    ip.add_argument("model", help="zoo:NAME[:k=v,...] | hf:ARCH[:k=v,...] | path/to/file.py:factory")
    ip.add_argument("--passes", default=None, help="comma-separated pipeline (default: the default pipeline)")
    ip.add_argument("--print-after-all", action="store_true", help="print the graph after every pass")
    ip.add_argument("--format", choices=("text", "json"), default="text")
    ip.add_argument("--frontend", choices=("dynamo", "export", "symbolic_trace"), default="dynamo")
    ip.add_argument("--gpu", choices=("H100", "H200", "A100"), default="H100",
                    help="GPU whose datasheet peaks the attention roofline estimate uses")
    ip.set_defaults(fn=cmd_inspect)
    dp = sub.add_parser("demo", help="compile a built-in model; print a before/after table")
    dp.add_argument("model", nargs="?", default="zoo:llama-small:seq=128")
    dp.add_argument("--threads", type=int, default=None)
    dp.set_defaults(fn=cmd_demo)
    bp = sub.add_parser("bench", help="benchmark one model against peers (speed, memory, accuracy)")
    bp.add_argument("model", help="tiny-lm | minilm | a zoo Llama or BERT name (e.g. tinyllama-1.1b)")
    bp.add_argument("--suite", choices=("quick", "full"), default="quick")
    bp.add_argument("--configs", default=None, help="comma-separated configurations (default: all)")
    bp.add_argument("--threads", type=int, default=2)
    bp.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results)")
    bp.set_defaults(fn=cmd_bench)
    ns = ap.parse_args(argv)
    return int(ns.fn(ns))


if __name__ == "__main__":
    sys.exit(main())

"""Node metadata helpers: module paths, transformer-block (layer) discovery, fake values.

Every canonical node carries ``meta["val"]`` (FakeTensor / SymInt / tuple of them) and
``meta["optc_layer"]``: the index of the repeated block it belongs to, or None.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

import torch
import torch.fx as fx

_DYNAMO_ITEM = re.compile(r"\._modules\['([^']+)'\]|\['([^']+)'\]|\[(\d+)\]")
_ROOT = re.compile(r"^L\['[^']+'\]")
_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def normalize_module_path(path: str) -> str:
    """``L['self'].model.layers.0.mlp`` / ``L['self']._modules['h']._modules['0']`` -> ``model.layers.0.mlp``."""
    p = _ROOT.sub("", path)   # Dynamo's root: L['self'] (or whatever the method calls self)
    p = _DYNAMO_ITEM.sub(lambda m: "." + (m.group(1) or m.group(2) or m.group(3)), p)
    p = p.replace("._parameters.", ".").replace("._buffers.", ".")
    return p.strip(".")


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [normalize_module_path(v[0]) for v in stack.values()]


def _block_prefix(paths: Iterable[str]) -> str | None:
    """The ModuleList that holds the repeated blocks: the ``prefix`` with most ``prefix.<i>``."""
    counts: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for p in paths:
        m = _BLOCK.match(p)
        if m and (m.group(1), m.group(2)) not in seen:
            seen.add((m.group(1), m.group(2)))
            counts[m.group(1)] += 1
    if not counts:
        return None
    return counts.most_common(1)[0][0]


def layer_of_path(path: str, prefix: str | None) -> int | None:
    if prefix is None:
        return None
    if path.startswith(prefix + "."):
        rest = path[len(prefix) + 1:]
        idx = rest.split(".", 1)[0]
        if idx.isdigit():
            return int(idx)
    return None


def annotate_layers(gm: fx.GraphModule) -> str | None:
    """Set ``meta["optc_layer"]`` on every node; return the block prefix found (e.g. ``model.layers``)."""
    all_paths: list[str] = []
    for n in gm.graph.nodes:
        all_paths.extend(module_paths(n))
        if "optc_param" in n.meta:
            all_paths.append(n.meta["optc_param"])
    prefix = _block_prefix(all_paths)
    for n in gm.graph.nodes:
        layer = None
        paths = module_paths(n) + ([n.meta["optc_param"]] if "optc_param" in n.meta else [])
        for p in paths:
            layer = layer_of_path(p, prefix)
            if layer is not None:
                break
        n.meta["optc_layer"] = layer
    gm.meta["optc_block_prefix"] = prefix
    return prefix


def fake_of(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def is_tensor_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def num_layers(gm: fx.GraphModule) -> int:
    layers = {n.meta.get("optc_layer") for n in gm.graph.nodes} - {None}
    return max(layers) + 1 if layers else 0

"""quantize_weights — linear layers become dequant-fused quantized ``optc::`` linear ops.

**Rewrites**: ``y = aten.linear(x, W[, b])`` with ``W`` a frozen 2-D float parameter (a
``get_attr``, or ``t(get_attr)`` for GPT-2's Conv1D after canonicalization turned its addmm
into a linear) -> ``y = optc.<op>(x', *quantized tensors, b, ...)`` as
``optc.quant.formats.linear_call`` gives it, per layer by the config's rules:
  * int8 weight-only (per output channel, symmetric); int4 weight-only (group 32/64/128,
    asymmetric, packed); W8A8 dynamic; block floating point (shared exponent per block of
    16/32 input channels);
  * AWQ (int8/int4): per-input-channel scales ``s`` searched on calibration rows
    (``optc.quant.awq``), one ``s`` per group of AWQ linears reading the same ``x``; ``1/s`` is
    folded where exact — into the norm that produces ``x`` (RMSNorm / LayerNorm weight and
    bias, or any per-channel constant multiply), or into the output rows of the linear that
    produces ``x`` directly or through one factor of a product (``w2(silu(w1 x) * w3 x)``:
    rows of ``w3``) — else ``x' = x * (1/s)`` is an explicit multiply;
  * BFP with outlier channel reordering (``optc.quant.reorder``): the input-channel
    permutation is folded into the producing linears' output rows where ``x`` is an
    elementwise function of linears used nowhere else (SwiGLU: rows of ``w1`` and ``w3``), else
    the BFP op gathers ``x[..., perm]`` itself. (Q1's BFP op gathers in either case — an
    identity permutation when folded, and its CPU "planes" layout gathers anyway to repeat x
    per mantissa plane — so the fold saves nothing on CPU yet; it is what a kernel that reads
    x in order needs.)
**Source**: AWQ (Lin et al., 2023); "Accurate Block Quantization in LLMs with Outliers"
  (Trukhanov & Soloveychik, 2024); gpt-fast / torchao weight-only quantization.
**Requires**: canonical graph; calibration statistics in ``gm.meta["optc_quant"]`` (a
  ``QuantStore``, set by ``optc.compile(..., calibration=...)``) for AWQ rules.
**Ensures**: lossy, within the per-mode SQNR floors of ``tests/test_quantize_weights.py``;
  with quantization disabled but folding on, folded graphs equal the original up to fp
  rounding. Must not fire on: matmuls whose "weight" is an activation (attention's q @ kᵀ is
  never a linear; a linear over an activation weight is skipped), non-float weights, layers no
  rule selects (the lm_head unless a rule names the role), shapes the formats do not support
  (K not divisible by the group/block size: falls back to a smaller group when
  ``group_fallback``, else stays float) — every skip is counted in the statistics.
**Order**: after fuse_add_norm (folds find the fused norm ops; either order is exact).
"""

from __future__ import annotations

import fnmatch
import json
import operator
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import Tensor

from optc.config import ConfigError, PassConfig
from optc.graph.match import is_call as _is, attr_value as _attr
from optc.graph.meta import module_paths
from optc.graph.shape import propagate_node
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite
from optc.quant.formats import BFP_BLOCKS, INT4_GROUPS, QuantScheme, unsupported_reason

aten = torch.ops.aten
MODES = ("int8", "int4", "w8a8", "bfp", "none")
AWQ_MODES = ("int8", "int4")
GROUPS = {"int4": sorted(INT4_GROUPS, reverse=True), "bfp": sorted(BFP_BLOCKS, reverse=True)}
BFP_ORDERS = ("weight", "activation", "none")
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "lm_head", "other")

# Role of a linear from its module path: (role, pattern on the path's tail), first match wins.
# Names from the zoo (models/), HF Llama / GPT-2 / BERT / OPT and gpt-fast.
ROLE_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (role, re.compile(r"(^|\.)(" + alts + r")$")) for role, alts in (
        ("q", r"wq|q_proj|query"),
        ("k", r"wk|k_proj|key"),
        ("v", r"wv|v_proj|value"),
        ("qkv", r"c_attn|qkv_proj|query_key_value|wqkv"),
        ("o", r"wo|o_proj|out_proj|attn\.c_proj|attention\.out|attention\.output\.dense"),
        ("gate", r"w1|gate_proj"),
        ("up", r"w3|up_proj|c_fc|fc1|intermediate\.dense"),
        ("down", r"w2|down_proj|mlp\.c_proj|fc2|output\.dense"),
    ))
LM_HEAD_NAMES = frozenset({"lm_head", "output", "embed_out"})


def role_of(module: str, layer: int | None) -> str:
    if layer is None and module.rsplit(".", 1)[-1] in LM_HEAD_NAMES:
        return "lm_head"
    for role, pat in ROLE_PATTERNS:
        if pat.search(module):
            return role
    return "other"


# ---- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerRule:
    """Which linears (all selectors must match; an empty selector matches anything) get which
    scheme. ``roles=()`` matches every role except ``lm_head``: the lm_head is quantized only by
    a rule that names it. In a config the last matching rule wins."""
    mode: str = "int8"                   # int8 | int4 | w8a8 | bfp | none (keep float)
    group_size: int | None = None        # int4: 32/64/128; bfp: block 16/32
    mantissa_bits: int = 8               # bfp
    awq: bool = False                    # int8 / int4 only; needs calibration
    modules: tuple[str, ...] = ()        # fnmatch patterns over the module path
    layers: tuple[int, ...] = ()         # transformer block indices
    roles: tuple[str, ...] = ()          # of ROLES

    def __post_init__(self) -> None:
        for name in ("modules", "layers", "roles"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if self.mode not in MODES:
            raise ConfigError(f"LayerRule.mode={self.mode!r}; accepted: {MODES}")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ConfigError(f"LayerRule.roles: unknown role(s) {bad}; accepted: {ROLES}")
        if self.awq and self.mode not in AWQ_MODES:
            raise ConfigError(f"LayerRule: awq=True needs mode in {AWQ_MODES}, got {self.mode!r}")
        if self.mode != "none":
            self.scheme()                 # QuantScheme validates group_size / mantissa_bits

    def scheme(self) -> QuantScheme | None:
        if self.mode == "none":
            return None
        kw: dict[str, Any] = {"mode": self.mode}
        if self.group_size is not None:
            kw["group_size"] = self.group_size
        if self.mode == "bfp":
            kw["mantissa_bits"] = self.mantissa_bits
        try:
            return QuantScheme(**kw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"LayerRule({self.mode}, group_size={self.group_size}): {e}") from e

    def matches(self, module: str, layer: int | None, role: str) -> bool:
        if self.modules and not any(fnmatch.fnmatchcase(module, p) for p in self.modules):
            return False
        if self.layers and layer not in self.layers:
            return False
        return role in self.roles if self.roles else role != "lm_head"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerRule":
        names = {f.name for f in fields(cls)}
        if set(d) - names:
            raise ConfigError(f"LayerRule: unknown field(s) {sorted(set(d) - names)}; "
                              f"accepted: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class QuantizeWeightsConfig(PassConfig):
    """Per-layer quantization: what the search chooses, logs and replays."""
    VERSION: ClassVar[int] = 1
    rules: tuple[LayerRule, ...] = (LayerRule(),)
    group_fallback: bool = True          # K % group_size != 0: the largest smaller size dividing K
    awq_grid: int = 20                   # α ∈ {0, 1/awq_grid, ..., 1}
    awq_clip: bool = True                # AWQ rules also search a clipping range per group
    fold: bool = True                    # fold AWQ scales / BFP permutations where exact
    bfp_order: str = "weight"            # channel order for BFP: weight / activation magnitude, none

    def __post_init__(self) -> None:
        rules = tuple(LayerRule.from_dict(r) if isinstance(r, dict) else r
                      for r in (self.rules or ()))
        if not all(isinstance(r, LayerRule) for r in rules):
            raise ConfigError("QuantizeWeightsConfig.rules: expected LayerRule or dict entries")
        object.__setattr__(self, "rules", rules)
        super().__post_init__()
        if self.awq_grid < 1:
            raise ConfigError("QuantizeWeightsConfig.awq_grid must be >= 1")
        if self.bfp_order not in BFP_ORDERS:
            raise ConfigError(f"QuantizeWeightsConfig.bfp_order={self.bfp_order!r}; accepted: {BFP_ORDERS}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["rules"] = [r.to_dict() for r in self.rules]
        return d

    @classmethod
    def uniform(cls, mode: str, group_size: int | None = None, *, awq: bool = False,
                lm_head: bool = False, **kw: Any) -> "QuantizeWeightsConfig":
        """One scheme for every linear (and the lm_head when ``lm_head``)."""
        rules = [LayerRule(mode, group_size, awq=awq)]
        if lm_head:
            rules.append(LayerRule(mode, group_size, awq=awq, roles=("lm_head",)))
        return cls(rules=tuple(rules), **kw)

    def rule_for(self, module: str, layer: int | None, role: str) -> LayerRule | None:
        hit = None
        for r in self.rules:
            if r.matches(module, layer, role):
                hit = r
        return hit

    def needs_calibration(self) -> bool:
        return self.enabled and (any(r.awq and r.mode != "none" for r in self.rules)
                                 or (self.bfp_order == "activation"
                                     and any(r.mode == "bfp" for r in self.rules)))


# ---- analysis: which linears, grouped how, folded where ------------------------------------------

@dataclass
class Site:
    node: fx.Node
    module: str
    role: str
    layer: int | None
    weight_param: str
    transposed: bool              # the graph reads the parameter through t(): GPT-2 Conv1D
    bias_param: str | None
    shape: tuple[int, int]        # (N, K)
    scheme: QuantScheme
    awq: bool

    def describe(self) -> list:
        return [self.module, self.weight_param, self.transposed, self.bias_param, list(self.shape),
                self.scheme.to_dict(), self.awq]


@dataclass(frozen=True)
class Unit:
    """Linears transformed together. ``transform``: "awq" (shared input scale), "perm" (BFP
    channel order) or "none"; ``fold``: where the scale / permutation goes — "norm" (1-D
    params divided by s), "rows" (output rows of producing linears: weights and biases),
    "mul" (explicit x * 1/s), "gather" (the BFP op permutes x), "none"."""
    members: tuple[str, ...]      # module paths
    transform: str
    fold: str
    targets: tuple[str, ...] = ()  # param names that absorb the fold

    def describe(self) -> list:
        return [list(self.members), self.transform, self.fold, list(self.targets)]


@dataclass
class Layout:
    sites: list[Site]
    units: list[Unit]
    cfg: QuantizeWeightsConfig

    @property
    def signature(self) -> str:
        """Everything the numbers depend on except the weight values (fingerprinted apart)."""
        return json.dumps({"config": self.cfg.to_dict(), "sites": [s.describe() for s in self.sites],
                           "units": [u.describe() for u in self.units]}, sort_keys=True)

    def site(self, module: str) -> Site:
        return next(s for s in self.sites if s.module == module)


def _param(n: object) -> str | None:
    return n.meta.get("optc_param") if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _weight_of(gm: fx.GraphModule, w: object) -> tuple[fx.Node, bool] | None:
    """(get_attr node, transposed) when ``w`` is a frozen 2-D float parameter (or its t())."""
    transposed = False
    if _is(w, aten.t.default):
        w, transposed = w.args[0], True
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and "optc_param" in w.meta):
        return None
    t = _attr(gm, w)
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        return None
    return w, transposed


def _linear_parts(n: fx.Node) -> tuple[fx.Node, object, object]:
    x, w = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return x, w, b


def _module_of(n: fx.Node, weight_param: str) -> str:
    paths = module_paths(n)
    if paths:
        return paths[-1]
    return weight_param[:-len(".weight")] if weight_param.endswith(".weight") else weight_param


def _fit_group(scheme: QuantScheme, shape: tuple[int, int], fallback: bool
               ) -> tuple[QuantScheme | None, str | None]:
    """The scheme, or one with a smaller group / block size the shape fits, or (None, why)."""
    if unsupported_reason(shape, scheme) is None:
        return scheme, None
    if fallback and scheme.mode in GROUPS:
        for g in GROUPS[scheme.mode]:
            if g < scheme.group_size:
                smaller = QuantScheme.from_dict({**scheme.to_dict(), "group_size": g})
                if unsupported_reason(shape, smaller) is None:
                    return smaller, "group_fallback"
    return None, "unsupported_shape"


def find_sites(gm: fx.GraphModule, cfg: QuantizeWeightsConfig, stats: Counter[str]) -> list[Site]:
    sites = []
    modules_seen: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if not _is(n, aten.linear.default):
            continue
        x, w, b = _linear_parts(n)
        found = _weight_of(gm, w)
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        if found is None:
            stats["skip.weight_not_constant"] += 1
            continue
        if not (isinstance(xv, Tensor) and xv.is_floating_point()):
            stats["skip.not_float"] += 1
            continue
        wnode, transposed = found
        wt = _attr(gm, wnode)
        shape = (wt.shape[1], wt.shape[0]) if transposed else (wt.shape[0], wt.shape[1])
        param = wnode.meta["optc_param"]
        module = _module_of(n, param)
        layer = n.meta.get("optc_layer")
        role = role_of(module, layer)
        rule = cfg.rule_for(module, layer, role)
        if rule is None or rule.mode == "none":
            stats["skip.unselected"] += 1
            continue
        scheme, why = _fit_group(rule.scheme(), shape, cfg.group_fallback)
        if scheme is None:
            stats[f"fallback.{why}"] += 1
            continue
        if why:
            stats[why] += 1
        modules_seen[module] += 1
        sites.append(Site(n, module, role, layer, param, transposed, _param(b), shape, scheme,
                          rule.awq))
    # a module called twice has one quantized weight but call sites that may fold differently:
    # keep its first call, leave the others float (rare: weight sharing inside one graph)
    dup = {m for m, c in modules_seen.items() if c > 1}
    if dup:
        keep = []
        for s in sites:
            if s.module in dup and any(k.module == s.module for k in keep):
                stats["skip.module_called_twice"] += 1
            else:
                keep.append(s)
        sites = keep
    return sites


def _single_use_param(gm: fx.GraphModule, n: object, uses: Counter[str]) -> str | None:
    """The param name of get_attr ``n`` if no other node reads that parameter."""
    p = _param(n)
    if p is None or len(n.users) != 1 or uses[p] != 1:
        return None
    return p


def _norm_targets(gm: fx.GraphModule, x: fx.Node, uses: Counter[str]) -> tuple[str, ...] | None:
    """1-D params that scale (and shift) the channels of ``x`` last: dividing them by s
    divides ``x`` by s exactly."""
    import optc.ops  # noqa: F401 - torch.ops.optc
    ops = torch.ops.optc
    k = x.meta["val"].shape[-1]
    w = b = None
    if _is(x, ops.rms_norm.default):
        w = x.args[1]
    elif _is(x, operator.getitem) and x.args[1] == 1 and _is(x.args[0], ops.add_rms_norm.default):
        w = x.args[0].args[2]
    elif _is(x, operator.getitem) and x.args[1] == 1 and _is(x.args[0], ops.add_layer_norm.default):
        w, b = x.args[0].args[2], x.args[0].args[3]
    elif _is(x, aten.layer_norm.default):
        w = x.args[2] if len(x.args) > 2 else None
        b = x.args[3] if len(x.args) > 3 else None
    elif _is(x, aten.rms_norm.default):
        w = x.args[2] if len(x.args) > 2 else None
    elif _is(x, aten.mul.Tensor):          # HF RMSNorm's last step: weight * normed
        for c in x.args:
            cv = c.meta.get("val") if isinstance(c, fx.Node) else None
            if _param(c) and isinstance(cv, Tensor) and cv.dim() == 1 and cv.shape[0] == k:
                w = c
    out = []
    for p in (w, b):
        if p is None:
            continue
        name = _single_use_param(gm, p, uses)
        pv = p.meta.get("val") if isinstance(p, fx.Node) else None
        if name is None or not isinstance(pv, Tensor) or pv.dim() != 1 or pv.shape[0] != k:
            return None
        out.append(name)
    return tuple(out) or None


def _linear_rows(gm: fx.GraphModule, n: fx.Node, uses: Counter[str]) -> tuple[str, ...] | None:
    """Weight (and bias) params of linear ``n`` if their output rows can absorb a fold."""
    if not _is(n, aten.linear.default):
        return None
    _, w, b = _linear_parts(n)
    found = _weight_of(gm, w)
    if found is None:
        return None
    wp = _single_use_param(gm, found[0], uses)
    bp = _single_use_param(gm, b, uses) if b is not None else ""
    if wp is None or bp is None:
        return None
    return (wp, bp) if bp else (wp,)


def _scale_rows_targets(gm: fx.GraphModule, x: fx.Node, uses: Counter[str]) -> tuple[str, ...] | None:
    """``x`` = linear(...) or ``x`` = a * linear(...): scaling that linear's rows scales x."""
    direct = _linear_rows(gm, x, uses)
    if direct is not None:
        return direct
    if _is(x, aten.mul.Tensor) and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args):
        for a in x.args:
            if len(a.users) == 1 and a.meta["val"].shape == x.meta["val"].shape:
                found = _linear_rows(gm, a, uses)
                if found is not None:
                    return found
    return None


_ELEMENTWISE = frozenset({aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.silu.default,
                          aten.gelu.default, aten.relu.default, aten.neg.default,
                          aten.sigmoid.default, aten.tanh.default})


def _perm_rows_targets(gm: fx.GraphModule, x: fx.Node, uses: Counter[str]) -> tuple[str, ...] | None:
    """``x`` an elementwise function of linears read nowhere else: permuting every such
    linear's output rows permutes the channels of ``x``."""
    shape = x.meta["val"].shape
    targets: list[str] = []
    todo, seen = [x], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not x and len(n.users) != 1:
            return None
        rows = _linear_rows(gm, n, uses)
        if rows is not None:
            targets += rows
            continue
        if not _is(n, *_ELEMENTWISE) or n.kwargs.get("alpha", 1) != 1:
            return None
        for a in n.args:
            if isinstance(a, fx.Node):
                if a.meta.get("val") is None or a.meta["val"].shape != shape:
                    return None
                todo.append(a)
        if len(seen) > 16:
            return None
    return tuple(targets) or None


def analyze(gm: fx.GraphModule, cfg: QuantizeWeightsConfig, stats: Counter[str]) -> Layout:
    sites = find_sites(gm, cfg, stats)
    uses: Counter[str] = Counter(n.meta["optc_param"] for n in gm.graph.nodes
                                 if n.op == "get_attr" and "optc_param" in n.meta)
    by_x: dict[fx.Node, list[Site]] = {}
    for s in sites:
        by_x.setdefault(s.node.args[0], []).append(s)
    units: list[Unit] = []
    for x, group in by_x.items():
        awq = [s for s in group if s.awq]
        perm = [s for s in group if s.scheme.mode == "bfp" and cfg.bfp_order != "none"]
        if awq:
            # folding divides x itself: only when every reader of x is one of these linears
            foldable = cfg.fold and set(x.users) == {s.node for s in awq}
            fold, targets = "mul", None
            if foldable and (targets := _norm_targets(gm, x, uses)) is not None:
                fold = "norm"
            elif foldable and (targets := _scale_rows_targets(gm, x, uses)) is not None:
                fold = "rows"
            units.append(Unit(tuple(s.module for s in awq), "awq", fold, targets or ()))
        for s in perm:
            targets = _perm_rows_targets(gm, x, uses) if cfg.fold and set(x.users) == {s.node} else None
            units.append(Unit((s.module,), "perm", "gather" if targets is None else "rows",
                              targets or ()))
        for s in group:
            if s not in awq and s not in perm:
                units.append(Unit((s.module,), "none", "none"))
    return Layout(sites, units, cfg)


# ---- numerics: the plan ---------------------------------------------------------------------------

@dataclass
class QuantPlan:
    """The numbers of one layout: what a saved quantization holds."""
    signature: str
    weights: dict[str, Any] = field(default_factory=dict)        # module -> QuantizedWeight
    act_scales: dict[int, Tensor] = field(default_factory=dict)  # unit index -> (K,) multiplier of x
    replaced: dict[str, Tensor] = field(default_factory=dict)    # param -> folded value (own layout/dtype)
    skipped: dict[str, str] = field(default_factory=dict)        # module -> why quantize() refused
    awq: dict[int, dict[str, float]] = field(default_factory=dict)  # unit index -> alpha, errors
    fingerprints: dict[str, str] = field(default_factory=dict)   # param -> fingerprint of the original


def _originals(gm: fx.GraphModule) -> dict[str, Tensor]:
    return {n.meta["optc_param"]: _attr(gm, n) for n in gm.graph.nodes
            if n.op == "get_attr" and "optc_param" in n.meta}


def _only_site_reads(gm: fx.GraphModule, layout: Layout) -> set[str]:
    """Params read by nothing but the layout's linears (directly or through their t()): once
    those are quantized the graph no longer reads them."""
    sites = {s.node for s in layout.sites}
    out = set()
    for n in gm.graph.nodes:
        if n.op != "get_attr" or "optc_param" not in n.meta or not n.users:
            continue
        if all(u in sites or (_is(u, aten.t.default) and u.users and set(u.users) <= sites)
               for u in n.users):
            out.add(n.meta["optc_param"])
    return out


@torch.no_grad()
def compute_plan(gm: fx.GraphModule, layout: Layout, calibration: Any | None, *,
                 offload_dir: Any = None, stats: Counter[str] | None = None) -> QuantPlan:
    """The quantized weights, folds and fingerprints of ``layout``. With ``offload_dir``
    each float weight only the quantized linears read is offloaded (``optc.quant.offload``)
    as soon as its last linear is quantized, so the compile's peak does not hold every float
    weight beside every quantized one; ``stats`` gets the offload counts."""
    from optc.quant import awq as awq_search
    from optc.quant.formats import quantize
    from optc.quant.offload import offload
    from optc.quant.reorder import outlier_perm, weight_magnitude
    from optc.quant.serialize import fingerprint

    orig = _originals(gm)
    movable = _only_site_reads(gm, layout) if offload_dir is not None else set()
    transposed = {s.weight_param for s in layout.sites if s.transposed}
    # param -> fp32 value in logical layout (rows = output channels). Never written in place
    # (folds build new tensors), so an fp32 parameter is used as it is, without a copy.
    cur: dict[str, Tensor] = {}

    def get(p: str) -> Tensor:
        if p not in cur:
            t = orig[p].detach()
            cur[p] = (t.t() if p in transposed else t).float().contiguous()
        return cur[p]

    plan = QuantPlan(layout.signature)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    in_scale: dict[str, Tensor] = {}
    clip_rows: dict[str, Tensor] = {}    # module -> calibration rows (scaled) for the clip search
    col_perm: dict[str, tuple[Tensor, bool]] = {}    # module -> (perm, folded)
    # later consumers first: their folds change the rows of earlier linears before those are
    # searched and quantized
    idx = sorted(range(len(layout.units)), key=lambda i: -order[layout.site(layout.units[i].members[0]).node])
    for i in idx:
        u = layout.units[i]
        members = [layout.site(m) for m in u.members]
        if u.transform == "awq":
            st = calibration.stats.get(members[0].module) if calibration is not None else None
            if st is None:
                raise ConfigError(
                    f"AWQ for {members[0].module}: no calibration statistics for this module "
                    "(was it run by the calibration batches?); pass calibration=... to optc.compile")
            res = awq_search.search([get(s.weight_param) for s in members], [s.scheme for s in members],
                                    st.rows, st.abs_mean, grid=layout.cfg.awq_grid)
            plan.awq[i] = {"alpha": res.alpha, "rtn_error": res.rtn_error, "error": res.error}
            for s in members:
                in_scale[s.module] = res.scale
                if layout.cfg.awq_clip:
                    clip_rows[s.module] = st.rows / res.scale
            for p in u.targets:
                v = get(p)
                cur[p] = v / (res.scale[:, None] if v.dim() == 2 else res.scale)
            if u.fold == "mul":
                xdt = members[0].node.args[0].meta["val"].dtype
                plan.act_scales[i] = (1.0 / res.scale).to(xdt)
        elif u.transform == "perm":
            s = members[0]
            st = calibration.stats.get(s.module) if calibration is not None else None
            use_act = layout.cfg.bfp_order == "activation" and st is not None
            perm = outlier_perm(st.abs_max if use_act else weight_magnitude(get(s.weight_param)))
            col_perm[s.module] = (perm, u.fold == "rows")
            for p in u.targets:
                cur[p] = get(p)[perm]
    # each site's fp32 copy is dropped once its last site is quantized: the copies of a whole
    # bf16 model would otherwise be alive together (4.4 GB on the TinyLlama-1.1B shape)
    uses = Counter(s.weight_param for s in layout.sites)
    for s in layout.sites:
        w = get(s.weight_param)
        uses[s.weight_param] -= 1
        perm, folded = col_perm.get(s.module, (None, False))
        scale = in_scale.get(s.module)
        try:
            if s.module in clip_rows:     # clipping works on the scaled weight: pass it scaled
                wq = awq_search.search_clip(w * scale, s.scheme, clip_rows[s.module])
                plan.weights[s.module] = quantize(wq, s.scheme)
            elif folded:
                plan.weights[s.module] = quantize(w[:, perm], s.scheme, in_scale=scale)
            else:
                plan.weights[s.module] = quantize(w, s.scheme, in_scale=scale, perm=perm)
        except (ValueError, NotImplementedError) as e:
            # stays float, still consistent with whatever its input now is
            plan.skipped[s.module] = f"{type(e).__name__}: {e}"
            w = w * scale if scale is not None else w
            cur[s.weight_param] = w[:, perm] if folded else w
        else:
            if uses[s.weight_param] == 0 and not any(
                    o.weight_param == s.weight_param and o.module in plan.skipped
                    for o in layout.sites):
                cur.pop(s.weight_param, None)     # quantized: its float value is not needed
                if s.weight_param in movable:     # fingerprint first: then it is on disk
                    t = orig[s.weight_param]
                    plan.fingerprints[s.weight_param] = fingerprint(t)
                    got = offload([t], offload_dir)     # keeps the remembered fingerprint
                    if stats is not None:
                        stats.update(got)
            del w
    site_weights = {s.weight_param for s in layout.sites if s.module not in plan.skipped}
    for p, v in cur.items():
        if p in site_weights:
            continue
        if not torch.equal(v, (orig[p].t() if p in transposed else orig[p]).float()):
            v = v.t() if p in transposed else v
            plan.replaced[p] = v.to(orig[p].dtype).contiguous()
    for p in {s.weight_param for s in layout.sites} | {t for u in layout.units for t in u.targets} \
            | {s.bias_param for s in layout.sites if s.bias_param}:
        if p not in plan.fingerprints:
            plan.fingerprints[p] = fingerprint(orig[p])
    return plan


# ---- rewrite ----------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _constant(gm: fx.GraphModule, before: fx.Node, attr: str, t: Tensor, label: str) -> fx.Node:
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, t, persistent=False)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        ga = gm.graph.get_attr(attr)
    ga.meta["optc_param"] = label
    ga.meta["optc_layer"] = before.meta.get("optc_layer")
    propagate_node(ga)
    return ga


def _components(layout: Layout) -> list[list[int]]:
    """Units that must be applied together: a unit folding into the rows of a linear that
    another unit quantizes needs that unit's (folded) weights. One bisection step each."""
    owner = {layout.site(m).weight_param: i for i, u in enumerate(layout.units) for m in u.members}
    parent = list(range(len(layout.units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, u in enumerate(layout.units):
        for t in u.targets:
            if t in owner:
                parent[find(i)] = find(owner[t])
    comps: dict[int, list[int]] = {}
    for i in range(len(layout.units)):
        comps.setdefault(find(i), []).append(i)
    return list(comps.values())


def apply_plan(gm: fx.GraphModule, layout: Layout, plan: QuantPlan, stats: Counter[str]) -> bool:
    from optc.quant.formats import linear_call
    g = gm.graph
    getattrs = {n.meta["optc_param"]: n for n in g.nodes if n.op == "get_attr" and "optc_param" in n.meta}
    modified = False
    for comp in _components(layout):
        if not take_rewrite():
            stats["skip.bisect"] += sum(len(layout.units[i].members) for i in comp)
            continue
        modified = True
        for i in comp:
            u = layout.units[i]
            members = [layout.site(m) for m in u.members]
            owned = set(u.targets) | {s.weight_param for s in members} | \
                {s.bias_param for s in members if s.bias_param}
            for p in owned:
                if p in plan.replaced:
                    ga = getattrs[p]
                    new = _constant(gm, ga, "quant_fold_" + _safe(p), plan.replaced[p], p + "@folded")
                    ga.replace_all_uses_with(new)
            x = members[0].node.args[0]
            if i in plan.act_scales:
                s = _constant(gm, x, "quant_scale_" + _safe(members[0].module), plan.act_scales[i],
                              members[0].module + ".awq_inv_scale")
                with g.inserting_before(members[0].node):
                    x = g.call_function(aten.mul.Tensor, (x, s))
                x.meta.update(nn_module_stack=members[0].node.meta.get("nn_module_stack", {}),
                              optc_layer=members[0].node.meta.get("optc_layer"),
                              optc_pass="quantize_weights")
                propagate_node(x)
            for s in members:
                if s.module in plan.skipped:
                    stats["fallback.format_error"] += 1
                    continue
                _rewrite_linear(gm, s, x, plan.weights[s.module], linear_call)
                stats[f"quantized.{s.scheme.mode}"] += 1
            if u.transform == "awq":
                stats[f"awq.{u.fold}"] += len(members)
            elif u.transform == "perm":
                stats[f"bfp_perm.{u.fold}"] += 1
    return modified


def _rewrite_linear(gm: fx.GraphModule, s: Site, x: fx.Node, q: Any, linear_call: Any) -> None:
    g = gm.graph
    n = s.node
    _, _, b = _linear_parts(n)
    bias_t = _attr(gm, b) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    op, names, trailing = linear_call(q, bias_t)
    consts = [_constant(gm, n, f"quant_{_safe(s.module)}_{name}", q.tensors[name], f"{s.module}.{name}")
              for name in names]
    with g.inserting_before(n):
        new = g.call_function(op, (x, *consts, b, *trailing))
    new.meta.update(nn_module_stack=n.meta.get("nn_module_stack", {}), optc_layer=n.meta.get("optc_layer"),
                    optc_pass="quantize_weights", optc_origin=(n.name,))
    propagate_node(new)
    n.replace_all_uses_with(new)
    g.erase_node(n)


def run(gm: fx.GraphModule, cfg: QuantizeWeightsConfig) -> PassResult:
    stats: Counter[str] = Counter()
    layout = analyze(gm, cfg, stats)
    if not layout.sites:
        return PassResult(gm, False, stats)
    store = gm.meta.get("optc_quant")
    plan = store.lookup(gm, layout) if store is not None else None
    computed = plan is None
    if computed:
        calibration = store.calibration if store is not None else None
        if calibration is None and any(u.transform == "awq" for u in layout.units):
            raise ConfigError("quantize_weights: AWQ rules need calibration data: pass "
                              "optc.compile(model, config=..., calibration=[batch, ...]) with model "
                              "inputs (e.g. token-id batches of the training split), or use RTN rules")
        offload_dir = store.offload_dir if store is not None else None
        plan = compute_plan(gm, layout, calibration, offload_dir=offload_dir, stats=stats)
        if store is not None:
            store.add(plan)
    orig = _originals(gm)
    modified = apply_plan(gm, layout, plan, stats)
    if modified:
        g = gm.graph
        g.eliminate_dead_code()
        if store is not None and store.offload_dir is not None and not computed:
            # a plan found in the store (another graph's, or a saved one): its weights may
            # still be in RAM (loaded), else this counts them as already offloaded
            stats.update(_offload_replaced(gm, layout, plan, orig, store.offload_dir))
    return PassResult(gm, modified, stats)


def _offload_replaced(gm: fx.GraphModule, layout: Layout, plan: QuantPlan,
                      orig: dict[str, Tensor], directory: Any) -> Counter[str]:
    """``optc.quant.offload`` of the float weights this graph no longer reads: those of the
    linears it quantized, unless a live node still reads the same parameter (a tied
    embedding), so no compiled call ever pages a weight in from disk."""
    from optc.quant.offload import offload
    live = {n.meta["optc_param"] for n in gm.graph.nodes
            if n.op == "get_attr" and "optc_param" in n.meta and n.users}
    names = sorted({s.weight_param for s in layout.sites
                    if s.module in plan.weights and s.weight_param not in live
                    and s.weight_param in orig})
    # the lookup that found the plan fingerprinted them: offload keeps that remembered
    return offload([orig[p] for p in names], directory)


PASS = PassInfo(
    name="quantize_weights", run=run, config_cls=QuantizeWeightsConfig,
    summary="linear layers -> int8 / int4 (RTN or AWQ) / W8A8 / BFP quantized optc ops, per layer",
    source="AWQ (Lin et al. 2023); Accurate Block Quantization in LLMs with Outliers (2024)",
    lossless=False,
    after=("remove_noops", "fuse_add_norm"),
)

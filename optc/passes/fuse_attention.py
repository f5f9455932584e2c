"""fuse_attention — every spelling of attention becomes one ``optc::attention``.

**Rewrites** (rules, each with a statistic; a fused node records the rules that built it in
``meta["optc_attention_rules"]``, which ``optc inspect`` prints per attention):
  entry (one per fused attention):
    sdpa    aten.scaled_dot_product_attention(q, k, v, mask?, 0.0, is_causal, scale?, enable_gqa?)
            -> optc.attention(q, k, v, mask, causal, scale, kv_group)
    eager   matmul(softmax(S(matmul(q, kT)), -1), v) -> optc.attention(q, k, v, ...), where S is
            a chain of the score steps below and P = softmax(...) may pass the prob steps
  score steps (any number, any order, masks before scales only):
    scale_mul / scale_div   S * c, S / c for a Python scalar c: on the scores, on q or on kT
    mask_add      S + m, m a float mask that broadcasts to S (HF's where(m, 0, finfo.min),
                  -inf masks, ALiBi-style biases)
    mask_fill     S.masked_fill(m, fill), fill <= -65504 (-inf, finfo.min, -1e9): bool mask ~m
    causal_tril   the same with m built in the graph as (tril(ones(Tq, Tk)) == 0), ~tril(...) or
                  triu(ones(Tq, Tk), 1): causal=True, no mask tensor
    upcast        S.float() before the softmax (HF's fp32 softmax of half-precision scores)
  prob steps:
    softmax_dtype softmax(S, -1, dtype=float32) (HF Llama/OPT eager)
    softmax_cast  P.to(v.dtype) after it
    dropout_noop  dropout(P, p=0 | train=False) (HF eager attention with attn_dropout in eval)
  K/V (both entries):
    repeat_kv          reshape(expand(unsqueeze(x, 2), [B, H_kv, g, T, D]), [B, H_kv*g, T, D])
                       -> x with kv_group = g (HF ``repeat_kv``: Llama GQA; identity slices
                       of ``x[:, :, None]`` in between are looked through)
    repeat_interleave  repeat_interleave(x, g, dim=1) -> x with kv_group = g (gpt-fast, zoo Llama)
    k_view             k = kT.transpose(-2, -1) when kT is not itself a transpose (a view)
**Source**: FlashAttention (Dao et al. 2022: IO-aware exact attention, tiling, linear memory)
  and FlashAttention-2 (Dao 2023: ~2x, better work partitioning) for the kernel; the patterns
  come from HF GPT-2 / BERT / OPT / Llama eager attention (``attn_implementation="eager"``),
  nanoGPT's masked_fill(tril) attention, and SDPA calls of HF's sdpa attention and gpt-fast.
**Requires**: canonical graph (after ``remove_noops``, which drops eval dropout and identity
  casts; the rules accept those too).
**Ensures**: the same function up to fp32 reassociation (the op's contract, see
  ``optc/ops/attention.py``); a repeated K/V is no longer read by the attention. Must not
  fire (statistic ``skipped.<why>``): softmax over another dim, scores or probabilities used
  elsewhere (returned attention weights), a mask that would broadcast the scores to a larger
  shape, dropout with p > 0 in training (or any SDPA dropout_p > 0), scale after the mask,
  two tensor masks, mixed dtypes, non-4-D operands. Statistic ``unfused_left``: attention
  patterns (matmul of a softmax, SDPA calls) still in the graph afterwards.
**Order**: after remove_noops.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from optc.config import PassConfig
from optc.graph.match import val as _val, is_call as _is
from optc.graph.shape import propagate_node, same_shape
from optc.passes.base import PassInfo, PassResult
from optc.passes.manager import take_rewrite
from optc.passes.remove_noops import _arg  # an argument by schema name, positional or keyword

aten = torch.ops.aten
_TO = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default})
_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
_FILL_MAX = -65504.0   # fp16's most negative: exp(fill - max) is exactly 0 for real scores


@dataclass(frozen=True)
class FuseAttentionConfig(PassConfig):
    VERSION = 1
    sdpa: bool = True          # rule "sdpa"
    eager: bool = True         # rule "eager" (hand-written and HF eager attention)
    unrepeat_kv: bool = True   # rules "repeat_kv" / "repeat_interleave"


class Skip(Exception):
    """An attention-shaped chain that a guard rejects; the message is the statistic's name."""


@dataclass
class Match:
    anchor: fx.Node                  # the node the fused op replaces
    q: fx.Node
    k: fx.Node                       # (B, H_kv, Tk, D), or kT when k_view
    v: fx.Node
    mask: fx.Node | None = None
    mask_not: bool = False           # mask is "masked" (True = drop): pass logical_not(mask)
    causal: bool = False
    scale: float = 1.0
    kv_group: int = 1
    k_view: bool = False             # k is kT: emit kT.transpose(-2, -1)
    rules: list[str] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)   # interior nodes (kernel header)


# ---- helpers ---------------------------------------------------------------------------------


def _scalar(c: object) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _t4(n: object) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dim() == 4


def _only_user(n: fx.Node, user: fx.Node) -> None:
    if len(n.users) != 1 or user not in n.users:
        raise Skip("shared_intermediate")


def _int(s: object) -> int | None:
    """A size as a Python int, or None when it is symbolic (``int()`` of a SymInt would
    specialize it to its hint: a scale or group baked from one example shape)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int
    return int(s) if isinstance(s, int) or is_concrete_int(s) else None


def _dim_is(dim: object, ndim: int, want: int) -> bool:
    return isinstance(dim, int) and dim % ndim == want


# ---- K/V: undo the GQA repeat ----------------------------------------------------------------

def _full_slices(x: object) -> object:
    """Strip identity slices (``x[:, :, None]`` leaves ``slice(x, d, 0, INT_MAX)`` behind)."""
    while _is(x, aten.slice.Tensor) and same_shape(list(_val(x).shape), list(_val(x.args[0]).shape)) \
            and (x.args[4] if len(x.args) > 4 else 1) == 1:
        x = x.args[0]
    return x


def _unrepeat(x: fx.Node) -> tuple[fx.Node, int, str] | None:
    """(un-repeated x, group, rule) if x repeats each K/V head g times along dim 1."""
    if _is(x, aten.repeat_interleave.self_int):
        reps = x.args[1]
        dim = _arg(x, "dim")
        if isinstance(reps, int) and reps > 1 and _t4(x.args[0]) and _dim_is(dim, 4, 1):
            return x.args[0], reps, "repeat_interleave"
        return None
    if not _is(x, *_VIEWS) or not _is(x.args[0], aten.expand.default):
        return None
    exp = x.args[0]
    uns = _full_slices(exp.args[0])
    if not (_is(uns, aten.unsqueeze.default) and _dim_is(uns.args[1], 5, 2) and _t4(uns.args[0])):
        return None
    src = _full_slices(uns.args[0])
    base = _val(src)
    ev, xv = _val(exp), _val(x)
    group = _int(ev.shape[2])
    if group is None or group < 2:
        return None
    B, hkv, T, D = base.shape
    if not (same_shape(list(ev.shape), [B, hkv, ev.shape[2], T, D])
            and same_shape(list(xv.shape), [B, hkv * group, T, D])):
        return None
    return src, group, "repeat_kv"


def _unrepeat_kv(m: Match) -> None:
    ku, vu = _unrepeat(m.k) if not m.k_view else None, _unrepeat(m.v)
    if ku is None or vu is None or ku[1] != vu[1]:
        return                         # keep both repeated: still correct, just not saved
    m.nodes += [m.k, m.v]
    m.k, m.v = ku[0], vu[0]
    m.kv_group *= ku[1]
    m.rules.append(ku[2])


# ---- entry: SDPA -----------------------------------------------------------------------------

def match_sdpa(n: fx.Node) -> Match:
    """aten.scaled_dot_product_attention -> Match (Skip if a guard rejects it)."""
    q, k, v = n.args[:3]
    mask = _arg(n, "attn_mask")
    if _arg(n, "dropout_p", 0.0) != 0:
        raise Skip("dropout_train")    # SDPA applies dropout_p whatever the module's mode
    if not (_t4(q) and _t4(k) and _t4(v)):
        raise Skip("rank")
    qv, kv = _val(q), _val(k)
    if len({_val(t).dtype for t in (q, k, v)}) != 1:
        raise Skip("dtype")
    scale = _arg(n, "scale")
    if scale is None:
        d = _int(qv.shape[-1])
        if d is None:
            raise Skip("symbolic_head_dim")
        scale = 1.0 / math.sqrt(d)
    group = 1
    if _arg(n, "enable_gqa", False):
        hq, hk = _int(qv.shape[1]), _int(kv.shape[1])
        if hq is None or hk is None or hq % hk:
            raise Skip("gqa_heads")
        group = hq // hk
    m = Match(n, q, k, v, mask=mask if isinstance(mask, fx.Node) else None,
              causal=bool(_arg(n, "is_causal", False)), scale=float(scale), kv_group=group,
              rules=["sdpa"])
    return m


# ---- entry: eager (matmul -> scale -> mask -> softmax -> matmul) -----------------------------

def _prob_steps(p: fx.Node, m: Match) -> fx.Node:
    """Peel dropout / casts between softmax and the second matmul; return the softmax."""
    user = m.anchor
    while True:
        if _is(p, aten.dropout.default):
            if _arg(p, "p", 0.5) != 0 and _arg(p, "train", True):
                raise Skip("dropout_train")
            m.rules.append("dropout_noop")
        elif _is(p, *_TO) and _is(p.args[0], aten.softmax.int):
            m.rules.append("softmax_cast")
        else:
            break
        _only_user(p, user)
        m.nodes.append(p)
        user, p = p, p.args[0]
    _only_user(p, user)
    return p


def _mask_side(n: fx.Node) -> tuple[fx.Node, object]:
    """(scores, mask) of ``add(scores, mask)``: the scores side is the one leading to q @ kT."""
    a, b = n.args[:2]
    if _leads_to_qk(a):
        return a, b
    if _leads_to_qk(b):
        return b, a
    raise Skip("no_qk")


def _leads_to_qk(x: object, depth: int = 8) -> bool:
    for _ in range(depth):
        if _is(x, aten.matmul.default):
            return True
        if not _is(x, aten.mul.Tensor, aten.div.Tensor, aten.masked_fill.Scalar, *_TO):
            if _is(x, aten.add.Tensor):
                return _leads_to_qk(x.args[0], depth - 1) or _leads_to_qk(x.args[1], depth - 1)
            return False
        x = x.args[0]
    return False


def _is_causal_tril(mask: object, tq: object, tk: object) -> bool:
    """Is ``mask`` (True = drop) the strict upper triangle of (tq, tk), built in the graph?"""
    while _is(mask, aten.unsqueeze.default, *_VIEWS):
        mask = mask.args[0]
    if _is(mask, aten.triu.default):
        ones, diag = mask.args[0], mask.args[1] if len(mask.args) > 1 else 0
        if diag != 1:
            return False
    elif _is(mask, aten.eq.Scalar) and mask.args[1] == 0 or \
            _is(mask, aten.logical_not.default, aten.bitwise_not.default):
        tril = mask.args[0]
        if not _is(tril, aten.tril.default) or (tril.args[1] if len(tril.args) > 1 else 0) != 0:
            return False
        ones = tril.args[0]
    else:
        return False
    if not _is(ones, aten.ones.default):
        return False
    return same_shape(list(_val(ones).shape), [tq, tk])


def _score_steps(s: fx.Node, m: Match) -> fx.Node:
    """Peel scale and mask steps off the softmax input; return the q @ kT matmul."""
    user = s   # s is the softmax here; its input starts the chain
    s = s.args[0]
    scaled = False
    while True:
        _only_user(s, user)
        if _is(s, aten.matmul.default):
            return s
        if _is(s, aten.mul.Tensor, aten.div.Tensor) and _scalar(s.args[1]):
            c = float(s.args[1])
            m.scale = m.scale * c if s.target is aten.mul.Tensor else m.scale / c
            m.rules.append("scale_mul" if s.target is aten.mul.Tensor else "scale_div")
            scaled = True
            nxt = s.args[0]
        elif _is(s, aten.mul.Tensor) and _scalar(s.args[0]):
            m.scale *= float(s.args[0])
            m.rules.append("scale_mul")
            scaled = True
            nxt = s.args[1]
        elif _is(s, aten.add.Tensor) and s.kwargs.get("alpha", 1) == 1 and len(s.args) == 2:
            nxt, mask = _mask_side(s)
            if scaled:
                raise Skip("scale_after_mask")
            mv = _val(mask)
            if not (isinstance(mv, torch.Tensor) and mv.is_floating_point()):
                raise Skip("mask_dtype")
            if not same_shape(list(_val(s).shape), list(_val(nxt).shape)):
                raise Skip("mask_shape")      # the mask broadcasts the scores to a larger shape
            if m.mask is not None:
                raise Skip("two_masks")
            m.mask = mask
            m.rules.append("mask_add")
        elif _is(s, aten.masked_fill.Scalar):
            nxt, mask, fill = s.args[:3]
            if scaled:
                raise Skip("scale_after_mask")
            if not (_scalar(fill) and float(fill) <= _FILL_MAX):
                raise Skip("mask_fill_value")
            if not same_shape(list(_val(s).shape), list(_val(nxt).shape)):
                raise Skip("mask_shape")
            sv = _val(nxt)
            if _is_causal_tril(mask, sv.shape[2], sv.shape[3]):
                m.causal = True
                m.rules.append("causal_tril")
            else:
                if m.mask is not None:
                    raise Skip("two_masks")
                m.mask, m.mask_not = mask, True
                m.rules.append("mask_fill")
        elif _is(s, *_TO) and _val(s).dtype == torch.float32:
            m.rules.append("upcast")
            nxt = s.args[0]
        else:
            raise Skip("score_op")
        m.nodes.append(s)
        user, s = s, nxt


def _operand(x: fx.Node, user: fx.Node, m: Match) -> fx.Node:
    """Peel a scalar scale off an operand of q @ kT (OPT-style pre-scaled q stays as it is:
    its scale sits behind views)."""
    if _is(x, aten.mul.Tensor, aten.div.Tensor) and _scalar(x.args[1]) and len(x.users) == 1:
        c = float(x.args[1])
        m.scale = m.scale * c if x.target is aten.mul.Tensor else m.scale / c
        m.rules.append("scale_mul" if x.target is aten.mul.Tensor else "scale_div")
        m.nodes.append(x)
        return x.args[0]
    return x


def _k_of(kt: fx.Node) -> tuple[fx.Node, bool]:
    """(k, False) if kT is k.transpose(-2, -1), else (kT, True): k is then emitted as a view."""
    if _is(kt, aten.transpose.int) and sorted(d % 4 for d in kt.args[1:3]) == [2, 3] \
            and _t4(kt.args[0]):
        return kt.args[0], False
    return kt, True


def match_eager(pv: fx.Node) -> Match | None:
    """matmul(P, v) -> Match; None when it is no attention at all; Skip on a guard."""
    p, v = pv.args[:2]
    if not (_t4(pv) and _t4(p) and _t4(v)):
        return None
    m = Match(pv, q=pv, k=pv, v=v, rules=["eager"])
    probe = p
    while _is(probe, aten.dropout.default, *_TO):
        probe = probe.args[0]
    if not _is(probe, aten.softmax.int):
        return None
    sm = _prob_steps(p, m)
    if not _dim_is(sm.args[1], 4, 3):
        raise Skip("softmax_dim")
    sm_dtype = sm.args[2] if len(sm.args) > 2 else sm.kwargs.get("dtype")
    if sm_dtype is not None and sm_dtype != _val(sm.args[0]).dtype:
        if sm_dtype != torch.float32:
            raise Skip("dtype")
        m.rules.append("softmax_dtype")
    m.nodes.append(sm)
    qk = _score_steps(sm, m)
    m.nodes.append(qk)
    q, kt = qk.args[:2]
    if not (_t4(q) and _t4(kt)):
        raise Skip("rank")
    m.q = _operand(q, qk, m)
    m.k, m.k_view = _k_of(_operand(kt, qk, m))
    qv, vv, ov = _val(m.q), _val(v), _val(pv)
    if not (qv.dtype == _val(m.k).dtype == vv.dtype == ov.dtype):
        raise Skip("dtype")
    kv = _val(m.k)
    kshape = [kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[2]] if m.k_view else list(kv.shape)
    B, H, tq, D = qv.shape
    if not (same_shape(kshape[:2] + [kshape[3]], [B, H, D]) and same_shape(list(vv.shape[:3]),
            [B, H, kshape[2]]) and same_shape(list(ov.shape), [B, H, tq, vv.shape[3]])):
        raise Skip("broadcast_batch")   # matmul broadcasting q against k/v: not one attention
    m.nodes.reverse()
    return m


# ---- rewrite ---------------------------------------------------------------------------------

def _emit(g: fx.Graph, before: fx.Node, target: object, args: tuple, like: fx.Node) -> fx.Node:
    with g.inserting_before(before):
        n = g.call_function(target, args)
    n.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    n.meta["optc_layer"] = like.meta.get("optc_layer")
    propagate_node(n)
    return n


def _rewrite(g: fx.Graph, m: Match) -> fx.Node:
    import optc.ops  # noqa: F401 - registers torch.ops.optc.*
    a = m.anchor
    k = _emit(g, a, aten.transpose.int, (m.k, -2, -1), a) if m.k_view else m.k
    if m.k_view:
        m.rules.append("k_view")
    mask = _emit(g, a, aten.logical_not.default, (m.mask,), a) if m.mask_not else m.mask
    new = _emit(g, a, torch.ops.optc.attention.default,
                (m.q, k, m.v, mask, m.causal, m.scale, m.kv_group), a)
    new.meta["optc_pass"] = "fuse_attention"
    order = {n: i for i, n in enumerate(g.nodes)}
    new.meta["optc_origin"] = tuple(n.name for n in sorted({*m.nodes, a}, key=order.__getitem__))
    new.meta["optc_attention_rules"] = tuple(m.rules)
    a.replace_all_uses_with(new)
    for u in list(new.users):
        _fit_layout(g, new, u)
    # erased here, not left to DCE: SDPA and dropout are "random" ops FX's DCE keeps
    for n in [a, *reversed(m.nodes)]:
        if not n.users:
            g.erase_node(n)
    return new


def _fit_layout(g: fx.Graph, new: fx.Node, user: fx.Node) -> None:
    """The op's output has q's layout, the replaced node's may have differed: a user whose
    fake value no longer propagates (a view needing other strides) reads a contiguous copy."""
    if user.op != "call_function":
        return
    try:
        propagate_node(user)
    except (RuntimeError, ValueError):     # fake view/reshape errors come as either
        c = _emit(g, user, aten.contiguous.default, (new,), new)
        user.replace_input_with(new, c)
        propagate_node(user)


def unfused_attention_patterns(gm: fx.GraphModule) -> int:
    """Attention patterns left in ``gm``: SDPA calls and matmuls reading a softmax."""
    left = 0
    for n in gm.graph.nodes:
        if _is(n, aten.scaled_dot_product_attention.default):
            left += 1
        elif _is(n, aten.matmul.default, aten.bmm.default):
            p = n.args[0]
            while _is(p, aten.dropout.default, *_TO):
                p = p.args[0]
            left += _is(p, aten.softmax.int, aten._softmax.default)
    return left


def run(gm: fx.GraphModule, cfg: FuseAttentionConfig) -> PassResult:
    stats: Counter[str] = Counter()
    g = gm.graph
    fused = 0
    for n in list(g.nodes):
        if n.op != "call_function" or not n.users:
            continue
        try:
            if n.target is aten.scaled_dot_product_attention.default and cfg.sdpa:
                m = match_sdpa(n)
            elif n.target is aten.matmul.default and cfg.eager:
                m = match_eager(n)
            else:
                continue
        except Skip as why:
            stats[f"skipped.{why}"] += 1
            continue
        if m is None or not take_rewrite():
            continue
        if cfg.unrepeat_kv:
            _unrepeat_kv(m)
        _rewrite(g, m)
        stats.update(m.rules)
        fused += 1
    if fused:
        g.eliminate_dead_code()
    left = unfused_attention_patterns(gm)
    if left:
        stats["unfused_left"] = left
    return PassResult(gm, fused > 0, stats)


PASS = PassInfo(
    name="fuse_attention", run=run, config_cls=FuseAttentionConfig,
    summary="every spelling of attention (SDPA, matmul-softmax-matmul, HF eager, GQA repeat) "
            "-> one optc.attention (FlashAttention-2 kernel, fast CPU path)",
    source="FlashAttention (Dao et al. 2022), FlashAttention-2 (Dao 2023); HF GPT-2/BERT/OPT/Llama eager",
    lossless=True,
    after=("remove_noops",),
)

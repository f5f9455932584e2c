"""The quantized weights of one compiled model: shared across its graphs, saved, loaded.

    compiled = optc.compile(model, config=cfg, calibration=batches, example_inputs=ids)
    compiled.save_quantized("q/")                        # safetensors + JSON, atomic
    again = optc.compile(model, quantized="q/")          # config from q/, no AWQ search, no rounding

A ``QuantStore`` rides along in ``gm.meta["optc_quant"]`` of every graph a ``CompiledModel``
captures. The pass looks a plan up by its layout signature (which linears, which schemes,
where folds go, the pass config) and the fingerprints of the original weights; Dynamo's
prefill and decode graphs have the same layout, so AWQ's search and the rounding run once and
the graphs share one copy of the quantized tensors.

On disk a directory holds ``quantized.safetensors`` (every tensor of every plan) and
``quantized.json`` (format version, the whole ``CompileConfig``, per plan: signature, schemes,
shapes, tensor names, fold records, weight fingerprints; the SHA-256 of the safetensors file).
Both are written to temporary names and renamed, JSON last, so a reader sees either the old
pair or the new one. Loading checks the hash, the format version, and — when the pass runs —
that the graph's layout and the model's weights are the ones the file was made from; any
mismatch is a ``ConfigError`` that says what differs, never different numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optc.config import ConfigError
from optc.quant.offload import is_offloaded, weak_entry

FORMAT = "optc-quantized"
FORMAT_VERSION = 1
TENSORS_FILE = "quantized.safetensors"
META_FILE = "quantized.json"


def _fingerprint(t: Tensor) -> str:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    d = flat.double()
    h.update(f"{float(d.sum()):.17g}|{float(d.abs().sum()):.17g}|".encode())
    h.update(flat[::step].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _probe(t: Tensor) -> tuple:
    """What must not have changed for a remembered fingerprint to stand: the very object
    (weak reference, checked apart), its data pointer, version counter (bumped by every
    in-place write), shape and dtype, and
    - for a tensor in RAM, the bytes of 64 evenly strided elements;
    - for one ``optc.quant.offload`` moved to a file mapping, its storage's identity instead:
      reading even a few elements of the mapping maps whole 2 MiB folios of the page cache
      into the process (measured: 64 samples of a 128 MiB weight mapped all of it). The
      remembered entry holds that storage, so its identity is never reused by another."""
    base = (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
    if is_offloaded(t):
        return base + (t.untyped_storage()._cdata,)
    flat = t.detach().reshape(-1)
    return base + (flat[::max(1, flat.numel() // 64)].float().contiguous().numpy().tobytes(),)


_REMEMBERED: dict[int, tuple[weakref.ref, tuple, str, Any]] = {}


def fingerprint(t: Tensor) -> str:
    """A cheap, exact-enough identity of a weight: dtype, shape, float64 sum and abs-sum, and
    the bytes of up to 4096 evenly strided elements. Tells a model's weights from another's.
    Remembered per tensor (``_probe``): each graph Dynamo captures looks its plan up by these,
    and recomputing them reads every weight again (a whole offloaded weight back from disk)."""
    fp = remembered(t)
    if fp is None:
        fp = _fingerprint(t)
        remember(t, fp)
    return fp


def remembered(t: Tensor) -> str | None:
    """``t``'s remembered fingerprint if its state has not changed since, else None."""
    hit = _REMEMBERED.get(id(t))
    return hit[2] if hit is not None and hit[0]() is t and hit[1] == _probe(t) else None


def remember(t: Tensor, fp: str) -> None:
    """Record ``fp`` as ``t``'s fingerprint in its current state (``offload`` calls it after
    moving a tensor: same values, new storage)."""
    held = t.untyped_storage() if is_offloaded(t) else None
    try:
        _REMEMBERED[id(t)] = (weak_entry(_REMEMBERED, t), _probe(t), fp, held)
    except TypeError:           # not weak-referenceable: recomputed each time
        pass


class QuantStore:
    """Plans of one compiled model (computed here or loaded), and its calibration statistics."""

    def __init__(self, calibration: Any = None, loaded: list | None = None,
                 source: str | None = None, offload_dir: Path | None = None):
        self.calibration = calibration
        self.offload_dir = offload_dir    # set: quantize_weights offloads what it replaced
        self.plans: dict[tuple[str, str], Any] = {}     # (signature, weights digest) -> QuantPlan
        self.loaded = loaded is not None
        self.source = source
        for plan in loaded or ():
            self.plans[(plan.signature, _digest(plan.fingerprints))] = plan

    def lookup(self, gm: Any, layout: Any) -> Any | None:
        from optc.passes.quantize_weights import _originals
        orig = _originals(gm)
        for (sig, _), plan in self.plans.items():
            if sig != layout.signature:
                continue
            now = {p: fingerprint(orig[p]) for p in plan.fingerprints if p in orig}
            if now == plan.fingerprints:
                return plan
            if self.loaded:
                bad = sorted(p for p in plan.fingerprints if now.get(p) != plan.fingerprints[p])
                raise ConfigError(f"the quantized weights in {self.source} were made from other "
                                  f"weights: {bad[:5]}{' ...' if len(bad) > 5 else ''} differ; "
                                  "re-quantize (compile without quantized=) and save again")
        if self.loaded:
            raise ConfigError(
                f"the quantized weights in {self.source} were made for another graph layout "
                f"(linears, schemes, folds or pass config differ): this graph has "
                f"{len(layout.sites)} quantizable linears ({_head(layout)}); the file has "
                f"{len(self.plans)} plan(s). Compile with the config saved there (config=None), "
                "or re-quantize and save again")
        return None

    def add(self, plan: Any) -> None:
        self.plans[(plan.signature, _digest(plan.fingerprints))] = plan


def _head(layout: Any) -> str:
    names = [s.module for s in layout.sites]
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _digest(fps: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()[:16]


def open_store(model: torch.nn.Module, cfg: Any, *, calibration: Any = None,
               quantized: str | os.PathLike | None = None, offload_weights: bool = False
               ) -> tuple[Any, QuantStore | None]:
    """(the CompileConfig to use, the store for ``optc.compile``), or (cfg, None) when no
    quantize_weights runs. Refuses an AWQ config without calibration data or saved weights.
    ``cfg`` None with ``quantized`` set: the config saved in that directory.
    ``offload_weights``: the pass moves the float weights it replaced out of RAM
    (``optc.quant.offload``), into files under ``<optc cache>/offload``."""
    from optc.config import CompileConfig
    from optc.passes.pipeline import DEFAULT_PIPELINE
    from optc.passes.registry import PASSES
    loaded = None
    if quantized is not None:
        saved_cfg, loaded = load(quantized)
        if cfg is None:
            cfg = saved_cfg
        elif _pass_cfg(cfg) != _pass_cfg(saved_cfg):
            raise ConfigError(
                f"config's quantize_weights settings differ from those saved in {quantized}: "
                f"{_pass_cfg(cfg)} vs {_pass_cfg(saved_cfg)}; pass config=None to use the saved one")
        _check_weights(model, loaded, str(quantized))
        # a graph the saved plans do not fit must not quietly run unquantized: strict
        cfg = dataclasses.replace(cfg, strict=True)
    cfg = cfg if cfg is not None else CompileConfig()
    pipeline = cfg.pipeline if cfg.pipeline is not None else DEFAULT_PIPELINE
    if "quantize_weights" not in pipeline:
        if quantized is not None:
            raise ConfigError(f"quantized={quantized!s} given but the pipeline has no quantize_weights")
        return cfg, None
    pcfg = PASSES["quantize_weights"].config_cls.from_dict(cfg.passes.get("quantize_weights", {}))
    calib = None
    if calibration is not None and loaded is None:
        from optc.quant.calibrate import collect
        calib = collect(model, calibration)
    elif pcfg.needs_calibration() and loaded is None:
        raise ConfigError(
            "this config quantizes with AWQ (or BFP ordered by activations), which needs "
            "calibration data: pass optc.compile(model, config=..., calibration=[batch, ...]) "
            "with a few model inputs (e.g. token-id batches from the training split), or "
            "quantized=DIR of a saved quantization, or use round-to-nearest rules (awq=False)")
    offload_dir = None
    if offload_weights:
        from optc import knobs
        offload_dir = knobs.cache_dir() / "offload"
    return cfg, QuantStore(calib, loaded, source=str(quantized) if quantized is not None else None,
                           offload_dir=offload_dir)


def _check_weights(model: torch.nn.Module, plans: list, source: str) -> None:
    """Refuse, now, a model whose weights are not the ones the saved plans were made from."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    bad = sorted({p for plan in plans for p, fp in plan.fingerprints.items()
                  if p not in state or fingerprint(state[p]) != fp})
    if bad:
        raise ConfigError(f"the quantized weights in {source} were made from other weights: "
                          f"{bad[:5]}{' ...' if len(bad) > 5 else ''} differ or are missing; "
                          "re-quantize (compile without quantized=) and save again")


def _pass_cfg(cfg: Any) -> dict:
    from optc.passes.registry import PASSES
    return PASSES["quantize_weights"].config_cls.from_dict(
        cfg.passes.get("quantize_weights", {})).to_dict()


# ---- files ------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save(store: QuantStore, cfg: Any, path: str | os.PathLike) -> Path:
    """Write every plan of ``store`` to directory ``path`` (created; files replaced atomically)."""
    from safetensors.torch import save_file
    if not store.plans:
        raise ConfigError("nothing to save: no graph was quantized yet — call the compiled model "
                          "once (or compile with example_inputs=...) before save_quantized")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    plans = []
    for k, plan in enumerate(store.plans.values()):
        def put(key: str, t: Tensor) -> str:
            name = f"{k}/{key}"
            tensors[name] = t.detach().cpu().contiguous().clone()
            return name
        plans.append({
            "signature": plan.signature,
            "weights": {m: {"scheme": q.scheme.to_dict(), "shape": list(q.shape),
                            "tensors": {n: put(f"w/{m}/{n}", t) for n, t in q.tensors.items()}}
                        for m, q in plan.weights.items()},
            "act_scales": {str(i): put(f"a/{i}", t) for i, t in plan.act_scales.items()},
            "replaced": {p: put(f"r/{p}", t) for p, t in plan.replaced.items()},
            "skipped": plan.skipped,
            "awq": {str(i): v for i, v in plan.awq.items()},
            "fingerprints": plan.fingerprints,
        })
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=out)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        digest = _sha256(Path(tmp))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "compile_config": cfg.to_dict(),
                "tensors_sha256": digest, "plans": plans,
                "calibration": None if store.calibration is None else {
                    "batches": store.calibration.batches, "digest": store.calibration.digest()}}
        os.replace(tmp, out / TENSORS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd, tmpj = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmpj, out / META_FILE)
    return out


def load(path: str | os.PathLike) -> tuple[Any, list]:
    """(CompileConfig, plans) from a directory written by ``save``; ConfigError if corrupt."""
    from safetensors.torch import load_file

    from optc.config import CompileConfig
    from optc.passes.quantize_weights import QuantPlan
    from optc.quant.formats import QuantizedWeight, QuantScheme
    d = Path(path)
    mp, tp = d / META_FILE, d / TENSORS_FILE
    if not mp.is_file() or not tp.is_file():
        raise ConfigError(f"{d} is not a saved optc quantization: expected {META_FILE} and "
                          f"{TENSORS_FILE} (written by CompiledModel.save_quantized)")
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{mp} is corrupt ({e}); save the quantization again") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{mp}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                          f"this optc reads {FORMAT!r} version {FORMAT_VERSION}: re-quantize")
    if _sha256(tp) != meta.get("tensors_sha256"):
        raise ConfigError(f"{tp} does not match the hash recorded in {mp} (corrupt or from another "
                          "save); save the quantization again")
    # safetensors hands out views into one buffer at arbitrary offsets; the CPU int8/int4
    # kernels segfault on such unaligned data, so every tensor gets its own allocation
    tensors = {k: t.clone() for k, t in load_file(str(tp)).items()}
    plans = []
    try:
        for p in meta["plans"]:
            plan = QuantPlan(p["signature"], skipped=dict(p["skipped"]),
                             fingerprints=dict(p["fingerprints"]))
            for m, w in p["weights"].items():
                plan.weights[m] = QuantizedWeight(QuantScheme.from_dict(w["scheme"]), tuple(w["shape"]),
                                                  {n: tensors[k] for n, k in w["tensors"].items()})
            plan.act_scales = {int(i): tensors[k] for i, k in p["act_scales"].items()}
            plan.replaced = {name: tensors[k] for name, k in p["replaced"].items()}
            plan.awq = {int(i): v for i, v in p["awq"].items()}
            plans.append(plan)
        cfg = CompileConfig.from_dict(meta["compile_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{mp} is inconsistent ({type(e).__name__}: {e}); save the quantization "
                          "again") from None
    return cfg, plans

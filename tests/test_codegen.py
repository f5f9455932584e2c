"""Triton codegen: index expressions, rendered source (golden), the kernel cache, and the
generated norm kernels run under TRITON_INTERPRET=1 against the CPU implementations.

The interpreter must be on before ``@triton.jit`` decorates a kernel, and this process may
already have imported kernel modules without it, so interpreted runs happen in a subprocess.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import sympy
import torch

from optc.codegen import cache as kcache
from optc.codegen.generator import (
    KernelOrigin, fill, load_kernel, render, row_offset, sym, texpr,
)
from optc.ops.norms import NormSpec, kernel_source

ORIGIN = KernelOrigin("add_rms_norm", pass_name="fuse_add_norm", nodes=("add_3", "mul_7"))
ADD_RMS = NormSpec("rms", residual=True, weight=True, bias=False)

# ---- index expressions -----------------------------------------------------------------------


def test_row_offset_folds_unit_stride_and_prints_triton():
    pid, cols = sym("pid"), sym("cols")
    assert texpr(row_offset(pid, sym("stride_x_row"), cols)) == "cols + pid*stride_x_row"
    assert texpr(row_offset(pid, 4096, cols, 2)) == "2*cols + 4096*pid"
    assert texpr(row_offset(pid, 0, cols)) == "cols"                       # broadcast row
    assert texpr(sympy.floor(cols / sym("n"))) == "(cols // n)"
    assert texpr(sympy.Mod(cols, sym("n"))) == "(cols % n)"
    with pytest.raises(ValueError, match="non-integer"):
        texpr(cols / 2)


def test_fill_requires_exactly_the_holes():
    assert fill("a + ${x}", x="b") == "a + b"
    with pytest.raises(KeyError):
        fill("a + ${x}")
    with pytest.raises(KeyError):
        fill("a + ${x}", x="b", y="c")
    with pytest.raises(KeyError):
        render("norm", params={"header": "#"}, origin=ORIGIN)


# ---- generated source (golden) ---------------------------------------------------------------

GOLDEN_ADD_RMS_NORM = '''\
# optc kernel add_rms_norm
# pass: fuse_add_norm
# nodes: add_3, mul_7
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, h_ptr, y_ptr,
    # dimensions
    n_cols, stride_x_row, stride_res_row, stride_h_row, stride_y_row,
    # scalars
    eps,
    # meta-parameters
    BLOCK_C: tl.constexpr,
):
    # One program per row; BLOCK_C >= n_cols lanes, lanes past n_cols are masked.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    x = tl.load(x_ptr + cols + pid*stride_x_row, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + cols + pid*stride_res_row, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + cols + pid*stride_h_row, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * (hf * inv).to(h.dtype).to(tl.float32)
    tl.store(y_ptr + cols + pid*stride_y_row, y.to(y_ptr.dtype.element_ty), mask=mask)
'''


def test_golden_add_rms_norm_source():
    assert kernel_source(ADD_RMS, ORIGIN) == GOLDEN_ADD_RMS_NORM


def test_source_is_deterministic_and_names_its_origin():
    kernel_source.cache_clear()
    a = kernel_source(ADD_RMS, ORIGIN)
    kernel_source.cache_clear()
    assert kernel_source(ADD_RMS, ORIGIN) == a
    direct = kernel_source(ADD_RMS)
    assert direct.splitlines()[:3] == ["# optc kernel add_rms_norm", "# pass: (direct call)",
                                       "# nodes: (none)"]


@pytest.mark.parametrize("spec", [
    NormSpec("rms", False, True, False), NormSpec("rms", True, True, False),
    NormSpec("layer", True, True, True), NormSpec("layer", True, True, False),
    NormSpec("layer", True, False, False),
], ids=lambda s: f"{s.name}-w{int(s.weight)}b{int(s.bias)}")
def test_every_variant_is_well_formed(spec):
    src = kernel_source(spec)
    compile(src, "<kernel>", "exec")
    lines = src.splitlines()
    assert lines[0] == f"# optc kernel {spec.name}"
    assert f"def {spec.name}_kernel(" in src
    # argument groups in order, meta-parameters UPPER_CASE constexpr
    groups = [ln.strip() for ln in lines if ln.strip().startswith("# ") and ln.startswith("    ")]
    assert groups[:4] == ["# pointers", "# dimensions", "# scalars", "# meta-parameters"]
    assert "    BLOCK_C: tl.constexpr," in lines
    # every load and store is masked
    memops = [ln for ln in lines if "tl.load(" in ln or "tl.store(" in ln]
    assert memops and all("mask=mask" in ln for ln in memops)
    # only the operands the variant has
    assert ("res_ptr" in src) == spec.residual and ("h_ptr" in src) == spec.residual
    assert ("w_ptr" in src) == spec.weight and ("b_ptr" in src) == spec.bias


# ---- kernel cache ----------------------------------------------------------------------------

@pytest.fixture
def kc(tmp_path, monkeypatch) -> kcache.KernelCache:
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    return kcache.KernelCache()


def _entry_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_cache_miss_then_hit(kc, tmp_path):
    src = kernel_source(ADD_RMS, ORIGIN)
    fn = kc.load(src, "add_rms_norm_kernel")
    assert type(fn).__name__ == "JITFunction" and fn.__name__ == "add_rms_norm_kernel"
    assert kc.stats() == kcache.CacheStats(memo_hits=0, hits=0, misses=1, rebuilds=0)
    assert kc.load(src, "add_rms_norm_kernel") is fn                      # in-process memo
    assert kc.stats().memo_hits == 1
    key = kcache.cache_key(src)
    root = tmp_path / "kernels"
    assert _entry_files(root) == [f"{key}.json", f"{key}.py"]             # no temporaries left
    assert (root / f"{key}.py").read_text() == src
    meta = json.loads((root / f"{key}.json").read_text())
    assert meta["key"] == key and meta["entry"] == "add_rms_norm_kernel"
    kc.reset()                                                             # a "new process"
    kc.load(src, "add_rms_norm_kernel")
    assert kc.stats() == kcache.CacheStats(memo_hits=0, hits=1, misses=0, rebuilds=0)


def test_cache_key_covers_source_and_config():
    src = kernel_source(ADD_RMS, ORIGIN)
    assert kcache.cache_key(src) == kcache.cache_key(src, {})
    assert kcache.cache_key(src) != kcache.cache_key(src + "\n")
    assert kcache.cache_key(src) != kcache.cache_key(src, {"num_warps": 4})
    # the origin header is part of the source: another call site is another entry
    assert kcache.cache_key(src) != kcache.cache_key(kernel_source(ADD_RMS))


def _corrupt_py(py: Path, meta: Path) -> None:
    py.write_text(py.read_text()[:100])                                    # truncated


def _corrupt_json(py: Path, meta: Path) -> None:
    meta.write_text('{"key": "abc", ')                                     # not JSON


def _wrong_key_json(py: Path, meta: Path) -> None:
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "key": "0" * 64}))


def _missing_json(py: Path, meta: Path) -> None:
    meta.unlink()                                                          # torn write


def _same_size_edit(py: Path, meta: Path) -> None:
    py.write_text(py.read_text().replace("rsqrt", "sqrt_"))                # hash mismatch


@pytest.mark.parametrize("corrupt", [_corrupt_py, _corrupt_json, _wrong_key_json, _missing_json,
                                     _same_size_edit], ids=lambda f: f.__name__.strip("_"))
def test_cache_rebuilds_bad_entry(kc, tmp_path, monkeypatch, capsys, corrupt):
    monkeypatch.setenv("OPTC_LOGS", "codegen")
    src = kernel_source(ADD_RMS, ORIGIN)
    kc.load(src, "add_rms_norm_kernel")
    py, meta = kc.paths(kcache.cache_key(src))
    corrupt(py, meta)
    kc.reset()
    fn = kc.load(src, "add_rms_norm_kernel")
    assert fn.__name__ == "add_rms_norm_kernel"
    assert kc.stats() == kcache.CacheStats(memo_hits=0, hits=0, misses=0, rebuilds=1)
    assert py.read_text() == src and json.loads(meta.read_text())["key"] == kcache.cache_key(src)
    assert "rebuilt" in capsys.readouterr().err
    kc.reset()
    kc.load(src, "add_rms_norm_kernel")
    assert kc.stats().hits == 1                                            # healthy again


def test_cache_logs_rebuild_under_codegen_topic(kc, monkeypatch, capsys):
    src = kernel_source(ADD_RMS, ORIGIN)
    kc.load(src, "add_rms_norm_kernel")
    py, _ = kc.paths(kcache.cache_key(src))
    py.write_text("")
    kc.reset()
    monkeypatch.delenv("OPTC_LOGS", raising=False)
    kc.load(src, "add_rms_norm_kernel")
    assert capsys.readouterr().err == ""                                   # topic off: silent
    py.write_text("")
    kc.reset()
    monkeypatch.setenv("OPTC_LOGS", "codegen")
    kc.load(src, "add_rms_norm_kernel")
    err = capsys.readouterr().err
    assert "[optc:codegen]" in err and "rebuilt" in err and "does not hash" in err


def test_cache_rejects_source_without_entry(kc):
    with pytest.raises(kcache.BadEntry, match="defines no 'missing'"):
        kc.load("X = 1\n", "missing")


def test_load_kernel_uses_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    src = kernel_source(ADD_RMS, ORIGIN)
    fn = load_kernel(src, "add_rms_norm_kernel")
    assert (tmp_path / "kernels" / f"{kcache.cache_key(src)}.py").exists()
    assert load_kernel(src, "add_rms_norm_kernel") is fn


# ---- kernels under the interpreter -----------------------------------------------------------

# Tolerances of interpreted Triton vs the CPU implementation, per output dtype (rtol, atol):
#  fp32: the kernel sums a row in another order than ATen: a few fp32 ulps.
#  fp16: the interpreter rounds fp32 -> fp16 to nearest like eager, so at most 1 ulp (2^-10)
#        where an fp32 statistic a few ulps off lands on the other side of a rounding boundary.
#  bf16: the interpreter's fp32 -> bf16 cast truncates (triton/runtime/interpreter.py,
#        `_convert_float` without a rounding mode) where eager rounds to nearest, so each bf16
#        rounding (h, HF's normalized row, y) may be 1 ulp (<= 2^-7 relative) low: h within
#        2^-7, y within 3 ulps plus h's error carried through, 2^-5. On a GPU bf16 is 1 ulp.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from optc.ops import OPS
    from optc.ops.norms import NormSpec, launch_norm

    TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2**-10, 2**-10),
           torch.bfloat16: (2**-5, 2**-5)}
    H_TOL = {torch.float32: (0, 0), torch.float16: (0, 0), torch.bfloat16: (2**-7, 0)}
    failures, n = [], 0

    def check(label, out, ref, tol):
        global n
        n += 1
        try:
            assert out.shape == ref.shape and out.dtype == ref.dtype, (out.dtype, ref.dtype)
            torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])
        except AssertionError as e:
            failures.append(f"{label}: {e}")

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C, block in ((48, None), (100, None), (48, 128)):   # BLOCK_C 64, 128, 128
            x = torch.randn(2, 3, C, dtype=dtype)
            r = torch.randn(2, 3, C, dtype=dtype)
            w = (1 + 0.1 * torch.randn(C)).to(dtype)
            b = torch.randn(C).to(dtype)
            tag = f"{dtype} C={C} BLOCK_C={block}"
            h, y = launch_norm(NormSpec("rms", True, True, False), x, r, w, None, 1e-6,
                               block_c=block)
            h0, y0 = OPS["add_rms_norm"].cpu(x, r, w, 1e-6)
            check(f"add_rms_norm h {tag}", h, h0, H_TOL[dtype])
            check(f"add_rms_norm y {tag}", y, y0, TOL[dtype])
            y = launch_norm(NormSpec("rms", False, True, False), x, None, w, None, 1e-6,
                            block_c=block)[1]
            check(f"rms_norm {tag}", y, OPS["rms_norm"].cpu(x, w, 1e-6), TOL[dtype])
            for wt, bt in ((w, b), (w, None), (None, None)):
                spec = NormSpec("layer", True, wt is not None, bt is not None)
                h, y = launch_norm(spec, x, r, wt, bt, 1e-5, block_c=block)
                h0, y0 = OPS["add_layer_norm"].cpu(x, r, wt, bt, 1e-5)
                check(f"add_layer_norm h w={wt is not None} b={bt is not None} {tag}", h, h0,
                      H_TOL[dtype])
                check(f"add_layer_norm y w={wt is not None} b={bt is not None} {tag}", y, y0,
                      TOL[dtype])

    # through the registry's wrappers, with a strided input, a broadcast residual and an fp32
    # weight on bf16 activations (HF's mixed precision: y comes out fp32)
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16).transpose(0, 1)
    r = torch.randn(64, dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(64)
    for name, args in (("add_rms_norm", (x, r, w, 1e-6)), ("rms_norm", (x, w, 1e-6)),
                       ("add_layer_norm", (x, r, w, None, 1e-5))):
        out, ref = OPS[name].triton(*args), OPS[name].cpu(*args)
        out = out if isinstance(out, tuple) else (out,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        for i, (o, e) in enumerate(zip(out, ref)):
            check(f"{name}[{i}] strided/broadcast/mixed", o, e, TOL[torch.bfloat16])
    print(json.dumps({"checks": n, "failures": failures}))
""")


def test_kernels_under_interpreter_match_cpu(tmp_path, interpreted):
    result = interpreted(INTERPRETER_SCRIPT)
    assert result["failures"] == [] and result["checks"] == 86, result
    # the kernels went through the on-disk cache: one module per variant used
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_on_gpu_match_cpu(dtype):
    from optc.ops import OPS
    x = torch.randn(4, 128, 4096, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    # A reordered fp32 row sum can flip the rounding of HF's normalized row (1 ulp), which
    # the weight multiply can round once more: 2 ulps in half precision, a few ulps in fp32.
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2**-9, 2**-9),
           torch.bfloat16: (2**-6, 2**-6)}[dtype]
    h, y = OPS["add_rms_norm"].triton(x, r, w, 1e-6)
    h0, y0 = OPS["add_rms_norm"].cpu(x.cpu(), r.cpu(), w.cpu(), 1e-6)
    torch.testing.assert_close(h.cpu(), h0, rtol=0, atol=0)
    torch.testing.assert_close(y.cpu(), y0, rtol=tol[0], atol=tol[1])

"""optc.ops.native: the C++ int4 dequantization is bit-identical to the torch reference
(``optc.ops.quant.int4_weight_t_bf16_torch``), whole and in column chunks; the build cache
rebuilds a corrupt entry; ``OPTC_NATIVE=0`` and a missing compiler fall back to torch with the
reason reported; the chunked prefill path equals the whole-weight one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from optc.ops import native
from optc.ops import quant as Q
from optc.quant import formats as fmt
from optc.quant.formats import QuantScheme

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="needs a C++ compiler")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    native.reset()
    yield tmp_path
    native.reset()


def _int4(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = fmt.quantize(torch.randn(n, k, generator=g), QuantScheme("int4", group))
    return q.tensors["w_int4"], q.tensors["scales_zeros"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (192, 256, 128), (320, 384, 64), (100, 128, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_to_torch(fresh_cache, n, k, group, threads):
    w, sz = _int4(n, k, group)
    ref = Q.int4_weight_t_bf16_torch(w, sz, group, k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.int4_weight_t_bf16(w, sz, group, k)
    finally:
        torch.set_num_threads(old)
    assert native.status()["state"] == "loaded"
    assert out is not None and out.shape == ref.shape == (k, w.shape[0])
    assert torch.equal(_bits(out), _bits(ref))
    # a column chunk into a wider reused buffer
    if w.shape[0] >= 128:
        buf = torch.full((k, 256), float("nan"), dtype=torch.bfloat16)
        part = native.int4_weight_t_bf16(w, sz, group, k, cols=(64, 128), out=buf)
        assert part.data_ptr() == buf.data_ptr() and part.shape == (k, 64)
        assert torch.equal(_bits(part), _bits(ref[:, 64:128]))


def test_bad_arguments_are_refused(fresh_cache):
    w, sz = _int4(128, 128, 32)
    with pytest.raises(ValueError, match="multiples of 64"):
        native.int4_weight_t_bf16(w, sz, 32, 128, cols=(32, 128))
    with pytest.raises(ValueError, match="out must be"):
        native.int4_weight_t_bf16(w, sz, 32, 128, cols=(0, 128), out=torch.empty(128, 64, dtype=torch.bfloat16))
    # a layout it does not handle (non-contiguous, wrong dtype) is None: the caller uses torch
    assert native.int4_weight_t_bf16(w.t().contiguous().t(), sz, 32, 128) is None
    assert native.int4_weight_t_bf16(w, sz.float(), 32, 128) is None


def test_corrupt_cache_entry_is_rebuilt(fresh_cache):
    """A truncated library (a crash mid-copy by another tool, a full disk) is found by the next
    process, deleted and rebuilt. In a fresh process: this one has the library mapped, and the
    dynamic loader would hand back the mapped copy for the same path."""
    assert native.library() is not None
    (so,) = list(fresh_cache.glob("native/*/liboptc_native.so"))
    so.unlink()                                   # a new inode: the mapped copy stays valid
    so.write_bytes(b"\x7fELF truncated")
    code = ("from optc.ops import native; import sys; lib = native.library(); "
            "print(native.status()); sys.exit(0 if lib is not None else 1)")
    env = {**os.environ, "OPTC_CACHE_DIR": str(fresh_cache)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'state': 'loaded'" in proc.stdout
    assert so.stat().st_size > 1000 and so.read_bytes()[:4] == b"\x7fELF"


def test_disabled_and_unavailable_fall_back_to_torch(fresh_cache, monkeypatch):
    w, sz = _int4(128, 256, 64)
    ref = Q.int4_weight_t_bf16_torch(w, sz, 64, 256)
    monkeypatch.setenv("OPTC_NATIVE", "0")
    assert native.library() is None and native.status()["state"] == "disabled"
    assert torch.equal(_bits(Q.int4_weight_t_bf16(w, sz, 64, 256)), _bits(ref))
    monkeypatch.delenv("OPTC_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.reset()
    assert native.library() is None
    assert native.status() == {"state": "unavailable",
                               "reason": "no C++ compiler found ($CXX, c++, g++, clang++)"}
    assert torch.equal(_bits(Q.int4_weight_t_bf16(w, sz, 64, 256)), _bits(ref))


def test_chunked_prefill_path_equals_whole(fresh_cache, monkeypatch):
    """Chunking changes only which columns each GEMM computes: every output element is the
    same dot product, so the results agree to the bf16 output rounding of a different
    blocking (1 ulp), and both match the fp64 reference within bf16 noise."""
    w, sz = _int4(320, 256, 64)
    x = torch.randn(8, 256)
    whole = Q._int4_dequant(x, w, sz, 64)
    monkeypatch.setattr(Q, "DEQUANT_WHOLE_BYTES", 0)
    monkeypatch.setattr(Q, "DEQUANT_CHUNK_BYTES", 64 * 2 * 256)     # 64 columns per chunk
    chunked = Q._int4_dequant(x, w, sz, 64)
    assert chunked.shape == whole.shape == (8, 320)
    ref = x.double() @ Q.int4_weight_t_bf16_torch(w, sz, 64, 256).double()
    scale = ref.abs().max().item()
    assert (chunked.double() - whole.double()).abs().max().item() <= 2 ** -7 * scale
    assert (chunked.double() - ref).abs().max().item() <= 2 ** -7 * scale

"""Shared test setup: every test starts from a fixed RNG, a fresh Dynamo and private optc dirs.

The fp32 tolerance every compiled-vs-eager comparison uses lives here, stated once with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# fp32 tolerance of compiled vs eager: max |compiled - eager| <= RTOL * max(1, max |eager|).
# Fused or reordered fp32 reductions (matmul blocking, a fused add+norm, SDPA vs softmax(QK^T)V)
# differ from eager by a few ulps times the reduction length (<= a few hundred here). 1e-4
# relative to the output's scale is ~1000 ulps (fp32 ulp ~1.2e-7): above that noise, yet far
# below any real bug (a wrong mask, a dropped bias, a swapped operand gives O(1) errors).
RTOL = 1e-4


def _output(out: object) -> torch.Tensor:
    """The tensor of a model output: a tensor, or a HF ModelOutput's logits / last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _assert_matches_eager(out: object, ref: object) -> None:
    out, ref = _output(out), _output(ref)
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    bound = RTOL * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= bound, f"max |compiled - eager| = {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="session")
def assert_matches_eager() -> Callable[[object, object], None]:
    """``assert_matches_eager(compiled_out, eager_out)``: shapes, dtypes and values within RTOL.

    Session-scoped (it is a pure function) so hypothesis tests can use it too.
    """
    return _assert_matches_eager


@pytest.fixture(scope="session")
def stats_on(assert_matches_eager: Callable[[object, object], None]) -> Callable[..., dict]:
    """``stats_on(spec, pass_name)``: compile a zoo model (``"zoo:NAME"``) or a tiny HF model
    (``"hf:ARCH"``) with the default pipeline, check it against eager at seq 8, and return that
    pass's statistics on its (single) graph."""
    def run(spec: str, pass_name: str) -> dict:
        import models
        import optc
        from models.hf import build_hf, hf_example_inputs
        kind, name = spec.split(":", 1)
        if kind == "zoo":
            model = models.build(name)
            args, kwargs = models.example_inputs(model, seq=8)
        else:
            model = build_hf(name)
            args, kwargs = hf_example_inputs(model, seq=8)
        compiled = optc.compile(model)
        with torch.no_grad():
            assert_matches_eager(compiled(*args, **kwargs), model(*args, **kwargs))
        return dict(compiled.report.summary()["pass_stats"][0].get(pass_name, {}))
    return run


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Fixed seed; kernel cache and crash reproducers in a temporary directory; fresh Dynamo caches.

    ``torch._dynamo.reset()`` on both sides so compiled code and recompile counts of one test
    never leak into the next (HF models share code objects across instances).
    """
    torch.manual_seed(0)
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path_factory.mktemp("optc_cache")))
    monkeypatch.setenv("OPTC_REPRO_DIR", str(tmp_path_factory.mktemp("optc_repro")))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test with 1 and with 2 torch threads (native kernels split work by threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture
def interpreted(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``interpreted(script, timeout=300)``: ``run_interpreted`` with the test's tmp_path as the
    kernel cache."""
    return lambda script, timeout=300: run_interpreted(script, tmp_path, timeout)


def run_interpreted(script: str, cache_dir: Path, timeout: int = 300) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (it must be on before
    ``@triton.jit`` decorates a kernel, and this process may have imported kernels without it)
    and a private kernel cache; returns the JSON object on its last stdout line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPTC_CACHE_DIR": str(cache_dir)}
    env.pop("OPTC_LOGS", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

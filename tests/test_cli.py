"""The ``optc`` command line: ``optc passes`` and ``optc inspect MODEL`` for each MODEL form,
text and JSON output, and one-line errors (exit code 2) for every bad spec."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from optc.cli import main
from optc.passes.pipeline import DEFAULT_PIPELINE
from optc.passes.registry import PASSES


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_passes_lists_every_registered_pass_with_its_source(capsys: pytest.CaptureFixture):
    rc, out, _ = run(capsys, "passes")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == len(PASSES)
    for line, (name, info) in zip(lines, PASSES.items()):
        tag = "default" if name in DEFAULT_PIPELINE else "opt-in"
        kind = "lossless" if info.lossless else "lossy"
        assert line.startswith(f"{name} ") and f"[{tag}, {kind}]" in line
        assert info.summary in line and line.endswith(f"source: {info.source}")


def test_inspect_print_after_all(capsys: pytest.CaptureFixture):
    rc, out, _ = run(capsys, "inspect", "zoo:llama-tiny:seq=8", "--print-after-all")
    assert rc == 0
    assert out.startswith("== optc inspect zoo:llama-tiny:seq=8  (frontend dynamo, 1 graph(s), 0 graph break(s))")
    assert "\n-- before passes:\ngraph(%in0: i64[1,8]):" in out
    assert "\n-- after remove_noops (12 rewrites):\ngraph(" in out
    assert "\n-- after fuse_add_norm (5 rewrites):\ngraph(" in out
    assert "optc.add_rms_norm" in out.split("-- after fuse_add_norm")[1]
    # the per-pass table
    assert re.search(r"\n   pass +status +rewrites +nodes +ms  stats\n", out)
    assert re.search(r"\n   remove_noops +changed +12 +\d+->\d+ +\d+\.\d\d  to_same_dtype=12\n", out)
    assert re.search(r"\n   fuse_add_norm +changed +5 +\d+->\d+ +\d+\.\d\d  rms_norm=1, add_rms_norm=4\n", out)
    assert re.search(r"\n-- memory plan: \d+ values in arena, \d+ allocated by their op; arena ", out)
    assert "fallbacks: none" in out
    assert re.search(r"-- max \|optc - eager\| = (0|\d\.\d+e-0[78])$", out.rstrip())


def test_inspect_unchanged_pass_is_reported(capsys: pytest.CaptureFixture):
    rc, out, _ = run(capsys, "inspect", "zoo:gpt2-tiny:seq=8", "--print-after-all",
                     "--passes", "remove_noops,fuse_add_norm")
    assert rc == 0
    assert "\n-- after remove_noops: unchanged\n" in out  # nanoGPT has no no-ops
    assert "\n-- after fuse_add_norm (4 rewrites):\n" in out
    assert re.search(r"\n   remove_noops +no-op +0 ", out)


def test_inspect_json(capsys: pytest.CaptureFixture):
    rc, out, _ = run(capsys, "inspect", "zoo:llama-tiny:seq=8", "--format", "json")
    assert rc == 0
    info = json.loads(out)
    assert info["model"] == "zoo:llama-tiny:seq=8" and info["frontend"] == "dynamo"
    (graph,) = info["graphs"]
    assert [p["name"] for p in graph["passes"]] == list(DEFAULT_PIPELINE)
    noops, fuse, attention, rope, qkv, reduce = graph["passes"]
    assert noops["stats"] == {"to_same_dtype": 12} and noops["rewrites"] == 12
    assert rope["stats"] == {"rope": 4} and rope["rewrites"] == 4    # q and k, two layers
    assert fuse["stats"] == {"rms_norm": 1, "add_rms_norm": 4} and fuse["rewrites"] == 5
    assert attention["stats"] == {"sdpa": 2, "repeat_interleave": 2}
    assert qkv["stats"] == {"groups": 2}              # q/k/v, two layers (gate/up: pairs)
    for p in (noops, fuse, attention):
        assert p["modified"] and p["error"] is None and p["skipped"] is None
        assert p["nodes_after"] < p["nodes_before"] and p["ms"] >= 0
    # GQA: q, k and v differ in width, so there is no equal split to cut into heads
    assert not reduce["modified"] and reduce["stats"] == {}
    rt = graph["runtime"]
    assert rt["fallbacks"] == {}
    assert rt["lower_bound_bytes"] <= rt["arena_bytes"] <= rt["no_reuse_bytes"]
    assert graph["cost"]["flops"] > 0
    # fuse_qkv's wider GEMM may block the fp32 reduction differently: an ulp, not more
    assert info["max_abs_diff_vs_eager"] <= 1e-6


def test_inspect_hf_gpt2(capsys: pytest.CaptureFixture):
    rc, out, _ = run(capsys, "inspect", "hf:gpt2:seq=8")
    assert rc == 0
    assert "canonicalize: addmm_to_linear=8, fold_linear_views=8, reshape_to_view=2" in out
    assert re.search(r"\n   fuse_add_norm +changed +5 .*add_layer_norm=5\n", out)


def test_inspect_file_factory(capsys: pytest.CaptureFixture, tmp_path: Path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln = torch.nn.LayerNorm(8)

            def forward(self, x, r):
                return self.ln(x + r)

        def make():
            return Block(), (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    """))
    rc, out, _ = run(capsys, "inspect", f"{path}:make", "--frontend", "export")
    assert rc == 0
    assert f"== optc inspect {path}:make  (frontend export, 1 graph(s)" in out
    assert "add_layer_norm=1" in out


BAD_SPECS = {
    "zoo:nope": "unknown zoo model 'nope'",
    "foo": "'foo' is not a model spec",
    "hf:xyz": "unknown hf architecture 'xyz'",
    "missing.py:f": "file 'missing.py' does not exist",
    "zoo:llama-tiny:seq": "'seq' is not key=value",
    "zoo:llama-tiny:n_layer=3": "unknown ModelArgs field(s) n_layer",
}


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_spec_is_one_line_with_accepted_forms(capsys: pytest.CaptureFixture, spec: str):
    rc, out, err = run(capsys, "inspect", spec)
    assert rc == 2 and out == ""
    line = err.rstrip("\n")
    assert "\n" not in line
    assert line.startswith(f"optc: bad MODEL '{spec}': ")
    assert BAD_SPECS[spec] in line
    assert "accepted MODEL forms: zoo:NAME[:key=value,...] (NAME one of " in line
    assert "llama-tiny" in line and "hf:ARCH[:key=value,...] (ARCH one of gpt2, llama, bert, opt)" in line
    assert line.endswith("or path/to/file.py:factory")


def test_bad_factory_specs(capsys: pytest.CaptureFixture, tmp_path: Path):
    path = tmp_path / "m.py"
    path.write_text("import torch\n\ndef only_module():\n    return torch.nn.Linear(2, 2)\n")
    rc, _, err = run(capsys, "inspect", f"{path}:nothing_here")
    assert rc == 2 and f"'{path}' has no function 'nothing_here'" in err
    rc, _, err = run(capsys, "inspect", f"{path}:only_module")
    assert rc == 2 and "returned only a module; return (module, args)" in err


def test_bad_pipeline_with_export_frontend(capsys: pytest.CaptureFixture):
    rc, out, err = run(capsys, "inspect", "zoo:gpt2-tiny:seq=8", "--frontend", "export",
                       "--passes", "fuse_add_norm,remove_noops")
    assert rc == 2 and out == ""
    assert err == "optc: pass 'fuse_add_norm' must run after 'remove_noops' (declared in its " \
                  "PassInfo.after); fix the pipeline order\n"


def test_bad_pipeline_with_dynamo_frontend(capsys: pytest.CaptureFixture):
    rc, _, err = run(capsys, "inspect", "zoo:gpt2-tiny:seq=8", "--passes", "nope")
    assert rc == 2 and "unknown pass(es) ['nope']" in err

"""optc::linear_int8 / linear_int4 / linear_w8a8 / linear_bfp: every CPU path, fake shapes and
torch.library contracts (opcheck), the CPU decision table, the generated Triton kernels (golden
source, well-formedness, TRITON_INTERPRET=1 against the formats' reference) and, on a GPU,
the kernels at real sizes.

Tolerance (SQNR against ``x @ dequantize(q).T + bias`` in fp32, or, for w8a8, against the
same with x replaced by its int8 fake-quantized rows): the CPU paths compute with bf16
operands and fp32 accumulation. Each bf16 rounding (x for fp32/fp16 inputs, the weight on the
dequant paths, the kernel's bf16 output) is uniform relative noise of RMS 2^-8 / sqrt(12),
i.e. 10 log10(12 * 2^16) = 58.9 dB; three independent ones give 54.1 dB. The floor 48 dB leaves
6 dB for unlucky cancellations; a wrong nibble, scale, zero point or permutation costs 20+ dB
(the tests check one of each explicitly).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.codegen.generator import KernelOrigin
from optc.ops import OPS, get_op_def
from optc.ops import native
from optc.ops import quant as Q
from optc.quant import formats as fmt
from optc.quant.formats import QuantScheme

FLOOR_DB = 48.0
FORMATS = [(QuantScheme("int8"), None), (QuantScheme("w8a8"), None),
           (QuantScheme("int4", 128), None), (QuantScheme("int4", 32), None),
           (QuantScheme("bfp", 32), "planes"), (QuantScheme("bfp", 16), "blocks"),
           (QuantScheme("bfp", 32, mantissa_bits=4), "planes")]
PATHS = [(s, lay, p) for s, lay in FORMATS
         for p in Q.CPU_IMPLS["bfp_" + (lay or "") if s.mode == "bfp" else s.mode]]


def _reference(q: fmt.QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.float().reshape(-1, x.shape[-1])
    if q.scheme.mode == "w8a8":
        xq, sx = Q.quantize_rows(x2)
        x2 = xq.double() * sx.double()
    y = x2.double() @ fmt.dequantize(q).double().T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scheme,layout,path", PATHS,
                         ids=[f"{s.label}-{lay or ''}-{p}" for s, lay, p in PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_matches_reference(scheme, layout, path, dtype):
    n, k = 96, 256                      # N not a multiple of 64: the int4 rows are padded
    q = fmt.quantize(torch.randn(n, k) * 0.02, scheme, layout=layout)
    bias = torch.randn(n).to(dtype)
    for shape in ((1, k), (3, 11, k)):
        x = torch.randn(shape).to(dtype)
        for b in (bias, None):
            y = Q.run_cpu_path(q, x, b, path)
            assert y.dtype == dtype and y.shape == (*shape[:-1], n) and y.is_contiguous()
            assert fmt.sqnr_db(_reference(q, x, b), y) > FLOOR_DB, (shape, b is None)


def test_errors_are_caught_by_the_floor():
    """The floor is meaningful: one swapped nibble half, a dropped zero point, a wrong perm."""
    x, w = torch.randn(8, 256), torch.randn(128, 256) * 0.02
    q = fmt.quantize(w, QuantScheme("int4", 32))
    ref = _reference(q, x, None)
    swapped = q.tensors["w_int4"]
    swapped = (swapped >> 4) | (swapped << 4)
    bad = Q.linear_int4_cpu(x, swapped, q.tensors["scales_zeros"], None, 32, 128)
    assert fmt.sqnr_db(ref, bad) < 10
    sz = q.tensors["scales_zeros"].clone()
    sz[..., 1] = 0
    assert fmt.sqnr_db(ref, Q.linear_int4_cpu(x, q.tensors["w_int4"], sz, None, 32, 128)) < 20
    qb = fmt.quantize(w, QuantScheme("bfp", 16), perm=torch.randperm(256), layout="blocks")
    t = qb.tensors
    wrong = Q.linear_bfp_cpu(x, t["mantissa"], t["exponent"], torch.arange(256), None, 16, 0, 128)
    assert fmt.sqnr_db(_reference(qb, x, None), wrong) < 10


def test_w8a8_accumulates_exactly():
    """int8 x int8 -> int32 is exact: only the final fp32 scaling rounds (~1e-7 relative)."""
    x, w = torch.randn(5, 512), torch.randn(64, 512) * 0.02
    q = fmt.quantize(w, QuantScheme("w8a8"))
    y = Q.linear_w8a8_cpu(x, q.tensors["w_int8"], q.tensors["scales"], None)
    torch.testing.assert_close(y.double(), _reference(q, x, None), rtol=1e-6, atol=1e-7)


def test_ops_dispatch_to_the_cpu_implementation():
    x, w, b = torch.randn(2, 128), torch.randn(64, 128) * 0.02, torch.randn(64)
    for scheme, layout in FORMATS:
        q = fmt.quantize(w, scheme, layout=layout)
        op, names, trailing = fmt.linear_call(q, b)
        d = get_op_def(op)
        assert d is OPS[op._opname] and d.triton is not None
        args = (x, *[q.tensors[n] for n in names], b, *trailing)
        assert torch.equal(op(*args), d.cpu(*args))
        assert torch.equal(d.cpu(*args), Q.run_cpu_path(q, x, b))


def test_fake_and_opcheck():
    w, b = torch.randn(64, 128) * 0.02, torch.randn(64)
    for scheme, layout in FORMATS:
        q = fmt.quantize(w, scheme, layout=layout)
        op, names, trailing = fmt.linear_call(q, b)
        args = (torch.randn(2, 3, 128), *[q.tensors[n] for n in names], b, *trailing)
        torch.library.opcheck(op, args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx = mode.from_tensor(torch.randn(4, 7, 128, dtype=torch.bfloat16))
            out = op(fx, *args[1:])
        assert out.shape == (4, 7, 64) and out.dtype == torch.bfloat16


# ---- the CPU decision table ------------------------------------------------------------------

@pytest.mark.parametrize("tables", [(Q.CPU_PATHS, Q.DENSE_RATIOS),
                                    (Q.CPU_PATHS_NO_AMX, Q.DENSE_RATIOS_NO_AMX)])
def test_decision_table_is_well_formed(tables):
    paths, ratios = tables
    assert paths.keys() == ratios.keys() == Q.CPU_IMPLS.keys()
    for kind, table in paths.items():
        for t in (table, ratios[kind]):
            bounds = [r[0] for r in t]
            assert bounds == sorted(bounds) and bounds[-1] >= 1 << 62, kind    # covers every M
        assert all(p in Q.CPU_IMPLS[kind] for _, p in table), kind
        for m in (1, 2, 16, 17, 64, 128, 4096):
            assert Q.cpu_path(kind, m, 2048) in Q.CPU_IMPLS[kind]


def test_the_table_of_this_machine_is_used():
    """AMX present: the Xeon-measured table; absent: the EPYC one (its AMX paths would only
    run their fallbacks)."""
    amx = bool(native.features() & native.AMX)
    assert Q.cpu_tables()[0] is (Q.CPU_PATHS if amx else Q.CPU_PATHS_NO_AMX)
    assert "amx" not in {p for t in Q.CPU_PATHS_NO_AMX.values() for _, p in t}


def test_decode_runs_the_packed_kernels_and_odd_k_falls_back():
    prefill = "amx" if native.features() & native.AMX else "panel"
    assert Q.cpu_path("int8", 1, 2048) == "native"
    assert Q.cpu_path("int8", 128, 2048) == prefill
    assert Q.cpu_path("int4", 1, 2048) == "gemv"
    assert Q.cpu_path("int4", 128, 2048) == prefill
    assert Q.cpu_path("bfp_planes", 1, 2048) == "int4pack"
    # K % 16 != 0: the native int8 kernel and _weight_int8pack_mm refuse it; dequant runs
    x, w = torch.randn(1, 40), torch.randn(32, 40) * 0.02
    q = fmt.quantize(w, QuantScheme("int8"))
    assert fmt.sqnr_db(_reference(q, x, None), Q.run_cpu_path(q, x, None)) > FLOOR_DB


def test_slower_than_dense_notes():
    for kind in Q.CPU_PATHS:
        for m in (1, 4096):
            for dtype in (torch.float32, torch.bfloat16):
                note = Q.slower_than_dense(kind, m, dtype)
                assert note is None or ("slower than" in note and "quant_kernels" in note)
    # a note exists exactly where this machine's table (with or without AMX) measured < 1
    for kind, rows in Q.cpu_tables()[1].items():
        for max_m, r32, r16 in rows:
            assert (Q.slower_than_dense(kind, max_m, torch.float32) is None) == (r32 >= 1)
            assert (Q.slower_than_dense(kind, max_m, torch.bfloat16) is None) == (r16 >= 1)


# ---- Triton: generated source ----------------------------------------------------------------

ORIGIN = KernelOrigin("linear_int4", pass_name="quantize_weights", nodes=("linear_3",))

GOLDEN_INT4_LOAD = """\
        byte = tl.load(w_ptr + 32*K*(rn[None, :] // 64) + 32*rk[:, None] + (rn[None, :] % 32), mask=wk_mask, other=0)
        q = (byte >> (((rn[None, :] // 32) % 2) * 4).to(tl.uint8)) & 15
        g = k0 // GROUP
        s = tl.load(sz_ptr + (g * stride_sz_g + rn * 2), mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(sz_ptr + (g * stride_sz_g + rn * 2 + 1), mask=n_mask, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * s[None, :] + z[None, :]
"""


def test_golden_int4_kernel():
    src = Q.kernel_source(Q.QuantGemmSpec("int4"), ORIGIN)
    assert src.startswith("# optc kernel linear_int4\n# pass: quantize_weights\n# nodes: linear_3\n")
    assert GOLDEN_INT4_LOAD in src
    assert "x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr," in src
    assert "M, N, K, stride_xm, stride_ym, stride_sz_g," in src


@pytest.mark.parametrize("kind", Q.TRITON_KINDS)
def test_every_kernel_is_well_formed(kind):
    src = Q.kernel_source(Q.QuantGemmSpec(kind))
    compile(src, "<kernel>", "exec")
    lines = src.splitlines()
    assert lines[0] == f"# optc kernel linear_{kind}" and f"def linear_{kind}_kernel(" in src
    groups = [ln.strip() for ln in lines if ln.startswith("    # ")]
    assert groups[:3] == ["# pointers", "# dimensions", "# meta-parameters"]
    memops = [ln for ln in lines if "tl.load(" in ln or "tl.store(" in ln]
    assert memops and all("mask=" in ln or "mask" in lines[i + 1]
                          for i, ln in enumerate(lines) if ln in memops)
    assert ("dtype=tl.int32)" in src) == (kind == "w8a8")    # int accumulator only for w8a8
    assert ("perm_ptr" in src) == (kind == "bfp")


def test_triton_config_respects_the_group():
    assert Q.triton_config("int4", 1, 32)["BLOCK_K"] == 32
    assert Q.triton_config("int4", 1, 128)["BLOCK_K"] == 128
    assert Q.triton_config("int8", 1, 1)["BLOCK_M"] == 16
    assert Q.triton_config("int8", 4096, 1)["BLOCK_M"] == 128


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = fmt.quantize(torch.randn(64, 128), QuantScheme("int8"))
    with pytest.raises(ValueError, match="CUDA"):
        Q.linear_int8_triton(torch.randn(1, 128), q.tensors["w_int8"], q.tensors["scales"], None)
    qp = fmt.quantize(torch.randn(64, 128), QuantScheme("bfp", 32), layout="planes")
    op, names, trailing = fmt.linear_call(qp, None)
    with pytest.raises(fmt.QuantFormatError, match="blocks"):
        Q.linear_bfp_triton(torch.randn(1, 128), *[qp.tensors[n] for n in names], None, *trailing)


# ---- Triton under the interpreter ------------------------------------------------------------

# Tolerances of interpreted Triton vs the fp64 reference, by activation dtype (SQNR floors):
#   fp32: fp32 dot (ieee) in another summation order: ~1e-7 relative -> > 120 dB.
#   fp16: the output rounded to fp16 (2^-11 relative): ~71 dB -> floor 64 dB.
#   bf16: the output rounded to bf16 by the interpreter's truncating cast (up to 2^-7 relative,
#         not 2^-8 as rounding to nearest): ~48 dB -> floor 42 dB.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from optc.ops import get_op_def
    from optc.ops import quant as Q
    from optc.quant import formats as fmt
    from optc.quant.formats import QuantScheme

    FLOOR = {torch.float32: 120.0, torch.float16: 64.0, torch.bfloat16: 42.0}
    torch.manual_seed(0)
    n, k = 80, 96              # masked tails in N and K for every tile below
    w, b = torch.randn(n, k) * 0.02, torch.randn(n)
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    failures, checks = [], 0
    for scheme in (QuantScheme("int8"), QuantScheme("w8a8"), QuantScheme("int4", 32),
                   QuantScheme("bfp", 16), QuantScheme("bfp", 32, mantissa_bits=4)):
        perm = torch.randperm(k) if scheme.mode == "bfp" else None
        q = fmt.quantize(w, scheme, perm=perm, layout="blocks" if perm is not None else None)
        op, names, trailing = fmt.linear_call(q, b)
        d = get_op_def(op)
        for m in (1, 37):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = torch.randn(m, k).to(dtype)
                ref = Q.run_cpu_path(q, x.float(), b, None) if scheme.mode == "w8a8" else None
                x2 = x.float().double()
                if ref is None:
                    ref = x2 @ fmt.dequantize(q).double().T + b.double()
                else:
                    xq, sx = Q.quantize_rows(x.float())
                    ref = (xq.double() * sx.double()) @ fmt.dequantize(q).double().T + b.double()
                for bias in (b.to(dtype), None):
                    # the op's own wrapper (default config table), and several small tiles
                    # along M and N once per scheme and dtype family
                    small_too = m == 37 and bias is not None and dtype != torch.float16
                    for cfg in (None, small) if small_too else (None,):
                        if cfg is None:
                            y = d.triton(x, *[q.tensors[nm] for nm in names], bias, *trailing)
                        else:
                            group = trailing[0] if scheme.mode in ("int4", "bfp") else 1
                            y = Q.launch_quant_gemm(scheme.mode, x,
                                                    tuple(q.tensors[nm] for nm in names),
                                                    bias, group, n, config=cfg)
                        want = ref if bias is not None else ref - b.double()
                        db = fmt.sqnr_db(want, y.double())
                        checks += 1
                        if not (y.dtype == dtype and y.shape == (m, n) and db > FLOOR[dtype]):
                            failures.append(f"{scheme.label} m={m} {dtype} bias={bias is not None}"
                                            f" cfg={cfg} {y.dtype} {tuple(y.shape)} {db:.1f} dB")
    print(json.dumps({"checks": checks, "failures": failures}))
""")


def test_kernels_under_interpreter_match_reference(tmp_path, interpreted):
    result = interpreted(INTERPRETER_SCRIPT, timeout=600)
    assert result["failures"] == [] and result["checks"] == 5 * (2 * 3 * 2 + 2), result
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 4      # one module per kind


# ---- Triton on a GPU -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_kernels_on_gpu_match_reference(dtype, m):
    # fp16/bf16 dots round the dequantized weight to the activation dtype once (2^-9 / 2^-12
    # relative) and the output once: > 45 dB for bf16, > 60 dB for fp16; fp32 (ieee) > 100 dB.
    floor = {torch.float32: 100.0, torch.float16: 60.0, torch.bfloat16: 45.0}[dtype]
    n, k = 1000, 2048                          # N not a multiple of any BLOCK_N: masked tail
    w, b = torch.randn(n, k) * 0.02, torch.randn(n)
    x = torch.randn(m, k).to(dtype)
    for scheme in (QuantScheme("int8"), QuantScheme("w8a8"), QuantScheme("int4", 128),
                   QuantScheme("int4", 32), QuantScheme("bfp", 16)):
        perm = torch.randperm(k) if scheme.mode == "bfp" else None
        q = fmt.quantize(w.cuda(), scheme, perm=perm)
        assert q.layout != "planes"
        op, names, trailing = fmt.linear_call(q, b)
        y = op(x.cuda(), *[q.tensors[nm] for nm in names], b.to(dtype).cuda(), *trailing)
        qc = fmt.QuantizedWeight(q.scheme, q.shape, {k_: t.cpu() for k_, t in q.tensors.items()})
        assert y.dtype == dtype and y.shape == (m, n)
        assert fmt.sqnr_db(_reference(qc, x, b), y.cpu()) > floor, scheme.label


# ---- cost model and kernel inventory ---------------------------------------------------------

def test_cost_and_inventory_know_the_ops():
    import torch.fx as fx

    from optc.codegen.inventory import kernels_for_graph
    from optc.graph.cost import evaluate, node_cost

    q = fmt.quantize(torch.randn(96, 256) * 0.02, QuantScheme("int4", 32))
    op, names, trailing = fmt.linear_call(q, None)
    root = torch.nn.Module()
    for name in names:
        root.register_buffer(name, q.tensors[name])
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(op, (x, *[g.get_attr(nm) for nm in names], None, *trailing))
    g.output(node)
    gm = fx.GraphModule(root, g)
    x.meta["val"] = torch.empty(3, 256)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            n.meta["val"] = q.tensors[n.target]
    node.meta["val"] = torch.empty(3, 96)
    cost = node_cost(node)
    assert evaluate(cost.flops) == 2 * 3 * 96 * 256
    assert evaluate(cost.bytes) == 3 * 256 * 4 + q.nbytes() + 3 * 96 * 4
    (entry,) = kernels_for_graph(gm)
    assert entry["op"] == "optc.linear_int4" and entry["triton"].startswith("generated")
    assert f"[M=3: {Q.cpu_path('int4', 3, 256)} path" in entry["cpu"]
    assert entry["source"].startswith("# optc kernel linear_int4")


@pytest.mark.parametrize("scheme", [QuantScheme("int8"), QuantScheme("int4", 64)], ids=str)
def test_dequant_scratch_buffer_is_reused_safely(scheme):
    """The dequant paths write the bf16 weight into one per-thread scratch buffer: results of
    earlier calls stay intact, each call uses its own weight, and an input that requires grad
    (autograd keeps the weight for backward) gets a weight of its own."""
    qs = [fmt.quantize(torch.randn(96, 128, generator=torch.Generator().manual_seed(i)) * 0.02,
                       scheme) for i in range(2)]
    x = torch.randn(32, 128)
    ys = [Q.run_cpu_path(q, x, None, "dequant") for q in qs]
    for q, y in zip(qs, ys):
        assert fmt.sqnr_db(_reference(q, x, None), y) > FLOOR_DB
    xg = x.clone().requires_grad_()
    y = Q.run_cpu_path(qs[0], xg, None, "dequant")
    Q.run_cpu_path(qs[1], x, None, "dequant")            # overwrites the scratch buffer
    y.sum().backward()
    want = fmt.dequantize(qs[0]).sum(0).expand_as(x)
    assert torch.allclose(xg.grad, want, rtol=2e-2, atol=1e-3)

"""optc.quant.formats: schemes, exact round trips, the tile-64 int4 layout, SQNR floors, the
linear_call contract.

SQNR floors are for Gaussian weights W ~ N(0, 0.02^2) of shape (256, 512), from the uniform
quantization-noise model (noise power step^2 / 12, signal power sigma^2), with the expected
maximum of n Gaussian samples (E max|x| ~ 3.2 sigma over 512, 2.6 over 128 values of a group,
2.1 over 32):
  int8 per channel:  step = 3.2 sigma / 127          -> 10 log10(12 (127 / 3.2)^2)    = 42.8 dB
  int4 g128 (asym):  step = (2 * 2.6 sigma) / 15      -> 10 log10(12 (15 / 5.2)^2)     = 20.0 dB
  int4 g32  (asym):  step = (2 * 2.1 sigma) / 15      -> 10 log10(12 (15 / 4.2)^2)     = 21.9 dB
  bfp 8-bit (b16/32): step = 2^e in (amax/127, 2 amax/127], ~1.44 amax/127 on average
                      (log-uniform)                   -> 10 log10(12 (127 / (1.44*2.1))^2) = 43.3 dB
  bfp 4-bit (b32):    the same with qmax = 7          -> 18.2 dB (fewer levels: clamping and
                      the rounding of few levels cost ~1 dB more in practice)
Floors sit 1.5-3 dB under these (the maxima vary from row to row); a wrong scale, a dropped
zero point or a nibble swap costs tens of dB, far below any floor.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from optc.ops import quant as Q
from optc.quant import formats as fmt
from optc.quant.formats import QuantFormatError, QuantScheme

INT8, W8A8 = QuantScheme("int8"), QuantScheme("w8a8")
INT4_128, INT4_32, INT4_64 = (QuantScheme("int4", g) for g in (128, 32, 64))
BFP16, BFP32 = QuantScheme("bfp", 16), QuantScheme("bfp", 32)
BFP4 = QuantScheme("bfp", 32, mantissa_bits=4)
BFP6 = QuantScheme("bfp", 16, mantissa_bits=6)
# (scheme, layout): every format and bfp layout the ops accept
CASES = [(INT8, None), (W8A8, None), (INT4_128, None), (INT4_32, None), (INT4_64, None),
         (BFP16, "blocks"), (BFP32, "blocks"), (BFP32, "planes"), (BFP4, "planes"),
         (BFP4, "blocks"), (BFP6, "blocks")]
IDS = [f"{s.label}-{lay or 'default'}" for s, lay in CASES]


def _weight(n: int = 256, k: int = 512) -> torch.Tensor:
    return torch.randn(n, k) * 0.02


# ---- schemes ---------------------------------------------------------------------------------

def test_scheme_round_trips_through_json():
    for s, _ in CASES:
        d = json.loads(json.dumps(s.to_dict()))
        assert QuantScheme.from_dict(d) == s and d["version"] == QuantScheme.VERSION


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="int3"), "mode"),
    (dict(mode="int4"), "group_size"),
    (dict(mode="int4", group_size=48), "group_size"),
    (dict(mode="bfp", group_size=64), "block"),
    (dict(mode="int8", group_size=32), "per output channel"),
    (dict(mode="bfp", group_size=16, mantissa_bits=9), "mantissa_bits"),
    (dict(mode="int8", mantissa_bits=4), "bfp only"),
    (dict(mode="int4", group_size=True), "group_size"),
])
def test_scheme_rejects_bad_fields(kwargs, match):
    with pytest.raises(QuantFormatError, match=match):
        QuantScheme(**kwargs)


def test_scheme_from_dict_rejects_unknown_fields_and_versions():
    with pytest.raises(QuantFormatError, match="unknown"):
        QuantScheme.from_dict({"mode": "int8", "bits": 8})
    with pytest.raises(QuantFormatError, match="version"):
        QuantScheme.from_dict({"mode": "int8", "version": 99})


# ---- exact round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("scheme,layout", CASES, ids=IDS)
def test_requantizing_a_dequantized_weight_is_exact(scheme, layout):
    """Values on the grid come back bit-identical: every tensor, and the dequantized weight."""
    q = fmt.quantize(_weight(), scheme, layout=layout)
    w = fmt.dequantize(q)
    assert w.dtype == torch.float32 and tuple(w.shape) == q.shape == (256, 512)
    q2 = fmt.quantize(w, scheme, layout=layout)
    assert q2.tensors.keys() == q.tensors.keys()
    for name, t in q.tensors.items():
        assert torch.equal(q2.tensors[name], t), name
    assert torch.equal(fmt.dequantize(q2), w)


def test_int8_format_elementwise():
    w = _weight()
    q = fmt.quantize(w, INT8)
    qi, s = q.tensors["w_int8"], q.tensors["scales"]
    assert qi.dtype == torch.int8 and s.dtype == torch.bfloat16 and tuple(s.shape) == (256,)
    assert int(qi.abs().max()) == 127
    # rounding to nearest on the bf16 scale: every error is at most half a step
    err = (w - qi.float() * s.float()[:, None]).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-9).all())


def test_int4_format_elementwise():
    w = _weight()
    q = fmt.quantize(w, INT4_128)
    u = fmt.unpack_int4(q.tensors["w_int4"], 512).float()
    sz = q.tensors["scales_zeros"]
    assert sz.dtype == torch.bfloat16 and tuple(sz.shape) == (4, 256, 2)
    assert 0 <= int(u.min()) and int(u.max()) == 15
    s, z = fmt._group_rows(sz, 128)
    assert torch.equal(fmt.dequantize(q), (u - 8) * s + z)
    assert bool(((w - ((u - 8) * s + z)).abs() <= s / 2 + 1e-7).all())
    # asymmetric: each group's minimum is representable (up to the bf16 rounding of z)
    lo = w.view(256, 4, 128).amin(-1)
    assert torch.allclose((z - 8 * s)[:, ::128], lo, atol=float(s.max()) / 2)


def test_bfp_format_elementwise():
    w = _weight()
    q = fmt.quantize(w, BFP32, layout="blocks")
    m, e = q.tensors["mantissa"], q.tensors["exponent"]
    assert m.dtype == e.dtype == torch.int8 and tuple(e.shape) == (256, 16)
    step = torch.ldexp(torch.ones(()), e.float()).repeat_interleave(32, 1)
    assert torch.equal(fmt.dequantize(q), m.float() * step)
    # the shared exponent is the smallest that fits the block's largest magnitude
    amax = w.view(256, 16, 32).abs().amax(-1)
    assert bool((amax / torch.ldexp(torch.ones(()), e.float()) <= 127).all())
    assert bool((amax / torch.ldexp(torch.ones(()), e.float() - 1) > 127).all())


def test_bfp_planes_and_blocks_hold_the_same_numbers():
    w = _weight()
    for scheme in (BFP32, BFP4):
        perm = torch.randperm(512)
        blocks = fmt.quantize(w, scheme, perm=perm, layout="blocks")
        planes = fmt.quantize(w, scheme, perm=perm, layout="planes")
        for a, b in zip(fmt.bfp_mantissa_exponent(blocks), fmt.bfp_mantissa_exponent(planes)):
            assert torch.equal(a, b)
        assert torch.equal(fmt.dequantize(planes), fmt.dequantize(blocks))
        assert planes.tensors["index"].numel() == fmt.bfp_planes(scheme.mantissa_bits) * 512


def test_bfp_default_layout_follows_the_device():
    assert fmt.bfp_layout(BFP32, torch.device("cpu")) == "planes"
    assert fmt.bfp_layout(BFP16, torch.device("cpu")) == "blocks"      # no int4 kernel group 16
    assert fmt.bfp_layout(BFP32, torch.device("cuda")) == "blocks"
    with pytest.raises(QuantFormatError, match="planes"):
        fmt.quantize(_weight(), BFP16, layout="planes")


# ---- int4 tile-64 layout ---------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(64, 32), (128, 64), (256, 4096), (192, 96)])
def test_pack_int4_is_atens_cpu_layout(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = fmt.pack_int4(q)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(q, 2))
    assert torch.equal(fmt.unpack_int4(packed, k), q.to(torch.uint8))


def test_pack_int4_pads_rows_to_the_tile():
    q = torch.randint(0, 16, (80, 64), dtype=torch.int32)
    packed = fmt.pack_int4(q)
    assert tuple(packed.shape) == (128, 32)
    u = fmt.unpack_int4(packed, 64)
    assert torch.equal(u[:80], q.to(torch.uint8)) and not bool(u[80:].any())
    w = _weight(80, 256)
    qw = fmt.quantize(w, INT4_32)
    assert tuple(qw.tensors["scales_zeros"].shape) == (8, 128, 2)
    assert tuple(fmt.dequantize(qw).shape) == (80, 256)


# ---- SQNR floors (see the module docstring) --------------------------------------------------

SQNR_FLOOR_DB = {"int8": 40.0, "w8a8": 40.0, "int4-g128": 18.5, "int4-g64": 19.5,
                 "int4-g32": 20.5, "bfp8-b16": 40.0, "bfp8-b32": 40.0, "bfp4-b32": 15.5,
                 "bfp6-b16": 28.0}   # bfp6: qmax 31 -> 31.3 dB by the same model


@pytest.mark.parametrize("scheme,layout", CASES, ids=IDS)
def test_sqnr_floor(scheme, layout):
    w = _weight()
    got = fmt.sqnr_db(w, fmt.dequantize(fmt.quantize(w, scheme, layout=layout)))
    assert got >= SQNR_FLOOR_DB[scheme.label], got
    # and not suspiciously high: a format that stored the weight losslessly would be a bug
    assert got < SQNR_FLOOR_DB[scheme.label] + 8


def test_finer_groups_are_more_accurate():
    w = _weight()
    db = [fmt.sqnr_db(w, fmt.fake_quantize(w, s)) for s in (INT4_128, INT4_64, INT4_32)]
    assert db[0] < db[1] < db[2]


def test_reordering_outlier_channels_into_one_block_helps_bfp():
    """The point of perm: 16 outlier input channels spread over every block force large
    exponents everywhere; gathered into one block of 16, they cost only that block."""
    w = _weight()
    outliers = torch.arange(0, 512, 32)                   # one per 32-block
    w[:, outliers] *= 60
    plain = fmt.sqnr_db(w, fmt.dequantize(fmt.quantize(w, BFP16, layout="blocks")))
    rest = torch.ones(512, dtype=torch.bool)
    rest[outliers] = False
    perm = torch.cat([outliers, torch.arange(512)[rest]])
    q = fmt.quantize(w, BFP16, perm=perm, layout="blocks")
    reordered = fmt.sqnr_db(w, fmt.dequantize(q))          # original channel order back
    inliers = fmt.sqnr_db(w[:, rest], fmt.dequantize(q)[:, rest])
    assert reordered > plain
    inl_plain = fmt.sqnr_db(w[:, rest], fmt.dequantize(fmt.quantize(w, BFP16, layout="blocks"))[:, rest])
    assert inliers > inl_plain + 10


def test_sqnr_db():
    a = torch.randn(100)
    assert fmt.sqnr_db(a, a) == math.inf
    assert fmt.sqnr_db(a, a * 0.9) == pytest.approx(20.0)
    assert fmt.sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


# ---- in_scale, perm, checks ------------------------------------------------------------------

def test_in_scale_quantizes_the_scaled_weight():
    w = _weight()
    s = torch.rand(512) + 0.5
    a = fmt.quantize(w, INT4_128, in_scale=s)
    b = fmt.quantize(w * s, INT4_128)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name])
    with pytest.raises(QuantFormatError, match="in_scale"):
        fmt.quantize(w, INT8, in_scale=torch.zeros(512))
    with pytest.raises(QuantFormatError, match="in_scale"):
        fmt.quantize(w, INT8, in_scale=torch.ones(3))


def test_bad_inputs_raise_clear_errors():
    w = _weight()
    with pytest.raises(QuantFormatError, match="K=500 is not a multiple"):
        fmt.quantize(torch.randn(64, 500), INT4_128)
    with pytest.raises(QuantFormatError, match="floating-point"):
        fmt.quantize(w.to(torch.int32), INT8)
    with pytest.raises(QuantFormatError, match=r"\(N, K\)"):
        fmt.quantize(torch.randn(512), INT8)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(QuantFormatError, match="inf"):
        fmt.quantize(bad, INT8)
    with pytest.raises(QuantFormatError, match="perm is for bfp"):
        fmt.quantize(w, INT8, perm=torch.arange(512))
    with pytest.raises(QuantFormatError, match="permutation"):
        fmt.quantize(w, BFP16, perm=torch.zeros(512, dtype=torch.int64))
    assert fmt.unsupported_reason((64, 500), INT4_32) is not None
    assert fmt.unsupported_reason((64, 512), INT4_128) is None
    assert fmt.unsupported_reason((64, 48), BFP16) is None


def test_zero_and_constant_weights():
    for scheme, layout in CASES:
        for w in (torch.zeros(64, 128), torch.full((64, 128), 0.25)):
            got = fmt.dequantize(fmt.quantize(w, scheme, layout=layout))
            assert torch.allclose(got, w, atol=2 ** -9), scheme.label


def test_nbytes_is_the_storage():
    assert fmt.quantize(_weight(), INT8).nbytes() == 256 * 512 + 256 * 2
    assert fmt.quantize(_weight(), INT4_128).nbytes() == 256 * 256 + 4 * 256 * 2 * 2
    blocks = fmt.quantize(_weight(), BFP32, layout="blocks")
    assert blocks.nbytes() == 256 * 512 + 256 * 16 + 512 * 8


def test_fake_quantize_keeps_dtype():
    w = _weight().to(torch.bfloat16)
    for scheme, _ in CASES:
        out = fmt.fake_quantize(w, scheme)
        assert out.dtype == torch.bfloat16 and out.shape == w.shape


# ---- linear_call -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,layout", CASES, ids=IDS)
def test_linear_call_contract(scheme, layout):
    """op(x, *[tensors[name]], bias, *trailing) computes x @ dequantize(q).T + bias."""
    w, b = _weight(96, 256), torch.randn(96)
    q = fmt.quantize(w, scheme, layout=layout)
    op, names, trailing = fmt.linear_call(q, b)
    assert set(names) == set(q.tensors) and all(not isinstance(t, torch.Tensor) for t in trailing)
    assert op.namespace == "optc"
    x = torch.randn(2, 3, 256)
    y = op(x, *[q.tensors[n] for n in names], b, *trailing)
    ref = x @ fmt.dequantize(q).T + b
    assert y.shape == (2, 3, 96) and y.dtype == x.dtype
    floor = 36.0 if scheme.mode == "w8a8" else 48.0   # test_ops_quant.py justifies both
    assert fmt.sqnr_db(ref, y) > floor
    y0 = op(x, *[q.tensors[n] for n in names], None, *trailing)
    assert fmt.sqnr_db(ref - b, y0) > floor
    with pytest.raises(QuantFormatError, match="bias"):
        fmt.linear_call(q, torch.randn(3))
    assert Q.kind_of(q) in Q.CPU_IMPLS


@pytest.mark.parametrize("scheme,layout", CASES, ids=IDS)
def test_fake_quantize_is_dequantize_of_quantize(scheme, layout):
    w = _weight(96, 256)
    assert torch.equal(fmt.fake_quantize(w, scheme),
                       fmt.dequantize(fmt.quantize(w, scheme, layout=layout)))

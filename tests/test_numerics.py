"""Tests for qtoolkit.numerics against plain float64 references written here and
against torch's reference fake-quant ops (oracles only)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtoolkit.numerics import (
    SCALE_EPS,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    multiply_by_quantized_multiplier,
    quantize,
    quantize_multiplier,
)
from qtoolkit.spec import QuantSpec, quant_range

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# float64 references (DESIGN.md's numerics contract, written out plainly)
# --------------------------------------------------------------------------------------


def ref_qparams(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        s = max(-lo, hi) / ((qmax - qmin) / 2.0)
        s = max(s, SCALE_EPS)
        return s, (qmin + qmax + 1) // 2
    s = (hi - lo) / (qmax - qmin)
    s = max(s, SCALE_EPS)
    z = qmin - round(lo / s)  # Python round: half to even, like torch.round
    return s, min(max(z, qmin), qmax)


def ref_codes(x: torch.Tensor, s: float, z: int, qmin: int, qmax: int) -> torch.Tensor:
    v = x.double() / s
    return torch.clamp(torch.round(v) + z, qmin, qmax)


def near_half(x: torch.Tensor, s: float, tol: float = 1e-3) -> torch.Tensor:
    """Elements whose x/s is within ``tol`` of a rounding boundary (k + 0.5)."""
    v = x.double() / s
    return ((v - torch.floor(v)) - 0.5).abs() < tol


SPECS = [
    QuantSpec(bits=b, signed=sg, symmetric=sy, narrow_range=nr)
    for b in (2, 4, 8)
    for sg in (True, False)
    for sy in (True, False)
    for nr in (False, True)
]


# --------------------------------------------------------------------------------------
# qparams
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_compute_qparams_matches_float64_reference(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(spec.bits * 7 + spec.signed * 3 + spec.symmetric)
    for _ in range(50):
        a, b = (torch.randn(2, generator=g) * torch.rand(1, generator=g) * 10).tolist()
        lo, hi = min(a, b), max(a, b)
        if torch.rand(1, generator=g) < 0.3:  # one-sided ranges too
            lo = abs(lo)
            hi = lo + abs(hi)
        s, z = compute_qparams(torch.tensor(lo), torch.tensor(hi), spec.qmin, spec.qmax, spec.symmetric)
        # the code under test works in float32: the reference sees the same float32 inputs
        lo32, hi32 = float(torch.tensor(lo)), float(torch.tensor(hi))
        s_ref, z_ref = ref_qparams(lo32, hi32, spec.qmin, spec.qmax, spec.symmetric)
        assert s.dtype == torch.float32 and z.dtype == torch.int32
        assert s.shape == () and z.shape == ()
        assert math.isclose(float(s), s_ref, rel_tol=2e-6)
        ratio = min(lo32, 0.0) / s_ref
        if abs(ratio - math.floor(ratio) - 0.5) > 1e-4:  # not at a rounding tie
            assert int(z) == z_ref
        else:
            assert abs(int(z) - z_ref) <= 1


def test_compute_qparams_examples() -> None:
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), -127, 127, True)
    assert float(s) == pytest.approx(1 / 127) and int(z) == 0
    s, z = compute_qparams(torch.tensor(0.0), torch.tensor(2.55), 0, 255, False)
    assert float(s) == pytest.approx(0.01) and int(z) == 0
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert float(s) == pytest.approx(4 / 255) and int(z) == round(255 / 4)
    # symmetric unsigned: the middle code
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), 0, 255, True)
    assert int(z) == 128 and float(s) == pytest.approx(1 / 127.5)


def test_compute_qparams_per_channel_vectors() -> None:
    lo = torch.tensor([-1.0, 0.0, -3.0, 0.0])  # (-1, 1.3): no rounding tie for the zero point
    hi = torch.tensor([1.3, 2.0, 0.5, 0.0])
    s, z = compute_qparams(lo, hi, 0, 255, False)
    assert s.shape == (4,) and z.shape == (4,)
    for i in range(4):
        s_ref, z_ref = ref_qparams(float(lo[i]), float(hi[i]), 0, 255, False)
        assert math.isclose(float(s[i]), s_ref, rel_tol=2e-6)
        assert int(z[i]) == z_ref


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5, 1e-30])
def test_degenerate_ranges_give_finite_positive_scale(symmetric: bool, value: float) -> None:
    x = torch.full((10,), value)
    s, z = compute_qparams(x.min(), x.max(), -128, 127, symmetric)
    assert torch.isfinite(s) and float(s) > 0
    assert -128 <= int(z) <= 127
    y = fake_quantize(x, s, z, -128, 127)
    assert torch.isfinite(y).all()
    # all-zero channel among normal ones
    w = torch.randn(4, 8)
    w[2] = 0.0
    s, z = compute_qparams(w.amin(1), w.amax(1), -127, 127, symmetric)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert float(s[2]) == pytest.approx(SCALE_EPS)
    assert (fake_quantize(w, s, z, -127, 127, axis=0)[2] == 0).all()


def test_compute_qparams_errors() -> None:
    with pytest.raises(ValueError):
        compute_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 0, 255, False)
    with pytest.raises(ValueError):
        compute_qparams(torch.tensor(2.0), torch.tensor(1.0), 0, 255, False)
    with pytest.raises(ValueError):
        compute_qparams(torch.tensor(0.0), torch.tensor(1.0), 5, 5, False)


# --------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_quantize_dequantize_match_reference(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(11 + spec.bits)
    x = torch.randn(1000, generator=g) * 3
    s, z = ref_qparams(-4.0, 5.0, spec.qmin, spec.qmax, spec.symmetric)
    q = quantize(x, s, z, spec.qmin, spec.qmax)
    assert q.dtype in (torch.int8, torch.uint8)
    ref = ref_codes(x, s, z, spec.qmin, spec.qmax)
    ok = ~near_half(x, s)
    assert torch.equal(q.double()[ok], ref[ok])
    assert (q.double() - ref).abs().max() <= 1
    xd = dequantize(q, s, z)
    assert torch.allclose(xd.double(), (q.double() - z) * s, rtol=1e-6, atol=1e-7)


def test_quantize_per_channel_and_dtypes() -> None:
    x = torch.randn(3, 4, 5)
    s = torch.tensor([0.1, 0.2, 0.05, 0.3])
    z = torch.tensor([0, 3, -2, 1], dtype=torch.int32)
    q = quantize(x, s, z, -128, 127, axis=1)
    ref = torch.clamp(torch.round(x.double() / s.double().view(1, 4, 1)) + z.view(1, 4, 1), -128, 127)
    assert q.dtype == torch.int8
    assert (q.double() - ref).abs().max() <= 1
    assert quantize(x, 0.1, 0, 0, 255).dtype == torch.uint8
    assert quantize(x, 0.1, 0, 0, 15).dtype == torch.int8  # smallest dtype that holds the codes
    assert quantize(x, 0.001, 0, -(2**15), 2**15 - 1).dtype == torch.int16
    with pytest.raises(TypeError):
        quantize(torch.arange(4), 0.1, 0, -128, 127)


# --------------------------------------------------------------------------------------
# fake quantization vs torch's reference ops (exact)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quantize_per_tensor_equals_torch(bits: int, signed: bool) -> None:
    qmin, qmax = quant_range(bits, signed)
    g = torch.Generator().manual_seed(bits * 2 + signed)
    for trial in range(4):
        x = (torch.randn(7, 33, 5, generator=g) * (trial + 1)).requires_grad_(True)
        lo, hi = float(x.detach().min()) * 0.7, float(x.detach().max()) * 0.7  # some values clip
        s, z = compute_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric=trial % 2 == 0)
        ours = fake_quantize(x, s, z, qmin, qmax)
        x2 = x.detach().clone().requires_grad_(True)
        ref = torch.fake_quantize_per_tensor_affine(x2, s, z, qmin, qmax)
        assert torch.equal(ours, ref)
        up = torch.randn(x.shape, generator=g)
        ours.backward(up)
        ref.backward(up)
        assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (2, False)])
def test_fake_quantize_per_channel_equals_torch(axis: int, bits: int, signed: bool) -> None:
    qmin, qmax = quant_range(bits, signed)
    g = torch.Generator().manual_seed(axis * 10 + bits)
    x = (torch.randn(6, 9, 4, 3, generator=g) * torch.rand(1, 9, 1, 1, generator=g) * 4).requires_grad_(True)
    dims = [d for d in range(x.dim()) if d != axis]
    lo = x.detach().amin(dim=dims) * 0.8
    hi = x.detach().amax(dim=dims) * 0.8
    s, z = compute_qparams(lo, hi, qmin, qmax, symmetric=False)
    ours = fake_quantize(x, s, z, qmin, qmax, axis=axis)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(x2, s, z, axis, qmin, qmax)
    assert torch.equal(ours, ref)
    up = torch.randn(x.shape, generator=g)
    ours.backward(up)
    ref.backward(up)
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_quantize_low_precision_inputs(dtype: torch.dtype) -> None:
    x = torch.randn(100).to(dtype)
    s, z = torch.tensor(0.05), torch.tensor(10, dtype=torch.int32)
    y = fake_quantize(x, s, z, 0, 255)
    assert y.dtype == dtype
    ref = torch.fake_quantize_per_tensor_affine(x.float(), s, z, 0, 255).to(dtype)
    assert torch.equal(y, ref)


# --------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow=st.booleans(),
    center=st.floats(-50, 50),
    width=st.floats(1e-3, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_error_bound_codes_and_exact_zero(shape, bits, signed, symmetric, narrow, center, width, seed) -> None:
    qmin, qmax = quant_range(bits, signed, narrow)
    g = torch.Generator().manual_seed(seed)
    x = center + width * (torch.rand(shape, generator=g) - 0.5)
    x.view(-1)[0] = 0.0  # real zero must come out exact
    s, z = compute_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    sf, zi = float(s), int(z)
    assert sf > 0 and math.isfinite(sf) and qmin <= zi <= qmax
    q = quantize(x, s, z, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    xh = fake_quantize(x, s, z, qmin, qmax)
    assert float(xh.view(-1)[0]) == 0.0
    # inside the clip range the error is at most half a step
    lo_clip, hi_clip = (qmin - zi) * sf, (qmax - zi) * sf
    xd = x.double()
    inside = (xd >= lo_clip) & (xd <= hi_clip)
    err = (xh.double() - xd).abs()[inside]
    tol = sf * (0.5 + 1e-4) + 1e-6 * xd.abs().max().item()
    if err.numel():
        assert float(err.max()) <= tol
    # the calibration range itself lies (within half a step) inside the clip range
    assert lo_clip <= float(x.min().clamp(max=0)) + sf * 0.5 + 1e-6 * abs(float(x.min()))
    assert hi_clip >= float(x.max().clamp(min=0)) - sf * 0.5 - 1e-6 * abs(float(x.max()))
    # matches the float64 reference codes away from rounding ties
    ref = ref_codes(x, sf, zi, qmin, qmax)
    ok = ~near_half(x, sf)
    assert torch.equal(q.double()[ok], ref[ok])


# --------------------------------------------------------------------------------------
# STE and LSQ gradients
# --------------------------------------------------------------------------------------


def test_ste_gradient_is_one_inside_zero_outside() -> None:
    s, z, qmin, qmax = 0.1, 3, -8, 7
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(5000, generator=g) - 0.5) * 4  # codes well beyond both ends
    x = x[~near_half(x, s, 1e-3)].requires_grad_(True)
    y = fake_quantize(x, torch.tensor(s), torch.tensor(z, dtype=torch.int32), qmin, qmax)
    up = torch.randn(x.shape, generator=g)
    y.backward(up)
    codes = torch.round(x.detach().double() / s) + z
    inside = (codes >= qmin) & (codes <= qmax)
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, torch.where(inside, up, torch.zeros_like(up)))


def lsq_reference(x, s, z, qmin, qmax, up, axis=None):
    """Esser et al. 2020: dx̂/ds = round(v) - v inside, qmin - z below, qmax - z above
    (v = x/s, with our zero point), scaled by g = 1/sqrt(N * qmax); float64."""
    xd, ud = x.double(), up.double()
    if axis is None:
        sd, zd = torch.tensor(float(s), dtype=torch.float64), torch.tensor(float(z), dtype=torch.float64)
        n = x.numel()
    else:
        shape = [1] * x.dim()
        shape[axis] = -1
        sd, zd = s.double().view(shape), z.double().view(shape)
        n = x.numel() // x.shape[axis]
    v = xd / sd
    codes = torch.round(v) + zd
    d = torch.where(codes < qmin, qmin - zd, torch.where(codes > qmax, qmax - zd, torch.round(v) - v))
    gfac = 1.0 / math.sqrt(n * qmax)
    prod = ud * d * gfac
    if axis is None:
        return prod.sum()
    dims = [i for i in range(x.dim()) if i != axis]
    return prod.sum(dim=dims)


def test_lsq_scale_gradient_matches_esser_formula_per_tensor() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2000, generator=g) * 2
    x = x[~near_half(x, 0.13, 1e-3)]
    s = torch.tensor(0.13, requires_grad=True)
    z = torch.tensor(2, dtype=torch.int32)
    up = torch.randn(x.shape, generator=g)
    y = fake_quantize_lsq(x, s, z, -8, 7)
    y.backward(up)
    ref = lsq_reference(x, 0.13, 2, -8, 7, up)
    assert float(s.grad) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    # forward equals plain fake quantization
    assert torch.equal(y.detach(), fake_quantize(x, s.detach(), z, -8, 7))


def test_lsq_scale_gradient_matches_esser_formula_per_channel() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 300, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    s = torch.tensor([0.1, 0.2, 0.3, 0.5], requires_grad=True)
    z = torch.zeros(4, dtype=torch.int32)
    up = torch.randn(x.shape, generator=g)
    fake_quantize_lsq(x, s, z, -7, 7, axis=0).backward(up)
    ref = lsq_reference(x, s.detach(), z, -7, 7, up, axis=0)
    assert torch.allclose(s.grad.double(), ref, rtol=1e-4, atol=1e-6)


def test_lsq_scale_gradient_numerically_positive_direction() -> None:
    """Finite differences of the expected loss agree in sign with the LSQ gradient
    when the scale is far too small (clipping dominates)."""
    x = torch.linspace(-3, 3, 601)
    s = torch.tensor(0.01, requires_grad=True)
    loss = ((fake_quantize_lsq(x, s, 0, -8, 7, grad_factor=1.0) - x) ** 2).sum()
    loss.backward()
    assert float(s.grad) < 0  # increasing s reduces the loss


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_spec_bits_out_of_range() -> None:
    with pytest.raises(ValueError):
        QuantSpec(bits=1)
    with pytest.raises(ValueError):
        QuantSpec(bits=17)
    with pytest.raises(TypeError):
        QuantSpec(bits=8.0)  # type: ignore[arg-type]


def test_fake_quantize_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="axis"):
        fake_quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -128, 127, axis=2)
    with pytest.raises(ValueError):
        fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), -128, 127, axis=1)  # wrong count
    with pytest.raises(TypeError):
        fake_quantize(torch.arange(12).reshape(3, 4), 0.1, 0, -128, 127)
    with pytest.raises(TypeError):
        fake_quantize_lsq(torch.arange(12), torch.tensor(0.1), 0, -128, 127)


# --------------------------------------------------------------------------------------
# fixed point
# --------------------------------------------------------------------------------------


def test_quantize_multiplier_range_and_accuracy() -> None:
    g = torch.Generator().manual_seed(3)
    ms = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(math.log(1e-6), math.log(100.0), generator=g)).tolist()
    ms += [0.5, 0.75, 1.0, 1 - 2**-40, 2**-20]
    for m in ms:
        m0, n = quantize_multiplier(m)
        assert isinstance(m0, int) and isinstance(n, int)
        assert 2**30 <= m0 < 2**31
        recon = m0 * 2.0 ** (-31 - n)
        assert abs(recon - m) / m <= 2**-31
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            quantize_multiplier(bad)


def test_multiply_by_quantized_multiplier_within_one_unit() -> None:
    g = torch.Generator().manual_seed(4)
    ms = torch.rand(200, generator=g, dtype=torch.float64).clamp(min=1e-4).tolist()
    x = torch.randint(-(2**31), 2**31, (500,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, -1, 2**31 - 1, -(2**31)])])
    for m in ms:
        m0, n = quantize_multiplier(m)
        got = multiply_by_quantized_multiplier(x, m0, n)
        ref = torch.round(x.double() * m)
        assert (got.double() - ref).abs().max() <= 1, m


def _gemmlowp_srdhm(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul, transcribed with Python integers (C++ division truncates)."""
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    v = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    q = abs(v) // (1 << 31)
    return q if v >= 0 else -q


def _gemmlowp_rdbpot(x: int, e: int) -> int:
    """gemmlowp's RoundingDivideByPOT, transcribed with Python integers (two's-complement & and >>)."""
    mask = (1 << e) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if (x & mask) > threshold else 0)


def test_gemmlowp_primitives_match_a_transcription_of_gemmlowp() -> None:
    from qtoolkit.numerics import rounding_divide_by_pot, saturating_rounding_doubling_high_mul

    g = torch.Generator().manual_seed(6)
    a = torch.randint(-(2**31), 2**31, (400,), generator=g, dtype=torch.int64)
    edges = [0, 1, -1, 2**30, -(2**30), 2**31 - 1, -(2**31), 3 * 2**29, -3 * 2**29]
    a = torch.cat([a, torch.tensor(edges)])
    bs = [2**30, 2**31 - 1, 1_518_500_250, 1 << 30 | 12345, -(2**31), -1, 0, 3]
    for b in bs:
        got = saturating_rounding_doubling_high_mul(a, b).tolist()
        assert got == [_gemmlowp_srdhm(v, b) for v in a.tolist()], b
    # exact ties: a·b = (k + 1/2)·2^31 with both signs
    ties = torch.tensor([2**30, -(2**30), 3 * 2**30, -3 * 2**30])
    assert saturating_rounding_doubling_high_mul(ties, 1).tolist() == [_gemmlowp_srdhm(v, 1) for v in ties.tolist()]
    x = torch.cat([a, torch.arange(-40, 41)])
    for e in (0, 1, 2, 5, 17, 31):
        got = rounding_divide_by_pot(x, e).tolist()
        assert got == [_gemmlowp_rdbpot(v, e) for v in x.tolist()], e


def test_single_rounding_multiplier_is_exactly_rounded() -> None:
    """Single-rounding requantization equals round-half-up of the exact rational
    ``x·M0 / 2^(31+n)`` (Python integers as the reference), for random multipliers
    and int32 inputs, and is within one unit of the float64 product ``x·M``."""
    from qtoolkit.numerics import multiply_by_quantized_multiplier_single_rounding as mul1

    g = torch.Generator().manual_seed(5)
    ms = torch.rand(60, generator=g, dtype=torch.float64).clamp(min=1e-5).tolist()
    x = torch.randint(-(2**31), 2**31, (300,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, -1, 2**31 - 1, -(2**31)])])
    for m in ms:
        m0, n = quantize_multiplier(m)
        got = mul1(x, m0, n).tolist()
        r = 31 + n
        exact = [(v * m0 + (1 << (r - 1))) // (1 << r) for v in x.tolist()]  # floor((p + half) / 2^r)
        assert got == exact, m
        assert (torch.tensor(got, dtype=torch.float64) - x.double() * m).abs().max() <= 1, m


def test_requantize_rounding_modes() -> None:
    from qtoolkit.numerics import requantize

    acc = torch.arange(-5000, 5000, 7)
    m0, n = quantize_multiplier(0.0123)
    single = requantize(acc, m0, n, 3, -128, 127)
    gem = requantize(acc, m0, n, 3, -128, 127, rounding="gemmlowp")
    ref = torch.clamp(torch.floor(acc.double() * 0.0123 + 0.5) + 3, -128, 127)
    assert (single.double() - ref).abs().max() <= 1 and (gem.double() - ref).abs().max() <= 1
    with pytest.raises(ValueError, match="rounding"):
        requantize(acc, m0, n, 0, -128, 127, rounding="nearest")


# --------------------------------------------------------------------------------------
# the QAT kernels against float64 (contract: x * (1/s), round half to even, + z, clamp)
# --------------------------------------------------------------------------------------


def _ties_and_random(s: float, z: int, qmin: int, qmax: int, seed: int) -> torch.Tensor:
    """Exact ties (k + 0.5)·s for every code and beyond both ends (s a power of two), plus random values."""
    k = torch.arange(qmin - z - 3, qmax - z + 3, dtype=torch.float64)
    ties = (k + 0.5) * s
    g = torch.Generator().manual_seed(seed)
    rnd = (torch.rand(4000, generator=g, dtype=torch.float64) - 0.5) * (qmax - qmin + 8) * s - z * s
    return torch.cat([ties, rnd]).float()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed,z_kind", [(True, "zero"), (False, "zero"), (False, "mid"), (True, "offset")])
def test_fake_quantize_and_ste_match_float64_reference(bits: int, signed: bool, z_kind: str) -> None:
    qmin, qmax = quant_range(bits, signed)
    z = {"zero": 0 if signed else qmin, "mid": (qmin + qmax + 1) // 2, "offset": qmin + 1}[z_kind]
    s = 2.0 ** -5
    x = _ties_and_random(s, z, qmin, qmax, seed=bits).requires_grad_(True)
    y = fake_quantize(x, torch.tensor(s), torch.tensor(z, dtype=torch.int32), qmin, qmax)
    xd = x.detach().double()
    codes = torch.round(xd * (1.0 / s)) + z  # float64 round half to even
    ref = (codes.clamp(qmin, qmax) - z) * s
    assert torch.equal(y.detach().double(), ref)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y.backward(up)
    inside = (codes >= qmin) & (codes <= qmax)
    assert torch.equal(x.grad, torch.where(inside, up, torch.zeros_like(up)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_lsq_matches_float64_reference_with_zero_point(bits: int, axis: int | None) -> None:
    qmin, qmax = quant_range(bits, signed=False)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 500, generator=g) * 2
    if axis is None:
        s = torch.tensor(0.07, requires_grad=True)
        z = torch.tensor(qmin + (qmax - qmin) // 3, dtype=torch.int32)
        x = x[:, ~near_half(x, 0.07, 1e-3).any(0)]
    else:
        s = torch.tensor([0.05, 0.1, 0.2, 0.4], requires_grad=True)
        z = torch.tensor([qmin, qmin + 1, (qmin + qmax) // 2, qmax - 1], dtype=torch.int32)
    xr = x.clone().requires_grad_(True)
    up = torch.randn(x.shape, generator=g)
    y = fake_quantize_lsq(xr, s, z, qmin, qmax, axis=axis)
    y.backward(up)
    ref = lsq_reference(x, s.detach() if axis is not None else float(s.detach()), z, qmin, qmax, up, axis=axis)
    assert torch.allclose(s.grad.double(), ref.reshape(s.shape), rtol=1e-4, atol=1e-6)
    # forward = plain fake quantization, STE gradient = inside mask (float64 codes)
    assert torch.equal(y.detach(), fake_quantize(x, s.detach(), z, qmin, qmax, axis=axis))
    shape = [1] * x.dim() if axis is None else [-1, 1]
    codes = torch.round(x.double() * (1.0 / s.detach().double().reshape(shape))) + z.double().reshape(shape)
    assert torch.equal(xr.grad, torch.where((codes >= qmin) & (codes <= qmax), up, torch.zeros_like(up)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fake_quantize_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 5, 5, generator=g) * 3
    up = torch.randn(x.shape, generator=g)
    for axis, s, z in ((None, torch.tensor(0.05), torch.tensor(3, dtype=torch.int32)),
                       (1, torch.rand(16, generator=g) * 0.1 + 0.01, torch.zeros(16, dtype=torch.int32))):
        outs = []
        for dev in ("cpu", "cuda"):
            xi = x.to(dev).requires_grad_(True)
            y = fake_quantize(xi, s.to(dev), z.to(dev), 0, 15, axis=axis)
            y.backward(up.to(dev))
            outs.append((y.detach().cpu(), xi.grad.cpu()))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        sl = s.clone().requires_grad_(True)
        sc = s.cuda().requires_grad_(True)
        fake_quantize_lsq(x, sl, z, 0, 15, axis=axis).backward(up)
        fake_quantize_lsq(x.cuda(), sc, z.cuda(), 0, 15, axis=axis).backward(up.cuda())
        assert torch.allclose(sl.grad, sc.grad.cpu(), rtol=1e-4, atol=1e-6)

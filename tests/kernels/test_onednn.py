"""Correctness of qtoolkit.kernels.onednn against a float64 reference built from the same int8 codes.

Reference: ``y = conv((x_q - zx) * sx, w_q * sw) + bias`` (+ residual, relu) in float64.
fp32 outputs must match within 1e-3 relative (to the output's magnitude); uint8/int8 outputs within
1 code of ``clamp(round(y / so) + zo)``; integer accumulations (unit scales) must match exactly.
Activation codes are drawn from ``[0, safe_activation_qmax()]`` so results are exact on CPUs
without VNNI too (see the module docstring on int16 saturation).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from qtoolkit.kernels import onednn

pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 ops unavailable on this CPU/build")

CL = torch.channels_last
QR = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _xmax() -> int:
    return min(255, onednn.safe_activation_qmax(127))


def _rand_x(shape, g):
    return torch.randint(0, _xmax() + 1, shape, dtype=torch.uint8, generator=g)


def _rand_w(shape, g, absmax=127):
    return torch.randint(-absmax, absmax + 1, shape, dtype=torch.int8, generator=g)


def _qparams(ref: torch.Tensor, dtype=torch.uint8):
    lo, hi = QR[dtype]
    rmin, rmax = min(ref.min().item(), 0.0), max(ref.max().item(), 0.0)
    s = max((rmax - rmin) / (hi - lo), 1e-6)
    z = int(min(max(round(lo - rmin / s), lo), hi))
    return s, z


def _quant_ref(ref: torch.Tensor, s: float, z: int, dtype) -> torch.Tensor:
    lo, hi = QR[dtype]
    return torch.clamp(torch.round(ref / s) + z, lo, hi)


def _assert_fp32_close(y: torch.Tensor, ref: torch.Tensor):
    assert y.dtype == torch.float32
    assert y.shape == ref.shape
    tol = 1e-3 * max(ref.abs().max().item(), 1e-6)
    err = (y.double() - ref).abs().max().item()
    assert err <= tol, f"max abs err {err} > {tol}"


def _assert_codes_close(y: torch.Tensor, ref_codes: torch.Tensor, dtype):
    assert y.dtype == dtype
    assert y.shape == ref_codes.shape
    diff = (y.double() - ref_codes).abs()
    assert diff.max().item() <= 1, f"max code diff {diff.max().item()}"
    # off-by-one only at rounding ties / fp32 vs fp64 boundaries: must be rare
    assert (diff > 0).double().mean().item() < 0.01


def _conv_ref(x, zx, sx, w, sw, b, stride, pad, dil, groups):
    wf = w.double() * sw.double().view(-1, 1, 1, 1)
    return F.conv2d((x.double() - zx) * sx, wf, None if b is None else b.double(), stride, pad, dil, groups)


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# (C, OC, H, k, stride, pad, dil, groups, bias)
CONV_CASES = [
    pytest.param(16, 32, 10, 3, 1, 1, 1, 1, True, id="dense"),
    pytest.param(16, 32, 10, 3, 1, 1, 1, 1, False, id="dense-nobias"),
    pytest.param(16, 16, 10, 3, 1, 1, 1, 16, True, id="depthwise"),
    pytest.param(16, 16, 11, 3, 2, 1, 1, 16, False, id="depthwise-s2-nobias"),
    pytest.param(16, 32, 11, 3, 2, 1, 1, 1, True, id="stride2"),
    pytest.param(8, 16, 12, 3, 1, 2, 2, 1, True, id="dilation2"),
    pytest.param(8, 16, 12, 3, 1, 0, 1, 1, True, id="pad0"),
    pytest.param(16, 32, 8, 1, 2, 0, 1, 1, False, id="1x1-s2"),
    pytest.param(3, 16, 16, 3, 1, 1, 1, 1, True, id="first-layer-c3"),
    pytest.param(16, 32, 8, 3, 1, 1, 1, 4, True, id="groups4"),
]


@pytest.mark.parametrize("C,OC,H,k,stride,pad,dil,groups,bias", CONV_CASES)
@pytest.mark.parametrize("post_op", ["none", "relu"])
def test_qconv_matches_reference(C, OC, H, k, stride, pad, dil, groups, bias, post_op):
    g = torch.Generator().manual_seed(C * 1000 + OC + H + k + stride + groups)
    x = _rand_x((2, C, H, H), g).contiguous(memory_format=CL)
    w = _rand_w((OC, C // groups, k, k), g)
    sw = torch.rand(OC, generator=g) * 0.01 + 0.001
    b = torch.randn(OC, generator=g) if bias else None
    sx, zx = 0.05, 37
    pw = onednn.prepack_conv_weight(w, sw, sx, zx, stride, pad, dil, groups)
    ref = _conv_ref(x, zx, sx, w, sw, b, stride, pad, dil, groups)
    if post_op == "relu":
        ref = ref.relu()

    y = onednn.qconv(x, sx, zx, pw, sw, None, b, stride, pad, dil, groups, post_op=post_op)
    _assert_fp32_close(y, ref)
    assert y.is_contiguous(memory_format=CL)

    for dtype in (torch.uint8, torch.int8):
        so, zo = _qparams(ref, dtype)
        yq = onednn.qconv(x, sx, zx, pw, sw, None, b, stride, pad, dil, groups, so, zo, dtype, post_op)
        _assert_codes_close(yq, _quant_ref(ref, so, zo, dtype), dtype)
        assert yq.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("groups", [1, 16])
def test_qconv_integer_accumulation_exact(groups):
    """Unit scales, zero bias: the fp32 output *is* the int32 accumulator and must match exactly."""
    g = torch.Generator().manual_seed(3)
    x = _rand_x((2, 16, 9, 9), g).contiguous(memory_format=CL)
    w = _rand_w((16, 16 // groups, 3, 3), g)
    ones = torch.ones(16)
    zx = 11
    pw = onednn.prepack_conv_weight(w, ones, 1.0, zx, 1, 1, 1, groups)
    y = onednn.qconv(x, 1.0, zx, pw, ones, None, None, 1, 1, 1, groups)
    acc = F.conv2d(x.double() - zx, w.double(), None, 1, 1, 1, groups)  # exact in float64
    assert torch.equal(y.double(), acc)
    # uint8 output with an integer-valued requantization is exact too (no rounding ties)
    yq = onednn.qconv(x, 1.0, zx, pw, ones, None, None, 1, 1, 1, groups, 256.0, 128, torch.uint8)
    refq = _quant_ref(acc, 256.0, 128, torch.uint8)
    assert (yq.double() - refq).abs().max().item() <= 1


def test_qconv_layouts_shapes_and_qparams_independent_of_prepack():
    g = torch.Generator().manual_seed(4)
    w = _rand_w((8, 4, 3, 3), g)
    sw = torch.full((8,), 0.02)
    pw = onednn.prepack_conv_weight(w, sw, 0.1, 5, 1, 1, 1, 1, input_shape=[1, 4, 6, 6])
    assert pw.shape == w.shape
    for shape, sx, zx in [((1, 4, 6, 6), 0.1, 5), ((3, 4, 9, 7), 0.3, 60), ((2, 4, 5, 5), 0.01, 0)]:
        x = _rand_x(shape, g)  # NCHW contiguous input is accepted
        y = onednn.qconv(x, sx, zx, pw, sw, None, None, 1, 1, 1, 1)
        _assert_fp32_close(y, _conv_ref(x, zx, sx, w, sw, None, 1, 1, 1, 1))
        assert y.is_contiguous(memory_format=CL)
        y_cl = onednn.qconv(x.contiguous(memory_format=CL), sx, zx, pw, sw, None, None, 1, 1, 1, 1)
        assert torch.equal(y, y_cl)


def test_qconv_uint8_chain_no_float_round_trip():
    g = torch.Generator().manual_seed(5)
    x = _rand_x((2, 8, 8, 8), g).contiguous(memory_format=CL)
    w1, w2 = _rand_w((8, 8, 3, 3), g), _rand_w((8, 8, 3, 3), g)
    s1, s2 = torch.full((8,), 0.004), torch.full((8,), 0.003)
    sx, zx = 0.05, 20
    p1 = onednn.prepack_conv_weight(w1, s1, sx, zx, 1, 1, 1, 1)
    ref1 = _conv_ref(x, zx, sx, w1, s1, None, 1, 1, 1, 1).relu()
    so = max(ref1.max().item(), 1e-6) / _xmax()  # keep the codes saturation-safe for the next conv
    h = onednn.qconv(x, sx, zx, p1, s1, None, None, 1, 1, 1, 1, so, 0, torch.uint8, "relu")
    assert h.dtype == torch.uint8 and h.is_contiguous(memory_format=CL)
    _assert_codes_close(h, _quant_ref(ref1, so, 0, torch.uint8), torch.uint8)
    p2 = onednn.prepack_conv_weight(w2, s2, so, 0, 1, 1, 1, 1)
    y = onednn.qconv(h, so, 0, p2, s2, None, None, 1, 1, 1, 1)
    _assert_fp32_close(y, _conv_ref(h, 0, so, w2, s2, None, 1, 1, 1, 1))


# residual dtype, output dtype
RES_CASES = [
    pytest.param(torch.uint8, torch.uint8, id="u8res-u8out"),
    pytest.param(torch.float32, torch.float32, id="f32res-f32out"),
    pytest.param(torch.uint8, torch.float32, id="u8res-f32out"),
    pytest.param(torch.float32, torch.uint8, id="f32res-u8out"),
    pytest.param(torch.int8, torch.int8, id="s8res-s8out"),
]


def _residual(shape, dtype, g):
    if dtype == torch.float32:
        r = torch.randn(shape, generator=g)
        return r, 1.0, 0, r.double()
    lo, hi = QR[dtype]
    r = torch.randint(lo, hi + 1, shape, generator=g).to(dtype)
    sr, zr = 0.03, (100 if dtype == torch.uint8 else -7)
    return r, sr, zr, (r.double() - zr) * sr


@pytest.mark.parametrize("res_dtype,out_dtype", RES_CASES)
@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 16)])
def test_qconv_residual_sum(res_dtype, out_dtype, post_op, stride, groups):
    g = torch.Generator().manual_seed(6 + stride + groups)
    C = OC = 16
    x = _rand_x((2, C, 8, 8), g).contiguous(memory_format=CL)
    w = _rand_w((OC, C // groups, 3, 3), g)
    sw = torch.rand(OC, generator=g) * 0.01 + 0.001
    b = torch.randn(OC, generator=g)
    sx, zx = 0.05, 64
    pw = onednn.prepack_conv_weight(w, sw, sx, zx, stride, 1, 1, groups)
    conv = _conv_ref(x, zx, sx, w, sw, b, stride, 1, 1, groups)
    r, sr, zr, rf = _residual(conv.shape, res_dtype, g)
    r = r.contiguous(memory_format=CL)
    r_before = r.clone()
    ref = conv + rf
    if post_op == "relu":
        ref = ref.relu()
    if out_dtype == torch.float32:
        so, zo = 1.0, 0
    else:
        so, zo = _qparams(ref, out_dtype)
    y = onednn.qconv(x, sx, zx, pw, sw, None, b, stride, 1, 1, groups, so, zo, out_dtype, post_op, r, sr, zr)
    assert torch.equal(r, r_before), "residual must not be modified unless residual_inplace=True"
    assert y.is_contiguous(memory_format=CL)
    if out_dtype == torch.float32:
        _assert_fp32_close(y, ref)
    else:
        _assert_codes_close(y, _quant_ref(ref, so, zo, out_dtype), out_dtype)

    # in-place accumulation gives the same result; NCHW residual is accepted as well
    y_inp = onednn.qconv(x, sx, zx, pw, sw, None, b, stride, 1, 1, groups, so, zo, out_dtype, post_op,
                         r.clone(), sr, zr, residual_inplace=True)  # fmt: skip
    assert torch.equal(y_inp, y)
    y_nchw = onednn.qconv(x, sx, zx, pw, sw, None, b, stride, 1, 1, groups, so, zo, out_dtype, post_op,
                          r.contiguous(), sr, zr)  # fmt: skip
    assert torch.equal(y_nchw, y)


def test_qconv_residual_shape_mismatch_raises():
    g = torch.Generator().manual_seed(7)
    x = _rand_x((1, 4, 6, 6), g)
    w = _rand_w((4, 4, 3, 3), g)
    pw = onednn.prepack_conv_weight(w, torch.ones(4), 1.0, 0, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="residual shape"):
        onednn.qconv(x, 1.0, 0, pw, torch.ones(4), None, None, 2, 1, 1, 1, residual=torch.zeros(1, 4, 6, 6))


def test_saturation_probe_and_safe_range():
    """Extreme operands inside safe_activation_qmax() are exact; document the failure outside it."""
    g = torch.Generator().manual_seed(8)
    qmax = onednn.safe_activation_qmax(127)
    assert onednn.safe_activation_qmax(64) == 255
    x = torch.randint(qmax - 1, qmax + 1, (2, 16, 6, 6), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    w = torch.where(torch.rand(32, 16, 3, 3, generator=g) < 0.5, 127, -127).to(torch.int8)
    w[:16] = 127  # all-positive rows: worst case for the pairwise int16 sums
    ones = torch.ones(32)
    pw = onednn.prepack_conv_weight(w, ones, 1.0, 0, 1, 1, 1, 1)
    y = onednn.qconv(x, 1.0, 0, pw, ones, None, None, 1, 1, 1, 1)
    assert torch.equal(y.double(), F.conv2d(x.double(), w.double(), None, 1, 1))
    if onednn.saturates_u8s8():
        assert qmax < 255
        x255 = torch.full_like(x, 255)
        y255 = onednn.qconv(x255, 1.0, 0, pw, ones, None, None, 1, 1, 1, 1)
        assert not torch.equal(y255.double(), F.conv2d(x255.double(), w.double(), None, 1, 1))
    else:
        assert qmax == 255


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("M,K,N", [(1, 32, 10), (8, 64, 32), (33, 100, 17)])
def test_qlinear_matches_reference(bias, post_op, M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    x = _rand_x((M, K), g)
    w = _rand_w((N, K), g)
    sw = torch.rand(N, generator=g) * 0.01 + 0.001
    b = torch.randn(N, generator=g) if bias else None
    sx, zx = 0.05, 64
    pw = onednn.prepack_linear_weight(w)
    ref = ((x.double() - zx) * sx) @ (w.double() * sw.double()[:, None]).t()
    if bias:
        ref = ref + b.double()
    if post_op == "relu":
        ref = ref.relu()
    y = onednn.qlinear(x, sx, zx, pw, sw, None, b, post_op=post_op)
    _assert_fp32_close(y, ref)
    for dtype in (torch.uint8, torch.int8):
        so, zo = _qparams(ref, dtype)
        yq = onednn.qlinear(x, sx, zx, pw, sw, None, b, so, zo, dtype, post_op)
        _assert_codes_close(yq, _quant_ref(ref, so, zo, dtype), dtype)


def test_qlinear_integer_accumulation_exact():
    g = torch.Generator().manual_seed(9)
    x = _rand_x((16, 96), g)
    w = _rand_w((24, 96), g)
    pw = onednn.prepack_linear_weight(w, input_shape=[4, 96])  # shape hint != runtime shape
    y = onednn.qlinear(x, 1.0, 5, pw, torch.ones(24))
    assert torch.equal(y.double(), (x.double() - 5) @ w.double().t())
    # per-tensor weight scale
    y2 = onednn.qlinear(x, 1.0, 5, pw, torch.tensor([2.0]))
    assert torch.equal(y2, 2 * y)


@pytest.mark.parametrize("res_dtype,out_dtype", RES_CASES)
@pytest.mark.parametrize("post_op", ["none", "relu"])
def test_qlinear_residual(res_dtype, out_dtype, post_op):
    g = torch.Generator().manual_seed(10)
    M, K, N = 12, 64, 24
    x = _rand_x((M, K), g)
    w = _rand_w((N, K), g)
    sw = torch.rand(N, generator=g) * 0.01 + 0.001
    b = torch.randn(N, generator=g)
    sx, zx = 0.05, 64
    pw = onednn.prepack_linear_weight(w)
    r, sr, zr, rf = _residual((M, N), res_dtype, g)
    r_before = r.clone()
    ref = ((x.double() - zx) * sx) @ (w.double() * sw.double()[:, None]).t() + b.double() + rf
    if post_op == "relu":
        ref = ref.relu()
    so, zo = (1.0, 0) if out_dtype == torch.float32 else _qparams(ref, out_dtype)
    y = onednn.qlinear(x, sx, zx, pw, sw, None, b, so, zo, out_dtype, post_op, r, sr, zr)
    assert torch.equal(r, r_before)
    if out_dtype == torch.float32:
        _assert_fp32_close(y, ref)
    else:
        _assert_codes_close(y, _quant_ref(ref, so, zo, out_dtype), out_dtype)


def test_quantize_u8_matches_reference_formula():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 8, 16, 16, generator=g).contiguous(memory_format=CL) * 3
    x[0, 0, 0, :6] = torch.tensor([0.03125, -0.09375, 0.15625, -0.03125, 100.0, -100.0])  # exact ties, saturation
    s, z = 0.0625, 127
    q = onednn.quantize_u8(x, s, z)
    ref = torch.clamp(torch.round(x * (1.0 / s)) + z, 0, 255).to(torch.uint8)
    assert q.dtype == torch.uint8 and torch.equal(q, ref)
    assert q.is_contiguous(memory_format=CL)
    assert torch.equal(onednn.quantize_u8(x, s, z, 0, 127), torch.clamp(ref, 0, 127))


def test_input_validation():
    w = torch.zeros(4, 4, 3, 3, dtype=torch.int8)
    with pytest.raises(TypeError):
        onednn.prepack_conv_weight(w.float(), torch.ones(4), 1.0, 0, 1, 1, 1, 1)
    pw = onednn.prepack_conv_weight(w, torch.ones(4), 1.0, 0, 1, 1, 1, 1)
    with pytest.raises(TypeError):
        onednn.qconv(torch.zeros(1, 4, 5, 5, dtype=torch.int8), 1.0, 0, pw, torch.ones(4))
    with pytest.raises(ValueError):
        onednn.qconv(torch.zeros(1, 4, 5, 5, dtype=torch.uint8), 1.0, 0, pw, torch.ones(4), post_op="gelu")
    with pytest.raises(ValueError):
        onednn.qconv(torch.zeros(1, 4, 5, 5, dtype=torch.uint8), 1.0, 0, pw, torch.ones(4), out_dtype=torch.float64)

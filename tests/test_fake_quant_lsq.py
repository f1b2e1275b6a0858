"""LSQ fake quantization that saves only its input (``qtoolkit.fake_quant.fake_quantize_lsq_lowmem``):
forward and both gradients against float64 references of the STE / LSQ formulas (Esser et al. 2020),
torch's learnable fake-quantize ops as an independent oracle, and what it keeps for the backward pass."""

from __future__ import annotations

import math

import pytest
import torch

from qtoolkit.config import QuantizerConfig
from qtoolkit.fake_quant import FakeQuantize, fake_quantize_lsq_lowmem
from qtoolkit.spec import QuantSpec


def _reference(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, axis: int | None,
               g: torch.Tensor, gf: float):
    """float64 STE / LSQ: output, dL/dx, dL/ds. The code is ``round_half_even(x * (1/s))`` with the float32
    product (the library's contract); everything after the rounding is in float64."""
    shape = None if axis is None else [-1 if d == axis else 1 for d in range(x.dim())]
    sb = s.reshape(()) if shape is None else s.reshape(shape)
    zb = z.reshape(()) if shape is None else z.reshape(shape)
    v32 = x.float() * (1.0 / sb.float())
    code = torch.round(v32).double() + zb.double()
    inside = (code >= qmin) & (code <= qmax)
    cc = code.clamp(qmin, qmax)
    s64 = sb.double()
    out = (cc - zb.double()) * s64
    v = x.double() / s64
    # dx̂/ds: round(v) − v inside, qmin − z below, qmax − z above
    d = torch.where(inside, torch.round(v32).double() - v, cc - zb.double())
    gx = torch.where(inside, g.double(), torch.zeros_like(g, dtype=torch.float64))
    dims = None if axis is None else tuple(i for i in range(x.dim()) if i != axis)
    ds = (g.double() * d).sum() if dims is None else (g.double() * d).sum(dim=dims)
    return out, gx, ds * gf


CASES = [
    # (shape, axis, qmin, qmax, zero point)
    ((512,), None, -8, 7, 0),
    ((4, 64), None, 0, 15, 5),
    ((6, 3, 5, 5), 0, -7, 7, 0),
    ((8, 6, 7), 1, 0, 255, "per-channel"),
    ((3, 50), None, -128, 127, 0),
]


@pytest.mark.parametrize("shape,axis,qmin,qmax,zp", CASES)
def test_lsq_lowmem_matches_float64_formulas(shape, axis, qmin, qmax, zp):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen) * 1.5
    n = 1 if axis is None else shape[axis]
    s = (torch.rand(n, generator=gen) * 0.2 + 0.08) if axis is not None else torch.tensor(0.11)
    if zp == "per-channel":
        z = torch.randint(qmin, qmax + 1, (n,), generator=gen, dtype=torch.int32)
    else:
        z = torch.full((n,) if axis is not None else (), zp, dtype=torch.int32)
    g = torch.randn(shape, generator=gen)
    gf = 0.37
    xr = x.clone().requires_grad_(True)
    sr = s.clone().requires_grad_(True)
    y = fake_quantize_lsq_lowmem(xr, sr, z, qmin, qmax, axis, grad_factor=gf)
    y.backward(g)
    out, gx, ds = _reference(x, s, z, qmin, qmax, axis, g, gf)
    # values below and above the range are present, so both clamp branches are exercised
    assert (out.detach() != x.double()).any()
    torch.testing.assert_close(y.detach().double(), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(xr.grad.double(), gx, rtol=0, atol=0)
    torch.testing.assert_close(sr.grad.double().reshape(ds.shape), ds, rtol=1e-5, atol=1e-5 * math.sqrt(x.numel()))


def test_lsq_lowmem_default_grad_factor_and_torch_oracle():
    """Per tensor and per channel against torch's learnable fake-quantize ops (scale gradient scaled by the same
    LSQ factor 1/sqrt(N·qmax))."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 4, 6, 6, generator=gen)
    g = torch.randn(16, 4, 6, 6, generator=gen)
    # per tensor, uint4 with a zero point
    s, z = torch.tensor([0.23]), torch.tensor([3], dtype=torch.int32)
    xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fake_quantize_lsq_lowmem(xr, sr, z, 0, 15).backward(g)
    gf = 1.0 / math.sqrt(x.numel() * 15)
    xo, so = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    torch._fake_quantize_learnable_per_tensor_affine(xo, so, z.float(), 0, 15, gf).backward(g)
    torch.testing.assert_close(xr.grad, xo.grad, rtol=0, atol=0)
    torch.testing.assert_close(sr.grad, so.grad, rtol=1e-5, atol=1e-6)
    # per channel (axis 1), int4 symmetric
    s = torch.tensor([0.1, 0.2, 0.15, 0.3])
    z = torch.zeros(4, dtype=torch.int32)
    xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fake_quantize_lsq_lowmem(xr, sr, z, -8, 7, axis=1).backward(g)
    gf = 1.0 / math.sqrt((x.numel() // 4) * 7)
    xo, so = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    torch._fake_quantize_learnable_per_channel_affine(xo, so, z.float(), 1, -8, 7, gf).backward(g)
    torch.testing.assert_close(xr.grad, xo.grad, rtol=0, atol=0)
    torch.testing.assert_close(sr.grad, so.grad, rtol=1e-5, atol=1e-6)


def test_lsq_lowmem_saves_only_its_input():
    """Nothing full-size of its own is kept for backward: the only large saved tensor is the input itself."""
    x = torch.randn(64, 32, requires_grad=True)
    h = x * 2.0  # a non-leaf input, as an activation is
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    s = torch.tensor(0.05, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fake_quantize_lsq_lowmem(h, s, torch.tensor(0), -8, 7)
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    y.sum().backward()
    assert x.grad is not None and s.grad is not None


def test_lsq_lowmem_nan_and_bfloat16():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([float("nan"), 0.3, -5.0], requires_grad=True)
    y = fake_quantize_lsq_lowmem(x, s, torch.tensor(0), -8, 7, grad_factor=1.0)
    assert torch.isnan(y[0])
    y.backward(torch.ones(3))
    assert x.grad.tolist() == [0.0, 1.0, 0.0]  # NaN counts as outside: no gradient to x
    xb = torch.tensor([0.04, 0.26, 2.0], dtype=torch.bfloat16, requires_grad=True)
    sb = torch.tensor(0.1, requires_grad=True)
    yb = fake_quantize_lsq_lowmem(xb, sb, torch.tensor(0), -8, 7, grad_factor=1.0)
    assert yb.dtype == torch.bfloat16
    yb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and xb.grad.tolist() == [1.0, 1.0, 0.0]
    # round(0.04/0.1)-0.04/0.1 + round(2.6)-2.6 + 7 (0.26 and 0.04 as bfloat16 values)
    v = [float(torch.tensor(t, dtype=torch.bfloat16)) / 0.1 for t in (0.04, 0.26)]
    want = sum(round(a) - a for a in v) + 7.0
    assert abs(float(sb.grad) - want) < 1e-4


def test_fake_quantize_learnable_uses_lowmem_path():
    cfg = QuantizerConfig(QuantSpec(bits=4, signed=False, symmetric=False), "minmax", learnable=True)
    fq = FakeQuantize(cfg)
    _ = fq(torch.rand(32, 8))
    fq.disable_observer()
    x = torch.rand(32, 8, requires_grad=True)
    y = fq(x)
    assert type(y.grad_fn).__name__ == "_LSQRecomputeBackward"
    y.sum().backward()
    assert fq.scale.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_lsq_lowmem_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 5, 5, generator=gen)
    g = torch.randn(8, 4, 5, 5, generator=gen)
    s = torch.tensor([0.1, 0.2, 0.15, 0.3])
    z = torch.tensor([0, 3, 1, 2], dtype=torch.int32)
    grads = []
    for dev in ("cpu", "cuda"):
        xr = x.clone().to(dev).requires_grad_(True)
        sr = s.clone().to(dev).requires_grad_(True)
        y = fake_quantize_lsq_lowmem(xr, sr, z.to(dev), 0, 15, axis=1)
        y.backward(g.to(dev))
        grads.append((y.detach().cpu(), xr.grad.cpu(), sr.grad.cpu()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis,qmin,qmax,zp", [(0, -7, 7, 0), (None, -8, 7, 0), (0, 0, 15, 3)])
def test_weight_ste_keeps_the_parameter_not_a_mask(axis, qmin, qmax, zp):
    """A weight quantizer (fixed scale) on a parameter: same output and STE gradient as the float64 reference,
    and the only full-size tensor kept for backward is the parameter itself."""
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen) * 0.5)
    spec = QuantSpec(bits=4, signed=zp == 0, symmetric=zp == 0, narrow_range=qmin == -7, axis=axis)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    fq = FakeQuantize(QuantizerConfig(spec, "minmax"), role="weight", channels=8 if axis is not None else None)
    n = 8 if axis is not None else 1
    scale = (torch.rand(n, generator=gen) * 0.05 + 0.05) if axis is not None else torch.tensor(0.08)
    z = torch.full((n,) if axis is not None else (), zp, dtype=torch.int32)
    fq._load_qparams(scale, z)
    fq.disable_observer()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fq(w)
    big = [t for t in saved if t.numel() > 8]  # the scale / zero point have one value per channel
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    g = torch.randn(w.shape, generator=gen)
    y.backward(g)
    out, gx, _ = _reference(w.detach(), scale, z, qmin, qmax, axis, g, 1.0)
    assert (gx == 0).any() and (gx != 0).any()
    torch.testing.assert_close(y.detach().double(), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), gx, rtol=0, atol=0)
    # the same as the mask-saving path on a non-leaf copy
    w2 = w.detach().clone().requires_grad_(True)
    y2 = fq(w2 * 1.0)
    y2.backward(g)
    assert torch.equal(y2.detach(), y.detach()) and torch.equal(w2.grad, w.grad)

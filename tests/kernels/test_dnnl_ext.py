"""qtoolkit's oneDNN extension (``qtoolkit.kernels.dnnl_ext``): each call against float64, converted layers use it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import dispatch, dnnl_ext
from qtoolkit.kernels.fast_state import _get_state

ext = dnnl_ext.load()
needs_ext = pytest.mark.skipif(ext is None, reason=f"oneDNN extension unavailable: {dnnl_ext.status()}")
CL = torch.channels_last


def _case(seed: int, cin: int, cout: int, groups: int, k: int, hw: int, x_zp: int, qmax: int = 255):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, qmax + 1, (2, cin, hw, hw), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    w = torch.randint(-127, 128, (cout, cin // groups, k, k), dtype=torch.int8, generator=g)
    os_ = torch.rand(cout, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    b = torch.randn(cout, generator=g, dtype=torch.float64) * 300
    return x, w, os_, b


def _acc64(x, w, x_zp, stride, padding, dilation, groups):
    return F.conv2d(x.double() - x_zp, w.double(), None, stride, padding, dilation, groups)


def _kernel_formula(acc, os_, b, out_zp, lo, hi, relu, residual=None):
    """The documented requantization in float32: round_half_even(os * (acc + b) [+ sum] [relu]) + zp, saturated."""
    y = (acc.float() + b.float()[None, :, None, None]) * os_.float()[None, :, None, None]
    if residual is not None:
        y = y + residual
    if relu:
        y = y.relu()
    return torch.clamp(torch.round(y.double()) + out_zp, lo, hi)


@needs_ext
@pytest.mark.parametrize(
    "cin,cout,groups,k,stride,padding,dilation,x_zp,out_zp,out_dtype,relu",
    [
        (16, 16, 1, 3, 1, 1, 1, 0, 0, torch.uint8, True),
        (16, 32, 1, 3, 2, 1, 1, 7, 128, torch.uint8, False),
        (32, 32, 32, 3, 1, 1, 1, 128, 3, torch.uint8, True),  # depthwise, zero point with padding
        (32, 32, 32, 5, 2, 2, 1, 91, 0, torch.int8, False),
        (32, 64, 4, 3, 1, 2, 2, 13, -5, torch.int8, True),  # grouped, dilated
        (24, 40, 1, 1, 1, 0, 1, 50, 77, torch.uint8, False),  # 1x1
        (3, 16, 1, 3, 1, 1, 1, 128, 0, torch.float32, False),  # stem-like, float output
    ],
)
def test_qconv_matches_float64(cin, cout, groups, k, stride, padding, dilation, x_zp, out_zp, out_dtype, relu):
    kind = "depthwise" if groups == cin and groups > 1 else "grouped" if groups > 1 else "conv"
    qmax = 127 if dnnl_ext.saturates(kind) else 255  # operands that are exact on every CPU
    x, w, os_, b = _case(cin * cout + k, cin, cout, groups, k, 11, x_zp, qmax)
    q = dnnl_ext.QConv(w, os_.float(), b.float(), stride=stride, padding=padding, dilation=dilation, groups=groups,
                       x_zp=x_zp, out_zp=out_zp, out_dtype=out_dtype, relu=relu)  # fmt: skip
    y = q.run(x)
    acc = _acc64(x, w, x_zp, stride, padding, dilation, groups)
    assert y.dtype == out_dtype and y.shape == acc.shape and y.is_contiguous(memory_format=CL)
    real = (acc + b[None, :, None, None]) * os_[None, :, None, None]
    if relu:
        real = real.relu()
    if out_dtype == torch.float32:
        torch.testing.assert_close(y.double(), real, rtol=1e-5, atol=1e-5)
        return
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    got = y.double()
    assert torch.equal(got, _kernel_formula(acc, os_, b, out_zp, lo, hi, relu))
    ref = torch.clamp(torch.round(real) + out_zp, lo, hi)
    assert (got - ref).abs().max() <= 1
    assert (got != ref).double().mean() < 1e-3  # only float32 ties differ from the float64 rounding
    # a second call (cached primitive) and another shape (new primitive) stay exact
    assert torch.equal(q.run(x), y)
    x2 = x[:1, :, :7, :9].contiguous(memory_format=CL)
    acc2 = _acc64(x2, w, x_zp, stride, padding, dilation, groups)
    assert torch.equal(q.run(x2).double(), _kernel_formula(acc2, os_, b, out_zp, lo, hi, relu))


@needs_ext
@pytest.mark.parametrize("x_zp,out_zp,out_dtype,relu", [(0, 0, torch.float32, False), (77, 128, torch.uint8, True),
                                                        (128, -3, torch.int8, False)])  # fmt: skip
def test_qlinear_matches_float64(x_zp, out_zp, out_dtype, relu):
    g = torch.Generator().manual_seed(x_zp)
    qmax = 127 if dnnl_ext.saturates("linear") else 255
    x = torch.randint(0, qmax + 1, (5, 96), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    os_ = torch.rand(40, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    b = torch.randn(40, generator=g, dtype=torch.float64) * 300
    q = dnnl_ext.QLinear(w, os_.float(), b.float(), x_zp=x_zp, out_zp=out_zp, out_dtype=out_dtype, relu=relu)
    y = q.run(x)
    acc = (x.double() - x_zp) @ w.double().t()
    real = (acc + b) * os_
    real = real.relu() if relu else real
    assert y.dtype == out_dtype and y.shape == (5, 40)
    if out_dtype == torch.float32:
        torch.testing.assert_close(y.double(), real, rtol=1e-5, atol=1e-5)
    else:
        lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
        want = _kernel_formula(acc[:, :, None, None], os_, b, out_zp, lo, hi, relu)[:, :, 0, 0]
        assert torch.equal(y.double(), want)
        assert (y.double() - torch.clamp(torch.round(real) + out_zp, lo, hi)).abs().max() <= 1
    assert torch.equal(q.run(x[:2]), y[:2])  # another M: a new primitive, same rows
    with pytest.raises(RuntimeError, match="96"):
        q.run(x[:, :10])


@needs_ext
def test_qconv_sum_post_op_in_place():
    x, w, os_, b = _case(3, 16, 16, 1, 3, 9, 5, 127)
    acc_codes = torch.randint(0, 256, (2, 16, 9, 9), dtype=torch.uint8).contiguous(memory_format=CL)
    sum_scale, sum_zp, out_zp = 0.75, 9, 4
    q = dnnl_ext.QConv(w, os_.float(), b.float(), stride=1, padding=1, dilation=1, groups=1, x_zp=5, out_zp=out_zp,
                       out_dtype=torch.uint8, relu=True, sum_scale=sum_scale, sum_zp=sum_zp)  # fmt: skip
    residual = (acc_codes.float() - sum_zp) * sum_scale
    want = _kernel_formula(_acc64(x, w, 5, 1, 1, 1, 1), os_, b, out_zp, 0, 255, True, residual)
    buf = acc_codes.clone(memory_format=CL)
    y = q.run(x, buf)
    assert y.data_ptr() == buf.data_ptr()  # written in place
    assert (y.double() - want).abs().max() <= 1 and (y.double() != want).double().mean() < 1e-3
    with pytest.raises(RuntimeError, match="sum post-op"):
        q.run(x)


@needs_ext
def test_qconv_concurrent_calls_from_threads():
    """run() releases the GIL: threads calling one layer with several shapes at once get exact results."""
    from concurrent.futures import ThreadPoolExecutor

    x, w, os_, b = _case(5, 16, 16, 1, 3, 12, 3, 127)
    q = dnnl_ext.QConv(w, os_.float(), b.float(), stride=1, padding=1, dilation=1, groups=1, x_zp=3, out_zp=9,
                       out_dtype=torch.uint8, relu=True)  # fmt: skip
    inputs = [x[: 1 + i % 2, :, : 6 + i % 5].contiguous(memory_format=CL) for i in range(40)]
    want = [_kernel_formula(_acc64(xi, w, 3, 1, 1, 1, 1), os_, b, 9, 0, 255, True) for xi in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(q.run, inputs))
    assert all(torch.equal(g.double(), t) for g, t in zip(got, want))
    assert q._k.cached_shapes() <= 8


@needs_ext
def test_qconv_bad_input_names_the_problem():
    q = dnnl_ext.QConv(torch.ones(4, 8, 3, 3, dtype=torch.int8), torch.ones(4), None, stride=1, padding=1, dilation=1,
                       groups=1, x_zp=0, out_zp=0, out_dtype=torch.uint8)  # fmt: skip
    with pytest.raises(RuntimeError, match="8"):
        q.run(torch.zeros(1, 3, 5, 5, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="uint8"):
        q.run(torch.zeros(1, 8, 5, 5))
    q0 = dnnl_ext.QConv(torch.ones(4, 8, 3, 3, dtype=torch.int8), torch.ones(4), None, stride=1, padding=0, dilation=1,
                        groups=1, x_zp=0, out_zp=0, out_dtype=torch.uint8)  # fmt: skip
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        q0.run(torch.zeros(1, 8, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out_dtype"):
        dnnl_ext.QConv(torch.ones(4, 8, 3, 3, dtype=torch.int8), torch.ones(4), None, stride=1, padding=1, dilation=1,
                       groups=1, x_zp=0, out_zp=0, out_dtype=torch.int32)  # fmt: skip


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24),
        nn.Conv2d(24, 24, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    ).eval()  # fmt: skip


def _convert(preset: str, data: list) -> nn.Module:
    torch.manual_seed(0)
    return qt.convert(qt.calibrate(qt.prepare(_model(), preset), data, progress=False))


def _layer_states(model: nn.Module) -> list:
    return [st for st in map(_get_state, model.modules()) if isinstance(st, dispatch._LayerState)]


def _conv_states(model: nn.Module) -> list:
    return [st for st in _layer_states(model) if st.kind == "conv2d"]


@needs_ext
@pytest.mark.parametrize("preset", ["w8a8-x86", "w8a8"])
def test_converted_layers_run_on_the_extension_and_match_the_torch_op(preset, monkeypatch):
    data = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    q = _convert(preset, data)
    y_ext = q(x)
    convs = _conv_states(q)
    # every static layer, direct or exact split (a CPU without VNNI, or ONEDNN_MAX_CPU_ISA=AVX2), on the extension
    assert convs and all(st.ext is not None for st in _layer_states(q)), [st.ext_note for st in _layer_states(q)]
    assert all(st.ext_note.startswith("qtoolkit oneDNN extension") for st in convs)
    monkeypatch.setattr(dnnl_ext, "load", lambda verbose=False: None)  # the same model on torch's ops
    q_op = _convert(preset, data)
    y_op = q_op(x)
    assert all(st.ext is None for st in _conv_states(q_op))
    scale = float(y_op.detach().abs().max())
    torch.testing.assert_close(y_ext, y_op, rtol=0, atol=0.02 * scale)  # integer-equal up to float32 requantization ties


def test_status_names_the_kernel():
    s = dnnl_ext.status()
    assert s.startswith("qtoolkit oneDNN") == (ext is not None)
    assert list(itertools.islice(s, 1))  # never empty


@needs_ext
@pytest.mark.parametrize("act,float_output,donate", [(None, False, None), ("relu", False, 1), ("relu", False, 0),
                                                      (None, True, None)])  # fmt: skip
def test_residual_add_kernel_on_the_extension(act, float_output, donate, monkeypatch):
    """Large adds (the identity GEMM with a sum accumulator) against float64, with and without the extension."""
    from qtoolkit.kernels import fast_add
    from qtoolkit.kernels.params import AddParams

    p = AddParams("add", act, 0, 255, 0.031, 117, 0.017, 3, 0.043, 61, float_output, donate)
    st = fast_add._add_state(p)
    g = torch.Generator().manual_seed(11)
    qa = torch.randint(0, 256, (2, 32, 40, 40), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    qb = torch.randint(0, 256, (2, 32, 40, 40), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    real = (qa.double() - 117) * 0.031 + (qb.double() - 3) * 0.017
    real = real.relu() if act == "relu" else real
    y, donated = fast_add.add_codes(st, qa.clone(memory_format=CL), qb.clone(memory_format=CL), donate)
    assert any(k is not None for k in fast_add._EXT_IDENTITY.values())
    if float_output:
        torch.testing.assert_close(y.double(), real, rtol=1e-5, atol=1e-5)
    else:
        ref = torch.clamp(torch.round(real / 0.043) + 61, 0, 255)
        assert y.dtype == torch.uint8 and (y.double() - ref).abs().max() <= 1 and (y.double() != ref).double().mean() < 1e-3
        assert donated == (donate is not None)
    monkeypatch.setattr(fast_add, "_ext_identity", lambda *a: None)  # torch's op: the same codes up to ties
    y_op, _ = fast_add.add_codes(st, qa.clone(memory_format=CL), qb.clone(memory_format=CL), donate)
    assert (y.double() - y_op.double()).abs().max() <= (1e-5 if float_output else 1)

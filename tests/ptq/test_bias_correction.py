"""Empirical bias correction: per-channel output means equal the float model's, computed independently."""

import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit as qt


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    with torch.no_grad():
        m[0].weight.mul_(torch.rand_like(m[0].weight) * 2)  # uneven weights: 3-bit rounding shifts the mean
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(8, 3, 9, 9, generator=g) for _ in range(3)]


def _first_layer_mean(qm, data, quantized):
    q = qm[0] if not hasattr(qm, "_modules") or "0" in qm._modules else None
    outs = []
    with torch.no_grad():
        for x in data:
            if quantized:
                xq = q.input_quantizer(x)
                w = q.weight_quantizer(q.weight)
            else:
                xq, w = x, q.weight
            y = F.conv2d(xq.double(), w.double())
            if q.bias is not None and quantized:
                y = y + q.bias.double().view(1, -1, 1, 1)
            outs.append(y)
    return torch.cat(outs).mean(dim=(0, 2, 3))


def test_first_layer_mean_matches_float_after_correction():
    m, data = _model(), _data()
    qc = qt.get_qconfig("w4a8").with_bits(weight_bits=3)
    qm = qt.calibrate(qt.prepare(m, qc), data, progress=False)
    with qt.fake_quant_disabled(qm):
        want = _first_layer_mean(qm, data, quantized=False)
    shift_before = (_first_layer_mean(qm, data, quantized=True) - want).abs().max()
    assert qm[0].bias is None
    qt.reconstruct(qm, data, "bias_correction", progress=False)
    assert qm[0].bias is not None  # the layer had none: it gets one
    with qt.fake_quant_disabled(qm):
        # the float reference is the original weight (bias correction leaves weights alone)
        pass
    got = _first_layer_mean(qm, data, quantized=True)
    assert shift_before > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bias_correction_reduces_output_mean_error_and_converts():
    m, data = _model(), _data()
    qc = qt.get_qconfig("w4a8").with_bits(weight_bits=3)
    qm = qt.calibrate(qt.prepare(m, qc), data, progress=False)
    with torch.no_grad():
        ref = torch.cat([m(x) for x in data]).double().mean(dim=(0, 2, 3))
        before = (torch.cat([qm(x) for x in data]).double().mean(dim=(0, 2, 3)) - ref).abs().max()
        qt.reconstruct(qm, data, "bias_correction", progress=False)
        after = (torch.cat([qm(x) for x in data]).double().mean(dim=(0, 2, 3)) - ref).abs().max()
    assert after < before
    int8 = qt.set_execution(qt.convert(qm), "reference")
    with torch.no_grad():
        torch.testing.assert_close(int8(data[0]), qm(data[0]), rtol=0, atol=1e-5)

"""The fast path rounds the requantized output as the float64 reference does, also with a large output zero point.

oneDNN adds the destination zero point in float32 *before* rounding: with a zero point near 128 the value
``v + z`` has the resolution of a number near 256, and a value 5e-6 below a rounding tie landed on the tie
(round-half-even then flipped it).  The fast path runs such layers with int8 output around ``z - 128``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import dispatch, onednn

pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 kernels unavailable in this build/CPU")


@pytest.mark.parametrize("zero_point", [130, 200, 100, 64, 10])
def test_output_just_below_a_tie_rounds_down(zero_point: int) -> None:
    torch.manual_seed(0)
    prepared = qt.calibrate(qt.prepare(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1)), "w8a8"),
                            [torch.randn(2, 1, 4, 4)], progress=False)  # fmt: skip
    q = qt.convert(prepared)
    layer = q[0]
    # s_x·s_w = 2^-20 and s_y = 1: the int32 bias sets v = bias_int32 · 2^-20 to ~1e-6 where the input is 0
    n = torch.tensor([3.0, 11.0, 20.0, 40.0])
    target = n + 0.5 - 5e-6  # just below the tie: the float64 reference rounds down to n
    with torch.no_grad():
        layer.input_scale.fill_(2.0**-8)
        layer.input_zero_point.zero_()
        layer.weight_scale.fill_(2.0**-12)
        layer.output_scale.fill_(1.0)
        layer.output_zero_point.fill_(zero_point)
        layer.bias_int32.copy_(torch.round(target * 2**20).to(torch.int32))
        layer.bias.copy_(target)
    dispatch.invalidate(layer)
    x = torch.zeros(1, 1, 3, 3)
    v = layer.bias_int32.double() * 2.0**-20  # what the layer computes at a zero input, exactly
    expected = torch.clamp(torch.round(v) + zero_point, 0, 255)
    assert torch.equal(expected, n.double() + zero_point)
    with torch.no_grad():
        out = layer(x)
        qt.set_execution(q, "reference")
        ref = layer(x)
    codes = out.codes.double()[0, :, 0, 0]
    assert torch.equal(codes, expected), (codes.tolist(), expected.tolist())
    assert torch.equal(torch.round(ref[0, :, 0, 0].double() / 1.0) + zero_point, expected)  # the fake-quant model agrees

"""AdaRoundWeight against direct float64 computations of the paper's formulas."""

import pytest
import torch

from qtoolkit.numerics import quantize
from qtoolkit.ptq.adaround import GAMMA, ZETA, AdaRoundWeight, BetaSchedule, rectified_sigmoid


def _make(bits=4, per_channel=True):
    w = torch.randn(6, 3, 3, 3)
    qmax = 2 ** (bits - 1) - 1
    s = (w.abs().amax(dim=(1, 2, 3)) / qmax) if per_channel else w.abs().max() / qmax
    z = torch.zeros_like(s, dtype=torch.int32)
    return w, s, z, -qmax, qmax


def test_rectified_sigmoid_matches_formula_and_saturates():
    v = torch.linspace(-8, 8, 101, dtype=torch.float64)
    want = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(rectified_sigmoid(v), want)
    assert rectified_sigmoid(torch.tensor(-8.0)) == 0.0 and rectified_sigmoid(torch.tensor(8.0)) == 1.0


@pytest.mark.parametrize("per_channel", [True, False])
def test_soft_rounding_starts_at_the_float_weight(per_channel):
    w, s, z, qmin, qmax = _make(per_channel=per_channel)
    ar = AdaRoundWeight(w, s, z, qmin, qmax)
    sb = s.reshape(-1, 1, 1, 1) if per_channel else s
    # h(v0) = frac(w/s) (clamped to [1e-4, 1 - 1e-4]): the soft weight is the float weight
    assert (ar() - w).abs().max() <= 1.1e-4 * float(sb.max())


def test_hard_rounding_is_floor_or_ceil_and_survives_requantization():
    w, s, z, qmin, qmax = _make()
    ar = AdaRoundWeight(w, s, z, qmin, qmax)
    with torch.no_grad():
        ar.v.copy_(torch.randn_like(ar.v) * 3)
    xs = (w.double() / s.double().reshape(-1, 1, 1, 1))
    codes = ar.codes().double()
    fl = torch.floor(xs)
    assert bool(((codes == fl.clamp(qmin, qmax)) | (codes == (fl + 1).clamp(qmin, qmax))).all())
    # what convert() computes from the baked weight gives back exactly these codes
    baked = ar(hard=True)
    got = quantize(baked, s, z, qmin, qmax, axis=0, dtype=torch.float32)
    assert torch.equal(got, ar.codes())
    assert 0.0 < ar.flipped_fraction() < 1.0


def test_regularizer_is_zero_when_decided_and_maximal_at_half():
    w, s, z, qmin, qmax = _make()
    ar = AdaRoundWeight(w, s, z, qmin, qmax)
    with torch.no_grad():
        ar.v.copy_(torch.where(torch.rand_like(ar.v) < 0.5, -10.0, 10.0))
    assert float(ar.regularizer(2.0).detach()) == 0.0
    with torch.no_grad():
        ar.v.zero_()  # h = 0.5
    assert float(ar.regularizer(2.0).detach()) == pytest.approx(ar.v.numel())


def test_beta_schedule():
    b = BetaSchedule(10, warmup=0.2, start=20.0, end=2.0)
    assert b(0) is None and b(1) is None
    assert b(2) == pytest.approx(20.0) and b(10) == pytest.approx(2.0)
    assert b(6) == pytest.approx(11.0)

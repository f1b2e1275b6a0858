"""mixed_precision(): budget respected, the damaged layer raised first, the result reproducible via prepare."""

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.ptq.sensitivity import output_sqnr


def _model_and_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():  # one outlier weight per output channel: 4-bit min-max ruins layer 2 most
        m[2].weight[:, 0, 0, 0] = 1.0
    g = torch.Generator().manual_seed(4)
    return m, [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]


def test_size_budget_is_met_and_the_result_reproduces():
    m, data = _model_and_data()
    low = qt.weight_bytes(m, "w4a4")
    assert low == pytest.approx((8 * 3 * 9 + 8 * 8 * 9 + 4 * 8 * 9) / 2)
    budget = low + 8 * 8 * 9 / 2 + 1  # room for exactly layer 2 at 8 bits
    res = qt.mixed_precision(m, data, size_budget=budget, progress=False)
    assert res.high_layers == ["2"]
    assert res.weight_bytes <= budget
    assert qt.weight_bytes(m, "w4a4", overrides=res.overrides) == pytest.approx(res.weight_bytes)
    assert res.metric > res.low_metric
    # prepare + calibrate with the overrides gives the measured metric back
    qm = qt.calibrate(qt.prepare(m, "w4a4", overrides=res.overrides), data, progress=False)
    with torch.no_grad():
        ref = [m(x) for x in data]
    assert output_sqnr(data, ref)(qm) == pytest.approx(res.metric, abs=1e-3)
    assert "| 2 |" in res.table()


def test_metric_target_and_errors():
    m, data = _model_and_data()
    res = qt.mixed_precision(m, data, metric_target=float("inf"), progress=False)
    assert sorted(res.high_layers) == sorted(r["layer"] for r in res.rows if r["gain"] > 0)
    with pytest.raises(ValueError, match="exactly one"):
        qt.mixed_precision(m, data, progress=False)
    with pytest.raises(ValueError, match="below the all-low"):
        qt.mixed_precision(m, data, size_budget=10, progress=False)
    with pytest.raises(ValueError, match="mode"):
        qt.mixed_precision(m, data, high="w8a8-dynamic", size_budget=1e9, progress=False)

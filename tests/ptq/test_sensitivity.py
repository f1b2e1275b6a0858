"""sensitivity(): the damaged site ranks first, metrics match direct measurements, flags restored."""

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.ptq.sensitivity import output_sqnr


def _model_and_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    g = torch.Generator().manual_seed(4)
    return m, [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]


def _sqnr(a, b):
    return float(10 * torch.log10(b.double().pow(2).sum() / (a.double() - b.double()).pow(2).sum()))


def test_two_bit_layer_is_the_most_sensitive_and_numbers_are_direct():
    m, data = _model_and_data()
    qm = qt.calibrate(qt.prepare(m, "w8a8", overrides={"2": qt.get_qconfig("w4a8").with_bits(weight_bits=2)}),
                      data, progress=False)
    flags = {n: int(fq.fake_quant_enabled) for n, fq in qt.quantizers(qm)}
    rep = qt.sensitivity(qm, data, progress=False)
    assert [r.site for r in rep.rows] == ["0", "2", "4"]
    assert rep.ranked("quantize_one")[0].site == "2"
    assert rep.ranked("float_one")[0].site == "2"
    assert {n: int(fq.fake_quant_enabled) for n, fq in qt.quantizers(qm)} == flags
    # the all-quantized number equals a direct SQNR of the fake-quant model against the float model
    with torch.no_grad():
        out = torch.cat([qm(x) for x in data])
        ref = torch.cat([m(x) for x in data])
    assert rep.quantized_metric == pytest.approx(_sqnr(out, ref), abs=1e-3)
    assert rep.float_metric == float("inf")
    # "only layer 2 quantized" directly
    for name, fq in qt.quantizers(qm):
        fq.enable_fake_quant(name.startswith("2."))
    with torch.no_grad():
        only2 = torch.cat([qm(x) for x in data])
    qt.enable_fake_quant(qm)
    row = next(r for r in rep.rows if r.site == "2")
    assert row.quantize_one == pytest.approx(_sqnr(only2, ref), abs=1e-3)
    assert "| 2 | conv2d | w2a8 |" in rep.table()


def test_float_model_with_qconfig_and_custom_metric(tmp_path):
    m, data = _model_and_data()
    calls = []

    def neg_l1(model):
        calls.append(1)
        with torch.no_grad():
            return -sum(float((model(x) - m(x)).abs().mean()) for x in data)

    rep = qt.sensitivity(m, data, neg_l1, qconfig="w4a4", modes=["quantize_one"], progress=False)
    assert rep.metric == "neg_l1" and all(r.float_one is None for r in rep.rows)
    assert len(calls) == 2 + 3
    assert rep.float_metric == 0.0 and rep.quantized_metric < 0
    png = rep.plot(str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000 and png.endswith("s.png")
    with pytest.raises(ValueError, match="qconfig"):
        qt.sensitivity(m, data, progress=False)
    with pytest.raises(ValueError, match="modes"):
        qt.sensitivity(m, data, qconfig="w8a8", modes=["one"], progress=False)


def test_output_sqnr_is_inf_for_identical_outputs():
    m, data = _model_and_data()
    with torch.no_grad():
        ref = [m(x) for x in data]
    assert output_sqnr(data, ref)(m) == float("inf")


def test_activation_table_and_mul_sites_are_measured():
    """A SiLU table and a squeeze-excitation ``mul`` are sites of their own: toggled with the rest (so the
    all-float model is the float model) and measured directly."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.act = nn.SiLU()
            self.gate = nn.Sigmoid()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.act(self.conv(x))
            return self.head(y * self.gate(y.mean((2, 3), keepdim=True)))

    torch.manual_seed(0)
    m = Gated().eval()
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]
    qm = qt.calibrate(qt.prepare(m, "w4a4"), data, progress=False)
    rep = qt.sensitivity(qm, data, progress=False)
    kinds = {r.site: r.kind for r in rep.rows}
    assert kinds["act"] == "silu" and kinds["gate"] == "sigmoid"
    assert any(k == "mul" for k in kinds.values())
    assert rep.float_metric == float("inf")  # every rounding quantizer is off in the all-float model
    with torch.no_grad():
        ref = torch.cat([m(x) for x in data])
        for name, fq in qt.quantizers(qm):
            fq.enable_fake_quant(name.startswith("act."))
        only_act = torch.cat([qm(x) for x in data])
    qt.enable_fake_quant(qm)
    row = next(r for r in rep.rows if r.site == "act")
    assert row.quantize_one == pytest.approx(_sqnr(only_act, ref), abs=1e-3)
    assert row.bits == "a4" and row.params == 0

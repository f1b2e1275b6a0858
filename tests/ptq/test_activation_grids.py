"""activation_grids: elementwise sites found by kind, first / last layers by forward order."""

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantMul
from qtoolkit.ptq.activation_grids import elementwise_overrides, first_last_overrides


class SEBlock(nn.Module):
    """Registered head first: registration order differs from the order the layers run."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3)
        self.act = nn.SiLU()
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc_act = nn.SiLU()
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = self.act(self.stem(x))
        g = self.gate(self.fc2(self.fc_act(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(y * g)


def test_elementwise_sites_get_8_bit_grids_and_layer_inputs_stay_4_bit():
    torch.manual_seed(0)
    m = SEBlock().eval()
    ov = elementwise_overrides(m, "w4a4")
    assert {"act", "fc_act", "gate"} <= set(ov) and any("mul" in k for k in ov)
    qm = qt.prepare(m, "w4a4", overrides=ov)
    elementwise = [x for x in qm.modules() if isinstance(x, (QuantActivation, QuantMul))]
    assert len(elementwise) == 4
    for x in elementwise:
        assert {fq.spec.bits for fq in x.children() if isinstance(fq, qt.FakeQuantize)} == {8}
    layers = [x for x in qm.modules() if isinstance(x, QuantLayer)]
    assert len(layers) == 4
    assert all(x.input_quantizer.spec.bits == 4 and x.weight_quantizer.spec.bits == 4 for x in layers)
    # the user's own choice for a site is kept (not overridden)
    ov2 = elementwise_overrides(m, "w4a4", overrides={"gate": "w8a8"}, kinds=("activation",))
    assert "gate" not in ov2 and not any("mul" in k for k in ov2)


def test_relu_network_has_no_elementwise_sites_and_bad_arguments_raise():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    assert elementwise_overrides(m, "w4a4") == {}
    with pytest.raises(ValueError, match="kinds"):
        elementwise_overrides(m, "w4a4", kinds=("softmax",))
    with pytest.raises(ValueError, match="static"):
        elementwise_overrides(m, "w8-weight-only")


def test_first_last_follow_the_forward_order():
    torch.manual_seed(0)
    m = SEBlock().eval()
    ov = first_last_overrides(m, "w4a4", torch.randn(2, 3, 8, 8))
    assert sorted(ov) == ["head", "stem"]
    assert all(q.weight.spec.bits == 8 and q.activation.spec.bits == 8 for q in ov.values())


def test_tighten_grids_drops_codes_below_the_data_and_lowers_the_error():
    """SiLU outputs (>= -0.278) on a 4-bit grid: no code below the smallest value seen is kept, 0 stays exact,
    and the rounding error against float64 goes down."""
    from qtoolkit.ptq.activation_grids import tighten_activation_grids

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    g = torch.Generator().manual_seed(1)
    data = [3 * torch.randn(32, 3, 6, 6, generator=g) for _ in range(2)]
    qm = qt.calibrate(qt.prepare(m, "w4a4"), data, progress=False)
    fq = qm[2].input_quantizer
    with torch.no_grad():
        t = torch.cat([nn.functional.silu(m[0](x)) for x in data]).double()
    # a grid reaching far below the data (what an asymmetric search can return for SiLU outputs)
    hi = float(t.max())
    s = (hi + 3.0) / 15
    fq._load_qparams(torch.tensor(s).reshape(fq.scale.shape), torch.tensor(round(3.0 / s)).reshape(fq.zero_point.shape))
    fq.observer.min_val.fill_(float(t.min()))
    fq.observer.max_val.fill_(hi)

    def err():
        sc, z = float(fq.scale), int(fq.zero_point)
        q = torch.clamp(torch.round(t / sc) + z, fq.qmin, fq.qmax)
        return float(((q - z) * sc - t).pow(2).mean())

    before = err()
    changed = tighten_activation_grids(qm)
    assert "2.input_quantizer" in changed
    sc, z = float(fq.scale), int(fq.zero_point)
    assert (fq.qmin - z) * sc >= float(t.min()) - sc and (fq.qmin - z) * sc <= 0.0
    assert fq.qmin <= z <= fq.qmax  # real 0 is a code
    assert err() < 0.85 * before


@pytest.mark.parametrize("fn,lo,hi,out_lo,out_hi,bits", [
    (torch.sigmoid, -80.0, 84.0, 0.0, 1.0, 8),
    (torch.sigmoid, -80.0, 84.0, 0.0, 1.0, 4),
    (nn.functional.silu, -9.2, 9.6, -0.2785, 9.6, 8),
    (nn.functional.silu, -9.2, 9.6, -0.2785, 9.6, 4),
    (torch.tanh, -5.0, 3.0, -1.0, 1.0, 8),
    (nn.functional.gelu, -7.0, 5.0, -0.17, 5.0, 8),
])
def test_table_input_window_keeps_every_output_code_and_is_tight(fn, lo, hi, out_lo, out_hi, bits):
    """Clamping the input to the window leaves every output code of a dense float64 sweep unchanged, and the
    window cannot shrink by 1% of the range at either end without changing some code."""
    from qtoolkit.numerics import compute_qparams
    from qtoolkit.ptq.activation_grids import table_input_window

    qmin, qmax = 0, 2**bits - 1
    s, z = (float(v) for v in compute_qparams(torch.tensor(out_lo), torch.tensor(out_hi), qmin, qmax, False))

    def codes(x):
        return torch.clamp(torch.round(fn(x) / s) + z, qmin, qmax)

    a, b = table_input_window(fn, lo, hi, s, int(z), qmin, qmax)
    assert lo <= a <= 0.0 <= b <= hi and (b - a) < (hi - lo)
    x = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    assert torch.equal(codes(x), codes(x.clamp(a, b)))
    d = 0.01 * (hi - lo)
    if a > lo + d and a < -d:
        assert not torch.equal(codes(x), codes(x.clamp(a + d, b)))
    if b < hi - d and b > d:
        assert not torch.equal(codes(x), codes(x.clamp(a, b - d)))


class Gate(nn.Module):
    """A squeeze-excitation-like gate: large logits into a sigmoid, times the features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.gate = nn.Sigmoid()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(y * self.gate(self.fc(y.mean((2, 3), keepdim=True))))


@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_calibrate_fits_gate_input_grids_and_convert_stays_faithful(preset):
    """The sigmoid's input grid (and the tied output grid of the layer feeding it) shrinks to the window, the
    fake-quant model gets closer to float64, and the converted model (integer path) still gives the fake-quant
    model's numbers."""
    torch.manual_seed(0)
    m = Gate().eval()
    with torch.no_grad():
        m.fc.weight.mul_(80.0)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 6, 6, generator=g) for _ in range(3)]
    plain = qt.calibrate(qt.prepare(m, preset), data, progress=False, fit_tables=False)
    fitted = qt.calibrate(qt.prepare(m, preset), data, progress=False)
    fin_p, fin_f = plain.gate.input_quantizer, fitted.gate.input_quantizer
    assert float(fin_f.scale) < 0.5 * float(fin_p.scale)
    tied = fitted.fc.output_quantizer  # the converted fc requantizes to this grid: it must be the table's
    assert torch.equal(tied.scale, fin_f.scale) and torch.equal(tied.zero_point, fin_f.zero_point)
    assert torch.equal(fitted.gate.output_quantizer.scale, plain.gate.output_quantizer.scale)
    x = torch.randn(64, 3, 6, 6, generator=g)
    with torch.no_grad():
        logits = m.fc(m.conv(x).mean((2, 3), keepdim=True))  # the gate's float input
        ref = torch.sigmoid(logits.double())
        err_p, err_f = (float((q.gate(logits.clone()).double() - ref).pow(2).mean()) for q in (plain, fitted))
        assert err_f < err_p
        fq_out = fitted(x)
        int8 = qt.convert(fitted)
        qt.set_execution(int8, "integer")
        y = int8(x)
    step = float(fitted.head.output_quantizer.scale)
    assert float((y - fq_out).abs().max()) <= 1.01 * step

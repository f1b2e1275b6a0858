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

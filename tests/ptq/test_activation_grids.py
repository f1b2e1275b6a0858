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

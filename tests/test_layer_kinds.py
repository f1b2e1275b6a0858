"""Layer-kind registry: every registered kind prepares, fake-quantizes per output channel, folds BN and converts."""

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.layer_kinds import LayerKind, get_layer_kind, kind_of, layer_kinds, register_layer_kind
from qtoolkit.nn.quant_layer import QuantLayer
from tests.conftest import randomize_bn

# (layer, input shape): strides, groups, dilation and output_padding that exercise the weight layout
CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, dilation=2), (3, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 5, 6, 7)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (3, 4, 7)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), (2, 4, 3, 4, 3)),
    "linear": (lambda: nn.Linear(12, 6), (3, 5, 12)),
}


def _layer(name):
    torch.manual_seed(0)
    make, shape = CASES[name]
    return make(), torch.randn(*shape)


def test_registry_covers_the_cases_and_refuses_duplicates():
    assert {k.name for k in layer_kinds()} >= set(CASES)
    for name in CASES:
        layer, _ = _layer(name)
        assert kind_of(layer) is get_layer_kind(name)
    with pytest.raises(ValueError, match="exists already"):
        register_layer_kind(get_layer_kind("conv2d"))
    with pytest.raises(ValueError, match="Conv2d already belong"):
        register_layer_kind(LayerKind("my_conv", (nn.Conv2d,), torch.nn.functional.conv2d, None, 2))
    with pytest.raises(TypeError, match="unsupported layer type LSTM; supported: .*ConvTranspose2d"):
        kind_of(nn.LSTM(2, 2))
    with pytest.raises(KeyError, match="unknown layer kind 'conv9d'"):
        get_layer_kind("conv9d")


@pytest.mark.parametrize("name", list(CASES))
def test_canonical_layout_round_trips_and_op_equals_the_float_layer(name):
    layer, x = _layer(name)
    kind = kind_of(layer)
    g = getattr(layer, "groups", 1)
    w = kind.to_canonical(layer.weight.detach(), g)
    assert w.shape[0] == (layer.out_channels if not kind.is_linear else layer.out_features)
    assert torch.equal(kind.from_canonical(w, g), layer.weight.detach())
    torch.testing.assert_close(kind.op(x.double(), w.double(), layer.bias.detach().double(), kind.geometry(layer)),
                               layer.double()(x.double()))


@pytest.mark.parametrize("name", list(CASES))
def test_weight_fake_quant_is_per_output_channel(name):
    """Oracle: torch.fake_quantize_per_channel_affine on the layer's own weight, along its output-channel axis."""
    layer, x = _layer(name)
    q = QuantLayer(layer, qt.get_qconfig("w8-weight-only"))
    q.eval()
    q.calibrate_weight()
    wq = q.weight_quantizer
    kind = kind_of(layer)
    w = layer.weight.detach()
    if kind.transposed and layer.groups == 1:
        axis = 1  # ConvTranspose weight is [in, out, *k]
    elif kind.transposed:  # grouped: an output channel is not one axis of [in, out / groups, *k]; use [out, in / g, *k]
        w, axis = kind.to_canonical(w, layer.groups), 0
        assert torch.equal(w[1], layer.weight.detach()[:2, 1])  # output channel 1 = group 0, its column 1
    else:
        axis = 0
    amax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
    scale = (amax / 127).float()
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), axis, -127, 127)
    torch.testing.assert_close(wq.scale, scale)
    got = wq(q.weight.detach())
    got = got if axis == 0 and kind.transposed else kind.from_canonical(got, getattr(layer, "groups", 1))
    assert torch.equal(got, ref)


def _model(name):
    layer, x = _layer(name)
    kind = kind_of(layer)
    if kind.is_linear:
        return nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 3)).eval(), x
    model = randomize_bn(nn.Sequential(layer, kind.bn_type(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))).eval()
    model(x)  # materialize the LazyLinear
    return model, x


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_folds_bn_and_converts_faithfully(name):
    model, x = _model(name)
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
    qm = qt.prepare(model, "w8a8")
    assert isinstance(qm[0], QuantLayer) and qm[0].kind == name
    with qt.fake_quant_disabled(qm), torch.no_grad():  # BN folded on the canonical weight: the float function
        torch.testing.assert_close(qm(x).double(), ref, rtol=1e-4, atol=1e-5)
    data = [torch.randn_like(x) for _ in range(3)] + [x]
    qt.calibrate(qm, data, progress=False)
    with torch.no_grad():
        fq_out = qm(x)
    cm = qt.convert(qm)
    assert type(cm[0]).__name__ == "Int8Layer" and cm[0].kind == name
    qt.set_execution(cm, "reference")
    with torch.no_grad():
        assert torch.equal(cm(x), fq_out)  # reference execution: the fake-quant numbers
        qt.set_execution(cm, "integer")
        step = float(cm[-1].output_scale)
        assert (cm(x) - fq_out).abs().max() <= 2 * step + 1e-6  # exact accumulation, fixed-point requantize


def test_a_layer_that_never_ran_is_rebuilt_float_in_its_own_layout():
    layer, x = _layer("conv_transpose2d")
    model = nn.ModuleDict({"used": nn.Conv2d(4, 4, 1), "unused": layer})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, t):
            return self.m["used"](t)

    qm = qt.prepare(Net().eval(), "w8a8")
    with pytest.warns(UserWarning, match="m.unused.input_quantizer"):
        qt.calibrate(qm, [x], progress=False)
    with pytest.warns(UserWarning):
        cm = qt.convert(qm)
    rebuilt = cm.m["unused"]
    assert type(rebuilt) is nn.ConvTranspose2d
    assert torch.equal(rebuilt.weight, layer.weight) and rebuilt.output_padding == layer.output_padding

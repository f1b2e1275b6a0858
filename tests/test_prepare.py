import warnings

import pytest
import torch
import torchvision
from torch import nn

import qtoolkit as qt
from qtoolkit.nn import QuantAdd, QuantLayer
from tests.conftest import randomize_bn


def _float_layers(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear)]


@pytest.mark.parametrize("ctor,n_add", [(torchvision.models.resnet18, 8), (torchvision.models.mobilenet_v2, 10), (torchvision.models.resnet50, 16)])
def test_unmodified_torchvision_fully_quantized(ctor, n_add):
    m = ctor(num_classes=10)
    n_layers = len(_float_layers(m))
    qm = qt.prepare(m, "w8a8")
    assert _float_layers(qm) == []  # every Conv/Linear became a QuantLayer
    assert sum(isinstance(x, QuantLayer) for x in qm.modules()) == n_layers
    assert sum(isinstance(x, QuantAdd) for x in qm.modules()) == n_add
    assert not any(isinstance(x, nn.BatchNorm2d) for x in qm.modules())  # folded (PTQ)
    assert qt.float_ops(qm) == []
    # original model untouched
    assert isinstance(m.layer1[0].bn1 if hasattr(m, "layer1") else m.features[0][1], nn.BatchNorm2d)


def test_prepared_model_without_fake_quant_equals_float():
    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    qm = qt.prepare(m, "w8a8")
    x = torch.randn(2, 3, 32, 32)
    with qt.fake_quant_disabled(qm):
        torch.testing.assert_close(qm(x), m(x), rtol=1e-4, atol=1e-4)


def test_overrides_by_glob_and_type_and_skip():
    m = torchvision.models.resnet18(num_classes=10)
    qm = qt.prepare(m, "w4a4", overrides={"conv1": "w8a8", nn.Linear: "w8a8"}, skip=["layer4.1.*"])
    assert qm.conv1.weight_quantizer.spec.bits == 8 and qm.conv1.input_quantizer.spec.bits == 8
    assert qm.fc.weight_quantizer.spec.bits == 8
    assert qm.layer1[0].conv1.weight_quantizer.spec.bits == 4
    assert qm.layer1[0].conv1.input_quantizer.spec.bits == 4
    # skipped block stays float, reported
    assert type(qm.layer4[1].conv1).__name__ == "FusedLayer"
    assert any(op.where.startswith("layer4.1") for op in qt.float_ops(qm))
    assert "layer4.1" in qt.summary(qm)


def test_unmatched_override_warns_by_name():
    with pytest.warns(UserWarning, match="nothing_here"):
        qt.prepare(nn.Sequential(nn.Linear(4, 4)), overrides={"nothing_here": "w8a8"})


def test_unsupported_layers_reported():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.LayerNorm([8]))
    qm = qt.prepare(m)
    ops = {op.op for op in qt.float_ops(qm)}
    assert "LayerNorm" in ops and "ConvTranspose2d" not in ops  # a registered layer kind: quantized
    assert isinstance(qm[1], qt.nn.QuantLayer) and qm[1].kind == "conv_transpose2d"
    assert "LayerNorm" in qt.summary(qm)


def test_prepare_twice_and_bad_args():
    qm = qt.prepare(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="already prepared"):
        qt.prepare(qm)
    with pytest.raises(ValueError, match="unknown qconfig preset"):
        qt.prepare(nn.Linear(4, 4), "w3a3")
    with pytest.raises(TypeError, match="overrides"):
        qt.prepare(nn.Linear(4, 4), overrides={3: "w8a8"})


def test_qat_keeps_bn_live_and_trains():
    m = randomize_bn(torchvision.models.resnet18(num_classes=10))
    qm = qt.prepare(m, "w4a4", qat=True)
    assert qm.training
    assert qm.layer1[0].conv1.bn is not None
    assert qm.layer1[0].conv1.input_quantizer.config.calibrator == "ema"
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(qm(x), y)
    loss.backward()
    assert qm.conv1.weight.grad is not None and qm.conv1.weight.grad.abs().sum() > 0
    opt.step()
    # frozen BN in eval equals the folded PTQ arithmetic up to float rounding
    qt.freeze_bn(qm)
    qm.eval()
    with torch.no_grad():
        out = qm(x)
    assert torch.isfinite(out).all()


def test_dynamic_and_weight_only_modes():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    for preset in ("w8a8-dynamic", "w8-weight-only"):
        qm = qt.prepare(m, preset)
        q0 = qm[0]
        assert isinstance(q0, QuantLayer)
        assert q0.output_quantizer is None
        assert (q0.input_quantizer is None) == (preset == "w8-weight-only")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = qm(torch.randn(3, 16))
        assert y.shape == (3, 4)


def test_skip_accepts_one_glob_as_a_string():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    qm = qt.prepare(net, skip="2")  # one pattern, not the characters of a string
    assert isinstance(qm[0], QuantLayer) and isinstance(qm[2], nn.Conv2d) and not isinstance(qm[2], QuantLayer)
    with pytest.warns(UserWarning, match="skip pattern 'conv' matches no module"):
        qt.prepare(net, skip="conv")

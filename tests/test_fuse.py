import torch
import torchvision
from torch import nn

from qtoolkit.fuse import fuse_model
from qtoolkit.nn.fused import Add, FusedLayer
from tests.conftest import randomize_bn


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_torchvision_models_fuse_exactly():
    for ctor, n_add, n_fused in [(torchvision.models.resnet18, 8, 20), (torchvision.models.mobilenet_v2, 10, 52)]:
        m = randomize_bn(ctor(num_classes=10)).eval()
        fused, report = fuse_model(m)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-4)
        assert _count(fused, Add) == n_add
        assert _count(fused, FusedLayer) == n_fused
        # every BatchNorm was absorbed into a FusedLayer
        standalone = [n for n, mod in fused.named_modules() if isinstance(mod, nn.BatchNorm2d) and not n.endswith(".bn")]
        assert standalone == []
        assert report == []


class Shared(nn.Module):
    """One ReLU module used twice, functional relu, and an add with a constant."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.conv2(y) + x
        y = torch.nn.functional.relu(y)
        return self.relu(y) + 1.0


def test_shared_relu_functional_relu_and_constant_add():
    m = Shared().eval()
    fused, report = fuse_model(m)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fused(x), m(x))
    assert isinstance(fused.conv1, FusedLayer) and fused.conv1.act == "relu"
    adds = [mod for mod in fused.modules() if isinstance(mod, Add)]
    assert len(adds) == 1 and adds[0].act == "relu"
    assert any(op.op == "add" for op in report)  # the `+ 1.0` stays float and is reported


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x) + x
        return x


def test_untraceable_module_is_reported_and_unchanged():
    m = nn.Sequential(Untraceable(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    fused, report = fuse_model(m)
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(fused(x), m(x))
    assert isinstance(fused[1], FusedLayer)
    assert any("not traceable" in op.reason and op.where == "0" for op in report)


def test_fuse_does_not_modify_input_model():
    m = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fuse_model(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m.layer1[0].bn1, nn.BatchNorm2d)

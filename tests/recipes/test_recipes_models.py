"""Shape and structure tests for recipes.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recipes.models import MODELS, BasicBlock, build_model, resnet20, resnet32, resnet56


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_depths_and_param_counts() -> None:
    def n_blocks(m: nn.Module) -> int:
        return sum(isinstance(x, BasicBlock) for x in m.modules())

    assert [n_blocks(f()) for f in (resnet20, resnet32, resnet56)] == [9, 15, 27]
    # He et al. 2016 report 0.27M parameters for ResNet-20 (option B adds a few 1x1 convs)
    assert 265_000 < sum(p.numel() for p in resnet20().parameters()) < 280_000


def test_each_relu_module_called_once() -> None:
    """Every ReLU call site owns its module (needed for per-site observers)."""
    model = build_model("resnet20", 10, 1).eval()
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert len(calls) == 1 + 2 * 9
    assert set(calls.values()) == {1}


def test_option_b_shortcut_only_when_shape_changes() -> None:
    model = resnet20()
    ds = {n for n, m in model.named_modules() if isinstance(m, BasicBlock) and m.downsample is not None}
    assert ds == {"layer2.0", "layer3.0"}
    conv = model.layer2[0].downsample[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet7")

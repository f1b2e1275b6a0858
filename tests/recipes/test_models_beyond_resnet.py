"""recipes.models_small: torchvision's MobileNetV2 / EfficientNet / ViT adapted to 28x28 and 32x32 inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from recipes.models import MODELS, build_model


@pytest.mark.parametrize(("name", "channels"), [("mobilenet_v2", 1280), ("efficientnet_small", 640)])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_convnets_stride_16_and_stem_takes_the_input_channels(name, channels, in_channels, size):
    torch.manual_seed(0)
    m = build_model(name, num_classes=10, in_channels=in_channels).eval()
    stem = m.features[0][0]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == in_channels and stem.stride == (1, 1)
    with torch.no_grad():
        feats = m.features(torch.randn(2, in_channels, size, size))
    # stride-1 stem, then torchvision's four stride-2 stages: 28 -> 2, 32 -> 2
    assert feats.shape == (2, channels, 2, 2)


def test_mobilenet_v2_is_width_half_relu6():
    m = build_model("mobilenet_v2", 10, 1)
    assert m.features[1].conv[0][0].out_channels == 16  # 32 * 0.5
    assert any(isinstance(x, nn.ReLU6) for x in m.modules())
    assert not any(isinstance(x, (nn.SiLU, SqueezeExcitation)) for x in m.modules())


def test_efficientnet_small_has_silu_and_squeeze_excitation_and_half_depth():
    m = build_model("efficientnet_small", 10, 1)
    se = [x for x in m.modules() if isinstance(x, SqueezeExcitation)]
    # B0's stages repeat 1, 2, 2, 3, 3, 4, 1 MBConv blocks; depth 0.5 rounds each n / 2 up: 1, 1, 1, 2, 2, 2, 1
    assert len(se) == 10
    assert isinstance(se[0].scale_activation, nn.Sigmoid) and isinstance(se[0].activation, nn.SiLU)
    assert any(isinstance(x, nn.SiLU) for x in m.features[0].modules())


@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_vit_small_shape_and_token_count(in_channels, size):
    torch.manual_seed(0)
    m = build_model("vit_small", 10, in_channels).eval()
    assert len(m.encoder.layers) == 6 and m.hidden_dim == 128 and m.patch_size == 4
    assert m.conv_proj.in_channels == in_channels
    with torch.no_grad():
        tokens = m._process_input(torch.randn(2, in_channels, size, size))
        out = m(torch.randn(2, in_channels, size, size))
    assert tokens.shape == (2, (size // 4) ** 2, 128) and out.shape == (2, 10)


def test_vit_rejects_an_image_size_the_patch_does_not_divide():
    from recipes.models_small import vit_small

    with pytest.raises(ValueError, match="patch_size"):
        vit_small(10, 1, image_size=30)


def test_registered_and_trainable_one_step():
    torch.manual_seed(0)
    for name in ("mobilenet_v2", "efficientnet_small", "vit_small"):
        assert name in MODELS
        m = build_model(name, 10, 1).train()
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)

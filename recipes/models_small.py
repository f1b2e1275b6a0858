"""torchvision's MobileNetV2, EfficientNet and ViT adapted to 1x28x28 / 3x32x32 inputs.

The ImageNet classes downsample by 32 (224 -> 7); on 28x28 that would leave a 1x1 map.
The adaptation used here, as CIFAR ports of these nets do:

* the stem conv takes ``in_channels`` and has stride 1, so the total stride is 16
  (28 -> 2, 32 -> 2; the later stages at 1-4 pixels keep the training cost near ResNet-20's
  a tenth, which a shared 2-core CPU can train in minutes);
* ``vit_small``: ``conv_proj`` takes ``in_channels``; the image size is 28 for one input
  channel and 32 for three (``image_size`` overrides it).

Everything else (blocks, SiLU / ReLU6, squeeze-excitation, LayerNorm, init) is torchvision's.

Example:
    >>> import torch
    >>> mobilenet_v2(10, 1)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math

from torch import nn
from torchvision.models import MobileNetV2, VisionTransformer
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

__all__ = ["efficientnet_small", "mobilenet_v2", "vit_small"]


def _replace_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A stride-1 copy of ``conv`` taking ``in_channels`` (kaiming-normal init like torchvision)."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=1,
                    padding=conv.padding, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    """torchvision MobileNetV2 (ReLU6, width 0.5) with a stride-1 stem (total stride 16).

    Example:
        >>> mobilenet_v2(10, 3)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult)
    model.features[0][0] = _replace_stem(model.features[0][0], in_channels)
    return model


def efficientnet_small(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5,
                       depth_mult: float = 0.5, stochastic_depth_prob: float = 0.1) -> EfficientNet:
    """torchvision EfficientNet with B0's MBConv stages (SiLU, squeeze-excitation), width 0.5, depth 0.5.

    The stem has stride 1 (total stride 16); dropout 0.2 before the classifier.

    Example:
        >>> efficientnet_small(10, 1)(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult)
    model = EfficientNet(setting, dropout=0.2, stochastic_depth_prob=stochastic_depth_prob,
                         num_classes=num_classes, last_channel=last_channel)
    model.features[0][0] = _replace_stem(model.features[0][0], in_channels)
    return model


def vit_small(num_classes: int = 10, in_channels: int = 3, image_size: int | None = None,
              patch_size: int = 4, num_layers: int = 6, hidden_dim: int = 128, num_heads: int = 4,
              mlp_dim: int = 256) -> VisionTransformer:
    """torchvision VisionTransformer: 6 layers, dim 128, 4 heads, MLP 256, patch 4, LayerNorm.

    ``image_size`` defaults to 28 for one input channel (Fashion-MNIST) and 32 otherwise.

    Example:
        >>> vit_small(10, 1)(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    size = image_size if image_size is not None else (28 if in_channels == 1 else 32)
    if size % patch_size:
        raise ValueError(f"vit_small: image_size {size} is not a multiple of patch_size {patch_size}")
    model = VisionTransformer(image_size=size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                              num_classes=num_classes)
    proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
    fan_in = in_channels * patch_size * patch_size
    nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(proj.bias)
    model.conv_proj = proj
    return model

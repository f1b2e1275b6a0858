"""Recipe models for 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs.

CIFAR-style ResNets are written the way users write them (plain ``nn.Module`` code); the
models beyond ResNet are torchvision's classes adapted to small inputs
(:mod:`recipes.models_small`): ``mobilenet_v2`` (width 0.5), ``efficientnet_small``
(EfficientNet-B0 blocks, width 0.5, depth 0.5: SiLU, squeeze-excitation) and ``vit_small``
(6 layers, dim 128, patch 4).

* ``resnet20`` / ``resnet32`` / ``resnet56``: He et al. 2016 (Sec. 4.2) CIFAR ResNets:
  a 3x3 stem conv with 16 channels, three stages of ``n`` BasicBlocks with 16/32/64
  channels (``n`` = 3 / 5 / 9), global average pooling and a linear classifier.
* ``resnet18_cifar``: torchvision-like ResNet-18 (64/128/256/512 channels, two
  BasicBlocks per stage) with a 3x3 stride-1 stem and no max-pool.

The shortcut uses **option B** (1x1 conv with stride 2 + BatchNorm) whenever the
shape changes. The paper's option A (zero-padding the channels of a strided slice)
is not quantization friendly: the slicing/padding ops have no quantized module
equivalents and the zero-padded channels distort per-tensor activation ranges, so
option B is used everywhere.

Every ReLU call site owns its own ``nn.ReLU`` module (``relu1``, ``relu2``) so that
eager-mode quantization tools can attach observers per call site.

Example:
    >>> import torch
    >>> model = resnet20(num_classes=10, in_channels=1)
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recipes.models_small import efficientnet_small, mobilenet_v2, vit_small

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "ResNet18Cifar",
    "build_model",
    "efficientnet_small",
    "mobilenet_v2",
    "vit_small",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet56",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (option-B shortcut).

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (2 at the start of a downsampling stage).

    Example:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu1(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu2(out)
        return out


def _kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal conv init, BN weight 1 / bias 0, default-ish linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=5**0.5)
            nn.init.zeros_(m.bias)


class _ResNetBase(nn.Module):
    """Shared stem / stages / head for the CIFAR-style ResNets."""

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i, (width, n) in enumerate(zip(widths, blocks_per_stage)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(width, n, stride))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)
        _kaiming_init(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


class CifarResNet(_ResNetBase):
    """He et al. 2016 CIFAR ResNet with depth ``6n + 2`` (16/32/64 channels).

    Args:
        depth: 20, 32, 44, 56, 110, ... (must satisfy ``(depth - 2) % 6 == 0``).
        num_classes: Number of output logits.
        in_channels: Input image channels (3 for CIFAR, 1 for Fashion-MNIST).

    Example:
        >>> CifarResNet(20)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 56), got {depth}")
        n = (depth - 2) // 6
        super().__init__((16, 32, 64), (n, n, n), num_classes, in_channels)
        self.depth = depth


class ResNet18Cifar(_ResNetBase):
    """ResNet-18 (64/128/256/512, 2 blocks per stage), 3x3 stride-1 stem, no max-pool.

    Example:
        >>> ResNet18Cifar()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (0.27M params). Example: ``resnet20(10, 1)``."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (0.46M params). Example: ``resnet32(10, 3)``."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (0.85M params). Example: ``resnet56(100, 3)``."""
    return CifarResNet(56, num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet18Cifar:
    """ResNet-18 with CIFAR stem (11.2M params). Example: ``resnet18_cifar(10, 3)``."""
    return ResNet18Cifar(num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18_cifar": resnet18_cifar,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_small": efficientnet_small,
    "vit_small": vit_small,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a model from :data:`MODELS` by name (image size 28 for 1 channel, 32 for 3).

    Example:
        >>> build_model("resnet32", num_classes=10, in_channels=1).fc.in_features
        64
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return factory(num_classes=num_classes, in_channels=in_channels)

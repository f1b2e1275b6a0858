"""Float modules produced by the fusion pass (before quantization).

* :class:`FusedLayer` — a Conv/Linear with its BatchNorm and activation
  (``act(bn(layer(x)))``), the unit an int8 engine runs as one kernel.
* :class:`Add` — a residual ``a + b`` (optionally followed by ReLU) lifted out of
  a model's ``forward`` into a module, so it can be given quantizers.
* :class:`Cat`, :class:`Mul`, :class:`MatMul` — ``torch.cat``/``torch.stack``, an elementwise product of two
  tensors (squeeze-excitation) and a matrix product of two tensors (attention), lifted the same way.
* :class:`Activation` — a functional elementwise activation (``F.silu``, ``torch.sigmoid``, ...) as a module.

Both compute exactly what the original code computed.

Example::

    >>> import torch
    >>> from torch import nn
    >>> f = FusedLayer(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), "relu")
    >>> f(torch.randn(1, 3, 8, 8)).min() >= 0
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("relu", "relu6")


def apply_activation(x: Tensor, act: str | None, inplace: bool = False) -> Tensor:
    """Apply a fused activation by name (``None``, ``"relu"``, ``"relu6"``); ``inplace`` overwrites ``x`` (only for
    a fresh tensor whose producer's backward does not need it, such as a convolution's or batch norm's output)."""
    if act is None:
        return x
    if act == "relu":
        return F.relu(x, inplace=inplace)
    if act == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace=inplace)
    raise ValueError(f"unknown fused activation {act!r}; expected one of {ACTIVATIONS}")


class FusedLayer(nn.Module):
    """``act(bn(layer(x)))`` for a Conv1d/Conv2d/Linear ``layer``.

    Args:
        layer: the Conv or Linear module.
        bn: its BatchNorm (or ``None``).
        act: ``None``, ``"relu"`` or ``"relu6"``.
    """

    def __init__(self, layer: nn.Module, bn: nn.Module | None = None, act: str | None = None) -> None:
        super().__init__()
        if act not in (None, *ACTIVATIONS):
            raise ValueError(f"FusedLayer: unknown activation {act!r}")
        self.layer = layer
        self.bn = bn
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer(x)
        if self.bn is not None:
            if isinstance(self.layer, nn.Linear) and x.dim() > 2:  # per output feature (the last dim): LeViT's tokens
                x = self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            else:
                x = self.bn(x)
        return apply_activation(x, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"


class Add(nn.Module):
    """``a + b`` (then ``act``) as a module; a residual connection's adder.

    Non-tensor operands (e.g. ``x + 1``) fall through to Python's ``+``.
    """

    def __init__(self, act: str | None = None) -> None:
        super().__init__()
        if act not in (None, *ACTIVATIONS):
            raise ValueError(f"Add: unknown activation {act!r}")
        self.act = act

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return apply_activation(a + b, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"


class Cat(nn.Module):
    """``torch.cat(tensors, dim)`` (``stack=True``: ``torch.stack``) as a module."""

    def __init__(self, dim: int = 0, stack: bool = False) -> None:
        super().__init__()
        self.dim = int(dim)
        self.stack = bool(stack)

    def forward(self, tensors: Sequence[Tensor]) -> Tensor:
        return (torch.stack if self.stack else torch.cat)(list(tensors), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stack={self.stack}"


class Mul(nn.Module):
    """``a * b`` of two tensors (broadcasting) as a module."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` of two tensors as a module."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class Einsum(nn.Module):
    """``torch.einsum(equation, a, b)`` of two tensors as a module (e.g. MaxViT's attention)."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return repr(self.equation)


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` as a module
    (timm's ViT attention calls it; ``prepare`` gives it int8 ``q·kᵀ`` and ``p·v`` matmuls).

    Example::

        >>> q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
        >>> torch.equal(ScaledDotProductAttention()(q, k, v), F.scaled_dot_product_attention(q, k, v))
        True
    """

    def __init__(self, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> None:
        super().__init__()
        self.dropout_p, self.is_causal, self.scale, self.enable_gqa = float(dropout_p), bool(is_causal), scale, bool(enable_gqa)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """``is_causal`` here: a value the model passes at run time (or'ed with the constant one)."""
        kw: dict = {"scale": self.scale} if self.scale is not None else {}
        if self.enable_gqa:
            kw["enable_gqa"] = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
                                              is_causal=bool(self.is_causal or is_causal), **kw)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, is_causal={self.is_causal}, scale={self.scale}"


class PadSame(nn.Module):
    """TensorFlow 'SAME' zero padding for a conv of ``kernel_size`` / ``stride`` / ``dilation`` (computed from the
    input's size, the extra row / column at the bottom / right), the front half of timm's ``Conv2dSame``.

    Example::

        >>> PadSame((3, 3), (2, 2))(torch.ones(1, 1, 6, 6)).shape
        torch.Size([1, 1, 7, 7])
    """

    def __init__(self, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...] = (1, 1)) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), reversed(self.dilation)):
            p = max((-(-int(size) // s) - 1) * s + (k - 1) * d + 1 - int(size), 0)
            pads += [p // 2, p - p // 2]
        return F.pad(x, pads) if any(pads) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


#: elementwise activations an int8 engine runs as a 256-entry lookup table: name -> float function
LUT_ACTIVATIONS = {
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "mish": F.mish, "elu": F.elu, "leaky_relu": F.leaky_relu, "selu": F.selu, "softplus": F.softplus,
}


class Activation(nn.Module):
    """A functional elementwise activation by name (:data:`LUT_ACTIVATIONS`) as a module."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in LUT_ACTIVATIONS:
            raise ValueError(f"Activation: unknown activation {name!r}; known: {', '.join(LUT_ACTIVATIONS)}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return LUT_ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name

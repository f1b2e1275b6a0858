"""Layer-kind registry: what qtoolkit needs to know about each weight layer type.

One :class:`LayerKind` entry per float layer type (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
Linear) holds everything that ``prepare`` (which types to swap, which BatchNorm folds
into them), the prepared and converted twins (the functional op, the geometry to copy),
``convert`` (rebuilding the float layer), the int8 kernels and the ONNX export (the op
name) read. Adding a kind is one :func:`register_layer_kind` call (plus its int8 kernel,
if it gets one).

**Weights are held out-channels-first.** Every twin stores its weight in the *canonical*
layout ``[out_channels, in_channels / groups, *kernel]`` (Linear: ``[out, in]``), so
per-channel quantization, BN folding, int4 packing and the integer accumulation all work
along axis 0. A transposed convolution's own layout ``[in, out / groups, *kernel]`` is
converted on the way in (:meth:`LayerKind.to_canonical`) and back in its op
(:meth:`LayerKind.from_canonical`); per-channel scales are therefore per *output*
channel for every kind, as torch.ao and TensorRT use them.

Example::

    >>> import torch
    >>> from torch import nn
    >>> kind = kind_of(nn.ConvTranspose2d(4, 6, 3, stride=2))
    >>> kind.name, kind.onnx_op, kind.spatial_dims
    ('conv_transpose2d', 'ConvTranspose', 2)
    >>> layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    >>> w = kind.to_canonical(layer.weight, layer.groups)
    >>> tuple(w.shape)  # [out, in / groups, kh, kw]
    (6, 2, 3, 3)
    >>> torch.equal(kind.from_canonical(w, layer.groups), layer.weight)
    True
    >>> x = torch.randn(1, 4, 5, 5)
    >>> geometry = kind.geometry(layer)
    >>> torch.allclose(kind.op(x, w, layer.bias, geometry), layer(x))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerKind", "register_layer_kind", "kind_of", "get_layer_kind", "layer_kinds", "weight_layer_types"]

#: conv attributes every conv-like twin copies from its float layer
CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


@dataclass(frozen=True)
class LayerKind:
    """One weight-layer kind.

    Args:
        name: short name (``"conv2d"``), stored on the twins as ``.kind``.
        float_types: the float module types of this kind (exact types are matched).
        functional: ``F.conv2d``-like op ``(x, w, b, **geometry_args)`` in the layer's own weight layout.
        bn_type: the BatchNorm that folds into it when it follows directly (None: none does).
        spatial_dims: 0 for Linear, else the number of spatial dimensions.
        transposed: a transposed convolution (weight ``[in, out / groups, *kernel]``).
        onnx_op: the ONNX operator it exports to.
    """

    name: str
    float_types: tuple[type[nn.Module], ...]
    functional: Callable[..., Tensor]
    bn_type: type[nn.Module] | None
    spatial_dims: int
    transposed: bool = False
    onnx_op: str = "Conv"

    # ---------------------------------------------------------------- shape facts
    @property
    def is_linear(self) -> bool:
        return self.spatial_dims == 0

    @property
    def input_dims(self) -> int:
        """Rank of a batched input (Linear: at least 1, checked on the last dimension)."""
        return self.spatial_dims + 2

    def channel_shape(self, ndim: int) -> list[int]:
        """Shape that broadcasts a per-output-channel vector over an output of rank ``ndim``."""
        if self.is_linear:
            return [-1]
        return [1, -1] + [1] * (ndim - 2)

    # ---------------------------------------------------------------- geometry
    def geometry(self, layer: nn.Module) -> dict[str, Any]:
        """The attributes a twin copies from ``layer`` (validated: zero padding mode, integer padding)."""
        if self.is_linear:
            return {"in_features": layer.in_features, "out_features": layer.out_features, "out_channels": layer.out_features}
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{type(layer).__name__}: padding_mode={layer.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(layer.padding, str):
            raise ValueError(f"{type(layer).__name__}: string padding ('same'/'valid') is not supported; use integer padding")
        g: dict[str, Any] = {k: getattr(layer, k) for k in CONV_GEOMETRY}
        for k in ("kernel_size", "stride", "padding", "dilation"):
            g[k] = tuple(g[k])
        g["groups"] = int(g["groups"])
        if self.transposed:
            g["output_padding"] = tuple(layer.output_padding)
        return g

    def op_args(self, m: Any) -> dict[str, Any]:
        """Keyword arguments of :attr:`functional` from a module carrying the geometry attributes."""
        if self.is_linear:
            return {}
        args = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        if self.transposed:
            args["output_padding"] = m.output_padding
        return args

    def op(self, x: Tensor, w: Tensor, b: Tensor | None, m: Any) -> Tensor:
        """The layer's op with a *canonical* weight ``w``; ``m`` carries the geometry (module or dict)."""
        if isinstance(m, dict):
            from types import SimpleNamespace

            m = SimpleNamespace(**m)
        if self.is_linear:
            return F.linear(x, w, b)
        groups = m.groups
        return self.functional(x, self.from_canonical(w, groups), b, **self.op_args(m))

    # ---------------------------------------------------------------- weight layout
    def to_canonical(self, w: Tensor, groups: int = 1) -> Tensor:
        """The layer's weight in the out-channels-first layout ``[out, in / groups, *kernel]``."""
        if not self.transposed:
            return w
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        return (w.reshape(groups, cin // groups, cout_g, *k).transpose(1, 2)
                .reshape(groups * cout_g, cin // groups, *k))

    def from_canonical(self, w: Tensor, groups: int = 1) -> Tensor:
        """Inverse of :meth:`to_canonical`."""
        if not self.transposed:
            return w
        cout, cin_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        return (w.reshape(groups, cout // groups, cin_g, *k).transpose(1, 2)
                .reshape(groups * cin_g, cout // groups, *k))

    # ---------------------------------------------------------------- float rebuild
    def make_float(self, m: Any, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A float layer of this kind with ``m``'s geometry, the canonical ``weight`` and ``bias``."""
        cls = self.float_types[0]
        if self.is_linear:
            layer = cls(m.in_features, m.out_features, bias=bias is not None)
        else:
            kwargs = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, bias=bias is not None)
            if self.transposed:
                kwargs["output_padding"] = m.output_padding
            layer = cls(m.in_channels, m.out_channels, m.kernel_size, **kwargs)
        layer = layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.from_canonical(weight.detach(), getattr(m, "groups", 1)))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer


_REGISTRY: dict[str, LayerKind] = {}
_BY_TYPE: dict[type[nn.Module], LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind (its name and float types must be new). Returns it."""
    if kind.name in _REGISTRY:
        raise ValueError(f"register_layer_kind: a layer kind named {kind.name!r} exists already")
    taken = [t.__name__ for t in kind.float_types if t in _BY_TYPE]
    if taken:
        raise ValueError(f"register_layer_kind: {', '.join(taken)} already belong(s) to another layer kind")
    _REGISTRY[kind.name] = kind
    for t in kind.float_types:
        _BY_TYPE[t] = kind
    return kind


def layer_kinds() -> tuple[LayerKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY.values())


def weight_layer_types() -> tuple[type[nn.Module], ...]:
    """The float module types ``prepare`` swaps for quantized twins."""
    return tuple(_BY_TYPE)


def kind_of(layer: nn.Module) -> LayerKind:
    """The kind of a float layer (exact type match); TypeError naming the supported types otherwise."""
    kind = _BY_TYPE.get(type(layer))
    if kind is None:
        names = ", ".join(t.__name__ for t in _BY_TYPE)
        raise TypeError(f"unsupported layer type {type(layer).__name__}; supported: {names}")
    return kind


def get_layer_kind(name: str) -> LayerKind:
    """A kind by its name (``"conv2d"``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown layer kind {name!r}; registered: {', '.join(_REGISTRY)}") from None


for _k in (
    LayerKind("conv1d", (nn.Conv1d,), F.conv1d, nn.BatchNorm1d, 1),
    LayerKind("conv2d", (nn.Conv2d,), F.conv2d, nn.BatchNorm2d, 2),
    LayerKind("conv3d", (nn.Conv3d,), F.conv3d, nn.BatchNorm3d, 3),
    LayerKind("conv_transpose1d", (nn.ConvTranspose1d,), F.conv_transpose1d, nn.BatchNorm1d, 1, True, "ConvTranspose"),
    LayerKind("conv_transpose2d", (nn.ConvTranspose2d,), F.conv_transpose2d, nn.BatchNorm2d, 2, True, "ConvTranspose"),
    LayerKind("conv_transpose3d", (nn.ConvTranspose3d,), F.conv_transpose3d, nn.BatchNorm3d, 3, True, "ConvTranspose"),
    LayerKind("linear", (nn.Linear,), F.linear, nn.BatchNorm1d, 0, onnx_op="Gemm"),
):
    register_layer_kind(_k)

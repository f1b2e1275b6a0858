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

Model zoos' own classes are recognized without importing the zoo: :func:`register_layer_alias` (a subclass that
computes what its base computes, timm's ``Linear``), :func:`register_norm_act` (normalization with a built-in
activation, timm's ``BatchNormAct2d``) and :func:`register_same_padding_conv` (timm's ``Conv2dSame``).

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

__all__ = ["LayerKind", "register_layer_kind", "kind_of", "get_layer_kind", "layer_kinds", "weight_layer_types", "NormActKind",
           "register_layer_alias", "is_weight_layer", "register_norm_act", "norm_act_kinds", "is_norm_act", "split_norm_act",
           "register_same_padding_conv", "split_same_padding"]

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
        g: dict[str, Any] = {k: getattr(layer, k) for k in CONV_GEOMETRY}
        if isinstance(layer.padding, str):  # 'valid': none; 'same' (stride 1): symmetric where the total is even
            total = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
            if layer.padding == "same" and (self.transposed or any(t % 2 for t in total)):
                raise ValueError(f"{type(layer).__name__}: padding='same' with an odd total padding is asymmetric; not "
                                 "supported (use integer padding)")
            g["padding"] = tuple(t // 2 for t in total) if layer.padding == "same" else (0,) * len(total)
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


_ALIASES: dict[tuple[str, str], str] = {}


def register_layer_alias(package: str, class_name: str, kind_name: str) -> None:
    """A model zoo's subclass of a registered float type that computes exactly what its base computes (timm's
    ``Linear``, which only differs under TorchScript), recognized by its defining top-level package and class name
    (duck typing: the library never imports the zoo) and handled as the kind ``kind_name``.

    Example::

        >>> class Linear(nn.Linear):   # a zoo's own Linear, defined in package "myzoo"
        ...     pass
        >>> Linear.__module__ = "myzoo.layers"
        >>> register_layer_alias("myzoo", "Linear", "linear")
        >>> kind_of(Linear(2, 3)).name, is_weight_layer(Linear(2, 3))
        ('linear', True)
    """
    get_layer_kind(kind_name)
    _ALIASES[(package, class_name)] = kind_name


def _alias_kind(layer: nn.Module) -> LayerKind | None:
    name = _ALIASES.get((type(layer).__module__.split(".")[0], type(layer).__name__))
    if name is None:
        return None
    kind = _REGISTRY[name]
    return kind if isinstance(layer, kind.float_types) else None


def is_weight_layer(layer: nn.Module) -> bool:
    """True if ``prepare`` swaps ``layer`` for a quantized twin (a registered type, or an alias of one)."""
    return type(layer) in _BY_TYPE or _alias_kind(layer) is not None


def kind_of(layer: nn.Module) -> LayerKind:
    """The kind of a float layer (exact type match, or a registered alias); TypeError naming the supported types otherwise."""
    kind = _BY_TYPE.get(type(layer)) or _alias_kind(layer)
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
register_layer_alias("timm", "Linear", "linear")  # timm.layers.Linear: F.linear outside TorchScript


# ==================================================================== normalization + activation modules
@dataclass(frozen=True)
class NormActKind:
    """A normalization module with its activation built in (timm's ``BatchNormAct2d``): ``act(bn(x))`` in one module.

    ``prepare`` treats it as its plain BatchNorm followed by its activation: the BN folds into the preceding layer
    (or becomes a depthwise 1x1 conv when no layer precedes it), a ReLU/ReLU6 is fused into that layer, any other
    activation becomes an int8 lookup table (:class:`~qtoolkit.nn.QuantActivation`).

    Args:
        name: short name.
        matches: True for the modules of this kind (duck typing: the library never imports the model zoo).
        split: ``module -> (plain BatchNorm sharing its parameters and statistics, activation module or None)``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module | None]]


_NORM_ACT: dict[str, NormActKind] = {}


def register_norm_act(kind: NormActKind) -> NormActKind:
    """Add a normalization+activation kind (its name must be new). Returns it.

    Example::

        >>> [k.name for k in norm_act_kinds()]
        ['batch_norm_act', 'frozen_batch_norm_act']
    """
    if kind.name in _NORM_ACT:
        raise ValueError(f"register_norm_act: a kind named {kind.name!r} exists already")
    _NORM_ACT[kind.name] = kind
    return kind


def norm_act_kinds() -> tuple[NormActKind, ...]:
    """Every registered normalization+activation kind, in registration order."""
    return tuple(_NORM_ACT.values())


def is_norm_act(m: nn.Module) -> bool:
    """True if ``m`` is a registered normalization+activation module."""
    return any(k.matches(m) for k in _NORM_ACT.values())


def split_norm_act(m: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """``(plain BatchNorm, activation or None)`` for a normalization+activation module; None for anything else.

    Example::

        >>> class BatchNormAct2d(nn.BatchNorm2d):             # timm's shape of it (duck typed)
        ...     def __init__(self, c):
        ...         super().__init__(c)
        ...         self.drop, self.act = nn.Identity(), nn.SiLU()
        ...     def forward(self, x):
        ...         return self.act(self.drop(super().forward(x)))
        >>> m = BatchNormAct2d(4).eval()
        >>> bn, act = split_norm_act(m)
        >>> type(bn).__name__, type(act).__name__, bn.weight is m.weight
        ('BatchNorm2d', 'SiLU', True)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.equal(act(bn(x)), m(x))
        True
    """
    for k in _NORM_ACT.values():
        if k.matches(m):
            return k.split(m)
    return None


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _activation_child(m: nn.Module) -> nn.Module | None:
    act = getattr(m, "act", None)
    return None if act is None or type(act) is nn.Identity else act


def _drop_is_noop(m: nn.Module) -> bool:
    """timm's ``drop`` (Identity, or DropBlock: the identity in eval) in front of the activation."""
    drop = getattr(m, "drop", None)
    return drop is None or type(drop) is nn.Identity or not drop.training


def _is_bn_act(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in (*_PLAIN_BN, nn.SyncBatchNorm)
            and isinstance(getattr(m, "act", None), nn.Module) and _drop_is_noop(m))


def _plain_bn_type(m: nn.Module) -> type[nn.Module]:
    for t in _PLAIN_BN:
        if isinstance(m, t):
            return t
    return nn.BatchNorm2d  # SyncBatchNorm subclasses (timm's SyncBatchNormAct) run on NCHW


def _split_bn_act(m: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    bn = _plain_bn_type(m)(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                           track_running_stats=m.track_running_stats)
    bn.weight, bn.bias = m.weight, m.bias  # shared: the same Parameters, the same statistics buffers
    bn.running_mean, bn.running_var, bn.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
    bn.train(m.training)
    return bn, _activation_child(m)


def _is_frozen_bn_act(m: nn.Module) -> bool:
    return (not isinstance(m, nn.modules.batchnorm._BatchNorm) and "BatchNorm" in type(m).__name__
            and all(isinstance(getattr(m, a, None), Tensor) for a in ("weight", "bias", "running_mean", "running_var"))
            and isinstance(getattr(m, "act", None), nn.Module) and _drop_is_noop(m))


def _split_frozen_bn_act(m: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    w = m.weight
    bn = nn.BatchNorm2d(w.numel(), eps=float(m.eps)).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for a in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, a).copy_(getattr(m, a))
    bn.requires_grad_(False)
    return bn.eval(), _activation_child(m)


register_norm_act(NormActKind("batch_norm_act", _is_bn_act, _split_bn_act))  # timm BatchNormAct2d, SyncBatchNormAct
register_norm_act(NormActKind("frozen_batch_norm_act", _is_frozen_bn_act, _split_frozen_bn_act))  # timm FrozenBatchNormAct2d


# ==================================================================== convolutions with dynamic 'SAME' padding
_SAME_PADDING: set[tuple[str, str]] = set()


def register_same_padding_conv(package: str, class_name: str) -> None:
    """A model zoo's ``nn.Conv2d`` subclass that pads its input TensorFlow-style ('SAME', computed from the input
    size, asymmetric) and then convolves without padding (timm's ``Conv2dSame``), recognized by defining top-level
    package and class name. ``prepare`` splits it into a :class:`~qtoolkit.nn.fused.PadSame` (data movement: zeros
    are exact on every activation grid) and a plain ``nn.Conv2d`` sharing its parameters.

    Example::

        >>> class Conv2dSame(nn.Conv2d):
        ...     pass
        >>> Conv2dSame.__module__ = "myzoo.layers"
        >>> register_same_padding_conv("myzoo", "Conv2dSame")
        >>> conv = split_same_padding(Conv2dSame(3, 4, 3, stride=2))
        >>> type(conv).__name__, conv.padding
        ('Conv2d', (0, 0))
    """
    _SAME_PADDING.add((package, class_name))


def split_same_padding(m: nn.Module) -> nn.Module | None:
    """The plain ``nn.Conv2d`` (padding 0, the same Parameters) of a registered 'SAME'-padding conv; else None."""
    if not isinstance(m, nn.Conv2d) or (type(m).__module__.split(".")[0], type(m).__name__) not in _SAME_PADDING:
        return None
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None,
                     device=m.weight.device, dtype=m.weight.dtype)
    conv.weight, conv.bias = m.weight, m.bias
    conv.train(m.training)
    return conv


register_same_padding_conv("timm", "Conv2dSame")

"""Quantization-aware weight layers (every kind in :mod:`qtoolkit.layer_kinds`: Conv1d/2d/3d, ConvTranspose, Linear; the *prepared* form).

One class covers every layer kind: a :class:`QuantLayer` holds the float
weight and bias, a weight :class:`~qtoolkit.fake_quant.FakeQuantize`
(per-channel), an input activation quantizer (static or dynamic; none for
weight-only), an observe-only *output* quantizer that records the range an
integer engine requantizes to, and an optional fused activation.

BatchNorm:

* PTQ (``qat=False``): BN is folded into weight and bias at prepare time.
* QAT (``qat=True``): BN stays live with the folded-weight fake quantization
  scheme of Jacob et al. 2018 / Krishnamoorthi 2018: the weight is scaled by
  ``γ/σ_running`` before fake quantization, the conv output is un-scaled and the
  BN normalizes with batch statistics while training (running statistics once
  frozen with :meth:`freeze_bn` or in ``eval()``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit.config import get_qconfig
    >>> q = QuantLayer(nn.Conv2d(3, 8, 3, padding=1), get_qconfig("w8a8"), act="relu")
    >>> y = q(torch.randn(2, 3, 8, 8))       # observes + fake-quantizes
    >>> y.shape
    torch.Size([2, 8, 8, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.layer_kinds import LayerKind, get_layer_kind, kind_of
from qtoolkit.nn.float_attrs import float_attributes, keep_float_attributes
from qtoolkit.nn.fused import ACTIVATIONS, apply_activation
from qtoolkit.numerics import HALF_DTYPES

__all__ = ["QuantLayer", "layer_kind", "fold_bn"]

def layer_kind(layer: nn.Module) -> str:
    """The registered kind name (``"conv2d"``, ``"linear"``, ...) of a supported float layer
    (see :mod:`qtoolkit.layer_kinds`)."""
    return kind_of(layer).name


def _bn_factors(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(γ/σ, β − μ·γ/σ)`` of an (eval-mode) BatchNorm."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    return factor, beta - bn.running_mean * factor


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer's weight and bias."""
    factor, shift = _bn_factors(bn)
    shape = [-1] + [1] * (weight.dim() - 1)
    w = weight * factor.reshape(shape)
    b = shift if bias is None else bias * factor + shift
    return w, b


class QuantLayer(nn.Module):
    """Fake-quantized Conv1d/Conv2d/Linear with optional BN and fused activation.

    Args:
        layer: the float layer (its parameters are copied).
        qconfig: weight/activation quantizers and mode.
        bn: a BatchNorm following the layer (folded, or kept live if ``qat``).
        act: fused activation (``None``, ``"relu"``, ``"relu6"``).
        qat: keep BN live for quantization-aware training.
    """

    def __init__(
        self,
        layer: nn.Module,
        qconfig: QConfig,
        bn: nn.Module | None = None,
        act: str | None = None,
        qat: bool = False,
    ) -> None:
        super().__init__()
        kind = kind_of(layer)
        self.kind = kind.name
        if act not in (None, *ACTIVATIONS):
            raise ValueError(f"QuantLayer: unknown activation {act!r}")
        for attr, value in kind.geometry(layer).items():
            setattr(self, attr, value)
        self.qconfig = qconfig
        self.act = act
        # held out-channels-first (canonical layout): per-channel scales, BN folding and packing along axis 0
        weight = kind.to_canonical(layer.weight.detach(), getattr(layer, "groups", 1)).clone()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        self.bn: nn.Module | None = None
        if bn is not None and not qat:
            weight, bias = fold_bn(weight, bias, bn)
            weight, bias = weight.detach(), bias.detach()
        elif bn is not None:
            self.bn = bn
            self.register_buffer("bn_frozen", torch.tensor(0, dtype=torch.uint8))
        self.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias)
        assert qconfig.weight is not None
        self.weight_quantizer = FakeQuantize(qconfig.weight, role="weight", channels=self.out_channels)
        self.input_quantizer: FakeQuantize | None = None
        self.output_quantizer: FakeQuantize | None = None
        if qconfig.mode == "static":
            assert qconfig.activation is not None
            self.input_quantizer = FakeQuantize(qconfig.activation, role="activation")
            self.output_quantizer = FakeQuantize(qconfig.activation, role="output")
        elif qconfig.mode == "dynamic":
            assert qconfig.activation is not None
            self.input_quantizer = FakeQuantize(qconfig.activation, role="dynamic")
        keep_float_attributes(self, float_attributes(layer))  # what model code may read (``self.conv.eps``)

    # ---------------------------------------------------------------- helpers
    @property
    def kind_info(self) -> LayerKind:
        """The :class:`~qtoolkit.layer_kinds.LayerKind` of this layer."""
        return get_layer_kind(self.kind)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.kind_info.op(x, w, b, self)

    def _channel_shape(self, ndim: int) -> list[int]:
        return self.kind_info.channel_shape(ndim)

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with a live BN folded in (running statistics)."""
        if self.bn is None:
            return self.weight, self.bias
        return fold_bn(self.weight, self.bias, self.bn)

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Compute the weight quantizer's qparams from the current (folded) weight."""
        w, _ = self.folded_weight_bias()
        self.weight_quantizer.observer.reset()
        self.weight_quantizer.observer(w.detach())
        self.weight_quantizer.finalize()

    def freeze_bn(self, frozen: bool = True) -> None:
        """Stop updating BN statistics and normalize with the running ones (QAT)."""
        if self.bn is not None:
            self.bn_frozen.fill_(int(frozen))

    @property
    def bn_is_frozen(self) -> bool:
        return self.bn is not None and bool(self.bn_frozen)

    def _int32_bias(self, bias: Tensor | None) -> Tensor | None:
        """The bias as an integer engine adds it: int32 codes at scale ``s_x·s_w``.

        Static mode only, once the input is fake-quantized with calibrated qparams;
        straight-through (the rounding has no gradient). This is the bias that
        :class:`~qtoolkit.nn.int8_layer.Int8Layer` (``bias_int32``), the int8 kernels
        and the ONNX export use, so the fake-quant model predicts them exactly
        (a float bias differs by up to ``0.5·s_x·s_w``, which flips ~1e-4 of a
        ResNet layer's output codes).
        """
        iq = self.input_quantizer
        if (
            bias is None
            or iq is None
            or iq.role != "activation"
            or not bool(iq.fake_quant_enabled)
            or not iq.is_calibrated
            or not bool(self.weight_quantizer.fake_quant_enabled)
        ):
            return bias
        acc_scale = iq.scale.detach().double() * self.weight_quantizer.scale.detach().double()
        q = torch.clamp(torch.round(bias.detach().double() / acc_scale), -(2**31), 2**31 - 1)
        return bias + (q * acc_scale).to(bias.dtype).sub(bias.detach()).detach()

    # ---------------------------------------------------------------- forward
    def _forward_live_bn(self, x: Tensor) -> Tensor:
        bn = self.bn
        assert bn is not None
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        factor = gamma / std
        factor = torch.where(factor.abs() < 1e-12, torch.full_like(factor, 1e-12), factor)
        wshape = [-1] + [1] * (self.weight.dim() - 1)
        w = self.weight_quantizer(self.weight * factor.reshape(wshape))
        y = self._op(x, w, None)
        cshape = self._channel_shape(y.dim())
        y = y / factor.reshape(cshape)
        if self.bias is not None:
            y = y + self.bias.reshape(cshape)
        use_batch_stats = self.training and not self.bn_is_frozen
        shape = y.shape
        if self.kind_info.is_linear and y.dim() > 2:  # Linear + BatchNorm1d over tokens: per output feature
            y = y.reshape(-1, shape[-1])
        return F.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=use_batch_stats, momentum=bn.momentum if bn.momentum is not None else 0.1, eps=bn.eps,
        ).reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantized layer.  float16/bfloat16 inputs are computed in float32 and the result is cast back
        to the input's dtype (every quantized module does the same: one rule for prepared and converted)."""
        dt = x.dtype if isinstance(x, Tensor) else None
        if dt in HALF_DTYPES:
            return self._forward(x.to(torch.float32)).to(dt)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.bn is not None:
            y = self._forward_live_bn(x)
        else:
            y = self._op(x, self.weight_quantizer(self.weight), self._int32_bias(self.bias))
        y = apply_activation(y, self.act, inplace=True)  # y is the conv's / batch norm's fresh output
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # bias correction (qtoolkit.reconstruct) gives a bias to a layer that had none: a freshly prepared twin
        # takes it instead of rejecting the key
        key = prefix + "bias"
        if self.bias is None and isinstance(state_dict.get(key), Tensor) and state_dict[key].shape == (self.out_channels,):
            self.bias = nn.Parameter(torch.empty_like(state_dict[key], device=self.weight.device, dtype=self.weight.dtype),
                                     requires_grad=self.weight.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        if self.kind_info.is_linear:
            shape = f"in_features={self.in_features}, out_features={self.out_features}"
        else:
            shape = (
                f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
            )
        return f"kind={self.kind}, {shape}, mode={self.qconfig.mode}, act={self.act}, live_bn={self.bn is not None}"

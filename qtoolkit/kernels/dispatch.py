"""The ``"fast"`` execution of converted modules: real int8 oneDNN kernels on plain uint8/int8 tensors.

What runs where (CPU, :func:`qtoolkit.kernels.onednn.is_available`):

* **static Conv2d / Linear** (:class:`~qtoolkit.nn.Int8Layer`): the input is taken as uint8 codes —
  straight from a :class:`~qtoolkit.kernels.qtensor.QuantizedActivation` produced by the previous
  converted module when its grid is the layer's input grid (no float round trip), otherwise quantized
  once — and fed to ``onednn::qconv_pointwise`` / ``qlinear_pointwise`` with the weight prepacked once
  (cached on the module, never in the ``state_dict``).  Bias and ReLU are fused (ReLU6 = ReLU + a clamp
  on the codes), the output is requantized in-kernel to the layer's output grid and returned as a new
  carrier (channels_last uint8).  A layer whose output is the model's output returns fp32 instead.
* **residual add**: :func:`qtoolkit.convert_passes.fuse_residual_adds` (run by :func:`qtoolkit.convert`) rewrites, in the
  ``torch.fx`` graphs of the converted model, ``add(conv(x), other)`` — a static conv without its own
  activation whose only user is an :class:`~qtoolkit.nn.Int8Add` — into :func:`fused_conv_add`: one
  ``qconv2d_pointwise.binary`` call with oneDNN's ``sum`` post-op (the other operand's uint8 codes are the
  accumulator), the add's ReLU and the add's output requantization.  The conv's output is not rounded to a
  grid before the add (one rounding fewer than the reference path).  Other adds run :func:`fast_add`:
  one ``qlinear_pointwise.binary`` call on ``[-1, 16]`` views of the two operands' uint8 codes — a
  16×16 identity weight, the second operand as the in-place ``sum`` accumulator (written over the
  dead operand's memory where :func:`qtoolkit.convert_passes.mark_donations` proved it dead, else over a copy) — so the add,
  its ReLU and the output requantization are one kernel with one rounding (small tensors: float
  arithmetic on the codes, cheaper below ~64k elements).
* **dynamic** layers: per-batch activation range (the same qparams as the reference path), the input
  quantized once, int8 GEMM / conv with fp32 output.
* **weight-only** layers run the reference path (there is no int8-activation kernel to use).

Fallback rule: when the kernels are unavailable (torch build / CPU), the input is on another device,
or the layer is not supported (Conv1d, asymmetric or unsigned weights, activations wider than 8 bit),
the module runs its reference path — same results — and warns **once**, naming the layer
(:class:`FastPathWarning`).

Exact on every CPU (CPUs without VNNI): there oneDNN's u8×s8 kernels add pairs of products in int16 with
saturation; a layer is exact only if ``2 · (largest input code) · max|q_w| ≤ 32767``.  Each layer picks its
strategy when it is prepacked: **direct** (one kernel call) where its kernel class does not saturate on this
CPU (probed per class by :func:`~qtoolkit.kernels.onednn.saturates_u8s8`: dense, grouped, depthwise conv,
linear) or the bound holds (7-bit activations as in ``"w8a8-x86"``, ≤ 7-bit weights); otherwise **split**
(:func:`_split_codes`: the input codes as two halves ≤ 128 over twice the input channels, the weight repeated
per half, the input zero point folded into the bias) — one kernel call, exact, twice the MACs.
:func:`fast_status` tells each layer's strategy; nothing warns, because nothing is inexact.

The kernels see a converted module only through its frozen ``kernel_params()``
(:class:`~qtoolkit.kernels.params.LayerParams` / :class:`~qtoolkit.kernels.params.AddParams`); the
prepacked state built from them is cached on the module and dropped by :func:`invalidate` whenever the
module changes. This file imports nothing from :mod:`qtoolkit.nn`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate, convert
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> q = convert(calibrate(prepare(m), [torch.randn(4, 3, 8, 8)], progress=False))
    >>> y = q(torch.randn(2, 3, 8, 8))          # "fast" where the kernels are available
    >>> y.shape, y.dtype
    (torch.Size([2, 4, 6, 6]), torch.float32)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.kernels import dnnl_ext, onednn
from qtoolkit.kernels.fast_add import (
    _accumulator,
    _add_state,
    _add_unsupported_reason,
    _AddState,
    _build_add,
    _finish_add,
    _operand_codes,
    fast_add,
)
from qtoolkit.kernels.fast_state import (
    FastPathWarning,
    _fallback,
    _get_state,
    _out,
    _set_state,
    _without_grad,
)
from qtoolkit.kernels.fast_state import invalidate as invalidate
from qtoolkit.kernels.params import AddParams, LayerParams
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.numerics import HALF_DTYPES, compute_qparams

__all__ = [
    "FastPathWarning",
    "fast_forward",
    "fast_add",
    "fused_conv_add",
    "prepare_fast",
    "supports_fast",
    "fast_status",
]

_CL = torch.channels_last
_QA = QuantizedActivation


# ------------------------------------------------------------------------------------------- state


@dataclass
class _LayerState:
    kind: str
    mode: str
    packed: Tensor
    w_scale: Tensor
    w_zp: Tensor
    bias: Optional[Tensor]
    stride: list
    padding: list
    dilation: list
    groups: int
    shift: int  # added to codes to bring the activation grid into uint8
    qmin: int  # activation code range, uint8 space
    qmax: int
    x_scale: float
    x_zp: int  # uint8 space
    symmetric: bool
    act_qmin: int  # original activation grid (for dynamic qparams)
    act_qmax: int
    out_scale: float
    out_zp: int
    post_op: str
    clamp_lo: int
    clamp_hi: int
    need_clamp: bool
    out_dtype: torch.dtype  # int8 when a [.., 127] grid after ReLU can use the kernel's own int8 clamp
    relu6: bool
    float_out: bool
    strategy: str  # "direct" or "split" (see _split_codes)
    pad: Optional[list]  # split + non-zero input zero point: explicit padding [h, w] with the zero point's code
    w_sum: Optional[Tensor]  # split: per-output-channel sum of the weight codes (zero-point correction in the bias)
    repack: tuple = ()  # prepack arguments: the weight again in the layout oneDNN picks for each input shape
    # static layers without a residual: the kernel runs with input and output scale 1 and these per-channel weight
    # scales / bias in output units (``s_x·s_w/s_y``, ``b/s_y``; fp32 outputs: ``s_x·s_w``, ``b``) -- oneDNN then sets
    # no source / destination scale attributes (~8% less fixed cost per call), same codes
    k_w_scale: Optional[Tensor] = None
    k_bias: Optional[Tensor] = None
    # uint8 output with a large zero point: the kernel writes int8 codes around ``out_zp - 128`` instead, flipped to
    # uint8 after (``^ 0x80``).  oneDNN adds the destination zero point in float32 before rounding; near 128 that
    # float has half the resolution of the value itself, and rounding ties flipped ~5x more often than in the
    # float32 fake-quant model (EfficientNet's pre-SiLU convs; teacher-forced, scripts/check_ties.py)
    out_xor: bool = False
    k_out_zp: int = 0
    by_shape: dict = field(default_factory=dict)  # kernel input shape -> weight packed for it (see packed_for)
    # static direct conv, no residual: the layer's call on qtoolkit's oneDNN extension (primitive cached per input
    # shape; :mod:`qtoolkit.kernels.dnnl_ext`), or None where the torch op runs it (``ext_note`` says why)
    ext: Any = None
    ext_note: str = ""


#: distinct input shapes a layer keeps a packed weight for (oldest dropped first)
MAX_PACKED_SHAPES = 4


def packed_for(st: _LayerState, xq: Tensor) -> Tensor:
    """The layer's weight prepacked in the layout oneDNN chooses for this kernel input's shape.

    The weight packed without a shape hint is in a generic blocked layout; for many shapes (1x1 convolutions
    at batch 1, ResNet-50's bottlenecks, MobileNet's projections) the primitive wants another and the op
    reorders the whole weight on *every call* (``ONEDNN_VERBOSE=1`` shows a ``reorder`` per conv).  Packing once
    per input shape (``input_shape`` hint; at most :data:`MAX_PACKED_SHAPES`) removes those reorders.  The
    integer results are the same in any layout.
    """
    key = xq.shape
    pw = st.by_shape.get(key)
    if pw is None:
        if len(st.by_shape) >= MAX_PACKED_SHAPES:
            st.by_shape.pop(next(iter(st.by_shape)))
        if st.kind == "conv2d":
            pw = onednn.prepack_conv_weight(*st.repack, input_shape=list(key))
        else:
            pw = onednn.prepack_linear_weight(st.repack[0], input_shape=list(key))
        st.by_shape[key] = pw
    return pw


def _params(m: nn.Module) -> LayerParams | AddParams | None:
    """The module's frozen kernel parameters (converted modules define ``kernel_params()``), else None."""
    fn = getattr(m, "kernel_params", None)
    return fn() if callable(fn) else None


def _unsupported_reason(p: LayerParams) -> Optional[str]:
    if not onednn.is_available():
        return "the oneDNN int8 kernels are not available in this torch build / on this CPU"
    if p.mode == "weight_only":
        return "weight-only"
    if p.kind not in ("conv2d", "linear"):
        return f"{p.kind} has no int8 kernel here"
    if p.weight_codes.device.type != "cpu":
        return f"weights on {p.weight_codes.device.type}"
    if p.weight_qmin < -128 or p.weight_qmax > 127 or p.weight_codes.dtype != torch.int8:
        return "weights are not signed <=8-bit"
    if bool((p.weight_zero_point != 0).any()):
        return "asymmetric weights (non-zero weight zero point)"
    if p.act_qmax - p.act_qmin > 255:
        return f"activations wider than 8 bit ([{p.act_qmin}, {p.act_qmax}])"
    return None


def supports_fast(m: nn.Module) -> bool:
    """True if ``m`` (a converted layer / add) can run on the int8 kernels here (weight-only: False).

    Example::

        >>> supports_fast(nn.Linear(2, 2))
        False
    """
    own = getattr(m, "supports_fast", None)  # a converted op with its own fast execution (e.g. a lookup table)
    if callable(own):
        return bool(own())
    p = _params(m)
    if isinstance(p, LayerParams):
        return _unsupported_reason(p) is None
    if isinstance(p, AddParams):
        return _add_unsupported_reason(p) is None
    return False


def _build(m: nn.Module) -> Any:
    """Prepacked state (or the reason there is none) of a converted module, cached on it."""
    p = _params(m)
    return _set_state(m, _layer_state(p) if isinstance(p, LayerParams) else _add_state(p))


def _build_layer(m: nn.Module) -> Any:
    return _set_state(m, _layer_state(m.kernel_params()))  # type: ignore[operator]


@torch.no_grad()
def _layer_state(p: LayerParams) -> Any:
    """The kernels' state for a layer: prepacked weight, requantization, clamps; or why it cannot run."""
    reason = _unsupported_reason(p)
    if reason is not None:
        return reason
    w = p.weight_codes.to(torch.int8)
    w_scale = p.weight_scale.detach().to(torch.float32).reshape(-1).contiguous()
    shift = -p.act_qmin if p.act_qmin < 0 else 0
    qmin, qmax = p.act_qmin + shift, p.act_qmax + shift
    static = p.mode == "static"
    x_scale = p.input_scale if static else 1.0
    x_zp = p.input_zero_point + shift if static else qmin
    bias = None if p.bias is None else p.bias.detach().to(torch.float32).contiguous()
    if p.kind == "conv2d":
        g = p.geometry
        if isinstance(g["padding"], str):
            return f"padding={g['padding']!r}"
        if g.get("padding_mode", "zeros") != "zeros":
            return f"padding_mode={g['padding_mode']!r}"
        stride, padding, dilation = list(g["stride"]), list(g["padding"]), list(g["dilation"])
        groups = int(g["groups"])
        kernel_class = "depthwise" if w.shape[1] == 1 and groups > 1 else "grouped" if groups > 1 else "conv"
    else:
        stride = padding = dilation = []
        groups, kernel_class = 1, "linear"
    wmax = int(w.abs().max()) if w.numel() else 0
    # Exactness without VNNI: oneDNN's u8*s8 kernels (but depthwise) add pairs of products in int16 with
    # saturation.  A layer whose largest input code and weight cannot reach it runs the kernel directly;
    # otherwise the input codes are split in two halves (<= 128 each) over twice the input channels.
    split = 2 * qmax * wmax > 32767 and onednn.saturates_u8s8(kernel_class)
    pad, w_sum, kernel_zp = None, None, x_zp
    if split:
        w = w.repeat_interleave(2, dim=1).contiguous()  # both halves of an input channel see its weight
        w_sum = p.weight_codes.to(torch.float64).reshape(w.shape[0], -1).sum(1)
        # Both halves of a code x run with one input zero point zp // 2 (static; oneDNN subtracts it exactly, in
        # int32): (hi - zp//2) + (lo - zp//2) = x - zp + (zp % 2), so an odd zero point leaves -(zp % 2)·sum(w) for
        # the bias -- one code's worth, not zp's (folding all of -zp·sum(w) into a float32 bias cancelled against
        # the sum: MobileNets lost 1-11 dB to the float64 fake-quant model).  Dynamic layers run with zero point 0
        # and get the whole correction per call.  Padded positions must hold the zero point's code (both halves
        # see it), so padding becomes explicit.
        kernel_zp = x_zp // 2 if static else 0
        odd = x_zp - 2 * kernel_zp if static else 0
        if odd:
            corr = -x_scale * w_scale.double() * odd * w_sum
            bias = corr if bias is None else bias.double() + corr  # float64 until folded below
        if p.kind == "conv2d" and any(padding) and (not static or x_zp != 0):
            pad, padding = padding, [0, 0]
    if p.kind == "conv2d":
        repack: tuple = (w, w_scale, x_scale, kernel_zp, stride, padding, dilation, groups)
        packed = onednn.prepack_conv_weight(*repack)
    else:
        repack = (w,)
        packed = onednn.prepack_linear_weight(w)
    out_scale, out_zp = (p.output_scale, p.output_zero_point + shift) if static else (1.0, 0)
    relu6 = p.act == "relu6"
    post_op = "relu" if p.act in ("relu", "relu6") else "none"
    float_out = (not static) or p.float_output
    lo, hi = qmin, qmax
    if post_op == "relu":
        lo = max(lo, out_zp)
    if relu6 and not float_out:
        hi = min(hi, out_zp + round(6.0 / out_scale))
    need_clamp = (not float_out) and (lo > 0 or hi < 255)
    out_dtype = torch.uint8
    if need_clamp and hi == 127 and post_op == "relu" and lo == out_zp:
        # ReLU keeps codes >= out_zp >= 0 and an int8 output saturates at 127: the kernel does the clamp,
        # and its int8 output is the same bytes as the uint8 codes.
        need_clamp, out_dtype = False, torch.int8
    out_xor = static and not float_out and not need_clamp and out_dtype == torch.uint8 and out_zp >= 64
    k_out_zp = out_zp - 128 if out_xor else out_zp
    if out_xor:
        out_dtype = torch.int8
    bias64 = bias
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.to(torch.float32)  # the real-unit bias (residual-sum calls, dynamic layers)
    k_w_scale, k_bias = w_scale, bias
    if static:
        k = x_scale * w_scale.double() / (1.0 if float_out else out_scale)
        k_w_scale = k.to(torch.float32)
        if bias64 is not None:
            k_bias = (bias64.double() / (1.0 if float_out else out_scale)).to(torch.float32)
    st = _LayerState(
        p.kind, p.mode, packed, w_scale, torch.zeros(w_scale.numel(), dtype=torch.long), bias,
        stride, padding, dilation, groups, shift, qmin, qmax, x_scale, x_zp, p.act_symmetric,
        p.act_qmin, p.act_qmax, out_scale, out_zp, post_op, lo, hi, need_clamp, out_dtype, relu6, float_out,
        "split" if split else "direct", pad, None if w_sum is None else w_sum.to(torch.float32), repack,
        k_w_scale=k_w_scale, k_bias=k_bias, out_xor=out_xor, k_out_zp=k_out_zp,
    )  # fmt: skip
    if static:  # split: the halves are <= 128, so the extension's kernel is exact on them too
        st.ext, st.ext_note = _ext_kernel(st, w, 128 if split else qmax, wmax, kernel_class, bias64)
    return st


def _ext_kernel(st: _LayerState, w: Tensor, qmax: int, wmax: int, kernel_class: str, bias64: Optional[Tensor]) -> tuple[Any, str]:
    """The layer's static call on qtoolkit's oneDNN extension (same integer result, primitive cached), or why not."""
    if dnnl_ext.load() is None:
        return None, dnnl_ext.status()
    if 2 * qmax * wmax > 32767 and dnnl_ext.saturates(kernel_class):
        return None, f"the extension's {kernel_class} kernel saturates int16 on this CPU for this layer's codes"
    os_ = st.k_w_scale.double()
    if not bool(torch.isfinite(os_).all()) or bool((os_ == 0).any()):
        return None, "a zero or non-finite weight scale"
    bias = None
    if bias64 is not None:  # accumulator units: y = os * (acc + b / (s_x * s_w))
        bias = bias64.double() / (1.0 if st.float_out else st.out_scale) / os_
    out = dict(x_zp=st.x_zp // 2 if st.strategy == "split" else st.x_zp, out_zp=0 if st.float_out else st.k_out_zp,
               out_dtype=torch.float32 if st.float_out else st.out_dtype, relu=st.post_op == "relu")  # fmt: skip
    try:
        if st.kind == "conv2d":
            k: Any = dnnl_ext.QConv(w, os_.float(), bias, stride=st.stride, padding=st.padding, dilation=st.dilation,
                                    groups=st.groups, **out)  # fmt: skip
            kh, kw = w.shape[2:]
            side = max(8, (kh - 1) * st.dilation[0] + 1, (kw - 1) * st.dilation[1] + 1)
            impl = k.impl(1, side, side)
        else:
            k = dnnl_ext.QLinear(w, os_.float(), bias, **out)
            impl = k.impl(1)
    except RuntimeError as e:
        return None, f"the oneDNN extension cannot run this layer: {str(e).splitlines()[0]}"
    return k, f"qtoolkit oneDNN extension ({impl})"


# ------------------------------------------------------------------------------------------- layers


def _input_codes(st: Any, x: Tensor, scale: float, zp: int) -> Tensor:
    """uint8 codes of ``x`` on the grid ``(scale, zp)`` / ``[st.qmin, st.qmax]`` (uint8 space)."""
    if type(x) is _QA:
        if x.q_scale == scale and x.q_zero_point == zp and x.q_min >= st.qmin and x.q_max <= st.qmax and x.codes is not None:
            return x.codes
        x = x.dequantize()
    elif not x.is_floating_point():
        raise TypeError(f"expected a floating-point input or a QuantizedActivation, got {x.dtype}")
    # in x's own layout (the conv op makes its channels_last copy of the uint8 codes; converting the
    # float tensor first was slower for a 3-channel NCHW input)
    return onednn.quantize_u8(x, scale, zp, st.qmin, st.qmax)


def _finish(m: nn.Module, st: _LayerState, y: Tensor) -> Tensor:
    if st.float_out:
        if st.relu6:
            y = y.clamp_(max=6.0)
        return y  # the caller attaches inference_only outside no_grad
    if st.need_clamp:
        y = y.clamp_(st.clamp_lo, st.clamp_hi)
    elif st.out_xor:
        y = y.view(torch.uint8).bitwise_xor_(128)
    elif y.dtype == torch.int8:
        y = y.view(torch.uint8)
    return _QA.wrap(y, st.out_scale, st.out_zp, st.qmin, st.qmax)


def _split_codes(xq: Tensor, channels_dim_last: bool = False) -> Tensor:
    """uint8 codes ``x`` -> ``[ceil(x/2), floor(x/2)]`` interleaved along the channels (2x the channels).

    Both halves are <= 128, so any pair of products a u8*s8 kernel adds in int16 stays below
    ``2 * 128 * 127 = 32512``: exact on CPUs without VNNI, with the weight repeated per half
    (``repeat_interleave(2, dim=1)``) the result is the conv / linear of ``x``.  Computed on
    contiguous int16 (``x + 255 * (x >> 1)`` is the two bytes ``(x - (x >> 1), x >> 1)`` in
    little-endian order), ~5x faster than writing the halves through strided uint8 views.
    """
    if not channels_dim_last:  # conv input [N, C, H, W]: C is dim 1 (channels_last memory makes NHWC contiguous)
        nhwc = xq.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        return _split_last(nhwc).permute(0, 3, 1, 2)
    return _split_last(xq if xq.is_contiguous() else xq.contiguous())


def _split_last(x: Tensor) -> Tensor:
    x16 = x.to(torch.int16, memory_format=torch.contiguous_format)  # fresh standard strides (C == 1 included)
    return torch.bitwise_right_shift(x16, 1).mul_(255).add_(x16).view(torch.uint8)


def _run_layer(st: _LayerState, xq: Tensor, x_scale: float, x_zp: int, residual: Optional[Tensor] = None,
               r_scale: float = 1.0, r_zp: int = 0, out_scale: float = 1.0, out_zp: int = 0,
               out_dtype: torch.dtype = torch.uint8, post_op: str = "none") -> Tensor:  # fmt: skip
    bias, w_scale = st.bias, st.w_scale
    if st.mode == "static" and residual is None:  # scales folded into the weight scales (see _LayerState.k_w_scale)
        x_scale, out_scale, w_scale, bias = 1.0, 1.0, st.k_w_scale, st.k_bias
    if st.strategy == "split":
        if st.pad is not None:
            xq = F.pad(xq, (st.pad[1], st.pad[1], st.pad[0], st.pad[0]), value=x_zp)
        xq = _split_codes(xq, channels_dim_last=st.kind == "linear")
        if st.mode != "static" and x_zp != 0:  # static: the kernel's zero point zp // 2 (see _layer_state)
            corr = st.w_scale * (-x_scale * x_zp) * st.w_sum
            bias = corr if bias is None else bias + corr
        x_zp = x_zp // 2 if st.mode == "static" else 0
    if st.kind == "conv2d":
        if xq.dim() != 4:
            raise ValueError(f"conv2d expects a 4-D input, got {tuple(xq.shape)}")
        if residual is None and st.ext is not None:  # static: the call the extension was built for
            return st.ext.run(xq)
        if residual is None:
            zp_after = out_zp != 0 and out_dtype != torch.float32  # see _zero_point_after_rounding
            y = onednn.op("qconv_pointwise")(
                xq, x_scale, x_zp, packed_for(st, xq), w_scale, st.w_zp, bias, st.stride, st.padding, st.dilation,
                st.groups, out_scale, 0 if zp_after else out_zp, torch.float32 if zp_after else out_dtype, post_op, [], "",
            )  # fmt: skip
            return _zero_point_after_rounding(y, out_zp, out_dtype) if zp_after else y
        return onednn.op("qconv2d_pointwise", "binary")(
            xq, x_scale, x_zp, packed_for(st, xq), st.w_scale, st.w_zp, residual, bias, st.stride, st.padding, st.dilation,
            st.groups, out_scale, out_zp, out_dtype, r_scale, r_zp, "sum", 1.0, post_op, [], "",
        )  # fmt: skip
    if not xq.is_contiguous():
        xq = xq.contiguous()
    lead = xq.shape[:-1]
    if xq.dim() != 2:  # the GEMM takes [M, K]: fold the leading dims (e.g. ConvNeXt's Linear on NHWC)
        xq = xq.reshape(-1, xq.shape[-1])
    if residual is None and st.ext is not None:  # static: the call the extension was built for
        y = st.ext.run(xq)
        return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])
    zp_after = out_zp != 0 and out_dtype != torch.float32
    y = onednn.op("qlinear_pointwise")(
        xq, x_scale, x_zp, packed_for(st, xq), w_scale, st.w_zp, bias, out_scale, 0 if zp_after else out_zp,
        torch.float32 if zp_after else out_dtype, post_op, [], "none",
    )  # fmt: skip
    if zp_after:
        y = _zero_point_after_rounding(y, out_zp, out_dtype)
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


def _zero_point_after_rounding(y: Tensor, out_zp: int, out_dtype: torch.dtype) -> Tensor:
    """Output codes ``round(y) + zp`` from torch's float32 output ``y`` (output steps, zero point 0).

    torch's int8 ops add a nonzero output zero point before rounding, in float32: ``y + zp`` near 100 has a
    2^-17 step, so values that close to a half-way point round the other way than the fake-quant model's
    ``round(y) + zp``.  qtoolkit's extension rounds first itself (an ``eltwise_round`` post-op); on torch's ops the
    layer writes float32 and rounds here (one more pass).
    """
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    return y.round_().add_(out_zp).clamp_(lo, hi).to(out_dtype)


def fast_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``Int8Layer`` forward on the int8 kernels (see the module docstring); falls back when needed."""
    st = _get_state(m)
    if st is None:
        st = _build_layer(m)
    if type(st) is str:
        return _fallback(m, st, x)
    if type(x) is not _QA and x.device.type != "cpu":  # carriers are made by the CPU kernels only
        return _fallback(m, f"input on {x.device.type}", x)
    if st.kind == "conv2d" and type(x) is not _QA and x.dim() != 4:  # carriers are 4-D (made by the kernels)
        return _fallback(m, "unbatched (3-D) input", x)
    try:
        y = _without_grad(m, _fast_forward, m, st, x)
        if type(x) is not _QA and x.dtype in HALF_DTYPES and type(y) is not _QA:
            y = y.to(x.dtype)  # float outputs in the input's dtype, as the reference path
        return y
    except RuntimeError as e:
        raise RuntimeError(f"{m.name}: the int8 kernel failed on an input of shape {tuple(x.shape)}: {e}") from e


def _fast_forward(m: nn.Module, st: _LayerState, x: Tensor) -> Tensor:
    if st.mode == "static":
        xq = _input_codes(st, x, st.x_scale, st.x_zp)
        if st.float_out:
            y = _run_layer(st, xq, st.x_scale, st.x_zp, out_dtype=torch.float32, post_op=st.post_op)
        else:
            y = _run_layer(st, xq, st.x_scale, st.x_zp, out_scale=st.out_scale, out_zp=st.k_out_zp,
                           out_dtype=st.out_dtype, post_op=st.post_op)  # fmt: skip
        return _finish(m, st, y)
    # dynamic: per-batch qparams exactly as the reference path computes them
    if type(x) is _QA:
        x = x.dequantize()
    if not x.is_floating_point():
        raise TypeError(f"{m.name}: expected a floating-point input, got {x.dtype}")
    lo, hi = x.detach().aminmax()
    s, z = compute_qparams(lo, hi, st.act_qmin, st.act_qmax, st.symmetric)
    sf, zf = float(s), int(z) + st.shift
    xq = onednn.quantize_u8(x, sf, zf, st.qmin, st.qmax)
    y = _run_layer(st, xq, sf, zf, out_dtype=torch.float32, post_op=st.post_op)
    if st.relu6:
        y = y.clamp_(max=6.0)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def fused_conv_add(conv: nn.Module, add: nn.Module, x: Tensor, other: Tensor, conv_is_lhs: bool) -> Tensor:
    """``add(conv(x), other)`` (or ``add(other, conv(x))``) as one oneDNN conv with a ``sum`` post-op.

    Used by the graphs :func:`qtoolkit.convert_passes.fuse_residual_adds` rewrites.  Runs the two modules one after the other
    (exactly the original graph) unless both are in ``"fast"`` execution, have no hooks, and the shapes match.
    """
    y = _fused_conv_add(conv, add, x, other, conv_is_lhs)
    if y is not None:
        return _out(add, y)
    y = conv(x)
    return add(y, other) if conv_is_lhs else add(other, y)


def _fused_conv_add(conv: nn.Module, add: nn.Module, x: Tensor, other: Tensor, conv_is_lhs: bool) -> Optional[Tensor]:
    if conv.execution == "fast" and add.execution == "fast" and not (conv._forward_hooks or conv._forward_pre_hooks
                                                                     or add._forward_hooks or add._forward_pre_hooks):  # fmt: skip
        st = _get_state(conv)
        if st is None:
            st = _build_layer(conv)
        ast = _get_state(add)
        if ast is None:
            ast = _build_add(add)
        if (type(st) is _LayerState and type(ast) is _AddState and st.mode == "static" and st.kind == "conv2d"
                and st.post_op == "none" and x.device.type == "cpu" and other.device.type == "cpu" and x.dim() == 4):  # fmt: skip
            with torch.no_grad():
                xq = _input_codes(st, x, st.x_scale, st.x_zp)
                oh, ow = onednn._conv_out_hw(xq.shape[2], xq.shape[3], st.packed.shape[2:], st.stride, st.padding, st.dilation)
                if tuple(other.shape) == (xq.shape[0], st.packed.shape[0], oh, ow):
                    r_scale, r_zp = (ast.rhs_scale, ast.rhs_zp) if conv_is_lhs else (ast.lhs_scale, ast.lhs_zp)
                    r = _operand_codes(ast, other, r_scale, r_zp)
                    acc, r_scale, r_zp, o_scale, o_zp, o_dtype = _accumulator(ast, r, r, r_scale, r_zp, _CL)
                    y = _run_layer(st, xq, st.x_scale, st.x_zp, acc, r_scale, r_zp, o_scale, o_zp, o_dtype, ast.post_op)
                    return _finish_add(add, ast, y)
    return None


def prepare_fast(model: nn.Module) -> dict[str, str]:
    """Prepack every fast-capable module now (and choose each layer's exact kernel strategy).

    Returns ``{layer name: "fast" | "fast (exact split: ...)" | reason for the reference fallback}``.

    Example::

        >>> prepare_fast(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    status: dict[str, str] = {}
    for m in model.modules():
        if callable(getattr(m, "kernel_params", None)) and getattr(m, "execution", None) == "fast":
            status[m.name] = _describe(_build(m))
    return status


SPLIT_NOTE = "exact split: input codes in two halves, 2x MACs; this CPU's int8 kernel saturates int16 (no VNNI)"


def _describe(st: Any) -> str:
    if isinstance(st, str):
        return st
    if isinstance(st, _LayerState) and st.strategy == "split":
        return f"fast ({SPLIT_NOTE})"
    return "fast"


def fast_status(model: nn.Module) -> dict[str, str]:
    """``{name: execution}`` of the converted modules: ``"fast"``, ``"fast (exact split: ...)"`` (see
    :func:`_split_codes`), ``"reference (<why the fast path is unavailable>)"``, or the execution set.

    Example::

        >>> fast_status(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    out: dict[str, str] = {}
    for m in model.modules():
        if callable(getattr(m, "kernel_params", None)):
            if m.execution != "fast":
                out[m.name] = m.execution
                continue
            st = _get_state(m)
            if st is None:
                st = _build(m)
            out[m.name] = _describe(st) if not isinstance(st, str) else f"reference ({st})"
    return out

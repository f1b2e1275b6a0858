"""oneDNN int8 Conv2d / Linear on plain ``torch.uint8`` / ``torch.int8`` tensors (CPU).

Thin functional wrappers around the ops that torch.compile/Inductor's x86 int8 lowering
emits (``torch.ops.onednn.*``, registered by libtorch itself — no deprecated quantization
module, no quantized-dtype tensors, no quantize-per-tensor/channel calls; only raw integer
tensors and float scales cross the boundary).

Conventions (same as :mod:`qtoolkit.numerics`, *zero point added*)::

    activations:  q_x = clamp(round(x / s_x) + z_x, 0, 255)       uint8, per-tensor (s_x, z_x)
    weights:      q_w = clamp(round(w / s_w[oc]), -127, 127)       int8, symmetric, per output channel, zp 0
    conv / linear: y = sum((q_x - z_x) * s_x * q_w * s_w[oc]) + bias[oc]        (fp32 bias)
    post-ops:      y = relu(y)  |  y = relu?(y + residual)          (ReLU applied *after* the add)
    output:        fp32 y, or q_y = clamp(round(y / s_o) + z_o, qmin, qmax) as uint8 / int8

Kernels / op schemas used (torch 2.x)::

    onednn::qconv_prepack(Tensor weight, Tensor w_scales, float x_scale, int x_zp, int[] stride,
                          int[] padding, int[] dilation, int groups, int[]? x_shape=None) -> Tensor
    onednn::qconv_pointwise(Tensor qx, float x_scale, int x_zero_point, Tensor qw, Tensor w_scale,
                            Tensor w_zero_point, Tensor? bias, int[] stride, int[] padding, int[] dilation,
                            int groups, float output_scale, int output_zero_point, ScalarType? output_dtype,
                            str attr, Scalar?[] scalars, str? algorithm) -> Tensor
    onednn::qconv2d_pointwise.binary(Tensor qx, float x_scale, int x_zero_point, Tensor qw, Tensor w_scale,
                            Tensor w_zero_point, Tensor(a!) qaccum, Tensor? bias, int[] stride, int[] padding,
                            int[] dilation, int groups, float output_scale, int output_zero_point,
                            ScalarType? output_dtype, float accum_scale, int accum_zero_point,
                            str binary_attr, Scalar? alpha, str? unary_attr, Scalar?[] unary_scalars,
                            str? unary_algorithm) -> Tensor
    onednn::qlinear_prepack(Tensor weight, int[]? x_shape) -> Tensor
    onednn::qlinear_pointwise(Tensor qx, float x_scale, int x_zero_point, Tensor qw, Tensor w_scale,
                            Tensor w_zero_point, Tensor? bias, float output_scale, int output_zero_point,
                            ScalarType? output_dtype, str post_op_name, Scalar?[] post_op_args,
                            str post_op_algorithm) -> Tensor
    onednn::qlinear_pointwise.binary(..., Tensor? other, Tensor? bias, float output_scale,
                            int output_zp, ScalarType? output_dtype, float other_scale, int other_zp,
                            str binary_post_op, float binary_alpha, str unary_post_op,
                            Scalar?[] unary_post_op_args, str unary_post_op_algorithm) -> Tensor

Behaviour measured on torch 2.14 (see ``tests/kernels/test_onednn.py``, ``scripts/bench_kernels.py``):

* Activations must be **uint8** (int8 input is rejected by the conv).  NCHW input is accepted but
  copied to channels_last inside the op; the output is **always channels_last** (NHWC strides), so a
  chain of :func:`qconv` calls with uint8 outputs never leaves channels_last and never goes through
  float.  Feed channels_last uint8 to avoid the copy.
* fp32 output requires ``output_scale == 1`` / ``zp == 0`` (handled here).
* The conv residual post-op is ``sum`` only (``add`` is rejected for conv): the accumulator must be
  channels_last-contiguous and has the *output* dtype; it is **written in place** (and, on torch 2.14, the op
  also returns a separate copy of the result).  uint8/int8 accumulators
  carry their own scale/zp (exact); an fp32 accumulator needs scale 1 / zp 0.  A uint8 accumulator with an
  fp32 output is silently wrong in oneDNN — this wrapper dequantizes the residual first instead.
  ``sum`` + ``relu`` (= add_relu) works, ReLU after the add.
* Linear supports ``sum`` (integer ``other`` of the output dtype, in place) and ``add`` (fp32 ``other``,
  not modified, any output dtype).  ``add`` with an integer ``other`` is wrong in oneDNN; not used here.
* Prepacked weights are **not** tied to an input shape (``x_shape``/``input_shape`` is only a hint) nor to
  the ``x_scale``/``x_zp`` given at prepack time: the runtime values are used.  Prepack costs ~0.5–3 ms
  per layer (weight reorder); the first call for a new input shape also creates a oneDNN primitive
  (~1x a steady-state call), which oneDNN then caches.
* Speed (AVX2, 2 threads, N=64 ResNet convs): ~1.4–2x faster than fp32 channels_last conv, 2–3x
  faster than fp32 NCHW; on par with ``torch.ops.quantized.conv2d``.  No gain for the 3-channel stem,
  and int8 *depthwise* is slower than fp32 channels_last here.  ``qlinear`` has ~50–60 µs fixed
  overhead: ~1.8x faster than fp32 for large GEMMs, slower for tiny heads (e.g. 64x512 -> 10).
  (``torch._int_mm`` / ``torch._weight_int8pack_mm`` are reference-speed loops on AVX2: 50–400x slower.)
* No Python warnings are raised; the ops create no quantized-dtype tensors.

**int16 saturation on CPUs without VNNI** (AVX2 / AVX-512 without VNNI, e.g. AMD Zen 2/3): oneDNN's
u8×s8 kernels (dense and grouped conv, linear) use ``vpmaddubsw``, which adds *pairs* of u8·s8 products in
int16 with saturation.  Results are exact only if ``2 * max(q_x) * max|q_w| <= 32767`` — e.g. 7-bit
activations (``qmax = 127``, "reduce_range") with 8-bit weights, or 8-bit activations with
``|q_w| <= 64``.  Depthwise conv is unaffected.  :func:`saturates_u8s8` probes this once;
:func:`safe_activation_qmax` gives the largest safe activation code; :mod:`qtoolkit.kernels.dispatch` runs
the exact split kernel where a layer could saturate.  The same limitation applies to
fbgemm / ``torch.ops.quantized`` on such CPUs (why torch.ao uses ``reduce_range=True`` on x86).

Example::

    >>> import torch
    >>> from qtoolkit.kernels import onednn
    >>> if onednn.is_available():
    ...     x = torch.randint(0, 128, (1, 8, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    ...     w = torch.randint(-127, 128, (4, 8, 3, 3), dtype=torch.int8)
    ...     sw = torch.full((4,), 0.01)
    ...     pw = onednn.prepack_conv_weight(w, sw, 0.05, 64, 1, 1, 1, 1)
    ...     y = onednn.qconv(x, 0.05, 64, pw, sw, None, None, 1, 1, 1, 1, 0.1, 0, torch.uint8, "relu")
    ...     (y.dtype, y.shape, y.is_contiguous(memory_format=torch.channels_last))
    ... else:
    ...     (torch.uint8, torch.Size([1, 4, 6, 6]), True)
    (torch.uint8, torch.Size([1, 4, 6, 6]), True)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "is_available",
    "saturates_u8s8",
    "KERNEL_CLASSES",
    "safe_activation_qmax",
    "prepack_conv_weight",
    "qconv",
    "prepack_linear_weight",
    "qlinear",
    "quantize_u8",
    "to_u8",
    "op",
    "linear_sum_in_place",
]

IntOrPair = Union[int, Sequence[int]]
PostOp = Literal["none", "relu"]

_INT_OUT = (torch.uint8, torch.int8)
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_CL = torch.channels_last


def _pair(v: IntOrPair) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v}")
    return v


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> Tensor:
    # Weight zero points (always 0, symmetric weights); cached, never mutated by the ops.
    return torch.zeros(n, dtype=torch.long)


def _f32(t: Tensor) -> Tensor:
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(torch.float32).contiguous()
    return t


def _bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else _f32(bias)


def _w_zp(w_zp: Optional[Tensor], n: int) -> Tensor:
    return _zeros(n) if w_zp is None else w_zp


def _check_post_op(post_op: str) -> str:
    if post_op not in ("none", "relu"):
        raise ValueError(f"post_op must be 'none' or 'relu', got {post_op!r}")
    return post_op


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in (torch.float32, torch.uint8, torch.int8):
        raise ValueError(f"out_dtype must be torch.float32, torch.uint8 or torch.int8, got {out_dtype}")


def quantize_u8(
    x: Tensor,
    scale: float,
    zero_point: int,
    qmin: int = 0,
    qmax: int = 255,
    memory_format: torch.memory_format = torch.preserve_format,
) -> Tensor:
    """Quantize a float tensor to plain uint8 codes: ``clamp(round(x * (1/scale)) + zero_point, qmin, qmax)``.

    Bit-identical to :func:`qtoolkit.numerics.quantize` (round half to even, ``x / s`` evaluated as
    ``x * (1/s)`` in float32) but with one float temporary and in-place ops (~2x faster than the
    out-of-place ``torch.clamp(torch.round(x / s) + z, ...)`` chain).  The memory format of ``x`` is kept
    unless ``memory_format`` says otherwise (``torch.channels_last`` gives codes ready for :func:`qconv`
    in the same pass).
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_u8 expects a floating-point tensor, got {x.dtype}")
    if not 0 <= qmin < qmax <= 255:
        raise ValueError(f"uint8 code range must satisfy 0 <= qmin < qmax <= 255, got [{qmin}, {qmax}]")
    t = torch.empty_like(x, dtype=torch.float32, memory_format=memory_format)
    torch.mul(x if x.dtype == torch.float32 else x.float(), 1.0 / float(scale), out=t)
    t.round_().add_(float(zero_point)).clamp_(qmin, qmax)
    return to_u8(t) if t.numel() >= _TO_U8_MIN_NUMEL else t.to(torch.uint8)


# below this size the direct (one op) float -> uint8 conversion beats the vectorized two-step one
_TO_U8_MIN_NUMEL = 65536


def to_u8(t: Tensor) -> Tensor:
    """Integer-valued float tensor in [0, 255] -> uint8, keeping the memory format.

    Goes through int16: torch's direct float->uint8 conversion is not vectorized on CPU (3x slower for
    64x3x32x32 with 2 threads, torch 2.14; ``scripts/bench_op_overhead.py``).
    """
    return t.to(torch.int16).to(torch.uint8)


@functools.cache
def op(name: str, overload: str = "default") -> Any:
    """The ``torch.ops.onednn.<name>.<overload>`` operator, looked up once.

    Calling an overload directly skips the overload resolution of ``torch.ops.onednn.<name>(...)``
    (small: ``scripts/bench_op_overhead.py`` measures both).
    """
    return getattr(getattr(torch.ops.onednn, name), overload)


# --------------------------------------------------------------------------------------------
# availability / capability probes
# --------------------------------------------------------------------------------------------


def _ops_present() -> bool:
    try:
        ops = torch.ops.onednn
        for name in ("qconv_prepack", "qconv_pointwise", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise"):
            getattr(ops, name)
        ops.qconv2d_pointwise.binary  # noqa: B018
        ops.qlinear_pointwise.binary  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available())


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True if the oneDNN int8 ops exist in this torch build *and* give correct results on this CPU.

    Runs a tiny conv (plain, relu + uint8 output, sum residual) and linear once against a float64
    reference with saturation-safe operands; the result is cached.
    """
    if not _ops_present():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 64, (1, 4, 5, 5), dtype=torch.uint8, generator=g).contiguous(memory_format=_CL)
        w = torch.randint(-64, 65, (3, 4, 3, 3), dtype=torch.int8, generator=g)
        sw = torch.tensor([0.01, 0.02, 0.03])
        b = torch.tensor([0.5, -0.25, 0.0])
        pw = prepack_conv_weight(w, sw, 0.1, 10, 1, 1, 1, 1)
        ref = torch.nn.functional.conv2d((x.double() - 10) * 0.1, w.double() * sw.double()[:, None, None, None], b.double(), 1, 1)
        y = qconv(x, 0.1, 10, pw, sw, None, b, 1, 1, 1, 1)
        if not torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4):
            return False
        yq = qconv(x, 0.1, 10, pw, sw, None, b, 1, 1, 1, 1, 0.05, 3, torch.uint8, "relu")
        refq = torch.clamp(torch.round(ref.relu() / 0.05) + 3, 0, 255)
        if (yq.double() - refq).abs().max() > 1:
            return False
        r = torch.randint(0, 255, (1, 3, 5, 5), dtype=torch.uint8, generator=g)
        ys = qconv(x, 0.1, 10, pw, sw, None, b, 1, 1, 1, 1, 0.05, 3, torch.uint8, "relu", r, 0.02, 7)
        refs = torch.clamp(torch.round((ref + (r.double() - 7) * 0.02).relu() / 0.05) + 3, 0, 255)
        if (ys.double() - refs).abs().max() > 1:
            return False
        xl = torch.randint(0, 64, (3, 8), dtype=torch.uint8, generator=g)
        wl = torch.randint(-64, 65, (5, 8), dtype=torch.int8, generator=g)
        swl = torch.full((5,), 0.01)
        yl = qlinear(xl, 0.1, 10, prepack_linear_weight(wl), swl)
        refl = ((xl.double() - 10) * 0.1) @ (wl.double() * 0.01).t()
        return bool(torch.allclose(yl.double(), refl, rtol=1e-4, atol=1e-4))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


@functools.lru_cache(maxsize=1)
def linear_sum_in_place() -> bool:
    """True if ``qlinear_pointwise.binary`` with a uint8 ``sum`` accumulator is exact here.

    The fast residual add relies on it (see :mod:`qtoolkit.kernels.dispatch`); probed once on a
    small identity GEMM against a float64 reference, any failure means "use the float add".
    """
    if not is_available():
        return False
    try:
        g = torch.Generator().manual_seed(1)
        a = torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g)
        b = torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g)
        acc = b.clone()
        w = prepack_linear_weight(torch.eye(16, dtype=torch.int8))
        y = op("qlinear_pointwise", "binary")(
            a, 0.05, 3, w, torch.ones(16), _zeros(16), acc, None, 0.07, 5, torch.uint8, 0.04, 7, "sum", 1.0, "none", [], ""
        )
        ref = torch.clamp(torch.round(((a.double() - 3) * 0.05 + (b.double() - 7) * 0.04) / 0.07) + 5, 0, 255)
        return y.dtype == torch.uint8 and tuple(y.shape) == (8, 16) and bool((y.double() - ref).abs().max() <= 1)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


KERNEL_CLASSES = ("conv", "grouped", "depthwise", "linear")


@functools.lru_cache(maxsize=8)
def saturates_u8s8(kind: str = "conv") -> bool:
    """True if this CPU's oneDNN u8×s8 ``kind`` kernel saturates in int16 (no VNNI; see module docstring).

    ``kind`` is one of :data:`KERNEL_CLASSES`: ``"conv"`` (dense), ``"grouped"`` (``groups > 1``, several
    input channels per group), ``"depthwise"`` (one input channel per group) or ``"linear"`` — oneDNN
    picks a different kernel for each, and they differ in whether they sum pairs of products in int16.
    Probed once per kind (cached, so after ``ONEDNN_MAX_CPU_ISA`` took effect) with operands at the
    extremes (every input code 255, every weight 127), whose exact int32 result is known; never decided
    by the CPU's name or flags.  Returns False if the ops are unavailable.

    Example::

        >>> isinstance(saturates_u8s8("linear"), bool)
        True
    """
    if kind not in KERNEL_CLASSES:
        raise ValueError(f"saturates_u8s8: kind must be one of {KERNEL_CLASSES}, got {kind!r}")
    if not _ops_present():
        return False
    try:
        if kind == "linear":
            x = torch.full((4, 64), 255, dtype=torch.uint8)
            pw = torch.ops.onednn.qlinear_prepack(torch.full((8, 64), 127, dtype=torch.int8), None)
            y = op("qlinear_pointwise")(x, 1.0, 0, pw, torch.ones(8), _zeros(8), None, 1.0, 0, torch.float32, "none", [], "none")
            return bool((y != 64 * 255 * 127).any())
        groups, cin, cout = {"conv": (1, 32, 16), "grouped": (4, 64, 16), "depthwise": (32, 32, 32)}[kind]
        x = torch.full((1, cin, 3, 3), 255, dtype=torch.uint8).contiguous(memory_format=_CL)
        w = torch.full((cout, cin // groups, 1, 1), 127, dtype=torch.int8)
        s = torch.ones(cout)
        pw = torch.ops.onednn.qconv_prepack(w, s, 1.0, 0, [1, 1], [0, 0], [1, 1], groups, None)
        y = op("qconv_pointwise")(
            x, 1.0, 0, pw, s, _zeros(cout), None, [1, 1], [0, 0], [1, 1], groups, 1.0, 0, torch.float32, "none", [], ""
        )
        return bool((y != (cin // groups) * 255 * 127).any())
    except Exception:  # noqa: BLE001
        return False


def safe_activation_qmax(weight_absmax: int = 127) -> int:
    """Largest uint8 activation code ``qmax`` for which u8×s8 results are exact on this CPU.

    255 where :func:`saturates_u8s8` is False; otherwise ``min(255, 32767 // (2 * weight_absmax))``
    (129 for ±127 weights, 255 for ``|q_w| <= 64``).  Note that it is the *raw uint8 code* that counts,
    not ``q - z``: with a zero point, the activation grid must be ``[0, qmax]``.
    """
    if weight_absmax <= 0:
        return 255
    if not saturates_u8s8():
        return 255
    return min(255, 32767 // (2 * int(weight_absmax)))


# --------------------------------------------------------------------------------------------
# conv
# --------------------------------------------------------------------------------------------


def prepack_conv_weight(
    w_int8: Tensor,
    w_scale: Tensor,
    x_scale: float,
    x_zp: int,
    stride: IntOrPair,
    padding: IntOrPair,
    dilation: IntOrPair,
    groups: int,
    input_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """Reorder an int8 conv weight into oneDNN's blocked layout (``onednn::qconv_prepack``).

    Args:
        w_int8: ``[OC, IC/groups, kH, kW]`` ``torch.int8``, symmetric (zero point 0) codes.
        w_scale: ``[OC]`` (or ``[1]``) float scales.
        x_scale, x_zp: expected activation qparams (a hint only; :func:`qconv` uses its own).
        stride, padding, dilation, groups: the conv geometry (must match the :func:`qconv` call).
        input_shape: optional ``[N, C, H, W]`` hint; the packed weight still works for any input shape.

    Returns:
        An opaque MKLDNN tensor (``.shape`` reports ``[OC, IC/groups, kH, kW]``) to pass to :func:`qconv`.
        It is independent of batch size / spatial size.  Costs ~0.5–3 ms; do it once per layer.
    """
    if w_int8.dtype != torch.int8 or w_int8.dim() != 4:
        raise TypeError(f"conv weight must be a 4-D torch.int8 tensor, got {w_int8.dtype} {tuple(w_int8.shape)}")
    if w_scale.numel() not in (1, w_int8.shape[0]):
        raise ValueError(f"w_scale must have 1 or {w_int8.shape[0]} elements, got {w_scale.numel()}")
    return torch.ops.onednn.qconv_prepack(
        w_int8.contiguous(),
        _f32(w_scale.reshape(-1)),
        float(x_scale),
        int(x_zp),
        _pair(stride),
        _pair(padding),
        _pair(dilation),
        int(groups),
        None if input_shape is None else [int(i) for i in input_shape],
    )


def _conv_out_hw(h: int, w: int, k: Sequence[int], stride: list[int], padding: list[int], dilation: list[int]) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def _requantize(y: Tensor, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
    lo, hi = _QRANGE[dtype]
    y.mul_(1.0 / float(scale)).round_().add_(float(zp)).clamp_(lo, hi)
    return to_u8(y) if dtype == torch.uint8 else y.to(dtype)


def qconv(
    x_u8: Tensor,
    x_scale: float,
    x_zp: int,
    packed_w: Tensor,
    w_scale: Tensor,
    w_zp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    out_scale: float = 1.0,
    out_zp: int = 0,
    out_dtype: torch.dtype = torch.float32,
    post_op: PostOp = "none",
    residual: Optional[Tensor] = None,
    residual_scale: float = 1.0,
    residual_zp: int = 0,
    residual_inplace: bool = False,
) -> Tensor:
    """int8 Conv2d: ``y = post_op(conv((x_u8 - x_zp) * x_scale, w * w_scale) + bias [+ residual])``.

    Args:
        x_u8: ``[N, C, H, W]`` ``torch.uint8`` activation codes (``q = clamp(round(x/s) + z, 0, 255)``).
            channels_last avoids an internal copy.  See :func:`safe_activation_qmax` for the code range
            that is exact on CPUs without VNNI.
        x_scale, x_zp: per-tensor activation qparams.
        packed_w: from :func:`prepack_conv_weight` (same stride/padding/dilation/groups).
        w_scale: ``[OC]`` float weight scales (the ones given to prepack).
        w_zp: ``[OC]`` weight zero points, None = zeros (symmetric weights).
        bias: ``[OC]`` float bias (fp32, added before the residual / ReLU) or None.
        stride, padding, dilation, groups: conv geometry.
        out_scale, out_zp: output qparams, used only for integer ``out_dtype``.
        out_dtype: ``torch.float32`` (real values) or ``torch.uint8`` / ``torch.int8`` codes
            ``clamp(round(y / out_scale) + out_zp, qmin, qmax)``.
        post_op: ``"none"`` or ``"relu"``; with a residual ReLU is applied after the add (add_relu).
        residual: optional ``[N, OC, OH, OW]`` tensor added to the conv output (oneDNN ``sum`` post-op).
            Integer residuals are codes with ``residual_scale`` / ``residual_zp``; float residuals are real
            values (scale/zp ignored).  Fast path: residual dtype == ``out_dtype``.
        residual_inplace: allow the kernel to overwrite ``residual`` (saves one copy) when it already is a
            channels_last-contiguous tensor of the output dtype.  Otherwise it is left untouched.

    Returns:
        ``[N, OC, OH, OW]`` tensor of ``out_dtype`` in channels_last memory format.
    """
    _check_out_dtype(out_dtype)
    _check_post_op(post_op)
    if x_u8.dtype != torch.uint8 or x_u8.dim() != 4:
        raise TypeError(f"qconv expects a 4-D torch.uint8 activation, got {x_u8.dtype} {tuple(x_u8.shape)}")
    if not x_u8.is_contiguous(memory_format=_CL):
        x_u8 = x_u8.contiguous(memory_format=_CL)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    oc = packed_w.shape[0]
    w_scale = _f32(w_scale.reshape(-1))
    w_zp = _w_zp(w_zp, w_scale.numel())
    bias = _bias(bias)
    is_int_out = out_dtype in _INT_OUT
    o_scale, o_zp = (float(out_scale), int(out_zp)) if is_int_out else (1.0, 0)

    if residual is None:
        return op("qconv_pointwise")(
            x_u8, float(x_scale), int(x_zp), packed_w, w_scale, w_zp, bias,
            stride, padding, dilation, int(groups), o_scale, o_zp, out_dtype, post_op, [], "",
        )  # fmt: skip

    oh, ow = _conv_out_hw(x_u8.shape[2], x_u8.shape[3], packed_w.shape[2:], stride, padding, dilation)
    expected = (x_u8.shape[0], oc, oh, ow)
    if tuple(residual.shape) != expected:
        raise ValueError(f"residual shape {tuple(residual.shape)} != conv output shape {expected}")

    if is_int_out and residual.dtype == out_dtype:
        # u8/s8 accumulator with its own scale/zp: exact, written in place by oneDNN.
        acc, a_scale, a_zp = residual, float(residual_scale), int(residual_zp)
    elif not is_int_out:
        # fp32 output needs an fp32 accumulator with scale 1 / zp 0 (a u8 accumulator is silently wrong).
        if residual.is_floating_point():
            acc = residual if residual.dtype == torch.float32 else residual.to(torch.float32)
        else:
            acc = (residual.to(torch.float32) - float(residual_zp)) * float(residual_scale)
        a_scale, a_zp = 1.0, 0
    else:
        # integer output with a float (or other-integer) residual: fp32 conv + sum, requantize here.
        y = qconv(x_u8, x_scale, x_zp, packed_w, w_scale, w_zp, bias, stride, padding, dilation, groups,
                  1.0, 0, torch.float32, post_op, residual, residual_scale, residual_zp, False)  # fmt: skip
        return _requantize(y, out_scale, out_zp, out_dtype)

    if acc is residual:
        if residual_inplace and acc.is_contiguous(memory_format=_CL):
            pass
        else:
            acc = acc.clone(memory_format=_CL)
    elif not acc.is_contiguous(memory_format=_CL):
        acc = acc.contiguous(memory_format=_CL)
    return op("qconv2d_pointwise", "binary")(
        x_u8, float(x_scale), int(x_zp), packed_w, w_scale, w_zp, acc, bias,
        stride, padding, dilation, int(groups), o_scale, o_zp, out_dtype,
        a_scale, a_zp, "sum", 1.0, post_op, [], "",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------


def prepack_linear_weight(w_int8: Tensor, input_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Reorder an int8 ``[OUT, IN]`` linear weight for oneDNN (``onednn::qlinear_prepack``).

    Args:
        w_int8: ``[OUT, IN]`` ``torch.int8`` symmetric codes (scales are passed to :func:`qlinear`).
        input_shape: optional ``[M, IN]`` hint; the packed weight works for any batch size.

    Returns:
        An opaque MKLDNN tensor (``.shape`` reports ``[IN, OUT]``) to pass to :func:`qlinear`.
    """
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"linear weight must be a 2-D torch.int8 tensor, got {w_int8.dtype} {tuple(w_int8.shape)}")
    return torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None if input_shape is None else [int(i) for i in input_shape])


def qlinear(
    x_u8: Tensor,
    x_scale: float,
    x_zp: int,
    packed_w: Tensor,
    w_scale: Tensor,
    w_zp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    out_scale: float = 1.0,
    out_zp: int = 0,
    out_dtype: torch.dtype = torch.float32,
    post_op: PostOp = "none",
    residual: Optional[Tensor] = None,
    residual_scale: float = 1.0,
    residual_zp: int = 0,
    residual_inplace: bool = False,
) -> Tensor:
    """int8 Linear: ``y = post_op((x_u8 - x_zp) * x_scale @ (w * w_scale).T + bias [+ residual])``.

    Args:
        x_u8: ``[M, IN]`` ``torch.uint8`` activation codes (leading batch dims are also accepted).
        x_scale, x_zp: per-tensor activation qparams.
        packed_w: from :func:`prepack_linear_weight`.
        w_scale: ``[OUT]`` (or ``[1]``) float weight scales.
        w_zp: weight zero points, None = zeros.
        bias: ``[OUT]`` float bias or None.
        out_scale, out_zp, out_dtype: as in :func:`qconv` (fp32, uint8 or int8 output).
        post_op: ``"none"`` or ``"relu"`` (after the residual add).
        residual: optional ``[M, OUT]`` tensor to add.  Integer residual of the output dtype → oneDNN
            ``sum`` (copied unless ``residual_inplace``); float residual → ``add`` (never modified);
            other integer residuals are dequantized to fp32 first.

    Returns:
        ``[M, OUT]`` tensor of ``out_dtype``.
    """
    _check_out_dtype(out_dtype)
    _check_post_op(post_op)
    if x_u8.dtype != torch.uint8 or x_u8.dim() < 2:
        raise TypeError(f"qlinear expects a >=2-D torch.uint8 activation, got {x_u8.dtype} {tuple(x_u8.shape)}")
    if not x_u8.is_contiguous():
        x_u8 = x_u8.contiguous()
    w_scale = _f32(w_scale.reshape(-1))
    w_zp = _w_zp(w_zp, w_scale.numel())
    bias = _bias(bias)
    is_int_out = out_dtype in _INT_OUT
    o_scale, o_zp = (float(out_scale), int(out_zp)) if is_int_out else (1.0, 0)

    if residual is None:
        return op("qlinear_pointwise")(
            x_u8, float(x_scale), int(x_zp), packed_w, w_scale, w_zp, bias, o_scale, o_zp, out_dtype, post_op, [], "none"
        )
    expected = (*x_u8.shape[:-1], packed_w.shape[1])
    if tuple(residual.shape) != expected:
        raise ValueError(f"residual shape {tuple(residual.shape)} != linear output shape {expected}")
    if is_int_out and residual.dtype == out_dtype:
        other = (
            residual if (residual_inplace and residual.is_contiguous()) else residual.clone(memory_format=torch.contiguous_format)
        )
        binary, r_scale, r_zp = "sum", float(residual_scale), int(residual_zp)
    else:
        if residual.is_floating_point():
            other = residual.to(torch.float32).contiguous()
        else:
            other = (residual.to(torch.float32) - float(residual_zp)) * float(residual_scale)
        binary, r_scale, r_zp = "add", 1.0, 0
    return op("qlinear_pointwise", "binary")(
        x_u8, float(x_scale), int(x_zp), packed_w, w_scale, w_zp, other, bias,
        o_scale, o_zp, out_dtype, r_scale, r_zp, binary, 1.0, post_op, [], "",
    )  # fmt: skip

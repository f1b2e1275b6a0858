"""Quantization numerics: qparams, quantize / dequantize / fake-quantize, STE and LSQ
autograd, and fixed-point requantization for integer-only inference.

Convention (torch's and ONNX ``QuantizeLinear``'s, *zero point added*)::

    q  = clamp(round_half_even(x / s) + z, qmin, qmax)
    x̂  = (q - z) * s

Some texts (Jacob et al. 2018) write ``r = S (q - Z)`` — the same thing — or
``q = round(r/S) - Z`` with ``Z`` negated; everything in qtoolkit uses the form above.
``x / s`` is evaluated as ``x * (1 / s)`` in float32, exactly as torch's own
fake-quantize kernels do, so results are bit-identical to them.

Example::

    >>> import torch
    >>> from qtoolkit.numerics import compute_qparams, fake_quantize
    >>> x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    >>> s, z = compute_qparams(x.min(), x.max(), qmin=0, qmax=255, symmetric=False)
    >>> xq = fake_quantize(x, s, z, 0, 255)
    >>> bool(xq[1] == 0)   # real zero is exact
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SCALE_EPS",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_trusted",
    "fake_quantize_lsq",
    "lsq_grad_scale",
    "integer_dtype_for",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "requantize",
]

#: Smallest scale ever produced; degenerate ranges (constant / all-zero tensors)
#: get this instead of 0, NaN or inf. Same value as torch.ao's observers.
SCALE_EPS: float = float(torch.finfo(torch.float32).eps)

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def _check_codes(qmin: int, qmax: int) -> None:
    if qmin >= qmax:
        raise ValueError(f"qmin ({qmin}) must be < qmax ({qmax})")


def _broadcast_shape(x: Tensor, axis: int | None, name: str = "axis") -> list[int] | None:
    """Shape that broadcasts a per-channel vector along ``axis`` of ``x``."""
    if axis is None:
        return None
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"{name}={axis} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(valid: {-x.dim()}..{x.dim() - 1}); use axis=None for per-tensor"
        )
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return shape


def _params_for(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """Scale / zero point shaped to broadcast against ``x``."""
    scale = torch.as_tensor(scale, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device)
    shape = _broadcast_shape(x, axis)
    if shape is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                f"per-tensor quantization needs one scale and zero point, got {scale.numel()} and "
                f"{zero_point.numel()}; pass axis= for per-channel"
            )
        return scale.reshape(()), zero_point.reshape(())
    c = x.shape[axis]  # type: ignore[index]
    if scale.numel() != c or zero_point.numel() != c:
        raise ValueError(
            f"per-channel quantization along axis {axis} needs {c} scales/zero points, "
            f"got {scale.numel()} and {zero_point.numel()}"
        )
    return scale.reshape(shape), zero_point.reshape(shape)


def compute_qparams(
    min_val: Tensor | float,
    max_val: Tensor | float,
    qmin: int,
    qmax: int,
    symmetric: bool,
    eps: float = SCALE_EPS,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for a range ``[min_val, max_val]``.

    Works element-wise, so per-channel ranges (vectors) give per-channel qparams.

    * The range is first widened to include 0, so real 0 maps to an exact code.
    * Asymmetric: ``s = (β − α) / (qmax − qmin)``, ``z = clamp(qmin − round(α / s))``.
    * Symmetric: ``s = max(|α|, |β|) / ((qmax − qmin) / 2)`` with ``z`` = the middle
      code (0 for a signed grid). For a narrow-range signed grid this is the
      ``max|x| / qmax`` of the design contract (int8: ``/127``).
    * Degenerate ranges give ``s = eps`` (never 0, NaN or inf).

    Example::

        >>> s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), -127, 127, True)
        >>> abs(float(s) - 1 / 127) < 1e-9, int(z)
        (True, 0)
    """
    _check_codes(qmin, qmax)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("compute_qparams: min_val/max_val must be finite (got NaN or Inf)")
    if (min_val > max_val).any():
        raise ValueError("compute_qparams: min_val must be <= max_val")
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2.0)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        scale = torch.clamp(scale, min=eps)
        zp = qmin - torch.round(lo / scale)
        zero_point = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


#: Inputs of these dtypes are computed in float32 by quantized modules and returned in their own dtype
#: (8-bit grids need float32's precision: bfloat16 cannot even hold every code of a 256-step grid);
#: see the README, "Input dtypes".
HALF_DTYPES = (torch.float16, torch.bfloat16)


def integer_dtype_for(qmin: int, qmax: int) -> torch.dtype:
    """Smallest plain torch integer dtype that holds ``[qmin, qmax]``."""
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -(2**15) and qmax <= 2**15 - 1:
        return torch.int16
    return torch.int32


def _round_codes(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``round_half_even(x * (1/s)) + z`` in float32 (not clamped)."""
    inv_scale = 1.0 / scale.float()
    return torch.round(x.float() * inv_scale) + zero_point.float()


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Map a float tensor to integer codes (plain ``torch.int8``/``uint8``/… tensor).

    Example::

        >>> quantize(torch.tensor([0.5, -3.0]), 0.1, 0, -128, 127)
        tensor([  5, -30], dtype=torch.int8)
    """
    _check_codes(qmin, qmax)
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    s, z = _params_for(x, torch.as_tensor(scale), torch.as_tensor(zero_point), axis)
    q = torch.clamp(_round_codes(x, s, z), qmin, qmax)
    return q.to(dtype or integer_dtype_for(qmin, qmax))


def dequantize(
    q: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    axis: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(q - z) * s`` as a float tensor.

    Example::

        >>> dequantize(torch.tensor([5, -30], dtype=torch.int8), 0.1, 0)
        tensor([ 0.5000, -3.0000])
    """
    s, z = _params_for(q, torch.as_tensor(scale), torch.as_tensor(zero_point), axis)
    return ((q.float() - z.float()) * s.float()).to(dtype)


def _check_float_input(x: Tensor, who: str) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{who} expects a floating-point tensor (float32/bfloat16/float16), got {x.dtype}; "
            "integer tensors are already quantized"
        )


def _fq_codes_forward(
    x: Tensor, s: Tensor, zf: Tensor | None, qmin: int, qmax: int, want_mask: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Shared forward of the STE and LSQ functions: ``(x̂, outside)``.

    ``x̂ = (clamp(round_half_even(x · (1/s)) + z, qmin, qmax) − z) · s`` in float32 with two
    full-size temporaries, in place where possible; ``outside`` (bool) marks the elements whose
    unclamped code left ``[qmin, qmax]`` (``clamp(c) != c``; also true for NaN). ``zf=None`` means a
    zero point known to be 0 (two passes fewer); ``want_mask=False`` (no gradient to carry) clamps in place
    and returns no mask.
    """
    codes = torch.mul(x.float(), 1.0 / s)
    codes.round_()
    if zf is not None:
        codes.add_(zf)
    if want_mask:
        out = torch.clamp(codes, qmin, qmax)
        outside: Tensor | None = out != codes
        del codes
    else:
        out, outside = codes.clamp_(qmin, qmax), None
    if zf is not None:
        out.sub_(zf)
    out.mul_(s)
    return out, outside


def _zf_or_none(zero_point: Tensor) -> Tensor | None:
    """The zero point as float32, or ``None`` when it is all zeros (checked on the host only for CPU
    tensors, where that costs no synchronization)."""
    if zero_point.device.type == "cpu" and not bool(zero_point.any()):
        return None
    return zero_point.float()


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with the straight-through estimator.

    Forward: ``x̂ = (clamp(round(x/s)+z) − z)·s``. Backward: ``∂x̂/∂x = 1`` where
    ``round(x/s)+z`` lies in ``[qmin, qmax]``, 0 outside (clipped): one ``masked_fill`` pass
    over the saved 1-byte mask.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:  # type: ignore[override]
        out, outside = _fq_codes_forward(x, scale.float(), _zf_or_none(zero_point), qmin, qmax)
        ctx.save_for_backward(outside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0), None, None, None, None


def _fake_quantize_impl(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """Dispatch of :func:`fake_quantize` after the checks (``s``/``z`` already broadcastable)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        # no gradient to carry: the forward's arithmetic without keeping the mask
        return _fq_codes_forward(x, s.detach().float(), _zf_or_none(z.detach()), qmin, qmax, want_mask=False)[0].to(x.dtype)
    return _FakeQuantSTE.apply(x, s.detach(), z.detach(), qmin, qmax)


def fake_quantize_trusted(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """:func:`fake_quantize` without the argument checks, for quantizer modules whose qparams come
    from :func:`compute_qparams` (zero points inside ``[qmin, qmax]``, one value per channel).

    Example::

        >>> fake_quantize_trusted(torch.tensor([0.04, 0.26]), torch.tensor(0.1), torch.tensor(0), -8, 7)
        tensor([0.0000, 0.3000])
    """
    shape = None if axis is None else [-1 if d == axis % x.dim() else 1 for d in range(x.dim())]
    s = scale.reshape(()) if shape is None else scale.reshape(shape)
    z = zero_point.reshape(()) if shape is None else zero_point.reshape(shape)
    return _fake_quantize_impl(x, s, z, qmin, qmax, axis)


def fake_quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """Quantize-dequantize ``x`` (Q/DQ) with a straight-through-estimator gradient.

    Bit-identical to torch's own per-tensor / per-channel fake-quantize reference ops
    (the oracles in ``tests/test_numerics.py``, beside float64 references) for the same
    qparams. Computes in float32 and returns ``x``'s dtype (float32, bfloat16 or float16).
    The same arithmetic on every device: five full-size passes forward (two more with a
    non-zero zero point), one backward. A NaN input gives NaN.

    Example::

        >>> x = torch.tensor([0.04, 0.26], requires_grad=True)
        >>> fake_quantize(x, 0.1, 0, -128, 127)
        tensor([0.0000, 0.3000], grad_fn=<_FakeQuantSTEBackward>)
    """
    _check_float_input(x, "fake_quantize")
    _check_codes(qmin, qmax)
    s, z = _params_for(x, torch.as_tensor(scale), torch.as_tensor(zero_point), axis)
    if x.device.type != "cpu" and not bool(((z >= qmin) & (z <= qmax)).all()):
        raise ValueError(f"fake_quantize: zero points must lie in [qmin, qmax] = [{qmin}, {qmax}] on {x.device}")
    return _fake_quantize_impl(x, s, z, qmin, qmax, axis)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N · qmax)`` (Esser et al. 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


class _FakeQuantLSQ(torch.autograd.Function):
    """LSQ fake quantization: STE for ``x``, learned step size ``s``.

    ``∂x̂/∂s`` is ``round(x/s) − x/s`` inside the range, ``qmin − z`` below and
    ``qmax − z`` above, scaled by ``grad_factor`` and summed to ``s``'s shape.
    All three cases are ``(x̂ − x·inside) / s``, so the backward is one masked pass for
    ``∂/∂x`` and two read-only reductions: ``Σ g·(x̂ − x·inside) = Σ g·x̂ − Σ g_x·x``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, reduce_dims):  # type: ignore[override]
        s = scale.float()
        out, outside = _fq_codes_forward(x, s, _zf_or_none(zero_point), qmin, qmax)
        ctx.save_for_backward(x, out, outside, s)
        ctx.grad_factor, ctx.reduce_dims = grad_factor, reduce_dims
        ctx.scale_shape = scale.shape
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, out, outside, s = ctx.saved_tensors
        grad_x = grad.masked_fill(outside, 0)
        g, xf = grad.float(), x.float()
        if ctx.reduce_dims is None:
            ds = (torch.dot(g.reshape(-1), out.reshape(-1)) - torch.dot(grad_x.float().reshape(-1), xf.reshape(-1))) / s
        else:
            ds = ((g * out).sum(dim=ctx.reduce_dims, keepdim=True)
                  - (grad_x.float() * xf).sum(dim=ctx.reduce_dims, keepdim=True)) / s
        ds = ds * ctx.grad_factor
        return grad_x, ds.reshape(ctx.scale_shape), None, None, None, None, None


def fake_quantize_lsq(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float | None = None,
) -> Tensor:
    """Fake quantization with a learnable scale (LSQ, Esser et al. 2020).

    ``scale`` may require grad; its gradient is scaled by ``grad_factor``
    (default ``1/sqrt(N·qmax)``, N = elements per scale). The forward is
    :func:`fake_quantize`'s arithmetic; the backward one masked pass plus two
    read-only reductions (no host synchronization on any device).

    Example::

        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> y = fake_quantize_lsq(torch.randn(100), s, 0, -8, 7)
        >>> y.sum().backward(); s.grad is not None
        True
    """
    _check_float_input(x, "fake_quantize_lsq")
    _check_codes(qmin, qmax)
    s_b, z_b, grad_factor, reduce_dims = _lsq_operands(x, scale, zero_point, qmax, axis, grad_factor)
    return _FakeQuantLSQ.apply(x, s_b, z_b, qmin, qmax, grad_factor, reduce_dims)


def _lsq_operands(x: Tensor, scale: Tensor, zero_point: Any, qmax: int, axis: int | None,
                  grad_factor: float | None) -> tuple[Tensor, Tensor, float, tuple[int, ...] | None]:  # fmt: skip
    """LSQ's scale and zero point shaped to broadcast over ``x`` (per tensor, or per channel along ``axis``), the
    scale-gradient factor (default ``1/sqrt(N·qmax)``, N elements per scale) and the dims the scale gradient sums."""
    z = torch.as_tensor(zero_point, device=x.device).detach()
    shape = _broadcast_shape(x, axis)
    if shape is None:
        s_b, z_b, reduce_dims = scale.reshape(()), z.reshape(()), None
        per_scale = x.numel()
    else:
        s_b, z_b = scale.reshape(shape), z.reshape(shape)
        ax = axis % x.dim()  # type: ignore[operator]
        reduce_dims = tuple(d for d in range(x.dim()) if d != ax)
        per_scale = x.numel() // max(x.shape[ax], 1)
    return s_b, z_b, lsq_grad_scale(per_scale, qmax) if grad_factor is None else grad_factor, reduce_dims


# --------------------------------------------------------------------------------------
# Fixed-point requantization (Jacob et al. 2018; gemmlowp / TFLite semantics)
# --------------------------------------------------------------------------------------


def quantize_multiplier(m: float) -> tuple[int, int]:
    """Real multiplier ``m > 0`` → ``(M0, n)`` with ``m ≈ M0 · 2^-31 · 2^-n``.

    ``M0`` is an int32 in ``[2^30, 2^31)`` (a Q0.31 number in [0.5, 1)) and ``n`` the
    right shift (negative for ``m >= 1``, a left shift). This is the design
    contract's ``M = 2^-n · M0`` with ``M0`` read as a Q31 fixed-point fraction.

    Example::

        >>> quantize_multiplier(0.75)
        (1610612736, 0)
    """
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"quantize_multiplier needs a finite multiplier > 0, got {m}")
    frac, exp = math.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    m0 = int(round(frac * (1 << 31)))
    if m0 == (1 << 31):
        m0 //= 2
        exp += 1
    return m0, -exp


def quantize_multiplier_tensor(m: Tensor) -> tuple[Tensor, Tensor]:
    """Vectorised :func:`quantize_multiplier` (int64 tensors ``M0`` and ``n``)."""
    m = m.double()
    if not (torch.isfinite(m).all() and (m > 0).all()):
        raise ValueError("quantize_multiplier_tensor needs finite multipliers > 0")
    frac, exp = torch.frexp(m)
    m0 = torch.round(frac * float(1 << 31)).to(torch.int64)
    carry = m0 == (1 << 31)
    m0 = torch.where(carry, m0 // 2, m0)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    return m0, -exp


def saturating_rounding_doubling_high_mul(a: Tensor, b: Tensor | int) -> Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` on int32 values (int64 tensors).

    Returns ``round(a·b / 2^31)`` with gemmlowp's nudge (ties away from zero,
    truncating division) and saturation of the single overflow case.
    """
    a = a.to(torch.int64)
    b_t = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    # gemmlowp's trunc((ab + nudge) / 2^31), nudge 2^30 (ab >= 0) or 1 - 2^30 (ab < 0), equals
    # floor((ab + 2^30) / 2^31) for every int64 ab (both round half up), i.e. one add and one arithmetic shift
    high = (a * b_t).add_(1 << 30).bitwise_right_shift_(31)
    if bool((b_t == _INT32_MIN).any()):  # the one overflow case needs b = INT32_MIN (never a quantized multiplier)
        high = torch.where((a == _INT32_MIN) & (b_t == _INT32_MIN), torch.full_like(high, _INT32_MAX), high)
    return high


def rounding_divide_by_pot(x: Tensor, exponent: Tensor | int) -> Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero."""
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    if (e < 0).any() or (e > 62).any():
        raise ValueError("rounding_divide_by_pot: exponent must be in [0, 62]")
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: Tensor, m0: Tensor | int, shift: Tensor | int) -> Tensor:
    """``x · M0 · 2^-31 · 2^-shift`` in integer arithmetic (TFLite's
    ``MultiplyByQuantizedMultiplier``). ``x`` holds int32 values; result int64 tensor.

    Example::

        >>> m0, n = quantize_multiplier(0.3)
        >>> int(multiply_by_quantized_multiplier(torch.tensor([1000]), m0, n))
        300
    """
    x = x.to(torch.int64)
    shift_t = torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    left = torch.clamp(-shift_t, min=0)
    right = torch.clamp(shift_t, min=0)
    x = torch.clamp(x << left, _INT32_MIN, _INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), right)


def multiply_by_quantized_multiplier_single_rounding(x: Tensor, m0: Tensor | int, shift: Tensor | int) -> Tensor:
    """``round(x · M0 · 2^-(31 + shift))`` with ONE rounding: ``(x·M0 + 2^(r-1)) >> r``,
    ``r = 31 + shift`` (TFLite's ``TFLITE_SINGLE_ROUNDING`` variant, as in CMSIS-NN).

    The gemmlowp form (:func:`multiply_by_quantized_multiplier`) rounds twice (the
    doubling high multiply, then the right shift), which keeps only ``shift`` fractional
    bits in between: an error of up to ``2^-(shift+1)`` output steps that flips ~5e-4 of
    the codes of a ResNet layer against exact rounding. Here the int64 product
    (``|x| < 2^31``, ``M0 < 2^31``) is rounded once, half up. Result int64.

    Example::

        >>> m0, n = quantize_multiplier(0.3)
        >>> int(multiply_by_quantized_multiplier_single_rounding(torch.tensor([1005]), m0, n))
        302
    """
    x = torch.clamp(x.to(torch.int64), _INT32_MIN, _INT32_MAX)
    total = 31 + torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    if bool((total < 1).any()) or bool((total > 62).any()):
        raise ValueError("multiply_by_quantized_multiplier_single_rounding: 31 + shift must lie in [1, 62]")
    prod = x * torch.as_tensor(m0, dtype=torch.int64, device=x.device)
    return (prod + (torch.ones_like(total) << (total - 1))) >> total


def requantize(
    acc: Tensor,
    m0: Tensor | int,
    shift: Tensor | int,
    zero_point: int,
    qmin: int,
    qmax: int,
    *,
    rounding: str = "single",
) -> Tensor:
    """int32 accumulator → output codes: ``clamp(fixed_point(acc · M) + z, qmin, qmax)``.

    ``rounding="single"`` (default): :func:`multiply_by_quantized_multiplier_single_rounding`;
    ``"gemmlowp"``: :func:`multiply_by_quantized_multiplier` (two roundings, as gemmlowp /
    classic TFLite).
    """
    if rounding == "single":
        y = multiply_by_quantized_multiplier_single_rounding(acc, m0, shift)
    elif rounding == "gemmlowp":
        y = multiply_by_quantized_multiplier(acc, m0, shift)
    else:
        raise ValueError(f"requantize: rounding must be 'single' or 'gemmlowp', got {rounding!r}")
    return torch.clamp(y + int(zero_point), qmin, qmax)

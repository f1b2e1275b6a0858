"""Tensor calibrators: pick a clip range ``(lo, hi)`` directly from a tensor (weights).

Pure functions (no ``nn.Module``, no state), used by the per-channel weight
observers (:mod:`qtoolkit.calibration.per_channel`) and re-exported by
:mod:`qtoolkit.calibration` (the module to import them from). Each returns two
float32 tensors ``(lo, hi)``: ``[C]`` along ``axis``, or 0-d with ``axis=None``.
Same conventions as the histogram calibrators
(:mod:`qtoolkit.calibration.histogram_ranges`), evaluated on the exact values instead
of a histogram.

Example::

    >>> import torch
    >>> lo, hi = percentile_range_tensor(torch.tensor([[-4.0, 1.0], [0.5, 2.0]]), 100.0, axis=0)
    >>> hi.tolist()
    [4.0, 2.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qtoolkit.calibration.histogram_ranges import _check_percentile
from qtoolkit.numerics import compute_qparams

__all__ = [
    "percentile_range_tensor",
    "mse_range_tensor",
]


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as float32 ``[C, K]`` with channels along ``axis`` (``[1, N]`` per-tensor)."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _out(v: Tensor, axis: int | None) -> Tensor:
    return v.reshape(()) if axis is None else v


def _row_quantile(x2: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (``torch.quantile``'s default),
    ignoring NaNs, via ``kthvalue`` (no 16M-element limit)."""
    c, k = x2.shape
    if k == 0:
        raise ValueError("cannot take a quantile of empty channels")
    nan = torch.isnan(x2)
    if not bool(nan.any()):
        pos = q * (k - 1)
        i0 = int(math.floor(pos))
        i1 = min(i0 + 1, k - 1)
        v0 = torch.kthvalue(x2, i0 + 1, dim=1).values
        if i1 == i0:
            return v0
        v1 = torch.kthvalue(x2, i1 + 1, dim=1).values
        return v0 + (v1 - v0) * (pos - i0)
    srt = torch.sort(x2, dim=1).values  # NaNs last
    cnt = (~nan).sum(1)
    pos = q * (cnt.clamp(min=1) - 1).to(torch.float64)
    i0 = torch.floor(pos).to(torch.int64)
    i1 = torch.minimum(i0 + 1, (cnt - 1).clamp(min=0))
    v0 = srt.gather(1, i0.unsqueeze(1)).squeeze(1)
    v1 = srt.gather(1, i1.unsqueeze(1)).squeeze(1)
    val = v0 + (v1 - v0) * (pos - i0).to(v0.dtype)
    return torch.where(cnt > 0, val, torch.zeros_like(val))


def percentile_range_tensor(
    x: Tensor, percentile: float, axis: int | None = 0, symmetric: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-channel percentile clip range computed directly on a tensor (weights).

    Same convention as :func:`percentile_range`: symmetric → the p-th percentile
    of ``|x|`` per channel, ``(-t, t)``; asymmetric → the ``(100-p)``-th and p-th
    percentiles. Linear interpolation as ``torch.quantile``, computed with
    ``torch.kthvalue`` (works beyond ``torch.quantile``'s 16M-element limit).
    NaNs are ignored. ``axis=None`` gives a per-tensor (0-d) result.

    Example::

        >>> w = torch.arange(1.0, 101.0).repeat(3, 1)   # 3 channels of 1..100
        >>> lo, hi = percentile_range_tensor(w, 99.0, axis=0, symmetric=True)
        >>> hi.tolist()
        [99.01000213623047, 99.01000213623047, 99.01000213623047]
    """
    p = _check_percentile(percentile) / 100.0
    x2 = _rows(x, axis)
    x2 = torch.where(torch.isinf(x2), torch.full_like(x2, float("nan")), x2)
    if symmetric:
        t = _row_quantile(x2.abs(), p)
        return _out(-t, axis), _out(t, axis)
    lo = _row_quantile(x2, 1.0 - p)
    hi = _row_quantile(x2, p)
    return _out(lo, axis), _out(hi, axis)


def mse_range_tensor(
    x: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    axis: int | None = 0,
    *,
    num_candidates: int = 100,
) -> tuple[Tensor, Tensor]:
    """Per-channel clip range minimizing the actual fake-quantization MSE (weights).

    For each channel the min/max range ``[lo_c, hi_c]`` (widened to include 0) is
    shrunk by ``α = k / num_candidates`` (``k = 1..num_candidates``); the tensor is
    fake-quantized with each candidate's qparams
    (:func:`qtoolkit.numerics.compute_qparams`, same rounding as
    ``fake_quantize``) and the per-channel squared error summed. Vectorized over
    channels; one pass over the tensor per candidate. Non-finite values are
    ignored. ``axis=None`` gives a per-tensor result.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(8, 256, generator=g)
        >>> lo, hi = mse_range_tensor(w, -7, 7, symmetric=True, axis=0)
        >>> bool((hi < w.abs().amax(1)).all()) and hi.shape == (8,)
        True
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    x2 = _rows(x, axis)
    finite = torch.isfinite(x2)
    all_finite = bool(finite.all())
    if all_finite:
        mn, mx = torch.aminmax(x2, dim=1)
    else:
        inf = torch.full((), float("inf"), device=x2.device)
        mn = torch.where(finite, x2, inf).amin(1)
        mx = torch.where(finite, x2, -inf).amax(1)
        mn = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        x2 = torch.where(finite, x2, torch.zeros_like(x2))
    lo_x = torch.clamp(mn, max=0.0)
    hi_x = torch.clamp(mx, min=0.0)
    if symmetric:
        hi_x = torch.maximum(-lo_x, hi_x)
        lo_x = -hi_x
    c, k = x2.shape
    alphas = torch.arange(1, num_candidates + 1, dtype=torch.float32, device=x2.device) / num_candidates
    lo_c = alphas.unsqueeze(1) * lo_x.unsqueeze(0)  # [A, C]
    hi_c = alphas.unsqueeze(1) * hi_x.unsqueeze(0)
    scale, zp = compute_qparams(lo_c, hi_c, qmin, qmax, symmetric)
    inv = (1.0 / scale).unsqueeze(2)  # [A, C, 1], x * (1/s) as fake_quantize does
    s3, z3 = scale.unsqueeze(2), zp.to(torch.float32).unsqueeze(2)
    errs = []
    step = max(1, (1 << 22) // max(c * k, 1))  # candidates per chunk: ~4M elements
    for a0 in range(0, num_candidates, step):
        sl = slice(a0, a0 + step)
        q = torch.round(x2.unsqueeze(0) * inv[sl]).add_(z3[sl]).clamp_(qmin, qmax)
        d = q.sub_(z3[sl]).mul_(s3[sl]).sub_(x2.unsqueeze(0))
        if not all_finite:
            d = d * finite
        errs.append(d.square_().sum(2))
    err = torch.cat(errs)  # [A, C]
    # least error; on ties the largest range (least clipping)
    best = num_candidates - 1 - torch.argmin(torch.flip(err, [0]), dim=0)  # [C]
    best_lo = lo_c.gather(0, best.unsqueeze(0)).squeeze(0)
    best_hi = hi_c.gather(0, best.unsqueeze(0)).squeeze(0)
    return _out(best_lo, axis), _out(best_hi, axis)

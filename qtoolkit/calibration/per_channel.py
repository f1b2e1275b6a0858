"""The per-channel weight observers: :class:`PerChannelPercentileObserver` and
:class:`PerChannelMSEObserver`, which run a tensor calibrator on the last observed
tensor. Import them from :mod:`qtoolkit.calibration`.
"""

from __future__ import annotations

import torch
from torch import Tensor

import qtoolkit.calibration.tensor_ranges as cal
from qtoolkit.calibration.base import ObserverBase, _clean_range
from qtoolkit.spec import QuantSpec

__all__ = ["PerChannelPercentileObserver", "PerChannelMSEObserver"]


class _PerChannelTensorObserver(ObserverBase):
    """Per-channel range computed directly on the last observed tensor (weights).

    Weights are static, so no histogram is kept: each ``forward`` replaces the
    statistics with those of the new tensor and runs the per-channel search right
    away (the result is stored in ``range_lo``/``range_hi``; ``calculate_qparams``
    is cheap). Non-finite values raise, or are ignored with ``ignore_nonfinite``.
    """

    _resizable = ("clip_lo", "clip_hi", "min_val", "max_val", "range_lo", "range_hi")

    def __init__(self, spec: QuantSpec, *, ignore_nonfinite: bool = False) -> None:
        if spec.axis is None:
            raise ValueError(f"{type(self).__name__} needs a per-channel spec (QuantSpec(axis=...))")
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        for name in ("min_val", "max_val", "range_lo", "range_hi"):
            self.register_buffer(name, torch.empty(0))

    def _reset_stats(self) -> None:
        dev = self.seen.device
        for name in ("min_val", "max_val", "range_lo", "range_hi"):
            setattr(self, name, torch.empty(0, device=dev))

    def _search(self, x2: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _observe(self, x: Tensor) -> bool:
        mm = self._batch_minmax(x)  # raises on non-finite unless ignore_nonfinite
        if mm is None:
            return False
        x2 = self._channels(x)
        if self.ignore_nonfinite:
            x2 = torch.where(torch.isfinite(x2), x2, torch.full_like(x2, float("nan")))
        lo, hi = self._search(x2)
        self.min_val, self.max_val = _clean_range(*mm)
        self.range_lo, self.range_hi = lo, hi
        return True

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        return self.range_lo, self.range_hi

    def _observed_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val


class PerChannelPercentileObserver(_PerChannelTensorObserver):
    """Per-channel percentile clip range of the last observed tensor (weights).

    Uses :func:`qtoolkit.calibration.percentile_range_tensor` (symmetric → p-th
    percentile of ``|w|`` per channel; asymmetric → ``100-p`` / ``p`` percentiles).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = PerChannelPercentileObserver(QuantSpec(8, narrow_range=True, axis=0), percentile=99.0)
        >>> _ = obs(torch.arange(1.0, 101.0).repeat(2, 1))
        >>> obs.compute_range()[1]
        tensor([99.0100, 99.0100])
    """

    calibrator = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, *, ignore_nonfinite: bool = False) -> None:
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        self.percentile = float(percentile)

    def _search(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        return cal.percentile_range_tensor(x2, self.percentile, axis=0, symmetric=self.spec.symmetric)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"


class PerChannelMSEObserver(_PerChannelTensorObserver):
    """Per-channel clip range of the last observed tensor minimizing the actual
    fake-quantization MSE (:func:`qtoolkit.calibration.mse_range_tensor`).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = PerChannelMSEObserver(QuantSpec(4, narrow_range=True, axis=0))
        >>> w = torch.randn(8, 64)
        >>> _ = obs(w)
        >>> bool((obs.compute_range()[1] <= w.abs().amax(1)).all())
        True
    """

    calibrator = "mse"

    def __init__(self, spec: QuantSpec, num_candidates: int = 100, *, ignore_nonfinite: bool = False) -> None:
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = int(num_candidates)

    def _search(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        s = self.spec
        return cal.mse_range_tensor(x2, s.qmin, s.qmax, s.symmetric, axis=0, num_candidates=self.num_candidates)

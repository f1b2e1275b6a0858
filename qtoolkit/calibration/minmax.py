"""The min/max observers: running min/max (:class:`MinMaxObserver`, per-tensor or
per-channel), :class:`PerChannelMinMaxObserver` and the moving average
:class:`MovingAverageMinMaxObserver` (QAT). Import them from :mod:`qtoolkit.calibration`.

Example::

    >>> import torch
    >>> from qtoolkit.spec import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(8, signed=False, symmetric=False))
    >>> _ = obs(torch.tensor([-1.0, 0.5])); _ = obs(torch.tensor([3.0]))
    >>> [float(v) for v in obs.compute_range()]
    [-1.0, 3.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtoolkit.calibration.base import ObserverBase, _clean_range
from qtoolkit.spec import QuantSpec

__all__ = ["MinMaxObserver", "PerChannelMinMaxObserver", "MovingAverageMinMaxObserver"]


class MinMaxObserver(ObserverBase):
    """Running min/max over all batches; per-tensor (``spec.axis is None``) or
    per-channel along ``spec.axis``.

    Buffers ``min_val``/``max_val`` (0-d, or ``[C]`` once the first batch arrived).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = MinMaxObserver(QuantSpec(8, narrow_range=True, axis=0))
        >>> _ = obs(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
        >>> obs.calculate_qparams()[0] * 127
        tensor([2.0000, 0.5000])
    """

    calibrator = "minmax"
    _resizable = ("clip_lo", "clip_hi", "min_val", "max_val")

    def __init__(self, spec: QuantSpec, *, ignore_nonfinite: bool = False) -> None:
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self._reset_stats()

    def _reset_stats(self) -> None:
        dev = self.seen.device
        if self.spec.axis is None:
            self.min_val = torch.tensor(float("inf"), device=dev)
            self.max_val = torch.tensor(float("-inf"), device=dev)
        else:
            self.min_val = torch.empty(0, device=dev)
            self.max_val = torch.empty(0, device=dev)

    def _observe(self, x: Tensor) -> bool:
        mm = self._batch_minmax(x)
        if mm is None:
            return False
        self._update(*mm)
        return True

    def _update(self, mn: Tensor, mx: Tensor) -> None:
        if self.min_val.numel() == 0:  # first per-channel batch
            self.min_val, self.max_val = mn.clone(), mx.clone()
            return
        self._check_channels(self.min_val, mn)
        self.min_val = torch.minimum(self.min_val, mn)
        self.max_val = torch.maximum(self.max_val, mx)

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        return _clean_range(self.min_val, self.max_val)

    def _observed_range(self) -> tuple[Tensor, Tensor]:
        return _clean_range(self.min_val, self.max_val)


class PerChannelMinMaxObserver(MinMaxObserver):
    """:class:`MinMaxObserver` that insists on a per-channel spec (``spec.axis``).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = PerChannelMinMaxObserver(QuantSpec(8, axis=1))
        >>> _ = obs(torch.randn(4, 3, 5))
        >>> obs.calculate_qparams()[0].shape
        torch.Size([3])
    """

    def __init__(self, spec: QuantSpec, *, ignore_nonfinite: bool = False) -> None:
        if spec.axis is None:
            raise ValueError("PerChannelMinMaxObserver needs a per-channel spec (QuantSpec(axis=...)); use MinMaxObserver")
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max (QAT activations).

    The first batch initializes the statistics; afterwards
    ``min = min + momentum · (batch_min − min)`` (same for max), as torch.ao's
    ``MovingAverageMinMaxObserver`` with ``averaging_constant=momentum``.
    Per-tensor or per-channel (``spec.axis``).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = MovingAverageMinMaxObserver(QuantSpec(8), momentum=0.5)
        >>> _ = obs(torch.tensor([-1.0, 1.0])); _ = obs(torch.tensor([-3.0, 3.0]))
        >>> float(obs.max_val)
        2.0
    """

    calibrator = "ema"

    def __init__(self, spec: QuantSpec, momentum: float = 0.01, *, ignore_nonfinite: bool = False) -> None:
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        self.momentum = float(momentum)

    def _update(self, mn: Tensor, mx: Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = mn.clone(), mx.clone()
            return
        self._check_channels(self.min_val, mn)
        m = self.momentum
        # no sync: a statistic that is still +-inf (first batch, or a channel that
        # never saw finite data) takes the batch value; a non-finite batch value
        # (channel without finite data this batch) keeps the old one
        new_min = torch.where(torch.isinf(self.min_val), mn, self.min_val + m * (mn - self.min_val))
        new_max = torch.where(torch.isinf(self.max_val), mx, self.max_val + m * (mx - self.max_val))
        self.min_val = torch.where(torch.isfinite(mn), new_min, self.min_val)
        self.max_val = torch.where(torch.isfinite(mx), new_max, self.max_val)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"

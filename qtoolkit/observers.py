"""Observers: ``nn.Module`` s that record statistics of the tensors flowing through
them and turn them into a clip range and quantization parameters.

The contract follows torch.ao's observers:

* ``forward(x)`` records statistics of ``x`` (under ``no_grad``, on a detached
  float32 view; bfloat16/float16/float64 inputs are fine) and returns ``x``
  unchanged;
* ``compute_range()`` gives the chosen clip range ``(lo, hi)``;
* ``calculate_qparams()`` gives ``(scale float32, zero_point int32)`` — shape
  ``[]`` per-tensor or ``[C]`` per-channel — via
  :func:`qtoolkit.numerics.compute_qparams`;
* ``finalize()`` runs an expensive search (entropy / MSE / percentile on a
  histogram) once and caches the range in the ``clip_lo``/``clip_hi`` buffers;
  new data invalidates the cache.

All state lives in buffers, so ``state_dict`` round-trips into a fresh observer
(per-channel buffers are resized on load) and ``.to(device)`` works.

The observers live in one module per family, re-exported here (import them from
this one): :mod:`qtoolkit.observer_base` (:class:`ObserverBase`),
:mod:`qtoolkit.minmax_observers` (min/max and moving average),
:mod:`qtoolkit.histogram_observer` (:class:`HistogramObserver`) and
:mod:`qtoolkit.per_channel_observers` (per-channel percentile / MSE weights).
:func:`make_observer` picks one from the calibrator registry
(:mod:`qtoolkit.calibrator_registry`).

Example::

    >>> import torch
    >>> from qtoolkit.spec import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(bits=8, signed=False, symmetric=False))
    >>> _ = obs(torch.tensor([-1.0, 0.5, 3.0]))
    >>> scale, zp = obs.calculate_qparams()
    >>> round(float(scale) * 255, 4), int(zp)
    (4.0, 64)
"""

from __future__ import annotations

from typing import Any

from qtoolkit.calibrator_registry import get_calibrator
from qtoolkit.config import QuantizerConfig
from qtoolkit.histogram_observer import HistogramObserver
from qtoolkit.minmax_observers import MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from qtoolkit.observer_base import ObserverBase
from qtoolkit.per_channel_observers import PerChannelMSEObserver, PerChannelPercentileObserver

__all__ = [
    "ObserverBase",
    "MinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PerChannelPercentileObserver",
    "PerChannelMSEObserver",
    "make_observer",
]


def make_observer(cfg: QuantizerConfig) -> ObserverBase:
    """The observer for a :class:`~qtoolkit.config.QuantizerConfig`.

    ============  ===============================  ==============================
    calibrator    per-tensor (``axis is None``)      per-channel
    ============  ===============================  ==============================
    minmax        MinMaxObserver                     PerChannelMinMaxObserver
    ema           MovingAverageMinMaxObserver        MovingAverageMinMaxObserver
    percentile    HistogramObserver("percentile")    PerChannelPercentileObserver
    entropy       HistogramObserver("entropy")       ValueError (not supported)
    mse           HistogramObserver("mse")           PerChannelMSEObserver
    ============  ===============================  ==============================

    The table is the built-in part of the calibrator registry
    (:mod:`qtoolkit.calibrator_registry`); a calibrator added with
    :func:`~qtoolkit.calibrator_registry.register_calibrator` maps to its own
    factories. ``cfg.options`` are passed on (``momentum``, ``percentile``,
    ``bins``, ``num_candidates``, ``ignore_nonfinite``, as the entry accepts);
    options the chosen observer does not take raise ``TypeError`` naming them.

    Example::

        >>> from qtoolkit.config import Uint8ActPerTensor, Int8WeightPerChannel
        >>> type(make_observer(Uint8ActPerTensor.with_calibrator("entropy"))).__name__
        'HistogramObserver'
        >>> type(make_observer(Int8WeightPerChannel.with_calibrator("mse"))).__name__
        'PerChannelMSEObserver'
    """
    if not isinstance(cfg, QuantizerConfig):
        raise TypeError(f"make_observer expects a QuantizerConfig, got {type(cfg).__name__}")
    spec, calib = cfg.spec, cfg.calibrator
    per_channel = spec.axis is not None
    opts: dict[str, Any] = dict(cfg.options)
    entry = get_calibrator(calib)  # ValueError naming the registered calibrators
    gran = "per-channel" if per_channel else "per-tensor"
    factory = entry.factory(per_channel)
    if factory is None:
        hint = f"; {entry.unsupported_hint}" if entry.unsupported_hint else ""
        raise ValueError(f"calibrator {calib!r} is not supported for {gran} quantization (spec {spec.describe()}){hint}")
    accepted = entry.options(per_channel)
    unknown = sorted(set(opts) - accepted)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for calibrator {calib!r} ({gran}); accepted: {sorted(accepted)}")
    return factory(spec, **opts)

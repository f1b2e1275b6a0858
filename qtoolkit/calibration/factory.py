"""The observer a quantizer config asks for: :func:`make_observer`.

It reads the calibrator registry (:mod:`qtoolkit.calibration.registry`): the
entry of ``cfg.calibrator`` names the observer factory per tensor / per channel
and the options it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from qtoolkit.calibration.base import ObserverBase
from qtoolkit.calibration.registry import get_calibrator
from qtoolkit.spec import QuantSpec

__all__ = ["make_observer"]


class ObserverConfig(Protocol):
    """What :func:`make_observer` reads of a :class:`~qtoolkit.config.QuantizerConfig`."""

    spec: QuantSpec
    calibrator: str
    options: Mapping[str, Any]


def make_observer(cfg: ObserverConfig) -> ObserverBase:
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
    (:mod:`qtoolkit.calibration.registry`); a calibrator added with
    :func:`~qtoolkit.calibration.registry.register_calibrator` maps to its own
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
    spec, calib = getattr(cfg, "spec", None), getattr(cfg, "calibrator", None)
    if not isinstance(spec, QuantSpec) or not isinstance(calib, str):
        raise TypeError(f"make_observer expects a QuantizerConfig (qtoolkit.config), got {type(cfg).__name__}")
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

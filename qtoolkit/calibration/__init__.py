"""Calibration: observers record the tensors a quantizer sees, calibrators pick a clip range from them.

One module per role:

=======================================  =================================================================
module                                   holds
=======================================  =================================================================
:mod:`~qtoolkit.calibration.base`        :class:`ObserverBase`: the observer contract, buffers, qparams
:mod:`~qtoolkit.calibration.minmax`      :class:`MinMaxObserver`, :class:`PerChannelMinMaxObserver`,
                                         :class:`MovingAverageMinMaxObserver` (QAT)
:mod:`~qtoolkit.calibration.histogram`   :class:`HistogramObserver` (percentile / entropy / MSE activations)
:mod:`~qtoolkit.calibration.per_channel` :class:`PerChannelPercentileObserver`, :class:`PerChannelMSEObserver`
:mod:`~qtoolkit.calibration.histogram_ranges`  range searches on a histogram (percentile, entropy/KL, MSE)
:mod:`~qtoolkit.calibration.tensor_ranges`     range searches on a tensor (per-channel weights)
:mod:`~qtoolkit.calibration.registry`    the calibrator registry (:func:`register_calibrator`)
:mod:`~qtoolkit.calibration.factory`     :func:`make_observer`: the observer a ``QuantizerConfig`` asks for
=======================================  =================================================================

Observers
---------
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

Calibrators
-----------
Pure functions (no ``nn.Module``, no state) returning two float32 tensors
``(lo, hi)`` — 0-d for a histogram / per-tensor call, ``[C]`` for per-channel
calls — ready for :func:`qtoolkit.numerics.compute_qparams` (which widens the
range to include 0). ``hist`` holds counts (any numeric dtype) and ``edges`` the
``len(hist) + 1`` increasing bin edges; mass is assumed uniform inside a bin. The
histograms built by :class:`HistogramObserver` are signed (they cover
``[min(x, 0), max(x, 0)]``) with 0 as a bin edge; symmetric calibrators fold them
into a histogram of ``|x|`` exactly (:func:`abs_histogram`). Arbitrary edges are
accepted too (folding then redistributes the bin that straddles 0 linearly).

* **percentile** — symmetric: clip at the p-th percentile of ``|x|``.
  Asymmetric: the lower end at the ``(100 − p)``-th and the upper end at the p-th
  percentile of ``x`` (each tail clips ``100 − p`` percent of the mass).
* **entropy** — TensorRT's KL-divergence search (Migacz, *8-bit inference with
  TensorRT*, GTC 2017) on the histogram of ``|x|``.
* **mse** — minimum expected squared error (clipping + rounding) over a grid of
  shrink factors of the observed range, evaluated in closed form per bin.

A new calibrator is one :func:`register_calibrator` call plus its observer.
The old flat modules (``qtoolkit.observers``, ``qtoolkit.calibrators``,
``qtoolkit.calibrator_registry``, ...) re-export these names.

Example::

    >>> import torch
    >>> from qtoolkit.spec import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(bits=8, signed=False, symmetric=False))
    >>> _ = obs(torch.tensor([-1.0, 0.5, 3.0]))
    >>> scale, zp = obs.calculate_qparams()
    >>> round(float(scale) * 255, 4), int(zp)
    (4.0, 64)
    >>> x = torch.randn(100_000)
    >>> hist = torch.histc(x, 2048, -6.0, 6.0)
    >>> edges = torch.linspace(-6.0, 6.0, 2049)
    >>> lo, hi = percentile_range(hist, edges, 99.0, symmetric=True)
    >>> bool(2.4 < hi < 2.75) and bool(lo == -hi)
    True
"""

from __future__ import annotations

from qtoolkit.calibration.base import ObserverBase
from qtoolkit.calibration.factory import make_observer
from qtoolkit.calibration.histogram import HistogramObserver
from qtoolkit.calibration.histogram_ranges import (
    KL_EPS,
    abs_histogram,
    entropy_range,
    expected_quant_mse,
    mse_range,
    percentile_range,
)
from qtoolkit.calibration.minmax import MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from qtoolkit.calibration.per_channel import PerChannelMSEObserver, PerChannelPercentileObserver
from qtoolkit.calibration.registry import (
    COMMON_OPTIONS,
    CalibratorEntry,
    ObserverFactory,
    calibrator_names,
    get_calibrator,
    register_calibrator,
    unregister_calibrator,
)
from qtoolkit.calibration.tensor_ranges import mse_range_tensor, percentile_range_tensor

__all__ = [
    "COMMON_OPTIONS",
    "KL_EPS",
    "CalibratorEntry",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "ObserverBase",
    "ObserverFactory",
    "PerChannelMSEObserver",
    "PerChannelMinMaxObserver",
    "PerChannelPercentileObserver",
    "abs_histogram",
    "calibrator_names",
    "entropy_range",
    "expected_quant_mse",
    "get_calibrator",
    "make_observer",
    "mse_range",
    "mse_range_tensor",
    "percentile_range",
    "percentile_range_tensor",
    "register_calibrator",
    "unregister_calibrator",
]

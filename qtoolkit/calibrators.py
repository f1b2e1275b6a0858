"""Range calibrators: pick a clip range ``(lo, hi)`` from a histogram or a tensor.

Pure functions (no ``nn.Module``, no state); the observers in
:mod:`qtoolkit.observers` call them. Every function returns two float32 tensors
``(lo, hi)`` — 0-d for a histogram / per-tensor call, ``[C]`` for per-channel
calls — ready for :func:`qtoolkit.numerics.compute_qparams` (which widens the
range to include 0).

Histogram conventions
---------------------
``hist`` holds counts (any numeric dtype) and ``edges`` the ``len(hist) + 1``
increasing bin edges. Mass is assumed uniform inside a bin. The histograms built
by :class:`~qtoolkit.observers.HistogramObserver` are signed (they cover
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

The functions live in two modules, re-exported here (import them from this one):
:mod:`qtoolkit.histogram_calibrators` (``abs_histogram``, ``percentile_range``,
``entropy_range``, ``mse_range``, ``expected_quant_mse``) and
:mod:`qtoolkit.tensor_calibrators` (``percentile_range_tensor``,
``mse_range_tensor``). A new calibrator is registered with
:func:`qtoolkit.calibrator_registry.register_calibrator`.

Example::

    >>> import torch
    >>> x = torch.randn(100_000)
    >>> hist = torch.histc(x, 2048, -6.0, 6.0)
    >>> edges = torch.linspace(-6.0, 6.0, 2049)
    >>> lo, hi = percentile_range(hist, edges, 99.0, symmetric=True)
    >>> bool(2.4 < hi < 2.75) and bool(lo == -hi)
    True
"""

from __future__ import annotations

from qtoolkit.histogram_calibrators import (
    KL_EPS,  # noqa: F401 - re-exported (module constant)
    _kl_divergences,  # noqa: F401 - re-exported (private, tested directly)
    abs_histogram,
    entropy_range,
    expected_quant_mse,
    mse_range,
    percentile_range,
)
from qtoolkit.tensor_calibrators import mse_range_tensor, percentile_range_tensor

__all__ = [
    "abs_histogram",
    "percentile_range",
    "entropy_range",
    "mse_range",
    "percentile_range_tensor",
    "mse_range_tensor",
    "expected_quant_mse",
]

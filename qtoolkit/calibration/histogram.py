"""The histogram observer: :class:`HistogramObserver`, one histogram on a lattice
through 0 plus a histogram calibrator (entropy / percentile / MSE) for per-tensor
activation ranges. Import it from :mod:`qtoolkit.calibration`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import qtoolkit.calibration.histogram_ranges as cal
from qtoolkit.calibration.base import ObserverBase
from qtoolkit.spec import QuantSpec

__all__ = ["HistogramObserver", "DEFAULT_MAX_SAMPLES"]

#: ``max_samples="auto"`` per method (see :class:`HistogramObserver`, *Sampling*)
DEFAULT_MAX_SAMPLES: dict[str, int | None] = {"percentile": 1 << 15, "mse": 1 << 15, "minmax": 1 << 15, "entropy": None}


class HistogramObserver(ObserverBase):
    """One histogram collector (fixed number of bins) + a calibrator, per-tensor.

    The histogram covers ``[min(x, 0), max(x, 0)]`` of everything seen on a bin
    lattice anchored at 0 (edges ``k · bin_width``; buffer ``bin_offset`` is the
    lattice index of the first bin), so 0 is always a bin edge: symmetric specs
    fold it exactly into a histogram of ``|x|``; post-ReLU data uses only bins
    ``>= 0``; signed data keeps both tails. When a batch falls outside the
    window, the bin width grows by the smallest integer factor that makes
    everything fit and the old counts are merged (bin ``k`` → ``k // factor``):
    exact integer merging, no raw data kept, no information invented. The batch
    is then counted with ``bincount`` (processed in cache-sized chunks on CPU;
    a fixed-size ``scatter_add_`` on CUDA). One host sync per batch (for the
    min/max that drive the window and the NaN check).

    **Sampling** (``max_samples``; default :data:`DEFAULT_MAX_SAMPLES`: ``2**15`` for
    percentile / MSE / minmax, every element for entropy): the min/max (the window, the
    ``minmax`` method, the clamp of every computed range) always use every element,
    but a tensor with more than ``max_samples`` elements contributes only an evenly
    spread sample of them to the histogram: every ``step``-th block of
    :attr:`SAMPLE_BLOCK` consecutive elements (a prime length, so the blocks do not
    line up with channel or row boundaries), the first block rotating from batch to
    batch, ``step`` the smallest that keeps at most ``max_samples`` elements.
    Counting every element costs ~3 ns each on a 2-core CPU, more than the
    convolutions spend per activation: it made the histogram calibrators 2.1-2.6x a
    plain FP32 forward over the same batches on ResNet-20 (``scripts/bench_core.py
    --only calibration``); sampled, ~1.5x. On the shipped ResNet-20 (32 batches of 64
    Fashion-MNIST images; ``scripts/check_sampling.py``) sampling moves the activation
    scales by a median 0.7% (percentile), 0.7-2.5% (MSE) and 0.4-5% (entropy), about
    what calibrating on another 2,048 training images moves them (0.7%, 0.5-1.3%,
    1-4%), and test top-1 by +0.06 to +0.28 pt at W8A8 and W4A4 (the other images:
    -0.03 to +0.40 pt). Entropy counts everything by default: KL depends on how many
    values were counted (a sparser tail costs more KL), so a sample picks a smaller
    threshold than the full data — 11-21% smaller on 8 batches of ReLU'd Gaussians
    (``tests/test_observers.py::test_histogram_sampling_close_to_exact_counting``) —
    and its result would change with the sample size rather than with the data.
    ``max_samples=None`` counts every element (TensorRT's and torch.ao's behaviour).

    Cost: a batch costs one ``aminmax`` over all elements plus one
    scatter-increment per counted element; on 2 CPU cores counting a 64×64×32×32
    batch in full takes ~4.5 ms vs ~0.5 ms for :class:`MinMaxObserver` (``bincount``
    alone is ~2.6 ms), about a third of torch.ao's ``HistogramObserver``; see
    ``scripts/bench_core.py``.

    Args:
        spec: per-tensor grid (``spec.axis`` must be None).
        method: ``"entropy"`` (TensorRT KL), ``"percentile"``, ``"mse"`` or
            ``"minmax"`` (exact observed min/max).
        bins: number of bins (>= 16).
        percentile: for ``method="percentile"`` (see
            :func:`qtoolkit.calibration.percentile_range` for the convention).
        num_candidates: for ``method="mse"``.
        max_samples: most elements of one observed tensor counted into the
            histogram (see *Sampling*); ``None`` counts all of them; ``"auto"``
            (default): :data:`DEFAULT_MAX_SAMPLES` for ``method``.

    Buffers: ``hist`` (int64 counts), ``bin_width`` (float64, 0 until a non-zero
    value was seen), ``bin_offset`` (int64), ``min_val``/``max_val`` (exact).

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = HistogramObserver(QuantSpec(8, signed=False, symmetric=False), method="percentile", percentile=99.0)
        >>> _ = obs(torch.rand(10_000)); _ = obs(2 * torch.rand(10_000))
        >>> int(obs.hist.sum())
        20000
        >>> lo, hi = obs.compute_range()
        >>> bool(1.9 < hi < 2.0)
        True
    """

    calibrator = "histogram"
    METHODS = ("entropy", "percentile", "mse", "minmax")
    #: elements per chunk when binning on CPU (keeps temporaries in cache)
    CHUNK = 1 << 17
    #: elements per sampled block (prime: blocks drift across rows and channels)
    SAMPLE_BLOCK = 257

    def __init__(
        self,
        spec: QuantSpec,
        method: str = "entropy",
        bins: int = 2048,
        percentile: float = 99.99,
        *,
        num_candidates: int = 200,
        max_clip_fraction: float = 0.05,
        max_samples: int | None | str = "auto",
        ignore_nonfinite: bool = False,
    ) -> None:
        if spec.axis is not None:
            raise ValueError(
                f"HistogramObserver is per-tensor only (got spec axis={spec.axis}); for per-channel weights use "
                "PerChannelPercentileObserver, PerChannelMSEObserver or PerChannelMinMaxObserver"
            )
        if method not in self.METHODS:
            raise ValueError(f"HistogramObserver method must be one of {self.METHODS}, got {method!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins must be an int >= 16, got {bins!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        self.method = method
        self.calibrator = method
        self.bins = bins
        self.percentile = float(percentile)
        self.num_candidates = int(num_candidates)
        if not 0.0 <= float(max_clip_fraction) < 1.0:
            raise ValueError(f"max_clip_fraction must be in [0, 1), got {max_clip_fraction}")
        self.max_clip_fraction = float(max_clip_fraction)
        if max_samples == "auto":
            max_samples = DEFAULT_MAX_SAMPLES[method]
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < self.SAMPLE_BLOCK
        ):
            raise ValueError(f"max_samples must be None, 'auto' or an int >= {self.SAMPLE_BLOCK}, got {max_samples!r}")
        self.max_samples = max_samples
        self._sampled_batches = 0  # rotates the sample's first block
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.int64))
        self.register_buffer("bin_width", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("bin_offset", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _reset_stats(self) -> None:
        self.hist.zero_()
        self.bin_width.fill_(0.0)
        self.bin_offset.fill_(0)
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self._sampled_batches = 0

    # ------------------------------------------------------------------ histogram
    @property
    def edges(self) -> Tensor:
        """The ``bins + 1`` bin edges (float64)."""
        w = float(self.bin_width)
        k = torch.arange(self.bins + 1, dtype=torch.float64, device=self.hist.device) + self.bin_offset.to(torch.float64)
        return k * (w if w > 0 else 1e-30)

    def histogram(self) -> tuple[Tensor, Tensor]:
        """``(counts, edges)`` of everything observed (float64 counts)."""
        self._require_data()
        return self.hist.to(torch.float64), self.edges

    def _rebin(self, k0: int, new_k0: int, factor: int) -> None:
        """Move counts from lattice (width w, first bin k0) to (width w·factor, first bin new_k0)."""
        if factor == 1 and new_k0 == k0:
            return
        k = torch.arange(self.bins, device=self.hist.device, dtype=torch.int64) + k0
        # |k| < 2 * bins: capping the factor leaves floor(k / factor) unchanged
        f = min(factor, 1 << 40)
        idx = torch.div(k, f, rounding_mode="floor") - new_k0
        new = torch.zeros_like(self.hist)
        new.index_add_(0, idx.clamp_(0, self.bins - 1), self.hist)
        self.hist.copy_(new)

    def _place(self, lo: float, hi: float, w: float) -> tuple[int, int]:
        """Smallest integer width factor and window start covering ``[lo, hi]``."""
        bins = self.bins
        kmin = math.floor(lo / w)
        kmax = max(math.ceil(hi / w), kmin + 1)
        factor = max(1, -(-(kmax - kmin) // bins))
        while -(-kmax // factor) - (kmin // factor) > bins:
            factor += 1
        nk_min, nk_max = kmin // factor, -(-kmax // factor)
        if lo >= 0.0:  # no negative data: all spare bins on top
            return factor, nk_min
        if hi <= 0.0:  # no positive data: all spare bins below
            return factor, nk_max - bins
        return factor, nk_min - (bins - (nk_max - nk_min)) // 2

    def _observe(self, x: Tensor) -> bool:
        x = x.reshape(-1)
        mn, mx = torch.aminmax(x)
        # batch min/max (NaN check, window) + window state as Python numbers: plain .item() reads on CPU, one
        # stacked host sync elsewhere
        state = (mn, mx, self.bin_width, self.bin_offset, self.min_val, self.max_val)
        if x.device.type == "cpu":
            bmin, bmax, w, k0f, old_min, old_max = (t.item() for t in state)
        else:
            bmin, bmax, w, k0f, old_min, old_max = torch.stack([t.double() for t in state]).tolist()
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            if not self.ignore_nonfinite:
                raise self._nonfinite_error()
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return False
            bmin, bmax = (t.item() for t in torch.aminmax(x))
        self.min_val.fill_(min(bmin, old_min))  # float32 values: exact
        self.max_val.fill_(max(bmax, old_max))
        k0 = int(k0f)
        x = self._sample(x)
        lo, hi = min(bmin, old_min, 0.0), max(bmax, old_max, 0.0)  # everything seen, widened to 0
        if w == 0.0:
            if hi == lo:  # only exact zeros so far: no lattice yet, count them in bin 0
                self.hist[0] += x.numel()
                return True
            # first non-zero data: choose the lattice; earlier zeros go to the bin [0, w)
            w = (hi - lo) / (self.bins - 1)
            factor, k0 = self._place(lo, hi, w)
            w *= factor
            zeros_seen = self.hist[0].clone()
            self.hist.zero_()
            self.hist[min(max(-k0, 0), self.bins - 1)] += zeros_seen
        elif math.floor(lo / w) < k0 or math.ceil(hi / w) > k0 + self.bins:
            # grow: merge old bins by an integer factor (exact) and/or shift the window
            factor, new_k0 = self._place(lo, hi, w)
            self._rebin(k0, new_k0, factor)
            w, k0 = w * factor, new_k0
        self.bin_width.fill_(w)
        self.bin_offset.fill_(k0)
        self._count(x, w, k0)
        return True

    def _sample(self, x: Tensor) -> Tensor:
        """The elements of flat ``x`` that are counted (class docstring, *Sampling*): ``x`` itself or a
        2-D strided view of every ``step``-th block (no copy)."""
        n, cap, b = x.numel(), self.max_samples, self.SAMPLE_BLOCK
        if cap is None or n <= cap:
            return x
        nb = n // b
        step = -(-nb // (cap // b))
        phase = self._sampled_batches % step
        self.__dict__["_sampled_batches"] += 1  # a plain int: skip nn.Module.__setattr__ (per batch, per quantizer)
        if x.stride(0) != 1:
            x = x.contiguous()
        # blocks phase, phase + step, ... of x[: nb·b] viewed as [nb, b]: one strided view
        return x.as_strided(((nb - phase + step - 1) // step, b), (step * b, 1), x.storage_offset() + phase * b)

    def _count(self, x: Tensor, w: float, k0: int) -> None:
        """Add ``x``'s counts (flat, or the 2-D block view of :meth:`_sample`); bin of ``v`` = ``floor(v / w) - k0``,
        top edge inclusive."""
        bins = self.bins
        inv = 1.0 / w
        if x.device.type != "cpu":
            # fixed-size scatter: no host sync (bincount would sync for its output size)
            y = torch.mul(x, inv).add_(float(-k0)).clamp_(0, bins - 1).to(torch.int64).reshape(-1)
            self.hist.scatter_add_(0, y, torch.ones_like(y))
            return
        # Positions are shifted by one and clamped to [1, bins]: valid data lands in [1, bins + 1] (+ float
        # rounding, far less than one bin), truncation then equals floor, the top edge (bins + 1) joins the last
        # bin and a value rounded below the window's first edge joins the first.
        for c in x.split(self.CHUNK if x.dim() == 1 else max(1, self.CHUNK // x.shape[1])):
            pos = torch.mul(c, inv).add_(float(1 - k0)).clamp_(1.0, float(bins)).to(torch.int32)
            self.hist += torch.bincount(pos.view(-1), minlength=bins + 1)[1:]

    # ------------------------------------------------------------------ ranges
    def _compute_range(self) -> tuple[Tensor, Tensor]:
        mn, mx = self.min_val, self.max_val
        if self.method == "minmax" or float(self.bin_width) == 0.0:
            return mn.clone(), mx.clone()
        h, e = self.histogram()
        spec = self.spec
        if self.method == "percentile":
            lo, hi = cal.percentile_range(h, e, self.percentile, spec.symmetric)
        elif self.method == "entropy":
            lo, hi = cal.entropy_range(h, e, spec.bits, spec.symmetric, max_clip_fraction=self.max_clip_fraction)
        else:
            lo, hi = cal.mse_range(h, e, spec.qmin, spec.qmax, spec.symmetric, num_candidates=self.num_candidates)
        lo, hi = lo.to(mn.device), hi.to(mn.device)
        if spec.symmetric:
            t = torch.minimum(hi.abs().maximum(lo.abs()), torch.maximum(mn.abs(), mx.abs()))
            return -t, t
        # never beyond what was actually seen (the histogram is exact only to a bin)
        return torch.maximum(lo, torch.clamp(mn, max=0.0)), torch.minimum(hi, torch.clamp(mx, min=0.0))

    def _observed_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method}, bins={self.bins}, max_samples={self.max_samples}"

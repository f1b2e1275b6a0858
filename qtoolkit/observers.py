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

import math
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit import calibrators as cal
from qtoolkit.config import QuantizerConfig
from qtoolkit.numerics import compute_qparams
from qtoolkit.spec import QuantSpec

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


class ObserverBase(nn.Module):
    """Base class of all observers (see the module docstring for the contract).

    Args:
        spec: the integer grid the range is for.
        ignore_nonfinite: drop NaN/Inf values instead of raising ``ValueError``.

    Attributes:
        name: site name used in error messages (set by the owning model, e.g.
            ``'layer1.0.conv1.input_quantizer'``).
        calibrator: the range-selection method (class attribute).

    Buffers: ``seen`` (has data), ``finalized`` (``clip_lo``/``clip_hi`` hold the
    cached range), ``clip_lo``, ``clip_hi``; subclasses add their statistics.

    Example::

        >>> from qtoolkit.spec import QuantSpec
        >>> obs = MinMaxObserver(QuantSpec(8))
        >>> obs.name = "stem.input_quantizer"
        >>> try:
        ...     obs.calculate_qparams()
        ... except RuntimeError as e:
        ...     print(str(e).split(":")[0])
        stem.input_quantizer
    """

    calibrator: str = "base"
    #: buffers whose shape is only known after the first batch (resized on load)
    _resizable: tuple[str, ...] = ("clip_lo", "clip_hi")

    def __init__(self, spec: QuantSpec, *, ignore_nonfinite: bool = False) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"observer spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.ignore_nonfinite = bool(ignore_nonfinite)
        self.name = "observer"
        self.register_buffer("seen", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("finalized", torch.tensor(0, dtype=torch.uint8))
        shape: tuple[int, ...] = () if spec.axis is None else (0,)
        self.register_buffer("clip_lo", torch.zeros(shape))
        self.register_buffer("clip_hi", torch.zeros(shape))

    # ------------------------------------------------------------------ public API
    @property
    def has_data(self) -> bool:
        """True once a batch with (finite) data has been observed."""
        return bool(self.seen)

    @property
    def is_finalized(self) -> bool:
        """True when the clip range is cached (``finalize()`` after the last batch)."""
        return bool(self.finalized)

    def forward(self, x: Tensor) -> Tensor:
        """Record statistics of ``x`` and return ``x`` unchanged."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: observers take a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: observers expect a floating-point tensor (float32/bfloat16/float16), got {x.dtype}"
            )
        if x.numel() == 0:
            return x
        with torch.no_grad():
            xf = x.detach()
            if xf.dtype != torch.float32:
                xf = xf.float()
            if self._observe(xf):
                self.seen.fill_(1)
                self.finalized.fill_(0)
        return x

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """The chosen clip range ``(lo, hi)`` (cached after :meth:`finalize`)."""
        self._require_data()
        if bool(self.finalized):
            return self.clip_lo, self.clip_hi
        return self._compute_range()

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for the chosen range (float32, int32)."""
        lo, hi = self.compute_range()
        return compute_qparams(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)

    @torch.no_grad()
    def finalize(self) -> None:
        """Compute the clip range once and cache it in ``clip_lo``/``clip_hi``."""
        self._require_data()
        lo, hi = self._compute_range()
        self.clip_lo = lo.detach().to(torch.float32).clone()
        self.clip_hi = hi.detach().to(torch.float32).clone()
        self.finalized.fill_(1)

    def observed_range(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of the data seen (to report how much a calibrator clips)."""
        self._require_data()
        return self._observed_range()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all statistics (the observer is as new)."""
        self.seen.fill_(0)
        self.finalized.fill_(0)
        shape: tuple[int, ...] = () if self.spec.axis is None else (0,)
        self.clip_lo = torch.zeros(shape, device=self.seen.device)
        self.clip_hi = torch.zeros(shape, device=self.seen.device)
        self._reset_stats()

    def extra_repr(self) -> str:
        return f"spec={self.spec.describe()}, calibrator={self.calibrator}, name={self.name!r}"

    # ------------------------------------------------------------------ subclass hooks
    def _observe(self, x: Tensor) -> bool:  # pragma: no cover - abstract
        """Update statistics with a float32 batch; return False if nothing was recorded."""
        raise NotImplementedError

    def _compute_range(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _observed_range(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset_stats(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _require_data(self) -> None:
        if not bool(self.seen):
            raise RuntimeError(
                f"{self.name}: {type(self).__name__} (calibrator {self.calibrator!r}) has not observed any data; "
                "run calibration first (feed representative batches through the prepared model with observers "
                "enabled, e.g. qtoolkit.calibrate(model, batches))"
            )

    def _nonfinite_error(self) -> ValueError:
        return ValueError(
            f"{self.name}: input to {type(self).__name__} contains NaN or Inf; fix the tensor's producer or "
            "construct the observer with ignore_nonfinite=True to drop non-finite values"
        )

    def _channels(self, x: Tensor) -> Tensor:
        """``x`` as ``[C, K]`` with ``C`` along ``spec.axis``."""
        axis = self.spec.axis
        assert axis is not None
        if not -x.dim() <= axis < x.dim():
            raise ValueError(
                f"{self.name}: per-channel axis={axis} is out of range for an input of shape {tuple(x.shape)} "
                f"(valid axes: {-x.dim()}..{x.dim() - 1})"
            )
        if axis == 0 or axis == -x.dim():
            return x.reshape(x.shape[0], -1)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _batch_minmax(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per-tensor (0-d) or per-channel ([C]) min/max of a batch, with the
        non-finite policy applied; ``None`` if the batch has no finite value."""
        if self.spec.axis is None:
            mn, mx = torch.aminmax(x)
            if all(map(math.isfinite, torch.stack([mn, mx]).tolist())):  # one host sync
                return mn, mx
            if not self.ignore_nonfinite:
                raise self._nonfinite_error()
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return None
            return torch.aminmax(x)
        x2 = self._channels(x)
        if x2.shape[1] == 0:
            return None
        mn, mx = torch.aminmax(x2, dim=1)
        if bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            return mn, mx
        if not self.ignore_nonfinite:
            raise self._nonfinite_error()
        fin = torch.isfinite(x2)
        if not bool(fin.any()):
            return None
        inf = torch.full((), float("inf"), device=x2.device)
        # channels without a finite value give (inf, -inf): they leave the running stats alone
        return torch.where(fin, x2, inf).amin(1), torch.where(fin, x2, -inf).amax(1)

    def _check_channels(self, current: Tensor, new: Tensor) -> None:
        if current.numel() != 0 and current.shape != new.shape:
            raise ValueError(
                f"{self.name}: per-channel observer along axis {self.spec.axis} saw {current.numel()} channels "
                f"before and {new.numel()} now; call reset() to observe a tensor of another size"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # Per-channel statistics are created lazily (their size is unknown until the
        # first batch): resize the buffers to the saved shapes before loading.
        for name in self._resizable:
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict and cur is not None and cur.shape != state_dict[key].shape:
                self._buffers[name] = torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _clean_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Channels that never saw a finite value (``inf``/``-inf``) become ``(0, 0)``."""
    ok = torch.isfinite(lo) & torch.isfinite(hi)
    if bool(ok.all()):
        return lo, hi
    return torch.where(ok, lo, torch.zeros_like(lo)), torch.where(ok, hi, torch.zeros_like(hi))


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

    Cost: every element is counted, so a batch costs roughly one ``aminmax`` plus
    one scatter-increment per element; on 2 CPU cores a 64×64×32×32 batch takes
    ~4.5 ms vs ~0.5 ms for :class:`MinMaxObserver` (``bincount`` alone is ~2.6 ms),
    about a third of torch.ao's ``HistogramObserver``; see ``scripts/bench_core.py``.

    Args:
        spec: per-tensor grid (``spec.axis`` must be None).
        method: ``"entropy"`` (TensorRT KL), ``"percentile"``, ``"mse"`` or
            ``"minmax"`` (exact observed min/max).
        bins: number of bins (>= 16).
        percentile: for ``method="percentile"`` (see
            :func:`qtoolkit.calibrators.percentile_range` for the convention).
        num_candidates: for ``method="mse"``.

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

    def __init__(
        self,
        spec: QuantSpec,
        method: str = "entropy",
        bins: int = 2048,
        percentile: float = 99.99,
        *,
        num_candidates: int = 200,
        max_clip_fraction: float = 0.05,
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
        # the one host sync per batch: batch min/max (NaN check, window) + window state
        stats = torch.stack([mn.double(), mx.double(), self.bin_width, self.bin_offset.double(),
                             self.min_val.double(), self.max_val.double()]).tolist()
        bmin, bmax, w, k0f, old_min, old_max = stats
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            if not self.ignore_nonfinite:
                raise self._nonfinite_error()
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return False
            mn, mx = torch.aminmax(x)
            bmin, bmax = torch.stack([mn.double(), mx.double()]).tolist()
        self.min_val.copy_(torch.minimum(self.min_val, mn))
        self.max_val.copy_(torch.maximum(self.max_val, mx))
        k0 = int(k0f)
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

    def _count(self, x: Tensor, w: float, k0: int) -> None:
        """Add ``x``'s counts; bin of ``v`` = ``floor(v / w) - k0``, top edge inclusive."""
        bins = self.bins
        inv = 1.0 / w
        if x.device.type != "cpu":
            # fixed-size scatter: no host sync (bincount would sync for its output size)
            y = torch.mul(x, inv).add_(float(-k0)).clamp_(0, bins - 1).to(torch.int64)
            self.hist.scatter_add_(0, y, torch.ones_like(y))
            return
        # Positions are shifted by one: valid data lands in [1, bins + 1] (+ float
        # rounding, far less than one bin), so they are never negative, truncation
        # equals floor and no clamp pass is needed; the guard bins are folded back.
        shift = torch.tensor(float(1 - k0))
        counts = torch.zeros(bins + 3, dtype=torch.int64)
        for c in x.split(self.CHUNK):
            bc = torch.bincount(torch.add(shift, c, alpha=inv).to(torch.int32), minlength=bins + 3)
            if bc.numel() > bins + 3:  # pragma: no cover - cannot happen for data inside the window
                bc = torch.cat([bc[: bins + 2], bc[bins + 2 :].sum().reshape(1)])
            counts += bc
        self.hist += counts[1 : bins + 1]
        self.hist[0] += counts[0]
        self.hist[bins - 1] += counts[bins + 1 :].sum()  # the top edge belongs to the last bin

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
        return super().extra_repr() + f", method={self.method}, bins={self.bins}"


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

    Uses :func:`qtoolkit.calibrators.percentile_range_tensor` (symmetric → p-th
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
    fake-quantization MSE (:func:`qtoolkit.calibrators.mse_range_tensor`).

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


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------

_COMMON_OPTIONS = {"ignore_nonfinite"}
_OPTIONS: dict[tuple[str, bool], set[str]] = {
    # (calibrator, per_channel) -> accepted options
    ("minmax", False): set(),
    ("minmax", True): set(),
    ("ema", False): {"momentum"},
    ("ema", True): {"momentum"},
    ("percentile", False): {"percentile", "bins"},
    ("percentile", True): {"percentile"},
    ("entropy", False): {"bins", "max_clip_fraction"},
    ("mse", False): {"bins", "num_candidates"},
    ("mse", True): {"num_candidates"},
}


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

    ``cfg.options`` are passed on (``momentum``, ``percentile``, ``bins``,
    ``num_candidates``, ``ignore_nonfinite``); options the chosen observer does
    not take raise ``TypeError`` naming them.

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
    key = (calib, per_channel)
    if key not in _OPTIONS:
        if calib == "entropy" and per_channel:
            raise ValueError(
                f"calibrator 'entropy' is not supported for per-channel quantization (spec {spec.describe()}); "
                "use 'mse' or 'percentile' for per-channel weights"
            )
        raise ValueError(f"unknown calibrator {calib!r}")
    unknown = sorted(set(opts) - _OPTIONS[key] - _COMMON_OPTIONS)
    if unknown:
        allowed = sorted(_OPTIONS[key] | _COMMON_OPTIONS)
        gran = "per-channel" if per_channel else "per-tensor"
        raise TypeError(f"unknown option(s) {unknown} for calibrator {calib!r} ({gran}); accepted: {allowed}")
    if calib == "minmax":
        return PerChannelMinMaxObserver(spec, **opts) if per_channel else MinMaxObserver(spec, **opts)
    if calib == "ema":
        return MovingAverageMinMaxObserver(spec, **opts)
    if per_channel:
        if calib == "percentile":
            return PerChannelPercentileObserver(spec, **opts)
        return PerChannelMSEObserver(spec, **opts)
    return HistogramObserver(spec, method=calib, **opts)

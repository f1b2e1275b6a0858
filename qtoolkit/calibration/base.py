"""The base class of all observers, :class:`ObserverBase`.

It implements the contract described in :mod:`qtoolkit.calibration` (record in
``forward``, ``compute_range``, ``calculate_qparams``, ``finalize``, buffers that
round-trip through ``state_dict``) and the shared helpers (non-finite policy,
per-channel layout, batch min/max); subclasses provide the statistics and the
range: :mod:`qtoolkit.calibration.minmax`, :mod:`qtoolkit.calibration.histogram`,
:mod:`qtoolkit.calibration.per_channel`. Import them from :mod:`qtoolkit.calibration`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qtoolkit.numerics import compute_qparams
from qtoolkit.spec import QuantSpec

__all__ = ["ObserverBase"]


class ObserverBase(nn.Module):
    """Base class of all observers (see :mod:`qtoolkit.calibration` for the contract).

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

        >>> from qtoolkit.calibration import MinMaxObserver
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

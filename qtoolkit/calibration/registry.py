"""The calibrator registry: one :class:`CalibratorEntry` per range calibrator.

An entry says which observer a :class:`~qtoolkit.config.QuantizerConfig` with
that calibrator gets (per-tensor and per-channel, ``None`` where unsupported),
which options (``cfg.options``) it accepts and whether its range comes from an
expensive search computed once (``uses_histogram``). Everything else derives
from it: :func:`qtoolkit.calibration.make_observer`, ``qtoolkit.config.CALIBRATORS``
and the validation of ``QuantizerConfig.calibrator``, and
``FakeQuantize.uses_histogram``.

Built-in calibrators: ``minmax``, ``ema``, ``percentile``, ``entropy``, ``mse``
(see :func:`qtoolkit.calibration.make_observer` for the observers they map to).

Layering: this module imports the observer classes and nothing above them
(:mod:`qtoolkit.config` imports it; :mod:`qtoolkit.calibration`, which holds
``make_observer``, sits above ``config``).

Adding a calibrator is one :func:`register_calibrator` call plus its observer
(here a per-tensor "absmax" range ``(-t, t)``, ``t = max |x|``, built on
:class:`~qtoolkit.calibration.MinMaxObserver`'s statistics):

Example::

    >>> import torch
    >>> import qtoolkit as qt
    >>> from qtoolkit.calibration import MinMaxObserver
    >>> class AbsMaxObserver(MinMaxObserver):
    ...     calibrator = "absmax-doc"
    ...     def _compute_range(self):
    ...         t = torch.maximum(self.min_val.abs(), self.max_val.abs())
    ...         return -t, t
    >>> entry = register_calibrator("absmax-doc", per_tensor=AbsMaxObserver)
    >>> "absmax-doc" in qt.config.CALIBRATORS
    True
    >>> qc = qt.get_qconfig("w8a8").with_activation_calibrator("absmax-doc")
    >>> qm = qt.prepare(torch.nn.Sequential(torch.nn.Linear(3, 2)), qc)
    >>> qm = qt.calibrate(qm, [torch.tensor([[-4.0, 1.0, 2.0]])], progress=False)
    >>> [float(v) for v in qm[0].input_quantizer.observer.compute_range()]
    [-4.0, 4.0]
    >>> _ = unregister_calibrator("absmax-doc")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from qtoolkit.calibration.base import ObserverBase
from qtoolkit.calibration.histogram import HistogramObserver
from qtoolkit.calibration.minmax import MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from qtoolkit.calibration.per_channel import PerChannelMSEObserver, PerChannelPercentileObserver

__all__ = [
    "COMMON_OPTIONS",
    "CalibratorEntry",
    "ObserverFactory",
    "calibrator_names",
    "get_calibrator",
    "register_calibrator",
    "unregister_calibrator",
]

#: ``factory(spec, **options) -> observer``: an observer class or any callable.
ObserverFactory = Callable[..., ObserverBase]

#: options every observer takes (:class:`~qtoolkit.calibration.base.ObserverBase`).
COMMON_OPTIONS: frozenset[str] = frozenset({"ignore_nonfinite"})


@dataclass(frozen=True)
class CalibratorEntry:
    """One registered calibrator (made by :func:`register_calibrator`).

    Attributes:
        name: the calibrator's name (``QuantizerConfig.calibrator``).
        per_tensor: observer factory for per-tensor specs (``spec.axis is None``),
            called as ``per_tensor(spec, **cfg.options)``; ``None`` if unsupported.
        per_channel: the same for per-channel specs; ``None`` if unsupported.
        per_tensor_options / per_channel_options: the options each factory
            accepts, besides :data:`COMMON_OPTIONS`.
        uses_histogram: the range comes from an expensive search (histogram,
            per-channel search) computed once at the end of calibration, not
            refreshed on every batch.
        unsupported_hint: appended to the error for an unsupported granularity
            (e.g. which calibrator to use instead).

    Example::

        >>> e = get_calibrator("entropy")
        >>> e.per_channel is None, e.uses_histogram, sorted(e.options(per_channel=False))
        (True, True, ['bins', 'ignore_nonfinite', 'max_clip_fraction', 'max_samples'])
    """

    name: str
    per_tensor: Optional[ObserverFactory]
    per_channel: Optional[ObserverFactory]
    per_tensor_options: frozenset[str] = frozenset()
    per_channel_options: frozenset[str] = frozenset()
    uses_histogram: bool = False
    unsupported_hint: str = ""

    def factory(self, per_channel: bool) -> Optional[ObserverFactory]:
        """The observer factory for a per-channel or per-tensor spec (``None``: unsupported)."""
        return self.per_channel if per_channel else self.per_tensor

    def options(self, per_channel: bool) -> frozenset[str]:
        """All options accepted for that granularity (:data:`COMMON_OPTIONS` included)."""
        return (self.per_channel_options if per_channel else self.per_tensor_options) | COMMON_OPTIONS


_REGISTRY: dict[str, CalibratorEntry] = {}


def _option_set(options: Iterable[str], what: str) -> frozenset[str]:
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise TypeError(f"register_calibrator: {what} must be an iterable of option names, got {options!r}")
    return frozenset(options)


def register_calibrator(
    name: str,
    *,
    per_tensor: Optional[ObserverFactory] = None,
    per_channel: Optional[ObserverFactory] = None,
    options: Iterable[str] = (),
    per_channel_options: Optional[Iterable[str]] = None,
    uses_histogram: bool = False,
    unsupported_hint: str = "",
) -> CalibratorEntry:
    """Register a calibrator; ``QuantizerConfig(spec, name, options)`` then works.

    Args:
        name: a new calibrator name (registering a name twice is refused:
            :func:`unregister_calibrator` it first).
        per_tensor / per_channel: observer factories (an
            :class:`~qtoolkit.calibration.base.ObserverBase` subclass, or any
            ``factory(spec, **options)``); at least one, ``None`` where unsupported.
        options: the options the factories accept (``cfg.options`` keys) besides
            :data:`COMMON_OPTIONS`; others raise ``TypeError`` in ``make_observer``.
        per_channel_options: the per-channel factory's options, if they differ
            from ``options``.
        uses_histogram: see :attr:`CalibratorEntry.uses_histogram`.
        unsupported_hint: appended to the error for an unsupported granularity.

    Returns the new :class:`CalibratorEntry`. See the module docstring for an example.

    Example::

        >>> register_calibrator("minmax", per_tensor=MinMaxObserver)
        Traceback (most recent call last):
            ...
        ValueError: calibrator 'minmax' is already registered; call unregister_calibrator('minmax') first to replace it
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_calibrator: name must be a non-empty str, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"calibrator {name!r} is already registered; call unregister_calibrator({name!r}) first to replace it"
        )
    if per_tensor is None and per_channel is None:
        raise ValueError(f"register_calibrator({name!r}): give a per_tensor and/or a per_channel observer factory")
    for what, f in (("per_tensor", per_tensor), ("per_channel", per_channel)):
        if f is not None and not callable(f):
            raise TypeError(f"register_calibrator({name!r}): {what} must be callable (an observer class), got {f!r}")
    opts = _option_set(options, "options")
    entry = CalibratorEntry(
        name=name,
        per_tensor=per_tensor,
        per_channel=per_channel,
        per_tensor_options=opts if per_tensor is not None else frozenset(),
        per_channel_options=(
            frozenset() if per_channel is None
            else opts if per_channel_options is None
            else _option_set(per_channel_options, "per_channel_options")
        ),
        uses_histogram=bool(uses_histogram),
        unsupported_hint=str(unsupported_hint),
    )
    _REGISTRY[name] = entry
    return entry


def unregister_calibrator(name: str) -> CalibratorEntry:
    """Remove a registered calibrator and return its entry (built-ins cannot be removed).

    Example::

        >>> unregister_calibrator("entropy")
        Traceback (most recent call last):
            ...
        ValueError: calibrator 'entropy' is built in and cannot be unregistered
    """
    entry = get_calibrator(name)
    if name in _BUILTINS:
        raise ValueError(f"calibrator {name!r} is built in and cannot be unregistered")
    return _REGISTRY.pop(entry.name)


def get_calibrator(name: str) -> CalibratorEntry:
    """The entry of a registered calibrator (``ValueError`` naming the known ones otherwise).

    Example::

        >>> get_calibrator("mse").per_channel.__name__
        'PerChannelMSEObserver'
        >>> get_calibrator("kl")
        Traceback (most recent call last):
            ...
        ValueError: unknown calibrator 'kl'; registered calibrators: ('minmax', 'ema', 'percentile', 'entropy', 'mse')
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown calibrator {name!r}; registered calibrators: {calibrator_names()}") from None


def calibrator_names() -> tuple[str, ...]:
    """Names of the registered calibrators, in registration order (built-ins first).

    Example::

        >>> calibrator_names()[:5]
        ('minmax', 'ema', 'percentile', 'entropy', 'mse')
    """
    return tuple(_REGISTRY)


# --------------------------------------------------------------------------------------
# built-in calibrators
# --------------------------------------------------------------------------------------

register_calibrator("minmax", per_tensor=MinMaxObserver, per_channel=PerChannelMinMaxObserver)
register_calibrator(
    "ema", per_tensor=MovingAverageMinMaxObserver, per_channel=MovingAverageMinMaxObserver, options={"momentum"}
)
register_calibrator(
    "percentile",
    per_tensor=partial(HistogramObserver, method="percentile"),
    per_channel=PerChannelPercentileObserver,
    options={"percentile", "bins", "max_samples"},
    per_channel_options={"percentile"},
    uses_histogram=True,
)
register_calibrator(
    "entropy",
    per_tensor=partial(HistogramObserver, method="entropy"),
    options={"bins", "max_clip_fraction", "max_samples"},
    uses_histogram=True,
    unsupported_hint="use 'mse' or 'percentile' for per-channel weights",
)
register_calibrator(
    "mse",
    per_tensor=partial(HistogramObserver, method="mse"),
    per_channel=PerChannelMSEObserver,
    options={"bins", "num_candidates", "max_samples"},
    per_channel_options={"num_candidates"},
    uses_histogram=True,
)

_BUILTINS: frozenset[str] = frozenset(_REGISTRY)

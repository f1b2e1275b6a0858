"""Declarative quantization configs and named presets.

A :class:`QuantizerConfig` is one quantizer: its integer grid (:class:`QuantSpec`),
the calibrator that picks its range and whether its scale is learned (LSQ).
A :class:`QConfig` pairs a weight and an activation quantizer with an execution
mode (``static``, ``dynamic``, ``weight_only``).

Example::

    >>> from qtoolkit.config import get_qconfig
    >>> qc = get_qconfig("w4a8")
    >>> qc.weight.spec.bits, qc.activation.spec.bits
    (4, 8)

``PRESETS`` maps each preset name to its :class:`QConfig`::

    >>> from qtoolkit.config import PRESETS
    >>> "w8a8" in PRESETS and PRESETS["w8a8"].weight.spec.bits
    8
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from qtoolkit.calibrator_registry import calibrator_names
from qtoolkit.spec import QuantSpec

Mode = Literal["static", "dynamic", "weight_only"]

MODES: tuple[str, ...] = ("static", "dynamic", "weight_only")

if TYPE_CHECKING:
    #: names of the registered calibrators (built-ins first), read from the registry
    CALIBRATORS: tuple[str, ...]


def __getattr__(name: str) -> Any:
    # ``CALIBRATORS`` is computed on access, so it includes calibrators registered
    # later with qtoolkit.calibrator_registry.register_calibrator
    if name == "CALIBRATORS":
        return calibrator_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer: grid + range calibrator (+ LSQ).

    Args:
        spec: the integer grid.
        calibrator: ``"minmax"`` (running min/max), ``"ema"`` (moving-average
            min/max, for QAT), ``"percentile"``, ``"entropy"`` (KL, TensorRT-style)
            or ``"mse"``. Histogram-based for activations, direct on the tensor
            for per-channel weights.
        options: calibrator options, e.g. ``{"percentile": 99.99}``,
            ``{"momentum": 0.01}``, ``{"bins": 2048}``.
        learnable: learn the scale with LSQ during QAT (Esser et al. 2020).

    Example::

        >>> QuantizerConfig(QuantSpec(bits=8, signed=False, symmetric=False), "percentile",
        ...                 {"percentile": 99.99}).calibrator
        'percentile'
    """

    spec: QuantSpec
    calibrator: str = "minmax"
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    learnable: bool = False

    def __post_init__(self) -> None:
        names = calibrator_names()
        if self.calibrator not in names:
            raise ValueError(f"QuantizerConfig.calibrator must be one of {names}, got {self.calibrator!r}")

    def with_calibrator(self, calibrator: str, **options: Any) -> QuantizerConfig:
        """A copy with another calibrator (and its options)."""
        return replace(self, calibrator=calibrator, options=dict(options))

    def with_bits(self, bits: int) -> QuantizerConfig:
        """A copy with another bit width (same signedness/symmetry/granularity)."""
        return replace(self, spec=replace(self.spec, bits=bits))


@dataclass(frozen=True)
class QConfig:
    """Weight + activation quantizers and the execution mode of a layer.

    ``mode``:

    * ``"static"``: activations get a calibrated range (PTQ/QAT); int8 in and out.
    * ``"dynamic"``: activation ranges are computed per batch at run time
      (``activation`` describes the grid; its calibrator is ignored).
    * ``"weight_only"``: only weights are quantized; ``activation`` must be None.

    Example::

        >>> qc = get_qconfig("w8a8")
        >>> qc.mode, qc.weight.spec.describe(), qc.activation.spec.describe()
        ('static', 'int8-sym-narrow/ch0', 'uint8-asym/tensor')
    """

    weight: QuantizerConfig | None
    activation: QuantizerConfig | None
    mode: str = "static"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"QConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "weight_only" and self.activation is not None:
            raise ValueError("QConfig(mode='weight_only') must have activation=None")
        if self.mode != "weight_only" and self.activation is None:
            raise ValueError(f"QConfig(mode={self.mode!r}) needs an activation quantizer")
        if self.weight is None:
            raise ValueError("QConfig.weight must be set (weights are always quantized)")

    def with_activation_calibrator(self, calibrator: str, **options: Any) -> QConfig:
        """A copy whose activation quantizer uses another calibrator."""
        if self.activation is None:
            raise ValueError("this QConfig has no activation quantizer")
        return replace(self, activation=self.activation.with_calibrator(calibrator, **options))

    def with_weight_calibrator(self, calibrator: str, **options: Any) -> QConfig:
        """A copy whose weight quantizer uses another calibrator."""
        assert self.weight is not None
        return replace(self, weight=self.weight.with_calibrator(calibrator, **options))

    def with_bits(self, weight_bits: int | None = None, activation_bits: int | None = None) -> QConfig:
        """A copy with other bit widths."""
        w, a = self.weight, self.activation
        if weight_bits is not None and w is not None:
            w = w.with_bits(weight_bits)
        if activation_bits is not None and a is not None:
            a = a.with_bits(activation_bits)
        return replace(self, weight=w, activation=a)


def int_weight_per_channel(bits: int, calibrator: str = "minmax", **options: Any) -> QuantizerConfig:
    """Signed symmetric narrow-range per-output-channel weights (axis 0)."""
    return QuantizerConfig(QuantSpec(bits, signed=True, symmetric=True, narrow_range=True, axis=0), calibrator, options)


def uint_activation_per_tensor(bits: int, calibrator: str = "minmax", **options: Any) -> QuantizerConfig:
    """Unsigned asymmetric per-tensor activations (zero point chosen so real 0 is exact)."""
    return QuantizerConfig(QuantSpec(bits, signed=False, symmetric=False, axis=None), calibrator, options)


#: Brevitas-style names: bits, role and granularity.
Int8WeightPerChannel = int_weight_per_channel(8)
Int4WeightPerChannel = int_weight_per_channel(4)
Uint8ActPerTensor = uint_activation_per_tensor(8)
Uint4ActPerTensor = uint_activation_per_tensor(4)

PRESETS: dict[str, QConfig] = {
    "w8a8": QConfig(Int8WeightPerChannel, Uint8ActPerTensor, "static"),
    # 7-bit unsigned activations ([0, 127], torch.ao's x86 "reduce_range"): the int8 fast path is exact
    # on every x86 CPU, including those without VNNI (see qtoolkit.kernels.onednn on int16 saturation)
    "w8a8-x86": QConfig(Int8WeightPerChannel, uint_activation_per_tensor(7), "static"),
    "w4a8": QConfig(Int4WeightPerChannel, Uint8ActPerTensor, "static"),
    "w4a4": QConfig(Int4WeightPerChannel, Uint4ActPerTensor, "static"),
    "w8a8-dynamic": QConfig(Int8WeightPerChannel, Uint8ActPerTensor, "dynamic"),
    "w8-weight-only": QConfig(Int8WeightPerChannel, None, "weight_only"),
    "w4-weight-only": QConfig(Int4WeightPerChannel, None, "weight_only"),
}


def get_qconfig(qconfig: str | QConfig) -> QConfig:
    """A :class:`QConfig` from a preset name (or the config itself).

    Presets: ``w8a8`` (int8 per-channel symmetric weights, uint8 asymmetric
    per-tensor activations), ``w8a8-x86`` (same with 7-bit activations ``[0, 127]``:
    exact int8 kernels on x86 CPUs without VNNI), ``w4a8``, ``w4a4``, ``w8a8-dynamic``,
    ``w8-weight-only``, ``w4-weight-only``.

    Example::

        >>> get_qconfig("w8a8-dynamic").mode
        'dynamic'
    """
    if isinstance(qconfig, QConfig):
        return qconfig
    if isinstance(qconfig, str):
        try:
            return PRESETS[qconfig]
        except KeyError:
            raise ValueError(f"unknown qconfig preset {qconfig!r}; choose one of {sorted(PRESETS)}") from None
    raise TypeError(f"qconfig must be a preset name or a QConfig, got {type(qconfig).__name__}")

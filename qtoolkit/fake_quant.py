"""``FakeQuantize``: a quantizer module = spec + observer/calibrator + enable flags.

It follows torch.ao's contract: the observer records ranges, ``calculate_qparams``
turns them into scale / zero point, and two flags kept as *buffers*
(``observer_enabled``, ``fake_quant_enabled``) switch observing and Q/DQ on and off,
so the state travels with ``state_dict`` and across devices.

Example::

    >>> import torch
    >>> from qtoolkit.config import Uint8ActPerTensor
    >>> fq = FakeQuantize(Uint8ActPerTensor)
    >>> _ = fq(torch.randn(4, 8))             # observes and fake-quantizes
    >>> _ = fq.disable_observer()             # freeze the range
    >>> y = fq(torch.randn(4, 8))
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from qtoolkit.calibrator_registry import get_calibrator
from qtoolkit.config import QuantizerConfig
from qtoolkit.numerics import compute_qparams, fake_quantize, fake_quantize_lsq, fake_quantize_trusted
from qtoolkit.observers import ObserverBase, make_observer

__all__ = ["FakeQuantize"]


class FakeQuantize(nn.Module):
    """Fake quantizer (quantize → dequantize in float) with an observer.

    Args:
        config: the quantizer's grid, calibrator and LSQ flag.
        role: ``"weight"`` (the observer sees only the *current* tensor each time,
            as weights change during QAT), ``"activation"`` (observer accumulates
            over batches), ``"dynamic"`` (qparams from each batch's own min/max, no
            state) or ``"output"`` (observe only: records the range an integer
            engine requantizes to; never fake-quantizes).
        channels: number of channels for per-channel specs, when known up front
            (weights), so ``scale``/``zero_point`` have their final shape.

    Buffers ``scale`` / ``zero_point`` hold the current qparams; ``calibrated``
    says whether they came from data. With ``config.learnable`` the scale is an
    ``nn.Parameter`` trained with LSQ once the observer is disabled.

    Example::

        >>> from qtoolkit.config import Int8WeightPerChannel
        >>> w = torch.randn(16, 3, 3, 3)
        >>> fq = FakeQuantize(Int8WeightPerChannel, role="weight", channels=16)
        >>> (fq(w) - w).abs().max() <= fq.scale.max() / 2 + 1e-6
        tensor(True)
    """

    ROLES = ("weight", "activation", "dynamic", "output")

    def __init__(self, config: QuantizerConfig, role: str = "activation", channels: int | None = None) -> None:
        super().__init__()
        if role not in self.ROLES:
            raise ValueError(f"FakeQuantize role must be one of {self.ROLES}, got {role!r}")
        self.config = config
        self.spec = config.spec
        self.role = role
        self.name = "fake_quant"
        self.qmin, self.qmax = self.spec.qmin, self.spec.qmax
        self.observer: ObserverBase = make_observer(config)
        shape: tuple[int, ...] = () if self.spec.axis is None else ((channels,) if channels else (0,))
        init_scale = torch.ones(shape)
        if config.learnable:
            self.scale = nn.Parameter(init_scale)
        else:
            self.register_buffer("scale", init_scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(0 if role == "output" else 1, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        #: set by :func:`qtoolkit.calibrate` while it feeds batches: statistics only,
        #: the qparams are computed once at the end (not state: never saved)
        self.collect_only = False

    # ---------------------------------------------------------------- naming
    def set_name(self, name: str) -> None:
        """Name used in error messages (set by ``prepare`` to the qualified name)."""
        self.name = name
        self.observer.name = name

    # --------------------------------------------------------------- toggles
    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self.observer_enabled.fill_(int(enabled))
        return self

    def disable_observer(self) -> FakeQuantize:
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        if self.role == "output":
            enabled = False
        self.fake_quant_enabled.fill_(int(enabled))
        return self

    def disable_fake_quant(self) -> FakeQuantize:
        return self.enable_fake_quant(False)

    def make_learnable(self) -> FakeQuantize:
        """Train the current scale with LSQ from here on (QAT from a calibrated or reconstructed state).

        The calibrated ``scale`` buffer becomes an ``nn.Parameter`` holding the same values (same
        ``state_dict`` key) and ``config.learnable`` is set; the observer should stay disabled, or
        it overwrites the learned value. Build the optimizer after this call.

        Example::

            >>> from qtoolkit.config import Uint8ActPerTensor
            >>> fq = FakeQuantize(Uint8ActPerTensor)
            >>> _ = fq(torch.randn(16)); _ = fq.disable_observer()
            >>> isinstance(fq.make_learnable().scale, nn.Parameter)
            True
        """
        if self.role not in ("weight", "activation"):
            raise ValueError(f"{self.name}: only weight and activation quantizers learn their scale, not {self.role!r} ones")
        if not self.is_calibrated:
            raise RuntimeError(f"{self.name}: no range to start LSQ from; run qtoolkit.calibrate(model, data) first")
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale  # the buffer
            self.scale = nn.Parameter(scale)
        if not self.config.learnable:
            self.config = replace(self.config, learnable=True)
        return self

    # --------------------------------------------------------------- qparams
    @property
    def is_calibrated(self) -> bool:
        return self.role == "dynamic" or bool(self.calibrated)

    @property
    def uses_histogram(self) -> bool:
        """True when the range comes from an expensive search (compute it once)."""
        return get_calibrator(self.config.calibrator).uses_histogram

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point from the observer (raises if it saw no data)."""
        return self.observer.calculate_qparams()

    @torch.no_grad()
    def _load_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        if self.scale.shape != scale.shape:
            if isinstance(self.scale, nn.Parameter):
                self.scale = nn.Parameter(scale.clone().to(self.scale.device))
            else:
                self.scale = scale.clone().to(self.scale.device)
            self.zero_point = zero_point.clone().to(self.zero_point.device)
        else:
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.calibrated.fill_(1)

    @torch.no_grad()
    def finalize(self) -> None:
        """Run the calibrator's range search once and freeze the result into the
        ``scale``/``zero_point`` buffers (called by :func:`qtoolkit.calibrate`)."""
        if self.role == "dynamic":
            return
        self.observer.finalize()
        self._load_qparams(*self.observer.calculate_qparams())

    # --------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{self.name}: expected a tensor, got a {type(x).__name__}; a batch's input that is a tuple of "
                "arguments is passed as model(*input) by qtoolkit.calibrate / QATTrainer"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: fake quantization expects a floating-point tensor, got {x.dtype}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.role == "dynamic":
            if not self.fake_quant_enabled:
                return x
            lo, hi = x.detach().aminmax()
            scale, zp = compute_qparams(lo, hi, self.qmin, self.qmax, self.spec.symmetric)
            return fake_quantize(x, scale, zp, self.qmin, self.qmax)
        if self.observer_enabled:
            if self.role == "weight":
                self.observer.reset()
            self.observer(x.detach())
            # weights: always current; activations: keep qparams current while fake
            # quant runs (QAT); observe-only output quantizers too, so that a model
            # trained in a hand-written QAT loop converts without a calibrate() call.
            live = bool(self.fake_quant_enabled) or self.role == "output"
            if (live and not self.uses_histogram and not self.collect_only) or self.role == "weight":
                self._load_qparams(*self.observer.calculate_qparams())
        if not self.fake_quant_enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(
                f"{self.name}: fake quantization is enabled but no range was computed; run "
                "qtoolkit.calibrate(model, data) first (or enable the observer)"
            )
        if self.config.learnable:
            return fake_quantize_lsq(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis)
        return fake_quantize_trusted(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis)

    # ------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # per-channel qparams may have been created before their size was known; any other shape is an error
        # (reported by load_state_dict with this quantizer's key; the buffers are left as they were)
        bad = self._bad_qparam_shapes(state_dict, prefix)
        if bad:
            error_msgs.extend(bad)
            return
        for key in ("scale", "zero_point"):
            full = prefix + key
            if full in state_dict:
                cur = getattr(self, key)
                new = state_dict[full]
                if cur.shape != new.shape:
                    if isinstance(cur, nn.Parameter):
                        setattr(self, key, nn.Parameter(torch.empty_like(new, device=cur.device)))
                    else:
                        setattr(self, key, torch.empty_like(new, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _bad_qparam_shapes(self, state_dict: dict, prefix: str) -> list[str]:
        """Messages for ``scale`` / ``zero_point`` entries whose shape this quantizer cannot take."""
        out = []
        shapes = {}
        for key in ("scale", "zero_point"):
            full = prefix + key
            new = state_dict.get(full)
            if new is None:
                continue
            if not isinstance(new, Tensor):
                out.append(f"{self.name} ({full}): expected a tensor, got a {type(new).__name__}")
                continue
            cur = getattr(self, key)
            shapes[key] = tuple(new.shape)
            if self.spec.axis is None:
                ok = new.numel() == 1 and new.dim() <= 1
                want = "a single value (shape ())"
            else:
                known = cur.dim() == 1 and cur.shape[0] > 0
                ok = new.dim() == 1 and new.shape[0] > 0 and (not known or new.shape == cur.shape)
                want = f"one value per channel (shape ({cur.shape[0]},))" if known else "a 1-D per-channel tensor"
            if not ok:
                out.append(
                    f"{self.name} ({full}): shape {tuple(new.shape)} does not fit this {self.spec.describe()} "
                    f"quantizer, which needs {want}; the state_dict comes from another model or qconfig"
                )
        if not out and len(shapes) == 2 and self.spec.axis is not None and shapes["scale"] != shapes["zero_point"]:
            out.append(f"{self.name} ({prefix}scale / zero_point): shapes {shapes['scale']} and {shapes['zero_point']} differ")
        return out

    def extra_repr(self) -> str:
        return (
            f"role={self.role}, spec={self.spec.describe()}, calibrator={self.config.calibrator}, "
            f"learnable={self.config.learnable}, observer={int(self.observer_enabled)}, "
            f"fake_quant={int(self.fake_quant_enabled)}"
        )

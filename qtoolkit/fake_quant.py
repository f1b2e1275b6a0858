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
from qtoolkit.numerics import (
    _broadcast_shape,
    _check_float_input,
    _fq_codes_forward,
    _lsq_operands,
    _zf_or_none,
    compute_qparams,
    fake_quantize,
    fake_quantize_trusted,
)
from qtoolkit.observers import ObserverBase, make_observer

__all__ = ["FakeQuantize", "fake_quantize_lsq_lowmem"]


class _STEFromInput(torch.autograd.Function):
    """Straight-through fake quantization that keeps its input, not a mask, for the backward pass.

    For a tensor that stays resident anyway (a weight parameter), saving it costs nothing, while a mask
    is a new 1-byte-per-element tensor; the backward recomputes which codes were clamped
    (``round_half_even(x · (1/s)) + z`` outside ``[qmin, qmax]``, or NaN) and zeroes their gradient.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        s = scale.detach().float()
        zf = _zf_or_none(zero_point)
        out, _ = _fq_codes_forward(x, s, zf, qmin, qmax, want_mask=False)
        ctx.save_for_backward(x, s, zf if zf is not None else s.new_zeros(()))
        ctx.qmin, ctx.qmax, ctx.has_z = qmin, qmax, zf is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, s, zf = ctx.saved_tensors
        c = torch.mul(x.float(), 1.0 / s).round_()
        if ctx.has_z:
            c.add_(zf)
        outside = torch.clamp(c, ctx.qmin, ctx.qmax) != c  # also true for NaN, as in the forward's mask
        return grad.masked_fill(outside, 0), None, None, None, None


class _LSQRecompute(torch.autograd.Function):
    """LSQ fake quantization that keeps only its input for the backward pass.

    Forward: ``x̂ = (clamp(round_half_even(x · (1/s)) + z, qmin, qmax) − z) · s`` in place (no mask).
    Backward recomputes ``v = x · (1/s)`` and ``c = clamp(round(v), qmin − z, qmax − z)`` (``= code − z``;
    ``z`` is integer-valued, so this equals the forward's clamp of ``round(v) + z`` less ``z``) and gives

    * ``∂L/∂x = g`` where ``round(v) + z`` lies in ``[qmin, qmax]``, 0 outside (STE);
    * ``∂L/∂s = grad_factor · Σ g · (c − v · inside)`` (LSQ: ``round(v) − v`` inside, ``qmin − z`` below,
      ``qmax − z`` above), summed over the elements of each scale.

    Saved for backward: ``x`` (shared with whatever else keeps it, e.g. a preceding ReLU or the weight
    parameter) and the scale; nothing full-size of its own.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, reduce_dims):  # type: ignore[override]
        s = scale.detach().float()
        zf = _zf_or_none(zero_point)
        out, _ = _fq_codes_forward(x, s, zf, qmin, qmax, want_mask=False)
        ctx.save_for_backward(x, s, zf if zf is not None else s.new_zeros(()))
        ctx.qmin, ctx.qmax, ctx.has_z = qmin, qmax, zf is not None
        ctx.grad_factor, ctx.reduce_dims, ctx.scale_shape = grad_factor, reduce_dims, scale.shape
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, s, zf = ctx.saved_tensors
        v = torch.mul(x.float(), 1.0 / s)
        c = torch.round(v)
        if ctx.has_z:
            lo, hi = ctx.qmin - zf, ctx.qmax - zf
            cc = torch.maximum(torch.minimum(c, hi), lo)
        else:
            cc = torch.clamp(c, ctx.qmin, ctx.qmax)
        outside = cc != c  # also true for NaN
        del c
        grad_x = grad.masked_fill(outside, 0)
        grad_s = None
        if ctx.needs_input_grad[1]:
            g = grad.float()
            gx = grad_x.float()
            if ctx.reduce_dims is None:
                ds = torch.dot(g.reshape(-1), cc.reshape(-1)) - torch.dot(gx.reshape(-1), v.reshape(-1))
            else:
                ds = (g * cc).sum(dim=ctx.reduce_dims, keepdim=True) - (gx * v).sum(dim=ctx.reduce_dims, keepdim=True)
            grad_s = (ds * ctx.grad_factor).reshape(ctx.scale_shape)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_s, None, None, None, None, None


def fake_quantize_lsq_lowmem(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float | None = None,
) -> Tensor:
    """LSQ fake quantization (:func:`qtoolkit.numerics.fake_quantize_lsq`'s forward and gradients) that saves
    only ``x`` for the backward pass and recomputes the codes there.

    ``scale`` (one value, or one per channel along ``axis``) may require grad; its gradient is scaled by
    ``grad_factor`` (default ``1/sqrt(N·qmax)``, N = elements per scale). ``zero_point`` holds integer
    values inside ``[qmin, qmax]`` (as :func:`~qtoolkit.numerics.compute_qparams` gives). The forward is
    four in-place passes over ``x`` (six with a non-zero zero point) and keeps no mask; the
    backward recomputes ``x · (1/s)``, its rounding and clamp, then one masked pass and two
    reductions. Used by :class:`FakeQuantize` for learnable scales.

    Example::

        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> x = torch.tensor([0.04, 0.26, 2.0], requires_grad=True)
        >>> y = fake_quantize_lsq_lowmem(x, s, torch.tensor(0), -8, 7, grad_factor=1.0)
        >>> y.sum().backward(); y.detach(), x.grad, s.grad
        (tensor([0.0000, 0.3000, 0.7000]), tensor([1., 1., 0.]), tensor(7.))
    """
    _check_float_input(x, "fake_quantize_lsq_lowmem")
    s_b, z_b, grad_factor, reduce_dims = _lsq_operands(x, scale, zero_point, qmax, axis, grad_factor)
    return _LSQRecompute.apply(x, s_b, z_b, qmin, qmax, grad_factor, reduce_dims)


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
            return fake_quantize_lsq_lowmem(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis)
        if self.role == "weight" and x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            # a weight parameter stays resident: keep it (free) instead of a new 1-byte mask; the clamp is recomputed in backward
            shape = None if self.spec.axis is None else _broadcast_shape(x, self.spec.axis)
            s = self.scale.reshape(()) if shape is None else self.scale.reshape(shape)
            z = self.zero_point.reshape(()) if shape is None else self.zero_point.reshape(shape)
            return _STEFromInput.apply(x, s.detach(), z.detach(), self.qmin, self.qmax)
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

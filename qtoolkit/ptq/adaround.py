"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020, "Up or Down?").

Each weight element keeps its floor code ``⌊w/s⌋`` and learns whether to add 1 through a
continuous variable ``V`` mapped by the *rectified sigmoid* ``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``
(ζ = 1.1, γ = −0.1).  During optimization the soft weight ``s·(clip(⌊w/s⌋ + h(V) + z) − z)``
is used; the regularizer ``Σ 1 − |2h(V) − 1|^β`` pushes every ``h`` to 0 or 1 as ``β`` is
annealed from 20 down to 2 (:class:`BetaSchedule`).  At the end the rounding is made hard
(``h ≥ 0.5``) and the chosen codes are written back into the float weight as ``code · s``, so
that the ordinary weight fake quantization — and :func:`qtoolkit.convert` — reproduce exactly
those codes (the learned rounding lives in the int8 / int4 codes).

Example::

    >>> import torch
    >>> w = torch.randn(4, 3, 3, 3)
    >>> s = w.abs().amax(dim=(1, 2, 3)) / 7
    >>> ar = AdaRoundWeight(w, s, torch.zeros(4, dtype=torch.int32), -7, 7)
    >>> soft = ar()                       # differentiable in ar.v
    >>> hard = ar(hard=True)
    >>> torch.equal(torch.round(hard / s.view(-1, 1, 1, 1)), ar.codes())   # on the grid: the learned codes
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AdaRoundWeight", "BetaSchedule", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``clip(σ(v)·(ζ − γ) + γ, 0, 1)``: reaches exactly 0 and 1 (the paper's eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class BetaSchedule:
    """The regularizer's exponent ``β``: no regularization during the first ``warmup``
    fraction of the iterations, then ``β`` decays linearly from ``start`` to ``end``.

    Example::

        >>> b = BetaSchedule(100, warmup=0.2, start=20.0, end=2.0)
        >>> b(0), b(20), b(100)
        (None, 20.0, 2.0)
    """

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        self.iters, self.start, self.end = max(int(iters), 1), float(start), float(end)
        self.warm = int(round(warmup * self.iters))

    def __call__(self, step: int) -> float | None:
        if step < self.warm:
            return None
        t = (step - self.warm) / max(self.iters - self.warm, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - t)


class AdaRoundWeight(nn.Module):
    """Learned rounding of one weight tensor on a fixed (per-channel or per-tensor) grid.

    Args:
        weight: the float weight (BN already folded), not modified here.
        scale / zero_point: the weight quantizer's qparams (per output channel, axis 0, or scalars).
        qmin / qmax: the integer range.

    ``forward()`` gives the soft-rounded dequantized weight (``hard=True``: the final rounding);
    :meth:`regularizer` the rounding loss; :meth:`codes` the integer codes of the hard rounding.
    """

    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        w = weight.detach().float()
        shape = [-1] + [1] * (w.dim() - 1) if scale.numel() > 1 else [1] * max(w.dim(), 1)
        self.register_buffer("scale", scale.detach().float().reshape(shape).clone())
        self.register_buffer("zero_point", zero_point.detach().float().reshape(shape).clone())
        self.qmin, self.qmax = int(qmin), int(qmax)
        # w/s in float64 where the device has it (MPS does not): floor() of a value a hair below an integer
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        xs64 = w.to(wide) / self.scale.to(wide)
        xs, floor = xs64.float(), torch.floor(xs64).float()
        self.register_buffer("floor", floor)
        self.register_buffer("nearest", torch.clamp(torch.round(xs) + self.zero_point, self.qmin, self.qmax))
        rest = (xs - floor).clamp(1e-4, 1 - 1e-4)
        # h(v) = rest at initialization: rounding starts from the float weight itself
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def forward(self, hard: bool = False) -> Tensor:
        up = (self.v >= 0).float() if hard else self.h()
        codes = torch.clamp(self.floor + up + self.zero_point, self.qmin, self.qmax)
        return (codes - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> Tensor:
        """``Σ 1 − |2h(V) − 1|^β``: 0 when every element has chosen up or down."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def codes(self) -> Tensor:
        """Integer codes of the hard rounding (same shape as the weight)."""
        return torch.clamp(self.floor + (self.v >= 0).float() + self.zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def flipped_fraction(self) -> float:
        """Share of elements whose code differs from round-to-nearest."""
        return float((self.nearest != self.codes()).float().mean())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.v.shape)}, qmin={self.qmin}, qmax={self.qmax}"

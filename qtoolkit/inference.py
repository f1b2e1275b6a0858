"""Converted modules are inference-only: :func:`inference_only` attaches a clear backward error.

Used by the converted twins (:mod:`qtoolkit.nn`) and the int8 kernels (:mod:`qtoolkit.kernels`), which
must not import each other's modules: it lives below both.

Example::

    >>> import torch
    >>> y = inference_only(torch.ones(2, requires_grad=True) * 2, "fc")
    >>> try:
    ...     y.sum().backward()
    ... except RuntimeError as e:
    ...     print(str(e).split(" —")[0])
    fc: backward through a converted (int8) model is not supported
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inference_only"]


class _InferenceOnly(torch.autograd.Function):
    """Identity whose backward raises: converted models are inference-only."""

    @staticmethod
    def forward(ctx, y: Tensor, token: Tensor) -> Tensor:  # type: ignore[override]
        ctx.name = getattr(token, "_qt_name", "converted module")
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        raise RuntimeError(
            f"{ctx.name}: backward through a converted (int8) model is not supported — it holds integer "
            "weights and no parameters. Fine-tune the prepared model (qtoolkit.prepare(..., qat=True)) "
            "and convert afterwards."
        )


_TOKEN = torch.zeros((), requires_grad=True)


def inference_only(y: Tensor, name: str) -> Tensor:
    """Attach a clear backward error to ``y`` when autograd is recording."""
    if not torch.is_grad_enabled():
        return y
    token = _TOKEN.detach().requires_grad_(True)
    token._qt_name = name  # type: ignore[attr-defined]
    return _InferenceOnly.apply(y, token)

"""Losses for QAT beyond the task loss: distillation from the FP32 teacher (:class:`~qtoolkit.qat.QATTrainer`'s
``teacher=``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["distillation_loss"]


def distillation_loss(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Knowledge-distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    ``logits`` (student, ``[N, C]`` or ``[N, C, ...]`` with classes on dim 1) carry the gradient; ``teacher_logits``
    are treated as constants. ``T²`` keeps the gradient's size independent of ``T`` (Hinton et al. 2015).

    Example::

        >>> s = torch.tensor([[2.0, 0.0]], requires_grad=True)
        >>> float(distillation_loss(s, torch.tensor([[2.0, 0.0]])))
        0.0
    """
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    log_p = torch.log_softmax(logits.float() / temperature, dim=1)
    log_q = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return kl.mean() * (temperature * temperature)

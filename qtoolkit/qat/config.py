"""QAT run settings: :class:`QATConfig` (used by :class:`qtoolkit.qat.QATTrainer`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["QATConfig"]


@dataclass
class QATConfig:
    """Settings of a QAT fine-tuning run.

    Args:
        epochs: total number of epochs (a resumed run trains the remaining ones).
        freeze_observers_epoch: from this 0-based epoch on, observers are disabled
            (quantizer ranges frozen); ``None`` never freezes them. torchvision's
            QAT recipe uses 4.
        freeze_bn_epoch: from this epoch on, BN statistics are frozen (the folded
            weights use running statistics); ``None`` never freezes. Default 3.
        max_batches_per_epoch: train on at most this many batches per epoch.
        max_eval_batches: evaluate on at most this many batches.
        grad_clip: clip the global gradient norm to this value.
        device: move inputs (and, unless it is DDP-wrapped, the model) here;
            default: the model's device.
        progress: tqdm bar per epoch (loss / accuracy) and a summary line per
            epoch, on rank 0 only. Summaries also go to the ``qtoolkit.qat`` logger.
        log_interval: refresh the progress bar's loss/accuracy and add a point to
            ``QATTrainer.curve`` every this many batches (each refresh synchronizes
            with the GPU).
        eval_every_batches: also evaluate every this many batches within an epoch
            (points of ``QATTrainer.curve``); ``None``: only after each epoch.
        distill_weight: with a ``teacher`` passed to ``QATTrainer``: the share of the
            distillation loss (``1 - distill_weight`` goes to ``loss_fn``; 1: labels unused).
        distill_temperature: softmax temperature of the distillation loss.

    Example::

        >>> QATConfig(epochs=8, freeze_observers_epoch=4, freeze_bn_epoch=3).epochs
        8
    """

    epochs: int = 8
    freeze_observers_epoch: int | None = 4
    freeze_bn_epoch: int | None = 3
    max_batches_per_epoch: int | None = None
    max_eval_batches: int | None = None
    grad_clip: float | None = None
    device: str | torch.device | None = None
    progress: bool = True
    log_interval: int = 10
    eval_every_batches: int | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        def _nonneg(name: str, value: Any, allow_none: bool = True, positive: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
                kind = "a positive" if positive else "a non-negative"
                raise ValueError(f"QATConfig.{name} must be {kind} int{' or None' if allow_none else ''}, got {value!r}")

        _nonneg("epochs", self.epochs, allow_none=False)
        _nonneg("freeze_observers_epoch", self.freeze_observers_epoch)
        _nonneg("freeze_bn_epoch", self.freeze_bn_epoch)
        _nonneg("max_batches_per_epoch", self.max_batches_per_epoch, positive=True)
        _nonneg("max_eval_batches", self.max_eval_batches, positive=True)
        _nonneg("log_interval", self.log_interval, allow_none=False, positive=True)
        _nonneg("eval_every_batches", self.eval_every_batches, positive=True)
        if isinstance(self.distill_weight, bool) or not (isinstance(self.distill_weight, (int, float))
                                                         and 0.0 <= self.distill_weight <= 1.0):
            raise ValueError(f"QATConfig.distill_weight must be a number in [0, 1], got {self.distill_weight!r}")
        if isinstance(self.distill_temperature, bool) or not (isinstance(self.distill_temperature, (int, float))
                                                              and self.distill_temperature > 0):
            raise ValueError(f"QATConfig.distill_temperature must be a number > 0, got {self.distill_temperature!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"QATConfig.grad_clip must be a positive number or None, got {self.grad_clip!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain-typed copy (``device`` as a string) for checkpoints."""
        d = dataclasses.asdict(self)
        d["device"] = None if self.device is None else str(self.device)
        return d

"""QAT evaluation: :func:`evaluate_top1` and the batch helpers (:func:`_batch_target`, :func:`_n_correct`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model, model_device, to_device
from qtoolkit.qat.distributed import _comm_device, _dist_on, unwrap_model
from qtoolkit.toggles import observers_disabled

__all__ = ["evaluate_top1"]

_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


def _batch_target(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in _TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"qtoolkit.qat: cannot find the target in a batch of type {type(batch).__name__}; pass (input, target) "
        f"pairs or dicts with one of the keys {_TARGET_KEYS}"
    )


def _n_correct(out: Any, target: Any) -> Tensor | None:
    """Number of top-1 hits, or None when the output is not classification logits."""
    if (
        isinstance(out, Tensor) and isinstance(target, Tensor) and out.dim() == 2
        and target.dim() == 1 and not target.is_floating_point() and out.shape[0] == target.shape[0]
    ):
        return (out.detach().argmax(1) == target).sum()
    return None


def evaluate_top1(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    *,
    all_reduce: bool = False,
) -> float:
    """Top-1 accuracy (a fraction in ``[0, 1]``) of the fake-quantized model.

    The model runs in eval mode under ``no_grad`` with its observers disabled
    (:func:`~qtoolkit.toggles.observers_disabled`), so evaluating never moves a
    quantizer range; its train/eval mode and observer flags are restored.

    Args:
        model: a prepared model (a DDP wrapper is unwrapped: evaluation runs no
            collective, so ranks may see different numbers of batches).
        loader: ``(input, target)`` pairs (or dicts with ``input``/``target`` keys);
            the model must output ``[N, classes]`` logits.
        device: where inputs go (default: the model's device).
        max_batches: stop after this many batches.
        all_reduce: sum the hit and sample counts over all ranks (each rank
            evaluating its own shard); collective, every rank must call it.

    Raises:
        ValueError: the loader yielded no sample (on every rank).

    Example::

        >>> import torch, qtoolkit as qt
        >>> from torch import nn
        >>> m = qt.prepare(nn.Sequential(nn.Linear(4, 3)), qat=True)
        >>> _ = m(torch.randn(8, 4))           # a training forward records the ranges
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> 0.0 <= evaluate_top1(m, data) <= 1.0
        True
    """
    module = unwrap_model(model)
    dev = torch.device(device) if device is not None else model_device(module)
    was_training = module.training
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    module.eval()
    try:
        with observers_disabled(module), torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = to_device(batch_input(batch), dev), to_device(_batch_target(batch), dev)
                out = call_model(module, x)
                hits = _n_correct(out, y)
                if hits is None:
                    raise TypeError(
                        "evaluate_top1: the model must return [N, classes] logits and the targets be [N] class "
                        f"indices; got output {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__} "
                        f"and target {tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
                    )
                correct += hits
                total += y.shape[0]
    finally:
        module.train(was_training)
    counts = torch.tensor([float(correct.item()), float(total)], dtype=torch.float64)
    if all_reduce and _dist_on():
        counts = counts.to(_comm_device())
        dist.all_reduce(counts)
        counts = counts.cpu()
    if counts[1] == 0:
        raise ValueError("evaluate_top1: the evaluation loader yielded no samples")
    return float(counts[0] / counts[1])

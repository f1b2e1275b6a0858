"""QAT that starts where PTQ ends: :func:`start_from_prepared` and :func:`reestimate_bn`.

A calibrated (:func:`qtoolkit.calibrate`) or reconstructed (:func:`qtoolkit.reconstruct`:
AdaRound / BRECQ / QDrop) prepared model is fine-tuned *as it is*:

* **learned rounding kept**: reconstruction writes its rounding back into the float weights as
  ``code · scale``, and the weight quantizers' scales are frozen here, so the first step starts
  from exactly those codes (the STE then moves the weights off the grid as training requires);
* **step sizes kept**: every observer is switched off, so the calibrated / learned ranges are
  not re-estimated from data; with ``lsq=True`` the weight and activation scales become
  parameters (LSQ, Esser et al. 2020) starting from those values;
* **BatchNorm**: a PTQ-prepared model (``prepare(..., qat=False)``) has BN folded into the
  weights, the form it is converted and deployed in; it trains in that form, with nothing to
  re-estimate and no BN cost per step. A model prepared with ``qat=True`` (live BN) is given
  fresh BN running statistics from the fake-quantized network (:func:`reestimate_bn`) when
  ``data`` is passed, as torch's QAT recipes advise before freezing BN.

Example::

    >>> import torch, qtoolkit as qt
    >>> from torch import nn
    >>> from qtoolkit.qat import QATConfig, QATTrainer, start_from_prepared
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    >>> data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> qm = qt.calibrate(qt.prepare(net.eval(), "w4a4"), [x for x, _ in data], progress=False)
    >>> qm = start_from_prepared(qm, lsq=True)
    >>> opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    >>> hist = QATTrainer(qm, data, opt, config=QATConfig(epochs=1, progress=False)).fit()
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qtoolkit.calibrate import batch_input, call_model, model_device, to_device
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.toggles import disable_observers, quantizers

__all__ = ["start_from_prepared", "reestimate_bn", "has_live_bn", "is_ptq_form"]

_QAT_ATTR = "_qtoolkit_qat"  # set by qtoolkit.prepare


def has_live_bn(model: nn.Module) -> bool:
    """True when ``model`` was prepared with ``qat=True`` and keeps BatchNorm live in its layers."""
    return any(isinstance(m, QuantLayer) and m.bn is not None for m in model.modules())


def _uncalibrated(model: nn.Module) -> list[str]:
    return [
        name for name, fq in quantizers(model)
        if fq.role in ("weight", "activation") and bool(fq.fake_quant_enabled) and not fq.is_calibrated
    ]


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Iterable[Any], num_batches: int | None = 50) -> int:
    """Recompute the running statistics of every live BatchNorm from the fake-quantized model.

    The running mean / variance are reset and accumulated as a plain average (momentum
    ``1/(k+1)`` at batch ``k``) over ``num_batches`` batches of ``data`` in training mode, with the observers off and no
    gradients; each BN's momentum is restored afterwards. Returns the number of batches used.

    Raises:
        ValueError: ``data`` yielded no batches, or ``num_batches`` is not positive.

    Example::

        >>> import torch, qtoolkit as qt
        >>> from torch import nn
        >>> qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval(), qat=True)
        >>> _ = qt.calibrate(qm, [torch.randn(4, 3, 8, 8)], progress=False)
        >>> reestimate_bn(qm, [torch.randn(4, 3, 8, 8)] * 3)
        3
    """
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"reestimate_bn: num_batches must be positive, got {num_batches}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved_flags = [(fq, int(fq.observer_enabled)) for _, fq in quantizers(model)]
    saved_bn = [(bn, bn.momentum, bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    frozen = [(m, int(m.bn_frozen)) for m in model.modules() if isinstance(m, QuantLayer) and m.bn is not None]
    was_training = model.training
    device = model_device(model)
    used = 0
    try:
        disable_observers(model)
        for m, _ in frozen:
            m.bn_frozen.fill_(0)
        for bn in bns:
            bn.reset_running_stats()
        model.train()
        it = iter(data) if num_batches is None else itertools.islice(iter(data), num_batches)
        for batch in it:
            for bn in bns:  # momentum 1/(k+1) at batch k: the plain average of the batches' statistics
                bn.momentum = 1.0 / (used + 1)
            call_model(model, to_device(batch_input(batch), device))
            used += 1
        if used == 0:
            raise ValueError("reestimate_bn: `data` yielded no batches")
    except BaseException:
        for bn, _, mean, var in saved_bn:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        raise
    finally:
        for bn, momentum, _, _ in saved_bn:
            bn.momentum = momentum
        for m, f in frozen:
            m.bn_frozen.fill_(f)
        for fq, obs in saved_flags:
            fq.observer_enabled.fill_(obs)
        model.train(was_training)
    return used


def start_from_prepared(
    model: nn.Module,
    *,
    lsq: bool = False,
    data: Iterable[Any] | None = None,
    bn_batches: int = 50,
) -> nn.Module:
    """Make a calibrated or reconstructed prepared model ready for :class:`~qtoolkit.qat.QATTrainer`.

    Args:
        model: ``qtoolkit.prepare(...)`` (PTQ form, BN folded, or ``qat=True``, BN live) after
            :func:`qtoolkit.calibrate` and optionally :func:`qtoolkit.reconstruct`; changed in place.
        lsq: learn the weight and activation scales (LSQ) from their current values.
        data: batches for :func:`reestimate_bn` (models with live BN only; ignored otherwise).
        bn_batches: batches of ``data`` used for the BN re-estimation.

    Every observer is switched off (the ranges, learned step sizes and the rounding of reconstructed
    weights stay as they are); the model is put in training mode. Build the optimizer afterwards
    (``lsq=True`` adds the scales to ``model.parameters()``).

    Raises:
        ValueError: the model has no quantizers, or some that fake-quantize have no range yet
            (named; calibrate first).

    Example::

        >>> import torch, qtoolkit as qt
        >>> from torch import nn
        >>> qm = qt.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "w4a4")
        >>> _ = qt.calibrate(qm, [torch.randn(16, 4)], progress=False)
        >>> qm = start_from_prepared(qm, lsq=True)
        >>> sum(1 for n, _ in qm.named_parameters() if n.endswith("scale")) > 0
        True
    """
    fqs = list(quantizers(model))
    if not fqs:
        raise ValueError("start_from_prepared: the model has no quantizers; prepare it first with qtoolkit.prepare(model, qconfig)")
    missing = _uncalibrated(model)
    if missing:
        raise ValueError(
            "start_from_prepared: these quantizers have no range yet: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; run qtoolkit.calibrate(model, data) first"
        )
    disable_observers(model)
    if lsq:
        for _, fq in fqs:
            if fq.role in ("weight", "activation") and bool(fq.fake_quant_enabled):
                fq.make_learnable()
    if data is not None and has_live_bn(model):
        reestimate_bn(model, data, bn_batches)
    model.train()
    return model


def is_ptq_form(model: nn.Module) -> bool:
    """True when ``model`` was prepared for PTQ (``qat=False``: BN folded)."""
    flags = [getattr(m, _QAT_ATTR) for m in model.modules() if hasattr(m, _QAT_ATTR)]
    return bool(flags) and not any(f is True for f in flags)

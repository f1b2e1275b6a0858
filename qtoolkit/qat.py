"""Quantization-aware fine-tuning: a small trainer with torchvision's QAT schedule.

:class:`QATTrainer` fine-tunes a model returned by
``qtoolkit.prepare(model, qconfig, qat=True)`` (fake quantization + live BN):

* **schedule** (applied at the start of every epoch, 0-based, as in torchvision's
  ``train_quantization.py``): ``epoch >= freeze_observers_epoch`` →
  :func:`~qtoolkit.toggles.disable_observers` (quantizer ranges frozen);
  ``epoch >= freeze_bn_epoch`` → :func:`~qtoolkit.toggles.freeze_bn` (BN uses its
  running statistics). The trainer only ever *freezes*; it never re-enables
  observers or BN updates you switched off yourself.
* **output ranges**: after every epoch the observe-only output quantizers get
  their scale / zero point from what they recorded, so the trained model can go
  straight to :func:`qtoolkit.convert`.
* **evaluation** after every epoch: top-1 of the fake-quantized model in eval mode
  with observers disabled (:func:`evaluate_top1`), or your own ``eval_fn``.
* **checkpoints** after every epoch, atomically (temporary file in the same
  directory + ``os.replace``), loadable with ``torch.load(path, weights_only=True)``:
  model / optimizer / scheduler state, epoch, history, RNG states (torch, CUDA,
  Python, NumPy and the data loader's generator) and the QAT schedule.
  ``resume=True`` continues bit-for-bit where the checkpoint left off.
* **DistributedDataParallel**: pass the DDP-wrapped model; toggles, checkpoints and
  evaluation use ``.module``. After every epoch :func:`sync_quantizers` broadcasts
  the quantizers' state (and the BN statistics) from rank 0, so every rank holds
  the same ranges; loss/accuracy are averaged over ranks; only rank 0 writes
  checkpoints.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> from qtoolkit.qat import QATConfig, QATTrainer
    >>> float_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                             nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    >>> model = qt.prepare(float_model, "w8a8", qat=True)
    >>> data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(4)]
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    >>> trainer = QATTrainer(model, data, opt, config=QATConfig(epochs=2, progress=False),
    ...                      eval_loader=data)
    >>> history = trainer.fit()
    >>> sorted(history[-1])[:4]
    ['bn_frozen', 'epoch', 'eval_acc', 'lr']
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model, model_device, to_device
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.qat_checkpoint import (
    CHECKPOINT_FORMAT,
    _atomic_save,
    _check_checkpoint_path,
    _check_plain,
    _rng_state,
    _set_rng_state,
    _summarize_keys,
    payload_checksum,
    read_checkpoint,
)
from qtoolkit.toggles import disable_observers, freeze_bn, observers_disabled, quantizers

__all__ = ["QATConfig", "QATTrainer", "fit_qat", "sync_quantizers", "evaluate_top1", "unwrap_model", "read_checkpoint", "payload_checksum"]

logger = logging.getLogger(__name__)

_SCHEDULER_STEPS = ("batch", "epoch")
_QAT_ATTR = "_qtoolkit_qat"  # set by qtoolkit.prepare
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


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
        log_interval: refresh the progress bar's loss/accuracy every this many
            batches (each refresh synchronizes with the GPU).

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
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"QATConfig.grad_clip must be a positive number or None, got {self.grad_clip!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain-typed copy (``device`` as a string) for checkpoints."""
        d = dataclasses.asdict(self)
        d["device"] = None if self.device is None else str(self.device)
        return d


# --------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _comm_device() -> torch.device:
    """Device for collective buffers: CUDA for NCCL, CPU otherwise."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (no-op when not distributed)."""
    if not _dist_on():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _agree(error: BaseException | None, what: str) -> None:
    """Raise ``error`` here, and a pointer to it on the other ranks, if any rank failed
    (so one rank's bad input cannot leave the others hanging in a collective)."""
    if _any_rank(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on another rank (see that rank's error)")


def _quantizer_tensors(module: nn.Module, include_model_buffers: bool) -> list[tuple[nn.Module, str, str, Tensor, bool]]:
    """``(owner, attr, qualified_name, tensor, is_param)`` of everything to broadcast."""
    out: list[tuple[nn.Module, str, str, Tensor, bool]] = []
    owners: set[int] = set()

    def add(sub_name: str, sub: nn.Module, params: bool) -> None:
        if id(sub) in owners:
            return
        owners.add(id(sub))
        for bname, buf in sub._buffers.items():
            if buf is not None:
                out.append((sub, bname, f"{sub_name}.{bname}" if sub_name else bname, buf, False))
        if params:
            for pname, p in sub._parameters.items():
                if p is not None:
                    out.append((sub, pname, f"{sub_name}.{pname}" if sub_name else pname, p, True))

    for fq_name, fq in quantizers(module):
        for sub_name, sub in fq.named_modules(prefix=fq_name):
            add(sub_name, sub, params=True)  # LSQ scales are parameters
    if include_model_buffers:
        for sub_name, sub in module.named_modules():
            add(sub_name, sub, params=False)
    return out


@torch.no_grad()
def sync_quantizers(model: nn.Module, src: int = 0, *, include_model_buffers: bool = False) -> nn.Module:
    """Broadcast every quantizer's state from rank ``src`` so all ranks hold the same ranges.

    Each :class:`~qtoolkit.fake_quant.FakeQuantize`'s buffers (``scale``,
    ``zero_point``, enable flags, ``calibrated``) and its observer's buffers
    (running min/max, histogram, cached clip range) — plus a learnable (LSQ) scale —
    are broadcast with ``torch.distributed.broadcast``, one flat tensor per dtype.
    Buffers whose shape differs on a receiving rank (lazily sized per-channel
    statistics) are reallocated first. A no-op unless ``torch.distributed`` is
    initialized. Collective: every rank must call it.

    Why: DDP's ``broadcast_buffers=True`` copies rank 0's buffers at the *start* of
    each forward, but the observers then update from each rank's own batch, so after
    the last step the ranks' ranges differ. The trainer calls this after each epoch.

    Args:
        model: the prepared model, DDP-wrapped or not.
        src: the rank whose state wins.
        include_model_buffers: also broadcast every other buffer of the model (BN
            running statistics), as DDP does at each forward.

    Returns:
        ``model``.

    Example::

        >>> import qtoolkit as qt
        >>> from torch import nn
        >>> m = qt.prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> sync_quantizers(m) is m            # not distributed: nothing to do
        True
    """
    if not _dist_on():
        return model
    module = unwrap_model(model)
    entries = _quantizer_tensors(module, include_model_buffers)
    meta = [(name, tuple(t.shape), str(t.dtype)) for _, _, name, t, _ in entries]
    box: list[Any] = [meta if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if _comm_device().type == "cuda" else None)
    src_meta = box[0]
    problem = None
    if [m[0] for m in src_meta] != [m[0] for m in meta]:
        mine = {m[0] for m in meta}
        theirs = {m[0] for m in src_meta}
        diff = sorted(mine ^ theirs)[:5] or ["(same names, different order)"]
        problem = RuntimeError(f"sync_quantizers: the models differ between ranks (quantizer state {diff})")
    else:
        for (_, _, name, t, is_param), (_, shape, dtype) in zip(entries, src_meta):
            if is_param and (tuple(t.shape) != shape or str(t.dtype) != dtype):
                problem = RuntimeError(
                    f"sync_quantizers: parameter {name} has shape {tuple(t.shape)} here and {shape} on rank {src}"
                )
                break
    _agree(problem, "sync_quantizers")
    # reallocate lazily sized buffers to the source's shapes
    tensors: list[Tensor] = []
    for (owner, attr, _, t, _), (_, shape, dtype) in zip(entries, src_meta):
        if tuple(t.shape) != shape or str(t.dtype) != dtype:  # a buffer (parameters were checked above)
            t = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=t.device)
            owner._buffers[attr] = t
        tensors.append(t)
    comm = _comm_device()
    groups: dict[str, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(str(t.dtype), []).append(t)
    for ts in groups.values():
        total = sum(t.numel() for t in ts)
        if total == 0:
            continue
        is_bool = ts[0].dtype == torch.bool
        flat = torch.cat([(t.to(torch.uint8) if is_bool else t).detach().reshape(-1).to(comm) for t in ts])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in ts:
            n = t.numel()
            chunk = flat[offset:offset + n].view(t.shape)
            t.copy_(chunk.bool() if is_bool else chunk)
            offset += n
    return model


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------


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


def _check_qat_model(module: nn.Module) -> None:
    flags = [getattr(m, _QAT_ATTR) for m in module.modules() if hasattr(m, _QAT_ATTR)]
    if any(f is True for f in flags):
        return
    if flags:
        raise ValueError(
            "QATTrainer: the model was prepared for post-training quantization (qtoolkit.prepare(..., qat=False): "
            "BatchNorm is folded, observers are frozen); prepare the float model with "
            "qtoolkit.prepare(model, qconfig, qat=True) for quantization-aware training"
        )
    if next(quantizers(module), None) is None:
        raise ValueError(
            "QATTrainer: the model has no quantizers; prepare it first with qtoolkit.prepare(model, qconfig, qat=True)"
        )
    raise ValueError(
        "QATTrainer: the model was not prepared with qtoolkit.prepare(model, qconfig, qat=True) "
        "(no QAT marker found on it)"
    )


# --------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------


class QATTrainer:
    """Fine-tune a QAT-prepared model with the observer / BN freeze schedule.

    Args:
        model: ``qtoolkit.prepare(float_model, qconfig, qat=True)``, optionally
            wrapped in ``DistributedDataParallel`` (call
            ``torch.distributed.init_process_group`` first).
        train_loader: iterable of ``(input, target)`` pairs (or dicts); a
            ``DistributedSampler``'s ``set_epoch`` is called every epoch.
        optimizer: built on ``model.parameters()`` of the *prepared* model
            (``prepare`` returns a copy of the float model).
        config: a :class:`QATConfig` (default ``QATConfig()``).
        scheduler: optional LR scheduler, stepped according to ``scheduler_step``.
        scheduler_step: ``"epoch"`` (``scheduler.step()`` after each epoch) or
            ``"batch"`` (after each optimizer step).
        loss_fn: ``loss_fn(output, target)``; default ``nn.CrossEntropyLoss()``.
        eval_loader: evaluate top-1 after each epoch with :func:`evaluate_top1`
            (each rank its shard; counts summed over ranks).
        eval_fn: instead of ``eval_loader``: ``eval_fn(model) -> float``, called
            with the unwrapped model in eval mode with observers disabled (on every
            rank under DDP).
        checkpoint_path: write a checkpoint here after each epoch (rank 0).
        resume: load ``checkpoint_path`` (which must exist) and continue from it:
            weights, quantizer buffers, optimizer/scheduler state, RNG and data-order
            state, epoch and history. For "resume if present" pass
            ``resume=os.path.exists(path)``.

    Raises:
        ValueError / FileNotFoundError / PermissionError: at construction, before
            any training, for a model not prepared with ``qat=True``, an optimizer
            that does not hold the model's parameters, a checkpoint directory that
            does not exist, a missing or incompatible checkpoint to resume from
            (the message names the mismatched keys; model and optimizer are left
            unchanged).

    Attributes:
        epoch: number of completed epochs.
        history: one dict per completed epoch: ``epoch`` (1-based), ``train_loss``,
            ``train_acc``, ``eval_acc`` (fractions, ``None`` when not measured),
            ``lr`` (at the start of the epoch), ``seconds``, ``observers_frozen``,
            ``bn_frozen``.

    Example::

        >>> import torch, qtoolkit as qt
        >>> from torch import nn
        >>> model = qt.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), qat=True)
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> cfg = QATConfig(epochs=3, freeze_observers_epoch=2, freeze_bn_epoch=1, progress=False)
        >>> hist = QATTrainer(model, data, opt, config=cfg, scheduler=sched, eval_loader=data).fit()
        >>> [h["lr"] for h in hist], [h["observers_frozen"] for h in hist]
        ([0.05, 0.025, 0.0125], [False, False, True])
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        *,
        config: QATConfig | None = None,
        scheduler: Any | None = None,
        scheduler_step: str = "epoch",
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        eval_loader: Iterable[Any] | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        error: BaseException | None = None
        try:
            self._setup(model, train_loader, optimizer, config, scheduler, scheduler_step, loss_fn,
                        eval_loader, eval_fn, checkpoint_path, resume)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            error = e
        _agree(error, "QATTrainer setup")

    # ------------------------------------------------------------------ setup
    def _setup(self, model, train_loader, optimizer, config, scheduler, scheduler_step, loss_fn,
               eval_loader, eval_fn, checkpoint_path, resume) -> None:
        config = QATConfig() if config is None else config
        if not isinstance(config, QATConfig):
            raise TypeError(f"QATTrainer: config must be a QATConfig, got {type(config).__name__}")
        if scheduler_step not in _SCHEDULER_STEPS:
            raise ValueError(f"QATTrainer: scheduler_step must be one of {_SCHEDULER_STEPS}, got {scheduler_step!r}")
        if eval_loader is not None and eval_fn is not None:
            raise ValueError("QATTrainer: pass eval_loader or eval_fn, not both")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"QATTrainer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        module = unwrap_model(model)
        _check_qat_model(module)
        model_params = {id(p) for p in module.parameters()}
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(id(p) in model_params for p in opt_params):
            raise ValueError(
                "QATTrainer: the optimizer holds none of the model's parameters; build it from the *prepared* "
                "model (qtoolkit.prepare returns a copy of the float model): torch.optim.SGD(qat_model.parameters(), ...)"
            )
        path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        if path is not None and _rank() == 0:
            _check_checkpoint_path(path)
        if resume:
            if path is None:
                raise ValueError("QATTrainer: resume=True needs a checkpoint_path")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"QATTrainer: resume=True but there is no checkpoint at {path!r} "
                    "(pass resume=os.path.exists(path) to resume only when one exists)"
                )
        if config.device is not None:
            device = torch.device(config.device)
            if isinstance(model, nn.parallel.DistributedDataParallel):
                current = model_device(module)
                if current.type != device.type or (device.index is not None and current.index != device.index):
                    raise ValueError(f"QATTrainer: the DDP model is on {current} but config.device is {device}")
            else:
                module.to(device)
        else:
            device = model_device(module)

        self.model = model
        self.module = module
        self.train_loader = train_loader
        self.optimizer = optimizer
        self.config = config
        self.scheduler = scheduler
        self.scheduler_step = scheduler_step
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.eval_loader = eval_loader
        self.eval_fn = eval_fn
        self.checkpoint_path = path
        self.device = device
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._pending_rng: dict[str, Any] | None = None
        if resume:
            assert path is not None
            self.load_checkpoint(path)

    # ------------------------------------------------------------------ schedule
    def apply_schedule(self, epoch: int) -> None:
        """Freeze observers / BN statistics as due at the start of ``epoch`` (0-based)."""
        cfg = self.config
        if cfg.freeze_observers_epoch is not None and epoch >= cfg.freeze_observers_epoch:
            disable_observers(self.module)
        if cfg.freeze_bn_epoch is not None and epoch >= cfg.freeze_bn_epoch:
            freeze_bn(self.module)

    def _schedule_flags(self) -> tuple[bool, bool]:
        fqs = [fq for _, fq in quantizers(self.module)]
        observers_frozen = bool(fqs) and all(not bool(fq.observer_enabled) for fq in fqs)
        bn_layers = [m for m in self.module.modules() if isinstance(m, QuantLayer) and m.bn is not None]
        bn_frozen = bool(bn_layers) and all(m.bn_is_frozen for m in bn_layers)
        return observers_frozen, bn_frozen

    def _check_ranges_available(self) -> None:
        missing = [
            name for name, fq in quantizers(self.module)
            if bool(fq.fake_quant_enabled) and not bool(fq.observer_enabled) and not fq.is_calibrated
        ]
        if missing:
            raise RuntimeError(
                "QATTrainer: these quantizers fake-quantize with a frozen observer but have no range yet: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; run qtoolkit.calibrate(model, data) "
                "before training, or set freeze_observers_epoch > 0 so the observers see data first"
            )

    @torch.no_grad()
    def _finalize_output_ranges(self) -> None:
        """Give observe-only ``output`` quantizers their qparams from what they recorded.

        ``FakeQuantize`` loads qparams during training only for quantizers that
        fake-quantize, so the output quantizers (the requantization ranges an
        integer engine needs) would stay uncalibrated after QAT and ``convert``
        would refuse the model. Done after every epoch (on synced state under DDP).
        """
        for _, fq in quantizers(self.module):
            if fq.role == "output" and fq.observer.has_data and (bool(fq.observer_enabled) or not fq.is_calibrated):
                fq.finalize()

    # ------------------------------------------------------------------ training
    def _progress(self, epoch: int) -> Any:
        try:
            n: int | None = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:  # generators, iterable datasets
            n = None
        if self.config.max_batches_per_epoch is not None:
            n = self.config.max_batches_per_epoch if n is None else min(n, self.config.max_batches_per_epoch)
        if not self.config.progress or _rank() != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=n, desc=f"QAT epoch {epoch + 1}/{self.config.epochs}", unit="batch", leave=False)

    def _batches(self) -> Iterator[Any]:
        limit = self.config.max_batches_per_epoch
        for i, batch in enumerate(self.train_loader):
            if limit is not None and i >= limit:
                break
            yield batch

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (schedule applied first); returns loss/accuracy averaged over ranks."""
        self.apply_schedule(epoch)
        self._check_ranges_available()
        for obj in (self.train_loader, getattr(self.train_loader, "sampler", None),
                    getattr(getattr(self.train_loader, "batch_sampler", None), "sampler", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
                break
        self.model.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        dev = self.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        n_loss = n_acc = 0
        bar = self._progress(epoch)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            for step, batch in enumerate(self._batches()):
                x, y = to_device(batch_input(batch), dev), to_device(_batch_target(batch), dev)
                self.optimizer.zero_grad(set_to_none=True)
                out = call_model(self.model, x)
                loss = self.loss_fn(out, y)
                loss.backward()
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                self.optimizer.step()
                if self.scheduler is not None and self.scheduler_step == "batch":
                    self.scheduler.step()
                bs = y.shape[0] if isinstance(y, Tensor) and y.dim() > 0 else 1
                loss_sum += loss.detach().double() * bs
                n_loss += bs
                hits = _n_correct(out, y)
                if hits is not None:
                    correct += hits
                    n_acc += bs
                if (step + 1) % self.config.log_interval == 0:
                    running = float(loss_sum) / n_loss
                    if not math.isfinite(running):
                        raise FloatingPointError(
                            f"QATTrainer: the training loss became {running} in epoch {epoch + 1} (batch {step + 1}); "
                            "lower the learning rate or set QATConfig.grad_clip"
                        )
                    if bar is not None:
                        bar.set_postfix(loss=f"{running:.4f}", acc=f"{float(correct) / n_acc:.3f}" if n_acc else "-")
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if self.scheduler is not None and self.scheduler_step == "epoch":
            self.scheduler.step()
        totals = torch.stack([loss_sum.cpu(), correct.cpu(), torch.tensor(float(n_loss), dtype=torch.float64),
                              torch.tensor(float(n_acc), dtype=torch.float64)])
        if _dist_on():
            totals = totals.to(_comm_device())
            dist.all_reduce(totals)
            totals = totals.cpu()
        if totals[2] == 0:
            raise ValueError("QATTrainer: the training loader yielded no batches")
        train_loss = float(totals[0] / totals[2])
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"QATTrainer: the training loss is {train_loss} after epoch {epoch + 1}")
        train_acc = float(totals[1] / totals[3]) if totals[3] > 0 else None
        return {"train_loss": train_loss, "train_acc": train_acc, "lr": lr}

    def evaluate(self) -> float | None:
        """Per-epoch evaluation (``eval_loader`` top-1 or ``eval_fn``); ``None`` if neither."""
        if self.eval_loader is not None:
            return evaluate_top1(self.module, self.eval_loader, self.device, self.config.max_eval_batches,
                                 all_reduce=_dist_on())
        if self.eval_fn is not None:
            was_training = self.module.training
            self.module.eval()
            try:
                with observers_disabled(self.module), torch.no_grad():
                    return float(self.eval_fn(self.module))
            finally:
                self.module.train(was_training)
        return None

    def fit(self) -> list[dict[str, Any]]:
        """Train from the current epoch up to ``config.epochs``; returns the history."""
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng, self.train_loader)
            self._pending_rng = None
        for epoch in range(self.epoch, self.config.epochs):
            start = time.perf_counter()
            stats = self.train_one_epoch(epoch)
            if _dist_on():
                sync_quantizers(self.model, include_model_buffers=True)
            self._finalize_output_ranges()
            eval_acc = self.evaluate()
            observers_frozen, bn_frozen = self._schedule_flags()
            record = {
                "epoch": epoch + 1,
                "train_loss": stats["train_loss"],
                "train_acc": stats["train_acc"],
                "eval_acc": eval_acc,
                "lr": stats["lr"],
                "seconds": time.perf_counter() - start,
                "observers_frozen": observers_frozen,
                "bn_frozen": bn_frozen,
            }
            self.history.append(record)
            self.epoch = epoch + 1
            if self.checkpoint_path is not None:
                self.save_checkpoint(self.checkpoint_path)
            msg = (
                f"QAT epoch {epoch + 1}/{self.config.epochs}: loss {record['train_loss']:.4f}"
                + (f", train acc {record['train_acc']:.4f}" if record["train_acc"] is not None else "")
                + (f", eval acc {eval_acc:.4f}" if eval_acc is not None else "")
                + f", lr {record['lr']:.3g}, {record['seconds']:.1f}s"
                + (", observers frozen" if observers_frozen else "") + (", BN frozen" if bn_frozen else "")
            )
            logger.info(msg)
            if self.config.progress and _rank() == 0:
                from tqdm.auto import tqdm

                tqdm.write(msg)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint payload (collective under DDP: gathers every rank's RNG state)."""
        rng = _rng_state(self.train_loader)
        if _dist_on():
            gathered: list[Any] = [None] * _world()
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        observers_frozen, bn_frozen = self._schedule_flags()
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scheduler_step": self.scheduler_step,
            "history": [dict(h) for h in self.history],
            "rng": rngs,
            "world_size": _world(),
            "qat_schedule": {
                "freeze_observers_epoch": self.config.freeze_observers_epoch,
                "freeze_bn_epoch": self.config.freeze_bn_epoch,
                "observers_frozen": observers_frozen,
                "bn_frozen": bn_frozen,
            },
            "config": self.config.as_dict(),
        }

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the checkpoint (rank 0 writes; every rank must call it)."""
        path = os.fspath(path)
        payload = self.checkpoint_state()
        error: BaseException | None = None
        if _rank() == 0:
            try:
                _check_plain(payload)
                payload["checksum"] = payload_checksum(payload)
                _atomic_save(payload, path)
            except BaseException as e:  # noqa: BLE001 - re-raised after telling the other ranks
                error = e
        _agree(error, "saving the QAT checkpoint")
        if _dist_on():
            dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore model, optimizer, scheduler, epoch, history and (at the next
        :meth:`fit`) RNG states from a checkpoint. Everything is checked first; on
        any error the model and optimizer are left as they were."""
        path = os.fspath(path)
        ckpt = read_checkpoint(path)
        sd = ckpt["model"]
        own = self.module.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        # quantizer / observer buffers may legitimately change shape (lazily sized per-channel stats)
        resizable = tuple(f"{name}." for name, _ in quantizers(self.module))
        bad_shapes = sorted(
            f"{k} (model {tuple(own[k].shape)}, checkpoint {tuple(sd[k].shape)})"
            for k in set(own) & set(sd)
            if own[k].shape != sd[k].shape and not k.startswith(resizable)
        )
        if missing or unexpected or bad_shapes:
            def _fmt(keys: list[str]) -> str:
                return _summarize_keys(keys)

            parts = []
            if missing:
                parts.append(f"missing from the checkpoint: {_fmt(missing)}")
            if unexpected:
                parts.append(f"not in the model: {_fmt(unexpected)}")
            if bad_shapes:
                parts.append(f"shape mismatch: {_fmt(bad_shapes)}")
            raise ValueError(
                f"QATTrainer: checkpoint {path!r} does not match the model ({'; '.join(parts)}); "
                "resume with the same architecture and qconfig it was saved from. The model was not modified."
            )
        if (ckpt.get("scheduler") is None) != (self.scheduler is None):
            has = "has" if ckpt.get("scheduler") is not None else "has no"
            raise ValueError(
                f"QATTrainer: checkpoint {path!r} {has} scheduler state but the trainer "
                f"{'has no' if self.scheduler is None else 'has a'} scheduler; resume with the same setup"
            )
        saved_groups = ckpt["optimizer"].get("param_groups", [])
        own_groups = self.optimizer.param_groups
        if len(saved_groups) != len(own_groups) or any(
            len(s["params"]) != len(o["params"]) for s, o in zip(saved_groups, own_groups)
        ):
            raise ValueError(
                f"QATTrainer: the optimizer state in {path!r} has parameter groups of sizes "
                f"{[len(s['params']) for s in saved_groups]} but the optimizer has {[len(o['params']) for o in own_groups]}"
            )
        backup_model = {k: v.detach().clone() for k, v in own.items()}
        backup_opt = copy.deepcopy(self.optimizer.state_dict())
        backup_sched = None if self.scheduler is None else copy.deepcopy(self.scheduler.state_dict())
        try:
            self.module.load_state_dict(sd, strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        except Exception as e:
            self.module.load_state_dict(backup_model, strict=True)
            self.optimizer.load_state_dict(backup_opt)
            if self.scheduler is not None and backup_sched is not None:
                self.scheduler.load_state_dict(backup_sched)
            raise ValueError(f"QATTrainer: cannot restore checkpoint {path!r}: {e}. The model was not modified.") from e
        if ckpt.get("scheduler_step", self.scheduler_step) != self.scheduler_step:
            logger.warning("qtoolkit.qat: the checkpoint stepped its scheduler per %s, this trainer per %s",
                           ckpt["scheduler_step"], self.scheduler_step)
        sched = ckpt.get("qat_schedule", {})
        for key in ("freeze_observers_epoch", "freeze_bn_epoch"):
            if key in sched and sched[key] != getattr(self.config, key):
                logger.warning("qtoolkit.qat: checkpoint %s=%s but config has %s (using the config)",
                               key, sched[key], getattr(self.config, key))
        self.epoch = int(ckpt["epoch"])
        self.history = [dict(h) for h in ckpt.get("history", [])]
        rngs = ckpt.get("rng") or []
        self._pending_rng = rngs[_rank()] if _rank() < len(rngs) else (rngs[0] if rngs else None)


def fit_qat(
    model: nn.Module,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    config: QATConfig | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One-call QAT fine-tuning: ``QATTrainer(model, train_loader, optimizer, config=config, **kwargs).fit()``.

    Example::

        >>> import torch, qtoolkit as qt
        >>> from torch import nn
        >>> model = qt.prepare(nn.Sequential(nn.Linear(4, 2)), qat=True)
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> len(fit_qat(model, data, opt, QATConfig(epochs=2, progress=False)))
        2
    """
    return QATTrainer(model, train_loader, optimizer, config=config, **kwargs).fit()

"""The QAT fine-tuning loop: :class:`QATTrainer` (schedule, epochs, evaluation, checkpoints) and :func:`fit_qat`."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model, model_device, to_device
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.qat.checkpoint import (
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
from qtoolkit.qat.config import QATConfig
from qtoolkit.qat.distributed import _agree, _comm_device, _dist_on, _rank, _world, sync_quantizers, unwrap_model
from qtoolkit.qat.evaluation import _batch_target, _n_correct, evaluate_top1
from qtoolkit.qat.losses import distillation_loss
from qtoolkit.qat.model_checks import _check_qat_model
from qtoolkit.toggles import disable_observers, freeze_bn, observers_disabled, quantizers

__all__ = ["QATTrainer", "fit_qat", "distillation_loss"]

logger = logging.getLogger("qtoolkit.qat")

_SCHEDULER_STEPS = ("batch", "epoch")


class QATTrainer:
    """Fine-tune a QAT-prepared model with the observer / BN freeze schedule.

    Args:
        model: ``qtoolkit.prepare(float_model, qconfig, qat=True)`` (BN live), or a
            calibrated / reconstructed PTQ model (``prepare(..., qat=False)``, BN folded;
            see :func:`~qtoolkit.qat.start_from_prepared`), which trains in its folded
            form with the ranges it has; optionally wrapped in ``DistributedDataParallel``
            (call ``torch.distributed.init_process_group`` first).
        train_loader: iterable of ``(input, target)`` pairs (or dicts); a
            ``DistributedSampler``'s ``set_epoch`` is called every epoch.
        optimizer: built on ``model.parameters()`` of the *prepared* model
            (``prepare`` returns a copy of the float model).
        config: a :class:`QATConfig` (default ``QATConfig()``).
        scheduler: optional LR scheduler, stepped according to ``scheduler_step``.
        scheduler_step: ``"epoch"`` (``scheduler.step()`` after each epoch) or
            ``"batch"`` (after each optimizer step).
        loss_fn: ``loss_fn(output, target)``; default ``nn.CrossEntropyLoss()``.
        teacher: optional float model to distil from (knowledge distillation, Hinton et al. 2015):
            each step it runs on the same input without gradients (in eval mode) and the loss becomes
            ``(1 − w) · loss_fn(output, target) + w · T² · KL(softmax(teacher/T) ‖ softmax(output/T))``
            with ``w = config.distill_weight`` and ``T = config.distill_temperature`` (``w = 1``: the
            labels are not used). Typically the FP32 model the quantized one was prepared from.
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
        teacher: nn.Module | None = None,
    ) -> None:
        error: BaseException | None = None
        try:
            self._setup(model, train_loader, optimizer, config, scheduler, scheduler_step, loss_fn,
                        eval_loader, eval_fn, checkpoint_path, resume, teacher)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            error = e
        _agree(error, "QATTrainer setup")

    # ------------------------------------------------------------------ setup
    def _setup(self, model, train_loader, optimizer, config, scheduler, scheduler_step, loss_fn,
               eval_loader, eval_fn, checkpoint_path, resume, teacher=None) -> None:
        config = QATConfig() if config is None else config
        if not isinstance(config, QATConfig):
            raise TypeError(f"QATTrainer: config must be a QATConfig, got {type(config).__name__}")
        if scheduler_step not in _SCHEDULER_STEPS:
            raise ValueError(f"QATTrainer: scheduler_step must be one of {_SCHEDULER_STEPS}, got {scheduler_step!r}")
        if eval_loader is not None and eval_fn is not None:
            raise ValueError("QATTrainer: pass eval_loader or eval_fn, not both")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"QATTrainer: teacher must be an nn.Module (the float model to distil from), got {type(teacher).__name__}")
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

        if teacher is not None:
            if teacher is module or {id(p) for p in teacher.parameters()} & {id(p) for p in module.parameters()}:
                raise ValueError("QATTrainer: the teacher shares parameters with the model being trained; pass the float "
                                 "model (qtoolkit.prepare returns a copy, so the original float model works)")
            teacher.to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.teacher = teacher
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
        #: training curve: one record every ``config.log_interval`` steps (``step``, fractional ``epoch``,
        #: ``train_loss`` / ``train_acc`` over those steps on this rank) and, every
        #: ``config.eval_every_batches`` steps, ``eval_acc``
        self.curve: list[dict[str, Any]] = []
        self.global_step = 0
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

    def _steps_per_epoch(self) -> int | None:
        try:
            n: int | None = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            return self.config.max_batches_per_epoch
        limit = self.config.max_batches_per_epoch
        return n if limit is None or n is None else min(n, limit)

    def _batches(self) -> Iterator[Any]:
        limit = self.config.max_batches_per_epoch
        for i, batch in enumerate(self.train_loader):
            if limit is not None and i >= limit:
                break
            yield batch

    def _loss(self, out: Any, y: Any, x: Any) -> Tensor:
        """``loss_fn(out, y)``, blended with the distillation loss when there is a teacher."""
        if self.teacher is None:
            return self.loss_fn(out, y)
        w, t = self.config.distill_weight, self.config.distill_temperature
        with torch.no_grad():
            target = call_model(self.teacher, x)
        if not (isinstance(out, Tensor) and isinstance(target, Tensor) and out.shape == target.shape):
            raise ValueError(
                "QATTrainer: distillation needs the model and the teacher to return logits of the same shape, got "
                f"{getattr(out, 'shape', type(out).__name__)} and {getattr(target, 'shape', type(target).__name__)}"
            )
        kd = distillation_loss(out, target, t)
        return kd if w == 1.0 else (1.0 - w) * self.loss_fn(out, y) + w * kd

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
        n_steps = self._steps_per_epoch()
        window = (0.0, 0, 0.0, 0)  # loss sum, samples, correct, samples with accuracy at the last curve point
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            for step, batch in enumerate(self._batches()):
                x, y = to_device(batch_input(batch), dev), to_device(_batch_target(batch), dev)
                self.optimizer.zero_grad(set_to_none=True)
                out = call_model(self.model, x)
                loss = self._loss(out, y, x)
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
                self.global_step += 1
                if (step + 1) % self.config.log_interval == 0:
                    total_loss, total_correct = float(loss_sum), float(correct)
                    running = total_loss / n_loss
                    if not math.isfinite(running):
                        raise FloatingPointError(
                            f"QATTrainer: the training loss became {running} in epoch {epoch + 1} (batch {step + 1}); "
                            "lower the learning rate or set QATConfig.grad_clip"
                        )
                    d_loss, d_n = total_loss - window[0], n_loss - window[1]
                    d_acc, d_nacc = total_correct - window[2], n_acc - window[3]
                    window = (total_loss, n_loss, total_correct, n_acc)
                    self.curve.append({"step": self.global_step, "epoch": epoch + (step + 1) / n_steps if n_steps else None,
                                       "train_loss": d_loss / max(d_n, 1), "train_acc": d_acc / d_nacc if d_nacc else None})
                    if bar is not None:
                        bar.set_postfix(loss=f"{running:.4f}", acc=f"{total_correct / n_acc:.3f}" if n_acc else "-")
                every = self.config.eval_every_batches
                if every is not None and (step + 1) % every == 0 and (n_steps is None or step + 1 < n_steps):
                    acc = self.evaluate()
                    self.model.train()
                    self.curve.append({"step": self.global_step, "epoch": epoch + (step + 1) / n_steps if n_steps else None,
                                       "eval_acc": acc})
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
            "curve": [dict(c) for c in self.curve],
            "global_step": self.global_step,
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
        self.curve = [dict(c) for c in ckpt.get("curve", [])]
        self.global_step = int(ckpt.get("global_step", 0))
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

"""Train an FP32 baseline model (SGD + Nesterov, OneCycle or cosine schedule).

Writes, into ``--out``:

* ``<model>_<dataset>.pt``: the final ``state_dict`` (tensors only, loadable with
  ``torch.load(path, weights_only=True)``), written atomically;
* ``train_<model>_<dataset>.json`` / ``.md``: arguments, per-epoch loss/accuracy,
  wall time, final test top-1 and the checkpoint's sha256.

Example:
    python -m recipes.train_fp32 --model resnet20 --dataset fashion-mnist \\
        --epochs 20 --out recipes/checkpoints --threads 2
    python -m recipes.train_fp32 --max-batches 5 --epochs 1 --out /tmp/smoke   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qtoolkit.atomic import atomic_write
from recipes.data import DATASETS, get_loaders
from recipes.models import MODELS, build_model

__all__ = ["build_parser", "evaluate", "main", "sha256_file", "atomic_save"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file. Example: ``sha256_file("model.pt")``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """``write(file object)`` atomically onto ``path`` (:func:`qtoolkit.atomic.atomic_write`)."""
    atomic_write(path, write, make_dirs=True)


def atomic_save(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``.

    Example:
        >>> atomic_save({"w": torch.zeros(1)}, "/tmp/w.pt")  # doctest: +SKIP
    """
    _atomic_write(Path(path), lambda f: torch.save(state_dict, f))


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the FP32 trainer."""
    p = argparse.ArgumentParser(
        prog="python -m recipes.train_fp32",
        description="Train an FP32 baseline (SGD momentum 0.9 Nesterov, OneCycle/cosine).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS), help="architecture")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS), help="dataset")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine"], help="lr schedule (per step)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and augmentation")
    p.add_argument("--out", default="runs/fp32", help="output folder")
    p.add_argument("--data-dir", default=None, help="dataset folder (None: ./data, then system paths such as /usr/share/datasets)")
    p.add_argument("--download", action="store_true", help="allow downloading with torchvision")
    p.add_argument("--max-batches", type=int, default=None, help="limit batches per epoch (smoke)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="train on only this many (shuffled, different each epoch) batches per epoch; "
                   "the test set stays whole")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd: momentum 0.9 Nesterov; adamw: betas (0.9, 0.999) (use e.g. --lr 2e-3 --wd 0.05)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-memory loader)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast dtype (CUDA only; auto = bf16 if supported)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    return p


def _amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "fp16":
        return torch.float16
    if choice == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, top-1 accuracy in %)`` on ``loader``.

    Example:
        >>> loss, top1 = evaluate(model, test_loader, torch.device("cpu"))  # doctest: +SKIP
    """
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


def _markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [
        f"# FP32 training: {a['model']} on {a['dataset']}",
        "",
        f"- command: `{report['command']}`",
        f"- final test top-1: **{report['final_test_top1']:.2f}%**",
        f"- wall time: {report['wall_time_s']:.0f} s ({report['wall_time_s'] / 60:.1f} min)",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- sha256: `{report['sha256']}`",
        f"- device: {report['device']}, torch {report['torch']}, threads {report['threads']}",
        "",
        "## Arguments",
        "",
        "| arg | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in a.items()],
        "",
        "## Per epoch",
        "",
        "| epoch | lr (end) | train loss | train top-1 | test loss | test top-1 | time (s) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {e['epoch']} | {e['lr']:.5f} | {e['train_loss']:.4f} | {e['train_top1']:.2f} | "
            f"{e['test_loss']:.4f} | {e['test_top1']:.2f} | {e['time_s']:.1f} |"
            for e in report["epochs"]
        ],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; returns the report dict (also written as JSON/Markdown).

    Example:
        >>> report = main(["--epochs", "1", "--max-batches", "2", "--out", "/tmp/x"])  # doctest: +SKIP
        >>> report["final_test_top1"]  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    amp_dtype = _amp_dtype(args.amp, device)
    info = DATASETS[args.dataset]

    train_loader, test_loader = get_loaders(
        args.dataset, args.batch_size, args.data_dir, workers=args.workers, seed=args.seed,
        download=args.download,
    )
    if args.max_batches is not None and hasattr(train_loader, "max_batches"):
        train_loader.max_batches = args.max_batches
    steps_per_epoch = len(train_loader) if args.max_batches is None else min(len(train_loader), args.max_batches)
    if args.steps_per_epoch is not None:
        if args.steps_per_epoch < 1:
            raise ValueError(f"--steps-per-epoch must be >= 1, got {args.steps_per_epoch}")
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    total_steps = steps_per_epoch * args.epochs

    model = build_model(args.model, info.num_classes, info.in_channels)
    model = model.to(device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer: torch.optim.Optimizer
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    if args.schedule == "onecycle":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            # +1: OneCycleLR steps once in __init__; keeps the last step inside the schedule
            optimizer, max_lr=args.lr, total_steps=max(total_steps, 1) + 1, pct_start=0.25,
            div_factor=25.0, final_div_factor=1e3,
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()

    print(
        f"training {args.model} on {args.dataset} ({len(train_loader.dataset)} train / "
        f"{len(test_loader.dataset)} test, from {getattr(train_loader.dataset, 'source', '?')}) "
        f"on {device}, threads={torch.get_num_threads()}, amp={amp_dtype}, "
        f"{args.epochs} epochs x {steps_per_epoch} steps",
        flush=True,
    )
    epochs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}",
                   disable=args.no_progress, mininterval=5.0, file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = criterion(logits.float(), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = y.numel()
            seen += n
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.4f}", refresh=False)
        bar.close()
        test_loss, test_top1 = evaluate(model, test_loader, device, amp_dtype,
                                        max_batches=args.max_batches)
        rec = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            "test_loss": test_loss,
            "test_top1": test_top1,
            "time_s": time.perf_counter() - t0,
        }
        epochs.append(rec)
        print(
            f"epoch {epoch:3d}/{args.epochs} lr {rec['lr']:.5f} train loss {rec['train_loss']:.4f} "
            f"top1 {rec['train_top1']:.2f} | test loss {test_loss:.4f} top1 {test_top1:.2f} "
            f"| {rec['time_s']:.1f}s",
            flush=True,
        )
    wall = time.perf_counter() - t_start

    out = Path(args.out)
    stem = f"{args.model}_{args.dataset}"
    ckpt = out / f"{stem}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save(state, ckpt)
    digest = sha256_file(ckpt)
    report: dict[str, Any] = {
        "args": vars(args),
        "command": "python -m recipes.train_fp32 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "epochs": epochs,
        "final_test_top1": epochs[-1]["test_top1"] if epochs else float("nan"),
        "wall_time_s": wall,
        "checkpoint": str(ckpt),
        "sha256": digest,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "smoke": args.max_batches is not None,
    }
    _atomic_write(out / f"train_{stem}.json",
                  lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    _atomic_write(out / f"train_{stem}.md", lambda f: f.write(_markdown(report).encode()))
    print(f"saved {ckpt} (sha256 {digest}); final test top-1 {report['final_test_top1']:.2f}% "
          f"in {wall:.0f}s", flush=True)
    return report


if __name__ == "__main__":
    main()

"""Quantization-aware fine-tuning of an FP32 checkpoint (:class:`qtoolkit.qat.QATTrainer`).

QAT starts where PTQ ends (the default, ``--init reconstruct --bn folded``):

1. ``prepare(fp32, preset)`` — the PTQ form, BN folded into the weights as it is converted;
   ``--keep-8bit`` layers (default the stem ``conv1`` and the classifier ``fc``) at W8A8;
2. ``calibrate`` on ``--calib-batches`` training-split batches, then ``reconstruct``
   (``--recon-method``, default QDrop: learned rounding and activation step sizes, no labels);
   ``--init calibrate`` stops after calibration; ``--init PATH`` loads a prepared model saved by
   ``recipes.ptq`` / ``recipes.qat`` instead (its preset and kept layers are used). The start's
   test top-1 is recorded as ``init.top1``;
3. :func:`qtoolkit.qat.start_from_prepared`: observers off (the rounding and step sizes are kept;
   the weights start on their learned codes), ``--lsq`` makes the weight and activation scales
   parameters starting from their values;
4. the loss: cross-entropy on the labels, or with ``--distill W`` a blend with the distillation loss from the
   FP32 model's logits (``W = 1``: labels unused; :func:`qtoolkit.qat.distillation_loss`);
   SGD (momentum 0.9, Nesterov) at ``--lr`` (default 0.0005: from a reconstructed start a smaller step keeps
   what PTQ learned; torch.ao's QAT runs diverged at 0.01 with frozen BN/observers), the LSQ step sizes at
   ``--scale-lr`` times it without weight decay, cosine, linear-to-0 or one-cycle schedule per step;
   ``--label-smoothing``, ``--no-augment`` (no random crop / flip);
   BN statistics frozen from ``--freeze-bn-epoch``; test-set evaluation after
   every epoch (and every ``--eval-every`` steps); an atomic checkpoint after every epoch (``--resume``
   continues it); the training curve (loss / accuracy every 10 steps) in ``qat_results.json``.

``--bn live --init calibrate`` is the classic form instead: ``prepare(..., qat=True)`` keeps BN live
(batch statistics, folded-weight fake quantization), weight ranges keep tracking the weights until
``--freeze-observers-epoch``, ``--act-calibrator ema`` keeps moving-average activation ranges.

``--model package.module:Name --checkpoint PATH`` quantizes your own model class (see ``recipes.common``).

``--train-fraction`` trains on a fixed seeded subset of the training split (short runs).
Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel (gloo on CPU,
NCCL on GPU), each rank on its own shard; rank 0 writes the files.

Writes ``qat_<preset>.pt`` (prepared ``state_dict`` + metadata, for
``recipes.evaluate --quantized``), ``qat_checkpoint.pt`` and ``qat_results.json`` / ``.md``.

Example:
    python -m recipes.qat --preset w4a4 --epochs 1 --keep-8bit conv1,fc --out runs/qat      # from QDrop
    python -m recipes.qat --init runs/ptq/ptq_best_w4a4.pt --epochs 1 --out runs/qat        # from a saved PTQ model
    python -m recipes.qat --init calibrate --bn live --preset w4a4 --epochs 3 --out runs/qat_live
    torchrun --nproc-per-node 2 -m recipes.qat --epochs 3 --threads 1      # DDP on CPU (gloo)
    python -m recipes.qat --checkpoint /tmp/quick.pt --max-batches 2 --epochs 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import qtoolkit as qt
from qtoolkit.qat import QATConfig, QATTrainer, start_from_prepared
from recipes.common import (
    PERCENTILE_DEFAULT,
    add_common_args,
    command_line,
    env_info,
    load_fp32,
    load_prepared,
    make_overrides,
    make_qconfig,
    parse_list,
    predict,
    save_prepared,
    seed_everything,
    setup_threads,
    state_dict_bytes,
    top1,
    write_json,
    write_text,
)
from recipes.data import InMemoryImageDataset, TensorBatchLoader, get_calibration_loader, get_dataset

__all__ = ["build_parser", "main"]

LSQ_MIN_SCALE = 1e-8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.qat",
        description="QAT fine-tuning from an FP32 checkpoint (PTQ-calibrated init, observer/BN freeze schedule, "
        "per-epoch eval, atomic checkpoints, --resume, DDP under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(p, "runs/qat")
    p.add_argument("--preset", default="w4a4", help="qtoolkit preset")
    p.add_argument("--keep-8bit", default="conv1,fc", help="layers kept at W8A8 (comma-separated names/globs; '' for none)")
    p.add_argument("--epochs", type=int, default=3, help="epochs")
    p.add_argument("--lr", type=float, default=0.0005,
                   help="peak learning rate (<= 0.0025; from a reconstructed start 0.0005 ended at or above it in the runs "
                   "measured, 0.001-0.0025 at times below it)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (conv/linear weights only)")
    p.add_argument("--train-batch-size", type=int, default=128, help="training batch size (per rank)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "linear", "constant"],
                   help="lr schedule (per step; linear: decay to 0)")
    p.add_argument("--scale-lr", type=float, default=1.0,
                   help="--lsq: learning rate of the quantizer scales as a multiple of --lr (no weight decay on them)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    p.add_argument("--no-augment", action="store_true", help="train without random crop / flip")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this fraction of the training split")
    p.add_argument("--freeze-observers-epoch", type=int, default=2,
                   help="0-based epoch from which quantizer ranges are frozen (-1: never; --bn live only: a folded start "
                   "keeps its ranges frozen from the first step)")
    p.add_argument("--freeze-bn-epoch", type=int, default=2, help="0-based epoch from which BN statistics are frozen (-1: never)")
    p.add_argument("--lsq", action="store_true", help="learn the quantizer scales (LSQ) instead of tracking ranges")
    p.add_argument("--act-calibrator", default="mse",
                   help="activation calibrator of the PTQ init: mse / percentile / entropy give fixed calibrated ranges "
                   "(weights keep tracking); ema (the preset's minmax in QAT) keeps moving-average ranges until "
                   "--freeze-observers-epoch")
    p.add_argument("--percentile", type=float, default=PERCENTILE_DEFAULT, help="for --act-calibrator percentile")
    p.add_argument("--init", default="reconstruct",
                   help="starting point: 'reconstruct' (calibrate, then qtoolkit.reconstruct with --recon-method: learned "
                   "rounding and step sizes), 'calibrate' (calibration only), or the path of a prepared model saved by "
                   "recipes.ptq / recipes.qat (e.g. runs/ptq/ptq_best_w4a4.pt; its preset and --keep-8bit are used)")
    p.add_argument("--bn", default="folded", choices=["folded", "live"],
                   help="folded: train the PTQ form (BN folded into the weights, as converted); live: prepare(qat=True), "
                   "BN live with batch statistics (only with --init calibrate or a live-BN file)")
    p.add_argument("--recon-method", default="qdrop", help="qtoolkit.reconstruct method(s) for --init reconstruct")
    p.add_argument("--recon-iters", type=int, default=300, help="reconstruction steps per block (--init reconstruct)")
    p.add_argument("--recon-time-budget", type=float, default=60.0, help="seconds for the reconstruction (--init reconstruct)")
    p.add_argument("--bn-batches", type=int, default=50, help="batches for the BN re-estimation of a live-BN start")
    p.add_argument("--eval-every", type=int, default=None,
                   help="also evaluate every this many steps within an epoch (points of the QAT curve)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the PTQ calibration init (ranges from the first batches; "
                   "--bn live --init calibrate only)")
    p.add_argument("--calib-batches", type=int, default=32, help="calibration batches for the init (training split)")
    p.add_argument("--calib-batch-size", type=int, default=64, help="calibration batch size")
    p.add_argument("--no-eval-init", action="store_true", help="skip evaluating the calibrated model before training")
    p.add_argument("--eval-max-batches", type=int, default=None,
                   help="evaluate on at most this many test batches (quick comparisons; default: the whole test set)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the distillation loss from the FP32 model's logits (0: cross-entropy on the labels "
                   "only; 1: distillation only, labels unused)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature of the distillation loss")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-path if it exists")
    p.add_argument("--checkpoint-path", default=None, help="QAT checkpoint (default: <out>/qat_checkpoint.pt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--fp32-top1", type=float, default=None, help="FP32 top-1 to report the drop against")
    return p


def _subset(ds: InMemoryImageDataset, idx: torch.Tensor, augment: bool) -> InMemoryImageDataset:
    return InMemoryImageDataset(ds.images[idx], ds.labels[idx], tuple(ds.mean.flatten().tolist()),
                                tuple(ds.std.flatten().tolist()), augment, ds.pad, source=ds.source)


def _dist_setup(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _loss_words(a: dict[str, Any]) -> str:
    """The training loss in words, from the recorded arguments."""
    w = a.get("distill") or 0.0
    if w <= 0:
        return "cross-entropy on the labels"
    kd = f"distillation from the FP32 model's logits (temperature {a.get('distill_temperature', 1.0)})"
    return kd + (", labels unused" if w >= 1 else f" x {w} + cross-entropy x {1 - w:g}")


def _markdown(res: dict[str, Any]) -> str:
    from recipes.report import fmt_bytes, md_table

    a = res["args"]
    lines = [
        f"# QAT: {a['model']} on {a['dataset']}, {a['preset']}{' + LSQ' if a['lsq'] else ''}",
        "",
        f"- command: `{res['command']}`",
        f"- FP32 checkpoint: `{res['checkpoint']['path']}`" + (f", FP32 top-1 {res['fp32_top1']:.2f}%" if res["fp32_top1"] else ""),
        f"- kept at W8A8: {', '.join(res['keep_8bit']) or 'none'}; activation calibrator: {res['act_calibrator']}",
        f"- training subset: {res['train_samples']} samples ({100 * a['train_fraction']:.0f}% of the training split), "
        f"{res['steps_per_epoch']} steps/epoch x {a['epochs']} epochs, batch {a['train_batch_size']} x {res['world_size']} rank(s)",
        f"- loss: {_loss_words(a)}" + (f", label smoothing {a['label_smoothing']}" if a.get("label_smoothing") else "")
        + f"; weight decay {a['wd']}" + ("; no augmentation" if a.get("no_augment") else ""),
        f"- lr {a['lr']} ({a['schedule']})" + (f", LSQ step sizes at {a.get('scale_lr', 1.0):g}x" if a["lsq"] else "")
        + f", freeze observers at epoch {a['freeze_observers_epoch']}, BN at {a['freeze_bn_epoch']}",
        f"- final fake-quant top-1: **{res['top1']:.2f}%**" + (f" (drop {res['drop_pt']:+.2f} pt)" if res["drop_pt"] is not None else "")
        + f", converted size {fmt_bytes(res['size_bytes'])}, training time {res['train_time_s']:.0f} s "
        "(incl. the per-epoch test evaluation)",
    ]
    if res["init"].get("top1") is not None:
        i = res["init"]
        lines.append(f"- start ({i.get('source', 'calibrate')}: {i['calibrator']}"
                     + (f" + {i['method']}" if i.get("method") and i["method"] != "none" else "")
                     + f", BN {i.get('bn', 'live')}), before training: {i['top1']:.2f}%")
    if res["smoke"]:
        lines.append("- SMOKE RUN (--max-batches)")
    lines += ["", ""]
    lines += md_table(["epoch", "lr", "train loss", "train top-1 (%)", "test top-1 (%)", "time (s)", "observers frozen", "BN frozen"],
                      [[h["epoch"], f"{h['lr']:.5f}", f"{h['train_loss']:.4f}",
                        f"{100 * h['train_acc']:.2f}" if h["train_acc"] is not None else "-",
                        f"{100 * h['eval_acc']:.2f}" if h["eval_acc"] is not None else "-", f"{h['seconds']:.0f}",
                        h["observers_frozen"], h["bn_frozen"]] for h in res["history"]])
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune; returns the results dict (also written to ``--out`` on rank 0)."""
    args = build_parser().parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("qat: --epochs must be >= 1")
    if not 0.0 < args.train_fraction <= 1.0:
        raise SystemExit("qat: --train-fraction must be in (0, 1]")
    setup_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rank, world = _dist_setup(device)
    seed_everything(args.seed + rank)
    progress = not args.no_progress and rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(args.checkpoint_path) if args.checkpoint_path else out / "qat_checkpoint.pt"
    keep8 = parse_list(args.keep_8bit)
    t_start = time.perf_counter()

    fp32, ckpt = load_fp32(args.model, args.dataset, args.checkpoint)
    init_file = args.init not in ("reconstruct", "calibrate")
    file_meta: dict[str, Any] | None = None
    if init_file:
        qm, file_meta = load_prepared(args.init, fp32)
        live = bool(file_meta.get("qat"))
        args.preset = file_meta["preset"]
        keep8 = list(file_meta.get("keep_8bit") or [])
        args.act_calibrator = file_meta.get("calibrator") or args.act_calibrator
        qc = make_qconfig(args.preset, args.act_calibrator)
    else:
        live = args.bn == "live"
        if live and args.init == "reconstruct":
            raise SystemExit("qat: --init reconstruct works on the BN-folded PTQ form; use --bn folded (the default), "
                             "or --init calibrate with --bn live")
        if args.no_calibrate and not live:
            raise SystemExit("qat: --no-calibrate needs --bn live --init calibrate (a folded start trains with the ranges "
                             "it was calibrated with)")
        kw = {"percentile": args.percentile, "lsq": args.lsq and live}
        qc = make_qconfig(args.preset, args.act_calibrator, **kw)
        qm = qt.prepare(fp32, qc, qat=live, overrides=make_overrides(keep8, args.act_calibrator, **kw))
    qm.to(device)
    act_cal = next((fq.config.calibrator for _, fq in qt.quantizers(qm) if fq.role == "activation"), None)

    # data: a fixed seeded subset of the training split, sharded over ranks; the full test split
    train_full = get_dataset(args.dataset, "train", args.data_dir, augment=not args.no_augment, download=args.download)
    n = max(1, int(round(args.train_fraction * len(train_full))))
    perm = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(args.seed))[:n]
    per_rank = max(1, n // world)
    train_ds = _subset(train_full, perm[rank * per_rank:(rank + 1) * per_rank], augment=not args.no_augment)
    train_loader = TensorBatchLoader(train_ds, args.train_batch_size, shuffle=True, drop_last=False,
                                     seed=args.seed + 1000 * rank)
    test_full = get_dataset(args.dataset, "test", args.data_dir, augment=False, download=args.download)
    test_ds = test_full if world == 1 else _subset(test_full, torch.arange(rank, len(test_full), world), augment=False)
    test_loader = TensorBatchLoader(test_ds, args.batch_size, shuffle=False)
    steps = len(train_loader) if args.max_batches is None else min(len(train_loader), args.max_batches)

    limits = [b for b in (args.max_batches, args.eval_max_batches) if b is not None]
    eval_batches = min(limits) if limits else None
    resume = args.resume and ckpt_path.is_file()
    if args.resume and not resume and rank == 0:
        print(f"[qat] --resume: no checkpoint at {ckpt_path}, starting from scratch", flush=True)

    if args.no_calibrate and not resume and any(fq.uses_histogram for _, fq in qt.quantizers(qm)):
        raise SystemExit(f"qat: --no-calibrate needs a range-tracking activation calibrator (--act-calibrator ema), "
                         f"not {args.act_calibrator!r}, whose range search runs only in calibrate()")
    init: dict[str, Any] = {"calibrator": act_cal, "top1": None, "calibration_s": None, "reconstruct_s": None,
                            "method": None, "source": args.init, "bn": "live" if live else "folded"}
    previous = out / "qat_results.json"
    if resume and previous.is_file():  # keep the PTQ-init numbers of the run being resumed
        import json

        init = json.loads(previous.read_text()).get("init", init)
    n_calib = args.calib_batches if args.max_batches is None else min(args.calib_batches, args.max_batches)
    calib = get_calibration_loader(args.dataset, args.calib_batch_size, n_calib, args.data_dir, args.seed, args.download)
    if resume:
        # the structure (LSQ parameters) is rebuilt from the checkpoint's state before the trainer restores it
        from qtoolkit.qat import read_checkpoint

        qm.load_state_dict(read_checkpoint(ckpt_path)["model"], strict=True)
        if not live:
            start_from_prepared(qm, lsq=args.lsq)
    elif init_file:
        init["method"] = (file_meta or {}).get("method")
        start_from_prepared(qm, lsq=args.lsq, data=calib if live else None, bn_batches=args.bn_batches)
    elif not args.no_calibrate:
        t0 = time.perf_counter()
        qt.calibrate(qm, calib, progress=False)
        init["calibration_s"] = time.perf_counter() - t0
        if live:
            # keep tracking ranges while training: weights and moving-average activation ranges; with LSQ only
            # the observe-only output quantizers (requantization ranges for convert); histogram-calibrated
            # (percentile / entropy / mse) ranges stay as calibrated
            for _, fq in qt.quantizers(qm):
                if fq.uses_histogram or (args.lsq and fq.role != "output"):
                    continue
                fq.enable_observer(True)
        else:
            if args.init == "reconstruct":
                t0 = time.perf_counter()
                qt.reconstruct(qm, calib, args.recon_method, iters=args.recon_iters, time_budget_s=args.recon_time_budget,
                               seed=args.seed, progress=progress)
                init["reconstruct_s"] = time.perf_counter() - t0
                init["method"] = args.recon_method
            start_from_prepared(qm, lsq=args.lsq)
    if not resume and not args.no_eval_init and rank == 0:
        full = test_loader if world == 1 else TensorBatchLoader(test_full, args.batch_size, shuffle=False)
        preds, labels, _ = predict(qm, full, max_batches=eval_batches, desc="QAT init", progress=progress)
        init["top1"] = top1(preds, labels)
        print(f"[qat] start ({init['source']}, {act_cal}{' + ' + init['method'] if init['method'] else ''}, BN "
              f"{init['bn']}) top-1 {init['top1']:.2f}%", flush=True)
    qm.train()

    scale_ids = {id(fq.scale) for _, fq in qt.quantizers(qm) if isinstance(fq.scale, torch.nn.Parameter)}
    decay = [p for name, p in qm.named_parameters() if p.ndim > 1 and id(p) not in scale_ids]
    no_decay = [p for name, p in qm.named_parameters() if p.ndim <= 1 and id(p) not in scale_ids]
    scales = [p for name, p in qm.named_parameters() if id(p) in scale_ids]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "lr": args.lr * args.scale_lr})
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0)
    if args.lsq:  # keep learned step sizes positive (a large early step can flip a small scale's sign)
        lsq_scales = [fq.scale for _, fq in qt.quantizers(qm) if isinstance(fq.scale, torch.nn.Parameter)]

        def _positive_scales(optimizer: Any, *_: Any) -> None:
            with torch.no_grad():
                for sc in lsq_scales:
                    sc.clamp_(min=LSQ_MIN_SCALE)

        opt.register_step_post_hook(_positive_scales)
    total = max(1, steps * args.epochs)
    if args.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total + 1, pct_start=0.1,
                                                    div_factor=10.0, final_div_factor=100.0)
    elif args.schedule == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total))
    else:
        sched = None
    model: torch.nn.Module = qm
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(qm, device_ids=[device.index or 0] if device.type == "cuda" else None)
    cfg = QATConfig(
        epochs=args.epochs, eval_every_batches=args.eval_every,
        freeze_observers_epoch=None if args.freeze_observers_epoch < 0 else args.freeze_observers_epoch,
        freeze_bn_epoch=None if args.freeze_bn_epoch < 0 else args.freeze_bn_epoch,
        max_batches_per_epoch=args.max_batches, max_eval_batches=eval_batches,
        grad_clip=args.grad_clip, device=device, progress=progress,
        distill_weight=args.distill, distill_temperature=args.distill_temperature,
    )
    teacher = fp32 if args.distill > 0 else None
    trainer = QATTrainer(model, train_loader, opt, config=cfg, scheduler=sched, scheduler_step="batch",
                         eval_loader=test_loader, checkpoint_path=ckpt_path, resume=resume,
                         teacher=teacher, loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing))
    if resume:
        train_loader.epoch = trainer.epoch  # TensorBatchLoader's data order is seeded per epoch
        if rank == 0:
            print(f"[qat] resumed from {ckpt_path} after epoch {trainer.epoch}", flush=True)
    if rank == 0:
        print(f"[qat] {args.preset} ({act_cal}{', LSQ' if args.lsq else ''}), keep W8A8: {keep8 or 'none'}; "
              f"{len(train_ds) * world} training samples, {steps} steps/epoch x {args.epochs} epochs, "
              f"world size {world}, threads {torch.get_num_threads()}", flush=True)
    history = trainer.fit()

    res: dict[str, Any] = {}
    if rank == 0:
        qm.eval()
        final = history[-1]["eval_acc"]
        top = 100.0 * final if final is not None else float("nan")
        meta = {"model": args.model, "dataset": args.dataset, "preset": args.preset, "calibrator": args.act_calibrator,
                "percentile": args.percentile, "per_tensor_weights": False, "lsq": args.lsq, "keep_8bit": keep8,
                "qat": live, "top1": top, "method": f"{init.get('method') or 'none'}+qat"}
        saved = save_prepared(out / f"qat_{args.preset}.pt", qm, meta)
        try:
            size = state_dict_bytes(qt.convert(qm))
        except RuntimeError as e:  # e.g. a never-run layer without ranges
            print(f"[qat] convert failed: {e}", flush=True)
            size = None
        res = {
            "args": vars(args),
            "command": command_line("recipes.qat", argv),
            "checkpoint": ckpt,
            "smoke": args.max_batches is not None,
            "weight_bits": qc.weight.spec.bits,
            "activation_bits": qc.activation.spec.bits if qc.activation is not None else None,
            "keep_8bit": keep8,
            "act_calibrator": act_cal,
            "world_size": world,
            "train_samples": len(train_ds) * world,
            "steps_per_epoch": steps,
            "init": init,
            "history": history,
            "curve": trainer.curve,
            "epochs_done": len(history),
            "top1": top,
            "fp32_top1": args.fp32_top1,
            "drop_pt": None if args.fp32_top1 is None else args.fp32_top1 - top,
            "train_time_s": sum(h["seconds"] for h in history),
            "size_bytes": size,
            "saved": str(saved),
            "checkpoint_path": str(ckpt_path),
            "wall_time_s": time.perf_counter() - t_start,
            "env": env_info(),
        }
        write_json(out / "qat_results.json", res)
        write_text(out / "qat_results.md", _markdown(res))
        print(f"[qat] final fake-quant top-1 {top:.2f}% after {len(history)} epoch(s); wrote {out / 'qat_results.json'}",
              flush=True)
    if world > 1:
        dist.barrier()
    return res


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0)

"""The main job: FP32 -> PTQ sweep -> short QAT -> int8 conversion check -> report.

``bash scripts/main.sh`` runs this after ``scripts/setup.sh``. Offline default:
Fashion-MNIST (Debian package ``dataset-fashion-mnist``, installed with apt-get when
missing and running as root) and the shipped ResNet-20 checkpoint
``recipes/checkpoints/resnet20_fashion-mnist.pt`` (sha256-verified).

Steps (each one is also a standalone recipe; the exact commands are recorded):

1. FP32 test top-1 (:mod:`recipes.evaluate`);
2. PTQ at W8A8 and W4A8 with the minmax, percentile, entropy and MSE calibrators
   (:mod:`recipes.ptq`; calibration on the training split);
2b. PTQ without training or labels (``--recon-method``, default QDrop, :func:`qtoolkit.reconstruct`, within
   ``--recon-time-budget`` seconds per model): W4A4 on all layers, W4A4 with mixed precision at 1.1x its weight
   bytes (:func:`qtoolkit.mixed_precision`), W4A8, and W4A4 / W2A4 with the stem and the classifier at W8A8;
3. QAT at W4A4 (``--qat-preset``), the stem and the classifier at W8A8, starting from the QDrop model of
   step 2b (learned rounding and step sizes kept, BN folded; :mod:`recipes.qat` ``--init <that model>``),
   ``--qat-epochs`` on ``--qat-train-fraction`` of the training set, with its training curve;
4. the best W8A8 model converted to int8 and evaluated with reference and integer-only
   execution, plus argmax agreement with its fake-quant twin (``ptq --integer-check``);
5. ``report/``: ``results.md``, ``results.json``, ``accuracy_vs_bits.png``,
   ``activation_histograms.png``, ``qat_curves.png`` (:mod:`recipes.report`).

For ``--dataset cifar10`` without ``--checkpoint`` an FP32 model is trained first with
:mod:`recipes.train_fp32` (the estimated time is printed before it starts).

Example:
    bash scripts/main.sh
    bash scripts/main.sh --dataset cifar10 --data-dir ~/data --threads 2
    python -m recipes.main_job --checkpoint /tmp/quick.pt --max-batches 2 --out /tmp/report   # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qtoolkit.kernels.cpuinfo import cpu_report
from recipes import evaluate as evaluate_recipe
from recipes import ptq as ptq_recipe
from recipes import qat as qat_recipe
from recipes import train_fp32
from recipes.checkpoints import SHIPPED
from recipes.common import command_line, env_info, parse_list
from recipes.data import DATASETS, DatasetNotFoundError, get_dataset
from recipes.models import MODELS, build_model
from recipes.report import build_report

__all__ = ["build_parser", "main", "ensure_dataset", "estimate_fp32_training"]

# Time budget of the default main job (<= 15 min on 2 CPU cores). The QAT step (3) fine-tunes the W4A4 model that
# step 2b reconstructed with QDrop (conv1 / fc at W8A8) for one epoch on the whole training set, in the BN-folded form
# whose training step costs about an FP32 step (scripts/bench_core.py --only qat_step); W4A8 QAT is not run by
# default (add it with --qat-preset w4a4,w4a8: it reconstructs its own start, ~+4 min).
QAT_EPOCHS_DEFAULT = 1
QAT_FRACTION_DEFAULT = 1.0
QAT_LR_DEFAULT = 0.0005
QAT_WD_DEFAULT = 5e-4
QAT_DISTILL_DEFAULT = 0.0
QAT_EVAL_EVERY_DEFAULT = 160
# PTQ reconstruction (step 2b): five models (W4A4 uniform and mixed precision, W4A8, W4A4 and W2A4 with the stem and
# the classifier at W8A8), each reconstruction within this many seconds
RECON_BUDGET_DEFAULT = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.main_job",
        description="End to end: FP32 eval, PTQ sweep (W8A8/W4A8 x 4 calibrators), short W4A4 QAT, "
        "int8 conversion check, report/ (Markdown, JSON, PNG plots).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS), help="dataset")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: ./data, then /usr/share/datasets)")
    p.add_argument("--download", action="store_true", help="allow downloading the dataset with torchvision")
    p.add_argument("--model", default="resnet20",
                   help=f"architecture ({', '.join(sorted(MODELS))}) or your own 'package.module:Name' with --checkpoint")
    p.add_argument("--checkpoint", default=None,
                   help="FP32 checkpoint (default: the shipped one; cifar10: trained first with recipes.train_fp32)")
    p.add_argument("--fp32-epochs", type=int, default=15, help="epochs when an FP32 model has to be trained first")
    p.add_argument("--out", default="report", help="report folder")
    p.add_argument("--work-dir", default="runs/main_job", help="folder for the recipes' own outputs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--calib-batches", type=int, default=32, help="PTQ calibration batches (x64 training samples)")
    p.add_argument("--presets", default="w8a8,w4a8", help="PTQ presets")
    p.add_argument("--calibrators", default="minmax,percentile,entropy,mse", help="PTQ calibrators")
    p.add_argument("--keep-8bit", default="conv1,fc", help="layers kept at W8A8 in the 4-bit PTQ presets and in QAT")
    p.add_argument("--qat-preset", default="w4a4", help="QAT preset(s), comma-separated, run in order (each starts "
                   "from its reconstructed model of step 2b when there is one, e.g. w4a4; otherwise it reconstructs)")
    p.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS_DEFAULT, help="QAT epochs")
    p.add_argument("--qat-train-fraction", type=float, default=QAT_FRACTION_DEFAULT, help="QAT training-set fraction")
    p.add_argument("--qat-lr", type=float, default=QAT_LR_DEFAULT, help="QAT learning rate")
    p.add_argument("--qat-wd", type=float, default=QAT_WD_DEFAULT, help="QAT weight decay (conv/linear weights)")
    p.add_argument("--qat-distill", type=float, default=QAT_DISTILL_DEFAULT,
                   help="QAT: weight of the distillation loss from the FP32 model's logits (1: labels unused)")
    p.add_argument("--qat-eval-every", type=int, default=QAT_EVAL_EVERY_DEFAULT,
                   help="test-set evaluations every this many QAT steps (points of the QAT curve; 0: epoch ends only)")
    p.add_argument("--qat-args", default="", help="extra arguments for recipes.qat, e.g. '--lsq --act-calibrator mse'")
    p.add_argument("--recon-method", default="qdrop", help="PTQ reconstruction method of step 2b (qtoolkit.reconstruct)")
    p.add_argument("--recon-calibrator", default="mse", help="activation calibrator before the reconstruction")
    p.add_argument("--recon-iters", type=int, default=300, help="reconstruction steps per block (step 2b)")
    p.add_argument("--recon-time-budget", type=float, default=RECON_BUDGET_DEFAULT,
                   help="seconds per reconstructed model (step 2b)")
    p.add_argument("--skip-reconstruction", action="store_true", help="skip step 2b")
    p.add_argument("--skip-qat", action="store_true", help="skip step 3")
    p.add_argument("--skip-integer-check", action="store_true", help="skip step 4")
    p.add_argument("--no-install", action="store_true", help="never apt-get install the dataset")
    p.add_argument("--max-batches", type=int, default=None, help="smoke run: batches per evaluation/epoch/calibration")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    return p


def _log(msg: str) -> None:
    print(f"[main_job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_dataset(dataset: str, data_dir: str | None, download: bool, allow_install: bool) -> str:
    """Make sure the dataset is readable; install Fashion-MNIST from Debian if possible.

    Returns where it was found. Raises SystemExit with instructions otherwise.
    """
    try:
        return get_dataset(dataset, "test", data_dir, download=download).source
    except DatasetNotFoundError as e:
        missing = e
    if dataset == "fashion-mnist" and allow_install:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        apt = shutil.which("apt-get")
        if is_root and apt:
            _log("Fashion-MNIST not found: apt-get install -y dataset-fashion-mnist")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            rc = subprocess.call([apt, "install", "-y", "dataset-fashion-mnist"], env=env)
            if rc != 0:
                _log("apt-get install failed; trying apt-get update first")
                subprocess.call([apt, "update"], env=env)
                rc = subprocess.call([apt, "install", "-y", "dataset-fashion-mnist"], env=env)
            if rc == 0:
                return get_dataset(dataset, "test", data_dir, download=download).source
            _log(f"apt-get install -y dataset-fashion-mnist failed (exit {rc})")
        else:
            why = "not running as root" if not is_root else "apt-get not available"
            _log(f"Fashion-MNIST not found and cannot install it automatically ({why}).")
    raise SystemExit(
        f"main_job: the {dataset} dataset is not available.\n{missing}\n"
        + ("As root: apt-get install -y dataset-fashion-mnist\n" if dataset == "fashion-mnist" else "")
    )


def estimate_fp32_training(model: str, dataset: str, epochs: int, batch_size: int = 128, steps: int = 3) -> float:
    """Seconds for ``epochs`` of FP32 training, from a few timed steps on random data."""
    info = DATASETS[dataset]
    net = build_model(model, info.num_classes, info.in_channels).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, info.in_channels, info.image_size, info.image_size)
    y = torch.randint(0, info.num_classes, (batch_size,))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = sorted(times[1:])[len(times[1:]) // 2]
    n_train = {"cifar10": 50_000, "fashion-mnist": 60_000}[dataset]
    # + ~1/3 of a training step per test batch-equivalent for the per-epoch evaluation
    return per_step * (n_train / batch_size) * epochs * 1.15


def _resolve_checkpoint(args: argparse.Namespace, commands: list[str]) -> tuple[str | None, bool]:
    """The FP32 checkpoint to use (None = shipped) and whether it was trained here."""
    if args.checkpoint is not None:
        return args.checkpoint, False
    name = f"{args.model}_{args.dataset}"
    if name in SHIPPED:
        return None, False  # load_shipped verifies the sha256 (and explains if it is not pinned yet)
    est = estimate_fp32_training(args.model, args.dataset, args.fp32_epochs)
    _log(f"no FP32 checkpoint for {name}: training one first ({args.fp32_epochs} epochs). Estimated from timed "
         f"steps on this machine: about {est / 60:.0f} min (pass --checkpoint to skip this).")
    out = Path(args.work_dir) / "fp32"
    argv = ["--model", args.model, "--dataset", args.dataset, "--epochs", str(args.fp32_epochs), "--out", str(out),
            "--seed", str(args.seed)] + (["--data-dir", args.data_dir] if args.data_dir else []) \
        + (["--download"] if args.download else []) + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--max-batches", str(args.max_batches)] if args.max_batches else []) \
        + (["--no-progress"] if args.no_progress else [])
    commands.append(command_line("recipes.train_fp32", argv))
    report = train_fp32.main(argv)
    _log(f"FP32 training done: top-1 {report['final_test_top1']:.2f}% in {report['wall_time_s'] / 60:.1f} min")
    return report["checkpoint"], True


def _qat_start(recon_runs: list[dict[str, Any]], preset: str, args: argparse.Namespace) -> str:
    """``--init`` of a QAT run: the saved reconstructed model of ``preset`` with the same kept layers (step 2b),
    else ``reconstruct`` (the QAT recipe reconstructs it itself)."""
    keep = parse_list(args.keep_8bit)
    for run in recon_runs:
        best = run.get("best", {}).get(preset)
        if best and (run.get("keep_8bit") or []) == keep and Path(best["path"]).is_file():
            return str(best["path"])
    return "reconstruct"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the main job; returns the report dict (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    commands: list[str] = []

    if ":" in args.model and args.checkpoint is None:
        raise SystemExit(f"main_job: --model {args.model} (your own class) needs --checkpoint with its FP32 weights")
    source = ensure_dataset(args.dataset, args.data_dir, args.download, not args.no_install)
    _log(f"dataset {args.dataset} from {source}; threads {torch.get_num_threads()}")

    common = ["--model", args.model, "--dataset", args.dataset, "--seed", str(args.seed)]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    common += ["--download"] if args.download else []
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--max-batches", str(args.max_batches)] if args.max_batches else []
    common += ["--no-progress"] if args.no_progress else []

    t0 = time.perf_counter()
    checkpoint, trained_here = _resolve_checkpoint(args, commands)
    steps["fp32_training"] = time.perf_counter() - t0
    common += ["--checkpoint", checkpoint] if checkpoint else []

    # 1. FP32
    t0 = time.perf_counter()
    ev_argv = common + ["--out", str(work / "eval")]
    commands.append(command_line("recipes.evaluate", ev_argv))
    ev = evaluate_recipe.main(ev_argv)
    fp32 = ev["fp32"]
    steps["1_fp32_eval"] = time.perf_counter() - t0
    _log(f"step 1 FP32 top-1 {fp32['top1']:.2f}% ({steps['1_fp32_eval']:.0f} s)")

    # 2 + 4. PTQ sweep and the int8 check of the best W8A8 model
    t0 = time.perf_counter()
    ptq_argv = common + ["--out", str(work / "ptq"), "--presets", args.presets, "--calibrators", args.calibrators,
                         "--calib-batches", str(args.calib_batches), "--keep-8bit", args.keep_8bit,
                         "--fp32-top1", repr(fp32["top1"])]
    ptq_argv += [] if args.skip_integer_check else ["--integer-check"]
    commands.append(command_line("recipes.ptq", ptq_argv))
    ptq = ptq_recipe.main(ptq_argv)
    steps["2_4_ptq_and_int8_check"] = time.perf_counter() - t0
    _log(f"steps 2+4 PTQ sweep{'' if args.skip_integer_check else ' + int8 check'} ({steps['2_4_ptq_and_int8_check']:.0f} s)")
    hist = None
    hist_path = work / "ptq" / "ptq_histograms.json"
    if hist_path.is_file():
        import json

        hist = json.loads(hist_path.read_text())

    # 2b. PTQ without training: reconstruction (and mixed precision) at 4 and 2 bits, no labels used
    recon_runs: list[dict[str, Any]] = []
    if not args.skip_reconstruction:
        t0 = time.perf_counter()
        recon_common = common + ["--calibrators", args.recon_calibrator, "--calib-batches", str(args.calib_batches),
                                 "--method", args.recon_method, "--recon-time-budget", str(args.recon_time_budget),
                                 "--recon-iters", str(args.recon_iters),
                                 "--fp32-top1", repr(fp32["top1"]), "--hist-layers", ""]
        for name, extra in (
            ("w4a4_all", ["--presets", "w4a4", "--mixed-precision", "--size-budget", "1.1", "--sensitivity"]),
            ("w4a8_all", ["--presets", "w4a8"]),
            ("keep8", ["--presets", "w4a4,w2a4", "--keep-8bit", args.keep_8bit]),
        ):
            argv_r = recon_common + ["--out", str(work / f"ptq_{args.recon_method}_{name}")] + extra
            commands.append(command_line("recipes.ptq", argv_r))
            recon_runs.append(ptq_recipe.main(argv_r))
        steps["2b_ptq_reconstruction"] = time.perf_counter() - t0
        _log(f"step 2b PTQ reconstruction ({args.recon_method}) ({steps['2b_ptq_reconstruction']:.0f} s)")

    # 3. QAT, each preset from its reconstructed (QDrop) model of step 2b when there is one
    qat: list[dict[str, Any]] = []
    qat_presets = [] if args.skip_qat else parse_list(args.qat_preset)
    for preset in qat_presets:
        t0 = time.perf_counter()
        out_dir = work / ("qat" if len(qat_presets) == 1 else f"qat_{preset}")
        start = _qat_start(recon_runs, preset, args)
        qat_argv = common + ["--out", str(out_dir), "--preset", preset, "--keep-8bit", args.keep_8bit,
                             "--epochs", str(args.qat_epochs), "--train-fraction", str(args.qat_train_fraction),
                             "--lr", str(args.qat_lr), "--wd", str(args.qat_wd), "--distill", str(args.qat_distill),
                             "--fp32-top1", repr(fp32["top1"]), "--init", start,
                             "--calib-batches", str(args.calib_batches)] \
            + (["--eval-every", str(args.qat_eval_every)] if args.qat_eval_every else []) + args.qat_args.split()
        commands.append(command_line("recipes.qat", qat_argv))
        res_qat = qat_recipe.main(qat_argv)
        qat.append(res_qat)
        steps[f"3_qat_{preset}"] = time.perf_counter() - t0
        _log(f"step 3 QAT {preset}: top-1 {res_qat['top1']:.2f}% ({steps[f'3_qat_{preset}']:.0f} s)")

    # 5. report (the recorded wall time covers everything but writing the report itself, ~1 s)
    wall = time.perf_counter() - t_start
    meta = {
        "title": f"qtoolkit main job: {args.model} on {args.dataset}",
        "dataset": f"{args.dataset} ({source})",
        "model": args.model,
        "checkpoint": f"{fp32['checkpoint']}" + (" (trained by this job)" if trained_here else "")
        + (f", sha256 {ev['checkpoint']['sha256'][:16]}..." if ev["checkpoint"].get("sha256") else ""),
        "started_utc": started,
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "cpu": cpu_report(),
        "smoke": args.max_batches is not None,
        "steps_s": steps,
        "commands": [command_line("recipes.main_job", argv)] + commands,
        "env": env_info(),
    }
    res = build_report(args.out, fp32, [ptq, *recon_runs], qat, hist, meta)
    wall = time.perf_counter() - t_start
    _log(f"report written to {args.out}/ (results.md, results.json, PNG plots); wall time {wall:.0f} s ({wall / 60:.1f} min)")
    for c in res["checks"]:
        _log(f"  {'PASS' if c['pass'] else 'MISSED'}: {c['bar']}: {c['value']}")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)

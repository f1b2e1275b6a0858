#!/usr/bin/env python
"""The trained ResNet-20 (shipped Fashion-MNIST checkpoint) through ``qt.deploy``: top-1 on the 10k test set.

Usage::

    .venv/bin/python scripts/check_deploy_trained.py                      # OpenVINO and ONNX Runtime
    .venv/bin/python scripts/check_deploy_trained.py --engines openvino --json docs/bench/deploy_trained.json

The FP32 checkpoint (sha256-checked), ``prepare("w8a8")``, ``calibrate`` on 512 training images (the recipe's
calibration sampler), then on the full test split: the fake-quant model, ``convert`` (the default fast
execution) and each engine's deployed model (``qt.deploy`` with its default, faithful settings).  Prints top-1 of
each, the difference to the fake-quant model (bar: within 0.05 pt) and the argmax agreement with it.
Needs the data set (``apt-get install dataset-fashion-mnist`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from recipes.common import load_fp32  # noqa: E402
from recipes.data import get_calibration_loader  # noqa: E402
from recipes.ptq import test_loader  # noqa: E402


def predictions(fn, loader) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(fn(x).argmax(1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="openvino,onnxruntime")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, _ = load_fp32("resnet20", "fashion-mnist")
    calib = [x for x, _ in get_calibration_loader("fashion-mnist", 64, 8, args.data_dir)]
    qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
    test = test_loader("fashion-mnist", 256, args.data_dir, False)
    fq, labels = predictions(qm, test)
    rows = [("fake quant (prepared, float32)", fq)]
    rows.append(("qt.convert (fast)", predictions(qt.convert(qm), test)[0]))
    for engine in [e for e in args.engines.split(",") if e]:
        dm = qt.deploy(qm, calib[0][:8], engine=engine, verify=calib[0][:32])
        rows.append((f"qt.deploy {engine} ({dm.report.target})", predictions(dm, test)[0]))
    base = (fq == labels).double().mean().item() * 100
    print(cpu_report() + "\n")
    print("| model | top-1 % | Δ vs fake quant (pt) | argmax agreement with fake quant % |\n|---|---:|---:|---:|")
    out = []
    for name, pred in rows:
        acc = (pred == labels).double().mean().item() * 100
        agree = (pred == fq).double().mean().item() * 100
        out.append({"model": name, "top1": acc, "delta_pt": acc - base, "agreement": agree})
        print(f"| {name} | {acc:.2f} | {acc - base:+.2f} | {agree:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_report(), "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()

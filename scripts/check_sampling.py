"""How much does the histogram's sampling (``HistogramObserver(max_samples=...)``) move PTQ results?

Usage::

    .venv/bin/python scripts/check_sampling.py                 # default sample size, W8A8 and W4A4 (conv1/fc 8-bit)
    .venv/bin/python scripts/check_sampling.py --max-samples 65536

For the shipped ResNet-20 (Fashion-MNIST) and each histogram calibrator (percentile, entropy, MSE), calibrates on
2,048 training images (32 x 64, seed 0) with every element counted (``max_samples=None``) and sampled, then the same
on another 2,048 training images (seed 1) — the yardstick: how much the choice of calibration images alone moves
things — and prints the test top-1 of each and the median / max relative change of the activation scales against
exact counting on seed 0.  Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist``); ~8 min on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from qtoolkit.fake_quant import FakeQuantize  # noqa: E402
from qtoolkit.histogram_observer import DEFAULT_MAX_SAMPLES  # noqa: E402
from recipes.common import load_fp32, make_overrides, predict, top1  # noqa: E402
from recipes.data import get_calibration_loader, get_loaders  # noqa: E402


def activation_scales(qm: torch.nn.Module) -> dict[str, float]:
    return {n: float(m.scale) for n, m in qm.named_modules()
            if isinstance(m, FakeQuantize) and m.role in ("activation", "output") and m.scale.numel() == 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES["percentile"],
                   help="sample size of the sampled runs (entropy included, whose default is exact counting)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_fp32("resnet20", "fashion-mnist")
    model.eval()
    calib = {s: [x for x, _ in get_calibration_loader("fashion-mnist", 64, 32, None, s, False)] for s in (0, 1)}
    _, test = get_loaders("fashion-mnist", 128, augment=False)
    print(f"max_samples={args.max_samples}; top-1 % and activation-scale change vs exact counting on seed 0")
    for preset, keep in (("w8a8", []), ("w4a4", ["conv1", "fc"])):
        for cal in ("percentile", "entropy", "mse"):
            res = {}
            for tag, seed, ms in (("exact", 0, None), ("sampled", 0, args.max_samples), ("exact, other images", 1, None)):
                qc = qt.get_qconfig(preset).with_activation_calibrator(cal, max_samples=ms)
                ov = {k: v.with_activation_calibrator(cal, max_samples=ms) for k, v in make_overrides(keep, cal).items()}
                qm = qt.calibrate(qt.prepare(model, qc, overrides=ov or None), calib[seed], progress=False)
                preds, labels, _ = predict(qm, test, progress=False)
                res[tag] = (top1(preds, labels), activation_scales(qm))
            ref = res["exact"][1]

            def change(tag: str, res: dict = res, ref: dict = ref) -> str:
                r = [abs(res[tag][1][k] / ref[k] - 1) for k in ref]
                return f"median {100 * statistics.median(r):.2f}% max {100 * max(r):.1f}%"

            print(f"{preset}{' (conv1, fc 8-bit)' if keep else ''} {cal}: top-1 "
                  + ", ".join(f"{t} {v[0]:.2f}" for t, v in res.items())
                  + f" | scales: sampled {change('sampled')}; other images {change('exact, other images')}", flush=True)


if __name__ == "__main__":
    main()

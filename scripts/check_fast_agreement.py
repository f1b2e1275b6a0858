"""Fast int8 path vs the reference converted path on the trained ResNet-20 (Fashion-MNIST test set).

Usage::

    .venv/bin/python scripts/check_fast_agreement.py            # recipes/checkpoints/resnet20_fashion-mnist.pt
    .venv/bin/python scripts/check_fast_agreement.py --preset w8a8-x86 --calib-batches 16

Loads the FP32 checkpoint (``recipes.checkpoints.load_checkpoint``), PTQ ``--preset`` (``w8a8``): calibrates
on ``--calib-batches`` (16) × 64 training images (``recipes.data.get_calibration_loader``, no augmentation),
converts, and runs the 10 000 test images through ``execution="fast"`` (the default) and ``"reference"``
(and ``"integer"`` with ``--integer``).  Reports the largest ``|fast − reference|`` logit difference in
units of the classifier's output quantization step (``fc.output_scale``), the fraction of logits within one
step, top-1 agreement of fast vs reference, and each path's top-1 accuracy.  ``--fuse-adds`` converts with
residual adds folded into the conv ``sum`` post-op instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from recipes.checkpoints import load_checkpoint  # noqa: E402
from recipes.data import get_calibration_loader, get_loaders  # noqa: E402
from recipes.models import build_model  # noqa: E402

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "recipes" / "checkpoints" / "resnet20_fashion-mnist.pt"


@torch.inference_mode()
def logits(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor, float]:
    outs, labels = [], []
    t0 = time.perf_counter()
    for x, y in loader:
        outs.append(model(x).float())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fuse-adds", action="store_true")
    p.add_argument("--integer", action="store_true", help="also run the integer-only path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    _, test = get_loaders(args.dataset, 64, test_batch_size=args.batch_size, augment=False)
    x0, _ = next(iter(test))
    model = build_model(args.model, num_classes=10, in_channels=x0.shape[1])
    load_checkpoint(model, args.checkpoint)
    model.eval()
    calib = get_calibration_loader(args.dataset, 64, args.calib_batches)
    qm = qt.calibrate(qt.prepare(model, args.preset), (x for x, _ in calib), progress=False)
    q = qt.convert(qm, fuse_adds=args.fuse_adds)
    from qtoolkit.kernels.dispatch import fast_status

    n_fast = sum(v.startswith("fast") for v in fast_status(q).values())
    fp32_logits, labels, t_fp32 = logits(model, test)
    fast, _, t_fast = logits(q, test)
    qt.set_execution(q, "reference")
    ref, _, t_ref = logits(q, test)
    step = float(q.fc.output_scale)
    d = (fast - ref).abs() / step
    res = {
        "max_abs_diff_steps": d.max().item(),
        "frac_within_1_step": (d <= 1.0).float().mean().item(),
        "top1_agreement_fast_vs_reference": (fast.argmax(1) == ref.argmax(1)).float().mean().item(),
        "top1_fp32": (fp32_logits.argmax(1) == labels).float().mean().item(),
        "top1_fast": (fast.argmax(1) == labels).float().mean().item(),
        "top1_reference": (ref.argmax(1) == labels).float().mean().item(),
    }
    if args.integer:
        qt.set_execution(q, "integer")
        integer, _, _ = logits(q, test)
        res["max_abs_diff_steps_integer_vs_reference"] = ((integer - ref).abs() / step).max().item()
        res["top1_agreement_integer_vs_reference"] = (integer.argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"{args.model} {args.dataset}, {len(labels)} test images, preset {args.preset}, {args.calib_batches}x64 calibration "
          f"images, fuse_adds={args.fuse_adds}, {n_fast} modules on the fast path, output step {step:.5g}")  # fmt: skip
    print(f"eval time (s, threads={args.threads}): fp32 {t_fp32:.1f}, fast {t_fast:.1f}, reference {t_ref:.1f}")
    for k, v in res.items():
        print(f"  {k}: {100 * v:.3f} %" if ("frac" in k or "top1" in k) else f"  {k}: {v:.4f}")
    return res


if __name__ == "__main__":
    main()

"""How often does a rounding flip reach the output, image by image: float32 fake quant vs the fast path.

Usage::

    .venv/bin/python scripts/check_drift_images.py --models mobilenet_v3_large,mnasnet0_5 --images 256
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/check_drift_images.py --models mobilenet_v3_large

``check_zoo.py --drift-floor`` compares one SQNR over a batch: on a deep random network a single one-code tie flip
early in one image grows, so that number is dominated by which images happen to flip, and the float32 floor moves
with the summation order (thread count, batch size).  This script measures the same models (torchvision, random
weights, BN statistics from data, ``prepare("w8a8")``, 4 calibration batches of 8 at ``--size``, ``convert``) per
image against the fake-quant model evaluated in float64: the share of images whose output a flip reached (SQNR below
``--touched-db``) and the median SQNR of those, for the float32 fake-quant model and for the fast execution.  An
execution that flips codes only at float32 ties touches about as many images as float32 fake quant does.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_zoo import build  # noqa: E402

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402


def per_image_sqnr(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SQNR in dB of each row of ``out`` against ``ref`` (float64; an exact row gives a large finite value)."""
    err = ((out.double() - ref) ** 2).flatten(1).sum(1)
    sig = (ref**2).flatten(1).sum(1)
    return 10 * torch.log10(sig / err.clamp_min(1e-30))


def run(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build(name, args.size, gen)
    calib = [torch.randn(8, 3, args.size, args.size, generator=gen) for _ in range(4)]
    qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
    q = qt.convert(qm)
    q64 = copy.deepcopy(qm).double()
    x = torch.randn(args.images, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        ref = torch.cat([q64(b.double()) for b in x.split(args.batch)])
        rows = {"fake quant float32": torch.cat([qm(b) for b in x.split(args.batch)]),
                "fast": torch.cat([q(b) for b in x.split(args.batch)])}  # fmt: skip
    out = {"model": name}
    for label, y in rows.items():
        s = per_image_sqnr(y, ref)
        touched = s < args.touched_db
        out[f"{label}: touched %"] = round(100.0 * touched.double().mean().item(), 1)
        out[f"{label}: median dB of touched"] = round(s[touched].median().item(), 1) if touched.any() else None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mobilenet_v3_large,mnasnet0_5,mobilenet_v2")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--touched-db", type=float, default=80.0, help="an image below this SQNR was reached by a flip")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_report(), flush=True)
    results = []
    for name in args.models.split(","):
        r = run(name, args)
        results.append(r)
        print(r, flush=True)
    return results


if __name__ == "__main__":
    main()

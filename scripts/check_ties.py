#!/usr/bin/env python
"""Op by op, teacher-forced: does the fast execution round like the fake-quant model, or only float32-close?

Usage::

    .venv/bin/python scripts/check_ties.py --models efficientnet_b0,mnasnet0_5
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/check_ties.py --models mobilenet_v3_large

For each model (torchvision, random weights, BN statistics from data, ``prepare("w8a8")``, 4 calibration
batches of 8 at ``--size``, ``convert``) every converted module is fed the inputs it receives in the reference
execution on one batch of 64 images (teacher forcing: no drift from earlier layers) and its output is compared,
in output codes, with the same module evaluated in **float64** (the exact fake-quant arithmetic):

* ``fast``: the module in the ``"fast"`` execution (oneDNN kernels, lookup tables);
* ``fake quant float32``: the module's reference execution in float32 (what the prepared model computes).

Each flip is a code where the rounding went the other way; the table counts them per module kind and prints
how close to a rounding tie the worst one was (a flip ``d`` steps from a tie needs an error of ``d`` steps).
An op that flips more codes than float32 fake quant, or flips codes far from a tie, is wrong; equal counts at
ties are float32 arithmetic.  End to end, through a deep random network, any one flip can grow: compare models
with ``scripts/check_zoo.py --drift-floor``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qtoolkit as qt  # noqa: E402
from qtoolkit.convert import CONVERTED  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from qtoolkit.kernels.qtensor import QuantizedActivation  # noqa: E402
from qtoolkit.numerics import fake_quantize  # noqa: E402


def _codes(y: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(y.double() / scale) + zp, qmin, qmax)


def flips(name: str, size: int, seed: int = 0) -> dict[str, list[float]]:
    """``{module kind: [fast flips, float32 flips, elements, worst fast distance from a tie]}``."""
    from check_zoo import build

    gen = torch.Generator().manual_seed(seed)
    model = build(name, size, gen)
    prepared = qt.calibrate(qt.prepare(model, "w8a8"), [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)],
                            progress=False)  # fmt: skip
    q = qt.convert(prepared)
    x = torch.randn(64, 3, size, size, generator=gen)
    mods = [m for m in q.modules() if isinstance(m, tuple(CONVERTED.values()))]
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod, a)) for m in mods]
    qt.set_execution(q, "reference")
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0.0])
    with torch.no_grad():
        for m in mods:
            if m not in seen:
                continue
            args = seen[m]
            ref32 = m(*args)
            ref64 = m(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
            m.execution = "fast"
            fast = m(*args)
            m.execution = "reference"
            if type(fast) is not QuantizedActivation:
                continue  # float output (leaves the int8 graph): no rounding to compare
            s, z, lo, hi = fast.q_scale, fast.q_zero_point, fast.q_min, fast.q_max
            exact = _codes(ref64, s, z, lo, hi)
            f32 = _codes(fake_quantize(ref32, s, z, lo, hi), s, z, lo, hi)
            got = fast.codes.double()
            bad = got != exact
            row = out[f"{type(m).__name__}({getattr(m, 'act', None) or ''})"]
            row[0] += int(bad.sum())
            row[1] += int((f32 != exact).sum())
            row[2] += exact.numel()
            if bool(bad.any()):
                v = ref64.double()[bad] / s
                row[3] = max(row[3], float(((v - torch.floor(v)) - 0.5).abs().max()))
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficientnet_b0,mnasnet0_5,mobilenet_v3_large")
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(cpu_report() + "\n")
    print("| model | module kind | codes | fast flips | float32 fake-quant flips | worst fast flip: steps from a tie |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for kind, (f, f32, n, dist) in sorted(flips(name, args.size).items()):
            print(f"| {name} | {kind} | {n:,} | {f} | {f32} | {dist:.1e} |")


if __name__ == "__main__":
    main()

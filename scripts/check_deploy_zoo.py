#!/usr/bin/env python
"""``qt.deploy`` on every ``scripts/check_zoo.py`` torchvision family: does each engine take it, faithfully?

Usage::

    .venv/bin/python scripts/check_deploy_zoo.py --json docs/deploy_zoo_zen4.json
    .venv/bin/python scripts/check_deploy_zoo.py --models mobilenet_v2,resnet18 --engines openvino

Per model (``check_zoo.build``: random weights, BN statistics from data, 10 classes; ``--size`` inputs, 224 for the
models that need it), ``prepare("w8a8")``, ``calibrate`` on 2 batches of 4, then ``qt.deploy`` to each engine with
its default settings and ``verify=`` 4 fresh images: the row says faithful (every site within its allowed steps),
the number of sites compared, the end-to-end relative L2 against the fake-quant model, what the engine adapter
rewrote in the graph (``notes``: the same values), or the error ``deploy`` raised.  The JSON is rewritten
after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402

NEEDS_224 = {"inception_v3", "maxvit_t", "vit_b_32", "vit_b_16", "swin_t", "swin_v2_t"}  # fixed-size position tables / windows


def main(argv: list[str] | None = None) -> None:
    import check_zoo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = check_zoo.DEFAULT_MODELS
    p.add_argument("--models", default=default if isinstance(default, str) else ",".join(default))
    p.add_argument("--engines", default="openvino,onnxruntime")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows: list[dict] = []
    print(cpu_report())
    for name in args.models.split(","):
        size = 224 if name in NEEDS_224 else args.size
        gen = torch.Generator().manual_seed(0)
        try:
            model = check_zoo.build(name, size, gen)
            qm = qt.calibrate(qt.prepare(model, "w8a8"), [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)],
                              progress=False)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append({"model": name, "error": f"prepare: {type(e).__name__}: {str(e)[:200]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for engine in args.engines.split(","):
            t0 = time.perf_counter()
            row: dict = {"model": name, "engine": engine, "size": size}
            try:
                dm = qt.deploy(qm, torch.randn(2, 3, size, size, generator=gen), engine=engine,
                               verify=torch.randn(4, 3, size, size, generator=gen), strict=False)  # fmt: skip
                v = dm.report.verification
                row.update(target=dm.report.target, faithful=bool(v.faithful), rel_l2=round(float(v.rel_l2), 5),
                           first_divergent=None if v.first_divergent is None else str(v.first_divergent.site),
                           sites=len(v.sites), notes=dm.report.notes)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"cpu": cpu_report(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

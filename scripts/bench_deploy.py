"""Deployed int8 (qt.deploy: OpenVINO, ONNX Runtime) vs the engines' FP32, torch.ao int8 and fp32 eager.

Usage::

    .venv/bin/python scripts/bench_deploy.py                          # ResNet-20/18 CIFAR at batch 1, 64 + torchvision
    .venv/bin/python scripts/bench_deploy.py --models resnet20 --batches 1 --torchvision "" --repeats 2   # smoke test
    .venv/bin/python scripts/bench_deploy.py --json out.json --markdown

Rows per model × batch: ``OpenVINO int8 (deploy)`` (``qt.deploy(engine="openvino")``: f32 precision hint, weight
form by probe, verified), ``OpenVINO FP32`` (the float model's ONNX file, same settings), ``ORT int8 (deploy)``,
``ORT FP32`` (same session settings), ``torch.ao int8 (x86)`` (the peer: ``bench_int8.torch_ao_int8`` for the
CIFAR ResNets, ``torchvision.models.quantization`` for the torchvision models, random weights, calibrated on
random data), ``fp32 eager``.  Models: ``recipes.models.resnet20`` / ``resnet18_cifar`` (3×32×32) and
torchvision ``mobilenet_v2`` / ``resnet50`` (3×224×224, ``--torchvision``, ``--tv-batches``).  Timing:
``bench_int8.images_per_s`` (warm-up, interleaved repeats each ≥ 50 ms, median), ``--threads`` (2) for torch
and every engine, the CPU named (``cpu_report``), malloc thresholds set by re-executing (as bench_int8 does).
The bar: OpenVINO int8 ≥ 1.5× torch.ao at batch 1 and ≥ 1.0× at batch 64 on ResNet-20 and ResNet-18.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_int8  # noqa: E402  (re-exec with malloc settings happens below, before torch is imported)

if __name__ == "__main__":
    bench_int8._maybe_reexec()

import torch  # noqa: E402

import qtoolkit as qt  # noqa: E402
from qtoolkit.export.engines import get_engine  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from recipes.models import resnet18_cifar, resnet20  # noqa: E402

Variant = bench_int8.Variant
AO = "torch.ao int8 (x86)"


def _engine_runner(runner: object) -> Callable[[torch.Tensor], Callable[[], object]]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        arr = x.numpy().copy()
        return lambda: runner([arr])

    return make


def _fp32_runner(engine: str, model: torch.nn.Module, shape: tuple[int, ...], settings: dict) -> tuple[object, int]:
    import bench_onnx

    path = Path(tempfile.mkdtemp(prefix="bench_deploy_")) / "fp32.onnx"
    bench_onnx.export_float(model, torch.randn(1, *shape), path)
    import onnx

    return get_engine(engine).compile(onnx.load(os.fspath(path)), settings), path.stat().st_size


def deploy_variants(model: torch.nn.Module, qm: torch.nn.Module, shape: tuple[int, ...], threads: int) -> list[Variant]:
    rows = []
    x = torch.randn(2, *shape)
    for engine, label in (("openvino", "OpenVINO"), ("onnxruntime", "ORT")):
        try:
            # ORT's worker threads otherwise spin after each run and slow the torch rows timed next to it
            quiet = {"session.intra_op.allow_spinning": "0"} if engine == "onnxruntime" else {}
            dm = qt.deploy(qm, x, engine=engine, threads=threads, strict=False, **quiet)
        except ImportError as exc:
            print(f"skipping {label}: {exc}")
            continue
        v = dm.report.verification
        note = f"{dm.report.target}, rel L2 {v.rel_l2:.4f}{'' if v.faithful else ', NOT faithful'}"
        rows.append(Variant(f"{label} int8 (deploy: {note})", _engine_runner(dm._runner), None))
        fp32, nbytes = _fp32_runner(engine, model, shape, dm.settings)
        rows.append(Variant(f"{label} FP32", _engine_runner(fp32), nbytes))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet18")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--torchvision", default="mobilenet_v2,resnet50")
    p.add_argument("--tv-batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default="")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--no-malloc-tune", action="store_true", help="do not set MALLOC_*_THRESHOLD_ (bench_int8's re-exec)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    jobs = []
    for key in [k for k in args.models.split(",") if k]:
        build, title = {"resnet20": (resnet20, "ResNet-20"), "resnet18": (resnet18_cifar, "ResNet-18 (CIFAR)")}[key]
        torch.manual_seed(0)
        model = bench_int8._randomize_bn(build(num_classes=10, in_channels=3))
        calib = bench_int8.calibration_batches()
        qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
        ao = bench_int8.torch_ao_int8(model, calib)
        jobs.append((title, model, qm, ao, bench_int8.SHAPE, [int(b) for b in args.batches.split(",")]))
    for name in [n for n in args.torchvision.split(",") if n]:
        model = bench_int8._torchvision_model(name)
        g = torch.Generator().manual_seed(1)
        calib = [torch.randn(4, *bench_int8.TV_SHAPE, generator=g) for _ in range(2)]
        qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
        ao = bench_int8._torchvision_ao(name, model, calib)
        jobs.append((f"{name} (224²)", model, qm, ao, bench_int8.TV_SHAPE, [int(b) for b in args.tv_batches.split(",")]))
    for title, model, qm, ao, shape, batches in jobs:
        variants = deploy_variants(model, qm, shape, args.threads)
        if ao is not None:
            variants.append(Variant(AO, bench_int8._torch_runner(ao), bench_int8.state_dict_bytes(ao)))
        variants.append(Variant("fp32 eager", bench_int8._torch_runner(model), bench_int8.state_dict_bytes(model)))
        for bs in batches:
            x = torch.randn(bs, *shape, generator=torch.Generator().manual_seed(bs))
            speed = bench_int8.images_per_s({v.name: v.make(x) for v in variants}, bs, args.warmup, args.repeats)
            fp32, peer = speed["fp32 eager"], speed.get(AO)
            for v in variants:
                rows.append((title, bs, v.name, speed[v.name], speed[v.name] / fp32,
                             speed[v.name] / peer if peer else float("nan"), v.state_bytes))  # fmt: skip
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in (*bench_int8._MALLOC_ENV, "OMP_NUM_THREADS"))
    header = [
        f"torch {torch.__version__}, {args.threads} threads (torch and every engine); median of {args.repeats} interleaved repeats "
        f"(each ≥ 50 ms) after {args.warmup} warm-up calls",
        cpu_report(),
        f"environment: {env}; load average {os.getloadavg()[0]:.2f}",
    ]
    print("\n".join(header) + "\n")
    if args.markdown or not args.json:
        print(bench_int8.markdown_table(rows))
    if args.json:
        cols = ("model", "batch", "variant", "images_per_s", "x_fp32", "x_torch_ao", "state_dict_bytes")
        cmd = " ".join(["scripts/bench_deploy.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.json).write_text(json.dumps({"command": cmd, "header": header, "rows": [dict(zip(cols, r)) for r in rows]},
                                              indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()

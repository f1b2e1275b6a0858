#!/usr/bin/env python
"""Where ONNX Runtime spends a batch: per-operator kernel time of an exported int8 model (ORT's own profiler).

Usage::

    .venv/bin/python scripts/profile_ort.py                      # ResNet-20 (CIFAR shapes), w8a8, batch 64
    .venv/bin/python scripts/profile_ort.py --model resnet18 --batch 1 --target portable

``qtoolkit.export_onnx`` of a calibrated ``w8a8`` recipe ResNet (random weights and BN statistics, as
``scripts/bench_int8.py``), an ``onnxruntime.InferenceSession`` with the settings ``qt.deploy`` uses (all graph
optimizations, ``--threads`` intra-op threads, one inter-op thread), ``enable_profiling``; prints each operator's
share of the kernel time over ``--runs`` runs after warm-up.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_int8  # noqa: E402

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from recipes.models import resnet18_cifar, resnet20  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet18"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target", default="vnni")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    build = resnet20 if args.model == "resnet20" else resnet18_cifar
    model = bench_int8._randomize_bn(build(num_classes=10))
    qm = qt.calibrate(qt.prepare(model, "w8a8"), bench_int8.calibration_batches(), progress=False)
    path = str(Path(tempfile.mkdtemp(prefix="profile_ort_")) / "model.onnx")
    qt.export_onnx(qm, torch.randn(1, *bench_int8.SHAPE), path, target=args.target, dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(path).parent / "ort_profile")  # not into the working directory
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((args.batch, *bench_int8.SHAPE), dtype=np.float32)}
    runs = 3 + args.runs  # the first three (warm-up) are averaged in: at these run counts they move the shares little
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    allt = sum(total.values())
    print(cpu_report())
    print(f"ONNX Runtime {ort.__version__}, {args.model} w8a8 target={args.target}, batch {args.batch}, {args.threads} threads\n")
    print("| operator | calls per run | ms per run | share |\n|---|---:|---:|---:|")
    for op, us in total.most_common():
        print(f"| {op} | {count[op] // runs} | {us / runs / 1000:.2f} | {100 * us / allt:.0f}% |")


if __name__ == "__main__":
    main()

"""ONNX Runtime benchmark of qtoolkit's Q/DQ export: int8 vs fp32 throughput, and
Fashion-MNIST top-1 of the exported int8 model vs qtoolkit's fake-quant model.

Usage::

    .venv/bin/python scripts/bench_onnx.py                      # throughput table (~1 min)
    .venv/bin/python scripts/bench_onnx.py --shape 3x32x32      # CIFAR-shaped ResNet-20
    .venv/bin/python scripts/bench_onnx.py --fmnist             # accuracy of the trained checkpoint
    .venv/bin/python scripts/bench_onnx.py --torchvision resnet18 --size 64   # faithfulness of both targets

``--torchvision NAME``: a torchvision classifier (random weights, BN statistics from random images,
``--size``² inputs), PTQ ``w8a8`` on 4 random batches, exported with ``target="portable"`` and ``"vnni"``;
``qt.verify_onnx`` on 2 fresh batches of 8 with ORT's optimizations off (Q/DQ emulated in float) and on
(fused integer kernels): relative L2 error, SQNR, top-1 agreement and the largest per-site difference.

Throughput: ResNet-20 (``recipes.models.resnet20``), PTQ ``w8a8`` calibrated on random data
(speed does not depend on the weights), exported three ways — fp32 (the float model through
``torch.onnx.export(dynamo=False)``), int8 Q/DQ with ``export_onnx``'s default ``target="portable"``
(uint8 weight container, int32 bias: ORT's U8U8 kernels, exact on every x86 CPU) and with
``target="vnni"`` (int8 weights: ORT's U8S8 kernels, which saturate int16 pair sums on x86 CPUs
without AVX-VNNI).  The CPU (``qtoolkit.kernels.onednn.cpu_report``) is printed with the table. Each runs in an ORT
CPU session with ``intra_op_num_threads=--threads`` (2), ``ORT_ENABLE_ALL``, no thread spinning; after ``--warmup``
runs, each repeat times enough back-to-back runs to last ≥ 50 ms, the repeats of the three
models interleaved (round-robin, so background load hits them alike); the table shows the
median of ``--repeats`` (10) repeats in images/s, and the ratio to fp32. The 1-min load average is
printed: other processes on a shared box distort timings.

``--fmnist``: the trained checkpoint ``recipes/checkpoints/resnet20_fashion-mnist.pt`` (or
``--checkpoint``), PTQ ``w8a8`` calibrated on ``recipes.data.get_calibration_loader`` (train
split, ``--calib-batches`` × 64 images), top-1 on the 10 000 test images of the fp32 model,
the fake-quant model and the exported int8 model in ORT (both targets, and ORT's
Q/DQ emulation with graph optimizations off), plus the fraction of test images on which ORT
predicts the same class as the fake-quant model and ``qtoolkit.verify_onnx``'s layer-by-layer
verdict (largest per-site code difference on the first test batches); then the same for 7-bit weights
("reduce_range", ``int_weight_per_channel(7)``), which cannot saturate ORT's U8S8 kernels
(``--no-reduce-range`` skips it). The fp32 row's Δ is relative to the w8a8 fake-quant model.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from qtoolkit.config import QConfig, int_weight_per_channel  # noqa: E402
from qtoolkit.export import export_onnx  # noqa: E402
from recipes.models import resnet20  # noqa: E402


def onednn_cpu_report() -> str:
    from qtoolkit.kernels.cpuinfo import cpu_report

    return cpu_report()

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "recipes" / "checkpoints" / "resnet20_fashion-mnist.pt"


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        sys.exit("bench_onnx needs onnxruntime: pip install 'qtoolkit[export]'")
    return ort


def export_float(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The fp32 baseline: the float model through the same (TorchScript) exporter, dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path.write_bytes(buf.getvalue())


def session(path: Path, threads: int, level: str = "all", optimized: Path | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    # ORT's worker threads otherwise spin after each run and slow whatever torch variant the
    # interleaved benchmark times next (measured: fp32 eager at batch 64 halved)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def images_per_s(sessions: dict[str, object], x: np.ndarray, warmup: int, repeats: int) -> dict[str, float]:
    """Median images/s of each session on ``x``; the repeats of the models are interleaved
    (round-robin) so that load from other processes hits them alike."""
    feed = {"input": x}
    inner = {}
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feed)
        t0 = time.perf_counter()
        sess.run(None, feed)
        inner[name] = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - t0) / inner[name])
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def int_conv_count(path: Path) -> int:
    import onnx

    return sum(n.op_type in ("QLinearConv", "ConvInteger") for n in onnx.load(str(path)).graph.node)


def build_models(shape: tuple[int, ...], calib_batches: int = 4):
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=shape[0]).eval()
    qm = qt.prepare(model, "w8a8")
    g = torch.Generator().manual_seed(0)
    qm = qt.calibrate(qm, [torch.randn(16, *shape, generator=g) for _ in range(calib_batches)], progress=False)
    return model, qm


def export_all(model, qm, example: torch.Tensor, out: Path) -> dict[str, Path]:
    paths = {"fp32": out / "fp32.onnx", PORTABLE: out / "int8_portable.onnx", VNNI: out / "int8_vnni.onnx"}
    export_float(model, example, paths["fp32"])
    export_onnx(qm, example, paths[PORTABLE])
    export_onnx(qm, example, paths[VNNI], target="vnni")
    return paths


PORTABLE = "int8 (target=portable: uint8 weights)"
VNNI = "int8 (target=vnni: int8 weights)"


def bench_speed(args: argparse.Namespace) -> None:
    shape = tuple(int(s) for s in args.shape.split("x"))
    model, qm = build_models(shape)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        paths = export_all(model, qm, torch.randn(1, *shape), out)
        sessions, n_int = {}, {}
        for name, p in paths.items():
            opt = out / f"{p.stem}_opt.onnx"
            sessions[name] = session(p, args.threads, "all", optimized=opt)
            n_int[name] = int_conv_count(opt)
        speeds: dict[str, dict[int, float]] = {name: {} for name in paths}
        for bs in args.batches:
            x = np.random.default_rng(0).standard_normal((bs, *shape), dtype=np.float32)
            for name, v in images_per_s(sessions, x, args.warmup, args.repeats).items():
                speeds[name][bs] = v
        rows = [(name, n_int[name], speeds[name]) for name in paths]
    base = rows[0][2]
    print("\n" + onednn_cpu_report())
    print(f"ResNet-20 {args.shape}, ONNX Runtime {_ort().__version__} CPU, intra_op_num_threads={args.threads}, "
          f"ORT_ENABLE_ALL, median of {args.repeats} repeats after {args.warmup} warm-up runs; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    head = "| model | int8 convs in ORT graph | " + " | ".join(f"batch {b}: images/s (× fp32)" for b in args.batches) + " |"
    print(head)
    print("|" + "---|" * (2 + len(args.batches)))
    for name, n_int, speeds in rows:
        cells = " | ".join(f"{speeds[b]:,.0f} ({speeds[b] / base[b]:.2f}×)" for b in args.batches)
        print(f"| {name} | {n_int} | {cells} |")


@torch.no_grad()
def _torch_predictions(model: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1).numpy())
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def _ort_predictions(sess, loader) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x.numpy()})[0].argmax(1) for x, _ in loader])


def bench_fmnist(args: argparse.Namespace) -> None:
    from recipes.checkpoints import load_checkpoint
    from recipes.data import get_calibration_loader, get_loaders

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        sys.exit(f"checkpoint {ckpt} not found (train it with: python -m recipes.train_fp32 --model resnet20 "
                 "--dataset fashion-mnist --out recipes/checkpoints)")
    model = load_checkpoint(resnet20(num_classes=10, in_channels=1), ckpt).eval()
    calib = get_calibration_loader("fashion-mnist", 64, num_batches=args.calib_batches)
    _, test = get_loaders("fashion-mnist", batch_size=128, test_batch_size=args.batch_size)
    t0 = time.perf_counter()
    qm = qt.calibrate(qt.prepare(model, args.preset), calib, progress=False)
    t_cal = time.perf_counter() - t0
    fp32_pred, labels = _torch_predictions(model, test)
    fq_pred, _ = _torch_predictions(qm, test)
    rows = [("fp32 (torch)", fp32_pred), (f"{args.preset} fake-quant (qtoolkit)", fq_pred)]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        example = torch.zeros(1, 1, 28, 28)
        p_int8, p_u8 = out / "int8.onnx", out / "int8_u8w.onnx"
        export_onnx(qm, example, p_int8, target="vnni")
        export_onnx(qm, example, p_u8)  # default: target="portable"
        verify_batches = [x for i, (x, _) in zip(range(4), test)]
        verdicts = {}
        for name, p, level in (("ORT int8 Q/DQ, optimizations off (Q/DQ emulation)", p_int8, "none"),
                               ("ORT int8 (target=vnni: int8 weights), ORT_ENABLE_ALL", p_int8, "all"),
                               ("ORT int8 (target=portable: uint8 weights), ORT_ENABLE_ALL", p_u8, "all")):  # fmt: skip
            rows.append((name, _ort_predictions(session(p, args.threads, level), test)))
            r = qt.verify_onnx(p, qm, verify_batches, optimization=level, threads=args.threads)
            verdicts[name] = f"max {max(s.max_steps for s in r.sites)} step(s) per site" + ("" if r.faithful else " (NOT faithful)")
        if args.reduce_range:
            # 7-bit weights ("reduce_range"): |w| <= 63 keeps ORT's U8S8 pair sums below 2^15
            qc = qt.get_qconfig(args.preset)
            q7 = qt.calibrate(qt.prepare(model, QConfig(int_weight_per_channel(7), qc.activation, qc.mode)), calib, progress=False)
            fq7_pred, _ = _torch_predictions(q7, test)
            p7 = out / "int8_w7.onnx"
            export_onnx(q7, example, p7)
            rows.append(("w7a8 fake-quant (qtoolkit, 7-bit weights)", fq7_pred))
            rows.append(("ORT int8 (7-bit weights in int8), ORT_ENABLE_ALL", _ort_predictions(session(p7, args.threads, "all"), test)))
            r = qt.verify_onnx(p7, q7, verify_batches, threads=args.threads)
            verdicts[rows[-1][0]] = f"max {max(s.max_steps for s in r.sites)} step(s) per site" + ("" if r.faithful else " (NOT faithful)")
    fq_top1 = 100.0 * (fq_pred == labels).mean()
    print("\n" + onednn_cpu_report())
    print(f"ResNet-20 Fashion-MNIST test set ({len(labels)} images), checkpoint {ckpt.name}; PTQ {args.preset}, "
          f"{args.calib_batches}×64 calibration images (train split), calibrated in {t_cal:.1f} s; "
          f"ONNX Runtime {_ort().__version__} CPU\n")
    print("| model | top-1 (%) | Δ vs its fake-quant model (points) | same prediction as its fake-quant model (%) "
          "| verify_onnx, first 4 test batches |")
    print("|---|---|---|---|---|")
    ref_pred, ref_top1 = fq_pred, fq_top1
    for name, pred in rows:
        if "fake-quant" in name:
            ref_pred, ref_top1 = pred, 100.0 * (pred == labels).mean()
        top1 = 100.0 * (pred == labels).mean()
        agree = 100.0 * (pred == ref_pred).mean()
        print(f"| {name} | {top1:.2f} | {top1 - ref_top1:+.2f} | {agree:.2f} | {verdicts.get(name, '')} |")


def bench_torchvision(args: argparse.Namespace) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.torchvision, weights=None, num_classes=10).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, args.size, args.size, generator=g))
    model.eval()
    qm = qt.calibrate(qt.prepare(model, args.preset), [torch.randn(8, 3, args.size, args.size, generator=g) for _ in range(4)],
                      progress=False)  # fmt: skip
    data = [torch.randn(8, 3, args.size, args.size, generator=g) for _ in range(2)]
    print("\n" + onednn_cpu_report())
    print(f"torchvision {args.torchvision} (random weights), {args.size}x{args.size}, PTQ {args.preset}; ONNX Runtime "
          f"{_ort().__version__} CPU, {args.threads} threads; 16 inputs\n")
    print("| export | ORT optimizations | relative L2 | SQNR (dB) | top-1 agreement | max per-site diff (steps) | verdict |")
    print("|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as d:
        for target in ("portable", "vnni"):
            p = Path(d) / f"{target}.onnx"
            export_onnx(qm, data[0][:1], p, target=target)
            for level in ("none", "all"):
                r = qt.verify_onnx(p, qm, data, optimization=level, threads=args.threads)
                worst = max(s.max_steps for s in r.sites)
                print(f"| target={target} | {level} | {r.rel_l2:.4f} | {r.sqnr_db:.1f} | {100 * r.top1_agreement:.1f}% | {worst} "
                      f"| {'faithful' if r.faithful else 'NOT faithful: ' + r.first_divergent.site} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="ORT intra_op_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--shape", default="1x28x28", help="CxHxW input shape (1x28x28 or 3x32x32)")
    p.add_argument("--fmnist", action="store_true", help="Fashion-MNIST top-1: ORT int8 vs fake-quant")
    p.add_argument("--torchvision", default=None, help="verify both export targets on this torchvision model")
    p.add_argument("--size", type=int, default=64, help="--torchvision input size (default 64)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=500, help="test batch size (--fmnist)")
    p.add_argument("--no-reduce-range", dest="reduce_range", action="store_false",
                   help="--fmnist: skip the 7-bit-weight (reduce_range) rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.repeats < 10:
        p.error("--repeats must be >= 10")
    if args.torchvision:
        bench_torchvision(args)
    elif args.fmnist:
        bench_fmnist(args)
    else:
        bench_speed(args)


if __name__ == "__main__":
    main()

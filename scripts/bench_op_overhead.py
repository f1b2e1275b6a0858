#!/usr/bin/env python
"""Where the int8 fast path loses to torch.ao: fixed per-call cost of the oneDNN ops vs the rest.

Usage::

    .venv/bin/python scripts/bench_op_overhead.py            # ~30 s
    .venv/bin/python scripts/bench_op_overhead.py --batch 1 --preset w8a8-x86 --only-resnet

Prints two tables (``torch.set_num_threads(2)``, ``torch.inference_mode()``, medians after warm-up;
re-executes itself once with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` = 1 GiB like
``scripts/bench_int8.py``):

1. **One small conv, per call** (16→16 channels, 3×3, padding 1, a 1×16×8×8 uint8 input, so the
   arithmetic is negligible): qtoolkit's oneDNN extension (``qtoolkit.kernels.dnnl_ext``, what converted
   layers call where it is built), ``torch.ops.onednn.qconv_pointwise.default`` (what they call otherwise),
   the same op through its overload packet (``torch.ops.onednn.qconv_pointwise(...)``), with a
   non-zero input zero point, and torch.ao's ``quantized::conv2d`` on a quint8 tensor (the peer;
   its packed weights keep their oneDNN primitive, the ``onednn`` op builds it on every call).
2. **float32 → uint8** (the last step of quantizing the model's fp32 input, 64×3×32×32 integer-valued
   floats): torch's direct ``.to(torch.uint8)`` vs through int16 (``qtoolkit.kernels.onednn.to_u8``).
3. **ResNet-20, batch 64**: a converted qtoolkit forward; only its oneDNN calls replayed
   back to back with the same arguments (recorded from one forward); torch.ao's int8 forward.
   The difference between the first two is the cost of everything that is not a oneDNN kernel
   call (Python, the input quantization, views, the fp32 tail).

torch.ao appears only as a peer here (its deprecation warnings are filtered).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_int8  # noqa: E402

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels import dnnl_ext, onednn  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from qtoolkit.kernels.dispatch import _LayerState  # noqa: E402
from qtoolkit.kernels.fast_state import _get_state  # noqa: E402
from recipes.models import resnet20  # noqa: E402


def median_us(fn: Callable[[], object], n: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def small_conv_rows() -> list[tuple[str, float]]:
    c = 16
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (1, c, 8, 8), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-100, 101, (c, c, 3, 3), dtype=torch.int8, generator=g)
    ws, wz = torch.full((c,), 0.01), torch.zeros(c, dtype=torch.long)
    rows = []
    for zp in (0, 5):
        pw = onednn.prepack_conv_weight(w, ws, 0.01, zp, 1, 1, 1, 1)
        args = (x, 0.01, zp, pw, ws, wz, None, [1, 1], [1, 1], [1, 1], 1, 0.05, 0, torch.uint8, "none", [], "")
        op = onednn.op("qconv_pointwise")
        rows.append((f"torch.ops.onednn.qconv_pointwise.default, input zero point {zp}",
                     median_us(lambda op=op, args=args: op(*args), 3000, 300)))  # fmt: skip
        if zp == 0:
            packet = torch.ops.onednn.qconv_pointwise
            rows.append(("torch.ops.onednn.qconv_pointwise(...) (overload resolution)",
                         median_us(lambda packet=packet, args=args: packet(*args), 3000, 300)))  # fmt: skip
        if dnnl_ext.load() is not None:
            k = dnnl_ext.QConv(w, ws * 0.01 / 0.05, None, stride=1, padding=1, dilation=1, groups=1, x_zp=zp, out_zp=0,
                               out_dtype=torch.uint8)  # fmt: skip
            rows.append((f"qtoolkit.kernels.dnnl_ext.QConv.run (cached primitive), input zero point {zp}",
                         median_us(lambda k=k: k.run(x), 3000, 300)))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq

        torch.backends.quantized.engine = "x86"
        qx = torch.quantize_per_tensor(x.float() * 0.01, 0.01, 0, torch.quint8)
        conv = nnq.Conv2d(c, c, 3, padding=1)
        qw = torch.quantize_per_channel(w.float() * 0.01, ws.double(), wz, 0, torch.qint8)
        conv.set_weight_bias(qw, None)
        conv.scale, conv.zero_point = 0.05, 0
        packed = conv._packed_params
        rows.append(("torch.ao quantized::conv2d (peer)", median_us(lambda: torch.ops.quantized.conv2d(qx, packed, 0.05, 0), 3000, 300)))
    return rows


def conversion_rows() -> list[tuple[str, float]]:
    y = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.float32)
    assert torch.equal(onednn.to_u8(y), y.to(torch.uint8))
    return [
        ("y.to(torch.uint8)", median_us(lambda: y.to(torch.uint8), 300, 30)),
        ("y.to(torch.int16).to(torch.uint8) (to_u8)", median_us(lambda: onednn.to_u8(y), 300, 30)),
    ]


def _recorder(fn: Callable, calls: list) -> Callable:
    def rec(*a: object) -> object:
        calls.append((fn, a))
        return fn(*a)

    return rec


def resnet20_rows(batch: int = 64, preset: str = "w8a8") -> list[tuple[str, float]]:
    torch.manual_seed(0)
    model = bench_int8._randomize_bn(resnet20(num_classes=10))
    calib = bench_int8.calibration_batches()
    fast = qt.convert(qt.calibrate(qt.prepare(model, preset), calib, progress=False))
    ao = bench_int8.torch_ao_int8(model, calib)
    x = torch.randn(batch, 3, 32, 32)
    calls: list[tuple[Callable, tuple]] = []
    real_op = onednn.op

    def recording(name: str, overload: str = "default") -> Callable:
        fn = real_op(name, overload)

        def rec(*a: object) -> object:
            calls.append((fn, a))
            return fn(*a)

        return rec

    with torch.inference_mode():
        fast(x)
        exts = [st.ext for st in map(_get_state, fast.modules()) if isinstance(st, _LayerState) and st.ext is not None]
        for k in exts:  # the extension's calls (bound into the program when it is built)
            k.run = _recorder(k.run, calls)
        fast.forward.program = None  # rebuilt on the next call, with the recorders bound
        onednn.op = recording  # type: ignore[assignment]
        try:
            fast(x)
        finally:
            onednn.op = real_op  # type: ignore[assignment]
            for k in exts:
                k.run = k._k.run
            fast.forward.program = None

        def replay() -> None:
            for fn, a in calls:
                fn(*a)  # in-place accumulators are re-accumulated: the values are not used

        rows = []
        reps = 30 if batch >= 16 else 200
        for _ in range(3):  # interleaved rounds, the median of each kept
            rows.append(
                (
                    median_us(lambda: fast(x), reps, 5),
                    median_us(replay, reps, 5),
                    median_us(lambda: ao(x), reps, 5),
                )
            )
        ours_ops, ao_ops = _op_times(lambda: fast(x)), _op_times(lambda: ao(x))
    f, r, a = (statistics.median(v) for v in zip(*rows))
    return [
        ("qtoolkit fast forward", f),
        (f"its {len(calls)} int8 kernel calls replayed ({dnnl_ext.status().split(' (')[0]} for conv/linear)", r),
        ("everything else (difference)", f - r),
        ("torch.ao int8 forward (peer)", a),
        ("profiler: qtoolkit conv ops (onednn::qconv_pointwise; 0 when the extension runs them)", ours_ops.get("conv", 0.0)),
        ("profiler: torch.ao conv ops (quantized::conv2d*)", ao_ops.get("conv", 0.0)),
        ("profiler: qtoolkit add ops (onednn::qlinear_pointwise minus the fc)", ours_ops.get("add", 0.0)),
        ("profiler: torch.ao add ops (quantized::add_relu)", ao_ops.get("add", 0.0)),
    ]


def _op_times(fn: Callable[[], object], n: int = 20) -> dict[str, float]:
    """Per-forward self CPU time (µs) of the conv and residual-add ops (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            fn()
    out: dict[str, float] = {}
    for e in p.key_averages():
        if e.key in ("onednn::qconv_pointwise", "quantized::conv2d", "quantized::conv2d_relu"):
            out["conv"] = out.get("conv", 0.0) + e.self_cpu_time_total / n
        elif e.key in ("onednn::qlinear_pointwise", "quantized::add_relu", "quantized::add"):
            # qtoolkit's adds and its fc share the op: take out the fc's share (1 of count/n calls)
            share = 1.0 - (n / e.count if e.key == "onednn::qlinear_pointwise" else 0.0)
            out["add"] = out.get("add", 0.0) + e.self_cpu_time_total / n * share
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="ResNet-20 batch size of table 3 (default 64)")
    p.add_argument("--preset", default="w8a8", help="qtoolkit preset of table 3 (default w8a8)")
    p.add_argument("--only-resnet", action="store_true", help="print table 3 only")
    p.add_argument("--no-malloc-tune", action="store_true", help="do not set MALLOC_*_THRESHOLD_")
    args = p.parse_args(argv)
    bench_int8._maybe_reexec()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, torch.set_num_threads(2), inference_mode; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset)')}, "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', '(unset)')}\n")  # fmt: skip
    if not onednn.is_available():
        sys.exit("oneDNN int8 ops are not available in this torch build / on this CPU")
    print(cpu_report() + "\n")
    if not args.only_resnet:
        print("| one 16→16 3×3 conv, 1×16×8×8 input, per call | µs |\n|---|---:|")
        for name, us in small_conv_rows():
            print(f"| {name} | {us:.1f} |")
        print("\n| float32 → uint8, 64×3×32×32 | µs |\n|---|---:|")
        for name, us in conversion_rows():
            print(f"| {name} | {us:.1f} |")
    print(f"\n| ResNet-20 ({args.preset}), batch {args.batch}, per forward | ms |\n|---|---:|")
    for name, us in resnet20_rows(args.batch, args.preset):
        print(f"| {name} | {us / 1000:.2f} |")


if __name__ == "__main__":
    main()

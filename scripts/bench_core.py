#!/usr/bin/env python
"""Micro-benchmarks of qtoolkit's core numerics, observers and calibrators.

Prints one Markdown table: our op, its peer / baseline, median times, the ratio
and PASS/MISS against the target:

(a) ``qtoolkit.numerics.fake_quantize`` forward+backward on a 64×64×32×32 tensor vs
    ``torch.fake_quantize_per_{tensor,channel}_affine`` forward+backward (≤ 1.5×);
(b) ``HistogramObserver`` forward per batch vs ``MinMaxObserver`` forward (≤ 3×);
(c) the entropy search over 2048 bins (≤ 0.5 s), plus the percentile and MSE
    searches and the per-channel weight calibrators (informational);
(d) torch.ao's ``HistogramObserver`` (forward per batch, ``calculate_qparams``) on
    the same batches, as a peer;
(e) ``qtoolkit.calibrate`` of the shipped ResNet-20 (W8A8, each activation calibrator, 2,048 Fashion-MNIST
    training images in 32 batches of 64) vs a plain FP32 forward over the same batches (≤ 1.5×);
(f) a QAT training step (W8A8, W4A4 with conv1/fc at W8A8, each with and without LSQ) vs the FP32 training
    step on ResNet-20 and ResNet-18 CIFAR, all variants round-robin in one run (≤ 1.1×; memory ≤ 1.3×).

Timings: ``torch.set_num_threads(2)``, warm-up, then the median of ``--repeats``
(≥ 10) runs; the two sides of a comparison are timed interleaved (A, B, A, B, …)
so that load from other processes hits both alike. ``--wait-idle S`` waits up to
S seconds before each row for other processes to leave the CPUs alone.

Usage::

    .venv/bin/python scripts/bench_core.py [--repeats 15] [--wait-idle 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtoolkit import calibrators as cal  # noqa: E402
from qtoolkit.numerics import compute_qparams, fake_quantize  # noqa: E402
from qtoolkit.observers import HistogramObserver, MinMaxObserver  # noqa: E402
from qtoolkit.spec import QuantSpec  # noqa: E402

ARGS: argparse.Namespace


# --------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------


def _busy_cpus_of_others(interval: float = 0.5) -> float:
    """CPUs' worth of time used by other processes over ``interval`` (Linux /proc)."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(st[11]) + int(st[12])

    try:
        b0, m0 = snap()
        time.sleep(interval)
        b1, m1 = snap()
    except (OSError, ValueError, IndexError):
        return float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((b1 - b0) - (m1 - m0)) / hz / interval)


def wait_idle() -> float:
    """Wait (up to ``--wait-idle`` s) until others use < 0.15 CPU; returns the last reading."""
    deadline = time.monotonic() + ARGS.wait_idle
    busy = _busy_cpus_of_others(0.2)
    while ARGS.wait_idle > 0 and busy >= 0.15 and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = _busy_cpus_of_others(0.5)
    return busy


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_pair(a, b, repeats: int | None = None, warmup: int = 3) -> tuple[float, float, float]:
    """Interleaved medians (ms) of ``a`` and ``b`` and the median of per-round ratios a/b."""
    repeats = repeats or ARGS.repeats
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a))
        tb.append(_time(b))
    ratios = [x / y for x, y in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def bench_one(fn, repeats: int | None = None, warmup: int = 2) -> float:
    repeats = repeats or ARGS.repeats
    for _ in range(warmup):
        fn()
    return statistics.median(_time(fn) for _ in range(repeats))


ROWS: list[tuple[str, ...]] = []


def row(what: str, ours: float, peer_name: str, peer: float | None, ratio: float | None, target: float | None,
        busy: float = float("nan")) -> None:
    """One table row; ``ratio`` is ours / peer (for the entropy rows: time / 500 ms)."""
    verdict = "" if target is None or ratio is None else ("PASS" if ratio <= target else "MISS")
    ROWS.append((
        what,
        f"{ours:.2f}",
        peer_name,
        "" if peer is None else f"{peer:.2f}",
        "" if ratio is None else f"{ratio:.2f}×",
        "" if target is None else f"≤ {target:g}× {verdict}",
        f"{busy:.2f}",
    ))
    print(f"  done: {what}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------


def bench_fake_quant() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, 32, 32, generator=g).requires_grad_(True)
    up = torch.randn(64, 64, 32, 32, generator=g)
    s, z = compute_qparams(torch.tensor(-3.0), torch.tensor(3.5), 0, 255, False)
    sc = torch.rand(64, generator=g) * 0.05 + 0.01
    zc = torch.zeros(64, dtype=torch.int32)

    def run(fn):
        def f():
            x.grad = None
            fn().backward(up)
        return f

    busy = wait_idle()
    a, b, r = bench_pair(run(lambda: fake_quantize(x, s, z, 0, 255)),
                         run(lambda: torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)))
    row("fake_quantize fwd+bwd, per-tensor u8, 64×64×32×32", a, "torch.fake_quantize_per_tensor_affine", b, r, 1.5,
        busy=busy)
    busy = wait_idle()
    a, b, r = bench_pair(run(lambda: fake_quantize(x, sc, zc, -128, 127, axis=1)),
                         run(lambda: torch.fake_quantize_per_channel_affine(x, sc, zc, 1, -128, 127)))
    row("fake_quantize fwd+bwd, per-channel (axis 1) s8", a, "torch.fake_quantize_per_channel_affine", b, r, 1.5,
        busy=busy)


def _batches(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 64, 32, 32, generator=g) * (1.0 + 0.05 * i) for i in range(n)]


def bench_observers() -> None:
    xs = _batches()
    spec = QuantSpec(8, signed=False, symmetric=False)
    hist = HistogramObserver(spec, method="entropy")
    mm = MinMaxObserver(spec)
    for x in xs:  # reach the steady-state range first
        hist(x)
        mm(x)
    it = {"h": 0, "m": 0}

    def fh():
        hist(xs[it["h"] % len(xs)])
        it["h"] += 1

    def fm():
        mm(xs[it["m"] % len(xs)])
        it["m"] += 1

    busy = wait_idle()
    a, b, r = bench_pair(fh, fm)
    row("HistogramObserver.forward (2048 bins), 64×64×32×32", a, "MinMaxObserver.forward", b, r, 3.0, busy=busy)

    relu = [x.relu() for x in xs]
    hist_r = HistogramObserver(spec, method="entropy")
    mm_r = MinMaxObserver(spec)
    for x in relu:
        hist_r(x)
        mm_r(x)
    busy = wait_idle()
    a, b, r = bench_pair(lambda: hist_r(relu[0]), lambda: mm_r(relu[0]))
    row("HistogramObserver.forward, post-ReLU batch", a, "MinMaxObserver.forward", b, r, 3.0, busy=busy)

    # the counting floor: what any per-element histogram pays with torch's CPU ops, vs one aminmax
    x0 = xs[0].reshape(-1)
    lo, hi = (float(v) for v in torch.aminmax(x0))
    inv = 2040.0 / (hi - lo)
    idx = torch.add(x0, -lo).mul_(inv).to(torch.int16)
    busy = wait_idle()
    a, b, r = bench_pair(lambda: torch.bincount(idx, minlength=2048), lambda: torch.aminmax(x0))
    row("floor: torch.bincount alone, 4M precomputed int16 indices", a, "torch.aminmax", b, r, None, busy=busy)
    busy = wait_idle()
    a, b, r = bench_pair(lambda: torch.histc(x0, 2048, lo, hi), lambda: torch.aminmax(x0), repeats=max(5, ARGS.repeats // 2))
    row("torch.histc, 2048 bins", a, "torch.aminmax", b, r, None, busy=busy)

    # (d) torch.ao's HistogramObserver as a peer on the same batches
    try:
        from torch.ao.quantization.observer import HistogramObserver as AOHist
    except Exception:  # pragma: no cover
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = AOHist(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
        for x in xs:
            ao(x)
        it["a"] = 0

        def fa():
            ao(xs[it["a"] % len(xs)])
            it["a"] += 1

        busy = wait_idle()
        a, b, r = bench_pair(fh, fa, repeats=max(5, ARGS.repeats // 2))
        row("HistogramObserver.forward (ours)", a, "torch.ao HistogramObserver.forward", b, r, None, busy=busy)
        ours_q = HistogramObserver(spec, method="entropy")
        for x in xs:
            ours_q(x)
        busy = wait_idle()
        a, b, r = bench_pair(ours_q.calculate_qparams, ao.calculate_qparams, repeats=max(5, ARGS.repeats // 2))
        row("HistogramObserver.calculate_qparams (entropy)", a, "torch.ao HistogramObserver.calculate_qparams (L2 search)",
            b, r, None, busy=busy)


def bench_calibrators() -> None:
    g = torch.Generator().manual_seed(2)
    u8 = QuantSpec(8, signed=False, symmetric=False)
    # one post-ReLU batch: all 2048 bins occupied -> the longest entropy search
    relu_obs = HistogramObserver(u8, method="entropy")
    relu_obs(torch.randn(64, 64, 32, 32, generator=g).relu())
    sym_obs = HistogramObserver(QuantSpec(8, narrow_range=True), method="entropy")
    for x in _batches(3):
        sym_obs(x)
    hr, er = relu_obs.histogram()
    hs, es = sym_obs.histogram()
    occupied = int((hr > 0).sum())
    busy = wait_idle()
    t = bench_one(lambda: cal.entropy_range(hr, er, 8, symmetric=False))
    row(f"entropy search, post-ReLU histogram, {occupied} of 2048 bins occupied", t, "target", 500.0, t / 500.0, 1.0,
        busy=busy)
    busy = wait_idle()
    t = bench_one(lambda: cal.entropy_range(hs, es, 8, symmetric=True))
    row("entropy search, signed data folded to abs(x)", t, "target", 500.0, t / 500.0, 1.0, busy=busy)
    busy = wait_idle()
    t = bench_one(lambda: cal.percentile_range(hs, es, 99.99, symmetric=True))
    row("percentile search (2048 bins)", t, "", None, None, None, busy=busy)
    busy = wait_idle()
    t = bench_one(lambda: cal.mse_range(hs, es, -127, 127, symmetric=True))
    row("mse search (2048 bins × 200 candidates)", t, "", None, None, None, busy=busy)
    w = torch.randn(256, 256, 3, 3, generator=g)
    busy = wait_idle()
    t = bench_one(lambda: cal.percentile_range_tensor(w, 99.99, axis=0), repeats=5)
    row("per-channel percentile, weight 256×256×3×3", t, "", None, None, None, busy=busy)
    busy = wait_idle()
    t = bench_one(lambda: cal.mse_range_tensor(w, -127, 127, True, axis=0), repeats=5)
    row("per-channel mse (100 candidates), weight 256×256×3×3", t, "", None, None, None, busy=busy)


def _resnet20_fmnist_batches() -> tuple[torch.nn.Module, list[torch.Tensor], str]:
    """The shipped ResNet-20 and 2,048 Fashion-MNIST training images (32 x 64), as recipes.ptq calibrates."""
    from recipes.common import load_fp32
    from recipes.data import DatasetNotFoundError, get_calibration_loader

    model, _ = load_fp32("resnet20", "fashion-mnist")
    try:
        loader = get_calibration_loader("fashion-mnist", 64, 32, None, 0, False)
        return model.eval(), [x for x, _ in loader], "Fashion-MNIST training split"
    except DatasetNotFoundError:  # pragma: no cover - offline machine without the Debian package
        g = torch.Generator().manual_seed(0)
        return model.eval(), [torch.randn(64, 1, 28, 28, generator=g) for _ in range(32)], "random data"


def bench_model_calibration() -> None:
    """``qtoolkit.calibrate`` per activation calibrator vs a plain FP32 forward over the same batches (≤ 1.5×).

    ``calibrate`` is timed alone, on a model prepared once before the timed runs (each call resets the observers,
    so every run does the same work); ``prepare`` (a deep copy, fusion and the module swap, once per model) has
    its own row."""
    import qtoolkit as qt

    model, batches, source = _resnet20_fmnist_batches()

    def fp32_pass() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    qc8 = qt.get_qconfig("w8a8")
    busy = wait_idle()
    a, b, r = bench_pair(lambda: qt.prepare(model, qc8), fp32_pass, repeats=max(3, ARGS.repeats // 5), warmup=1)
    row("prepare ResNet-20 W8A8 (deep copy, fusion, module swap; once per model)", a,
        f"FP32 forward, {len(batches)}x64 images", b, r, None, busy=busy)
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        qm = qt.prepare(model, qc8.with_activation_calibrator(calibrator))

        def calib_pass(qm: torch.nn.Module = qm) -> None:
            qt.calibrate(qm, batches, progress=False)

        busy = wait_idle()
        a, b, r = bench_pair(calib_pass, fp32_pass, repeats=max(3, ARGS.repeats // 5), warmup=1)
        row(f"calibrate ResNet-20 W8A8, {calibrator}, {len(batches)}x64 {source}", a,
            "FP32 forward, same batches", b, r, 1.5, busy=busy)


def _saved_bytes(step, params: list[torch.nn.Parameter] | None = None) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one step (activation memory, the
    part of a training step's peak memory that fake quantization can grow). Storages of ``params`` are left out:
    a parameter saved by reference (a weight quantizer that keeps its input) costs no memory."""
    skip = {p.untyped_storage().data_ptr() for p in params or []}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            if key not in skip:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - sparse / meta tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _step_memory(step, model: torch.nn.Module) -> tuple[int, int]:
    """CPU estimate of a training step's peak memory: parameters, their gradients and SGD momentum (3 x parameter
    bytes) plus the non-parameter tensors saved for backward; and the saved bytes alone. (On CUDA the bench reads
    ``torch.cuda.max_memory_allocated``, which counts the same parts.)"""
    params = list(model.parameters())
    saved = _saved_bytes(step, params)
    return 3 * sum(p.numel() * p.element_size() for p in params) + saved, saved


def bench_qat_step() -> None:
    """One SGD training step (forward, loss, backward, optimizer) of QAT variants vs the FP32 model's step, all
    timed round-robin in one run (ratio per round, median): ResNet-20 (batch 128 of 1x28x28, the shipped
    Fashion-MNIST weights) and ResNet-18 CIFAR (batch ``--r18-batch`` of 3x32x32, random weights).

    QAT rows: the PTQ form (BN folded, the form that is converted) after ``qtoolkit.calibrate`` and
    ``qtoolkit.qat.start_from_prepared`` (observers off, optional LSQ): what ``recipes.qat`` trains. ``live BN``
    rows: ``prepare(..., qat=True)`` after calibration with the observers off (BN in training mode; shown for
    comparison). Memory: on CPU parameters + gradients + momentum + the non-parameter tensors saved for the backward
    pass (``_step_memory``; the saved bytes alone are in the JSON as ``saved_ratio``), peak allocated bytes on CUDA."""
    import qtoolkit as qt
    from qtoolkit.qat import start_from_prepared
    from recipes.common import load_fp32, make_overrides, make_qconfig
    from recipes.models import resnet18_cifar

    dev = torch.device(ARGS.device)
    r20, _ = load_fp32("resnet20", "fashion-mnist")
    g = torch.Generator().manual_seed(3)
    models = [("ResNet-20", r20, (128, 1, 28, 28)), ("ResNet-18 CIFAR", resnet18_cifar(10, 3), (ARGS.r18_batch, 3, 32, 32))]
    wanted = {"r20": "ResNet-20", "r18": "ResNet-18 CIFAR"}
    models = [m for m in models if m[0] in {wanted[k] for k in ARGS.qat_models.split(",") if k}]
    for mname, fp32, shape in models:
        print(f"  qat_step: {mname}, batch {shape[0]}: preparing the variants", file=sys.stderr, flush=True)
        fp32 = fp32.to(dev).eval()
        x = torch.randn(*shape, generator=g).to(dev)
        y = torch.randint(0, 10, (shape[0],), generator=g).to(dev)
        calib = [torch.randn(32, *shape[1:], generator=g).to(dev) for _ in range(2)]

        def make(preset: str, lsq: bool, live: bool, fp32: torch.nn.Module = fp32,
                 calib: list[torch.Tensor] = calib) -> torch.nn.Module:
            over = make_overrides(["conv1", "fc"], "mse") if preset == "w4a4" else {}
            qm = qt.prepare(fp32, make_qconfig(preset, "mse"), qat=live, overrides=over)
            qt.calibrate(qm, calib, progress=False)
            return start_from_prepared(qm, lsq=lsq)

        variants: dict[str, torch.nn.Module] = {"FP32": __import__("copy").deepcopy(fp32).train()}
        for preset in ("w8a8", "w4a4"):
            for lsq in (False, True):
                variants[f"QAT {preset.upper()}{' + LSQ' if lsq else ''}"] = make(preset, lsq, False)
            variants[f"QAT {preset.upper()}, live BN"] = make(preset, False, True)

        def stepper(m: torch.nn.Module, x: torch.Tensor = x, y: torch.Tensor = y):
            opt = torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)

            def one_step() -> None:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            return one_step

        steps = {k: stepper(m) for k, m in variants.items()}
        mem, saved = {}, {}
        for k, f in steps.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                f()
                mem[k] = torch.cuda.max_memory_allocated()
            else:
                mem[k], saved[k] = _step_memory(f, variants[k])
        for f in steps.values():  # warm-up
            for _ in range(2):
                f()
        busy = wait_idle()
        load = os.getloadavg()[0]
        times: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}  # process CPU time: less sensitive to other processes
        for _ in range(ARGS.step_repeats):
            for k, f in steps.items():
                c0 = time.process_time()
                times[k].append(_time(f))
                cpu[k].append(time.process_time() - c0)
        fp = times["FP32"]
        for k in steps:
            if k == "FP32":
                continue
            ratio = statistics.median([a / b for a, b in zip(times[k], fp)])
            cpu_ratio = statistics.median([a / b for a, b in zip(cpu[k], cpu["FP32"])])
            target = None if "live BN" in k else 1.1
            row(f"{mname} train step, {k} (memory {mem[k] / mem['FP32']:.2f}x FP32, CPU-time ratio {cpu_ratio:.2f}x)",
                statistics.median(times[k]), f"FP32 step (load avg {load:.1f})", statistics.median(fp), ratio, target,
                busy=busy)
            QAT_ROWS.append({"model": mname, "variant": k, "batch": shape[0], "ms": statistics.median(times[k]),
                             "fp32_ms": statistics.median(fp), "ratio": ratio, "cpu_time_ratio": cpu_ratio,
                             "memory_ratio": mem[k] / mem["FP32"],
                             "saved_ratio": saved[k] / saved["FP32"] if saved else None,
                             "memory_kind": "cuda peak allocated" if dev.type == "cuda"
                             else "parameters x 3 (weights, gradients, momentum) + non-parameter tensors saved for backward",
                             "load_avg_1min": load, "others_busy_cpus": busy, "target": target})


QAT_ROWS: list[dict] = []


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (>= 10)")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s per row for an idle CPU")
    ap.add_argument("--only", default="", help="comma-separated groups to run: fake_quant, observers, calibrators, "
                                              "calibration, qat_step (default: all)")
    ap.add_argument("--step-repeats", type=int, default=10, help="timed rounds of the QAT-step group")
    ap.add_argument("--r18-batch", type=int, default=32, help="ResNet-18 CIFAR batch of the QAT-step group")
    ap.add_argument("--qat-models", default="r20,r18", help="models of the QAT-step group: r20, r18")
    ap.add_argument("--device", default="cpu", help="device of the QAT-step group (cpu / cuda)")
    ap.add_argument("--json", default=None, help="also write the QAT-step rows to this JSON file")
    ARGS = ap.parse_args()
    ARGS.repeats = max(10, ARGS.repeats)
    torch.set_num_threads(2)
    env = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"median of {ARGS.repeats} interleaved runs after warm-up; 'others busy' = CPUs used by other processes "
          "just before the row (0 = idle box)\n")
    groups = {"fake_quant": bench_fake_quant, "observers": bench_observers, "calibrators": bench_calibrators,
              "calibration": bench_model_calibration, "qat_step": bench_qat_step}
    only = [g for g in ARGS.only.split(",") if g] or list(groups)
    for g in only:
        if g not in groups:
            ap.error(f"--only: unknown group {g!r}; choose from {', '.join(groups)}")
        groups[g]()
    print("| op | ours (ms) | peer / baseline | peer (ms) | ratio | target | others busy |")
    print("|---|---:|---|---:|---:|---|---:|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    if ARGS.json and QAT_ROWS:
        import json

        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:  # pragma: no cover
            pass
        Path(ARGS.json).write_text(json.dumps({
            "command": "python scripts/bench_core.py " + " ".join(sys.argv[1:]), "cpu": cpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": QAT_ROWS}, indent=2) + "\n")


if __name__ == "__main__":
    main()

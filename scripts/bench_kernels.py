"""Micro benchmark: fp32 conv/linear vs oneDNN int8 (qtoolkit.kernels.onednn) vs torch.ao peers.

Usage::

    .venv/bin/python scripts/bench_kernels.py                 # full run (~2-4 min on 2 cores)
    .venv/bin/python scripts/bench_kernels.py --quick         # fewer shapes / repeats
    .venv/bin/python scripts/bench_kernels.py --malloc-tune   # re-exec with glibc malloc tuned (see below)

Method: ``torch.set_num_threads(--threads)`` (2), ``--warmup`` calls (3), then the median of
``--repeats`` (15) timed calls of each op; times in ms.  Inputs for the int8 kernels are already uint8
channels_last and weights are prepacked (that is how a converted model runs).  Ratios are
``fp32_time / int8_time`` (>1 = int8 faster).  The 1-min load average is printed because other
processes on a shared box distort multi-threaded timings a lot.

``--malloc-tune`` sets ``MALLOC_MMAP_THRESHOLD_=1073741824`` and ``MALLOC_TRIM_THRESHOLD_=1073741824``
(glibc reads them at process start, so the script re-executes itself): big activation buffers are then
served from the heap instead of fresh mmap()s that must be page-faulted on every call.

``torch.ao`` / ``torch.quantize_per_tensor`` / ``quantized_decomposed`` are used here only as peers;
the library itself (qtoolkit.kernels.onednn) uses none of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def _maybe_reexec() -> None:
    if "--malloc-tune" in sys.argv and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
        env = dict(os.environ, **_MALLOC_ENV)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


_maybe_reexec()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    from qtoolkit.kernels import onednn  # noqa: E402
except Exception:  # noqa: BLE001 - run even when the rest of the package is mid-edit
    import importlib.util

    _p = Path(__file__).resolve().parents[1] / "qtoolkit" / "kernels" / "onednn.py"
    _spec = importlib.util.spec_from_file_location("qtoolkit_kernels_onednn", _p)
    onednn = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(onednn)

CL = torch.channels_last
ARGS: argparse.Namespace


def _cpu_snap() -> tuple[float, float, float]:
    """(wall s, busy CPU-s of the whole machine, CPU-s of this process) from /proc (Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(i) for i in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), (sum(v) - v[3] - v[4]) / hz, (int(st[11]) + int(st[12])) / hz
    except (OSError, ValueError, IndexError):
        return time.monotonic(), 0.0, 0.0


def _others_load(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Average number of CPUs used by *other* processes between two snapshots."""
    wall = max(b[0] - a[0], 1e-3)
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall)


def _busy_cpus_of_others(interval: float = 0.3) -> float:
    a = _cpu_snap()
    time.sleep(interval)
    return _others_load(a, _cpu_snap())


def wait_idle() -> None:
    """With ``--wait-idle S``: wait (up to S s) until other processes use < 0.15 CPU."""
    deadline = time.monotonic() + ARGS.wait_idle
    while ARGS.wait_idle > 0 and time.monotonic() < deadline:
        if _busy_cpus_of_others() < 0.15:
            return
        time.sleep(1.0)


CONTAMINATED = [0, 0]  # [measurements still disturbed after retries, total measurements]


def bench(fn, repeats: int | None = None, warmup: int | None = None) -> float:
    """Median (``--stat min``: minimum) wall time of ``fn()`` in ms.

    At least ``repeats`` timed calls, more (up to 200) until ``--min-time`` seconds have been timed.
    With ``--wait-idle``, a measurement during which other processes used > 0.15 CPU on average is
    redone (up to 3 times) after waiting for the machine to go idle.
    """
    repeats = ARGS.repeats if repeats is None else repeats
    warmup = ARGS.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn()
    for attempt in range(4 if ARGS.wait_idle > 0 else 1):
        a = _cpu_snap()
        ts: list[float] = []
        while len(ts) < repeats or (sum(ts) < ARGS.min_time and len(ts) < 200):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        disturbed = _others_load(a, _cpu_snap()) > 0.15
        if not disturbed:
            break
        if attempt < 3 and ARGS.wait_idle > 0:
            wait_idle()
    CONTAMINATED[0] += int(disturbed)
    CONTAMINATED[1] += 1
    return (min(ts) if ARGS.stat == "min" else statistics.median(ts)) * 1e3


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def header() -> None:
    print(
        f"torch {torch.__version__}  cpu capability {torch.backends.cpu.get_cpu_capability()}  threads {torch.get_num_threads()}"
    )
    print(f"oneDNN int8 available: {onednn.is_available()}   u8*s8 int16 saturation (no VNNI): {onednn.saturates_u8s8()}"
          f"   safe activation qmax for |w|<=127: {onednn.safe_activation_qmax(127)}")  # fmt: skip
    envs = {k: os.environ.get(k) for k in (*_MALLOC_ENV, "OMP_NUM_THREADS", "KMP_AFFINITY", "ONEDNN_MAX_CPU_ISA")}
    print("env:", ", ".join(f"{k}={v}" for k, v in envs.items() if v is not None) or "(no malloc/omp env vars set)")
    print(f"warmup {ARGS.warmup}, {ARGS.stat} of >= {ARGS.repeats} repeats (>= {ARGS.min_time}s timed); "
          f"load average (1 min) at start: {loadavg()}; other processes' CPU use now: {_busy_cpus_of_others():.2f}")  # fmt: skip
    print()


# ----------------------------------------------------------------------------------------------
# conv
# ----------------------------------------------------------------------------------------------

# name, C, OC, H, k, stride, groups
RESNET20 = [
    ("r20 16->16 32x32", 16, 16, 32, 3, 1, 1),
    ("r20 16->32 s2 32x32", 16, 32, 32, 3, 2, 1),
    ("r20 32->32 16x16", 32, 32, 16, 3, 1, 1),
    ("r20 32->64 s2 16x16", 32, 64, 16, 3, 2, 1),
    ("r20 64->64 8x8", 64, 64, 8, 3, 1, 1),
]
RESNET18 = [
    ("r18 3->64 stem 32x32", 3, 64, 32, 3, 1, 1),
    ("r18 64->64 32x32", 64, 64, 32, 3, 1, 1),
    ("r18 64->128 s2 32x32", 64, 128, 32, 3, 2, 1),
    ("r18 128->128 16x16", 128, 128, 16, 3, 1, 1),
    ("r18 128->256 s2 16x16", 128, 256, 16, 3, 2, 1),
    ("r18 256->256 8x8", 256, 256, 8, 3, 1, 1),
    ("r18 256->512 s2 8x8", 256, 512, 8, 3, 2, 1),
    ("r18 512->512 4x4", 512, 512, 4, 3, 1, 1),
    ("r18 1x1 256->512 s2 8x8", 256, 512, 8, 1, 2, 1),
]
EXTRA = [("dw 3x3 128ch 16x16", 128, 128, 16, 3, 1, 128)]


def conv_case(name, C, OC, H, k, stride, groups, N):
    g = torch.Generator().manual_seed(0)
    pad = k // 2
    x = torch.randn(N, C, H, H, generator=g)
    w = torch.randn(OC, C // groups, k, k, generator=g) * 0.1
    b = torch.randn(OC, generator=g)
    x_cl, w_cl = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
    xmax = onednn.safe_activation_qmax(127)
    sx, zx = 8.0 / xmax, xmax // 2
    sw = w.abs().amax(dim=(1, 2, 3)) / 127
    wq = torch.clamp(torch.round(w / sw.view(-1, 1, 1, 1)), -127, 127).to(torch.int8)
    xq = onednn.quantize_u8(x_cl, sx, zx, 0, xmax)
    t0 = time.perf_counter()
    pw = onednn.prepack_conv_weight(wq, sw, sx, zx, stride, pad, 1, groups)
    t_prepack = (time.perf_counter() - t0) * 1e3
    y_ref = F.conv2d(x, w, b, stride, pad, 1, groups)
    so, zo = float(y_ref.abs().max()) * 2 / 255, 128
    res = onednn.qconv(xq, sx, zx, pw, sw, None, b, stride, pad, 1, groups, so, zo, torch.uint8)

    def i8(out_dtype=torch.uint8, x_in=xq, post="none"):
        return lambda: onednn.qconv(x_in, sx, zx, pw, sw, None, b, stride, pad, 1, groups, so, zo, out_dtype, post)

    # raw op (no Python wrapper) to show the wrapper overhead
    zeros = torch.zeros(OC, dtype=torch.long)
    sp, pp = [stride] * 2, [pad] * 2

    def raw():
        return torch.ops.onednn.qconv_pointwise(
            xq, sx, zx, pw, sw, zeros, b, sp, pp, [1, 1], groups, so, zo, torch.uint8, "none", [], ""
        )

    t0 = time.perf_counter()
    raw()
    t_first = (time.perf_counter() - t0) * 1e3
    r = {
        "fp32": bench(lambda: F.conv2d(x, w, b, stride, pad, 1, groups)),
        "fp32_cl": bench(lambda: F.conv2d(x_cl, w_cl, b, stride, pad, 1, groups)),
        "i8": bench(i8()),
        "i8_raw": bench(raw),
        "i8_f32out": bench(i8(torch.float32)),
        "i8_nchw_in": bench(i8(x_in=xq.contiguous())),
        "i8_sum_inpl": bench(
            lambda: onednn.qconv(
                xq, sx, zx, pw, sw, None, b, stride, pad, 1, groups, so, zo, torch.uint8, "relu", res, so, zo, True
            )
        ),
        "i8_sum_relu": bench(
            lambda: onednn.qconv(xq, sx, zx, pw, sw, None, b, stride, pad, 1, groups, so, zo, torch.uint8, "relu", res, so, zo)
        ),
        "prepack": t_prepack,
        "first": t_first,
    }
    # torch.ao peer (x86 engine): quantized tensors, used here only for comparison
    try:
        torch.backends.quantized.engine = "x86"
        qx = torch.quantize_per_tensor(x_cl, sx, zx, torch.quint8)
        qw = torch.quantize_per_channel(w, sw.double(), torch.zeros(OC, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(qw, b, [stride] * 2, [pad] * 2, [1, 1], groups)
        r["ao"] = bench(lambda: torch.ops.quantized.conv2d(qx, packed, so, zo))
    except Exception as e:  # noqa: BLE001
        print(f"  (torch.ao peer failed for {name}: {type(e).__name__}: {str(e)[:80]})")
        r["ao"] = float("nan")
    return r


def run_conv(cases, N) -> None:
    cols = ("fp32", "fp32_cl", "i8", "i8_raw", "i8_f32out", "i8_nchw_in", "i8_sum_relu", "i8_sum_inpl", "ao")
    print(f"== Conv2d, N={N} (ms, {ARGS.stat}) — i8 = onednn.qconv u8 CL in -> u8 out; i8_raw = bare op; "
          f"i8_f32out = fp32 out; i8_nchw_in = NCHW u8 input; i8_sum_relu = + u8 residual sum + relu (residual copied); i8_sum_inpl = same, residual_inplace=True; ao = torch.ops.quantized.conv2d (x86)")  # fmt: skip
    print(
        f"{'shape':26s}"
        + "".join(f"{c:>11s}" for c in cols)
        + f"{'fp32/i8':>9s}{'fp32cl/i8':>10s}{'ao/i8':>7s}{'prepack':>9s}{'1st call':>9s}"
    )
    for case in cases:
        wait_idle()
        r = conv_case(*case, N=N)
        print(f"{case[0]:26s}" + "".join(f"{r[c]:11.2f}" for c in cols)
              + f"{r['fp32'] / r['i8']:9.2f}{r['fp32_cl'] / r['i8']:10.2f}{r['ao'] / r['i8']:7.2f}{r['prepack']:9.1f}{r['first']:9.1f}")  # fmt: skip
    print()


# ----------------------------------------------------------------------------------------------
# fp32 -> u8 quantization
# ----------------------------------------------------------------------------------------------


def _q_naive(x, s, z):
    return torch.clamp(torch.round(x / s) + z, 0, 255).to(torch.uint8)


def _q_add_first(x, s, z):
    # add z before rounding: one op less (differs only at exact .5 ties when z is odd)
    t = x * (1.0 / s)
    t.add_(z).round_().clamp_(0, 255)
    return t.to(torch.uint8)


def _q_trunc_half_up(x, s, z):
    # no round(): +0.5 then the truncating float->uint8 cast = round-half-up (differs at exact ties)
    t = x * (1.0 / s)
    t.add_(z + 0.5).clamp_(0, 255)
    return t.to(torch.uint8)


def _q_formula(x, inv_s: float, z: float):
    return torch.clamp(torch.round(x * inv_s) + z, 0, 255).to(torch.uint8)


def quant_case(shape, qd, compiled):
    """Time fp32 -> uint8 variants on one activation shape; returns (ms per variant, bit-exact flags)."""
    x = torch.randn(*shape).contiguous(memory_format=CL)
    s, z = 0.05, 128
    ref = _q_formula(x, 1.0 / s, z)  # the qtoolkit convention: x * (1/s), round half even
    variants = {
        "naive": lambda: _q_naive(x, s, z),
        "quantize_u8": lambda: onednn.quantize_u8(x, s, z),
        "add_first": lambda: _q_add_first(x, s, z),
        "trunc_half_up": lambda: _q_trunc_half_up(x, s, z),
        "qd_decomp": (lambda: qd(x, s, z, 0, 255, torch.uint8)) if qd else None,
        "ao_qpt+int_repr": lambda: torch.quantize_per_tensor(x, s, z, torch.quint8).int_repr(),
        "compiled": (lambda: compiled(x, 1.0 / s, float(z))) if compiled else None,
    }
    res, exact = {}, {}
    for name, fn in variants.items():
        res[name], exact[name] = float("nan"), None
        if fn is None:
            continue
        try:
            exact[name] = bool(torch.equal(fn(), ref))
            res[name] = bench(fn)
        except Exception as e:  # noqa: BLE001
            print(f"  ({name} failed: {type(e).__name__}: {str(e)[:100]})")
    qn = ref.contiguous()
    res["dequant"] = bench(lambda: (ref.float() - z) * s)
    res["cl_copy_u8"] = bench(lambda: qn.contiguous(memory_format=CL))
    return res, exact


def run_quantize(shapes) -> None:
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops; peer only)

        qd = torch.ops.quantized_decomposed.quantize_per_tensor
    except Exception:  # noqa: BLE001
        qd = None
    compiled = None
    if ARGS.compile:
        compiled = torch.compile(_q_formula, dynamic=False)
    print(f"== fp32 -> uint8 quantization (ms, {ARGS.stat}); reference q = clamp(round_half_even(x * (1/s)) + z, 0, 255)")
    cols = [
        "naive",
        "quantize_u8",
        "add_first",
        "trunc_half_up",
        "qd_decomp",
        "ao_qpt+int_repr",
        "compiled",
        "dequant",
        "cl_copy_u8",
    ]
    print(f"{'shape':26s}" + "".join(f"{c:>16s}" for c in cols))
    for name, shape in shapes:
        wait_idle()
        res, exact = quant_case(shape, qd, compiled)
        cells = [f"{res[c]:15.2f}" + ("*" if exact.get(c) is False else " ") for c in cols]
        print(f"{name:26s}" + "".join(cells))
    print(
        "  * = not bit-identical to the reference.  naive = torch.clamp(torch.round(x / s) + z, 0, 255).to(uint8) (x/s, not x*(1/s));"
    )
    print(
        "    quantize_u8 = qtoolkit.kernels.onednn.quantize_u8 (in-place chain); qd_decomp = quantized_decomposed.quantize_per_tensor;"
    )
    print(
        "    ao_qpt+int_repr = torch.quantize_per_tensor(quint8).int_repr() (peer only); compiled = torch.compile'd reference, steady state;"
    )
    print("    dequant = (q.float() - z) * s; cl_copy_u8 = NCHW->channels_last copy of the uint8 tensor")
    print()


# ----------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------

LINEAR = [(64, 64, 10), (64, 512, 10), (64, 512, 512), (256, 1024, 1024), (1024, 1024, 1024), (64, 4096, 4096)]


def linear_case(M, K, N):
    """Time the linear variants on one (M, K, N) shape (ms)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    xmax = onednn.safe_activation_qmax(127)
    sx, zx = 8.0 / xmax, xmax // 2
    sw = w.abs().amax(dim=1) / 127
    wq = torch.clamp(torch.round(w / sw[:, None]), -127, 127).to(torch.int8)
    xq = onednn.quantize_u8(x, sx, zx, 0, xmax)
    xs8 = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    pw = onednn.prepack_linear_weight(wq)
    wt = wq.t()  # [K, N] transposed view of the [N, K] weight
    wt_c = wt.contiguous()
    r = {
        "fp32": bench(lambda: F.linear(x, w, b)),
        "qlinear": bench(lambda: onednn.qlinear(xq, sx, zx, pw, sw, None, b)),
        "qlinear_u8": bench(lambda: onednn.qlinear(xq, sx, zx, pw, sw, None, b, 0.1, 128, torch.uint8)),
    }
    # _int_mm / _weight_int8pack_mm are slow reference kernels on AVX2 CPUs: fewer repeats when slow
    t0 = time.perf_counter()
    torch._int_mm(xs8, wt)
    reps = ARGS.repeats if time.perf_counter() - t0 < 0.05 else 3
    r["_int_mm"] = bench(lambda: torch._int_mm(xs8, wt_c), reps, 1)
    r["_int_mm_T"] = bench(lambda: torch._int_mm(xs8, wt), reps, 1)
    r["w8pack_mm"] = bench(lambda: torch._weight_int8pack_mm(x, wq, sw), reps, 1)
    try:
        torch.backends.quantized.engine = "x86"
        qx = torch.quantize_per_tensor(x, sx, zx, torch.quint8)
        qw = torch.quantize_per_channel(w, sw.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, b)
        r["ao"] = bench(lambda: torch.ops.quantized.linear(qx, packed, 0.1, 128))
    except Exception as e:  # noqa: BLE001
        print(f"  (torch.ao linear peer failed: {type(e).__name__}: {str(e)[:80]})")
        r["ao"] = float("nan")
    return r


def run_linear(shapes) -> None:
    print(f"== Linear (ms, {ARGS.stat}): fp32 F.linear vs onednn.qlinear (u8 x, prepacked s8 w; fp32 / u8 out) vs torch._int_mm"
          " (s8 x s8 -> s32) vs torch._weight_int8pack_mm (fp32 x, s8 w) vs torch.ao quantized.linear (x86, peer)")  # fmt: skip
    cols = ("fp32", "qlinear", "qlinear_u8", "_int_mm", "_int_mm_T", "w8pack_mm", "ao")
    print(f"{'M x K x N':20s}" + "".join(f"{c:>12s}" for c in cols) + f"{'fp32/ql':>9s}{'fp32/imm':>9s}")
    for M, K, N in shapes:
        wait_idle()
        r = linear_case(M, K, N)
        print(
            f"{f'{M} x {K} x {N}':20s}"
            + "".join(f"{r[c]:12.2f}" for c in cols)
            + f"{r['fp32'] / r['qlinear']:9.2f}{r['fp32'] / r['_int_mm']:9.3f}"
        )
    print("  (_int_mm = contiguous [K,N] weight; _int_mm_T = transposed view of the [N,K] weight)")
    print()


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--stat", choices=["median", "min"], default="median", help="statistic over the repeats (min is robust on a busy box)"
    )
    p.add_argument("--min-time", type=float, default=0.3, help="keep repeating short ops until this many seconds are timed")
    p.add_argument("--wait-idle", type=float, default=0.0, help="before each shape wait up to S s for other processes to go idle")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="ResNet-20 shapes only, fewer repeats, no large linears")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd quantize peer")
    p.add_argument("--malloc-tune", action="store_true", help="re-exec with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set")
    p.add_argument("--only", choices=["conv", "quant", "linear"], default=None)
    ARGS = p.parse_args()
    # torch.quantize_per_* (peers only) warn that quantized dtypes are deprecated; keep the tables readable
    warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
    if ARGS.quick:
        ARGS.repeats = max(10, min(ARGS.repeats, 10))
    torch.set_num_threads(ARGS.threads)
    header()
    if not onednn.is_available():
        print("oneDNN int8 ops not available: nothing to benchmark")
        return
    N = ARGS.batch
    if ARGS.only in (None, "conv"):
        run_conv(RESNET20, N)
        if not ARGS.quick:
            run_conv(RESNET18 + EXTRA, N)
    if ARGS.only in (None, "quant"):
        qshapes = [
            (f"act {N}x3x32x32 (input)", (N, 3, 32, 32)),
            (f"act {N}x16x32x32", (N, 16, 32, 32)),
            (f"act {N}x64x32x32", (N, 64, 32, 32)),
        ]
        run_quantize(qshapes)
    if ARGS.only in (None, "linear"):
        run_linear(LINEAR[:3] if ARGS.quick else LINEAR)
    print(f"load average (1 min) at end: {loadavg()}; other processes' CPU use now: {_busy_cpus_of_others():.2f}")
    print(f"measurements during which other processes used > 0.15 CPU (after retries): {CONTAMINATED[0]} of {CONTAMINATED[1]}")


if __name__ == "__main__":
    main()

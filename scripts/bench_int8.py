"""One table: qtoolkit's int8 CPU execution vs fp32 and torch.ao's int8, ResNet-20 and ResNet-18 (CIFAR shapes).

Usage::

    .venv/bin/python scripts/bench_int8.py                   # ResNet-20 + ResNet-18, batch 1 and 64 (~3 min)
    .venv/bin/python scripts/bench_int8.py --ort             # + ONNX Runtime fp32 / int8 rows (scripts/bench_onnx.py)
    .venv/bin/python scripts/bench_int8.py --fuse-adds       # + qtoolkit with convert(fuse_adds=True)
    .venv/bin/python scripts/bench_int8.py --extra mymod:rows   # + rows from another script (see ``Variant``)
    .venv/bin/python scripts/bench_int8.py --torchvision efficientnet_b0,mobilenet_v3_small --tv-batches 1,8
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/bench_int8.py     # oneDNN capped to AVX2 (no VNNI kernels)

``--torchvision NAMES`` adds torchvision classifiers at 3×224×224 (random weights, BN statistics from data,
10 classes) with rows fp32 eager / qtoolkit int8 (fast) / module by module, and torch.ao's own int8 model
from ``torchvision.models.quantization`` where torchvision has one.  ``--json PATH`` writes the rows and the
header (``scripts/make_docs.py`` renders the tables from it).

Rows, per model (``recipes.models.resnet20`` / ``resnet18_cifar``, 3×32×32, 10 classes, random weights
and BN statistics — speed does not depend on them) and batch size:

* ``fp32 eager`` / ``fp32 channels_last``: the float model (input and weights NCHW, or channels_last).
* ``qtoolkit int8 (fast)``: ``qtoolkit.prepare(model, "w8a8")`` calibrated on 4 random batches,
  ``qtoolkit.convert`` (default execution: oneDNN int8 kernels, activations kept as uint8 codes, the forward
  run as one generated program: ``qtoolkit.program_status``).
* ``qtoolkit int8 (fast, module by module)``: the same converted model through its class's ``forward`` (each
  converted module called in turn, int8 carriers between them): what the program saves.
* ``qtoolkit w8a8-x86 (fast, 7-bit act.)``: the same with the ``w8a8-x86`` preset (7-bit activations, like
  torch.ao's x86 default): one direct kernel call per layer on every CPU.  With ``w8a8`` a CPU without VNNI
  runs 8-bit-activation layers on the exact split kernel (twice the MACs; the header says how many).
* ``qtoolkit int8 (reference)``: the same model after ``set_execution(m, "reference")`` (simulated int8).
* ``qtoolkit int8 (fast, fuse_adds)`` (``--fuse-adds``): ``convert(qm, fuse_adds=True)``, residual adds
  folded into the conv's ``sum`` post-op (faster, one rounding fewer than the reference path).
* ``torch.ao int8 (x86)``: torch.ao eager mode with the ``x86`` engine and ``get_default_qconfig("x86")``
  on a quantizable copy of the model (QuantStub/DeQuantStub, Conv+BN(+ReLU) fused, the residual add as
  ``FloatFunctional.add_relu``), calibrated on the same batches.  Its deprecation warnings are filtered.

Timing: ``torch.set_num_threads(--threads)`` (2), ``torch.inference_mode()``; per batch size every
variant is warmed up (``--warmup`` calls), then ``--repeats`` (10) repeats are taken round-robin over the
variants (so background load hits them alike), each repeat timing enough back-to-back calls to last
≥ 50 ms; the table shows the median in images/s.  ``state_dict bytes``: ``torch.save(model.state_dict())``
(ONNX rows: the model file).  The script re-executes itself once with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set to 1 GiB (glibc keeps freed activation buffers instead of returning them
to the OS on every call; ``--no-malloc-tune`` runs with the environment as it is); the header prints what
was in effect, the load average and the other processes' CPU use during the run.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def _maybe_reexec() -> None:
    if "--no-malloc-tune" not in sys.argv and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **_MALLOC_ENV))


if __name__ == "__main__":
    _maybe_reexec()

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels import dispatch  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from recipes.models import BasicBlock, resnet18_cifar, resnet20  # noqa: E402

SHAPE = (3, 32, 32)


@dataclass
class Variant:
    """One row of the table.

    ``make(x)`` gets the float input batch and returns a zero-argument callable that runs one forward
    pass (prepare inputs such as numpy copies or channels_last tensors inside ``make``, not in the call).
    ``state_bytes``: serialized size, or None.  Extra rows (``--extra module:function``) come from a
    function ``f(float_model, prepared_model, shape) -> list[Variant]``.

    Example::

        >>> v = Variant("identity", lambda x: (lambda: x), None)
        >>> v.make(1)()
        1
    """

    name: str
    make: Callable[[torch.Tensor], Callable[[], object]]
    state_bytes: int | None


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def calibration_batches(n: int = 4, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *SHAPE, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------- torch.ao peer


class _AoBlock(nn.Module):
    """The recipe BasicBlock with its residual add as a quantizable ``FloatFunctional.add_relu``."""

    def __init__(self, b: BasicBlock) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional

        self.conv1, self.bn1, self.relu1 = b.conv1, b.bn1, b.relu1
        self.conv2, self.bn2 = b.conv2, b.bn2
        self.downsample = b.downsample
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.skip_add.add_relu(out, identity)

    def fuse(self) -> None:
        from torch.ao.quantization import fuse_modules

        fuse_modules(self, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]], inplace=True)
        if self.downsample is not None:
            fuse_modules(self.downsample, [["0", "1"]], inplace=True)


class _AoNet(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.bn1, self.relu = m.conv1, m.bn1, m.relu
        self.stages = nn.Sequential(
            *[nn.Sequential(*[_AoBlock(b) for b in getattr(m, f"layer{i + 1}")]) for i in range(m.num_stages)]
        )
        self.avgpool, self.fc = m.avgpool, m.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.quant(x))))
        x = self.avgpool(self.stages(x))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def torch_ao_int8(model: nn.Module, calib: Sequence[torch.Tensor]) -> nn.Module:
    """torch.ao eager-mode static int8 (x86 engine) of a recipe ResNet (a peer, not used by qtoolkit)."""
    import copy

    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        net = _AoNet(copy.deepcopy(model)).eval()
        tq.fuse_modules(net, [["conv1", "bn1", "relu"]], inplace=True)
        for b in net.modules():
            if isinstance(b, _AoBlock):
                b.fuse()
    return _ao_calibrate_convert(net, calib)


def _ao_calibrate_convert(net: nn.Module, calib: Sequence[torch.Tensor]) -> nn.Module:
    """torch.ao's x86 default qconfig on a fused quantizable model, calibrated on ``calib``, converted (a peer)."""
    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        net.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(net, inplace=True)
        with torch.no_grad():
            for x in calib:
                net(x)
        tq.convert(net, inplace=True)
    return net


# ------------------------------------------------------------------------------------- variants


def _torch_runner(model: nn.Module, channels_last: bool = False) -> Callable[[torch.Tensor], Callable[[], object]]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def run() -> object:
            with torch.inference_mode():
                return model(xx)

        return run

    return make


def _module_by_module(model: nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return type(model).forward(model, x)

        return run

    return make


def torch_variants(model: nn.Module, calib: Sequence[torch.Tensor], fused: bool = False) -> tuple[list[Variant], nn.Module]:
    qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
    fast = qt.convert(qm)
    reference = qt.set_execution(qt.convert(qm), "reference")
    fast7 = qt.convert(qt.calibrate(qt.prepare(model, "w8a8-x86"), calib, progress=False))
    fp32_cl = __import__("copy").deepcopy(model).to(memory_format=torch.channels_last)
    ao = torch_ao_int8(model, calib)
    fp32_bytes = state_dict_bytes(model)
    extra = []
    if fused:
        f = qt.convert(qm, fuse_adds=True)
        extra.append(Variant("qtoolkit int8 (fast, fuse_adds)", _torch_runner(f), state_dict_bytes(f)))
    return [
        Variant("fp32 eager", _torch_runner(model), fp32_bytes),
        Variant("fp32 channels_last", _torch_runner(fp32_cl, True), fp32_bytes),
        Variant("qtoolkit int8 (fast)", _torch_runner(fast), state_dict_bytes(fast)),
        Variant("qtoolkit int8 (fast, module by module)", _module_by_module(fast), state_dict_bytes(fast)),
        Variant("qtoolkit w8a8-x86 (fast, 7-bit act.)", _torch_runner(fast7), state_dict_bytes(fast7)),
        Variant("qtoolkit int8 (reference)", _torch_runner(reference), state_dict_bytes(reference)),
        *extra,
        Variant("torch.ao int8 (x86)", _torch_runner(ao), state_dict_bytes(ao)),
    ], qm


def ort_variants(model: nn.Module, qm: nn.Module, shape: tuple[int, ...]) -> list[Variant]:
    """ONNX Runtime fp32 and int8 (Q/DQ export) rows via scripts/bench_onnx.py (needs onnxruntime)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_onnx

    out = Path(tempfile.mkdtemp(prefix="bench_int8_ort_"))
    paths = bench_onnx.export_all(model, qm, torch.randn(1, *shape), out)
    rows = []
    for name, path in (("ORT fp32", paths["fp32"]), ("ORT int8 (Q/DQ, target=portable)", paths[bench_onnx.PORTABLE]),
                       ("ORT int8 (Q/DQ, target=vnni)", paths[bench_onnx.VNNI])):
        sess = bench_onnx.session(path, torch.get_num_threads(), "all")

        def make(x: torch.Tensor, sess=sess) -> Callable[[], object]:
            feed = {"input": x.numpy().copy()}
            return lambda: sess.run(None, feed)

        rows.append(Variant(name, make, path.stat().st_size))
    return rows


TV_SHAPE = (3, 224, 224)
AO_PEER = "torch.ao int8 (x86)"


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, **kwargs)
    g = torch.Generator().manual_seed(0)
    m.train()
    with torch.no_grad():  # BN statistics from data (random weights, random images)
        for _ in range(2):
            m(torch.randn(4, *TV_SHAPE, generator=g))
    return m.eval()


def _torchvision_ao(name: str, model: nn.Module, calib: Sequence[torch.Tensor]) -> nn.Module | None:
    """torchvision's own quantizable twin (``torchvision.models.quantization``) with ``model``'s weights,
    torch.ao x86 static int8; None where torchvision has none."""
    import torchvision.models.quantization as tvq

    builder = getattr(tvq, name, None)
    if builder is None:
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        net = builder(weights=None, quantize=False, num_classes=10, **kwargs).eval()
        net.load_state_dict(model.state_dict())
        net.fuse_model()
    return _ao_calibrate_convert(net, calib)


def torchvision_variants(name: str) -> list[Variant]:
    model = _torchvision_model(name)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, *TV_SHAPE, generator=g) for _ in range(2)]
    fast = qt.convert(qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False))
    rows = [
        Variant("fp32 eager", _torch_runner(model), state_dict_bytes(model)),
        Variant("qtoolkit int8 (fast)", _torch_runner(fast), state_dict_bytes(fast)),
        Variant("qtoolkit int8 (fast, module by module)", _module_by_module(fast), state_dict_bytes(fast)),
    ]
    ao = _torchvision_ao(name, model, calib)
    if ao is not None:
        rows.append(Variant(AO_PEER, _torch_runner(ao), state_dict_bytes(ao)))
    return rows


# ------------------------------------------------------------------------------------- timing


def _cpu_snap() -> tuple[float, float, float]:
    """(wall s, busy CPU-s of the machine, CPU-s of this process): shared with bench_kernels."""
    from bench_kernels import _cpu_snap as snap  # scripts/ is on sys.path when run as a script

    return snap()


def images_per_s(runners: dict[str, Callable[[], object]], batch: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median images/s per runner; repeats interleaved round-robin, each ≥ 50 ms of back-to-back calls."""
    inner = {}
    for name, run in runners.items():
        for _ in range(warmup):
            run()
        t0 = time.perf_counter()
        run()
        inner[name] = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                run()
            times[name].append((time.perf_counter() - t0) / inner[name])
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet18", help="comma list of resnet20, resnet18")
    p.add_argument("--batches", default="1,64", help="comma list of batch sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--fuse-adds", action="store_true", help="add a row: convert(fuse_adds=True) (residual add in the conv)")
    p.add_argument("--ort", action="store_true", help="add ONNX Runtime fp32/int8 rows (scripts/bench_onnx.py)")
    p.add_argument("--extra", action="append", default=[], help="module:function returning list[Variant] (repeatable)")
    p.add_argument("--no-malloc-tune", action="store_true", help="do not set MALLOC_*_THRESHOLD_ (see the docstring)")
    p.add_argument("--torchvision", default="", help="comma list of torchvision classifiers at 3x224x224 (see the docstring)")
    p.add_argument("--tv-batches", default="1,8", help="batch sizes of the torchvision rows")
    p.add_argument("--json", default="", help="write the rows and the header to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    builders = {"resnet20": ("ResNet-20", resnet20), "resnet18": ("ResNet-18 (CIFAR)", resnet18_cifar)}

    snap0 = _cpu_snap()
    rows: list[tuple[str, int, str, float, float, float, int | None]] = []
    for key in [k for k in args.models.split(",") if k]:
        title, build = builders[key]
        torch.manual_seed(0)
        model = _randomize_bn(build(num_classes=10, in_channels=SHAPE[0]))
        calib = calibration_batches()
        variants, qm = torch_variants(model, calib, args.fuse_adds)
        if args.ort:
            variants += ort_variants(model, qm, SHAPE)
        for spec in args.extra:
            mod, fn = spec.split(":")
            variants += getattr(importlib.import_module(mod), fn)(model, qm, SHAPE)
        for bs in batches:
            x = torch.randn(bs, *SHAPE, generator=torch.Generator().manual_seed(bs))
            speed = images_per_s({v.name: v.make(x) for v in variants}, bs, args.warmup, args.repeats)
            fp32, ao = speed["fp32 eager"], speed["torch.ao int8 (x86)"]
            for v in variants:
                rows.append((title, bs, v.name, speed[v.name], speed[v.name] / fp32, speed[v.name] / ao, v.state_bytes))
    for name in [n for n in args.torchvision.split(",") if n]:
        variants = torchvision_variants(name)
        for bs in [int(b) for b in args.tv_batches.split(",")]:
            x = torch.randn(bs, *TV_SHAPE, generator=torch.Generator().manual_seed(bs))
            speed = images_per_s({v.name: v.make(x) for v in variants}, bs, max(1, args.warmup // 2), args.repeats)
            fp32, ao = speed["fp32 eager"], speed.get(AO_PEER)
            for v in variants:
                rows.append((f"{name} (224²)", bs, v.name, speed[v.name], speed[v.name] / fp32,
                             speed[v.name] / ao if ao else float("nan"), v.state_bytes))  # fmt: skip
    snap1 = _cpu_snap()
    others = max(0.0, ((snap1[1] - snap0[1]) - (snap1[2] - snap0[2])) / max(snap1[0] - snap0[0], 1e-3))

    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in (*_MALLOC_ENV, "OMP_NUM_THREADS"))
    header = [
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"torch.set_num_threads({args.threads}), inference_mode; median of {args.repeats} repeats (each ≥ 50 ms) "
        f"after {args.warmup} warm-up calls, variants interleaved",
        cpu_report(),
    ]
    if args.models:
        split = sum("split" in v for v in dispatch.fast_status(qt.convert(qm)).values())
        header.append(f"qtoolkit w8a8 (default preset): {split} layer(s) of the last model on the exact split kernel (no VNNI)")
    header.append(f"environment: {env}; load average {os.getloadavg()[0]:.2f}; other processes used {others:.2f} CPUs on average")
    print("\n" + "\n".join(header) + "\n")
    print(markdown_table(rows))
    if args.json:
        cols = ("model", "batch", "variant", "images_per_s", "x_fp32", "x_torch_ao", "state_dict_bytes")
        cmd = " ".join(["scripts/bench_int8.py", *(argv if argv is not None else sys.argv[1:])])
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        data = {"command": (f"ONEDNN_MAX_CPU_ISA={isa} " if isa else "") + cmd, "header": header,
                "rows": [dict(zip(cols, r)) for r in rows]}  # fmt: skip
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")


def markdown_table(rows: Sequence[Sequence[object]]) -> str:
    """The rows as the README's Markdown table (``× torch.ao`` is "—" where there is no peer)."""
    out = ["| model | batch | variant | images/s | × fp32 eager | × torch.ao int8 | state_dict bytes |",
           "|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for title, bs, name, ips, r_fp32, r_ao, nbytes in rows:
        nb = f"{nbytes:,}" if nbytes is not None else "—"
        ao = "—" if r_ao != r_ao else f"{r_ao:.2f}×"  # NaN: no peer
        out.append(f"| {title} | {bs} | {name} | {ips:,.0f} | {r_fp32:.2f}× | {ao} | {nb} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

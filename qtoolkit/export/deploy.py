"""Deploy a prepared (fake-quant) model to an inference engine in one call: exported, compiled with settings
that are faithful on the CPU it runs on, verified, callable on torch tensors.

:func:`deploy` = :func:`~qtoolkit.export.export_onnx` (dynamic batch axis) → the engine's compiler
(:mod:`qtoolkit.export.engines`: OpenVINO or ONNX Runtime) → :func:`~qtoolkit.export.engine_verify.verify_engine`
on ``verify=`` data (default: the example inputs) → a :class:`DeployedModel`.

Settings (every default visible in ``deployed.report`` and overridable by keyword):

* **OpenVINO**: ``INFERENCE_PRECISION_HINT="f32"`` (its default on CPUs with native bf16 runs the
  non-quantized ops in bf16: not faithful), ``INFERENCE_NUM_THREADS`` = ``threads`` (default: torch's
  thread count), ``PERFORMANCE_HINT="LATENCY"``.
* **ONNX Runtime**: ``graph_optimization_level="all"``, ``intra_op_num_threads`` = ``threads``,
  ``inter_op_num_threads=1``, ``execution_mode="sequential"``.
* **Weight form** (``target="auto"``): int8 weights (``"vnni"``: the engines' u8×s8 integer kernels) unless
  a probe through the engine itself (:mod:`qtoolkit.export.engine_probe`) finds that its u8×s8 conv
  saturates in int16 on this CPU (x86 without VNNI) *and* some layer's operands are large enough to
  saturate (8-bit activations × weights beyond 7 bits); then ``"portable"`` (uint8 weights, zero point 128:
  exact everywhere; OpenVINO runs those convs in f32, ONNX Runtime in its U8U8 kernels).

4-bit and mixed precision: ``export_onnx`` writes 4-bit weights as int8 codes in ``[-8, 7]`` (narrow:
``[-7, 7]``) and 4-bit activations as ``Clip`` to the grid's range before an 8-bit ``QuantizeLinear`` —
both engines run those layers with their int8 kernels, exactly (tests/export/test_deploy.py checks W4A4,
W4A8 and a mixed model).  OpenVINO's fused conv + residual add skips the rounding of the add's conv operand,
which is not faithful below 8 bits: such adds are refused before anything is compiled, naming the engine and
the layer (:func:`check_engine_support`).

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), "w8a8")
    >>> qm = qt.calibrate(qm, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> dm = qt.deploy(qm, torch.randn(2, 3, 16, 16), engine="openvino")  # doctest: +SKIP
    >>> dm.report.verification.faithful, dm(torch.randn(5, 3, 16, 16)).shape  # doctest: +SKIP
    (True, torch.Size([5, 8, 14, 14]))
    >>> dm.save("deployed/"); dm2 = qt.load_deployed("deployed/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qtoolkit._version import __version__
from qtoolkit.export.engine_probe import u8s8_saturates
from qtoolkit.export.engine_verify import EngineVerifyReport, verify_engine
from qtoolkit.export.engines import get_engine
from qtoolkit.export.errors import ExportError
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer

__all__ = ["DeployError", "DeployReport", "DeployedModel", "check_engine_support", "deploy", "load_deployed"]

_SETTINGS_FILE = "deploy.json"
_FORMAT = 1
_INT16_MAX = 32767


class DeployError(ExportError):
    """The model cannot be deployed faithfully on the engine (the message names the engine and the layer)."""


@dataclass
class DeployReport:
    """How a :class:`DeployedModel` was built (``str(report)`` is a readable summary).

    Attributes:
        engine: ``"openvino"`` or ``"onnxruntime"``.
        settings: what the engine was compiled with (defaults updated by the overrides).
        defaults: the engine defaults :func:`deploy` chose; ``overrides``: what the call changed.
        target: the weight form exported (``"vnni"``: int8 weights, ``"portable"``: uint8).
        target_reason: why that form.
        u8s8_saturates: the probe's answer for this engine and CPU (None when not probed).
        export: the :class:`~qtoolkit.export.onnx.OnnxExportReport` (None after :func:`load_deployed`).
        verification: the :class:`~qtoolkit.export.engine_verify.EngineVerifyReport` (None when not verified).
        notes: what the engine class changed in the exported graph before compiling it (the same values).
    """

    engine: str
    settings: dict[str, Any]
    defaults: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    target: str = "vnni"
    target_reason: str = ""
    u8s8_saturates: bool | None = None
    export: Any = None
    verification: EngineVerifyReport | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"engine {self.engine}: settings {self.settings} (defaults {self.defaults}; overridden {self.overrides or 'none'})",
            f"weights: target={self.target!r} ({self.target_reason})",
            *(f"graph: {n}" for n in self.notes),
        ]
        lines.append(str(self.verification) if self.verification is not None else "not verified")
        return "\n".join(lines)


def check_engine_support(model: nn.Module, engine: str) -> None:
    """Refuse, before anything runs, what ``engine`` cannot run faithfully; the error names the engine and the layer.

    Grids wider than 8 bits or per-channel activation grids narrower than 8 bits are refused by
    :func:`~qtoolkit.export.export_onnx` for every consumer.  Both engines run 4-bit weights (int8 codes in
    ``[-8, 7]``) and 4-bit activations (``Clip`` then an 8-bit ``QuantizeLinear``) with their int8 kernels,
    exactly per layer.  OpenVINO, however, fuses a residual add into the conv that produces one operand and
    does not round that conv's output to the operand's grid first (measured with OpenVINO 2026.4: at 8 bits
    up to 2 steps and ~14 % of the block's output codes one step off — within the verification's bounds;
    with a 4-bit operand grid the output of a W4A4 ResNet-20 is 11 % off in relative L2 while ONNX Runtime
    is exact).  So with ``engine="openvino"`` a residual add whose operand grid is narrower than 8 bits is
    refused: deploy W4A4 / mixed models with 4-bit adds on ``"onnxruntime"``, or keep the adds at 8 bits
    (``W4A8``, or a mixed-precision plan that keeps adds at 8 bits).

    Example::

        >>> from torch import nn
        >>> import qtoolkit as qt
        >>> check_engine_support(qt.prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8"), "openvino")
    """
    get_engine(engine)
    if engine != "openvino":
        return
    for name, m in model.named_modules():
        if not isinstance(m, QuantAdd):
            continue
        for attr in ("lhs_quantizer", "rhs_quantizer"):
            fq = getattr(m, attr, None)
            if isinstance(fq, FakeQuantize) and bool(fq.fake_quant_enabled) and fq.spec.bits < 8:
                raise DeployError(
                    f"deploy(engine='openvino'): residual add {name} quantizes its operand to a {fq.spec.bits}-bit grid "
                    f"({name}.{attr}); OpenVINO fuses the add into the conv and skips that rounding, which is not faithful "
                    "below 8 bits. Use engine='onnxruntime' (exact), or quantize the adds to 8 bits (e.g. the 'w4a8' preset)"
                )


def _saturation_prone_layers(model: nn.Module) -> list[str]:
    """Layers whose u8×s8 pair sums can exceed int16: ``2·max|activation code|·max|weight code| > 32767``."""
    prone = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLayer) or not bool(m.weight_quantizer.fake_quant_enabled):
            continue
        iq = m.input_quantizer
        if iq is None or not bool(iq.fake_quant_enabled):
            continue
        wq = m.weight_quantizer
        a = max(abs(iq.qmin), abs(iq.qmax)) if iq.role != "dynamic" else 255
        w = max(abs(wq.qmin), abs(wq.qmax))
        if 2 * a * w > _INT16_MAX:
            prone.append(name)
    return prone


def _choose_target(engine: Any, settings: dict[str, Any], model: nn.Module) -> tuple[str, str, bool]:
    saturates = u8s8_saturates(engine, settings, "int8")
    if not saturates:
        return "vnni", "probe: this engine's u8×s8 conv is exact on this CPU (VNNI or equivalent): int8 weights", False
    prone = _saturation_prone_layers(model)
    if not prone:
        return "vnni", "probe: u8×s8 saturates int16 here, but no layer's operands are large enough (weights ≤ 7 bits)", True
    return ("portable", f"probe: u8×s8 saturates int16 on this CPU (no VNNI) and {len(prone)} layer(s) can reach it "
            f"(first: {prone[0]}): uint8 weights, exact", True)  # fmt: skip


def _as_inputs(example_inputs: Any, what: str) -> tuple[Tensor, ...]:
    xs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else None
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise TypeError(f"{what} must be a tensor or a tuple of tensors (the model's positional inputs), got {type(example_inputs).__name__}")
    return xs


class DeployedModel:
    """A model compiled by an inference engine; call it like the torch model (torch tensors in and out, any
    batch size).  Not thread-safe (one infer request / session run at a time).

    Attributes:
        engine: ``"openvino"`` or ``"onnxruntime"``.  settings: what it was compiled with.
        report: the :class:`DeployReport` (settings, weight form, verification).
        input_names / output_names: the graph's.
        native: the engine's compiled object (``openvino.CompiledModel`` / ``onnxruntime.InferenceSession``).

    Example::

        >>> import torch, qtoolkit as qt
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
        >>> qm = qt.calibrate(qt.prepare(net, "w8a8"), [torch.randn(2, 3, 8, 8)], progress=False)
        >>> dm = qt.deploy(qm, torch.randn(2, 3, 8, 8), engine="onnxruntime")
        >>> isinstance(dm, DeployedModel), tuple(dm(torch.randn(5, 3, 8, 8)).shape)
        (True, (5, 8, 6, 6))
    """

    def __init__(self, engine: str, runner: Any, report: DeployReport) -> None:
        self.engine = engine
        self._runner = runner
        self.report = report
        self.settings = dict(report.settings)
        self.input_names, self.output_names = list(runner.input_names), list(runner.output_names)
        self.native = runner.native

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        xs = _as_inputs(inputs[0] if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)) else inputs, "DeployedModel(...) inputs")
        if len(xs) != len(self.input_names):
            raise ValueError(f"DeployedModel: the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(xs)}")
        arrays = [np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()) for t in xs]
        outs = [torch.from_numpy(a) for a in self._runner(arrays)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the engine's own files (OpenVINO IR ``model.xml`` / ``model.bin``, or ``model.onnx``) and
        ``deploy.json`` (engine, settings, weight form, verification summary) into ``directory``; returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = get_engine(self.engine).save(self._runner, d)
        v = self.report.verification
        meta = {
            "format": _FORMAT, "qtoolkit": __version__, "engine": self.engine, "settings": self.settings,
            "defaults": self.report.defaults, "target": self.report.target, "target_reason": self.report.target_reason,
            "u8s8_saturates": self.report.u8s8_saturates, "input_names": self.input_names, "output_names": self.output_names,
            "verification": None if v is None else {"faithful": v.faithful, "samples": v.samples, "rel_l2": v.rel_l2,
                                                    "sqnr_db": v.sqnr_db if v.sqnr_db != float("inf") else None,
                                                    "first_divergent": None if v.first_divergent is None else v.first_divergent.site},
        }  # fmt: skip
        (d / _SETTINGS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return [*paths, d / _SETTINGS_FILE]

    def __repr__(self) -> str:
        return f"DeployedModel(engine={self.engine!r}, target={self.report.target!r}, settings={self.settings})"


def deploy(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    engine: str = "openvino",
    *,
    target: str = "auto",
    threads: int | None = None,
    verify: Any = True,
    num_batches: int | None = None,
    sites: bool = True,
    strict: bool = True,
    opset: int = 17,
    settings: dict[str, Any] | None = None,
    **options: Any,
) -> DeployedModel:
    """Export ``model`` (prepared + calibrated, or QAT) and compile it with ``engine``; verify; return a callable.

    Args:
        model: the fake-quant model from :func:`qtoolkit.prepare` after calibration or QAT (not
            :func:`qtoolkit.convert`'s output).  Not modified.
        example_inputs: a float tensor (or a tuple of tensors) with the input shape; any batch size (the
            deployed model takes any batch size).
        engine: ``"openvino"`` (default) or ``"onnxruntime"``.
        target: ``"auto"`` (probe, see the module docstring), ``"vnni"`` (int8 weights) or ``"portable"``
            (uint8 weights).
        threads: the engine's thread count (default: ``torch.get_num_threads()``).
        verify: data to verify on (a tensor or batches, as :func:`qtoolkit.calibrate` takes); ``True``
            (default): the example inputs; ``False``: no verification.
        num_batches: verify on at most this many batches.
        sites: also compare every activation site, layer by layer (default True).
        strict: raise :class:`DeployError` naming the first site beyond one step when not faithful
            (default True); with ``strict=False`` the report says so and the model is returned.
        opset: ONNX opset of the export (13..20).
        settings / options: engine settings overriding the defaults, as a dict or by keyword
            (``INFERENCE_PRECISION_HINT="bf16"``, ``intra_op_num_threads=1``,
            ``settings={"session.intra_op.allow_spinning": "0"}``).

    Returns:
        A :class:`DeployedModel`; ``deployed.report`` holds the settings, the weight form and the verification.

    Raises:
        DeployError: the engine cannot run a layer faithfully (before anything runs), or the verification
            found a site more than one step off (with ``strict``); the message names the engine and the layer.
        ExportError: the model cannot be exported (uncalibrated, a converted model, ...).
        ImportError: the engine's package is missing (``pip install 'qtoolkit[openvino]'`` / ``[export]``).

    Example::

        >>> dm = deploy(qm, torch.randn(1, 3, 32, 32), engine="openvino", verify=test_batches)  # doctest: +SKIP
        >>> print(dm.report)  # doctest: +SKIP
    """
    from qtoolkit.export.onnx import export_onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy: model must be a prepared qtoolkit nn.Module, got {type(model).__name__}")
    eng = get_engine(engine)
    eng.import_module()
    if target not in ("auto", "vnni", "portable"):
        raise ValueError(f"deploy: target must be 'auto', 'vnni' or 'portable', got {target!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"deploy: threads must be a positive int, got {threads!r}")
    inputs = _as_inputs(example_inputs, "deploy: example_inputs")
    check_engine_support(model, engine)
    defaults = eng.defaults(threads or torch.get_num_threads())
    overrides = {**(settings or {}), **options}
    merged = {**defaults, **overrides}
    saturates = None
    if target == "auto":
        target, reason, saturates = _choose_target(eng, merged, model)
    else:
        reason = "given"

    import onnx

    with tempfile.TemporaryDirectory(prefix="qtoolkit_deploy_") as tmp:
        path = Path(tmp) / "model.onnx"
        export = export_onnx(model, inputs, path, opset=opset, dynamic_batch=True, target=target)
        proto = onnx.load(os.fspath(path))
    runner = eng.compile(proto, merged)
    report = DeployReport(engine, merged, defaults, overrides, target, reason, saturates, export, notes=list(runner.notes))
    if verify is not False and verify is not None:
        data = [inputs if len(inputs) > 1 else inputs[0]] if verify is True else verify
        report.verification = verify_engine(eng, merged, proto, runner, model, data, num_batches=num_batches, sites=sites)
        if strict and not report.verification.faithful:
            d = report.verification.first_divergent
            what = (f"{d.site} is {report.verification.head_rel_l2:.2g} off in relative L2" if d.numel == 0 else
                    f"layer {d.site} (node {d.node}) is {d.max_steps} quantization steps off ({100 * d.frac_differ:.2f}% of its codes differ)")
            raise DeployError(
                f"deploy(engine={engine!r}): not faithful with settings {merged}: {what} against the fake-quant model "
                f"with its inputs teacher-forced.\n{report}\n"
                "Pass strict=False to get the model anyway, or change the settings (see docs/deploy.md)."
            )
    return DeployedModel(engine, runner, report)


def load_deployed(directory: str | os.PathLike, *, threads: int | None = None, **options: Any) -> DeployedModel:
    """Read a :meth:`DeployedModel.save` directory back and compile it with its saved settings (``threads``
    and keyword settings override them).

    Example::

        >>> dm = load_deployed("deployed/", threads=1)  # doctest: +SKIP
    """
    d = Path(directory)
    meta_path = d / _SETTINGS_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_deployed: {meta_path} not found; pass a directory written by DeployedModel.save")
    meta = json.loads(meta_path.read_text())
    eng = get_engine(meta["engine"])
    settings = dict(meta["settings"])
    if threads is not None:
        settings[next(k for k in eng.defaults(1) if "THREADS" in k.upper() and "INTER" not in k.upper())] = int(threads)
    settings.update(options)
    runner = eng.load(d, settings)
    report = DeployReport(meta["engine"], settings, meta.get("defaults", {}), {k: v for k, v in settings.items() if meta["settings"].get(k) != v},
                          meta.get("target", ""), meta.get("target_reason", ""), meta.get("u8s8_saturates"))  # fmt: skip
    return DeployedModel(meta["engine"], runner, report)

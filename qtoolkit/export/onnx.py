"""ONNX export with explicit quantization (QuantizeLinear / DequantizeLinear).

:func:`export_onnx` writes a prepared + calibrated (PTQ) or QAT-trained model — the
*fake-quant* form returned by :func:`qtoolkit.prepare` — as an ONNX graph in the
"QDQ" format that ONNX Runtime and TensorRT consume:

* **Activations**: per-tensor ``QuantizeLinear → DequantizeLinear`` with the frozen
  scale / zero point (``uint8`` zero point for unsigned grids, ``int8`` for signed).
* **Weights**: quantized offline into an ``int8`` initializer (the integer codes) and
  a per-channel ``DequantizeLinear`` (``axis=0``, zero point 0): the file holds true
  int8 weights. Live-BN QAT layers are exported with BN folded (running statistics),
  i.e. ``QuantLayer.folded_weight_bias()`` quantized with the weight quantizer's
  qparams. ``target="portable"`` (the default) stores the same values as ``code + 128`` in
  ``uint8`` with zero point 128 (ORT's U8U8 kernels, exact on every x86 CPU; int8 weights —
  ``target="vnni"`` / ``"tensorrt"`` — saturate ORT's U8S8 kernels on x86 CPUs without VNNI;
  see :func:`export_onnx`).
* **Bias**: ``int32`` codes with scale ``s_x·s_w`` (per channel) and zero point 0
  through a ``DequantizeLinear`` (``bias="int32"``, default: the same int32 bias the
  fake-quant model simulates; ORT fuses every conv into ``QLinearConv`` and the
  classifier into ``QGemm``), or a float initializer holding the unquantized bias
  (``bias="float"``: ORT 1.31 still fuses the convs, quantizing the bias itself, but
  not the Gemm; TensorRT's form).
  Layers whose input is not statically quantized keep a float bias.
* **Placement** (TensorRT's explicit-quantization rules): Q/DQ on the inputs of every
  Conv / Gemm and on both inputs of every residual Add; none between a conv and its
  fused ReLU/ReLU6 (``Conv → Relu → Q`` for the next consumer), so an engine can fuse
  every conv into an int8 kernel. Quantizers of the same tensor with identical qparams
  (e.g. a block's input feeding ``conv1`` and the residual add) share one Q/DQ pair.
* **Narrow grids** (4-bit, narrow-range): weights are int8 initializers holding the
  narrow codes (``[-7, 7]`` for 4-bit narrow-range) — exact, and still an int8 kernel.
  Activation grids narrower than their 8-bit container get a float ``Clip`` to the
  grid's range before ``QuantizeLinear`` — exact, but engines then run those convs in
  float (neither ORT nor TensorRT has 4-bit activation kernels).
* **Dynamic** activations (``w8a8-dynamic``): ``DynamicQuantizeLinear →
  DequantizeLinear`` (uint8, the same qparams formula as qtoolkit's dynamic mode).
  Weight-only layers: weight ``DequantizeLinear`` only.
* **TensorRT** accepts only signed symmetric int8 Q/DQ (zero point 0): use a QConfig
  whose activations are ``QuantSpec(8, signed=True, symmetric=True)`` (exported as int8
  Q/DQ with zero point 0) and ``bias="float"``. qtoolkit's default uint8 activations
  are for ONNX Runtime.

**Opset**: 17 by default (any of 13..20 — per-channel ``DequantizeLinear`` needs 13;
20 is the newest the TorchScript exporter emits). The graph is produced by
``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter; no ``onnxscript``
needed), with the quantizers swapped for autograd Functions whose ``symbolic()`` emit
Q/DQ. The batch dimension is dynamic (``dynamic_batch=True``).

Safety: the model is validated first (uncalibrated quantizers, grids ONNX cannot
express, ops the exporter cannot express — each error names the site); the graph is
built in memory, checked with ``onnx.checker`` (full check) and written to a
temporary file in the target directory, then ``os.replace``-d onto ``path``. On any
failure nothing is written to ``path``. The model itself is not modified.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), "w8a8")
    >>> qm = qt.calibrate(qm, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> rep = export_onnx(qm, torch.randn(1, 3, 16, 16), "model.onnx")  # doctest: +SKIP
    >>> rep.num_quantize, rep.num_dequantize  # doctest: +SKIP
    (1, 3)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.atomic import atomic_write
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.fused import apply_activation
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.numerics import compute_qparams, fake_quantize, quantize
from qtoolkit.spec import QuantSpec

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "ExportError", "OnnxExportReport", "export_onnx"]

#: Default ONNX opset of :func:`export_onnx`.
DEFAULT_OPSET = 17
#: Per-channel ``DequantizeLinear`` (the ``axis`` attribute) appeared in opset 13.
MIN_OPSET = 13
#: Newest opset torch's TorchScript-based exporter emits.
MAX_OPSET = 20

_INT32_MAX = 2**31 - 1
_INSTALL_HINT = "pip install 'qtoolkit[export]'  (onnx>=1.15, onnxruntime>=1.17)"


class ExportError(RuntimeError):
    """The model cannot be exported (the message names the site); nothing was written."""


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: the default-domain opset of the graph.
        num_quantize: ``QuantizeLinear`` nodes (activations; shared where identical).
        num_dequantize: ``DequantizeLinear`` nodes (activations, weights, int32 biases).
        num_dynamic_quantize: ``DynamicQuantizeLinear`` nodes (dynamic-mode inputs).
        quantized_layers: names of the Conv/Linear layers exported with int weights.
        quantized_adds: names of the residual adds exported with Q/DQ inputs.
        float_bias: layers whose bias stayed float (and why).
        shared_qdq: activation Q/DQ pairs removed because another quantizer of the
            same tensor had identical qparams.
        verification: the :class:`~qtoolkit.export.verify.OnnxVerifyReport` of ``verify=``, else None.
    """

    path: Path
    opset: int
    num_quantize: int = 0
    num_dequantize: int = 0
    num_dynamic_quantize: int = 0
    quantized_layers: list[str] = field(default_factory=list)
    quantized_adds: list[str] = field(default_factory=list)
    float_bias: dict[str, str] = field(default_factory=dict)
    shared_qdq: int = 0
    verification: Any = None  # an OnnxVerifyReport when export_onnx(..., verify=data) ran


# --------------------------------------------------------------------------- lazy deps
def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"qtoolkit.export.export_onnx needs the 'onnx' package: {_INSTALL_HINT}") from exc
    return onnx


# --------------------------------------------------------------------------- grids
def _container_dtype(spec: QuantSpec, site: str, opset: int) -> torch.dtype:
    """int8 / uint8 tensor type that holds the codes of ``spec``."""
    if spec.bits > 8:
        raise ExportError(
            f"{site}: a {spec.bits}-bit grid ({spec.describe()}) cannot be expressed: ONNX QuantizeLinear/"
            f"DequantizeLinear at opset {opset} carry 8-bit codes (int8/uint8); use a grid of at most 8 bits"
        )
    return torch.int8 if spec.signed else torch.uint8


#: export_onnx(target=...) -> (weight_dtype, bias)
TARGETS: dict[str, tuple[str, str]] = {"portable": ("uint8", "int32"), "vnni": ("int8", "int32"), "tensorrt": ("int8", "float")}


def _full_range(dtype: torch.dtype) -> tuple[int, int]:
    return (-128, 127) if dtype == torch.int8 else (0, 255)


# --------------------------------------------------------------------------- autograd Functions with symbolics
@contextlib.contextmanager
def _tracing_paused() -> Iterator[None]:
    """Run a Function's reference computation without recording it in the ONNX trace
    (``x.float()`` on a float tensor returns ``x`` itself, which would re-map ``x`` to a
    stray Cast node in the traced graph)."""
    get, put = getattr(torch._C, "_get_tracing_state", None), getattr(torch._C, "_set_tracing_state", None)
    state = get() if get is not None else None
    if state is not None and put is not None:
        put(None)
    try:
        yield
    finally:
        if state is not None and put is not None:
            put(state)


class _QDQFn(torch.autograd.Function):
    """Activation fake quantization; exports as ``[Clip →] QuantizeLinear → DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, clip_lo, clip_hi):  # type: ignore[override]
        with _tracing_paused(), torch.no_grad():
            return fake_quantize(x.detach(), scale, zero_point.to(torch.int32), qmin, qmax, axis)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, axis, clip_lo, clip_hi):  # type: ignore[no-untyped-def]
        if clip_lo is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip_lo, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip_hi, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _DynamicQDQFn(torch.autograd.Function):
    """Dynamic (per-batch) uint8 fake quantization; exports as
    ``DynamicQuantizeLinear → DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        with _tracing_paused(), torch.no_grad():
            x = x.detach()
            lo, hi = x.aminmax()
            scale, zp = compute_qparams(lo, hi, 0, 255, False)
            return fake_quantize(x, scale, zp, 0, 255)

    @staticmethod
    def symbolic(g, x):  # type: ignore[no-untyped-def]
        q, scale, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        return g.op("DequantizeLinear", q, scale, zp)


class _DQFn(torch.autograd.Function):
    """Dequantize stored integer codes (weights, int32 biases); exports as ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):  # type: ignore[override]
        with _tracing_paused(), torch.no_grad():
            if axis is None:
                return (codes.float() - zero_point.float()) * scale.float()
            shape = [1] * codes.dim()
            shape[axis] = -1
            return (codes.float() - zero_point.float().reshape(shape)) * scale.float().reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):  # type: ignore[no-untyped-def]
        kw = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", codes, scale, zero_point, **kw)


# --------------------------------------------------------------------------- export twins
class _StaticSite(nn.Module):
    """Frozen activation quantizer: buffers ``scale`` (float32) and ``zero_point`` (int8/uint8)."""

    def __init__(self, fq: FakeQuantize, site: str, opset: int) -> None:
        super().__init__()
        spec = fq.spec
        dtype = _container_dtype(spec, site, opset)
        scale = fq.scale.detach().float().clone()
        zp = fq.zero_point.detach().clone()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp.to(dtype))
        self.qmin, self.qmax, self.axis = fq.qmin, fq.qmax, spec.axis
        self.per_tensor = spec.axis is None
        self.clip_lo: float | None = None
        self.clip_hi: float | None = None
        if (fq.qmin, fq.qmax) != _full_range(dtype):
            if spec.axis is not None:
                raise ExportError(
                    f"{site}: a per-channel activation grid narrower than 8 bits ({spec.describe()}) cannot be "
                    "expressed (ONNX Clip takes scalar bounds)"
                )
            s, z = float(scale), int(zp)
            lo = torch.tensor((fq.qmin - z) * s, dtype=torch.float32)
            hi = torch.tensor((fq.qmax - z) * s, dtype=torch.float32)
            self.clip_lo, self.clip_hi = float(lo), float(hi)

    def forward(self, x: Tensor) -> Tensor:
        return _QDQFn.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis, self.clip_lo, self.clip_hi)


class _DynamicSite(nn.Module):
    def __init__(self, fq: FakeQuantize, site: str) -> None:
        super().__init__()
        spec = fq.spec
        if spec.signed or spec.symmetric or (fq.qmin, fq.qmax) != (0, 255) or spec.axis is not None:
            raise ExportError(
                f"{site}: dynamic quantization with grid {spec.describe()} cannot be expressed; ONNX "
                "DynamicQuantizeLinear is uint8, asymmetric, per-tensor (0..255)"
            )

    def forward(self, x: Tensor) -> Tensor:
        return _DynamicQDQFn.apply(x)


def _activation_site(fq: FakeQuantize | None, site: str, opset: int) -> nn.Module | None:
    """Export form of an input/add quantizer (None: the fake-quant model does not quantize there)."""
    if fq is None or not bool(fq.fake_quant_enabled) or fq.role == "output":
        return None
    _require_calibrated(fq, site)
    if fq.role == "dynamic":
        return _DynamicSite(fq, site)
    return _StaticSite(fq, site, opset)


def _require_calibrated(fq: FakeQuantize, site: str) -> None:
    if not fq.is_calibrated:
        raise ExportError(f"{site} has no range (uncalibrated)")


@torch.no_grad()
def _weight_qparams(fq: FakeQuantize, w: Tensor, site: str) -> tuple[Tensor, Tensor]:
    """The qparams the fake-quant forward uses for ``w`` (recomputed when the weight
    observer is on, as ``FakeQuantize.forward`` does), without touching ``fq``."""
    if bool(fq.observer_enabled):
        tmp = copy.deepcopy(fq)
        tmp(w)
        return tmp.scale.detach().float().clone(), tmp.zero_point.detach().clone()
    if not fq.is_calibrated:
        raise ExportError(f"{site} has no range (uncalibrated)")
    return fq.scale.detach().float().clone(), fq.zero_point.detach().clone()


class _ExportLayer(nn.Module):
    """Export twin of :class:`QuantLayer` (BN folded, weights as int codes)."""

    def __init__(
        self, q: QuantLayer, name: str, opset: int, bias_mode: str, weight_dtype: str, report: OnnxExportReport
    ) -> None:
        super().__init__()
        self.kind = q.kind
        self.act = q.act
        if self.kind != "linear":
            self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups
        self.input_site = _activation_site(q.input_quantizer, f"{name}.input_quantizer", opset)
        with torch.no_grad():
            w, b = q.folded_weight_bias()
            w = w.detach().float().clone()
            b = None if b is None else b.detach().float().clone()
        wq = q.weight_quantizer
        self.weight_axis: int | None = None
        self.quantized_weight = bool(wq.fake_quant_enabled)
        w_scale: Tensor | None = None
        if self.quantized_weight:
            site = f"{name}.weight_quantizer"
            spec = wq.spec
            dtype = _container_dtype(spec, site, opset)
            scale, zp = _weight_qparams(wq, w, site)
            axis = None if spec.axis is None else spec.axis % w.dim()
            if axis is not None and scale.numel() != w.shape[axis]:
                raise ExportError(f"{site}: {scale.numel()} scales for {w.shape[axis]} channels (axis {axis})")
            codes = quantize(w, scale, zp, wq.qmin, wq.qmax, axis, dtype=torch.int32)
            if weight_dtype == "uint8" and dtype == torch.int8:
                # same values, shifted container: (c + 128 − (z + 128))·s == (c − z)·s
                codes, zp, dtype = codes + 128, zp.to(torch.int32) + 128, torch.uint8
            self.register_buffer("weight_codes", codes.to(dtype))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zp.to(dtype))
            self.weight_axis = axis
            w_scale = scale
        else:
            self.register_buffer("weight", w)
        self.bias_axis: int | None = None
        self.int32_bias = False
        if b is not None:
            reason = None
            if bias_mode == "float":
                reason = "bias='float'"
            elif not isinstance(self.input_site, _StaticSite) or not self.input_site.per_tensor:
                reason = "input not statically per-tensor quantized"
            elif w_scale is None:
                reason = "weight not quantized"
            if reason is None:
                assert isinstance(self.input_site, _StaticSite)
                b_scale = (self.input_site.scale * w_scale).float()
                if b_scale.dim() == 0:
                    b_scale = b_scale.expand(b.shape[0]).clone()
                b_codes = torch.round(b.double() / b_scale.double())
                if bool((b_codes.abs() > _INT32_MAX).any()) or not bool((b_scale > 0).all()):
                    reason = "bias / (s_x*s_w) overflows int32"
                else:
                    self.register_buffer("bias_codes", b_codes.to(torch.int32))
                    self.register_buffer("bias_scale", b_scale)
                    self.register_buffer("bias_zero_point", torch.zeros(b.shape[0], dtype=torch.int32))
                    self.int32_bias = True
                    self.bias_axis = 0
            if reason is not None:
                self.register_buffer("bias", b)
                report.float_bias[name] = reason
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_site is not None:
            x = self.input_site(x)
        if self.quantized_weight:
            w = _DQFn.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis)
        else:
            w = self.weight
        if self.int32_bias:
            b = _DQFn.apply(self.bias_codes, self.bias_scale, self.bias_zero_point, self.bias_axis)
        else:
            b = self.bias
        if self.kind == "linear":
            y = F.linear(x, w, b)
        else:
            conv = F.conv2d if self.kind == "conv2d" else F.conv1d
            y = conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return apply_activation(y, self.act)


class _ExportAdd(nn.Module):
    """Export twin of :class:`QuantAdd`: ``act(QDQ(a) + QDQ(b))``."""

    def __init__(self, q: QuantAdd, name: str, opset: int) -> None:
        super().__init__()
        self.act = q.act
        self.lhs_site = _activation_site(q.lhs_quantizer, f"{name}.lhs_quantizer", opset)
        self.rhs_site = _activation_site(q.rhs_quantizer, f"{name}.rhs_quantizer", opset)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and b.is_floating_point()):
            return a + b
        if self.lhs_site is not None:
            a = self.lhs_site(a)
        if self.rhs_site is not None:
            b = self.rhs_site(b)
        return apply_activation(a + b, self.act)


# --------------------------------------------------------------------------- validation
def _converted_types() -> tuple[type, ...]:
    from qtoolkit.nn.int8_add import Int8Add
    from qtoolkit.nn.int8_layer import Int8Layer

    return (Int8Layer, Int8Add)


def _validate(model: nn.Module) -> None:
    """Raise :class:`ExportError` naming every site that cannot be exported as is."""
    converted = [n or "<model>" for n, m in model.named_modules() if isinstance(m, _converted_types())]
    if converted:
        raise ExportError(
            "export_onnx exports the prepared (fake-quant) model, not qtoolkit.convert()'s output; converted "
            f"modules: {', '.join(converted[:8])}" + (" ..." if len(converted) > 8 else "")
        )
    quantized = [m for m in model.modules() if isinstance(m, (QuantLayer, QuantAdd))]
    if not quantized:
        raise ExportError(
            "export_onnx: the model has no quantized layers (QuantLayer/QuantAdd); call qtoolkit.prepare and "
            "qtoolkit.calibrate first (a float model exports with plain torch.onnx.export)"
        )
    missing = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            sites: list[tuple[str, FakeQuantize | None]] = [("input_quantizer", m.input_quantizer)]
            wq = m.weight_quantizer
            if bool(wq.fake_quant_enabled) and not bool(wq.observer_enabled) and not wq.is_calibrated:
                missing.append(f"{name}.weight_quantizer")
        elif isinstance(m, QuantAdd):
            sites = [("lhs_quantizer", m.lhs_quantizer), ("rhs_quantizer", m.rhs_quantizer)]
        else:
            continue
        for attr, fq in sites:
            if fq is not None and bool(fq.fake_quant_enabled) and not fq.is_calibrated:
                missing.append(f"{name}.{attr}")
    live = [
        name for name, fq in _named_quantizers(model)
        if fq.role == "activation" and bool(fq.fake_quant_enabled) and bool(fq.observer_enabled) and fq.is_calibrated
    ]
    if live:
        warnings.warn(
            f"export_onnx: {len(live)} activation observer(s) are still recording (e.g. {live[0]}); the fake-quant "
            "model's ranges keep moving with its inputs, the export freezes the current ones. Call "
            "qtoolkit.disable_observers(model) first (QAT: after training)",
            stacklevel=3,
        )
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ExportError(
            f"export_onnx: {len(missing)} quantizer(s) have no range: {shown}. Run qtoolkit.calibrate(model, data) "
            "(PTQ) or train with observers on (QAT) before exporting"
        )


def _named_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            yield name, m


def _build_twin(model: nn.Module, opset: int, bias_mode: str, weight_dtype: str, report: OnnxExportReport) -> nn.Module:
    """A deep copy of ``model`` with every QuantLayer/QuantAdd replaced by its export twin."""

    def twin_of(child: nn.Module, name: str) -> nn.Module | None:
        if isinstance(child, QuantLayer):
            report.quantized_layers.append(name)
            return _ExportLayer(child, name, opset, bias_mode, weight_dtype, report)
        if isinstance(child, QuantAdd):
            report.quantized_adds.append(name)
            return _ExportAdd(child, name, opset)
        return None

    def swap(module: nn.Module, prefix: str) -> None:
        for cname, child in list(module.named_children()):
            name = f"{prefix}.{cname}" if prefix else cname
            new = twin_of(child, name)
            if new is None:
                swap(child, name)
            else:
                setattr(module, cname, new)

    root = twin_of(model, "<model>")
    if root is None:
        root = copy.deepcopy(model)
        swap(root, "")
    return root.float().eval()


# --------------------------------------------------------------------------- error sites
_OP_RE = re.compile(r"'(?:aten|prim|onnx)::([A-Za-z0-9_.]+)'")


def _norm_op(name: str) -> str:
    return name.strip("_").lower()


def _find_op_callers(model: nn.Module, inputs: tuple[Any, ...], op: str) -> list[str]:
    """Names of the modules whose own code calls a torch function/method named ``op``."""
    from torch.overrides import TorchFunctionMode

    stack: list[str] = []
    found: list[str] = []
    handles = []

    def enter(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # must return None (else it replaces the output)
        if stack:
            stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))

    class _Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            fname = getattr(func, "__name__", str(func))
            if _norm_op(fname) == _norm_op(op) or _norm_op(fname).replace("_", "") == _norm_op(op).replace("_", ""):
                where = stack[-1] if stack else ""
                label = f"{where or '<model>'} ({type(model.get_submodule(where)).__name__})"
                if label not in found:
                    found.append(label)
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), _Spy():
            model(*inputs)
    except Exception:  # noqa: BLE001 - best effort: the export error is what matters
        pass
    finally:
        for h in handles:
            h.remove()
    return found


# --------------------------------------------------------------------------- graph post-processing
def _constant_values(graph: Any, numpy_helper: Any) -> dict[str, Any]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _materialize_identities(graph: Any) -> None:
    """torch deduplicates equal-valued initializers and re-creates the others as
    ``Identity`` nodes; give every site its own named initializer back."""
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            copy_ = graph.initializer.add()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            inits[copy_.name] = copy_
            continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _share_identical(model: Any, onnx: Any) -> int:
    """Merge Clip/QuantizeLinear/DequantizeLinear nodes that compute the same thing
    (same input, same constant scale/zero point values, same attributes). Returns how
    many QuantizeLinear nodes were removed."""
    from onnx import numpy_helper

    graph = model.graph
    consts = _constant_values(graph, numpy_helper)
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, Any] = {}
    keep = []
    removed_q = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip") and not (set(node.output) & graph_outputs):
            key_inputs = []
            for name in node.input:
                if name in consts:
                    arr = consts[name]
                    key_inputs.append(("const", str(arr.dtype), arr.shape, arr.tobytes()))
                else:
                    key_inputs.append(("value", name))
            attrs = tuple(sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in node.attribute))
            key = (node.op_type, node.domain, tuple(key_inputs), attrs)
            if key in seen:
                for old, new in zip(node.output, seen[key].output):
                    rename[old] = new
                removed_q += node.op_type == "QuantizeLinear"
                continue
            seen[key] = node
        keep.append(node)
    if rename:
        del graph.node[:]
        graph.node.extend(keep)
        # drop now-unused Constant nodes / initializers
        used = {n for node in graph.node for n in node.input} | graph_outputs
        live = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
        del graph.node[:]
        graph.node.extend(live)
        inits = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return removed_q


def _legacy_exporter_kwargs() -> dict[str, Any]:
    """``dynamo=False`` where torch.onnx.export has the switch (torch ≥ 2.5; the
    TorchScript exporter is the only one before)."""
    try:
        params = inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {"dynamo": False}
    return {"dynamo": False} if "dynamo" in params else {}


# --------------------------------------------------------------------------- public API
def export_onnx(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    target: str = "portable",
    bias: str | None = None,
    weight_dtype: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: Any = None,
) -> OnnxExportReport:
    """Export a prepared + calibrated (or QAT) qtoolkit model to ONNX with Q/DQ nodes.

    Args:
        model: the fake-quant model from :func:`qtoolkit.prepare` after
            :func:`qtoolkit.calibrate` or QAT (not :func:`qtoolkit.convert`'s output).
            It is deep-copied; exported in eval semantics (BN with running statistics).
        example_input: a float32 tensor (or a tuple of tensors) with the input's shape;
            its batch size does not matter when ``dynamic_batch``.
        path: the ``.onnx`` file to write (its directory must exist).
        opset: ONNX default-domain opset, 13..20 (default 17). Per-channel
            ``DequantizeLinear`` needs 13; 20 is the TorchScript exporter's newest.
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        target: which consumer the file is for; it sets ``weight_dtype`` and ``bias`` unless they are given:

            * ``"portable"`` (default): uint8 weights (``code + 128``, zero point 128), int32 bias.  ONNX
              Runtime then runs its U8U8 integer kernels, which are exact on **every** x86 CPU.  Its U8S8
              kernels (int8 weights) add pairs of products in int16 with saturation on x86 CPUs without
              AVX-VNNI (AVX2-only, AVX-512 without VNNI: e.g. AMD Zen 2/3, Skylake): measured on a Zen 3,
              a calibrated torchvision ResNet-18 was 37 codes off at its first conv (``verify_onnx``).
            * ``"vnni"``: int8 weights, int32 bias — ORT's faster U8S8 kernels, exact on CPUs with
              AVX-VNNI / AVX512-VNNI / AMX (and on ARM); not on the CPUs above.
            * ``"tensorrt"``: int8 weights, float bias (TensorRT's explicit-quantization form; TensorRT also
              wants signed symmetric activations, see the module docstring).
        bias: ``"int32"``: bias as int32 codes at scale ``s_x·s_w`` (zero point
            0) through a ``DequantizeLinear`` — the form ONNX Runtime's QDQ fusion expects
            (``QLinearConv``, and ``QGemm`` for the classifier; ORT ≥ 1.20 also fuses convs
            with a float bias by quantizing it itself, but leaves Gemm float); it is the
            int32 bias the fake-quant model simulates. ``"float"``: the unquantized float
            bias (the engine rounds it itself); TensorRT expects this form.
        weight_dtype: container of the weight codes (default: from ``target``). ``"int8"``:
            symmetric, zero point 0. ``"uint8"``: the same values as ``code + 128`` with zero
            point 128, which makes ORT use its U8U8 kernels (exact everywhere; on x86 CPUs without
            AVX-VNNI its U8S8 kernels' ``vpmaddubsw`` can saturate int16 pair sums for 8-bit weights,
            255·127·2 > 32767). 7-bit weights (``int_weight_per_channel(7)``, ORT's "reduce_range")
            or 4-bit weights cannot saturate and are exact as int8 too.
        input_names / output_names: graph input/output names (default ``input`` /
            ``output`` or ``input_0``, ``output_1``, ... when there are several).
        verify: optional data (a tensor or batches, as :func:`qtoolkit.calibrate` takes): run the written
            file in ONNX Runtime on it and compare with ``model`` (:func:`qtoolkit.export.verify_onnx`);
            the result is ``report.verification``.

    Returns:
        An :class:`OnnxExportReport` (node counts, exported sites; ``verification`` with ``verify=``).

    Raises:
        ExportError: uncalibrated quantizers, a grid ONNX cannot express (> 8 bits, ...),
            an op the exporter cannot express, a converted model — the message names
            the site. Nothing is written to ``path`` on failure.
        ImportError: ``onnx`` is not installed (``pip install 'qtoolkit[export]'``).
    """
    onnx = _import_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"export_onnx: opset must be an int in {MIN_OPSET}..{MAX_OPSET} (per-channel DequantizeLinear needs 13; "
            f"{MAX_OPSET} is the TorchScript exporter's newest), got {opset!r}"
        )
    if target not in TARGETS:
        raise ValueError(f"export_onnx: target must be one of {sorted(TARGETS)}, got {target!r}")
    weight_dtype = TARGETS[target][0] if weight_dtype is None else weight_dtype
    bias = TARGETS[target][1] if bias is None else bias
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"export_onnx: weight_dtype must be 'int8' or 'uint8', got {weight_dtype!r}")
    if bias not in ("int32", "float"):
        raise ValueError(f"export_onnx: bias must be 'int32' or 'float', got {bias!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export_onnx: directory {path.parent} does not exist")
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("export_onnx: example_input must be a tensor or a sequence of tensors")

    _validate(model)
    report = OnnxExportReport(path=path, opset=opset)
    twin = _build_twin(model, opset, bias, weight_dtype, report)
    twin = twin.to("cpu")
    inputs = tuple(t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype) for t in inputs)

    with torch.no_grad():
        try:
            outputs = twin(*inputs)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"export_onnx: the model's forward failed on example_input: {type(exc).__name__}: {exc}") from exc
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    in_names = list(input_names) if input_names else (["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))])
    out_names = list(output_names) if output_names else (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    if len(in_names) != len(inputs) or len(out_names) != n_out:
        raise ValueError(f"export_onnx: {len(inputs)} inputs / {n_out} outputs but names {in_names} / {out_names}")
    dynamic_axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one; it is the
        # one that honours autograd.Function.symbolic (Q/DQ) and needs no onnxscript
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        try:
            torch.onnx.export(
                twin, inputs, buf, **_legacy_exporter_kwargs(), opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_axes=dynamic_axes, do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
            )
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            m = _OP_RE.search(str(exc))
            if m:
                callers = _find_op_callers(twin, inputs, m.group(1).split(".")[-1])
                where = f" (called in {', '.join(callers)})" if callers else ""
                raise ExportError(
                    f"export_onnx: op '{m.group(0).strip(chr(39))}'{where} cannot be expressed in ONNX opset {opset}: "
                    f"{msg}. Nothing was written to {path}"
                ) from exc
            raise ExportError(f"export_onnx: torch.onnx.export failed: {type(exc).__name__}: {msg}. Nothing was written to {path}") from exc

    proto = onnx.load_from_string(buf.getvalue())
    _materialize_identities(proto.graph)
    report.shared_qdq = _share_identical(proto, onnx)
    proto.producer_name = "qtoolkit"
    from qtoolkit import __version__

    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, {"qtoolkit.format": "qdq", "qtoolkit.bias": bias, "qtoolkit.weight_dtype": weight_dtype,
                                        "qtoolkit.target": target})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"export_onnx: the exported graph fails onnx.checker: {exc}. Nothing was written to {path}") from exc
    ops = [n.op_type for n in proto.graph.node]
    report.num_quantize = ops.count("QuantizeLinear")
    report.num_dequantize = ops.count("DequantizeLinear")
    report.num_dynamic_quantize = ops.count("DynamicQuantizeLinear")

    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    if verify is not None:
        from qtoolkit.export.verify import verify_onnx

        report.verification = verify_onnx(path, model, verify)
    return report

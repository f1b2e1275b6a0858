"""Export twins: the modules that replace :class:`QuantLayer` / :class:`QuantAdd` in the
deep copy that :func:`qtoolkit.export.onnx.export_onnx` traces (BN folded, weights as
integer codes behind ``DequantizeLinear``), and the validation of the model before export.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qtoolkit.export.errors import ExportError
from qtoolkit.export.float_twins import ExportAdaptiveAvgPool2d
from qtoolkit.export.qdq import _activation_site, _container_dtype, _DQFn, _StaticSite
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.layer_kinds import get_layer_kind
from qtoolkit.module_swap import swap_modules
from qtoolkit.nn.fused import apply_activation
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.int8_ops import Int8Activation, Int8Cat, Int8Einsum, Int8MatMul, Int8Mul, Int8Norm
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantCat, QuantNorm, _QuantBinary
from qtoolkit.numerics import quantize

if TYPE_CHECKING:  # annotations only
    from qtoolkit.export.report import OnnxExportReport

_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- export twins
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
        kind = q.kind_info
        self.act = q.act
        self.op_args = kind.op_args(q)  # stride / padding / ... of the functional op
        self.functional = kind.functional
        groups = getattr(q, "groups", 1)
        # weights in the layer's own layout, so that DQ feeds the ONNX op directly (ConvTranspose: [in, out/g, *k]);
        # a grouped transposed conv has no single output-channel axis there: DQ on [out, in/g, *k], then reordered
        self.canonical = kind.transposed and groups > 1
        self.weight_groups = groups
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
            if kind.transposed and not self.canonical:  # [out, in, *k] -> the layer's [in, out, *k]
                codes = kind.from_canonical(codes, groups).contiguous()
                axis = None if axis is None else 1
            if weight_dtype == "uint8" and dtype == torch.int8:
                # same values, shifted container: (c + 128 − (z + 128))·s == (c − z)·s
                codes, zp, dtype = codes + 128, zp.to(torch.int32) + 128, torch.uint8
            self.register_buffer("weight_codes", codes.to(dtype))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zp.to(dtype))
            self.weight_axis = axis
            w_scale = scale
        else:
            self.register_buffer("weight", w if self.canonical else kind.from_canonical(w, groups).contiguous())
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
        if self.canonical:
            w = get_layer_kind(self.kind).from_canonical(w, self.weight_groups)
        y = self.functional(x, w, b, **self.op_args)
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


class _ExportCat(nn.Module):
    """Export twin of :class:`QuantCat`: every input through the same Q/DQ, then ``Concat``."""

    def __init__(self, q: QuantCat, name: str, opset: int) -> None:
        super().__init__()
        self.dim, self.stack = q.dim, q.stack
        self.site = _activation_site(q.input_quantizer, f"{name}.input_quantizer", opset)

    def forward(self, tensors: list[Tensor]) -> Tensor:
        ts = list(tensors)
        if self.site is not None and all(isinstance(t, Tensor) and t.is_floating_point() for t in ts):
            ts = [self.site(t) for t in ts]
        return (torch.stack if self.stack else torch.cat)(ts, self.dim)


class _ExportBinary(nn.Module):
    """Export twin of :class:`QuantMul` / :class:`QuantMatMul`: ``op(QDQ(a), QDQ(b))`` (``Mul`` / ``MatMul``)."""

    def __init__(self, q: _QuantBinary, name: str, opset: int) -> None:
        super().__init__()
        self.op = q.op
        self.lhs_site = _activation_site(q.lhs_quantizer, f"{name}.lhs_quantizer", opset)
        self.rhs_site = _activation_site(q.rhs_quantizer, f"{name}.rhs_quantizer", opset)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and b.is_floating_point():
            a = a if self.lhs_site is None else self.lhs_site(a)
            b = b if self.rhs_site is None else self.rhs_site(b)
        return self.op(a, b)


class _ExportActivation(nn.Module):
    """Export twin of :class:`QuantActivation` / :class:`QuantNorm`: ``QDQ(f(QDQ(x)))`` (an engine runs an
    activation as a lookup table, a LayerNorm as its int8 kernel)."""

    def __init__(self, q: QuantActivation | QuantNorm, name: str, opset: int) -> None:
        super().__init__()
        self.fn = q.norm if isinstance(q, QuantNorm) else q.fn
        self.input_site = _activation_site(q.input_quantizer, f"{name}.input_quantizer", opset)
        self.output_site = _activation_site(q.output_quantizer, f"{name}.output_quantizer", opset)

    def forward(self, x: Tensor) -> Tensor:
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            return self.fn(x)
        x = x if self.input_site is None else self.input_site(x)
        y = self.fn(x)
        return y if self.output_site is None else self.output_site(y)


# --------------------------------------------------------------------------- validation
def _converted_types() -> tuple[type, ...]:
    return (Int8Layer, Int8Add, Int8Cat, Int8Mul, Int8MatMul, Int8Einsum, Int8Activation, Int8Norm)


def _validate(model: nn.Module) -> None:
    """Raise :class:`ExportError` naming every site that cannot be exported as is."""
    converted = [n or "<model>" for n, m in model.named_modules() if isinstance(m, _converted_types())]
    if converted:
        raise ExportError(
            "export_onnx exports the prepared (fake-quant) model, not qtoolkit.convert()'s output; converted "
            f"modules: {', '.join(converted[:8])}" + (" ..." if len(converted) > 8 else "")
        )
    quantizers = list(_named_quantizers(model))
    if not quantizers:
        raise ExportError(
            "export_onnx: the model has no quantized layers (QuantLayer/QuantAdd); call qtoolkit.prepare and "
            "qtoolkit.calibrate first (a float model exports with plain torch.onnx.export)"
        )
    missing = []
    for name, fq in quantizers:  # every quantizer that would fake-quantize without a range
        if not bool(fq.fake_quant_enabled) or fq.is_calibrated:
            continue
        if fq.role in ("activation", "output") or (fq.role == "weight" and not bool(fq.observer_enabled)):
            missing.append(name)
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
        if isinstance(child, QuantCat):
            report.quantized_ops.append(name)
            return _ExportCat(child, name, opset)
        if isinstance(child, _QuantBinary):
            report.quantized_ops.append(name)
            return _ExportBinary(child, name, opset)
        if isinstance(child, (QuantActivation, QuantNorm)):
            report.quantized_ops.append(name)
            return _ExportActivation(child, name, opset)
        if type(child) is nn.AdaptiveAvgPool2d:  # float; exportable at every input size (float_twins)
            return ExportAdaptiveAvgPool2d(child)
        return None

    root = twin_of(model, "<model>")
    if root is None:
        root = copy.deepcopy(model)
        swap_modules(root, twin_of)
    return root.float().eval().requires_grad_(False)  # a frozen copy: parameters export as initializers

"""Export forms of activation quantizers: autograd Functions whose ``symbolic()`` emit
``QuantizeLinear`` / ``DequantizeLinear`` / ``DynamicQuantizeLinear``, the modules that
apply them at a quantization site, and the int8/uint8 container helpers.

Used by :mod:`qtoolkit.export.twins`; see :func:`qtoolkit.export.onnx.export_onnx`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from qtoolkit.export.errors import ExportError
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.numerics import compute_qparams, fake_quantize
from qtoolkit.spec import QuantSpec


# --------------------------------------------------------------------------- grids
def _container_dtype(spec: QuantSpec, site: str, opset: int) -> torch.dtype:
    """int8 / uint8 tensor type that holds the codes of ``spec``."""
    if spec.bits > 8:
        raise ExportError(
            f"{site}: a {spec.bits}-bit grid ({spec.describe()}) cannot be expressed: ONNX QuantizeLinear/"
            f"DequantizeLinear at opset {opset} carry 8-bit codes (int8/uint8); use a grid of at most 8 bits"
        )
    return torch.int8 if spec.signed else torch.uint8


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


"""Converted residual add (static mode).

``"reference"``: both operands quantized to their grids and dequantized, added in
float (the prepared model's arithmetic). ``"integer"``: TFLite-style integer add —
both operands are rescaled to a common fixed-point grid with ``2^20`` headroom using
fixed-point multipliers, summed, requantized to the output grid, clamped (the
fused ReLU is the clamp). ``"fast"``: one oneDNN int8 kernel on the uint8 codes (an
identity GEMM with the other operand as its ``sum`` accumulator), or, with
``convert(fuse_adds=True)``, fused into the preceding conv's ``sum`` post-op (see
:mod:`qtoolkit.kernels.dispatch`).

Example::

    >>> import torch
    >>> from qtoolkit.config import get_qconfig
    >>> from qtoolkit.nn.quant_add import QuantAdd
    >>> qa = QuantAdd(get_qconfig("w8a8"))
    >>> for fq in (qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer):
    ...     _ = fq.observer(torch.linspace(-2, 2, 11)); fq.finalize()
    >>> add = Int8Add.from_quant(qa)
    >>> with torch.no_grad():
    ...     y = add(torch.tensor([0.5]), torch.tensor([0.25]))  # both operands on their 8-bit grids
    >>> y
    tensor([0.7529])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtoolkit.inference import inference_only
from qtoolkit.kernels import dispatch
from qtoolkit.kernels.params import AddParams
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.nn.fused import apply_activation
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.numerics import (
    HALF_DTYPES,
    dequantize,
    fake_quantize,
    multiply_by_quantized_multiplier,
    quantize,
    quantize_multiplier,
)

__all__ = ["Int8Add"]

_LEFT_SHIFT = 20


class Int8Add(nn.Module):
    """Integer residual add. Build with :meth:`from_quant`."""

    def __init__(self, q: QuantAdd) -> None:
        super().__init__()
        spec = q.qconfig.activation.spec  # type: ignore[union-attr]
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.act = q.act
        self.name = "int8_add"
        self.execution = "reference"
        self.float_output = False  # set by convert() where the sum leaves the int8 graph: float, not requantized
        self.fast_donate: int | None = None  # set by convert(): operand the fast add may overwrite in place
        for p in ("lhs", "rhs", "output"):
            self.register_buffer(f"{p}_scale", torch.ones(()))
            self.register_buffer(f"{p}_zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: QuantAdd, require_calibrated: bool = True) -> Int8Add:
        m = cls(q)
        for p in ("lhs", "rhs", "output"):
            fq = getattr(q, f"{p}_quantizer")
            if not fq.is_calibrated:
                if require_calibrated:
                    raise RuntimeError(f"{fq.name}: not calibrated")
                continue
            setattr(m, f"{p}_scale", fq.scale.detach().float().reshape(()).clone())
            setattr(m, f"{p}_zero_point", fq.zero_point.detach().reshape(()).to(torch.int32).clone())
        return m

    def forward_reference(self, a: Tensor, b: Tensor) -> Tensor:
        a = fake_quantize(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax)
        b = fake_quantize(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax)
        return apply_activation(a + b, self.act)

    def forward_integer(self, a: Tensor, b: Tensor) -> Tensor:
        qa = quantize(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax).long() - int(self.lhs_zero_point)
        qb = quantize(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax).long() - int(self.rhs_zero_point)
        sa, sb, so = float(self.lhs_scale), float(self.rhs_scale), float(self.output_scale)
        if self.float_output:  # the sum leaves the quantized graph: no 8-bit requantization
            return apply_activation(qa.double() * sa + qb.double() * sb, self.act).to(a.dtype)
        twice_max = 2.0 * max(sa, sb)
        ma, na = quantize_multiplier(sa / twice_max)
        mb, nb = quantize_multiplier(sb / twice_max)
        mo, no = quantize_multiplier(twice_max / ((1 << _LEFT_SHIFT) * so))
        acc = multiply_by_quantized_multiplier(qa << _LEFT_SHIFT, ma, na) + multiply_by_quantized_multiplier(qb << _LEFT_SHIFT, mb, nb)
        zo = int(self.output_zero_point)
        y = multiply_by_quantized_multiplier(acc, mo, no) + zo
        lo, hi = self.qmin, self.qmax
        if self.act in ("relu", "relu6"):
            lo = max(lo, zo)
        if self.act == "relu6":
            hi = min(hi, zo + round(6.0 / so))
        return dequantize(torch.clamp(y, lo, hi), self.output_scale, self.output_zero_point).to(a.dtype)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Add ``a + b`` (floats or :class:`~qtoolkit.kernels.qtensor.QuantizedActivation` carriers)."""
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return a + b
        if self.execution == "fast":
            return dispatch.fast_add(self, a, b)
        if isinstance(a, QuantizedActivation):
            a = a.dequantize()
        if isinstance(b, QuantizedActivation):
            b = b.dequantize()
        dt = torch.promote_types(a.dtype, b.dtype)
        if dt in HALF_DTYPES:  # computed in float32, returned in the inputs' dtype
            a, b = a.to(torch.float32), b.to(torch.float32)
        if self.execution == "integer":
            y = self.forward_integer(a, b)
        else:
            y = self.forward_reference(a, b)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def kernel_params(self) -> AddParams:
        """This add as the int8 kernels see it (a frozen snapshot; see :mod:`qtoolkit.kernels.params`)."""
        return AddParams(
            self.name, self.act, self.qmin, self.qmax, float(self.lhs_scale), int(self.lhs_zero_point),
            float(self.rhs_scale), int(self.rhs_zero_point), float(self.output_scale), int(self.output_zero_point),
            bool(self.float_output), self.fast_donate,
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.__dict__.pop("_qt_fast", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self.__dict__.pop("_qt_fast", None)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"act={self.act}, execution={self.execution}"

"""Quantization-aware residual add (the *prepared* form of :class:`~qtoolkit.nn.fused.Add`).

Both operands are fake-quantized (TensorRT's placement: Q/DQ on both inputs of an
elementwise add), then added in float; the optional fused ReLU follows; an
observe-only output quantizer records the range an integer engine requantizes to.

Example::

    >>> import torch
    >>> from qtoolkit.config import get_qconfig
    >>> add = QuantAdd(get_qconfig("w8a8"), act="relu")
    >>> add(torch.randn(2, 4), torch.randn(2, 4)).min() >= 0
    tensor(True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.fused import ACTIVATIONS, apply_activation
from qtoolkit.numerics import HALF_DTYPES

__all__ = ["QuantAdd"]


class QuantAdd(nn.Module):
    """``act(fq_lhs(a) + fq_rhs(b))`` with static activation quantizers."""

    def __init__(self, qconfig: QConfig, act: str | None = None) -> None:
        super().__init__()
        if qconfig.mode != "static" or qconfig.activation is None:
            raise ValueError("QuantAdd needs a static QConfig with an activation quantizer")
        if act not in (None, *ACTIVATIONS):
            raise ValueError(f"QuantAdd: unknown activation {act!r}")
        self.qconfig = qconfig
        self.act = act
        self.lhs_quantizer = FakeQuantize(qconfig.activation, role="activation")
        self.rhs_quantizer = FakeQuantize(qconfig.activation, role="activation")
        self.output_quantizer = FakeQuantize(qconfig.activation, role="output")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and b.is_floating_point()):
            return a + b  # e.g. shape arithmetic: nothing to quantize
        dt = torch.promote_types(a.dtype, b.dtype)
        if dt in HALF_DTYPES:  # computed in float32, returned in the inputs' dtype (as QuantLayer)
            a, b = a.to(torch.float32), b.to(torch.float32)
        y = self.output_quantizer(apply_activation(self.lhs_quantizer(a) + self.rhs_quantizer(b), self.act, inplace=True))
        return y.to(dt) if dt in HALF_DTYPES else y

    def extra_repr(self) -> str:
        return f"act={self.act}, spec={self.qconfig.activation.spec.describe()}"  # type: ignore[union-attr]

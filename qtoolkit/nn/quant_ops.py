"""Quantization-aware functional ops (the *prepared* forms of :class:`~qtoolkit.nn.fused.Cat`,
:class:`~qtoolkit.nn.fused.Mul` and :class:`~qtoolkit.nn.fused.MatMul`), placed as TensorRT places Q/DQ:

* :class:`QuantCat` — **one** activation quantizer shared by every input of a ``cat``/``stack``: all inputs
  land on one grid, so the concatenation is exact on codes (an int8 engine concatenates bytes; TensorRT
  requires equal scales on a concat's inputs). Its range is the union of the inputs' ranges (the output's).
* :class:`QuantMul`, :class:`QuantMatMul` — both operands fake-quantized (each its own quantizer), the
  product in float, an observe-only output quantizer recording the range an integer engine requantizes to.
* :class:`QuantNorm` — a LayerNorm / GroupNorm with int8 input and output (its statistics in float), when asked
  for (``prepare`` keeps normalization float by default).
* :class:`QuantActivation` — an elementwise activation (hardswish, SiLU, GELU, sigmoid, ...) between two
  quantizers that both round: an int8 engine runs it as a lookup table from input codes to output codes.

Example::

    >>> import torch
    >>> from qtoolkit.config import get_qconfig
    >>> cat = QuantCat(get_qconfig("w8a8"), dim=1)
    >>> y = cat([torch.rand(2, 3), 2 * torch.rand(2, 5)])   # observes, then fake-quantizes both inputs
    >>> y.shape
    torch.Size([2, 8])
    >>> mm = QuantMatMul(get_qconfig("w8a8"))
    >>> mm(torch.randn(2, 4, 8), torch.randn(2, 8, 3)).shape
    torch.Size([2, 4, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.float_attrs import float_attributes, keep_float_attributes
from qtoolkit.nn.fused import LUT_ACTIVATIONS
from qtoolkit.numerics import HALF_DTYPES

__all__ = ["QuantCat", "QuantMul", "QuantMatMul", "QuantEinsum", "QuantActivation", "QuantNorm"]


def _static_activation(qconfig: QConfig, who: str) -> None:
    if qconfig.mode != "static" or qconfig.activation is None:
        raise ValueError(f"{who} needs a static QConfig with an activation quantizer (got mode={qconfig.mode!r})")


def _float_tensors(*ts: object) -> bool:
    return all(isinstance(t, Tensor) and t.is_floating_point() for t in ts)


class QuantCat(nn.Module):
    """``cat([fq(t) for t in tensors], dim)`` with one shared static activation quantizer ``input_quantizer``."""

    def __init__(self, qconfig: QConfig, dim: int = 0, stack: bool = False) -> None:
        super().__init__()
        _static_activation(qconfig, "QuantCat")
        self.qconfig = qconfig
        self.dim = int(dim)
        self.stack = bool(stack)
        self.input_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]

    def forward(self, tensors: Sequence[Tensor]) -> Tensor:
        ts = list(tensors)
        op = torch.stack if self.stack else torch.cat
        if not ts or not _float_tensors(*ts):
            return op(ts, self.dim)
        dt = ts[0].dtype
        for t in ts[1:]:
            dt = torch.promote_types(dt, t.dtype)
        y = op([self.input_quantizer(t.to(torch.float32) if dt in HALF_DTYPES else t) for t in ts], self.dim)
        return y.to(dt) if dt in HALF_DTYPES else y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stack={self.stack}, spec={self.qconfig.activation.spec.describe()}"  # type: ignore[union-attr]


class _QuantBinary(nn.Module):
    """``op(fq_lhs(a), fq_rhs(b))`` with static activation quantizers and an observe-only output quantizer."""

    op_name = ""

    def __init__(self, qconfig: QConfig) -> None:
        super().__init__()
        _static_activation(qconfig, type(self).__name__)
        self.qconfig = qconfig
        self.lhs_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]
        self.rhs_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]
        self.output_quantizer = FakeQuantize(qconfig.activation, role="output")  # type: ignore[arg-type]

    @staticmethod
    def op(a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not _float_tensors(a, b):
            return self.op(a, b)  # e.g. shape arithmetic: nothing to quantize
        dt = torch.promote_types(a.dtype, b.dtype)
        if dt in HALF_DTYPES:  # computed in float32, returned in the inputs' dtype (as QuantLayer)
            a, b = a.to(torch.float32), b.to(torch.float32)
        y = self.output_quantizer(self.op(self.lhs_quantizer(a), self.rhs_quantizer(b)))
        return y.to(dt) if dt in HALF_DTYPES else y

    def extra_repr(self) -> str:
        return f"spec={self.qconfig.activation.spec.describe()}"  # type: ignore[union-attr]


class QuantMul(_QuantBinary):
    """Elementwise ``fq(a) * fq(b)`` (e.g. a squeeze-excitation gate times its features)."""

    op_name = "mul"

    @staticmethod
    def op(a: Tensor, b: Tensor) -> Tensor:
        return a * b


class QuantMatMul(_QuantBinary):
    """``torch.matmul(fq(a), fq(b))`` (e.g. attention's ``q @ kᵀ`` and ``softmax(...) @ v``)."""

    op_name = "matmul"

    @staticmethod
    def op(a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class QuantEinsum(_QuantBinary):
    """``torch.einsum(equation, fq(a), fq(b))`` — a two-operand contraction (e.g. MaxViT's attention scores)."""

    op_name = "einsum"

    def __init__(self, qconfig: QConfig, equation: str) -> None:
        super().__init__(qconfig)
        self.equation = equation

    def op(self, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        return torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return f"{self.equation!r}, " + super().extra_repr()


def _between_quantizers(fn: Callable[[Tensor], Tensor], x: Tensor, fq_in: nn.Module, fq_out: nn.Module) -> Tensor:
    """``fq_out(fn(fq_in(x)))`` for float ``x`` (float16/bfloat16 computed in float32 and cast back); anything
    else goes to ``fn`` unquantized."""
    if not _float_tensors(x):
        return fn(x)
    dt = x.dtype
    y = fq_out(fn(fq_in(x.to(torch.float32) if dt in HALF_DTYPES else x)))
    return y.to(dt) if dt in HALF_DTYPES else y


class QuantActivation(nn.Module):
    """``fq_out(act(fq_in(x)))``: an elementwise activation as an int8 lookup table sees it.

    Both quantizers round (``output_quantizer`` here is a rounding activation quantizer, not the observe-only
    output quantizer of layers): the converted :class:`~qtoolkit.nn.Int8Activation` maps each input code to an
    output code through a table of ``qmax − qmin + 1`` entries and gives exactly these numbers.

    Args:
        act: a name in :data:`qtoolkit.nn.fused.LUT_ACTIVATIONS`.
        qconfig: a static QConfig.
        float_module: the float module it replaces (kept for its options, e.g. GELU's ``approximate``,
            LeakyReLU's slope); None: the functional default.
    """

    def __init__(self, act: str, qconfig: QConfig, float_module: nn.Module | None = None) -> None:
        super().__init__()
        _static_activation(qconfig, "QuantActivation")
        if act not in LUT_ACTIVATIONS:
            raise ValueError(f"QuantActivation: unknown activation {act!r}; known: {', '.join(LUT_ACTIVATIONS)}")
        self.act = act
        self.qconfig = qconfig
        self.fn = float_module if float_module is not None else LUT_ACTIVATIONS[act]
        self.input_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]
        self.output_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return _between_quantizers(self.fn, x, self.input_quantizer, self.output_quantizer)

    def extra_repr(self) -> str:
        return f"act={self.act}, spec={self.qconfig.activation.spec.describe()}"  # type: ignore[union-attr]


class QuantNorm(nn.Module):
    """``fq_out(norm(fq_in(x)))``: a normalization layer between two rounding quantizers (int8 in, int8 out),
    its mean / variance and affine computed in float — what an int8 engine's LayerNorm kernel does.

    Args:
        norm: the float ``nn.LayerNorm`` / ``nn.GroupNorm`` (or subclass, e.g. torchvision's ``LayerNorm2d``).
        qconfig: a static QConfig.
    """

    def __init__(self, norm: nn.Module, qconfig: QConfig) -> None:
        super().__init__()
        _static_activation(qconfig, "QuantNorm")
        self.norm = norm
        self.qconfig = qconfig
        self.input_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]
        self.output_quantizer = FakeQuantize(qconfig.activation, role="activation")  # type: ignore[arg-type]
        keep_float_attributes(self, float_attributes(norm))  # ``normalized_shape``, ``eps``, ...

    def forward(self, x: Tensor) -> Tensor:
        return _between_quantizers(self.norm, x, self.input_quantizer, self.output_quantizer)

"""Converted functional ops (:class:`Int8Cat`, :class:`Int8Mul`, :class:`Int8MatMul`, :class:`Int8Activation`):
qparams as buffers,
executions ``"reference"`` (the prepared model's numbers) and ``"integer"`` (integer-only arithmetic).

* ``Int8Cat``: every input quantized to the one shared grid and concatenated; the integer execution concatenates
  the codes (exactly the reference's values).
* ``Int8Mul`` / ``Int8MatMul``: ``acc = op(q_a − z_a, q_b − z_b)`` accumulated exactly (int64; a matmul's sums in
  float64, exact below 2^53) and returned as ``acc · s_a·s_b``: like the prepared model, the output is not rounded
  here (its consumer's quantizer rounds it, or float code — a softmax — takes it). ``requantized()`` gives the
  8-bit output codes an integer-only engine would pass on (fixed-point multiplier ``M = s_a·s_b / s_y``).

* ``Int8Activation``: a lookup table from input codes to output codes (``qmax − qmin + 1`` entries, built once
  from the activation on the dequantized codes); the integer execution is the table lookup, bit-identical to the
  reference. Its ``"fast"`` execution looks the uint8 codes of the int8 carrier it receives up in the table and
  passes a carrier on (no float round trip; a float input is quantized first), bit-identical too.

Apart from the lookup table there is no int8 kernel for these yet: ``"fast"`` runs the reference execution (int8 carriers from the layers
around them are dequantized on the way in).

Example::

    >>> import torch
    >>> from qtoolkit.config import get_qconfig
    >>> from qtoolkit.nn.quant_ops import QuantMul
    >>> q = QuantMul(get_qconfig("w8a8"))
    >>> a, b = torch.rand(2, 8), torch.rand(2, 8)
    >>> _ = q(a, b)
    >>> for fq in (q.lhs_quantizer, q.rhs_quantizer, q.output_quantizer):
    ...     fq.finalize()
    >>> m = Int8Mul.from_quant(q)
    >>> torch.equal(m(a, b), q(a, b))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qtoolkit.inference import inference_only
from qtoolkit.kernels import onednn
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.nn.float_attrs import FLOAT_ATTRS, keep_float_attributes
from qtoolkit.nn.quant_ops import QuantActivation, QuantCat, QuantEinsum, QuantMatMul, QuantMul, QuantNorm, _QuantBinary
from qtoolkit.numerics import HALF_DTYPES, dequantize, fake_quantize, quantize, quantize_multiplier, requantize

__all__ = ["Int8Cat", "Int8Mul", "Int8MatMul", "Int8Einsum", "Int8Activation", "Int8Norm"]

_INT32_MAX = 2**31 - 1


def _plain(x: Tensor) -> Tensor:
    return x.dequantize() if isinstance(x, QuantizedActivation) else x


def _on_grid(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> bool:
    """Is ``x`` an int8 carrier whose codes are on the grid ``(scale, zero_point, [qmin, qmax])``?"""
    return (type(x) is QuantizedActivation and x.codes is not None and x.q_scale == float(scale)
            and x.q_zero_point == int(zero_point) and x.q_min >= qmin and x.q_max <= qmax)  # fmt: skip


def _qparams(fq: nn.Module, require: bool) -> tuple[Tensor, Tensor] | None:
    if not fq.is_calibrated:
        if require:
            raise RuntimeError(f"{fq.name}: not calibrated")
        return None
    return fq.scale.detach().float().reshape(()).clone(), fq.zero_point.detach().reshape(()).to(torch.int32).clone()


def _register_qparams(m: nn.Module, sites: tuple[str, ...]) -> None:
    """``<site>_scale`` (1.0) and ``<site>_zero_point`` (0) buffers for each site."""
    for p in sites:
        m.register_buffer(f"{p}_scale", torch.ones(()))
        m.register_buffer(f"{p}_zero_point", torch.zeros((), dtype=torch.int32))


def _load_qparams(m: nn.Module, q: nn.Module, sites: tuple[str, ...], require: bool) -> bool:
    """Copy each ``q.<site>_quantizer``'s qparams into ``m``'s buffers; True if every site was calibrated."""
    ok = True
    for p in sites:
        qp = _qparams(getattr(q, f"{p}_quantizer"), require)
        if qp is None:
            ok = False
            continue
        setattr(m, f"{p}_scale", qp[0])
        setattr(m, f"{p}_zero_point", qp[1])
    return ok


def pair_table(table: Tensor) -> Tensor:
    """A 256-entry uint8 lookup table as a 65536-entry int16 table over *pairs* of codes (little-endian byte
    order: entry ``lo + 256·hi`` holds ``table[lo] | table[hi] << 8``), so one gather looks up two codes."""
    t = table.to(torch.int32)
    idx = torch.arange(65536, device=table.device)
    pairs = t[idx & 255] | (t[idx >> 8] << 8)
    return torch.where(pairs >= 32768, pairs - 65536, pairs).to(torch.int16)


def _lookup(table: Tensor, codes: Tensor, pairs: Tensor | None = None) -> Tensor:
    """``table[codes]`` with ``codes``' shape and memory layout: ``index_select`` over the codes in memory order
    with int32 indices (~3x faster than advanced indexing with int64 on a 64x16x112x112 activation).  With
    ``pairs`` (:func:`pair_table` of ``table``) two neighbouring codes are looked up per gather: about 3x faster
    again, the same bytes."""
    inv = None
    if codes.is_contiguous():
        view = codes
    elif codes.dim() == 4 and codes.is_contiguous(memory_format=torch.channels_last):
        view, inv = codes.permute(0, 2, 3, 1), (0, 3, 1, 2)
    else:
        view = codes.contiguous()
    flat = view.reshape(-1)
    n = flat.numel()
    if pairs is not None and n >= 2 and flat.storage_offset() % 2 == 0:
        out = torch.empty_like(flat)
        even = n - n % 2
        torch.index_select(pairs, 0, flat[:even].view(torch.uint16).to(torch.int32), out=out[:even].view(torch.int16))
        if even != n:
            out[even:] = table.index_select(0, flat[even:].to(torch.int32))
        out = out.view(view.shape)
    else:
        out = table.index_select(0, flat.to(torch.int32)).view(view.shape)
    return out if inv is None else out.permute(*inv)


class Int8Cat(nn.Module):
    """Converted ``cat``/``stack``: inputs quantized to one grid (``scale``, ``zero_point``), then joined."""

    def __init__(self, q: QuantCat) -> None:
        super().__init__()
        spec = q.qconfig.activation.spec  # type: ignore[union-attr]
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.dim, self.stack = q.dim, q.stack
        self.name = "int8_cat"
        self.execution = "reference"
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: QuantCat, require_calibrated: bool = True) -> Int8Cat:
        m = cls(q)
        qp = _qparams(q.input_quantizer, require_calibrated)
        if qp is not None:
            m.scale, m.zero_point = qp
        return m

    def forward(self, tensors: Sequence[Tensor]) -> Tensor:
        ts = [_plain(t) for t in tensors]
        op = torch.stack if self.stack else torch.cat
        if not ts or not all(isinstance(t, Tensor) and t.is_floating_point() for t in ts):
            return op(ts, self.dim)
        dt = ts[0].dtype
        for t in ts[1:]:
            dt = torch.promote_types(dt, t.dtype)
        ts = [t.to(torch.float32) for t in ts] if dt in HALF_DTYPES else ts
        if self.execution == "integer":
            codes = op([quantize(t, self.scale, self.zero_point, self.qmin, self.qmax) for t in ts], self.dim)
            y = dequantize(codes, self.scale, self.zero_point).to(ts[0].dtype)
        else:
            y = op([fake_quantize(t, self.scale, self.zero_point, self.qmin, self.qmax) for t in ts], self.dim)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stack={self.stack}, execution={self.execution}"


class _Int8Binary(nn.Module):
    """Converted two-operand op; subclasses give :meth:`op`."""

    def __init__(self, q: _QuantBinary) -> None:
        super().__init__()
        spec = q.qconfig.activation.spec  # type: ignore[union-attr]
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.name = f"int8_{q.op_name}"
        self.execution = "reference"
        _register_qparams(self, ("lhs", "rhs", "output"))

    op = staticmethod(_QuantBinary.op)

    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: _QuantBinary, require_calibrated: bool = True) -> _Int8Binary:
        m = cls(q)
        _load_qparams(m, q, ("lhs", "rhs", "output"), require_calibrated)
        return m

    def forward_reference(self, a: Tensor, b: Tensor) -> Tensor:
        a = fake_quantize(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax)
        b = fake_quantize(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax)
        return self.op(a, b)

    def integer_accumulator(self, a: Tensor, b: Tensor) -> Tensor:
        """``op(q_a − z_a, q_b − z_b)``: the exact int32 accumulator (int64 tensor)."""
        qa = quantize(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax).double() - float(self.lhs_zero_point)
        qb = quantize(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax).double() - float(self.rhs_zero_point)
        acc = torch.round(self.op(qa, qb))  # integer products / sums, exact in float64 below 2^53
        if bool((acc.abs() > _INT32_MAX).any()):
            raise RuntimeError(f"{self.name}: the int32 accumulator overflows (|acc| > 2^31 - 1); keep this op float")
        return acc.to(torch.int64)

    def requantized(self, a: Tensor, b: Tensor) -> Tensor:
        """The output codes an integer-only engine would pass on: the accumulator requantized to the output grid
        with the fixed-point multiplier ``M = s_a·s_b / s_y`` (returned dequantized)."""
        m0, shift = quantize_multiplier(float(self.lhs_scale) * float(self.rhs_scale) / float(self.output_scale))
        y = requantize(self.integer_accumulator(a, b), m0, shift, int(self.output_zero_point), self.qmin, self.qmax)
        return dequantize(y, self.output_scale, self.output_zero_point).to(a.dtype)

    def forward_integer(self, a: Tensor, b: Tensor) -> Tensor:
        """Integer arithmetic: the exact accumulator, returned as ``acc · s_a·s_b`` (not requantized: the prepared
        model does not round this output — its consumer's quantizer does, or float code such as a softmax
        takes it, as TensorRT feeds an attention matmul's int32 result to its softmax)."""
        acc = self.integer_accumulator(a, b)
        return (acc.double() * (float(self.lhs_scale) * float(self.rhs_scale))).to(a.dtype)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        # an int8 carrier already on this op's operand grid: its value is what fake-quantizing it would give
        # (bit for bit), so the reference arithmetic skips that pass (the fast path's squeeze-excitation mul)
        on_a = _on_grid(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax)
        on_b = _on_grid(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax)
        a, b = _plain(a), _plain(b)
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and b.is_floating_point()):
            return self.op(a, b)
        dt = torch.promote_types(a.dtype, b.dtype)
        if dt in HALF_DTYPES:
            a, b = a.to(torch.float32), b.to(torch.float32)
        if self.execution == "integer":
            y = self.forward_integer(a, b)
        elif on_a or on_b:
            a = a if on_a else fake_quantize(a, self.lhs_scale, self.lhs_zero_point, self.qmin, self.qmax)
            b = b if on_b else fake_quantize(b, self.rhs_scale, self.rhs_zero_point, self.qmin, self.qmax)
            y = self.op(a, b)
        else:
            y = self.forward_reference(a, b)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def extra_repr(self) -> str:
        return f"execution={self.execution}"


class Int8Mul(_Int8Binary):
    """Converted elementwise product."""

    op = staticmethod(QuantMul.op)


class Int8MatMul(_Int8Binary):
    """Converted matrix product."""

    op = staticmethod(QuantMatMul.op)


class Int8Einsum(_Int8Binary):
    """Converted two-operand ``einsum``."""

    def __init__(self, q: QuantEinsum) -> None:
        super().__init__(q)
        self.equation = q.equation

    def op(self, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        return torch.einsum(self.equation, a, b)


class Int8Activation(nn.Module):
    """Converted elementwise activation: ``table[q_in − qmin]`` gives the output code."""

    def __init__(self, q: QuantActivation) -> None:
        super().__init__()
        spec = q.qconfig.activation.spec  # type: ignore[union-attr]
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.act = q.act
        self.fn = q.fn
        self.name = "int8_activation"
        self.execution = "reference"
        _register_qparams(self, ("input", "output"))
        self.register_buffer("table", torch.zeros(self.qmax - self.qmin + 1, dtype=torch.int32))
        self.float_output = False  # set by convert() where the output leaves the int8 graph (fast execution)

    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: QuantActivation, require_calibrated: bool = True) -> Int8Activation:
        m = cls(q)
        if _load_qparams(m, q, ("input", "output"), require_calibrated):
            m._build_table()
        return m

    @torch.no_grad()
    def _build_table(self) -> None:
        codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32, device=self.table.device)
        x = fake_quantize(dequantize(codes, self.input_scale, self.input_zero_point), self.input_scale,
                          self.input_zero_point, self.qmin, self.qmax)  # the reference's input values, bit for bit
        self.table = quantize(self.fn(x), self.output_scale, self.output_zero_point, self.qmin, self.qmax).to(torch.int32)

    def supports_fast(self) -> bool:
        """The table lookup on carriers needs a uint8 grid (activation grids are) on the CPU."""
        return self.qmin >= 0 and self.qmax <= 255 and self.table.device.type == "cpu"

    @torch.no_grad()
    def _forward_fast(self, x: Tensor) -> Tensor:
        s, z = float(self.input_scale), int(self.input_zero_point)
        if (type(x) is QuantizedActivation and x.codes is not None and x.q_scale == s and x.q_zero_point == z
                and x.q_min >= self.qmin and x.q_max <= self.qmax):  # fmt: skip
            codes = x.codes  # the producer's codes are on this grid: no float round trip
        else:
            codes = onednn.quantize_u8(_plain(x).float(), s, z, self.qmin, self.qmax)
        table, pairs = self.fast_tables(codes.device)
        out = _lookup(table, codes, pairs)
        if self.float_output:
            return dequantize(out, self.output_scale, self.output_zero_point)
        return QuantizedActivation.wrap(out, float(self.output_scale), int(self.output_zero_point), self.qmin, self.qmax)

    def fast_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The table as 256 uint8 output codes indexed by the input code, and its :func:`pair_table` (cached)."""
        cached = self.__dict__.get("_table_u8")
        if cached is None or cached[0].device != device:
            full = torch.zeros(256, dtype=torch.uint8, device=device)
            full[self.qmin : self.qmax + 1] = self.table.to(torch.uint8)
            cached = self.__dict__["_table_u8"] = (full, pair_table(full))
        return cached

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self.__dict__.pop("_table_u8", None)  # the uint8 copy of the table follows the buffer
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.__dict__.pop("_table_u8", None)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if self.execution == "fast" and self.supports_fast() and isinstance(x, Tensor) and x.is_floating_point():
            dt = x.dtype
            y = self._forward_fast(x)
            if type(y) is QuantizedActivation:
                return y
            return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)
        x = _plain(x)
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            return self.fn(x)
        dt = x.dtype
        x = x.to(torch.float32) if dt in HALF_DTYPES else x
        if self.execution == "integer":
            codes = quantize(x, self.input_scale, self.input_zero_point, self.qmin, self.qmax).long() - self.qmin
            y = dequantize(self.table[codes], self.output_scale, self.output_zero_point).to(x.dtype)
        else:
            y = fake_quantize(self.fn(fake_quantize(x, self.input_scale, self.input_zero_point, self.qmin, self.qmax)),
                              self.output_scale, self.output_zero_point, self.qmin, self.qmax)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def extra_repr(self) -> str:
        return f"act={self.act}, execution={self.execution}"


class Int8Norm(nn.Module):
    """Converted normalization: input and output on int8 grids, the normalization itself in float (both
    executions; there is no integer-only LayerNorm here)."""

    def __init__(self, q: QuantNorm) -> None:
        super().__init__()
        spec = q.qconfig.activation.spec  # type: ignore[union-attr]
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.norm = q.norm
        self.name = "int8_norm"
        self.execution = "reference"
        _register_qparams(self, ("input", "output"))
        keep_float_attributes(self, {k: getattr(q, k) for k in getattr(q, FLOAT_ATTRS, ())})

    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: QuantNorm, require_calibrated: bool = True) -> Int8Norm:
        m = cls(q)
        _load_qparams(m, q, ("input", "output"), require_calibrated)
        return m

    def forward(self, x: Tensor) -> Tensor:
        x = _plain(x)
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            return self.norm(x)
        dt = x.dtype
        x = x.to(torch.float32) if dt in HALF_DTYPES else x
        y = fake_quantize(self.norm(fake_quantize(x, self.input_scale, self.input_zero_point, self.qmin, self.qmax)),
                          self.output_scale, self.output_zero_point, self.qmin, self.qmax)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def extra_repr(self) -> str:
        return f"execution={self.execution}"

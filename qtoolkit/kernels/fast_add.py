"""The converted residual add on uint8 codes (the fast path of :class:`qtoolkit.nn.Int8Add`).

``clamp(round(((qa−za)·sa + (qb−zb)·sb) / so) + zo)``, evaluated in the fake-quant model's float32 order
(:func:`exact_add_u8`: one fused vector loop in qtoolkit's extension, torch ops elsewhere); a float32 output
(``float_output``) runs as one oneDNN int8 identity GEMM with the other operand as the in-place ``sum``
accumulator for large tensors. Built from the module's frozen :class:`~qtoolkit.kernels.params.AddParams`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from qtoolkit.kernels import dnnl_ext, onednn
from qtoolkit.kernels.fast_state import _QA, _fallback, _get_state, _set_state, _without_grad
from qtoolkit.kernels.params import AddParams
from qtoolkit.numerics import HALF_DTYPES

__all__ = ["fast_add"]

_CL = torch.channels_last
# below this many elements the float arithmetic add beats the oneDNN identity-GEMM add
_ADD_KERNEL_MIN_NUMEL = 65536
_ID = 16  # width of the identity GEMM the uint8 add runs as (of 4, 8, ..., 256, 16 was fastest on ResNet shapes)


@dataclass
class _AddState:
    lhs_scale: float
    lhs_zp: int
    rhs_scale: float
    rhs_zp: int
    out_scale: float
    out_zp: int
    shift: int
    qmin: int
    qmax: int
    lo: int
    hi: int
    post_op: str
    need_clamp: bool
    out_dtype: torch.dtype  # see _LayerState.out_dtype
    float_out: bool
    relu6: bool
    donate: Optional[int]  # operand the graph proved dead after the add (its codes become the accumulator)


def _add_unsupported_reason(p: AddParams) -> Optional[str]:
    if not onednn.is_available():
        return "the oneDNN int8 kernels are not available"
    return "codes wider than 8 bit" if p.qmax - p.qmin > 255 else None


def _build_add(m: nn.Module) -> Any:
    return _set_state(m, _add_state(m.kernel_params()))  # type: ignore[operator]


def _add_state(p: AddParams) -> Any:
    """The kernels' state for a residual add, or why it cannot run."""
    reason = _add_unsupported_reason(p)
    if reason is not None:
        return reason
    shift = -p.qmin if p.qmin < 0 else 0
    qmin, qmax = p.qmin + shift, p.qmax + shift
    zo = p.output_zero_point + shift
    so = p.output_scale
    lo, hi = qmin, qmax
    if p.act in ("relu", "relu6"):
        lo = max(lo, zo)
    if p.act == "relu6":
        hi = min(hi, zo + round(6.0 / so))
    need_clamp, out_dtype = lo > 0 or hi < 255, torch.uint8
    if need_clamp and hi == 127 and qmax == 127 and p.act == "relu" and lo == zo:
        need_clamp, out_dtype = False, torch.int8  # as in _layer_state: the kernel's int8 saturation is the clamp
    return _AddState(
        p.lhs_scale, p.lhs_zero_point + shift, p.rhs_scale, p.rhs_zero_point + shift,
        so, zo, shift, qmin, qmax, lo, hi, "relu" if p.act in ("relu", "relu6") else "none",
        need_clamp, out_dtype, p.float_output, p.act == "relu6", p.donate,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- adds


def _operand_codes(st: _AddState, t: Tensor, scale: float, zp: int) -> Tensor:
    if type(t) is _QA:
        if t.q_scale == scale and t.q_zero_point == zp and t.q_min >= st.qmin and t.q_max <= st.qmax and t.codes is not None:
            return t.codes
        t = t.dequantize()
    return onednn.quantize_u8(t, scale, zp, st.qmin, st.qmax)


def fast_add(m: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``Int8Add`` forward on uint8 codes: ``clamp(round(((qa−za)·sa + (qb−zb)·sb) / so) + zo)``."""
    y = _without_grad(m, _fast_add, m, a, b)
    dt = torch.promote_types(a.dtype, b.dtype) if type(a) is Tensor and type(b) is Tensor else None
    return y.to(dt) if dt in HALF_DTYPES and type(y) is not _QA else y


def _fast_add(m: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    st = _get_state(m)
    if st is None:
        st = _build_add(m)
    if type(st) is str:
        return _fallback(m, st, a, b)
    ca = a.codes if type(a) is _QA else a
    cb = b.codes if type(b) is _QA else b
    if ca is None or cb is None:
        raise RuntimeError((a if ca is None else b)._consumed_message())
    if ca.device.type != "cpu" or cb.device.type != "cpu":
        return _fallback(m, f"input on {ca.device.type if ca.device.type != 'cpu' else cb.device.type}", a, b)
    shape = ca.shape
    if ca.shape != cb.shape:
        try:
            shape = torch.broadcast_shapes(ca.shape, cb.shape)
        except RuntimeError:  # the reference path raises torch's own error
            return _fallback(m, "operands that do not broadcast", a, b)
        if shape != ca.shape and shape != cb.shape:
            return _fallback(m, "broadcasting add where both operands broadcast", a, b)
    qa = _operand_codes(st, a, st.lhs_scale, st.lhs_zp)
    qb = _operand_codes(st, b, st.rhs_scale, st.rhs_zp)
    donate = None
    donor = a if st.donate == 0 else b if st.donate == 1 else None
    if donor is not None and type(donor) is _QA and donor.codes is (qa if donor is a else qb):
        donate = st.donate  # the graph proved this operand dead after the add: its codes may be overwritten
    y, donated = add_codes(st, qa, qb, donate, shape)
    if donated:
        donor.consume(m.name)  # type: ignore[union-attr]
    if st.float_out:
        return y
    return _QA.wrap(y, st.out_scale, st.out_zp, st.qmin, st.qmax)


def add_codes(st: _AddState, qa: Tensor, qb: Tensor, donate: Optional[int] = None,
              shape: Optional[torch.Size] = None) -> tuple[Tensor, bool]:  # fmt: skip
    """The add on plain uint8 codes (``qa`` on the lhs grid, ``qb`` on the rhs grid of ``st``).

    Returns ``(y, donated)``: ``y`` is the output's uint8 codes (fp32 where ``st.float_out``), ``donated``
    whether operand ``donate`` (0 / 1, which the caller proved dead) was overwritten in place.  One operand
    may broadcast over the other (``shape``: the broadcast shape, computed when not given).
    """
    if shape is None:
        shape = qa.shape if qa.shape == qb.shape else torch.broadcast_shapes(qa.shape, qb.shape)
    if qa.shape != shape:  # one operand broadcasts (ViT's positional embedding): its codes, expanded (uint8 copy)
        qa, donate = qa.expand(shape).contiguous(), None
    elif qb.shape != shape:
        qb, donate = qb.expand(shape).contiguous(), None
    if not st.float_out:
        return exact_add_u8(st, qa, qb, donate)
    n = qa.numel()
    if n >= _ADD_KERNEL_MIN_NUMEL and n % _ID == 0 and onednn.linear_sum_in_place():
        y, donated = _kernel_add(st, qa, qb, donate)
        return _finish_codes(st, y), donated
    y = _dequantized_sum(st, qa, qb)
    if st.post_op == "relu":
        y = y.clamp_(min=0.0)
    return _finish_codes(st, y), False


def _dequantized_sum(st: _AddState, qa: Tensor, qb: Tensor) -> Tensor:
    """``fl(fl((qa−za)·sa) + fl((qb−zb)·sb))``: the operands as their fake quantizers return them, summed in float32."""
    y = qa.to(torch.float32).sub_(st.lhs_zp).mul_(st.lhs_scale)
    return y.add_(qb.to(torch.float32).sub_(st.rhs_zp).mul_(st.rhs_scale))


@functools.lru_cache(maxsize=256)
def _f32_reciprocal(scale: float) -> float:
    """``1/scale`` evaluated in float32, as the fake quantizer computes it."""
    return float(1.0 / torch.tensor(scale, dtype=torch.float32))


def _layout(t: Tensor) -> Optional[torch.memory_format]:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def exact_add_u8(st: _AddState, qa: Tensor, qb: Tensor, donate: Optional[int] = None) -> tuple[Tensor, bool]:
    """The add's uint8 codes with the fake-quant model's float32 arithmetic, operation for operation.

    ``clamp(round(fl(fl((qa−za)·sa) + fl((qb−zb)·sb)) · fl(1/so)) + zo, lo, hi)``: the dequantized operands
    (as the operands' fake quantizers return them), their float32 sum, times the float32 reciprocal of the
    output scale (as the next fake quantizer multiplies), rounded half to even.  Any other float32 evaluation
    order rounds values within a few float32 steps of a half-way point the other way, and in a deep network
    those one-step differences compound (mobilenet_v3_large: 5 dB further from the float64 fake-quant model
    than the float32 fake-quant model is).  One fused loop in qtoolkit's extension where it is built (in
    place into a dead operand, ``donate``), the same arithmetic as torch ops otherwise.  Returns
    ``(codes, donated)``; ``qa`` and ``qb`` have the same shape.
    """
    out = None
    if donate is not None and (fmt := _layout(qa)) is not None:
        target = qa if donate == 0 else qb
        if target.dtype == torch.uint8 and (target is qa or _layout(qb) == fmt):
            out = target
    ext = dnnl_ext.load()
    if ext is not None:
        y = ext.add_u8(qa, qb, st.lhs_zp, st.lhs_scale, st.rhs_zp, st.rhs_scale, st.out_scale, st.out_zp, st.lo,
                       st.hi, out)  # fmt: skip
        return y, out is not None
    y = _dequantized_sum(st, qa, qb)
    y.mul_(_f32_reciprocal(st.out_scale)).clamp_(st.lo - st.out_zp, st.hi - st.out_zp).round_().add_(st.out_zp)
    if out is not None:
        return out.copy_(y), True
    return y.to(torch.uint8), False


@functools.lru_cache(maxsize=1)
def _identity() -> tuple[Tensor, Tensor, Tensor]:
    """Prepacked ``_ID x _ID`` int8 identity weight, its scales (1) and zero points (0)."""
    return (onednn.prepack_linear_weight(torch.eye(_ID, dtype=torch.int8)), torch.ones(_ID),
            torch.zeros(_ID, dtype=torch.long))  # fmt: skip


_EXT_IDENTITY: dict = {}


def _ext_identity(x_scale: float, x_zp: int, r_scale: float, r_zp: int, o_scale: float, o_zp: int, o_dtype: torch.dtype,
                  post_op: str) -> Optional[Any]:  # fmt: skip
    """The ``_ID x _ID`` identity GEMM with a ``sum`` accumulator on qtoolkit's oneDNN extension (one per add grid), or
    None where the extension is unavailable (then torch's op runs it).  Identity weights never saturate int16."""
    key = (x_scale, x_zp, r_scale, r_zp, o_scale, o_zp, o_dtype, post_op)
    k = _EXT_IDENTITY.get(key, False)
    if k is False:
        k = None
        if dnnl_ext.load() is not None:
            try:
                k = dnnl_ext.QLinear(torch.eye(_ID, dtype=torch.int8), torch.full((_ID,), x_scale / o_scale), None, x_zp=x_zp,
                                     out_zp=o_zp, out_dtype=o_dtype, relu=post_op == "relu", sum_scale=r_scale / o_scale,
                                     sum_zp=r_zp)  # fmt: skip
                k.impl(_ID)
            except RuntimeError:
                k = None
        if len(_EXT_IDENTITY) >= 256:
            _EXT_IDENTITY.clear()
        _EXT_IDENTITY[key] = k
    return k


def _rows(x: Tensor, acc: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``x`` and ``acc`` as ``[-1, _ID]`` views of their memory (no copy), or None unless both are
    contiguous or both channels_last-contiguous (then their elements are in the same memory order)."""
    if not ((x.is_contiguous() and acc.is_contiguous())
            or (x.dim() == 4 and x.is_contiguous(memory_format=_CL) and acc.is_contiguous(memory_format=_CL))):  # fmt: skip
        return None
    shape = (x.numel() // _ID, _ID)
    return x.as_strided(shape, (_ID, 1)), acc.as_strided(shape, (_ID, 1))


def _kernel_add(st: _AddState, qa: Tensor, qb: Tensor, donate: Optional[int]) -> tuple[Tensor, bool]:
    """The add as one oneDNN int8 GEMM: ``x_codes @ I`` (a 16x16 identity) with the other operand as the
    in-place ``sum`` accumulator.  One kernel, one rounding, ReLU and the output requantization fused.

    The elementwise add only needs both operands' memory in the same order, so it runs on ``[-1, 16]``
    views of it whatever the channel count.  On ResNet-20 shapes this beat a 1x1 depthwise identity conv
    with the same ``sum`` post-op, whose torch op also returns a copy of the accumulator on every call
    (``scripts/bench_op_overhead.py`` shows the add ops' time per forward next to torch.ao's).
    Operand ``donate`` (proved dead by the caller) becomes the accumulator when the memory layouts allow;
    returns ``(raw kernel output, donated)``.
    """
    rows = None
    donated = False
    if donate is not None and not st.float_out:
        # the operand is dead after the add: it becomes the in-place accumulator (no copy)
        if donate == 0:
            acc, r_scale, r_zp, x_codes, x_scale, x_zp = qa, st.lhs_scale, st.lhs_zp, qb, st.rhs_scale, st.rhs_zp
        else:
            acc, r_scale, r_zp, x_codes, x_scale, x_zp = qb, st.rhs_scale, st.rhs_zp, qa, st.lhs_scale, st.lhs_zp
        rows = _rows(x_codes, acc)
        if rows is not None:
            donated = True
            o_scale, o_zp, o_dtype = st.out_scale, st.out_zp, st.out_dtype
    if rows is None:
        x_codes, x_scale, x_zp, r, r_scale, r_zp = qa, st.lhs_scale, st.lhs_zp, qb, st.rhs_scale, st.rhs_zp
        if x_zp != 0 and r_zp == 0:  # a zero-point-free kernel input is cheaper for oneDNN
            x_codes, x_scale, x_zp, r, r_scale, r_zp = qb, st.rhs_scale, st.rhs_zp, qa, st.lhs_scale, st.lhs_zp
        if not (x_codes.is_contiguous() or (x_codes.dim() == 4 and x_codes.is_contiguous(memory_format=_CL))):
            x_codes = x_codes.contiguous()
        acc, r_scale, r_zp, o_scale, o_zp, o_dtype = _accumulator(st, x_codes, r, r_scale, r_zp)
        rows = _rows(x_codes, acc)
        assert rows is not None  # acc was made with x_codes' strides
    xr, ar = rows
    if o_dtype == torch.int8 and acc.dtype == torch.uint8:  # codes in [0, 127]: the same bytes as int8
        acc, ar = acc.view(torch.int8), ar.view(torch.int8)
    k = _ext_identity(x_scale, x_zp, r_scale, r_zp, o_scale, o_zp, o_dtype, st.post_op)
    if k is not None:  # qtoolkit's oneDNN extension: the same GEMM and sum, its primitive cached per shape
        k.run(xr, ar)
        return acc, donated
    w, ws, wz = _identity()
    y = onednn.op("qlinear_pointwise", "binary")(
        xr, x_scale, x_zp, w, ws, wz, ar, None, o_scale, o_zp, o_dtype, r_scale, r_zp, "sum", 1.0, st.post_op, [], "",
    )  # fmt: skip
    if y.data_ptr() == ar.data_ptr():  # written in place (torch 2.4-2.14): the result is ``acc``
        return acc, donated
    return y.as_strided(acc.shape, acc.stride()), donated


def _accumulator(st: _AddState, like: Tensor, r: Tensor, r_scale: float, r_zp: int,
                 memory_format: torch.memory_format = torch.preserve_format) -> tuple:  # fmt: skip
    """oneDNN ``sum`` accumulator holding the residual codes ``r``: a copy (the kernel writes it in place)
    with ``like``'s strides or ``memory_format``.  Returns ``(acc, acc scale, acc zp, out scale, out zp,
    out dtype)``."""
    if st.float_out:  # fp32 output needs an fp32 accumulator holding real values (scale 1, zp 0)
        acc = r.to(torch.float32, memory_format=memory_format) if like is r else torch.empty_like(like, dtype=torch.float32).copy_(r)
        acc.sub_(r_zp).mul_(r_scale)
        return acc, 1.0, 0, 1.0, 0, torch.float32
    acc = torch.empty_like(like, memory_format=memory_format).copy_(r)
    if st.out_dtype == torch.int8:  # codes in [0, 127]: the same bytes as int8
        acc = acc.view(torch.int8)
    return acc, r_scale, r_zp, st.out_scale, st.out_zp, st.out_dtype


def _finish_codes(st: _AddState, y: Tensor) -> Tensor:
    """The kernel's raw output as the add's result: fp32 (ReLU6 clamped) or uint8 codes (clamped)."""
    if st.float_out:
        return y.clamp_(max=6.0) if st.relu6 else y
    if st.need_clamp:
        return y.clamp_(st.lo, st.hi)
    return y.view(torch.uint8) if y.dtype == torch.int8 else y


def _finish_add(m: nn.Module, st: _AddState, y: Tensor) -> Tensor:
    """:func:`_finish_codes`, uint8 codes wrapped as the carrier (the caller attaches inference_only to floats)."""
    y = _finish_codes(st, y)
    return y if st.float_out else _QA.wrap(y, st.out_scale, st.out_zp, st.qmin, st.qmax)

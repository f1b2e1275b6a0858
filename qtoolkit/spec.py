"""Quantization specs: what integer grid a tensor is mapped onto.

A :class:`QuantSpec` says *how many bits*, *signed or unsigned*, *symmetric or
affine*, *narrow range or not* and *per-tensor or per-channel* (``axis``). It is
the one object the numerics, observers and fake-quantizers agree on.

Example::

    >>> from qtoolkit.spec import QuantSpec
    >>> w = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, axis=0)
    >>> (w.qmin, w.qmax)
    (-127, 127)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MIN_BITS = 2
MAX_BITS = 16


def quant_range(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer code range ``[qmin, qmax]`` for ``bits``.

    Signed: ``[-2^(b-1), 2^(b-1)-1]``; unsigned: ``[0, 2^b-1]``. ``narrow_range``
    drops the lowest code (int8 becomes ``[-127, 127]``, uint8 ``[1, 255]``) so a
    symmetric range is represented exactly.

    Example::

        >>> quant_range(4, signed=True)
        (-8, 7)
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    if narrow_range:
        qmin += 1
    return qmin, qmax


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of one quantizer.

    Args:
        bits: code width, 2..16.
        signed: signed codes (int8-like) or unsigned (uint8-like).
        symmetric: zero point fixed (0 for signed, the mid code for unsigned) and
            the range symmetric around 0; otherwise affine (asymmetric).
        narrow_range: drop the most negative code (see :func:`quant_range`).
        axis: channel axis for per-channel quantization, ``None`` for per-tensor.
            Negative values count from the end, as in torch.

    Example::

        >>> QuantSpec(bits=4, signed=True, symmetric=True, axis=0).qmax
        7
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        quant_range(self.bits, self.signed, self.narrow_range)  # validates bits
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise TypeError(f"QuantSpec.axis must be an int or None, got {self.axis!r}")

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def with_axis(self, axis: int | None) -> QuantSpec:
        """A copy with another ``axis``."""
        return replace(self, axis=axis)

    def describe(self) -> str:
        """Short human-readable name, e.g. ``int8-sym-narrow/ch0``."""
        kind = ("int" if self.signed else "uint") + str(self.bits)
        parts = [kind, "sym" if self.symmetric else "asym"]
        if self.narrow_range:
            parts.append("narrow")
        gran = "tensor" if self.axis is None else f"ch{self.axis}"
        return "-".join(parts) + "/" + gran

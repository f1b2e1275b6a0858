"""``QuantizedActivation``: the int8 activation carrier between converted modules.

A plain ``torch.Tensor`` subclass whose storage *is* the ``torch.uint8`` codes (channels_last for
4-D activations) plus per-tensor ``scale`` / ``zero_point`` and the code range ``[qmin, qmax]``
(zero point added: ``x̂ = (q − z) · s``).  No quantized dtypes, no deprecated quantize ops.

The fast paths of :class:`~qtoolkit.nn.Int8Layer` / :class:`~qtoolkit.nn.Int8Add` consume
``.codes`` directly (no float round trip between layers) and return a new carrier when their
output is quantized.  To everything else the carrier looks like the *float* tensor it
represents: metadata (``.shape``, ``.size()``, ``.dim()``, ``.device``, ``.dtype`` = float32,
``is_floating_point()``) is answered without touching the data, and any other torch op
(``F.adaptive_avg_pool2d``, ``torch.flatten``, ``+``, ``.argmax()``, …) dequantizes it first
(``__torch_function__``), so unmodified user code between quantized layers keeps working.

Carriers are immutable values: an in-place method (``x.add_(…)``) on one returns the float result
as a new tensor and leaves the carrier unchanged (warned once).

Example::

    >>> import torch
    >>> codes = torch.tensor([[0, 10, 255]], dtype=torch.uint8)
    >>> qa = QuantizedActivation.wrap(codes, 0.5, 10)
    >>> qa.shape, qa.dtype, isinstance(qa, torch.Tensor)
    (torch.Size([1, 3]), torch.float32, True)
    >>> (qa * 2).tolist()
    [[-10.0, 0.0, 245.0]]
    >>> qa.codes.dtype
    torch.uint8
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["QuantizedActivation", "dequantize_tree"]

_DisableTF = torch._C.DisableTorchFunctionSubclass

# Metadata queries answered from the codes tensor itself (same shape/strides/device).
_META: set[Callable[..., Any]] = {
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.layout.__get__,  # type: ignore[attr-defined]
    Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
    Tensor.is_cpu.__get__,  # type: ignore[attr-defined]
    Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.stride,
    Tensor.is_contiguous,
    Tensor.__len__,
    Tensor.get_device,
}
_FLOAT_ANSWERS: dict[Callable[..., Any], Any] = {
    Tensor.dtype.__get__: torch.float32,  # type: ignore[attr-defined]
    Tensor.is_floating_point: True,
    Tensor.is_complex: False,
}
_warned_inplace = False


class QuantizedActivation(Tensor):
    """uint8 activation codes + ``(scale, zero_point, qmin, qmax)``; behaves as its float value.

    Build with :meth:`wrap`; read the plain codes with :attr:`codes`, the float value with
    :meth:`dequantize`.

    Example::

        >>> qa = QuantizedActivation.wrap(torch.full((2, 2), 3, dtype=torch.uint8), 0.25, 1)
        >>> qa.dequantize()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """

    codes: Tensor
    q_scale: float
    q_zero_point: int
    q_min: int
    q_max: int
    consumed_by: str | None = None

    @staticmethod
    def wrap(codes: Tensor, scale: float, zero_point: int, qmin: int = 0, qmax: int = 255) -> QuantizedActivation:
        """Wrap plain ``torch.uint8`` codes (shared, not copied) as a carrier."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"QuantizedActivation holds torch.uint8 codes, got {codes.dtype}")
        t = codes.as_subclass(QuantizedActivation)
        t.codes = codes
        t.q_scale, t.q_zero_point, t.q_min, t.q_max = float(scale), int(zero_point), int(qmin), int(qmax)
        return t  # type: ignore[return-value]

    def dequantize(self) -> Tensor:  # type: ignore[override]
        """The float32 value ``(q − z) · s`` (memory format kept)."""
        if self.codes is None:
            raise RuntimeError(self._consumed_message())
        with _DisableTF():
            y = self.codes.to(torch.float32)
            if self.q_zero_point:
                y.sub_(float(self.q_zero_point))
            return y.mul_(self.q_scale)

    def consume(self, by: str) -> None:
        """Mark this activation as overwritten in place by the fast path (``by``: the module).

        The converted model's fx graph proved no other user; any later use raises instead of reading
        the overwritten codes.
        """
        self.codes = None  # type: ignore[assignment]
        self.consumed_by = by

    def _consumed_message(self) -> str:
        return (
            f"this int8 activation was consumed in place by {self.consumed_by!r} (int8 fast path); to keep "
            "a layer's output (e.g. from a forward hook), store output.dequantize() or a float copy"
        )

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        if self.codes is None:
            return f"QuantizedActivation(<consumed by {self.consumed_by!r}>)"
        return (
            f"QuantizedActivation(scale={self.q_scale:.6g}, zero_point={self.q_zero_point}, "
            f"codes=[{self.q_min}, {self.q_max}], value={self.dequantize()!r})"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickling / torch.save: the float value
        return self.dequantize().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> QuantizedActivation:
        return QuantizedActivation.wrap(self.codes.clone(), self.q_scale, self.q_zero_point, self.q_min, self.q_max)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _FLOAT_ANSWERS:
            return _FLOAT_ANSWERS[func]
        if func in _META:
            if any(type(a) is QuantizedActivation and a.codes is None for a in args):
                raise RuntimeError(args[0]._consumed_message())
            with _DisableTF():
                return func(*[a.codes if type(a) is QuantizedActivation else a for a in args], **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and type(args[0]) is QuantizedActivation:
            global _warned_inplace
            if not _warned_inplace:
                _warned_inplace = True
                warnings.warn(
                    f"in-place {name}() on a QuantizedActivation (an int8 activation from a converted model's fast "
                    "path): the float result is returned as a new tensor and the activation itself is unchanged",
                    RuntimeWarning,
                    stacklevel=3,
                )
        args, kwargs = dequantize_tree((args, kwargs or {}))
        with _DisableTF():
            return func(*args, **kwargs)


def _deq(a: Any) -> Any:
    return a.dequantize() if type(a) is QuantizedActivation else a


def dequantize_tree(obj: Any) -> Any:
    """Replace every :class:`QuantizedActivation` in a (nested) structure by its float value.

    Example::

        >>> qa = QuantizedActivation.wrap(torch.tensor([4], dtype=torch.uint8), 0.5, 0)
        >>> dequantize_tree({"y": qa, "n": 1})
        {'y': tensor([2.]), 'n': 1}
    """
    if type(obj) is QuantizedActivation:
        return obj.dequantize()
    return tree_map(_deq, obj)

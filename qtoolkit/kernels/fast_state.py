"""Cached kernel state on converted modules, fallback warnings and the autograd guard of the fast paths.

Shared by :mod:`qtoolkit.kernels.dispatch` (layers) and :mod:`qtoolkit.kernels.fast_add` (residual adds).
The prepacked state lives in the module's ``__dict__`` (``_qt_fast``), is dropped by deepcopy / pickle and
rebuilt lazily; :func:`invalidate` drops it when the module changes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.inference import inference_only
from qtoolkit.kernels.qtensor import QuantizedActivation, dequantize_tree

__all__ = ["FastPathWarning", "invalidate"]

_QA = QuantizedActivation


class FastPathWarning(UserWarning):
    """A converted module could not use (or cannot be exact on) the int8 kernels."""


# ------------------------------------------------------------------------------------------- cache


class _Slot:
    """Holds a module's prepacked kernel state; dropped by deepcopy / pickle (rebuilt lazily)."""

    __slots__ = ("state",)

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def __deepcopy__(self, memo: dict) -> _Slot:
        return _Slot()

    def __reduce__(self) -> tuple:
        return (_Slot, ())


def _get_state(m: nn.Module) -> Any:
    slot = m.__dict__.get("_qt_fast")
    return None if slot is None else slot.state


def _set_state(m: nn.Module, state: Any) -> Any:
    m.__dict__["_qt_fast"] = _Slot(state)
    return state


def invalidate(m: nn.Module) -> None:
    """Forget the prepacked state of ``m`` and its submodules (rebuilt on the next fast call)."""
    for mod in m.modules():
        mod.__dict__.pop("_qt_fast", None)


# ------------------------------------------------------------------------------------------- warnings


def _warn_once(m: nn.Module, key: str, message: str) -> None:
    flags = m.__dict__.setdefault("_qt_warned", set())
    if key in flags:
        return
    flags.add(key)
    warnings.warn(message, FastPathWarning, stacklevel=4)


def _fallback(m: nn.Module, reason: str, *inputs: Any) -> Tensor:
    inputs = dequantize_tree(inputs)
    if reason != "weight-only":
        _warn_once(m, "fallback:" + reason, f"{m.name}: int8 fast path unavailable ({reason}); running the reference path")
    y = m.forward_reference(*inputs)  # type: ignore[operator]
    return inference_only(y, m.name)


def _without_grad(m: nn.Module, fn: Any, *args: Any) -> Tensor:
    """``fn(*args)`` under ``no_grad``; with grad mode on, a float result gets :func:`inference_only`."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            y = fn(*args)
        return _out(m, y)
    return fn(*args)


def _out(m: nn.Module, y: Tensor) -> Tensor:
    """Float results get :func:`inference_only` (needs grad mode on); carriers are returned as they are."""
    return y if type(y) is _QA else inference_only(y, m.name)

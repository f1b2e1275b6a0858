"""What :mod:`qtoolkit.fuse` and its graph rewrites (:mod:`qtoolkit.fuse_rewrites`) share: the op tables they
recognize, the one-level tracer, :class:`FloatOp`, and small fx helpers.

Example::

    >>> _ACT_METHODS["sigmoid"]
    'sigmoid'
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["FloatOp"]


_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CAT_FUNCS = {torch.cat: False, torch.concat: False, torch.concatenate: False, torch.stack: True}
_MUL_FUNCS, _MUL_METHODS = {operator.mul, torch.mul}, {"mul"}  # in-place forms stay as they are
_MATMUL_FUNCS, _MATMUL_METHODS = {operator.matmul, torch.matmul, torch.bmm}, {"matmul", "bmm"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_ACT_FUNCS = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", F.gelu: "gelu",
              torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.mish: "mish"}
_ACT_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh"}
_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}
# ops that only move data (exact on quantized values: chunk/split/transpose keep the producer's grid), average or
# max-pool (the consumer's input quantizer requantizes, as an int8 engine's pooling does), or compute sizes: they
# need no quantizer of their own and are not reported
_BENIGN = {
    torch.flatten, torch.reshape, operator.getitem, getattr, operator.mul, F.adaptive_avg_pool2d,
    F.max_pool2d, F.avg_pool2d, F.dropout, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.transpose, torch.permute, torch.narrow, torch.mean, F.adaptive_max_pool2d, operator.floordiv,
    torch._assert, operator.eq, torch.unbind, torch.roll, F.pad, F.adaptive_avg_pool1d, F.avg_pool1d,
    F.unfold, F.interpolate, F.upsample, torch.neg, operator.neg,  # sliding windows (data movement); resampling (a fixed average, as pooling)
    torch.fx._symbolic_trace._assert_is_none,  # the guard of an argument a trace fixed to None
}
_BENIGN_METHODS = {"size", "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "dim", "permute",
                   "chunk", "split", "transpose", "t", "narrow", "mean", "expand", "unbind", "reshape_as", "view_as",
                   "expand_as", "roll", "movedim", "unfold", "neg"}


@dataclass(frozen=True)
class FloatOp:
    """An op the quantization pass leaves in float, and why."""

    where: str
    op: str
    reason: str


def _zoo_leaf_functions() -> tuple:
    """Functions a loaded model zoo declares opaque to ``torch.fx`` (timm's ``register_notrace_function``: helpers
    that hold the control flow, e.g. CrossViT's ``scale_image``); duck-typed, the zoo is never imported."""
    import sys

    fx_mod = sys.modules.get("timm.layers._fx")
    return tuple(f for f in getattr(fx_mod, "_autowrap_functions", ()) if callable(f) and hasattr(f, "__code__"))


class _OneLevelTracer(fx.Tracer):
    """Trace a module's own ``forward``; every submodule call stays a leaf, and with ``zoo_leaves`` so does every
    function a loaded model zoo declares opaque to ``torch.fx`` (:func:`_zoo_leaf_functions`)."""

    def __init__(self, zoo_leaves: bool = False) -> None:
        super().__init__(autowrap_functions=_zoo_leaf_functions() if zoo_leaves else ())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return True


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Name of the activation ``node`` applies (``relu``/``relu6``), if any."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6:
            return "relu6"
        if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
            return "relu6"
    elif node.op == "call_function" and node.target in _RELU_FUNCS:
        return _RELU_FUNCS[node.target]  # type: ignore[index]
    elif node.op == "call_method" and node.target in _RELU_METHODS:
        return _RELU_METHODS[str(node.target)]
    return None


def _single_tensor_arg(node: fx.Node, src: fx.Node) -> bool:
    return len(node.args) >= 1 and node.args[0] is src and all(
        not isinstance(a, fx.Node) for a in node.args[1:]
    ) and all(not isinstance(v, fx.Node) for v in node.kwargs.values())


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    *path, last = target.split(".")
    parent = root
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, new)

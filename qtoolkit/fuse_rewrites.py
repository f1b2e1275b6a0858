"""Graph rewrites :func:`qtoolkit.fuse.fuse_model` applies besides Conv+BN(+act) folding.

* :func:`_split_same_padding`: a same-padding conv (timm's ``Conv2dSame``) as ``PadSame`` + a plain conv, so the
  BatchNorm after it still folds;
* :func:`_fuse_linear_bn1d`: ``Linear`` then ``BatchNorm1d`` over tokens (LeViT) folded into the Linear;
* :func:`_lift_functional`: functional ops (``F.scaled_dot_product_attention``, adds, cats, products, activations)
  lifted into modules that ``prepare`` can quantize.

Each keeps the float function exactly (tests/test_fuse.py, tests/test_timm_layers.py).

Example::

    >>> _new_name({"add_0"}, "add")
    'add_1'
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtoolkit.fuse_common import (
    _ACT_FUNCS,
    _ACT_METHODS,
    _CAT_FUNCS,
    _MATMUL_FUNCS,
    _MATMUL_METHODS,
    _MUL_FUNCS,
    _MUL_METHODS,
    _SHAPE_METHODS,
    _only_user,
    _set_submodule,
    _single_tensor_arg,
)
from qtoolkit.layer_kinds import split_same_padding
from qtoolkit.nn.fused import Activation, Cat, Einsum, FusedLayer, MatMul, Mul, PadSame, ScaledDotProductAttention

__all__: list[str] = []


def _split_same_padding(root: nn.Module, graph: fx.Graph, counts: dict[str, int]) -> bool:
    """Each 'SAME'-padding conv called once (timm's ``Conv2dSame``): a :class:`PadSame` call, then the plain conv
    in its place (so a BatchNorm after it folds as after any conv)."""
    changed = False
    existing = set(dict(root.named_children()))
    for node in list(graph.nodes):
        if node.op != "call_module" or counts.get(str(node.target)) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        m = root.get_submodule(str(node.target))
        conv = split_same_padding(m)
        if conv is None:
            continue
        name = _new_name(existing, "pad_same")
        root.add_module(name, PadSame(conv.kernel_size, conv.stride, conv.dilation))
        _set_submodule(root, str(node.target), conv)
        with graph.inserting_before(node):
            pad = graph.call_module(name, args=node.args)
        node.args = (pad,)
        changed = True
    return changed




def _is_leading_flatten(node: fx.Node, src: fx.Node) -> bool:
    """``src.flatten(0, 1)`` / ``torch.flatten(src, 0, 1)`` (or ``(0, -2)``): a 3-D ``[B, N, C]`` output as the
    ``[B·N, C]`` rows a BatchNorm1d normalizes per feature (LeViT's ``LinearNorm``)."""
    if not ((node.op == "call_method" and node.target == "flatten") or (node.op == "call_function" and node.target is torch.flatten)):
        return False
    args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
    return node.args[0] is src and tuple(args) in ((0, 1), (0, -2))


def _fuse_linear_bn1d(root: nn.Module, graph: fx.Graph, modules: dict[str, nn.Module], counts: dict[str, int]) -> bool:
    """``bn(linear(x).flatten(0, 1)).reshape_as(...)`` (LeViT's Linear+BatchNorm1d over tokens): the BatchNorm
    folds into the Linear (it normalizes the Linear's output features); the flatten and reshape stay. Other users
    of the Linear's output may only read its shape (``reshape_as(·, y)``, ``view_as``, ``size``)."""
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(str(node.target))) is not nn.Linear or counts[str(node.target)] != 1:
            continue
        flats = [u for u in node.users if _is_leading_flatten(u, node)]
        shape_only = all(u in flats or (u.op == "call_method" and u.target in ("reshape_as", "view_as") and u.args[0] is not node)
                         or _is_shape_value(u) for u in node.users)
        if len(flats) != 1 or not shape_only:
            continue
        bn_node = _only_user(flats[0])
        if bn_node is None or bn_node.op != "call_module" or counts.get(str(bn_node.target)) != 1:
            continue
        bn = modules.get(str(bn_node.target))
        if type(bn) is not nn.BatchNorm1d or not _single_tensor_arg(bn_node, flats[0]):
            continue
        _set_submodule(root, str(node.target), FusedLayer(modules[str(node.target)], bn, None))
        bn_node.replace_all_uses_with(flats[0])
        graph.erase_node(bn_node)
        changed = True
    return changed


def _scaled_by_constant(node: fx.Node) -> bool:
    """``x / 2``, ``x.div(2)``, ``x * 0.5`` (LeViT's mean of two heads): a constant rescale, which an int8 engine
    folds into the next requantization (not reported, like a constant ``mul``)."""
    div = (node.op == "call_function" and node.target in (operator.truediv, torch.div, torch.true_divide)) or (
        node.op == "call_method" and node.target in ("div", "mul", "true_divide"))
    return div and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], (int, float))


def _is_shape_value(node: object) -> bool:
    """True for fx nodes that compute sizes (``x.size(0)``, ``x.shape[1] * 2``): plain numbers, not tensors."""
    if not isinstance(node, fx.Node):
        return not isinstance(node, (list, tuple))
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
        return True
    if node.op == "call_function" and node.target in (operator.getitem, operator.mul, operator.floordiv, operator.add,
                                                      operator.sub, len):  # fmt: skip
        return bool(node.args) and isinstance(node.args[0], fx.Node) and _is_shape_value(node.args[0])
    return False


def _new_name(existing: set[str], stem: str) -> str:
    i = 0
    while f"{stem}_{i}" in existing:
        i += 1
    existing.add(f"{stem}_{i}")
    return f"{stem}_{i}"


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_module(node: fx.Node) -> tuple[nn.Module, dict[str, object]] | None:
    """A :class:`ScaledDotProductAttention` for an ``F.scaled_dot_product_attention`` node and the keyword arguments
    its call takes (``attn_mask`` and ``is_causal`` when they are values of the forward); None if ``dropout_p`` or
    ``scale`` are computed."""
    opts = dict(zip(_SDPA_ARGS, node.args))
    opts.update(node.kwargs)
    if set(opts) - set(_SDPA_ARGS) or not all(isinstance(opts.get(k), fx.Node) for k in _SDPA_ARGS[:3]):
        return None
    if any(isinstance(opts.get(k), fx.Node) for k in ("dropout_p", "scale", "enable_gqa")):
        return None
    call_kwargs = {k: opts[k] for k in ("attn_mask", "is_causal") if isinstance(opts.get(k), fx.Node)}
    if opts.get("attn_mask") is not None and "attn_mask" not in call_kwargs:
        return None
    is_causal = False if "is_causal" in call_kwargs else bool(opts.get("is_causal", False))
    return ScaledDotProductAttention(float(opts.get("dropout_p", 0.0)), is_causal, opts.get("scale"),
                                     bool(opts.get("enable_gqa", False))), call_kwargs


def _lift_functional(root: nn.Module, graph: fx.Graph, node: fx.Node, existing: set[str]) -> bool:
    """Replace a ``cat``/``stack``, a tensor-by-tensor ``mul`` or a ``matmul`` node by a call of a new
    :class:`Cat` / :class:`Mul` / :class:`MatMul` submodule. Returns True if it did."""
    fn, meth = node.op == "call_function", node.op == "call_method"
    if fn and node.target in _CAT_FUNCS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        extra = set(node.kwargs) - {"dim"}
        tensors = node.args[0] if node.args else None
        if extra or not isinstance(dim, int) or len(node.args) > 2 or not (
            isinstance(tensors, fx.Node) or (isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) for t in tensors))
        ):
            return False
        module: nn.Module = Cat(dim, stack=_CAT_FUNCS[node.target])
        stem, args = "cat", (list(tensors) if isinstance(tensors, (list, tuple)) else tensors,)
    elif (fn and node.target in _MUL_FUNCS) or (meth and node.target in _MUL_METHODS):
        module, stem = Mul(), "mul"
        args = tuple(node.args)
    elif (fn and node.target in _MATMUL_FUNCS) or (meth and node.target in _MATMUL_METHODS):
        module, stem = MatMul(), "matmul"
        args = tuple(node.args)
    elif fn and node.target is F.scaled_dot_product_attention:
        sdpa = _sdpa_module(node)
        if sdpa is None:
            return False
        module, call_kwargs = sdpa
        opts = dict(zip(_SDPA_ARGS, node.args))
        opts.update(node.kwargs)
        name = _new_name(existing, "sdpa")
        root.add_module(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, args=(opts["query"], opts["key"], opts["value"]), kwargs=call_kwargs)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return True
    elif fn and node.target is torch.einsum and not node.kwargs and node.args and isinstance(node.args[0], str):
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        module, stem = Einsum(node.args[0]), "einsum"
        args = tuple(operands)
    elif (fn and node.target in _ACT_FUNCS) or (meth and node.target in _ACT_METHODS):
        # one tensor argument, default options (e.g. not gelu(approximate="tanh")): an elementwise lookup table
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node) or node.kwargs:
            return False
        name = _new_name(existing, "act")
        root.add_module(name, Activation(_ACT_FUNCS[node.target] if fn else _ACT_METHODS[node.target]))
        with graph.inserting_before(node):
            new = graph.call_module(name, args=tuple(node.args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return True
    else:
        return False
    if stem != "cat" and (len(args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) and not _is_shape_value(a) for a in args)):
        return False  # a constant operand (x * 0.5) or size arithmetic: nothing to quantize
    name = _new_name(existing, stem)
    root.add_module(name, module)
    with graph.inserting_before(node):
        new = graph.call_module(name, args=args)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return True



"""Fusion pass: find Conv/Linear → BatchNorm → ReLU chains and residual adds in an
unmodified model, and turn them into modules (:class:`FusedLayer`, :class:`Add`).

How it works, one container at a time (the model's module tree is kept):

* ``nn.Sequential`` (and subclasses such as torchvision's ``Conv2dNormActivation``):
  consecutive ``Conv → BN → ReLU`` children are fused by position.
* Any other module with children: its own ``forward`` is traced **one level deep**
  with ``torch.fx`` (every submodule is a leaf), which sees the data flow
  ``conv1 → bn1 → relu`` and the functional ``out += identity`` / ``x + self.conv(x)``
  without anyone editing the model's code. Matches are rewritten and the container
  becomes an ``fx.GraphModule`` with the same submodule names. A container whose
  ``forward`` cannot be traced (data-dependent control flow) is left as it is; its
  functional ops stay float and are reported.

Every rewrite keeps the float function exactly (checked by the tests).

Example::

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(num_classes=10).eval()
    >>> fused, report = fuse_model(m)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(fused(x), m(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtoolkit.layer_kinds import kind_of, weight_layer_types
from qtoolkit.nn.fused import Activation, Add, Cat, Einsum, FusedLayer, MatMul, Mul
from qtoolkit.nn.quant_window_attention import window_attention_twin

__all__ = ["FloatOp", "fuse_model"]

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
    torch._assert, operator.eq,
}
_BENIGN_METHODS = {"size", "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "dim", "permute",
                   "chunk", "split", "transpose", "t", "narrow", "mean", "expand"}


@dataclass(frozen=True)
class FloatOp:
    """An op the quantization pass leaves in float, and why."""

    where: str
    op: str
    reason: str


class _OneLevelTracer(fx.Tracer):
    """Trace a module's own ``forward``; every submodule call stays a leaf."""

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


_STANDALONE_BN = {nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d}


@torch.no_grad()
def bn_as_conv(bn: nn.Module) -> nn.Module | None:
    """A BatchNorm2d/3d (running statistics) as the depthwise 1x1 convolution computing the same per-channel
    affine ``γ/σ · x + (β − μ·γ/σ)``; None if it has no running statistics. Its int8 weight is exact (one value
    per channel, symmetric per-channel scale)."""
    conv_t = _STANDALONE_BN.get(type(bn))
    if conv_t is None or bn.running_var is None or bn.running_mean is None:
        return None
    c = bn.num_features
    ref = bn.running_mean
    conv = conv_t(c, c, 1, groups=c, bias=True).to(device=ref.device, dtype=ref.dtype)
    scale = (bn.weight if bn.weight is not None else torch.ones_like(ref)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.bias is not None else torch.zeros_like(ref)) - bn.running_mean * scale
    conv.weight.copy_(scale.reshape(c, *([1] * (conv.weight.dim() - 1))))
    conv.bias.copy_(shift)
    return conv


def _act_module(m: nn.Module) -> str | None:
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu6"
    return None


def _fuse_standalone_bn_sequential(seq: nn.Sequential) -> bool:
    """BatchNorms not folded into a preceding layer become depthwise 1x1 convs (+ the ReLU after them)."""
    names = list(seq._modules.keys())
    changed = False
    for i, n in enumerate(names):
        conv = bn_as_conv(seq._modules[n]) if type(seq._modules[n]) in _STANDALONE_BN else None
        if conv is None:
            continue
        act = _act_module(seq._modules[names[i + 1]]) if i + 1 < len(names) else None
        seq._modules[n] = FusedLayer(conv, None, act)
        if act is not None:
            seq._modules[names[i + 1]] = nn.Identity()
        changed = True
    return changed


def _fuse_sequential(seq: nn.Sequential) -> bool:
    """Positional Conv/Linear → BN → act fusion inside a Sequential. Returns True if changed."""
    names = list(seq._modules.keys())
    mods = [seq._modules[n] for n in names]
    changed = False
    i = 0
    while i < len(mods):
        m = mods[i]
        if type(m) in weight_layer_types():
            j = i + 1
            bn = None
            if j < len(mods) and type(mods[j]) is kind_of(m).bn_type:
                bn = mods[j]
                j += 1
            act = _act_module(mods[j]) if j < len(mods) else None
            if act:
                j += 1
            if bn is not None or act is not None:
                seq._modules[names[i]] = FusedLayer(m, bn, act)
                for k in range(i + 1, j):
                    seq._modules[names[k]] = nn.Identity()
                changed = True
            i = j
        else:
            i += 1
    return changed


def _target_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


def _fuse_graph(root: nn.Module, qualname: str, report: list[FloatOp], bn_conv: bool = False) -> nn.Module:
    """Trace ``root`` one level deep and rewrite fusions/adds. Returns the (new) module."""
    try:
        graph = _OneLevelTracer().trace(root)
    except Exception as exc:  # untraceable forward: leave it, say so
        report.append(FloatOp(qualname or "<model>", "forward", f"not traceable by torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); its functional ops (adds, ...) stay float"))
        return root
    modules = dict(root.named_modules())
    counts = _target_counts(graph)
    called_before = set(counts)
    changed = False

    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(str(node.target))) not in weight_layer_types():
            continue
        if counts[str(node.target)] != 1:
            continue  # shared layer: fusing would change other call sites
        layer = modules[str(node.target)]
        last = node
        bn_node = None
        u = _only_user(last)
        if (u is not None and u.op == "call_module" and type(modules.get(str(u.target))) is kind_of(layer).bn_type
                and counts[str(u.target)] == 1 and _single_tensor_arg(u, last)):
            bn_node, last = u, u
        act = None
        act_node = None
        u = _only_user(last)
        if u is not None and _single_tensor_arg(u, last):
            act = _activation_of(u, modules)
            if act is not None:
                act_node, last = u, u
        if bn_node is None and act is None:
            continue
        bn = modules[str(bn_node.target)] if bn_node is not None else None
        _set_submodule(root, str(node.target), FusedLayer(layer, bn, act))
        last.replace_all_uses_with(node)
        for dead in (act_node, bn_node):
            if dead is not None:
                graph.erase_node(dead)
        changed = True

    for node in list(graph.nodes) if bn_conv else []:  # BatchNorms left standalone: depthwise 1x1 convs
        if node.op != "call_module" or type(modules.get(str(node.target))) not in _STANDALONE_BN:
            continue
        conv = bn_as_conv(modules[str(node.target)]) if counts[str(node.target)] == 1 else None
        if conv is None:
            continue
        act, act_node = None, None
        u = _only_user(node)
        if u is not None and _single_tensor_arg(u, node):
            act = _activation_of(u, modules)
            act_node = u if act is not None else None
        _set_submodule(root, str(node.target), FusedLayer(conv, None, act))
        if act_node is not None:
            act_node.replace_all_uses_with(node)
            graph.erase_node(act_node)
        changed = True

    n_add = 0
    existing = set(dict(root.named_children()))
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
        if not is_add and _lift_functional(root, graph, node, existing):
            changed = True
            continue
        if not is_add:
            if node.op in ("call_function", "call_method") and node.target not in _BENIGN and node.target not in _BENIGN_METHODS:
                if _activation_of(node, modules) is None:
                    name = getattr(node.target, "__name__", str(node.target))
                    report.append(FloatOp(qualname or "<model>", name, "functional op without a quantized twin; runs in float"))
            continue
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            report.append(FloatOp(qualname or "<model>", "add", "add with a constant/alpha operand; runs in float"))
            continue
        act = None
        last = node
        u = _only_user(node)
        if u is not None and _single_tensor_arg(u, node):
            act = _activation_of(u, modules)
            if act is not None:
                last = u
        name = f"add_{n_add}"
        while name in existing:
            n_add += 1
            name = f"add_{n_add}"
        existing.add(name)
        n_add += 1
        root.add_module(name, Add(act))
        with graph.inserting_before(node):
            new = graph.call_module(name, args=tuple(node.args))
        last.replace_all_uses_with(new)
        if last is not node:
            graph.erase_node(last)
        graph.erase_node(node)
        changed = True

    if not changed:
        return root
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    called_after = set(_target_counts(graph))
    # keep the module tree: re-attach every direct child that is still used (or was
    # never called from forward), drop the ones the fusion absorbed
    for cname in list(gm._modules):
        delattr(gm, cname)
    for cname, child in root.named_children():
        absorbed = cname in called_before and not any(t == cname or t.startswith(cname + ".") for t in called_after)
        if not absorbed:
            gm.add_module(cname, child)
    for pname, p in root._parameters.items():
        if pname not in gm._parameters and p is not None:
            gm.register_parameter(pname, p)
    for bname, b in root._buffers.items():
        if bname not in gm._buffers and b is not None:
            gm.register_buffer(bname, b)
    gm.train(root.training)
    gm.qtoolkit_original_class = type(root).__qualname__  # type: ignore[attr-defined]
    return gm


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


_LEAVES = (FusedLayer, Add, Cat, Mul, MatMul, Einsum, Activation, nn.MultiheadAttention)  # attention: swapped whole by prepare


def _process(module: nn.Module, qualname: str, skip: set[str], report: list[FloatOp], bn_conv: bool = False) -> nn.Module:
    if (qualname in skip or isinstance(module, _LEAVES) or window_attention_twin(module) is not None
            or not module._modules):
        return module
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module)
        if bn_conv:
            _fuse_standalone_bn_sequential(module)
    elif not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = _fuse_graph(module, qualname, report, bn_conv)
    for cname, child in list(module.named_children()):
        if child is None:
            continue
        sub = f"{qualname}.{cname}" if qualname else cname
        new = _process(child, sub, skip, report, bn_conv)
        if new is not child:
            setattr(module, cname, new)
    return module


def fuse_model(model: nn.Module, *, skip: set[str] | frozenset[str] = frozenset(), inplace: bool = False,
               bn_as_depthwise: bool = False) -> tuple[nn.Module, list[FloatOp]]:
    """Fuse Conv/Linear+BN(+ReLU) and lift residual adds into :class:`Add` modules.

    Args:
        model: any ``nn.Module`` (unmodified torchvision models included).
        skip: qualified names of modules to leave untouched.
        inplace: modify ``model`` itself instead of a deep copy.
        bn_as_depthwise: BatchNorm2d/3d that no layer absorbs become depthwise 1x1 convolutions (exactly the
            same per-channel affine, :func:`bn_as_conv`), with a following ReLU fused: quantizable like any
            conv. ``prepare`` does this for PTQ; QAT keeps them as live BatchNorms.

    Returns:
        ``(fused_model, float_ops)`` — the model computing the same function, and
        the functional ops it could not give a module (they stay float).
    """
    if not inplace:
        model = copy.deepcopy(model)
    report: list[FloatOp] = []
    model = _process(model, "", set(skip), report, bn_as_depthwise)
    return model, report

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
from qtoolkit.nn.fused import Add, FusedLayer

__all__ = ["FloatOp", "fuse_model"]

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}
# ops that are exact on quantized tensors or only move data: not worth reporting
_BENIGN = {
    torch.flatten, torch.reshape, operator.getitem, getattr, operator.mul, F.adaptive_avg_pool2d,
    F.max_pool2d, F.avg_pool2d, F.dropout, torch.squeeze, torch.unsqueeze,
}
_BENIGN_METHODS = {"size", "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "dim", "permute"}


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
            act = None
            if j < len(mods):
                nxt = mods[j]
                if type(nxt) is nn.ReLU:
                    act = "relu"
                elif type(nxt) is nn.ReLU6 or (type(nxt) is nn.Hardtanh and nxt.min_val == 0.0 and nxt.max_val == 6.0):
                    act = "relu6"
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


def _fuse_graph(root: nn.Module, qualname: str, report: list[FloatOp]) -> nn.Module:
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

    n_add = 0
    existing = set(dict(root.named_children()))
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
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


_LEAVES = (FusedLayer, Add)


def _process(module: nn.Module, qualname: str, skip: set[str], report: list[FloatOp]) -> nn.Module:
    if qualname in skip or isinstance(module, _LEAVES) or not module._modules:
        return module
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module)
    elif not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = _fuse_graph(module, qualname, report)
    for cname, child in list(module.named_children()):
        if child is None:
            continue
        sub = f"{qualname}.{cname}" if qualname else cname
        new = _process(child, sub, skip, report)
        if new is not child:
            setattr(module, cname, new)
    return module


def fuse_model(model: nn.Module, *, skip: set[str] | frozenset[str] = frozenset(), inplace: bool = False) -> tuple[nn.Module, list[FloatOp]]:
    """Fuse Conv/Linear+BN(+ReLU) and lift residual adds into :class:`Add` modules.

    Args:
        model: any ``nn.Module`` (unmodified torchvision models included).
        skip: qualified names of modules to leave untouched.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        ``(fused_model, float_ops)`` — the model computing the same function, and
        the functional ops it could not give a module (they stay float).
    """
    if not inplace:
        model = copy.deepcopy(model)
    report: list[FloatOp] = []
    model = _process(model, "", set(skip), report)
    return model, report

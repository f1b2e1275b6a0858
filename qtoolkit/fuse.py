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

Model-zoo idioms (timm's, recognized through :mod:`qtoolkit.layer_kinds` by duck typing, never imported):

* a normalization+activation module (``BatchNormAct2d``, :func:`~qtoolkit.layer_kinds.register_norm_act`) after a
  layer folds like its plain BatchNorm; its activation is fused (ReLU/ReLU6) or takes the module's place (a lookup
  table in ``prepare``); one that no layer absorbs becomes a depthwise 1x1 conv plus its activation;
* ``Linear → flatten(0, 1) → BatchNorm1d → reshape_as`` (LeViT) folds the BatchNorm into the Linear;
* a 'SAME'-padding conv (``Conv2dSame``) becomes :class:`~qtoolkit.nn.fused.PadSame` + a plain conv;
* ``F.scaled_dot_product_attention`` is lifted into :class:`~qtoolkit.nn.fused.ScaledDotProductAttention`;
* ops computed from shapes and constants only (a positional encoding) are not reported: nothing to quantize;
* a forward with control flow on an argument with a constant default (``forward(x, pre_logits=False)``) is traced
  with the default fixed only to report what it leaves float; the module itself is left as it is (other values
  must still work). A forward that cannot be traced at all is named in the report with the BatchNorms that were not
  folded (they become depthwise convs).

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

import torch
import torch.fx as fx
from torch import nn

from qtoolkit.fuse_classes import (
    _fixed_spec,
    _is_number_annotation,
    _keep_plain_attributes,
    _rewritten_class,
    _tests_none_default,
)
from qtoolkit.fuse_common import (
    _ADD_FUNCS,
    _ADD_METHODS,
    _BENIGN,
    _BENIGN_METHODS,
    _MUL_FUNCS,
    _MUL_METHODS,
    FloatOp,
    _activation_of,
    _OneLevelTracer,
    _only_user,
    _set_submodule,
    _single_tensor_arg,
    _zoo_leaf_functions,
)
from qtoolkit.fuse_rewrites import _fuse_linear_bn1d, _is_shape_value, _lift_functional, _scaled_by_constant, _split_same_padding
from qtoolkit.layer_kinds import is_norm_act, is_weight_layer, kind_of, split_norm_act
from qtoolkit.nn.fused import Activation, Add, Cat, Einsum, FusedLayer, MatMul, Mul, ScaledDotProductAttention
from qtoolkit.nn.quant_window_attention import window_attention_twin

__all__ = ["FloatOp", "fuse_model"]

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


def _folding_bn(layer: nn.Module, m: nn.Module | None) -> tuple[nn.Module, nn.Module | None] | None:
    """``(bn, activation module or None)`` if ``m`` is a BatchNorm that folds into ``layer``: the layer kind's own
    ``bn_type``, or a registered normalization+activation module (timm's ``BatchNormAct2d``) around one."""
    bn_type = kind_of(layer).bn_type
    if m is None or bn_type is None:
        return None
    if type(m) is bn_type:
        return m, None
    split = split_norm_act(m) if is_norm_act(m) else None
    return split if split is not None and type(split[0]) is bn_type else None


def _standalone_bn(m: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """``(depthwise 1x1 conv, activation module or None)`` for a BatchNorm2d/3d (or norm+act module around one)
    that no layer absorbs; None if ``m`` is none (or has no running statistics)."""
    act: nn.Module | None = None
    if is_norm_act(m):
        split = split_norm_act(m)
        if split is None:
            return None
        m, act = split
    conv = bn_as_conv(m) if type(m) in _STANDALONE_BN else None
    return None if conv is None else (conv, act)


def _with_activation(layer: nn.Module, bn: nn.Module | None, act_mod: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    """``(FusedLayer, what stands in the norm+act module's place)``: a ReLU/ReLU6 is fused (Identity in its
    place); any other activation module takes the place (``prepare`` gives it a lookup table)."""
    act = _act_module(act_mod) if act_mod is not None else None
    if act is not None or act_mod is None:
        return FusedLayer(layer, bn, act), nn.Identity()
    return FusedLayer(layer, bn, None), act_mod


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
        found = _standalone_bn(seq._modules[n])
        if found is None:
            continue
        conv, act_mod = found
        if act_mod is not None:
            fused, rest = _with_activation(conv, None, act_mod)
            seq._modules[n] = fused if type(rest) is nn.Identity else nn.Sequential(fused, rest)
            changed = True
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
        if is_weight_layer(m):
            j = i + 1
            bn = None
            found = _folding_bn(m, mods[j] if j < len(mods) else None)
            if found is not None and found[1] is not None:  # norm+act module: its activation comes with it
                seq._modules[names[i]], seq._modules[names[j]] = _with_activation(m, found[0], found[1])
                changed = True
                i = j + 1
                continue
            if found is not None:
                bn = found[0]
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


def _trace(root: nn.Module) -> tuple[fx.Graph, dict[str, object]]:
    """One-level trace of ``root.forward``. If it fails on control flow over an argument with a constant default
    (timm's ``forward(x, pre_logits: bool = False)``), trace again with those arguments fixed to their defaults:
    the specialized graph then asserts, when it runs, that they still have them (``torch.fx``'s own guard).
    Returns the graph and what was fixed."""
    import inspect

    try:
        graph = _traced(root)
        if not _tests_none_default(root):
            return graph, {}
        raise TypeError("forward tests an argument that defaults to None (`is None`): a trace follows one branch")
    except Exception as first:
        try:
            params = list(inspect.signature(type(root).forward).parameters.values())[1:]
        except (TypeError, ValueError):
            raise first from None
        fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                 and isinstance(p.default, (bool, int, float, str, type(None)))}
        if not fixed:
            raise
        try:
            graph = _traced(root, fixed)
        except Exception:
            raise first from None
        return graph, fixed


def _traced(root: nn.Module, concrete_args: dict[str, object] | None = None) -> fx.Graph:
    """The one-level trace; where control flow stops it, again with the functions a loaded model zoo declares opaque
    to ``torch.fx`` as leaves (those that a plain trace goes through, e.g. timm's ``window_reverse``, stay traced)."""
    try:
        return _OneLevelTracer().trace(root, concrete_args=concrete_args)
    except Exception:
        if not _zoo_leaf_functions():
            raise
        return _OneLevelTracer(zoo_leaves=True).trace(root, concrete_args=concrete_args)


def _data_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the forward's tensor inputs (not only on their shapes, parameters or
    constants): the ops worth quantizing. A positional encoding computed from ``x.shape`` is a constant."""
    data: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if not _is_number_annotation(node.type):
                data.add(node)
            continue
        if node.op in ("get_attr", "output") or _is_shape_value(node):
            continue
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in (
                "shape", "ndim", "device", "dtype", "is_cuda"):
            continue
        deps: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), deps.append)
        if any(d in data for d in deps):
            data.add(node)
    return data


def _untraced_children(root: nn.Module, qualname: str, bn_conv: bool) -> list[str]:
    """In a container whose forward could not be traced: BatchNorms (and norm+act modules) become depthwise 1x1
    convs (the same function, ``bn_as_depthwise``). Returns the names of those not folded into a layer."""
    names = []
    for cname, child in list(root.named_children()):
        if type(child) in _STANDALONE_BN or is_norm_act(child):
            names.append(cname)
            found = _standalone_bn(child) if bn_conv else None
            if found is not None:
                fused, rest = _with_activation(found[0], None, found[1])
                setattr(root, cname, fused if type(rest) is nn.Identity else nn.Sequential(fused, rest))
    return names


def _is_tensor_sub(node: fx.Node, data: set[fx.Node]) -> bool:
    """``a - b`` of two activations (EfficientFormer's ``pool(x) - x``)."""
    sub = (node.op == "call_function" and node.target in (operator.sub, torch.sub)) or (
        node.op == "call_method" and node.target == "sub")
    return sub and len(node.args) == 2 and not node.kwargs and all(a in data for a in node.args)


def _tensor_product(node: fx.Node, data: set[fx.Node]) -> bool:
    """``a * b`` of two activations (a squeeze-excitation gate): lifted to :class:`Mul`, not data movement."""
    return node.target in _MUL_FUNCS | _MUL_METHODS and sum(a in data for a in node.args if isinstance(a, fx.Node)) == 2


def _report_specialized(root: nn.Module, graph: fx.Graph, fixed: dict[str, object], where: str, report: list[FloatOp],
                        bn_conv: bool) -> nn.Module:
    """A forward traceable only with arguments fixed to their defaults is left as it is (other values must still
    work); its BatchNorms become depthwise convs (module by module: the same function); what that leaves float,
    read from the specialized graph, is reported (nothing for timm's classifier heads)."""
    data = _data_nodes(graph)
    ops = sorted({getattr(n.target, "__name__", str(n.target)) for n in graph.nodes
                  if n in data and n.op in ("call_function", "call_method") and not _scaled_by_constant(n)
                  and _activation_of(n, {}) is None and (n.target not in _BENIGN and n.target not in _BENIGN_METHODS
                                                         or _tensor_product(n, data))})
    modules = dict(root.named_modules())
    chains = [str(n.target) for n in graph.nodes if n.op == "call_module" and (type(modules.get(str(n.target))) in _STANDALONE_BN
              or is_norm_act(modules.get(str(n.target), nn.Module())))]
    _untraced_children(root, where, bn_conv)
    if ops or chains:
        args = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        report.append(FloatOp(where, "forward", f"traceable by torch.fx only with {args} fixed (control flow on them): "
                              f"left as it is; float: {', '.join(ops) or 'no functional op'}"
                              + (f"; BatchNorms not folded into their layers: {', '.join(chains)}" if chains else "")))
    return root


def _rewrite_specialized(root: nn.Module, fixed: dict[str, object], qualname: str, report: list[FloatOp],
                         bn_conv: bool) -> nn.Module:
    """A forward traceable only with arguments fixed to their defaults (``forward(x, mask=None)``): rewritten for
    calls with those defaults when the rewrite only adds modules (lifted adds, matmuls, attention) and keeps every
    original one, so that a call with other values can run the original forward (float functional ops, with a
    warning). The rewrite works on a copy (parameters and buffers shared); otherwise the module is left as it is
    and what it leaves float is reported (:func:`_report_specialized`)."""
    keep: dict[int, object] = {id(t): t for t in (*root.parameters(), *root.buffers())}
    work = copy.deepcopy(root, keep)
    before = dict(work.named_modules())
    found: list[FloatOp] = []
    new = _fuse_graph(work, qualname, found, bn_conv, specialized=True)
    after = dict(new.named_modules())
    if new is not work and all(n == "" or after.get(n) is m for n, m in before.items()):
        report.extend(found)
        return new
    graph, _ = _trace(root)
    return _report_specialized(root, graph, fixed, qualname or "<model>", report, bn_conv)


def _fuse_graph(root: nn.Module, qualname: str, report: list[FloatOp], bn_conv: bool = False,
                specialized: bool = False) -> nn.Module:
    """Trace ``root`` one level deep and rewrite fusions/adds. Returns the (new) module. ``specialized``: called
    by :func:`_rewrite_specialized` (a forward traced with arguments fixed to their defaults)."""
    where = qualname or "<model>"
    try:
        graph, fixed = _trace(root)
    except Exception as exc:  # untraceable forward: leave it, say what that leaves float
        bns = _untraced_children(root, qualname, bn_conv)
        left = ("; BatchNorms not folded into their layers: " + ", ".join(bns)
                + (" (each runs as an int8 depthwise 1x1 conv)" if bn_conv else "")) if bns else ""
        report.append(FloatOp(where, "forward", f"not traceable by torch.fx ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]}); its functional ops (adds, muls, cats, matmuls) "
                              f"stay float{left}"))
        return root
    if fixed and not specialized:  # a graph for those defaults only: other values must still work
        return _rewrite_specialized(root, fixed, qualname, report, bn_conv)
    counts = _target_counts(graph)
    called_before = set(counts)
    changed = _split_same_padding(root, graph, counts)
    modules = dict(root.named_modules())

    for node in list(graph.nodes):
        if node.op != "call_module" or not is_weight_layer(modules.get(str(node.target), nn.Module())):
            continue
        if counts[str(node.target)] != 1:
            continue  # shared layer: fusing would change other call sites
        layer = modules[str(node.target)]
        last = node
        bn_node = None
        u = _only_user(last)
        found = None
        if u is not None and u.op == "call_module" and counts[str(u.target)] == 1 and _single_tensor_arg(u, last):
            found = _folding_bn(layer, modules.get(str(u.target)))
        if found is not None and found[1] is not None:  # norm+act module: the activation takes its place
            fused, rest = _with_activation(layer, found[0], found[1])
            _set_submodule(root, str(node.target), fused)
            if type(rest) is nn.Identity:
                u.replace_all_uses_with(node)
                graph.erase_node(u)
            else:
                _set_submodule(root, str(u.target), rest)
            changed = True
            continue
        if found is not None:
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
        bn = found[0] if found is not None else None
        _set_submodule(root, str(node.target), FusedLayer(layer, bn, act))
        last.replace_all_uses_with(node)
        for dead in (act_node, bn_node):
            if dead is not None:
                graph.erase_node(dead)
        changed = True

    if _fuse_linear_bn1d(root, graph, modules, counts):
        changed = True

    for node in list(graph.nodes) if bn_conv else []:  # BatchNorms left standalone: depthwise 1x1 convs
        if node.op != "call_module" or counts.get(str(node.target)) != 1:
            continue
        m = root.get_submodule(str(node.target))  # now: a norm+act module folded above left its activation here
        if type(m) not in _STANDALONE_BN and not is_norm_act(m):
            continue
        found = _standalone_bn(m)
        if found is None:
            continue
        conv, act_mod = found
        if act_mod is not None:
            fused, rest = _with_activation(conv, None, act_mod)
            _set_submodule(root, str(node.target), fused if type(rest) is nn.Identity else nn.Sequential(fused, rest))
            changed = True
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

    data = _data_nodes(graph)
    n_add = 0
    existing = set(dict(root.named_children()))
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
        if node not in data:
            continue  # computed from shapes, parameters and constants only (a positional encoding): nothing to quantize
        if _is_tensor_sub(node, data):  # a - b = a + (-b): the negation is exact, the add quantized as any add
            with graph.inserting_before(node):
                neg = graph.call_function(torch.neg, (node.args[1],))
            node.args, is_add = (node.args[0], neg), True
        if not is_add and _lift_functional(root, graph, node, existing):
            changed = True
            continue
        if not is_add:
            if (node.op in ("call_function", "call_method") and node.target not in _BENIGN
                    and node.target not in _BENIGN_METHODS and node in data and not _scaled_by_constant(node)):
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
    gm = _rewritten_class(type(root), _fixed_spec(root, fixed))(root, graph, class_name=type(root).__name__)
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
    # a buffer the model keeps out of its state_dict stays out of it (whether or not the graph reads it)
    gm._non_persistent_buffers_set = {b for b in gm._buffers if b in root._non_persistent_buffers_set}
    _keep_plain_attributes(root.__dict__, gm)
    gm.train(root.training)
    gm.qtoolkit_original_class = type(root).__qualname__  # type: ignore[attr-defined]
    return gm


_LEAVES = (FusedLayer, Add, Cat, Mul, MatMul, Einsum, Activation, ScaledDotProductAttention, nn.MultiheadAttention)  # attention: swapped whole by prepare


def _process(module: nn.Module, qualname: str, skip: set[str], report: list[FloatOp], bn_conv: bool = False,
             memo: dict[int, tuple[nn.Module, nn.Module]] | None = None) -> nn.Module:
    """Fuse ``module`` and its children. A module registered under several names (CoaT's shared positional
    encodings) is processed once, at its first name; every other name gets the same result (``memo``)."""
    memo = {} if memo is None else memo  # id -> (module, result): the module is held, so its id is not reused
    if id(module) in memo:
        return memo[id(module)][1]
    memo[id(module)] = (module, module)  # a container that (indirectly) holds itself is not walked again
    new = _process_once(module, qualname, skip, report, bn_conv, memo)
    memo[id(module)], memo[id(new)] = (module, new), (new, new)
    return new


def _opaque_leaf(module: nn.Module) -> bool:
    """A model's own leaf module that holds parameters and is no known kind (a layer, a norm, an activation): its
    forward is traced like a container's, so that its matmuls, muls and adds are quantized (HaloNet's relative
    position logits, timm's ``LayerScale``)."""
    return (not module._modules and any(True for _ in module.parameters(recurse=False))
            and not type(module).__module__.startswith("torch.") and not is_weight_layer(module)
            and not is_norm_act(module)
            and not isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *_LEAVES)))


def _process_once(module: nn.Module, qualname: str, skip: set[str], report: list[FloatOp], bn_conv: bool,
                  memo: dict[int, tuple[nn.Module, nn.Module]]) -> nn.Module:
    if qualname not in skip and _opaque_leaf(module):
        found: list[FloatOp] = []
        new = _fuse_graph(module, qualname, found, bn_conv)
        if new is not module:  # untraceable or nothing to quantize: prepare reports the leaf as a whole
            report.extend(found)
        return new
    if (qualname in skip or isinstance(module, _LEAVES) or window_attention_twin(module) is not None
            or not module._modules or is_norm_act(module)):
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
        new = _process(child, sub, skip, report, bn_conv, memo)
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

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
        >>> fused, left_float = fuse_model(model)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> bool(torch.allclose(fused(x), model(x), atol=1e-5)), left_float
        (True, [])
    """
    if not inplace:
        model = copy.deepcopy(model)
    report: list[FloatOp] = []
    model = _process(model, "", set(skip), report, bn_as_depthwise)
    return model, report

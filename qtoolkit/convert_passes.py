"""The graph passes :func:`qtoolkit.convert` runs on a converted model (``torch.fx``), and its output hook.

* :func:`fuse_residual_adds` (``convert(fuse_adds=True)``): ``add(conv(x), other)`` -> one oneDNN conv with a
  ``sum`` post-op (:func:`qtoolkit.kernels.dispatch.fused_conv_add`).
* :func:`mark_float_outputs`: converted modules whose output feeds float code (or leaves the model) return
  fp32 in ``"fast"`` instead of int8 codes.
* :func:`mark_donations`: residual adds may overwrite an operand the graph proves dead.
* :func:`dequantize_output_hook`: int8 carriers never leave the model; half-precision inputs get their
  dtype back.

They read the model's structure only; the kernels (:mod:`qtoolkit.kernels`) know nothing of graphs.

Example::

    >>> from torch import nn
    >>> mark_float_outputs(nn.Sequential(nn.ReLU()))
    []
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from qtoolkit.fuse import _OneLevelTracer
from qtoolkit.kernels.dispatch import fused_conv_add, invalidate
from qtoolkit.kernels.qtensor import dequantize_tree
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.int8_ops import Int8Activation, Int8Einsum, Int8MatMul, Int8Mul
from qtoolkit.numerics import HALF_DTYPES

#: converted modules whose fast execution can hand int8 codes (a carrier) to the next module
_CODE_PRODUCERS = (Int8Layer, Int8Add, Int8Activation)

__all__ = ["dequantize_output_hook", "fuse_residual_adds", "mark_donations", "mark_float_outputs"]



def fuse_residual_adds(model: nn.Module) -> int:
    """Rewrite ``Int8Add(Int8Layer_conv(x), other)`` in the model's fx graphs into :func:`fused_conv_add`.

    Only where the conv is static, has no activation of its own and the add is its only user.  The
    modules (and the ``state_dict``) are unchanged; the rewritten call runs the original modules in
    the original order whenever the fused kernel cannot be used.  Returns the number of rewrites.

    Example::

        >>> fuse_residual_adds(nn.Sequential(nn.Linear(2, 2)))
        0
    """
    n = 0
    for gm in model.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), Int8Add):
                continue
            if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
                continue
            for i, src in enumerate(node.args):
                if src.op != "call_module" or len(src.users) != 1 or len(src.args) != 1 or src.kwargs:
                    continue
                conv = gm.get_submodule(str(src.target))
                if not (isinstance(conv, Int8Layer) and conv.kind == "conv2d" and conv.mode == "static" and conv.act is None):
                    continue
                other = node.args[1 - i]
                with gm.graph.inserting_before(node):
                    cm = gm.graph.get_attr(str(src.target))
                    am = gm.graph.get_attr(str(node.target))
                    new = gm.graph.call_function(fused_conv_add, (cm, am, src.args[0], other, i == 0))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                gm.graph.erase_node(src)
                n += 1
                changed = True
                break
        if changed:
            gm.graph.lint()
            gm.recompile()
    return n


_TRANSPARENT = (nn.Identity, nn.Dropout)


def _graph_of(mod: nn.Module, cache: dict) -> Optional[fx.Graph]:
    """The module's fx graph (GraphModule), or a one-level trace of its ``forward`` (None if untraceable)."""
    if isinstance(mod, fx.GraphModule):
        return mod.graph
    key = id(mod)
    if key not in cache:
        try:
            cache[key] = _OneLevelTracer().trace(mod)
        except Exception:  # noqa: BLE001 - data-dependent forward: unknown consumers, assume float
            cache[key] = None
    return cache[key]


def _consumes_codes(mod: nn.Module, cache: dict) -> bool:
    """Does ``mod`` start by feeding its input to a module that takes int8 codes (static Int8Layer / Int8Add)?"""
    if isinstance(mod, Int8Layer):
        return mod.mode == "static"
    if isinstance(mod, Int8Add):
        return True
    if isinstance(mod, Int8Activation):
        return mod.supports_fast()
    if isinstance(mod, nn.Sequential):
        kids = [c for c in mod if not isinstance(c, _TRANSPARENT)]
        return bool(kids) and _consumes_codes(kids[0], cache)
    if not mod._modules:
        return False
    graph = _graph_of(mod, cache)
    if graph is None:
        return False
    users = [u for n in graph.nodes if n.op == "placeholder" for u in n.users]
    return bool(users) and all(_node_consumes_codes(mod, u, cache) for u in users)


def _node_consumes_codes(owner: nn.Module, node: fx.Node, cache: dict, carriers: bool = False) -> bool:
    if node.op == "call_module":
        mod = owner.get_submodule(str(node.target))
        return _consumes_codes(mod, cache) or (carriers and isinstance(mod, _CARRIER_CONSUMERS))
    return node.op == "call_function" and node.target is fused_conv_add


#: converted ops that read an int8 carrier already on their operand grid without re-quantizing it (bit-identical):
#: a lookup-table activation's output, rounded to its grid in the fake-quant model as well, may go to them as codes
_CARRIER_CONSUMERS = (Int8Mul, Int8MatMul, Int8Einsum)


def mark_float_outputs(model: nn.Module) -> list[str]:
    """Mark converted modules whose output goes to float code (or out of the model) to return fp32.

    In ``"fast"`` execution a static module normally returns int8 codes (a
    :class:`~qtoolkit.kernels.qtensor.QuantizedActivation`) for the next quantized module.  Where the
    consumer is not a quantized module (e.g. ``avgpool`` before the classifier, or the model's output),
    an fp32 output avoids a rounding the reference path does not have.  Follows ``nn.Sequential``
    order and the ``torch.fx`` graphs of the converted model (other containers are traced one level
    for this analysis only; untraceable ones count as float consumers).  Returns the marked names.

    Example::

        >>> mark_float_outputs(nn.Sequential(nn.ReLU()))
        []
    """
    marked: list[str] = []
    cache: dict = {}
    for m in model.modules():
        if isinstance(m, _CODE_PRODUCERS):
            m.float_output = False
            invalidate(m)

    def visit(mod: nn.Module, out_float: bool) -> None:
        if isinstance(mod, _CODE_PRODUCERS):
            if out_float and not mod.float_output:  # a module called from several sites: any float consumer
                mod.float_output = True
                invalidate(mod)
                marked.append(mod.name)
        elif isinstance(mod, nn.Sequential):
            kids = [c for c in mod if not isinstance(c, _TRANSPARENT)]
            for i, c in enumerate(kids):
                visit(c, out_float if i == len(kids) - 1 else not _consumes_codes(kids[i + 1], cache))
        elif mod._modules:
            graph = _graph_of(mod, cache)
            if graph is None:
                for c in mod.children():
                    visit(c, True)
                return
            for node in graph.nodes:
                if node.op == "call_module":
                    target = mod.get_submodule(str(node.target))
                elif node.op == "call_function" and node.target is fused_conv_add:
                    target = mod.get_submodule(str(node.args[1].target))  # the add
                else:
                    continue
                if isinstance(target, Int8Activation):
                    # its output is rounded to its grid in the fake-quant model too: codes whenever any user takes
                    # them (float users see the same values through the carrier), float only if none does
                    flt = not any(u.op != "output" and _node_consumes_codes(mod, u, cache, carriers=True) for u in node.users)
                else:
                    flt = any((u.op == "output" and out_float) or (u.op != "output" and not _node_consumes_codes(mod, u, cache))
                              for u in node.users)  # fmt: skip
                visit(target, flt)

    visit(model, True)
    return marked


def _returns_fresh(mod: nn.Module) -> bool:
    """Does calling ``mod`` always return a new tensor (never its input)?"""
    if isinstance(mod, _CODE_PRODUCERS):
        return True
    if isinstance(mod, nn.Sequential):
        kids = [c for c in mod if not isinstance(c, _TRANSPARENT)]
        return bool(kids) and _returns_fresh(kids[-1])
    return False


def mark_donations(model: nn.Module) -> int:
    """Let residual adds overwrite an operand in place where the fx graph proves it is dead afterwards.

    An :class:`~qtoolkit.nn.Int8Add` operand qualifies when it is the output of a module call that always
    returns a fresh tensor (an Int8Layer / Int8Add, or a Sequential ending in one) and the add is its only
    user.  The fast add then uses those int8 codes as oneDNN's in-place ``sum`` accumulator instead of
    copying them; the consumed activation object raises if touched again (e.g. kept by a forward hook).
    Returns the number of adds marked.

    Example::

        >>> mark_donations(nn.Sequential(nn.ReLU()))
        0
    """
    n = 0
    for gm in model.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            add = gm.get_submodule(str(node.target))
            if not isinstance(add, Int8Add):
                continue
            if add.fast_donate is not None:
                add.fast_donate = None
                invalidate(add)
            if len(node.args) != 2 or node.kwargs:
                continue
            ok = [i for i, src in enumerate(node.args)
                  if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                      and node.args.count(src) == 1 and _returns_fresh(gm.get_submodule(str(src.target))))]  # fmt: skip
            if ok:
                # both dead: donate the one with a non-zero zero point, so the kernel's input has none
                # (oneDNN's source zero-point path costs extra per call: scripts/bench_op_overhead.py)
                zps = [int(add.lhs_zero_point) - min(add.qmin, 0), int(add.rhs_zero_point) - min(add.qmin, 0)]
                add.fast_donate = next((i for i in ok if zps[i] != 0), ok[0]) if len(ok) == 2 else ok[0]
                invalidate(add)  # the kernels' state is a snapshot of the module's parameters
                n += 1
    return n


def dequantize_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook (on the converted model's root): int8 carriers never leave the model, and with a
    float16/bfloat16 input the float outputs are returned in that dtype (inside, the converted model
    computes in float32 and passes int8 codes)."""
    first = args[0] if isinstance(args, tuple) and args else None
    half = first.dtype if type(first) is Tensor and first.dtype in HALF_DTYPES else None
    if type(output) is Tensor and (half is None or output.dtype != torch.float32):
        return None
    output = dequantize_tree(output)
    if half is not None:
        output = tree_map(
            lambda t: t.to(half) if type(t) is Tensor and t.dtype == torch.float32 else t, output
        )
    return output

"""ONNX graph post-processing after ``torch.onnx.export`` (initializers back from
``Identity`` nodes, shared identical Q/DQ), and locating the modules that call an op
the exporter cannot express.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------- error sites
_OP_RE = re.compile(r"'(?:aten|prim|onnx)::([A-Za-z0-9_.]+)'")


def _norm_op(name: str) -> str:
    return name.strip("_").lower()


def _find_op_callers(model: nn.Module, inputs: tuple[Any, ...], op: str) -> list[str]:
    """Names of the modules whose own code calls a torch function/method named ``op``."""
    from torch.overrides import TorchFunctionMode

    stack: list[str] = []
    found: list[str] = []
    handles = []

    def enter(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # must return None (else it replaces the output)
        if stack:
            stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))

    class _Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            fname = getattr(func, "__name__", str(func))
            if _norm_op(fname) == _norm_op(op) or _norm_op(fname).replace("_", "") == _norm_op(op).replace("_", ""):
                where = stack[-1] if stack else ""
                label = f"{where or '<model>'} ({type(model.get_submodule(where)).__name__})"
                if label not in found:
                    found.append(label)
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), _Spy():
            model(*inputs)
    except Exception:  # noqa: BLE001 - best effort: the export error is what matters
        pass
    finally:
        for h in handles:
            h.remove()
    return found


# --------------------------------------------------------------------------- graph post-processing
def _constant_values(graph: Any, numpy_helper: Any) -> dict[str, Any]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _materialize_identities(graph: Any) -> None:
    """torch deduplicates equal-valued initializers and re-creates the others as
    ``Identity`` nodes; give every site its own named initializer back."""
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            copy_ = graph.initializer.add()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            inits[copy_.name] = copy_
            continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _share_identical(model: Any, onnx: Any) -> int:
    """Merge Clip/QuantizeLinear/DequantizeLinear nodes that compute the same thing
    (same input, same constant scale/zero point values, same attributes). Returns how
    many QuantizeLinear nodes were removed."""
    from onnx import numpy_helper

    graph = model.graph
    consts = _constant_values(graph, numpy_helper)
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, Any] = {}
    keep = []
    removed_q = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip") and not (set(node.output) & graph_outputs):
            key_inputs = []
            for name in node.input:
                if name in consts:
                    arr = consts[name]
                    key_inputs.append(("const", str(arr.dtype), arr.shape, arr.tobytes()))
                else:
                    key_inputs.append(("value", name))
            attrs = tuple(sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in node.attribute))
            key = (node.op_type, node.domain, tuple(key_inputs), attrs)
            if key in seen:
                for old, new in zip(node.output, seen[key].output):
                    rename[old] = new
                removed_q += node.op_type == "QuantizeLinear"
                continue
            seen[key] = node
        keep.append(node)
    if rename:
        del graph.node[:]
        graph.node.extend(keep)
        # drop now-unused Constant nodes / initializers
        used = {n for node in graph.node for n in node.input} | graph_outputs
        live = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
        del graph.node[:]
        graph.node.extend(live)
        inits = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return removed_q

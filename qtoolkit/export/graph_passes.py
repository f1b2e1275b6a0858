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


def fold_constant_qdq(model: Any) -> list[str]:
    """Replace, in place, every quantize-dequantize of a *constant* by the constant it computes.

    A ``QuantizeLinear`` whose input is a float constant (an initializer or ``Constant``, optionally through a
    ``Clip`` with constant bounds: a sub-8-bit grid) and whose every user is a ``DequantizeLinear`` with the same
    scale and zero point is evaluated here, with ONNX's arithmetic in float32 (``q = saturate(round_half_even(x /
    s) + z)``, ``(q - z) · s``), and the ``DequantizeLinear`` outputs become one float initializer: the same
    values, computed once (e.g. a relative-position bias added to attention scores).  OpenVINO needs it: its
    low-precision ``AddTransformation`` fails to compile an ``Add`` whose operands are both dequantized when
    one of them is such a constant (OpenVINO 2026.4: ``index '0' out of range``, MaxViT).  Quantized weights
    (integer initializers feeding a ``DequantizeLinear``) are left alone.  Returns the folded
    ``QuantizeLinear`` nodes' names.

    Example::

        >>> fold_constant_qdq(onnx.load("model.onnx"))  # doctest: +SKIP
        ['/blocks.0/.../add_0/rhs_site/QuantizeLinear']
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts = _constant_values(graph, numpy_helper)
    outputs = {o.name for o in graph.output}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    drop: set[int] = set()
    new_inits = []
    folded = []

    def same(a: str, b: str) -> bool:
        return a in consts and b in consts and np.array_equal(consts[a], consts[b]) and consts[a].dtype == consts[b].dtype

    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.output[0] in outputs:
            continue
        x_name, clip = q.input[0], None
        if x_name not in consts and x_name in producer and producer[x_name].op_type == "Clip":
            c = producer[x_name]
            if c.input[0] in consts and all(n in consts for n in c.input[1:] if n) and len(users.get(x_name, [])) == 1:
                clip, x_name = c, c.input[0]
        if x_name not in consts or consts[x_name].dtype.kind != "f" or q.input[1] not in consts or q.input[2] not in consts:
            continue
        dqs = users.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or len(d.input) < 3 or not same(d.input[1], q.input[1])
                          or not same(d.input[2], q.input[2]) or d.output[0] in outputs for d in dqs):  # fmt: skip
            continue
        x = consts[x_name].astype(np.float32)
        if clip is not None:
            lo, hi = (consts[clip.input[i]] if len(clip.input) > i and clip.input[i] else None for i in (1, 2))
            x = np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi).astype(np.float32)
        scale, zp = consts[q.input[1]].astype(np.float32), consts[q.input[2]]
        if scale.ndim == 1 and x.ndim > 1:  # per axis
            axis = next((a.i for a in q.attribute if a.name == "axis"), 1) % x.ndim
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        codes = np.clip(np.rint(x / scale) + zp.astype(np.float32), info.min, info.max)
        value = ((codes - zp.astype(np.float32)) * scale).astype(np.float32)
        for d in dqs:
            new_inits.append(numpy_helper.from_array(value, d.output[0]))
            drop.add(id(d))
        drop.add(id(q))
        if clip is not None:
            drop.add(id(clip))
        folded.append(q.name or q.output[0])
    if folded:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        used = {n for node in graph.node for n in node.input} | outputs
        inits = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return folded


#: ops that only move or relabel elements: a per-tensor QuantizeLinear after them equals the op applied to its codes
_MOVEMENT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
_SHAPE_ONLY = ("Shape", "Size")


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` topologically (Kahn's algorithm, stable: ready nodes keep their old order)."""
    import heapq

    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    deps = [{producer[name] for name in n.input if name in producer and producer[name] != i} for i, n in enumerate(graph.node)]
    waiting = [len(d) for d in deps]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def hoist_quantize_above_movement(model: Any) -> int:
    """Rewrite, in place, ``X → Reshape/Transpose/… → QuantizeLinear`` as ``X → QuantizeLinear → Reshape/Transpose/…``.

    For a per-tensor grid the two are the same codes (the movement ops only move elements; the moved op keeps the
    ``QuantizeLinear``'s output name, so every consumer and graph output is unchanged).  OpenVINO needs it:
    OpenVINO 2026.4 computes ``Conv (Q/DQ operands, no bias) → Reshape → Transpose → QuantizeLinear`` wrong — codes
    up to ~100 steps off (a ViT's patch embedding: ``conv_proj`` → flatten → transpose → the token concat's
    quantizer), while the hoisted form is exact.  Only movement ops whose output feeds nothing but that
    ``QuantizeLinear`` (and ``Shape`` / ``Size``, which then read the codes) are crossed; per-axis grids are left alone.  Returns how many ops were crossed.

    Example::

        >>> hoist_quantize_above_movement(onnx.load("vit.onnx"))  # doctest: +SKIP
        2
    """
    from onnx import numpy_helper

    graph = model.graph
    consts = _constant_values(graph, numpy_helper)
    outputs = {o.name for o in graph.output}
    moved = 0
    changed = True
    while changed:
        changed = False
        users: dict[str, int] = {}
        shape_users: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                if node.op_type in _SHAPE_ONLY:
                    shape_users.setdefault(name, []).append(node)
                else:
                    users[name] = users.get(name, 0) + 1
        producer = {o: n for n in graph.node for o in n.output}
        for q in graph.node:
            if q.op_type != "QuantizeLinear" or len(q.input) < 2 or any(n not in consts or consts[n].size != 1 for n in q.input[1:3] if n):
                continue
            mv = producer.get(q.input[0])
            if mv is None or mv.op_type not in _MOVEMENT_OPS or users.get(mv.output[0], 0) != 1 or mv.output[0] in outputs:
                continue
            codes, old = q.output[0], mv.output[0]
            pre = mv.input[0] + "__q" + str(moved)
            q.input[0], q.output[0] = mv.input[0], pre
            mv.input[0], mv.output[0] = pre, codes
            for node in shape_users.get(old, []):  # Shape / Size read the moved op's output: the same shape
                node.input[0] = codes
            moved += 1
            changed = True
        if changed:  # keep the node list topologically sorted: each moved op now follows its QuantizeLinear
            _toposort(graph)
    return moved

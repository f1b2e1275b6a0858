"""The converted model's ``"fast"`` forward as one straight-line program, built once, run on every call.

Module by module, the fast execution pays Python around every kernel call: ``nn.Module.__call__``, the
input checks, the cached-state lookup, the no-grad guard and an int8 carrier
(:class:`~qtoolkit.kernels.qtensor.QuantizedActivation`) made and unwrapped between layers.  On
ResNet-20 at batch 1 that glue cost more than the kernels.  :func:`install` (run by
:func:`qtoolkit.convert`) traces the converted model once with ``torch.fx`` — converted modules are leaves,
user containers are traced through — and generates one Python function from the graph:

* a static :class:`~qtoolkit.nn.Int8Layer` on the int8 kernels becomes its kernel call with every
  argument bound as a constant (the prepacked weight, scales, geometry, the requantization); an
  :class:`~qtoolkit.nn.Int8Add` becomes :func:`qtoolkit.kernels.fast_add.add_codes`;
* values between them are plain ``torch.uint8`` codes whose grid is known when the program is built, so no
  carrier is made and no grid is checked at run time; an operand the graph proves dead is overwritten in
  place by the add;
* everything else (float code of the model, other converted modules) is called as written, with carriers
  where it receives int8 values, exactly as module by module.

Same kernels, same arguments, same order: the program's results are bit-identical to the module-by-module
fast execution (tested).  It runs when every lowered module is still in ``"fast"`` execution with the state
the program was built from and no hooks are registered on them (or globally); otherwise — after
``set_execution``, ``load_state_dict``, ``.to()``, a forward hook — the model runs module by module (a changed
state rebuilds the program once).  A forward that ``torch.fx`` cannot trace (data-dependent control flow)
runs module by module with one :class:`~qtoolkit.kernels.dispatch.FastPathWarning` naming why; so does an
input the program cannot take (e.g. an unbatched image), once per reason.  :func:`program_status` says which.

The program lives in the model's ``forward`` attribute (the class's ``forward`` is untouched; deepcopy and
pickle drop the program and rebuild it on the next call); it is never in the ``state_dict``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate, convert
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> q = convert(calibrate(prepare(m), [torch.randn(4, 3, 8, 8)], progress=False))
    >>> y = q(torch.randn(2, 3, 8, 8))
    >>> program_status(q).split(":")[0] in ("program", "module by module")
    True
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torch.utils._pytree import tree_map

from qtoolkit.inference import inference_only
from qtoolkit.kernels import onednn
from qtoolkit.kernels.dispatch import (
    FastPathWarning,
    _build_layer,
    _input_codes,
    _LayerState,
    _run_layer,
    fused_conv_add,
    packed_for,
)
from qtoolkit.kernels.fast_add import _add_state, _AddState, _operand_codes, add_codes
from qtoolkit.kernels.fast_state import _get_state, _set_state
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.int8_ops import Int8Activation, _lookup, pair_table

__all__ = ["install", "program_status", "ProgramForward"]

_QA = QuantizedActivation


class _Bail(Exception):
    """An input the program cannot take: the call runs module by module (warned once per reason)."""


# ------------------------------------------------------------------------------------------- run-time helpers


def _codes_in(st: _LayerState, x: Any) -> Tensor:
    """uint8 codes of a layer input that is not one of the program's own code values."""
    if type(x) is _QA:
        return _input_codes(st, x, st.x_scale, st.x_zp)
    if type(x) is not Tensor or x.dtype != torch.float32 or x.device.type != "cpu":
        raise _Bail(f"an input that is not a float32 CPU tensor ({type(x).__name__}, {getattr(x, 'dtype', None)})")
    if st.kind == "conv2d" and x.dim() != 4:
        raise _Bail(f"a {x.dim()}-D input to a 2-D convolution (unbatched)")
    return onednn.quantize_u8(x, st.x_scale, st.x_zp, st.qmin, st.qmax)


def _layer(st: _LayerState, xq: Tensor) -> Tensor:
    """A static layer on codes (any strategy / kind): uint8 output codes, or fp32 where ``st.float_out``."""
    if st.float_out:
        y = _run_layer(st, xq, st.x_scale, st.x_zp, out_dtype=torch.float32, post_op=st.post_op)
        return y.clamp_(max=6.0) if st.relu6 else y
    y = _run_layer(st, xq, st.x_scale, st.x_zp, out_scale=st.out_scale, out_zp=st.k_out_zp, out_dtype=st.out_dtype,
                   post_op=st.post_op)  # fmt: skip
    if st.need_clamp:
        return y.clamp_(st.clamp_lo, st.clamp_hi)
    if st.out_xor:
        return y.view(torch.uint8).bitwise_xor_(128)
    return y.view(torch.uint8) if y.dtype == torch.int8 else y


def _add_in(st: _AddState, x: Any, scale: float, zp: int) -> Tensor:
    """uint8 codes of an add operand that is not one of the program's own code values."""
    if type(x) is not _QA and (type(x) is not Tensor or x.dtype != torch.float32 or x.device.type != "cpu"):
        raise _Bail(f"an add operand that is not a float32 CPU tensor ({type(x).__name__})")
    return _operand_codes(st, x, scale, zp)


def _add(st: _AddState, qa: Tensor, qb: Tensor, donate: Optional[int]) -> Tensor:
    shape = qa.shape
    if qb.shape != shape:
        shape = torch.broadcast_shapes(qa.shape, qb.shape)
        if shape != qa.shape and shape != qb.shape:
            raise _Bail("a broadcasting add where both operands broadcast")
    return add_codes(st, qa, qb, donate, shape)[0]


# ------------------------------------------------------------------------------------------- build


class _Tracer(fx.Tracer):
    """Traces through user containers; qtoolkit's modules (converted or float twins) and torch's are leaves, and so
    is the fused conv + add call of ``convert(fuse_adds=True)``."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(fused_conv_add,))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return type(m).__module__.startswith("qtoolkit.") or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Codes:
    """A program value that is plain uint8 codes on a grid known at build time."""

    var: str
    scale: float
    zp: int
    qmin: int
    qmax: int
    fresh: bool  # made by the program (owns its memory: may be overwritten when dead)
    xor: bool = False  # the bytes are int8 codes around zp - 128 (see _LayerState.out_xor): ``^ 0x80`` gives the codes


@dataclass
class Program:
    """A built program: the generated function, what it guards, and what it lowered."""

    fn: Callable[..., Any]
    source: str
    guards: list[tuple[nn.Module, str, Any]]  # (module, key of its cached kernel state, the state built from)
    n_args: int
    n_required: int
    lowered: int  # converted modules run as direct kernel steps
    called: int  # modules called as written

    def valid(self) -> Optional[str]:
        """None if the program may run now, else why not (``"stale"``: a module's kernel state changed)."""
        if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
            return "global module hooks"
        for m, key, slot in self.guards:
            d = m.__dict__
            if d.get("execution") != "fast":
                return f"{m.name} is in {d.get('execution')!r} execution"
            if m._forward_hooks or m._forward_pre_hooks:
                return f"hooks on {m.name}"
            if d.get(key) is not slot:
                return "stale"
        return None


class _Builder:
    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.root = root
        self.graph = graph
        self.lines: list[str] = []
        self.globals: dict[str, Any] = {"_codes_in": _codes_in, "_layer": _layer, "_add_in": _add_in, "_add": _add,
                                        "_wrap": _QA.wrap, "_u8": torch.uint8,
                                        "_f32": torch.float32, "_lookup": _lookup, "_packed": packed_for}  # fmt: skip
        self.env: dict[fx.Node, Any] = {}  # node -> _Codes | variable name of a Python object
        self.wrapped: dict[fx.Node, str] = {}
        self.guards: list[tuple[nn.Module, str, Any]] = []
        self.lowered = self.called = 0
        self.names: dict[int, str] = {}
        self.last_use: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            for src in node.all_input_nodes:
                self.last_use[src] = node

    # -- emitting
    def const(self, obj: Any) -> str:
        key = id(obj)
        if key not in self.names:
            name = f"_k{len(self.names)}"
            self.names[key] = name
            self.globals[name] = obj
        return self.names[key]

    def lit(self, v: Any) -> str:
        if v is None or type(v) in (bool, int, str):
            return repr(v)
        if type(v) is float and math.isfinite(v):
            return repr(v)
        if type(v) in (list, tuple) and all(x is None or type(x) in (bool, int, str) for x in v):
            return repr(v) if type(v) is list or len(v) != 1 else f"({v[0]!r},)"
        return self.const(v)

    def codes(self, val: _Codes) -> str:
        """The variable holding ``val``'s uint8 codes (flips shifted int8 bytes in place the first time)."""
        if val.xor:
            self.lines.append(f"{val.var} = {val.var}.view(_u8).bitwise_xor_(128)")
            val.xor = False
        return val.var

    def obj(self, node: fx.Node) -> str:
        """The node's value as a Python object (codes are wrapped as a carrier, once)."""
        val = self.env[node]
        if not isinstance(val, _Codes):
            return val
        self.codes(val)
        if node not in self.wrapped:
            name = f"{val.var}_qa"
            self.lines.append(f"{name} = _wrap({val.var}, {val.scale!r}, {val.zp}, {val.qmin}, {val.qmax})")
            self.wrapped[node] = name
        return self.wrapped[node]

    def arg(self, a: Any) -> str:
        if isinstance(a, fx.Node):
            return self.obj(a)
        if not _has_node(a):
            return self.lit(a)
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {self.arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({self.arg(a.start)}, {self.arg(a.stop)}, {self.arg(a.step)})"
        raise _Bail(f"an argument of type {type(a).__name__} holding traced values")

    def call(self, fn: str, node: fx.Node, args: tuple, kwargs: dict) -> str:
        parts = [self.arg(a) for a in args] + [f"{k}={self.arg(v)}" for k, v in kwargs.items()]
        return f"{fn}({', '.join(parts)})"

    # -- lowering
    def build(self) -> tuple[list[str], str]:
        params: list[str] = []
        for i, node in enumerate(self.graph.nodes):
            var = f"v{i}"
            if node.op == "placeholder":
                if str(node.target).startswith("*"):
                    raise _Bail(f"a forward with {node.target} (variadic arguments)")
                self.env[node] = var
                params.append(var if not node.args else f"{var}={self.lit(node.args[0])}")
                continue
            if node.op == "output":
                self.lines.append(f"return {self.arg(node.args[0])}")
                continue
            if node.op == "get_attr":
                self.env[node] = self.const(_fetch(self.root, str(node.target)))
                continue
            if node.op == "call_module":
                m = self.root.get_submodule(str(node.target))
                if type(m) is nn.Identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                    src = node.args[0]
                    val = self.env[src]
                    if isinstance(val, _Codes) and len(src.users) == 1 and src not in self.wrapped:
                        # the identity is the value's only user: the same value (shifted bytes stay shifted), and
                        # the source's variable lives as long as the identity's value does
                        self.env[node] = val
                        self.last_use[src] = self.last_use.get(node, node)
                        continue
                    # otherwise an alias that is never overwritten in place
                    self.lines.append(f"{var} = {self.codes(val) if isinstance(val, _Codes) else val}")
                    self.env[node] = _Codes(var, val.scale, val.zp, val.qmin, val.qmax, False) if isinstance(val, _Codes) else var
                    self.free(node)
                    continue
                if self.lower_layer(node, m, var) or self.lower_add(node, m, var) or self.lower_table(node, m, var):
                    self.lowered += 1
                    self.free(node)
                    continue
                self.called += 1
                self.lines.append(f"{var} = {self.call(self.const(m), node, node.args, node.kwargs)}")
            elif node.op == "call_function":
                self.lines.append(f"{var} = {self.call(self.const(node.target), node, node.args, node.kwargs)}")
            elif node.op == "call_method":
                self.lines.append(f"{var} = {self.call(f'{self.arg(node.args[0])}.{node.target}', node, node.args[1:], node.kwargs)}")
            self.env[node] = var
            self.free(node)
        return params, "\n".join(self.lines)

    def free(self, node: fx.Node) -> None:
        """Drop the values whose last user is ``node`` (their memory goes back to the allocator, cache-warm)."""
        for src in node.all_input_nodes:
            if self.last_use.get(src) is node and src.op != "placeholder":
                val = self.env.get(src)
                names = [val.var if isinstance(val, _Codes) else val] + ([self.wrapped[src]] if src in self.wrapped else [])
                self.lines += [f"{n} = None" for n in names if n and n.startswith("v")]

    def fast_state(self, m: nn.Module, want: type) -> Any:
        if getattr(m, "execution", None) != "fast":
            return None
        st = _get_state(m)
        if st is None:
            st = _build_layer(m) if want is _LayerState else _set_state(m, _add_state(m.kernel_params()))
        return st if type(st) is want else None

    def lower_layer(self, node: fx.Node, m: nn.Module, var: str) -> bool:
        if not isinstance(m, Int8Layer) or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        st = self.fast_state(m, _LayerState)
        if st is None or st.mode != "static":
            return False
        k = self.const(st)
        src = node.args[0]
        x = self.env[src]
        if isinstance(x, _Codes) and x.scale == st.x_scale and x.zp == st.x_zp and x.qmin >= st.qmin and x.qmax <= st.qmax:
            xq = self.codes(x)
        else:
            xq = f"{var}_in"
            self.lines.append(f"{xq} = _codes_in({k}, {self.obj(src)})")
        if st.ext is not None and st.strategy == "direct" and st.kind == "conv2d" and not st.float_out:  # the extension's cached primitive (see dispatch._ext_kernel)
            self.lines.append(f"{var} = {self.const(st.ext.run)}({xq})")
            if st.need_clamp:
                self.lines.append(f"{var} = {var}.clamp_({st.clamp_lo}, {st.clamp_hi})")
            elif st.out_dtype == torch.int8 and not st.out_xor:
                self.lines.append(f"{var} = {var}.view(_u8)")
        elif st.strategy == "direct" and st.kind == "conv2d" and not st.float_out and st.k_out_zp == 0:
            op = self.const(onednn.op("qconv_pointwise"))  # a nonzero zero point: _layer rounds before adding it
            bias = "None" if st.k_bias is None else self.const(st.k_bias)
            self.lines.append(  # scales folded into the weight scales and bias (see _LayerState.k_w_scale)
                f"{var} = {op}({xq}, 1.0, {st.x_zp}, _packed({k}, {xq}), {self.const(st.k_w_scale)}, "
                f"{self.const(st.w_zp)}, {bias}, {st.stride!r}, {st.padding!r}, {st.dilation!r}, {st.groups}, "
                f"1.0, {st.k_out_zp}, {self.const(st.out_dtype)}, {st.post_op!r}, [], '')"
            )
            if st.need_clamp:
                self.lines.append(f"{var} = {var}.clamp_({st.clamp_lo}, {st.clamp_hi})")
            elif st.out_dtype == torch.int8 and not st.out_xor:
                self.lines.append(f"{var} = {var}.view(_u8)")
        else:
            self.lines.append(f"{var} = _layer({k}, {xq})")
        if xq != getattr(x, "var", None):
            self.lines.append(f"{xq} = None")
        if st.float_out:
            self.env[node] = var
        else:
            inline = st.strategy == "direct" and st.kind == "conv2d" and (st.ext is not None or st.k_out_zp == 0)  # _layer flips the bytes itself
            self.env[node] = _Codes(var, st.out_scale, st.out_zp, st.qmin, st.qmax, True, st.out_xor and inline)
        self.guards.append((m, "_qt_fast", m.__dict__["_qt_fast"]))
        return True

    def lower_table(self, node: fx.Node, m: nn.Module, var: str) -> bool:
        """A lookup-table activation on codes of its input grid: one gather, codes out."""
        if not isinstance(m, Int8Activation) or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        x = self.env[node.args[0]]
        if m.execution != "fast" or not m.supports_fast() or not isinstance(x, _Codes):
            return False
        s, z = float(m.input_scale), int(m.input_zero_point)
        if not (x.scale == s and x.zp == z and x.qmin >= m.qmin and x.qmax <= m.qmax):
            return False
        table, pairs = m.fast_tables(torch.device("cpu"))
        if x.xor:  # the producer's shifted bytes index a table permuted to match: no pass to flip them
            table = table[torch.arange(256) ^ 128]
            pairs = pair_table(table)
        src = f"{x.var}.view(_u8)" if x.xor else x.var
        self.lines.append(f"{var} = _lookup({self.const(table)}, {src}, {self.const(pairs)})")
        so, zo = float(m.output_scale), int(m.output_zero_point)
        if m.float_output:
            self.lines.append(f"{var} = {var}.to(_f32).sub_({float(zo)!r}).mul_({so!r})")
            self.env[node] = var
        else:
            self.env[node] = _Codes(var, so, zo, m.qmin, m.qmax, True)
        self.guards.append((m, "_table_u8", m.__dict__["_table_u8"]))
        return True

    def lower_add(self, node: fx.Node, m: nn.Module, var: str) -> bool:
        if not isinstance(m, Int8Add) or len(node.args) != 2 or node.kwargs:
            return False
        if not all(isinstance(a, fx.Node) for a in node.args):
            return False
        st = self.fast_state(m, _AddState)
        if st is None:
            return False
        k = self.const(st)
        operands, dead = [], []
        for i, (src, scale, zp) in enumerate(zip(node.args, (st.lhs_scale, st.rhs_scale), (st.lhs_zp, st.rhs_zp))):
            x = self.env[src]
            if isinstance(x, _Codes) and x.scale == scale and x.zp == zp and x.qmin >= st.qmin and x.qmax <= st.qmax:
                operands.append(self.codes(x))
                if x.fresh and len(src.users) == 1 and node.args.count(src) == 1 and src not in self.wrapped:
                    dead.append(i)
            else:
                name = f"{var}_{i}"
                self.lines.append(f"{name} = _add_in({k}, {self.obj(src)}, {scale!r}, {zp})")
                operands.append(name)
        # both dead: donate the one with a non-zero zero point, so the kernel's input has none (cheaper)
        zps = (st.lhs_zp, st.rhs_zp)
        donate = next((i for i in dead if zps[i] != 0), dead[0]) if dead else None
        self.lines.append(f"{var} = _add({k}, {operands[0]}, {operands[1]}, {donate})")
        self.env[node] = var if st.float_out else _Codes(var, st.out_scale, st.out_zp, st.qmin, st.qmax, True)
        self.guards.append((m, "_qt_fast", m.__dict__["_qt_fast"]))
        return True


def _has_node(v: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(v, found.append)
    return bool(found)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_program(model: nn.Module) -> Program:
    """Trace ``model`` and generate its program (raises with the reason when it cannot)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the model runs module by module
        raise _Bail(f"torch.fx cannot trace {type(model).__name__}.forward ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    b = _Builder(model, graph)
    params, body = b.build()
    if not b.lowered:
        raise _Bail("no converted module in 'fast' execution to run as a kernel step")
    source = f"def _program({', '.join(params)}):\n" + "\n".join("    " + line for line in body.splitlines()) + "\n"
    ns = dict(b.globals)
    exec(compile(source, f"<qtoolkit program of {type(model).__name__}>", "exec"), ns)  # noqa: S102 - generated from the fx graph
    n_required = sum(1 for p in params if "=" not in p)
    return Program(ns["_program"], source, b.guards, len(params), n_required, b.lowered, b.called)


# ------------------------------------------------------------------------------------------- the forward


def _float_only(y: Any, name: str) -> Any:
    return tree_map(lambda t: inference_only(t, name) if type(t) is Tensor and t.is_floating_point() else t, y)


class ProgramForward:
    """The converted model's ``forward`` attribute: runs the program when it may, else the class's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.program: Optional[Program] = None
        self.reason: Optional[str] = None  # why there is no program (set when building failed)
        self.warned: set[str] = set()

    def __deepcopy__(self, memo: dict) -> ProgramForward:
        new = ProgramForward.__new__(ProgramForward)
        memo[id(self)] = new
        new.model = copy.deepcopy(self.model, memo)
        new.program, new.reason, new.warned = None, None, set()
        return new

    def __reduce__(self) -> tuple:
        if isinstance(self.model, fx.GraphModule):
            # a GraphModule pickles its __dict__ inside its own reduce arguments (a reference back to it would
            # recurse) and keeps only the attributes its class lacks when unpickled: this one is dropped anyway
            return (_detached, ())
        return (ProgramForward, (self.model,))

    def _warn(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"{type(self.model).__name__}: the converted model runs module by module ({reason}); same results, "
                          "more Python per layer (slower at small batch)", FastPathWarning, stacklevel=4)  # fmt: skip

    def build(self) -> Optional[Program]:
        self.program = None
        try:
            self.program, self.reason = build_program(self.model), None
        except _Bail as e:
            self.reason = str(e)
        except Exception as e:  # noqa: BLE001 - a model the generator does not handle yet: module by module, warned
            self.reason = f"the program could not be generated ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        return self.program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prog = self.program
        if prog is None and self.reason is None:
            prog = self.build()
            if prog is None and self.reason and not self.reason.startswith("no converted module"):
                self._warn(str(self.reason))
        if prog is not None and not kwargs and prog.n_required <= len(args) <= prog.n_args:
            why = prog.valid()
            if why == "stale":
                prog = self.build()
                why = None if prog is None else prog.valid()
            if why is None and prog is not None:
                try:
                    if torch.is_grad_enabled():
                        with torch.no_grad():
                            y = prog.fn(*args)
                        return _float_only(y, type(self.model).__name__)
                    return prog.fn(*args)
                except _Bail as e:
                    self._warn(str(e))
                except RuntimeError:
                    pass  # the module-by-module forward below raises the error with the layer's name
        return type(self.model).forward(self.model, *args, **kwargs)


def _detached() -> None:
    """What an unpickled GraphModule's dropped program forward is read back as (never used)."""
    return None


def install(model: nn.Module) -> ProgramForward:
    """Give the converted ``model`` its program forward (built now; see the module docstring).

    Example::

        >>> install(nn.Sequential(nn.Linear(2, 2))).program is None   # nothing converted: no program
        True
    """
    fwd = model.__dict__.get("forward")
    if not isinstance(fwd, ProgramForward):
        fwd = ProgramForward(model)
        model.forward = fwd  # type: ignore[method-assign]
    fwd.build()
    if fwd.reason and not fwd.reason.startswith("no converted module"):
        fwd._warn(fwd.reason)
    return fwd


def program_status(model: nn.Module) -> str:
    """How the converted ``model``'s fast forward runs: ``"program: N kernel steps, M module calls"`` or
    ``"module by module: <why>"``.

    Example::

        >>> program_status(nn.Sequential(nn.Linear(2, 2)))
        'module by module: not converted by qtoolkit.convert'
    """
    fwd = model.__dict__.get("forward")
    if not isinstance(fwd, ProgramForward):
        return "module by module: not converted by qtoolkit.convert"
    prog = fwd.program
    if prog is None and fwd.reason is None:
        prog = fwd.build()
    if prog is None:
        return f"module by module: {fwd.reason}"
    why = prog.valid()
    if why == "stale":
        prog = fwd.build()
        why = None if prog is None else prog.valid()
    if prog is None:
        return f"module by module: {fwd.reason}"
    if why is not None:
        return f"module by module: {why}"
    return f"program: {prog.lowered} kernel steps, {prog.called} module calls"

"""``prepare``: the module-replacement pass.

1. :func:`~qtoolkit.fuse.fuse_model` finds Conv/Linear → BN → ReLU chains and
   residual adds in the unmodified model (one-level ``torch.fx`` traces per
   container, positional fusion in ``nn.Sequential``).
2. Every fused layer, weight layer (each kind in :mod:`qtoolkit.layer_kinds`) and residual ``Add`` is swapped for its
   quantization-aware twin (:class:`~qtoolkit.nn.QuantLayer`,
   :class:`~qtoolkit.nn.QuantAdd`) with the QConfig resolved for its name.
3. What stays float is recorded (``qtoolkit.summary`` prints it).

Per-module settings: ``overrides`` maps a qualified-name glob (``"layer1.*"``,
``"fc"``) or a module type (``nn.Linear``, :class:`qtoolkit.nn.Add`) to a QConfig
or preset name; ``skip`` lists name globs kept in float. Name globs win over
types; among globs the last matching one wins.

Example::

    >>> import torchvision
    >>> from qtoolkit import prepare
    >>> m = torchvision.models.resnet18(num_classes=10)
    >>> qm = prepare(m, "w4a4", overrides={"conv1": "w8a8", "fc": "w8a8"})
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Mapping

import torch.fx as fx
from torch import nn

from qtoolkit.config import QConfig, get_qconfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.fuse import FloatOp, fuse_model
from qtoolkit.fuse_common import _OneLevelTracer
from qtoolkit.layer_kinds import is_norm_act, is_weight_layer, split_same_padding
from qtoolkit.module_swap import swap_modules
from qtoolkit.nn.fused import Activation, Add, Cat, Einsum, FusedLayer, MatMul, Mul, PadSame, ScaledDotProductAttention
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_attention import (
    QuantMultiheadAttention,
    QuantScaledDotProductAttention,
    unsupported_attention_reason,
)
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantCat, QuantEinsum, QuantMatMul, QuantMul, QuantNorm
from qtoolkit.nn.quant_rnn import QuantRNN, unsupported_rnn_reason
from qtoolkit.nn.quant_window_attention import window_attention_twin
from qtoolkit.toggles import quantizers

__all__ = ["prepare", "resolve_qconfig", "float_ops", "stream_adds"]

_REPORT_ATTR = "_qtoolkit_float_ops"
_QAT_ATTR = "_qtoolkit_qat"

# modules that hold parameters but have no quantized twin: reported
#: elementwise activation modules quantized as int8 lookup tables (QuantActivation)
LUT_MODULES: dict[type[nn.Module], str] = {
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Mish: "mish", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.SELU: "selu", nn.Softplus: "softplus",
}
#: elementwise activation modules of model zoos, recognized by class name and defining package (duck typing: the
#: library never imports them): timm's own activation classes (``timm.layers.activations``)
LUT_MODULES_BY_NAME: dict[tuple[str, str], str] = {
    ("timm", "Swish"): "silu", ("timm", "HardSwish"): "hardswish", ("timm", "HardSigmoid"): "hardsigmoid",
    ("timm", "GELU"): "gelu", ("timm", "Sigmoid"): "sigmoid", ("timm", "Tanh"): "tanh", ("timm", "Mish"): "mish",
}


def lut_activation_name(m: nn.Module) -> str | None:
    """The lookup-table activation name of an elementwise activation module (torch's or a model zoo's), else None.

    Example::

        >>> lut_activation_name(nn.SiLU()), lut_activation_name(nn.Linear(2, 2))
        ('silu', None)
    """
    if type(m) in LUT_MODULES:
        return LUT_MODULES[type(m)]
    if m._modules or any(True for _ in m.parameters(recurse=False)):
        return None
    return LUT_MODULES_BY_NAME.get((type(m).__module__.split(".")[0], type(m).__name__))


# not elementwise (no lookup table): float between quantized ops, as in TensorRT; reported
_FLOAT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_UNSUPPORTED_HINT = (
    nn.RNN,
    nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU,
)


OverrideKey = str | type


def resolve_qconfig(
    name: str,
    module_type: type,
    default: QConfig,
    overrides: Mapping[OverrideKey, QConfig | str | None],
    skip: Iterable[str],
) -> QConfig | None:
    """The QConfig for a module (``None`` = keep float)."""
    if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
        return None
    chosen: QConfig | str | None | type[Ellipsis] = ...
    for key, value in overrides.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
            chosen = value
    if chosen is ...:
        for key, value in overrides.items():
            if isinstance(key, type) and issubclass(module_type, key):
                chosen = value
                break
    if chosen is ...:
        return default
    return None if chosen is None else get_qconfig(chosen)


def _check_overrides(overrides: Mapping, skip: Iterable[str]) -> None:
    for key in overrides:
        if not isinstance(key, (str, type)):
            raise TypeError(f"prepare(overrides=...): keys must be name globs (str) or module types, got {key!r}")
    for pat in skip:
        if not isinstance(pat, str):
            raise TypeError(f"prepare(skip=...): entries must be name globs (str), got {pat!r}")


def float_ops(model: nn.Module) -> list[FloatOp]:
    """What ``prepare`` left in float, and why.

    Example::

        >>> import torch, qtoolkit as qt
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return torch.softmax(self.fc(x), -1)
        >>> [op.op for op in qt.float_ops(qt.prepare(Net(), "w8a8"))]
        ['softmax']
    """
    return list(getattr(model, _REPORT_ATTR, []))


def prepare(
    model: nn.Module,
    qconfig: QConfig | str = "w8a8",
    *,
    qat: bool = False,
    inplace: bool = False,
    overrides: Mapping[OverrideKey, QConfig | str | None] | None = None,
    skip: Iterable[str] = (),
    stream_add_bits: int | None = None,
) -> nn.Module:
    """Prepare ``model`` for calibration (PTQ) or quantization-aware training.

    Args:
        model: a float ``nn.Module`` (used as is, e.g. torchvision's ResNet or
            MobileNetV2; residual adds in ``forward`` are found automatically).
        qconfig: a :class:`QConfig` or preset name (``"w8a8"``, ``"w4a8"``,
            ``"w4a4"``, ``"w8a8-dynamic"``, ``"w8-weight-only"``, ``"w4-weight-only"``).
        qat: keep BatchNorm live (folded-weight fake quantization) and start with
            observers and fake quantization on, ready to train. Activation
            quantizers using ``"minmax"`` switch to ``"ema"`` (moving average), as
            in torch.ao's QAT defaults.
        inplace: modify ``model`` instead of a deep copy.
        overrides: per-module QConfigs by qualified-name glob or module type.
            A glob that matches nothing triggers a warning naming it.
        skip: name globs of modules kept in float (a list, or one glob as a string).
        stream_add_bits: activation bits of the residual adds on a *float stream* (:func:`stream_adds`): adds
            whose operands both reach them in float and whose sum goes on in float (a pre-norm transformer's
            residual stream, read by a float LayerNorm).  The int8 fast path gains nothing there (it would round
            both operands to uint8 codes and add them in float), while one per-tensor 8-bit grid over all tokens
            leaves a token whose range is far below the others' (ViT's class token: 0.07 against 2.6) a few
            steps; 16 keeps it (timm vit_tiny fake quant vs FP32 8.8 -> 30.9 dB).  ``None`` (the default) keeps
            them at the preset's bits: 16-bit grids do not export to ONNX (8-bit Q/DQ at opset 17) and run in the
            reference execution (maxvit_t at batch 1 falls below its FP32 speed).  Adds that ``overrides`` name
            (by glob or by type) keep the override.

    Returns:
        The prepared model. Layers become :class:`~qtoolkit.nn.QuantLayer`, adds
        :class:`~qtoolkit.nn.QuantAdd`, ``torch.cat``/``stack`` :class:`~qtoolkit.nn.QuantCat`, tensor-by-tensor
        ``mul`` / ``matmul`` :class:`~qtoolkit.nn.QuantMul` / :class:`~qtoolkit.nn.QuantMatMul`. A container whose ``forward`` had to be
        rewritten (fusions, adds) becomes a ``torch.fx.GraphModule`` with the same
        submodule names, so ``state_dict`` keys stay recognisable.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare, calibrate, convert
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> qm = prepare(m, "w8a8")
        >>> qm = calibrate(qm, [torch.randn(4, 3, 16, 16)], progress=False)
        >>> int8 = convert(qm)
    """
    default = get_qconfig(qconfig)
    overrides = dict(overrides or {})
    skip = [skip] if isinstance(skip, str) else list(skip)  # one pattern, not its characters
    _check_overrides(overrides, skip)
    if any(isinstance(m, FakeQuantize) for m in model.modules()):  # every prepared module holds quantizers
        raise ValueError("prepare: this model is already prepared (it holds QuantLayer/QuantAdd modules)")
    resolved_overrides = {k: (None if v is None else get_qconfig(v)) for k, v in overrides.items()}
    if qat:
        resolved_overrides = {k: (_qat_qconfig(v) if v is not None else None) for k, v in resolved_overrides.items()}
        default = _qat_qconfig(default)

    if not inplace:
        model = copy.deepcopy(model)
    names_before = [n for n, _ in model.named_modules()]
    skipped_exact = {n for n in names_before if n and any(fnmatch.fnmatchcase(n, p) for p in skip)}
    model, report = fuse_model(model, skip=skipped_exact, inplace=True, bn_as_depthwise=not qat)

    all_names = [n for n, _ in model.named_modules()]
    for key in resolved_overrides:
        if isinstance(key, str) and not any(fnmatch.fnmatchcase(n, key) for n in all_names):
            warnings.warn(f"prepare: override pattern {key!r} matches no module; it has no effect", stacklevel=2)
    for pat in skip:
        if not any(fnmatch.fnmatchcase(n, pat) for n in all_names):
            warnings.warn(f"prepare: skip pattern {pat!r} matches no module; it has no effect", stacklevel=2)

    model = _swap(model, "", default, resolved_overrides, skip, qat, report)
    if stream_add_bits is not None:
        _widen_stream_adds(model, int(stream_add_bits), resolved_overrides)
    for name, fq in quantizers(model):
        fq.set_name(name)
    if qat:
        model.train()
    setattr(model, _REPORT_ATTR, report)
    setattr(model, _QAT_ATTR, qat)
    return model


def _qat_qconfig(qc: QConfig) -> QConfig:
    if qc.activation is not None and qc.activation.calibrator == "minmax" and qc.mode == "static":
        return qc.with_activation_calibrator("ema", **qc.activation.options)
    return qc


def _swap(
    module: nn.Module,
    prefix: str,
    default: QConfig,
    overrides: Mapping[OverrideKey, QConfig | None],
    skip: list[str],
    qat: bool,
    report: list[FloatOp],
) -> nn.Module:
    # a module registered under several names is swapped once, and shared after; id -> (module, result): the
    # module is held, so its id is not reused by a later object
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def replace(child: nn.Module, name: str) -> nn.Module | None:
        if id(child) in done:
            return done[id(child)][1]
        new = _convert_one(child, name, default, overrides, skip, qat, report)
        done[id(child)] = (child, child if new is None else new)
        if new is not None:
            done[id(new)] = (new, new)
        return new

    swap_modules(module, replace, prefix)
    return module


def _convert_one(
    child: nn.Module,
    name: str,
    default: QConfig,
    overrides: Mapping[OverrideKey, QConfig | None],
    skip: list[str],
    qat: bool,
    report: list[FloatOp],
) -> nn.Module | None:
    """The quantized twin of ``child``; ``child`` itself to keep it float; None to recurse."""
    if (conv := split_same_padding(child)) is not None:  # not rewritten by the fusion pass (e.g. in a Sequential)
        twin = _convert_one(conv, name, default, overrides, skip, qat, report)
        return nn.Sequential(PadSame(conv.kernel_size, conv.stride, conv.dilation), conv if twin is None else twin)
    if isinstance(child, FusedLayer):
        layer, bn, act = child.layer, child.bn, child.act
    elif is_weight_layer(child):
        layer, bn, act = child, None, None
    elif isinstance(child, Add):
        qc = resolve_qconfig(name, Add, default, overrides, skip)
        if qc is None:
            report.append(FloatOp(name, "add", "skipped by configuration"))
            return child
        if qc.mode != "static":
            report.append(FloatOp(name, "add", f"mode={qc.mode}: residual adds are quantized in static mode only"))
            return child
        return QuantAdd(qc, act=child.act)
    elif isinstance(child, (Cat, Mul, MatMul, Einsum)):
        op = type(child).__name__.lower()
        qc = resolve_qconfig(name, type(child), default, overrides, skip)
        if qc is None:
            report.append(FloatOp(name, op, "skipped by configuration"))
            return child
        if qc.mode != "static":
            report.append(FloatOp(name, op, f"mode={qc.mode}: functional ops are quantized in static mode only"))
            return child
        if isinstance(child, Cat):
            return QuantCat(qc, dim=child.dim, stack=child.stack)
        if isinstance(child, Einsum):
            return QuantEinsum(qc, child.equation)
        return QuantMul(qc) if isinstance(child, Mul) else QuantMatMul(qc)
    elif isinstance(child, Activation) or lut_activation_name(child) is not None:
        act = child.name if isinstance(child, Activation) else lut_activation_name(child)  # type: ignore[assignment]
        qc = resolve_qconfig(name, type(child), default, overrides, skip)
        if qc is None or qc.mode != "static":
            why = "skipped by configuration" if qc is None else f"mode={qc.mode}: lookup-table activations need static mode"
            report.append(FloatOp(name, type(child).__name__ if not isinstance(child, Activation) else act, why))
            return child
        return QuantActivation(act, qc, None if isinstance(child, Activation) else child)
    elif isinstance(child, ScaledDotProductAttention):
        qc = resolve_qconfig(name, ScaledDotProductAttention, default, overrides, skip)
        if qc is None or qc.mode != "static":
            why = "skipped by configuration" if qc is None else f"mode={qc.mode}: attention is quantized in static mode only"
            report.append(FloatOp(name, "scaled_dot_product_attention", why))
            return child
        return QuantScaledDotProductAttention(child, qc)
    elif is_norm_act(child):
        report.append(FloatOp(name, type(child).__name__, "normalization+activation that no layer absorbs and that "
                              "is not run as a depthwise conv (QAT keeps it live): runs in float"))
        return child
    elif (twin := window_attention_twin(child)) is not None:
        qc = resolve_qconfig(name, type(child), default, overrides, skip)
        if qc is None or qc.mode != "static":
            why = "skipped by configuration" if qc is None else f"mode={qc.mode}: attention is quantized in static mode only"
            report.append(FloatOp(name, type(child).__name__, why))
            return child
        return twin(child, qc, qat=qat)
    elif isinstance(child, (nn.LayerNorm, nn.GroupNorm)):
        # normalization stays float unless an override names it (by type or name): the switch
        qc = resolve_qconfig(name, type(child), None, overrides, skip)  # type: ignore[arg-type]
        if qc is None or qc.mode != "static":
            why = (f"normalization kept float by default; overrides={{nn.{type(child).__name__}: 'w8a8'}} gives it "
                   "int8 input and output") if qc is None else f"mode={qc.mode}: int8 normalization needs static mode"
            report.append(FloatOp(name, type(child).__name__, why))
            return child
        return QuantNorm(child, qc)
    elif type(child) in (nn.LSTM, nn.GRU):
        qc = resolve_qconfig(name, type(child), default, overrides, skip)
        why = "skipped by configuration" if qc is None else unsupported_rnn_reason(child)
        if why is None and qc is not None and qc.mode == "static":
            why = (f"mode=static: RNNs are quantized dynamically (their state has no fixed range); pass "
                   f"overrides={{nn.{type(child).__name__}: 'w8a8-dynamic'}}")
        if why is not None or qc is None:
            report.append(FloatOp(name, type(child).__name__, why or "skipped by configuration"))
            return child
        return QuantRNN(child, qc)
    elif type(child) is nn.MultiheadAttention:
        qc = resolve_qconfig(name, nn.MultiheadAttention, default, overrides, skip)
        why = "skipped by configuration" if qc is None else unsupported_attention_reason(child)
        if why is None and qc is not None and qc.mode != "static":
            why = f"mode={qc.mode}: attention is quantized in static mode only (its matmuls need calibrated ranges)"
        if why is not None or qc is None:
            report.append(FloatOp(name, "MultiheadAttention", why or "skipped by configuration"))
            return child
        return QuantMultiheadAttention(child, qc, qat=qat)
    else:
        if isinstance(child, _UNSUPPORTED_HINT):
            report.append(FloatOp(name, type(child).__name__, "no quantized twin (left float)"))
        elif isinstance(child, _FLOAT_ACTIVATIONS):
            report.append(FloatOp(name, type(child).__name__, "not elementwise (no lookup table): runs in float "
                                  "between quantized ops, as in TensorRT"))
        elif not child._modules and any(True for _ in child.parameters(recurse=False)):
            report.append(FloatOp(name, type(child).__name__, "layer type not supported (left float)"))
        return None
    qc = resolve_qconfig(name, type(layer), default, overrides, skip)
    if qc is None:
        report.append(FloatOp(name, type(layer).__name__, "skipped by configuration"))
        return child
    return QuantLayer(layer, qc, bn=bn, act=act, qat=qat)


# ----------------------------------------------------------------------------------- float-stream residual adds
# A prepared-model mirror of what ``convert`` decides (qtoolkit.convert_passes.mark_float_outputs): which module
# outputs reach their consumers as int8 codes in the fast path.  Everything uncertain counts as codes, so an add
# is widened only where the int8 path provably gains nothing.

_TRANSPARENT = (nn.Identity, nn.Dropout)
#: prepared modules whose converted form may return int8 codes to a code-taking consumer
_CODE_PRODUCERS = (QuantLayer, QuantAdd, QuantActivation)
#: prepared modules whose converted form may take int8 codes as their input (any mode: the safe side)
_CODE_TAKERS = (QuantLayer, QuantAdd, QuantActivation, QuantMul, QuantMatMul, QuantEinsum)


def _graph(mod: nn.Module, cache: dict[int, fx.Graph | None]) -> fx.Graph | None:
    if isinstance(mod, fx.GraphModule):
        return mod.graph
    if id(mod) not in cache:
        try:
            cache[id(mod)] = _OneLevelTracer().trace(mod)
        except Exception:  # noqa: BLE001 - data-dependent forward: consumers unknown
            cache[id(mod)] = None
    return cache[id(mod)]


def _quantized_op(mod: nn.Module) -> bool:
    """A prepared op whose only submodules are its quantizers (a ``cat``, a normalization, ...)."""
    return bool(mod._modules) and all(isinstance(c, FakeQuantize) for c in mod.children())


def _takes_codes(mod: nn.Module, cache: dict) -> bool:
    """May ``mod``'s converted form take its input as int8 codes (unknown: yes)?"""
    if isinstance(mod, _CODE_TAKERS):
        return True
    if _quantized_op(mod):
        return False
    if isinstance(mod, nn.Sequential):
        kids = [c for c in mod if not isinstance(c, _TRANSPARENT)]
        return bool(kids) and _takes_codes(kids[0], cache)
    if not mod._modules:
        return False
    graph = _graph(mod, cache)
    if graph is None:
        return True
    users = [u for n in graph.nodes if n.op == "placeholder" for u in n.users]
    return bool(users) and all(_node_takes_codes(mod, u, cache) for u in users)


def _node_takes_codes(owner: nn.Module, node: fx.Node, cache: dict) -> bool:
    return node.op == "call_module" and _takes_codes(owner.get_submodule(str(node.target)), cache)


def _produces_codes(mod: nn.Module, cache: dict) -> bool:
    """May ``mod``'s converted form return int8 codes (unknown: yes)?"""
    if isinstance(mod, _CODE_PRODUCERS):
        return True
    if _quantized_op(mod):
        return False
    if isinstance(mod, nn.Sequential):
        kids = [c for c in mod if not isinstance(c, _TRANSPARENT)]
        return bool(kids) and _produces_codes(kids[-1], cache)
    if not mod._modules:
        return False
    graph = _graph(mod, cache)
    if graph is None:
        return True
    outs = [n for n in graph.nodes if n.op == "output"]
    if outs:
        flat: list[fx.Node] = []
        fx.node.map_arg(outs[0].args, lambda n: flat.append(n) or n)
        return any(n.op == "call_module" and _produces_codes(mod.get_submodule(str(n.target)), cache) for n in flat)
    return True


def _carries_codes(owner: nn.Module, node: fx.Node, cache: dict) -> bool:
    """May the value of ``node`` (an operand of an add in ``owner``'s graph) arrive as int8 codes?"""
    takers = all(_node_takes_codes(owner, u, cache) for u in node.users)
    if node.op == "placeholder":
        return takers  # the caller emits codes only if every user takes them
    if node.op == "call_module":
        return takers and _produces_codes(owner.get_submodule(str(node.target)), cache)
    return False  # a function / method / attribute: float


def stream_adds(model: nn.Module) -> list[str]:
    """The residual adds of a prepared model that sit on a float stream: no operand reaches them as int8 codes
    and their sum has a float consumer (or leaves the model), so the converted fast path would round both
    operands to codes only to add them in float.  A pre-norm transformer's residual adds (``x + attn(norm(x))``,
    read by the next LayerNorm) are such adds; a ResNet's ``conv(x) + x`` feeding the next convolution is not.

    Example::

        >>> import torch
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x)).mul(0.5)
        >>> stream_adds(prepare(nn.Sequential(Block(), nn.LayerNorm(8)), "w8a8", stream_add_bits=None))
        ['0.add_0']
    """
    cache: dict = {}
    verdict: dict[int, tuple[str, bool]] = {}  # id(add) -> (name, on a float stream at every call site seen)
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    shared = {k for k, v in counts.items() if v > 1}  # registered under several names: consumers per call unknown

    def visit(mod: nn.Module, prefix: str, out_float: bool) -> None:
        if isinstance(mod, nn.Sequential):
            named = [(n, c) for n, c in mod.named_children() if not isinstance(c, _TRANSPARENT)]
            for i, (n, c) in enumerate(named):
                last = i == len(named) - 1
                visit(c, f"{prefix}{n}.", out_float if last else not _takes_codes(named[i + 1][1], cache))
            return
        if not mod._modules or isinstance(mod, (QuantLayer, QuantActivation)) or _quantized_op(mod):
            return
        graph = _graph(mod, cache)
        if graph is None:
            for n, c in mod.named_children():
                visit(c, f"{prefix}{n}.", True)
            return
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            target = mod.get_submodule(str(node.target))
            flt = any((u.op == "output" and out_float) or (u.op != "output" and not _node_takes_codes(mod, u, cache))
                      for u in node.users)  # fmt: skip
            if isinstance(target, QuantAdd):
                operands = [a for a in node.args if isinstance(a, fx.Node)]
                ok = (flt and len(operands) == 2 and id(target) not in verdict and id(target) not in shared
                      and not any(_carries_codes(mod, a, cache) for a in operands))
                verdict[id(target)] = (f"{prefix}{node.target}", ok)  # a second call site: not ok
            else:
                visit(target, f"{prefix}{node.target}.", flt)

    visit(model, "", True)
    return [name for name, ok in verdict.values() if ok]


def _widen_stream_adds(model: nn.Module, bits: int, overrides: Mapping[OverrideKey, QConfig | None]) -> list[str]:
    """Give every :func:`stream_adds` add of a static config ``bits``-bit operand grids (adds named by
    ``overrides`` keep theirs).  Returns the names changed."""
    if not 2 <= bits <= 16:
        raise ValueError(f"prepare: stream_add_bits must be in 2..16 or None, got {bits}")
    changed = []
    for name in stream_adds(model):
        if any(isinstance(k, str) and fnmatch.fnmatchcase(name, k) for k in overrides) or any(
                isinstance(k, type) and issubclass(Add, k) for k in overrides):
            continue
        old = model.get_submodule(name)
        qc = old.qconfig
        if qc.mode != "static" or qc.activation is None or qc.activation.spec.bits >= bits:
            continue
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        new = QuantAdd(qc.with_bits(activation_bits=bits), act=old.act)
        new.train(old.training)
        setattr(owner, leaf, new)
        changed.append(name)
    return changed

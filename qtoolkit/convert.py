"""``convert``: prepared (calibrated or QAT-trained) model → integer-weight model.

Every :class:`~qtoolkit.nn.QuantLayer` becomes an :class:`~qtoolkit.nn.Int8Layer`
(int8 weights in plain ``torch.int8`` buffers, int4 packed two per byte) and every
:class:`~qtoolkit.nn.QuantAdd` an :class:`~qtoolkit.nn.Int8Add`. Live QAT BatchNorms
are folded (running statistics). The result is in eval mode and inference-only.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate, convert, set_execution
    >>> qm = calibrate(prepare(nn.Sequential(nn.Linear(8, 4), nn.ReLU())), [torch.randn(8, 8)], progress=False)
    >>> int8 = convert(qm)
    >>> _ = set_execution(int8, "integer")     # integer-only arithmetic path
    >>> int8(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import qtoolkit.convert_passes as passes
from qtoolkit import executor
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.kernels import dispatch
from qtoolkit.module_swap import swap_modules
from qtoolkit.nn.fused import Activation, Add, Cat, Einsum, FusedLayer, MatMul, Mul
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import EXECUTION_REGISTRY, EXECUTIONS, Int8Layer
from qtoolkit.nn.int8_ops import Int8Activation, Int8Cat, Int8Einsum, Int8MatMul, Int8Mul, Int8Norm
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantCat, QuantEinsum, QuantMatMul, QuantMul, QuantNorm

#: prepared module type -> its converted twin (each has ``from_quant(q, require_calibrated)``)
CONVERTED = {QuantLayer: Int8Layer, QuantAdd: Int8Add, QuantCat: Int8Cat, QuantMul: Int8Mul, QuantMatMul: Int8MatMul,
             QuantEinsum: Int8Einsum, QuantActivation: Int8Activation, QuantNorm: Int8Norm}
_PREPARED = tuple(CONVERTED)
_CONVERTED = tuple(CONVERTED.values())


def _activation_quantizers(m: nn.Module) -> list[tuple[str, FakeQuantize]]:
    """A prepared module's own static activation / output quantizers (not its weight's, not dynamic ones)."""
    return [(n, c) for n, c in m.named_children() if isinstance(c, FakeQuantize) and c.role in ("activation", "output")]

__all__ = ["convert", "set_execution", "uncalibrated_sites"]


def uncalibrated_sites(model: nn.Module) -> list[str]:
    """Names of activation quantizers that have no range yet.

    Example::

        >>> import torch, qtoolkit as qt
        >>> qm = qt.prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), "w8a8")
        >>> qt.uncalibrated_sites(qm)
        ['0.input_quantizer', '0.output_quantizer']
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _PREPARED):
            out += [f"{name}.{p}" for p, fq in _activation_quantizers(m) if not fq.is_calibrated]
    return out


@torch.no_grad()
def convert(
    model: nn.Module,
    *,
    inplace: bool = False,
    allow_uncalibrated: bool = False,
    execution: str = "auto",
    fuse_adds: bool = False,
) -> nn.Module:
    """Convert a prepared model to integer-weight modules.

    Args:
        model: returned by :func:`qtoolkit.prepare` and calibrated
            (:func:`qtoolkit.calibrate`) or QAT-trained.
        inplace: modify ``model`` instead of a deep copy.
        allow_uncalibrated: build the converted structure even if some ranges are
            missing — only to get a skeleton to ``load_state_dict`` a saved
            converted model into.
        execution: ``"auto"`` (default): ``"fast"`` (oneDNN int8 kernels, see
            :mod:`qtoolkit.kernels.dispatch`) for every module that can use them on
            this machine, ``"reference"`` for the others (weight-only layers, no
            kernels); or one of ``"reference"``, ``"integer"``, ``"fast"`` for all
            (as :func:`set_execution`).
        fuse_adds: fold each residual add into the preceding conv's oneDNN ``sum``
            post-op (``"fast"`` only): measured ~4% faster on ResNet-20, but the conv
            output is not rounded to its grid before the add, so results move further
            from the reference path (up to ~2 output steps instead of ~1 on a
            random-init ResNet-20). Default off: the add runs as its own uint8 kernel.

    Modules whose output leaves the quantized part
    (model output, avgpool, ...) are marked to return fp32 in ``"fast"``, and a forward hook on the root turns any int8 carrier leaving
    the model back into a float tensor.

    Layers that never ran while the model was calibrated (e.g. swin's attention calls ``F.linear`` on
    ``self.qkv.weight`` instead of calling ``self.qkv``; a branch the calibration data never takes) have
    no activation ranges: when other layers do, they are converted back to float modules (BN folded,
    fused activation kept) with a warning naming them, and the rest of the model is converted.

    Raises:
        RuntimeError: no activation quantizer was calibrated at all (``calibrate`` forgotten; listed).

    Example::

        >>> import torch, qtoolkit as qt
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
        >>> qm = qt.calibrate(qt.prepare(model, "w8a8"), [torch.randn(2, 3, 8, 8)], progress=False)
        >>> int8 = qt.convert(qm)
        >>> int8[0].weight_q.dtype
        torch.int8
        >>> x = torch.randn(1, 3, 8, 8)
        >>> bool((int8(x) - qm(x)).abs().max() < 0.05)   # the fake-quant model it was converted from
        True
    """
    if not any(isinstance(m, _PREPARED) for m in model.modules()):
        raise ValueError("convert: the model has no prepared layers; call qtoolkit.prepare (and calibrate) first")
    missing = uncalibrated_sites(model)
    if missing and not allow_uncalibrated and _any_calibrated(model):
        never_ran = sorted({site.rsplit(".", 1)[0] for site in missing})
        shown = ", ".join(never_ran[:8]) + (f" ... ({len(never_ran)} in all)" if len(never_ran) > 8 else "")
        warnings.warn(
            f"convert: {len(never_ran)} quantized module(s) never ran while the model was calibrated and have no "
            f"activation range; they stay float: {shown}. Calibrate with data that reaches them to quantize them.",
            stacklevel=2,
        )
        if not inplace:
            model = copy.deepcopy(model)
            inplace = True
        _restore_float(model, "", set(never_ran))
        missing = []
    if missing and not allow_uncalibrated:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise RuntimeError(
            f"convert: {len(missing)} activation quantizer(s) have no range: {shown}. "
            "Run qtoolkit.calibrate(model, data) (PTQ) or train with observers on (QAT) first."
        )
    if execution not in ("auto", *EXECUTIONS):
        raise ValueError(f"convert: execution must be 'auto' or one of {EXECUTIONS}, got {execution!r}")
    if not inplace:
        model = copy.deepcopy(model)
    _swap(model, "", not allow_uncalibrated)
    model.eval()
    if fuse_adds:
        passes.fuse_residual_adds(model)  # rewrites fx graphs only; modules / state_dict unchanged
    passes.mark_float_outputs(model)
    passes.mark_donations(model)
    if not any(h is passes.dequantize_output_hook for h in model._forward_hooks.values()):
        model.register_forward_hook(passes.dequantize_output_hook)
    if execution == "auto":
        for m in model.modules():
            if isinstance(m, (Int8Layer, Int8Add, Int8Activation)) and dispatch.supports_fast(m):
                m.execution = "fast"
        if not allow_uncalibrated:
            dispatch.prepare_fast(model)
    else:
        set_execution(model, execution)
    if not type(model).__module__.startswith("qtoolkit."):
        executor.install(model)  # the fast forward as one program (runs module by module where it cannot)
    return model


def _any_calibrated(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, _PREPARED) and any(fq.is_calibrated for _, fq in _activation_quantizers(m)):
            return True
    return False


@torch.no_grad()
def _float_twin(q: QuantLayer) -> nn.Module:
    """The float module a prepared layer came from: weight with BN folded, the fused activation kept."""
    w, b = q.folded_weight_bias()
    layer = q.kind_info.make_float(q, w, b)
    return layer if q.act is None else FusedLayer(layer, None, q.act)


#: prepared module type -> the float module it stands for (a layer that never ran while calibrating goes back)
FLOAT_TWIN: dict[type, Callable[[Any], nn.Module]] = {
    QuantLayer: _float_twin, QuantAdd: lambda q: Add(q.act), QuantCat: lambda q: Cat(q.dim, q.stack),
    QuantMul: lambda q: Mul(), QuantMatMul: lambda q: MatMul(), QuantEinsum: lambda q: Einsum(q.equation),
    QuantActivation: lambda q: q.fn if isinstance(q.fn, nn.Module) else Activation(q.act), QuantNorm: lambda q: q.norm,
}


def _restore_float(module: nn.Module, prefix: str, names: set[str]) -> None:
    def back(child: nn.Module, name: str) -> nn.Module | None:
        return FLOAT_TWIN[type(child)](child) if name in names and type(child) in FLOAT_TWIN else None

    swap_modules(module, back, prefix)


def _swap(module: nn.Module, prefix: str, require: bool) -> None:
    def twin(child: nn.Module, name: str) -> nn.Module | None:
        make = CONVERTED.get(type(child))
        if make is None:
            return None
        new: nn.Module = make.from_quant(child, require_calibrated=require)
        new.name = name
        return new

    swap_modules(module, twin, prefix)


def set_execution(model: nn.Module, execution: str) -> nn.Module:
    """Choose how converted modules compute: ``"reference"`` (simulated int8),
    ``"integer"`` (integer-only arithmetic) or ``"fast"`` (oneDNN int8 kernels; weights are
    prepacked now; modules that cannot use them run ``"reference"`` and warn once).

    Example::

        >>> from torch import nn
        >>> import qtoolkit as qt
        >>> q = qt.convert(qt.calibrate(qt.prepare(nn.Sequential(nn.Linear(4, 2))), [torch.randn(3, 4)], progress=False))
        >>> _ = set_execution(q, "reference")
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"set_execution: execution must be one of {EXECUTIONS}, got {execution!r}: "
                         + "; ".join(f"{k}: {v}" for k, v in EXECUTION_REGISTRY.items()))
    found = False
    for m in model.modules():
        if isinstance(m, _CONVERTED):
            if execution == "integer" and isinstance(m, Int8Layer) and m.mode != "static":
                raise ValueError(f"set_execution('integer'): {m.name} is in {m.mode} mode; integer-only needs static")
            m.execution = execution
            found = True
    if not found:
        raise ValueError("set_execution: the model has no converted modules; call qtoolkit.convert first")
    if execution == "fast":
        dispatch.prepare_fast(model)
    fwd = model.__dict__.get("forward")
    if isinstance(fwd, executor.ProgramForward):
        fwd.build()  # the program lowers the modules in "fast" execution
    return model

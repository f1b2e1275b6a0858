"""ONNX export with explicit quantization (QuantizeLinear / DequantizeLinear).

:func:`export_onnx` writes a prepared + calibrated (PTQ) or QAT-trained model — the
*fake-quant* form returned by :func:`qtoolkit.prepare` — as an ONNX graph in the
"QDQ" format that ONNX Runtime and TensorRT consume:

* **Activations**: per-tensor ``QuantizeLinear → DequantizeLinear`` with the frozen
  scale / zero point (``uint8`` zero point for unsigned grids, ``int8`` for signed).
* **Weights**: quantized offline into an ``int8`` initializer (the integer codes) and
  a per-channel ``DequantizeLinear`` (``axis=0``, zero point 0): the file holds true
  int8 weights. Live-BN QAT layers are exported with BN folded (running statistics),
  i.e. ``QuantLayer.folded_weight_bias()`` quantized with the weight quantizer's
  qparams. ``target="portable"`` (the default) stores the same values as ``code + 128`` in
  ``uint8`` with zero point 128 (ORT's U8U8 kernels, exact on every x86 CPU; int8 weights —
  ``target="vnni"`` / ``"tensorrt"`` — saturate ORT's U8S8 kernels on x86 CPUs without VNNI;
  see :func:`export_onnx`).
* **Bias**: ``int32`` codes with scale ``s_x·s_w`` (per channel) and zero point 0
  through a ``DequantizeLinear`` (``bias="int32"``, default: the same int32 bias the
  fake-quant model simulates; ORT fuses every conv into ``QLinearConv`` and the
  classifier into ``QGemm``), or a float initializer holding the unquantized bias
  (``bias="float"``: ORT 1.31 still fuses the convs, quantizing the bias itself, but
  not the Gemm; TensorRT's form).
  Layers whose input is not statically quantized keep a float bias.
* **Placement** (TensorRT's explicit-quantization rules): Q/DQ on the inputs of every
  Conv / Gemm and on both inputs of every residual Add; none between a conv and its
  fused ReLU/ReLU6 (``Conv → Relu → Q`` for the next consumer), so an engine can fuse
  every conv into an int8 kernel. Quantizers of the same tensor with identical qparams
  (e.g. a block's input feeding ``conv1`` and the residual add) share one Q/DQ pair.
* **Narrow grids** (4-bit, narrow-range): weights are int8 initializers holding the
  narrow codes (``[-7, 7]`` for 4-bit narrow-range) — exact, and still an int8 kernel.
  Activation grids narrower than their 8-bit container get a float ``Clip`` to the
  grid's range before ``QuantizeLinear`` — exact, but engines then run those convs in
  float (neither ORT nor TensorRT has 4-bit activation kernels).
* **Dynamic** activations (``w8a8-dynamic``): ``DynamicQuantizeLinear →
  DequantizeLinear`` (uint8, the same qparams formula as qtoolkit's dynamic mode).
  Weight-only layers: weight ``DequantizeLinear`` only.
* **TensorRT** accepts only signed symmetric int8 Q/DQ (zero point 0): use a QConfig
  whose activations are ``QuantSpec(8, signed=True, symmetric=True)`` (exported as int8
  Q/DQ with zero point 0) and ``bias="float"``. qtoolkit's default uint8 activations
  are for ONNX Runtime.

**Opset**: 17 by default (any of 13..20 — per-channel ``DequantizeLinear`` needs 13;
20 is the newest the TorchScript exporter emits). The graph is produced by
``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter; no ``onnxscript``
needed), with the quantizers swapped for autograd Functions whose ``symbolic()`` emit
Q/DQ. The batch dimension is dynamic (``dynamic_batch=True``).

Safety: the model is validated first (uncalibrated quantizers, grids ONNX cannot
express, ops the exporter cannot express — each error names the site); the graph is
built in memory, checked with ``onnx.checker`` (full check) and written to a
temporary file in the target directory, then ``os.replace``-d onto ``path``. On any
failure nothing is written to ``path``. The model itself is not modified.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), "w8a8")
    >>> qm = qt.calibrate(qm, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> rep = export_onnx(qm, torch.randn(1, 3, 16, 16), "model.onnx")  # doctest: +SKIP
    >>> rep.num_quantize, rep.num_dequantize  # doctest: +SKIP
    (1, 3)
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit._version import __version__
from qtoolkit.atomic import atomic_write
from qtoolkit.export.errors import ExportError
from qtoolkit.export.graph_passes import _OP_RE, _find_op_callers, _materialize_identities, _share_identical
from qtoolkit.export.report import OnnxExportReport
from qtoolkit.export.twins import _build_twin, _validate

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "ExportError", "OnnxExportReport", "export_onnx"]

#: Default ONNX opset of :func:`export_onnx`.
DEFAULT_OPSET = 17
#: Per-channel ``DequantizeLinear`` (the ``axis`` attribute) appeared in opset 13.
MIN_OPSET = 13
#: Newest opset torch's TorchScript-based exporter emits.
MAX_OPSET = 20

_INSTALL_HINT = "pip install 'qtoolkit[export]'  (onnx>=1.15, onnxruntime>=1.17)"


# --------------------------------------------------------------------------- lazy deps
def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"qtoolkit.export.export_onnx needs the 'onnx' package: {_INSTALL_HINT}") from exc
    return onnx


#: export_onnx(target=...) -> (weight_dtype, bias)
TARGETS: dict[str, tuple[str, str]] = {"portable": ("uint8", "int32"), "vnni": ("int8", "int32"), "tensorrt": ("int8", "float")}


def _legacy_exporter_kwargs() -> dict[str, Any]:
    """``dynamo=False`` where torch.onnx.export has the switch (torch ≥ 2.5; the
    TorchScript exporter is the only one before)."""
    try:
        params = inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {"dynamo": False}
    return {"dynamo": False} if "dynamo" in params else {}


# --------------------------------------------------------------------------- public API
def export_onnx(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    target: str = "portable",
    bias: str | None = None,
    weight_dtype: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: Any = None,
) -> OnnxExportReport:
    """Export a prepared + calibrated (or QAT) qtoolkit model to ONNX with Q/DQ nodes.

    Args:
        model: the fake-quant model from :func:`qtoolkit.prepare` after
            :func:`qtoolkit.calibrate` or QAT (not :func:`qtoolkit.convert`'s output).
            It is deep-copied; exported in eval semantics (BN with running statistics).
        example_input: a float32 tensor (or a tuple of tensors) with the input's shape;
            its batch size does not matter when ``dynamic_batch``.
        path: the ``.onnx`` file to write (its directory must exist).
        opset: ONNX default-domain opset, 13..20 (default 17). Per-channel
            ``DequantizeLinear`` needs 13; 20 is the TorchScript exporter's newest.
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        target: which consumer the file is for; it sets ``weight_dtype`` and ``bias`` unless they are given:

            * ``"portable"`` (default): uint8 weights (``code + 128``, zero point 128), int32 bias.  ONNX
              Runtime then runs its U8U8 integer kernels, which are exact on **every** x86 CPU.  Its U8S8
              kernels (int8 weights) add pairs of products in int16 with saturation on x86 CPUs without
              AVX-VNNI (AVX2-only, AVX-512 without VNNI: e.g. AMD Zen 2/3, Skylake): measured on a Zen 3,
              a calibrated torchvision ResNet-18 was 37 codes off at its first conv (``verify_onnx``).
            * ``"vnni"``: int8 weights, int32 bias — ORT's faster U8S8 kernels, exact on CPUs with
              AVX-VNNI / AVX512-VNNI / AMX (and on ARM); not on the CPUs above.
            * ``"tensorrt"``: int8 weights, float bias (TensorRT's explicit-quantization form; TensorRT also
              wants signed symmetric activations, see the module docstring).
        bias: ``"int32"``: bias as int32 codes at scale ``s_x·s_w`` (zero point
            0) through a ``DequantizeLinear`` — the form ONNX Runtime's QDQ fusion expects
            (``QLinearConv``, and ``QGemm`` for the classifier; ORT ≥ 1.20 also fuses convs
            with a float bias by quantizing it itself, but leaves Gemm float); it is the
            int32 bias the fake-quant model simulates. ``"float"``: the unquantized float
            bias (the engine rounds it itself); TensorRT expects this form.
        weight_dtype: container of the weight codes (default: from ``target``). ``"int8"``:
            symmetric, zero point 0. ``"uint8"``: the same values as ``code + 128`` with zero
            point 128, which makes ORT use its U8U8 kernels (exact everywhere; on x86 CPUs without
            AVX-VNNI its U8S8 kernels' ``vpmaddubsw`` can saturate int16 pair sums for 8-bit weights,
            255·127·2 > 32767). 7-bit weights (``int_weight_per_channel(7)``, ORT's "reduce_range")
            or 4-bit weights cannot saturate and are exact as int8 too.
        input_names / output_names: graph input/output names (default ``input`` /
            ``output`` or ``input_0``, ``output_1``, ... when there are several).
        verify: optional data (a tensor or batches, as :func:`qtoolkit.calibrate` takes): run the written
            file in ONNX Runtime on it and compare with ``model`` (:func:`qtoolkit.export.verify_onnx`);
            the result is ``report.verification``.

    Returns:
        An :class:`OnnxExportReport` (node counts, exported sites; ``verification`` with ``verify=``).

    Raises:
        ExportError: uncalibrated quantizers, a grid ONNX cannot express (> 8 bits, ...),
            an op the exporter cannot express, a converted model — the message names
            the site. Nothing is written to ``path`` on failure.
        ImportError: ``onnx`` is not installed (``pip install 'qtoolkit[export]'``).

    Example::

        >>> import os, tempfile, torch, qtoolkit as qt
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
        >>> qm = qt.calibrate(qt.prepare(net, "w8a8"), [torch.randn(2, 3, 8, 8)], progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
        >>> rep = export_onnx(qm, torch.randn(1, 3, 8, 8), path)
        >>> os.path.exists(path)
        True
    """
    onnx = _import_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"export_onnx: opset must be an int in {MIN_OPSET}..{MAX_OPSET} (per-channel DequantizeLinear needs 13; "
            f"{MAX_OPSET} is the TorchScript exporter's newest), got {opset!r}"
        )
    if target not in TARGETS:
        raise ValueError(f"export_onnx: target must be one of {sorted(TARGETS)}, got {target!r}")
    weight_dtype = TARGETS[target][0] if weight_dtype is None else weight_dtype
    bias = TARGETS[target][1] if bias is None else bias
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"export_onnx: weight_dtype must be 'int8' or 'uint8', got {weight_dtype!r}")
    if bias not in ("int32", "float"):
        raise ValueError(f"export_onnx: bias must be 'int32' or 'float', got {bias!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export_onnx: directory {path.parent} does not exist")
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("export_onnx: example_input must be a tensor or a sequence of tensors")

    _validate(model)
    report = OnnxExportReport(path=path, opset=opset)
    twin = _build_twin(model, opset, bias, weight_dtype, report)
    twin = twin.to("cpu")
    inputs = tuple(t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype) for t in inputs)

    with torch.no_grad():
        try:
            outputs = twin(*inputs)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"export_onnx: the model's forward failed on example_input: {type(exc).__name__}: {exc}") from exc
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    in_names = list(input_names) if input_names else (["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))])
    out_names = list(output_names) if output_names else (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    if len(in_names) != len(inputs) or len(out_names) != n_out:
        raise ValueError(f"export_onnx: {len(inputs)} inputs / {n_out} outputs but names {in_names} / {out_names}")
    dynamic_axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one; it is the
        # one that honours autograd.Function.symbolic (Q/DQ) and needs no onnxscript
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        try:
            torch.onnx.export(
                twin, inputs, buf, **_legacy_exporter_kwargs(), opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_axes=dynamic_axes, do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
            )
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            m = _OP_RE.search(str(exc))
            if m:
                callers = _find_op_callers(twin, inputs, m.group(1).split(".")[-1])
                where = f" (called in {', '.join(callers)})" if callers else ""
                raise ExportError(
                    f"export_onnx: op '{m.group(0).strip(chr(39))}'{where} cannot be expressed in ONNX opset {opset}: "
                    f"{msg}. Nothing was written to {path}"
                ) from exc
            raise ExportError(f"export_onnx: torch.onnx.export failed: {type(exc).__name__}: {msg}. Nothing was written to {path}") from exc

    proto = onnx.load_from_string(buf.getvalue())
    _materialize_identities(proto.graph)
    report.shared_qdq = _share_identical(proto, onnx)
    proto.producer_name = "qtoolkit"
    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, {"qtoolkit.format": "qdq", "qtoolkit.bias": bias, "qtoolkit.weight_dtype": weight_dtype,
                                        "qtoolkit.target": target})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"export_onnx: the exported graph fails onnx.checker: {exc}. Nothing was written to {path}") from exc
    ops = [n.op_type for n in proto.graph.node]
    report.num_quantize = ops.count("QuantizeLinear")
    report.num_dequantize = ops.count("DequantizeLinear")
    report.num_dynamic_quantize = ops.count("DynamicQuantizeLinear")

    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    if verify is not None:
        from qtoolkit.export.verify import verify_onnx

        report.verification = verify_onnx(path, model, verify)
    return report

"""Deployment export of prepared (fake-quant) qtoolkit models.

* :func:`export_onnx` — ONNX with explicit quantization (``QuantizeLinear`` /
  ``DequantizeLinear``), TensorRT-style Q/DQ placement, integer weight initializers;
  runs in ONNX Runtime (``QLinearConv`` after its QDQ fusion) and TensorRT
  (``target="tensorrt"``).  The default ``target="portable"`` is exact in ONNX Runtime on
  every x86 CPU.
* :func:`deploy` — export, compile with OpenVINO or ONNX Runtime with faithful settings, verify per site:
  a :class:`DeployedModel` callable on torch tensors (:func:`load_deployed` reads a saved one back).
* :func:`verify_onnx` — run the file in ONNX Runtime against the fake-quant model: agreement,
  SQNR, and the first quantization site (layer by layer) more than one step off.

Needs the optional dependencies: ``pip install 'qtoolkit[export]'`` (``onnx``,
``onnxruntime``); they are imported only when an export runs.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> from qtoolkit.export import export_onnx
    >>> qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), "w8a8")
    >>> qm = qt.calibrate(qm, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> report = export_onnx(qm, torch.randn(1, 3, 16, 16), "model.onnx")  # doctest: +SKIP
"""

from qtoolkit.export.deploy import DeployedModel, deploy, load_deployed
from qtoolkit.export.onnx import DEFAULT_OPSET, TARGETS, ExportError, OnnxExportReport, export_onnx
from qtoolkit.export.verify import OnnxVerifyReport, SiteDiff, verify_onnx

__all__ = [
    "DEFAULT_OPSET",
    "TARGETS",
    "DeployedModel",
    "ExportError",
    "OnnxExportReport",
    "OnnxVerifyReport",
    "SiteDiff",
    "deploy",
    "export_onnx",
    "load_deployed",
    "verify_onnx",
]

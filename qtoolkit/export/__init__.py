"""Deployment export of prepared (fake-quant) qtoolkit models.

* :func:`export_onnx` — ONNX with explicit quantization (``QuantizeLinear`` /
  ``DequantizeLinear``), TensorRT-style Q/DQ placement, int8 weight initializers;
  runs in ONNX Runtime (``QLinearConv`` after its QDQ fusion) and TensorRT.

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

from qtoolkit.export.onnx import DEFAULT_OPSET, ExportError, OnnxExportReport, export_onnx

__all__ = ["DEFAULT_OPSET", "ExportError", "OnnxExportReport", "export_onnx"]

"""What :func:`~qtoolkit.export.onnx.export_onnx` wrote: :class:`OnnxExportReport`.

Its own module so that the export (:mod:`qtoolkit.export.onnx`) and the Q/DQ twins that fill it
(:mod:`qtoolkit.export.twins`) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OnnxExportReport"]


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: the default-domain opset of the graph.
        num_quantize: ``QuantizeLinear`` nodes (activations; shared where identical).
        num_dequantize: ``DequantizeLinear`` nodes (activations, weights, int32 biases).
        num_dynamic_quantize: ``DynamicQuantizeLinear`` nodes (dynamic-mode inputs).
        quantized_layers: names of the Conv/Linear layers exported with int weights.
        quantized_adds: names of the residual adds exported with Q/DQ inputs.
        quantized_ops: names of the cat / mul / matmul ops exported with Q/DQ inputs.
        float_bias: layers whose bias stayed float (and why).
        shared_qdq: activation Q/DQ pairs removed because another quantizer of the
            same tensor had identical qparams.
        verification: the :class:`~qtoolkit.export.verify.OnnxVerifyReport` of ``verify=``, else None.

    Example::

        >>> from pathlib import Path
        >>> r = OnnxExportReport(path=Path("model.onnx"), opset=17, quantized_layers=["conv1"])
        >>> r.opset, r.quantized_layers, r.num_quantize
        (17, ['conv1'], 0)
    """

    path: Path
    opset: int
    num_quantize: int = 0
    num_dequantize: int = 0
    num_dynamic_quantize: int = 0
    quantized_layers: list[str] = field(default_factory=list)
    quantized_adds: list[str] = field(default_factory=list)
    quantized_ops: list[str] = field(default_factory=list)
    float_bias: dict[str, str] = field(default_factory=dict)
    shared_qdq: int = 0
    verification: Any = None  # an OnnxVerifyReport when export_onnx(..., verify=data) ran

"""Does an engine's u8×s8 convolution saturate in int16 on this CPU?  Asked of the engine itself.

x86 CPUs without VNNI (AVX2-only, AVX-512 without VNNI: AMD Zen 2/3, Skylake) multiply uint8 activations by
int8 weights with ``vpmaddubsw``, which adds *pairs* of products in int16 with saturation (255·127·2 >
32767).  oneDNN (and so OpenVINO's CPU plugin, and ONNX Runtime's MLAS U8S8 kernels) then return wrong sums
for large operands.  OpenVINO documents it (NNCF's ``overflow_fix``: 7-bit weights).  qtoolkit's own
kernels probe oneDNN directly (:func:`qtoolkit.kernels.onednn.saturates_u8s8`); this module does the
same **through the engine**, with the settings the deployment will use: a one-conv Q/DQ graph with every
input code 255 and every weight 127 (32 input channels, a 1×1 kernel), whose exact result is known.  Never
decided by the CPU's name or flags (``ONEDNN_MAX_CPU_ISA=AVX2`` makes OpenVINO's oneDNN behave like such a
CPU, and the probe sees it).

What each weight form does there (measured with OpenVINO 2026.4 under ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``AVX512_CORE``): int8 weights (``target="vnni"``) return 524 272 instead of 1 036 320 (16 saturated pair
sums); uint8 weights with zero point 128 (``target="portable"``) are exact, because OpenVINO does not run
them as an integer conv at all — it subtracts the zero point and runs the conv in f32 (which is also why
that form is 2–4× slower on every CPU).  Weights of at most 7 bits (|code| ≤ 63, NNCF's overflow fix,
``qtoolkit.config.int_weight_per_channel(7)``) cannot saturate with 8-bit activations and stay exact as
int8.

Example::

    >>> from qtoolkit.export.engines import get_engine
    >>> u8s8_saturates(get_engine("openvino"), {"INFERENCE_PRECISION_HINT": "f32"})  # doctest: +SKIP
    False
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = ["probe_model", "u8s8_saturates"]

_CIN, _COUT = 32, 16
_cache: dict[tuple[str, str, str], bool] = {}


def probe_model(weight_dtype: str = "int8") -> Any:
    """The probe graph: ``x → Q(u8) → DQ → Conv(DQ(w)) → y`` with ``x = 255`` and ``w = 127`` everywhere;
    exact ``y = 32·255·127 = 1 036 320`` (scale 1; a 3×3 input, 1×1 kernel)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((_COUT, _CIN, 1, 1), 127, np.int8)
    if weight_dtype == "uint8":
        w, wzp = (w.astype(np.int16) + 128).astype(np.uint8), np.full((_COUT,), 128, np.uint8)
    else:
        wzp = np.zeros((_COUT,), np.int8)
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.ones(_COUT, np.float32), "w_scale"),
        numpy_helper.from_array(wzp, "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "u8s8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _CIN, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _COUT, 3, 3])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=onnx.IR_VERSION if onnx.IR_VERSION < 10 else 9)


def u8s8_saturates(engine: Any, settings: dict[str, Any], weight_dtype: str = "int8") -> bool:
    """True if ``engine`` (an :mod:`qtoolkit.export.engines` class) compiled with ``settings`` gets the probe
    conv wrong with ``weight_dtype`` weights (see the module docstring).  Cached per engine, settings and
    form (per process: ``ONEDNN_MAX_CPU_ISA`` is read once by the engine anyway)."""
    key = (engine.name, json.dumps(settings, sort_keys=True, default=str), weight_dtype)
    if key not in _cache:
        runner = engine.compile(probe_model(weight_dtype), settings)
        y = runner([np.full((1, _CIN, 3, 3), 255.0, np.float32)])[0]
        _cache[key] = bool(np.any(y != _CIN * 255 * 127))
    return _cache[key]

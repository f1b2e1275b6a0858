"""What the engine adapters change in an exported graph before compiling, and the float export twins.

Each rewrite must give the same values: checked against ONNX Runtime on the original graph (the same ONNX
semantics), or against the torch op / the float64 fake-quant model.  The OpenVINO cases are the patterns
OpenVINO 2026.4 compiles wrong or not at all without the rewrite (MaxViT's quantized constant bias, ViT's
conv → flatten → transpose → quantize, ConvNeXt's renamed output ports, VGG's adaptive pool from a small map).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.export.float_twins import ExportAdaptiveAvgPool2d
from qtoolkit.export.graph_passes import fold_constant_qdq, hoist_quantize_above_movement
from tests.export.test_deploy import ENGINES, needs_ov

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _model(nodes, inits, inputs, out, out_type=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(out, out_type, None)], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _qdq(inp, out, scale, zp, pre, nodes, inits, dtype=np.int8):
    inits += [numpy_helper.from_array(np.array(scale, np.float32), pre + "s"), numpy_helper.from_array(np.array(zp, dtype), pre + "z")]
    nodes += [helper.make_node("QuantizeLinear", [inp, pre + "s", pre + "z"], [pre + "q"]),
              helper.make_node("DequantizeLinear", [pre + "q", pre + "s", pre + "z"], [out])]  # fmt: skip


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _const_bias_add():
    """``Q/DQ(x) + Q/DQ(constant)`` (a position bias), a 5-D activation and a 4-D constant."""
    rng = np.random.default_rng(0)
    nodes, inits = [], [numpy_helper.from_array(rng.standard_normal((1, 2, 7, 7)).astype(np.float32), "bias")]
    _qdq("x", "xd", 0.05, 0, "a", nodes, inits)
    nodes.append(helper.make_node("Clip", ["bias", "lo", "hi"], ["bc"]))  # a 4-bit grid: Clip before an 8-bit Q
    inits += [numpy_helper.from_array(np.array(-0.16, np.float32), "lo"), numpy_helper.from_array(np.array(0.14, np.float32), "hi")]
    _qdq("bc", "bd", 0.02, 0, "b", nodes, inits)
    nodes.append(helper.make_node("Add", ["xd", "bd"], ["y"]))
    _qdq("y", "out", 0.06, 0, "o", nodes, inits)
    x = rng.standard_normal((2, 3, 2, 7, 7)).astype(np.float32)
    return _model(nodes, inits, [("x", ["N", 3, 2, 7, 7])], "out"), x


def test_fold_constant_qdq_keeps_values_and_weights():
    model, x = _const_bias_add()
    folded = copy.deepcopy(model)
    assert len(fold_constant_qdq(folded)) == 1
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("QuantizeLinear") == 2 and "Clip" not in ops  # x's and the output's; the constant's is gone
    np.testing.assert_array_equal(_ort(folded, {"x": x}), _ort(model, {"x": x}))
    # quantized weights (integer initializers behind a DequantizeLinear) are not folded
    w = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "as", "az"], ["wd"]), helper.make_node("Conv", ["x", "wd"], ["y"])]
    w += [numpy_helper.from_array(np.array(0.1, np.float32), "as"), numpy_helper.from_array(np.array(0, np.int8), "az")]
    conv = _model(nodes, w, [("x", [1, 3, 4, 4])], "y")
    assert fold_constant_qdq(conv) == [] and len(conv.graph.node) == 2


@needs_ov
def test_openvino_compiles_a_quantized_constant_operand():
    from qtoolkit.export.engines import OpenVINOEngine

    model, x = _const_bias_add()
    runner = OpenVINOEngine.compile(model, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    assert runner.notes and "folded" in runner.notes[0]
    np.testing.assert_allclose(runner([x])[0], _ort(model, {"x": x}), atol=0.06 * 1.0001)  # at most one output step


def _conv_reshape_transpose_q():
    """int8 conv without bias → Reshape → Transpose → per-tensor QuantizeLinear (a ViT patch embedding)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(rng.integers(-127, 128, (16, 8, 2, 2)).astype(np.int8), "w"),
             numpy_helper.from_array(rng.random(16).astype(np.float32) * 0.01 + 0.001, "ws"),
             numpy_helper.from_array(np.zeros(16, np.int8), "wz"), numpy_helper.from_array(np.array(0.04, np.float32), "ys"),
             numpy_helper.from_array(np.array(125, np.uint8), "yz"), numpy_helper.from_array(np.array([0, 16, -1], np.int64), "shp")]  # fmt: skip
    nodes = [helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], strides=[2, 2], kernel_shape=[2, 2]),
             helper.make_node("Reshape", ["c", "shp"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Shape", ["t"], ["tshape"]), helper.make_node("QuantizeLinear", ["t", "ys", "yz"], ["y"])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, ["N", 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None),
                           helper.make_tensor_value_info("tshape", TensorProto.INT64, None)], inits)  # fmt: skip
    x = rng.integers(0, 256, (2, 8, 8, 8)).astype(np.uint8)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), x


def test_hoist_quantize_above_movement_is_the_same_codes():
    model, x = _conv_reshape_transpose_q()
    hoisted = copy.deepcopy(model)
    assert hoist_quantize_above_movement(hoisted) == 2
    sess = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, hoisted)]
    a, b = (s.run(None, {"xq": x}) for s in sess)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])  # the Shape user reads the moved op's output: the same shape


@needs_ov
def test_openvino_conv_reshape_transpose_quantize_is_exact():
    from qtoolkit.export.engines import OpenVINOEngine

    model, x = _conv_reshape_transpose_q()
    runner = OpenVINOEngine.compile(model, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    assert runner.output_names == ["y", "tshape"]
    diff = np.abs(runner([x])[0].astype(int) - _ort(model, {"xq": x}).astype(int))
    assert diff.max() <= 1  # rounding ties only (without the hoist: ~100 steps off)


# --------------------------------------------------------------------------- float export twins
@pytest.mark.parametrize(("hw", "out"), [((2, 2), 7), ((3, 5), (7, 2)), ((9, 13), 4), ((14, 14), 7), ((5, 6), (None, 4))])
def test_export_adaptive_avg_pool_matches_torch(hw, out):
    pool = nn.AdaptiveAvgPool2d(out)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    torch.testing.assert_close(ExportAdaptiveAvgPool2d(pool)(x), pool(x), rtol=0, atol=1e-12)


class _SmallMapPool(nn.Module):
    """VGG's shape: features to a 2×2 map, AdaptiveAvgPool2d((7, 7)) (upsampling), a Linear on 7·7·C."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(4 * 49, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("engine", ENGINES)
def test_deploy_adaptive_pool_from_a_smaller_map(engine):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    qm = qt.calibrate(qt.prepare(_SmallMapPool().eval(), "w8a8"), [torch.randn(8, 1, 12, 12, generator=g)], progress=False)
    x = torch.randn(3, 1, 12, 12, generator=g)
    dm = qt.deploy(qm, x, engine=engine)
    assert dm.report.verification.faithful
    with torch.no_grad():
        ref = copy.deepcopy(qm).double()(x.double())
    assert float((dm(x).double() - ref).abs().max()) <= 0.02 * float(ref.abs().max())

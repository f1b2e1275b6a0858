"""ONNX Q/DQ export, verified by a real consumer (ONNX Runtime, CPU).

Tolerances. The reference is qtoolkit's fake-quant model; "one output step" is the
scale of the classifier's (observe-only) output quantizer, i.e. the resolution int8
logits would have. Two regimes:

* Exact regime (``_snap_pow2``): every scale is snapped to a power of two and every
  folded bias to a multiple of ``s_x·s_w``. Then each conv is a sum of integers times
  one power of two — exact in float32 in any summation order — and quantization /
  requantization by a power of two is exact, so torch, ORT's Q/DQ emulation and ORT's
  integer kernels must agree code for code; only the float average pool and the
  float logits may differ in the last bits. Asserted: max |Δ| ≤ 1 output step.
* General regime (calibrated scales): two correct implementations differ in the
  float summation order of the convs (and in the int32 rounding of the bias), so
  values within ~1e-7 of a rounding tie get the neighbouring code; in a deep network
  each such flip perturbs the next layers and can flip more. Asserted (honest bound
  from measurements on random ResNet-20s, see the README draft): mean |Δ| ≤ 1 output
  step and top-1 agreement ≥ 95 %.

ORT's x86 U8S8 kernels without AVX-VNNI use ``vpmaddubsw``, which saturates int16
pair sums (255·127·2 > 32767); int8 weights (``target="vnni"``) may deviate there, so the
default export (``target="portable"``: the same values in uint8, U8U8 kernels) is what the
integer-kernel tests check, on every CPU, layer by layer with ``verify_onnx``; int8 containers
are checked with 4-bit and 7-bit weights (|w| ≤ 63: no saturation possible).  No test reads
the CPU's flags.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import qtoolkit as qt
from qtoolkit.config import int_weight_per_channel
from qtoolkit.export import ExportError, export_onnx
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn import QuantAdd, QuantLayer
from recipes.models import resnet20
from tests.conftest import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
INT_CONV_OPS = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}


# --------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(model: nn.Module, preset="w8a8", shape=(1, 28, 28), n=3, bs=8, **kw) -> nn.Module:
    qm = qt.prepare(model.eval(), preset, **kw)
    g = torch.Generator().manual_seed(0)
    return qt.calibrate(qm, [torch.randn(bs, *shape, generator=g) for _ in range(n)], progress=False)


def _resnet20(preset="w8a8") -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(randomize_bn(resnet20(num_classes=10, in_channels=1)), preset)


@torch.no_grad()
def _snap_pow2(qm: nn.Module) -> nn.Module:
    """Power-of-two scales, biases on the int32 grid: the exact regime (module docstring)."""
    for _, fq in qt.quantizers(qm):
        fq.scale.copy_(torch.exp2(torch.round(torch.log2(fq.scale))))
    for m in qm.modules():
        if isinstance(m, QuantLayer) and m.bias is not None and m.input_quantizer is not None:
            step = m.input_quantizer.scale * m.weight_quantizer.scale
            m.bias.copy_(torch.round(m.bias / step) * step)
    return qm


def _session(path, level="none", optimized=None, threads=1):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, x: torch.Tensor, level="none", optimized=None) -> np.ndarray:
    return _session(path, level, optimized).run(None, {"input": x.numpy()})[0]


@torch.no_grad()
def _reference(qm: nn.Module, x: torch.Tensor) -> np.ndarray:
    return qm(x).numpy()


def _out_step(qm: nn.Module, ref: np.ndarray | None = None) -> float:
    """The classifier's output quantization step: its output quantizer's scale, or (QAT,
    where the observe-only output quantizer never gets qparams) range(ref) / 255."""
    fq = qm.fc.output_quantizer
    if fq is not None and fq.is_calibrated:
        return float(fq.scale)
    assert ref is not None
    return float(ref.max() - min(ref.min(), 0.0)) / 255


@torch.no_grad()
def _expected_qdq(qm: nn.Module, x: torch.Tensor, bias="int32") -> tuple[int, int]:
    """(#QuantizeLinear, #DequantizeLinear) predicted from the model's structure:
    one Q/DQ pair per distinct (tensor, scale, zero point) among the activation
    quantizers that fake-quantize (quantizers of one tensor with identical qparams
    share a pair), one weight DQ per QuantLayer, one int32-bias DQ per layer with a
    bias and a statically quantized input."""
    seen: dict[tuple, torch.Tensor] = {}

    def hook(mod: FakeQuantize, args):
        t = args[0]
        seen[(id(t), float(mod.scale), int(mod.zero_point))] = t  # keep t alive: ids stay unique

    handles = [
        fq.register_forward_pre_hook(hook)
        for _, fq in qt.quantizers(qm)
        if fq.role == "activation" and bool(fq.fake_quant_enabled)
    ]
    qm(x)
    for h in handles:
        h.remove()
    layers = [m for m in qm.modules() if isinstance(m, QuantLayer)]
    n_bias = sum(m.bias is not None and m.input_quantizer is not None for m in layers) if bias == "int32" else 0
    return len(seen), len(seen) + len(layers) + n_bias


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """A calibrated ResNet-20 (random BN statistics) and its export (default target: portable)."""
    torch.set_num_threads(1)
    qm = _resnet20()
    path = tmp_path_factory.mktemp("onnx") / "resnet20.onnx"
    report = export_onnx(qm, torch.randn(2, 1, 28, 28), path)
    return qm, path, report


@pytest.fixture(scope="module")
def r20_vnni(r20, tmp_path_factory):
    qm = r20[0]
    path = tmp_path_factory.mktemp("onnx_vnni") / "resnet20_vnni.onnx"
    export_onnx(qm, torch.randn(2, 1, 28, 28), path, target="vnni")
    return qm, path


@pytest.fixture(scope="module")
def r20_exact(tmp_path_factory):
    torch.set_num_threads(1)
    qm = _snap_pow2(_resnet20())
    d = tmp_path_factory.mktemp("onnx_exact")
    paths = {wd: d / f"resnet20_{wd}.onnx" for wd in ("int8", "uint8")}
    for wd, p in paths.items():
        export_onnx(qm, torch.randn(2, 1, 28, 28), p, target="portable" if wd == "uint8" else "vnni")
    return qm, paths


# --------------------------------------------------------------------------- structure
def test_checker_and_qdq_counts(r20):
    qm, path, report = r20
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == report.opset == 17
    n_q, n_dq = _expected_qdq(qm, torch.randn(2, 1, 28, 28))
    layers = sum(isinstance(m, QuantLayer) for m in qm.modules())
    adds = sum(isinstance(m, QuantAdd) for m in qm.modules())
    assert (layers, adds) == (22, 9)
    # 22 layer inputs + 2 per add = 40 quantizers; each block's input feeds conv1 (or the
    # downsample conv) and the add with identical qparams → 9 shared: 31 Q
    assert n_q == 31 and report.shared_qdq == 9
    ops = _ops(path)
    assert ops["QuantizeLinear"] == n_q == report.num_quantize
    assert ops["DequantizeLinear"] == n_dq == report.num_dequantize
    assert ops["Conv"] == 21 and ops["Gemm"] == 1 and ops["Add"] == 9


@pytest.mark.parametrize("target", ["vnni", "portable"])
def test_int8_weight_and_int32_bias_initializers(r20, r20_vnni, target):
    qm, path = r20_vnni if target == "vnni" else r20[:2]
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props}["qtoolkit.target"] == target
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for node in convs:
        x_dq, w_dq, b_dq = (producers[i] for i in node.input)
        assert x_dq.op_type == w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert producers[x_dq.input[0]].op_type == "QuantizeLinear"
        w, zp = inits[w_dq.input[0]], inits[w_dq.input[2]]
        if target == "vnni":
            assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 127
            assert zp.dtype == np.int8 and not zp.any()
        else:  # the same codes + 128 in uint8 with zero point 128: ORT's U8U8 kernels
            assert w.dtype == np.uint8 and np.abs(w.astype(int) - 128).max() <= 127
            assert zp.dtype == np.uint8 and (zp == 128).all()
        assert {a.name: a.i for a in w_dq.attribute}.get("axis") == 0 and inits[w_dq.input[1]].shape == (w.shape[0],)
        assert inits[b_dq.input[0]].dtype == np.int32
        # bias scale = s_x · s_w
        s_x = inits[x_dq.input[1]]
        np.testing.assert_allclose(inits[b_dq.input[1]], s_x * inits[w_dq.input[1]], rtol=1e-6)
    # the weights really are the fake-quant model's codes
    w = inits["layer1.0.conv1.weight_codes"].astype(np.float32) - (128 if target == "portable" else 0)
    s = inits["layer1.0.conv1.weight_scale"].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(w * s, qm.layer1[0].conv1.weight_quantizer(qm.layer1[0].conv1.weight).detach().numpy(), atol=1e-7)


def test_tensorrt_placement(r20):
    """Q/DQ on conv/gemm inputs and on both add inputs; nothing between a conv and its ReLU."""
    _, path, _ = r20
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Add":
            assert all(producers[i].op_type == "DequantizeLinear" for i in node.input)
        if node.op_type == "Relu":
            assert producers[node.input[0]].op_type in ("Conv", "Add")
        if node.op_type == "QuantizeLinear":  # activations come from ops, never from a DQ (no double rounding)
            src = producers.get(node.input[0])
            assert src is None or src.op_type != "DequantizeLinear"
    relus_after_conv = sum(
        1 for n in model.graph.node if n.op_type == "Relu" and producers[n.input[0]].op_type == "Conv"
    )
    assert relus_after_conv == 10  # stem + conv1 of each of the 9 blocks


def test_dynamic_batch(r20):
    qm, path, _ = r20
    sess = _session(path)
    assert sess.get_inputs()[0].shape[0] == "batch"
    for bs in (1, 5):
        x = torch.randn(bs, 1, 28, 28)
        assert sess.run(None, {"input": x.numpy()})[0].shape == (bs, 10)


# --------------------------------------------------------------------------- numerics
def test_ort_matches_fake_quant_exact_regime(r20_exact, tmp_path):
    qm, paths = r20_exact
    step = _out_step(qm)
    x = torch.randn(32, 1, 28, 28)
    ref = _reference(qm, x)
    for level in ("none", "all"):
        out = _run(paths["uint8"], x, level)
        assert np.abs(out - ref).max() <= step, level
    out = _run(paths["int8"], x, "none")  # Q/DQ emulation: weight type does not matter
    assert np.abs(out - ref).max() <= step


def test_ort_matches_fake_quant_general(r20, r20_vnni, tmp_path):
    """The default export in ORT with every optimization (fused integer kernels) is faithful layer by layer
    on any CPU: no site more than one step off (a saturating U8S8 kernel is tens of steps off at its first
    conv), the logits within a step on average, top-1 agreeing."""
    qm, path, _ = r20
    step = _out_step(qm)
    x = torch.randn(64, 1, 28, 28)
    ref = _reference(qm, x)
    for p, level in ((path, "none"), (path, "all"), (r20_vnni[1], "none")):
        out = _run(p, x, level)
        err = np.abs(out - ref) / step
        assert err.mean() <= 1.0, (p.name, level, err.mean(), err.max())
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
        report = qt.verify_onnx(p, qm, [x[:32], x[32:]], optimization=level, threads=1)
        assert report.faithful, str(report)
        assert len(report.sites) == 31 and max(s.max_steps for s in report.sites) <= 1
        assert report.samples == 64 and report.top1_agreement >= 0.95 and report.sqnr_db > 20
    # the relative L2 error of the default export stays far below the 0.148 measured on a Zen 3 with int8 weights
    assert np.linalg.norm(_run(path, x, "all") - ref) / np.linalg.norm(ref) < 0.05


def test_verify_onnx_names_the_first_wrong_site(r20, tmp_path):
    """A kernel that computes something else (simulated: layer2.0.conv2's weights changed in the file) is
    caught at the first site after it and named; sites before it stay within a step."""
    qm, path, _ = r20
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "layer2.0.conv2.weight_codes":
            w = onnx.numpy_helper.to_array(init).copy()
            w[:, :4] = 128 + (w[:, :4].astype(int) - 128) // 2  # half the weights of 4 input channels
            init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.uint8), init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    data = [torch.randn(16, 1, 28, 28)]
    report = qt.verify_onnx(bad, qm, data, threads=1)
    assert not report.faithful and report.first_divergent.site == "layer2.0.add_0.lhs_quantizer"
    assert "NOT faithful: first site beyond one step is layer2.0.add_0.lhs_quantizer" in str(report)
    before = report.sites[: [s.site for s in report.sites].index("layer2.0.add_0.lhs_quantizer")]
    assert before and all(s.max_steps <= 1 for s in before)
    # export_onnx(..., verify=data) runs the same check on the file it wrote
    rep = export_onnx(qm, data[0][:1], tmp_path / "checked.onnx", verify=data)
    assert rep.verification is not None and rep.verification.faithful
    with pytest.raises(TypeError, match="prepared"):
        qt.verify_onnx(path, qt.convert(qm), data)


def test_ort_optimized_model_runs_int8_convs(r20, tmp_path):
    qm, path, _ = r20
    x = torch.randn(4, 1, 28, 28)
    for level in ("extended", "all"):
        opt = tmp_path / f"opt_{level}.onnx"
        _run(path, x, level, optimized=opt)
        ops = _ops(opt)
        n_int = sum(ops[k] for k in INT_CONV_OPS)
        assert n_int == 21, ops  # every conv of ResNet-20 (stem, 18 block convs, 2 downsample)
        assert ops["Conv"] == 0
        assert ops["QLinearAdd"] >= 8 and ops["QGemm"] == 1


def test_bias_float_option(r20, tmp_path):
    qm, _, _ = r20
    path = tmp_path / "float_bias.onnx"
    rep = export_onnx(qm, torch.randn(1, 1, 28, 28), path, bias="float")
    assert set(rep.float_bias) == set(rep.quantized_layers)
    n_q, n_dq = _expected_qdq(qm, torch.randn(1, 1, 28, 28), bias="float")
    assert (rep.num_quantize, rep.num_dequantize) == (n_q, n_dq)
    x = torch.randn(16, 1, 28, 28)
    ref = _reference(qm, x)
    out = _run(path, x, "none")
    assert np.abs(out - ref).mean() <= _out_step(qm)


# --------------------------------------------------------------------------- 4-bit / QAT / other models
def test_4bit_weights_exact(tmp_path):
    qm = _snap_pow2(_resnet20("w4a8"))
    path = tmp_path / "w4a8.onnx"
    export_onnx(qm, torch.randn(1, 1, 28, 28), path, target="vnni")  # int8 containers: no saturation with 4 bits
    model = onnx.load(str(path))
    codes = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_codes")]
    assert len(codes) == 22 and all(c.dtype == np.int8 and np.abs(c.astype(int)).max() <= 7 for c in codes)
    x = torch.randn(16, 1, 28, 28)
    ref = _reference(qm, x)
    opt = tmp_path / "w4a8_opt.onnx"
    for level in ("none", "all"):
        out = _run(path, x, level, optimized=opt if level == "all" else None)
        assert np.abs(out - ref).max() <= _out_step(qm), level
    assert sum(_ops(opt)[k] for k in INT_CONV_OPS) == 21  # int8 kernels with 4-bit codes


def test_7bit_weights_exact_with_int8_kernels(tmp_path):
    """reduce_range: 7-bit weights (|w| ≤ 63) in int8 containers keep ORT's U8S8 pair sums
    below 2^15, so even without VNNI the int8 kernels match the fake-quant model."""
    qc = qt.get_qconfig("w8a8")
    w7 = qt.QConfig(int_weight_per_channel(7), qc.activation, "static")
    torch.manual_seed(0)
    qm = _snap_pow2(_calibrated(randomize_bn(resnet20(num_classes=10, in_channels=1)), w7))
    path = tmp_path / "w7a8.onnx"
    export_onnx(qm, torch.randn(1, 1, 28, 28), path, target="vnni")
    x = torch.randn(32, 1, 28, 28)
    ref = _reference(qm, x)
    opt = tmp_path / "w7a8_opt.onnx"
    assert np.abs(_run(path, x, "all", optimized=opt) - ref).max() <= _out_step(qm)
    assert sum(_ops(opt)[k] for k in INT_CONV_OPS) == 21


def test_4bit_activations_are_clipped(tmp_path):
    qm = _snap_pow2(_resnet20("w4a4"))
    path = tmp_path / "w4a4.onnx"
    rep = export_onnx(qm, torch.randn(1, 1, 28, 28), path)
    ops = _ops(path)
    assert ops["Clip"] == rep.num_quantize > 0  # one Clip to [0, 15] codes per Q
    x = torch.randn(16, 1, 28, 28)
    ref = _reference(qm, x)
    out = _run(path, x, "none")
    assert np.abs(out - ref).max() <= _out_step(qm)


def test_qat_live_bn_exports_folded(tmp_path):
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1)
    qm = qt.prepare(model, "w8a8", qat=True)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(3):
        loss = nn.functional.cross_entropy(qm(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    qt.disable_observers(qm)
    qt.freeze_bn(qm)
    qm.eval()
    assert any(isinstance(m, QuantLayer) and m.bn is not None for m in qm.modules())
    # bias="float": the graph then computes exactly the fake-quant function (an int32
    # bias is rounded to s_x·s_w, which an untrained QAT net with tiny logits feels)
    path = tmp_path / "qat.onnx"
    export_onnx(qm, torch.randn(1, 1, 28, 28), path, bias="float")
    assert _ops(path)["BatchNormalization"] == 0
    x = torch.randn(32, 1, 28, 28)
    ref = _reference(qm, x)
    out = _run(path, x, "none")
    step = _out_step(qm, ref)
    assert np.abs(out - ref).mean() <= step and (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    default = tmp_path / "qat_default.onnx"
    export_onnx(qm, torch.randn(1, 1, 28, 28), default)
    opt = tmp_path / "qat_opt.onnx"
    out = _run(default, x, "all", optimized=opt)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert sum(_ops(opt)[k] for k in INT_CONV_OPS) == 21


def test_torchvision_resnet18(tmp_path):
    torch.manual_seed(0)
    qm = _calibrated(randomize_bn(torchvision.models.resnet18(num_classes=10)), shape=(3, 32, 32), n=2, bs=4)
    qm = _snap_pow2(qm)
    path = tmp_path / "resnet18.onnx"
    rep = export_onnx(qm, torch.randn(1, 3, 32, 32), path, weight_dtype="uint8")
    n_q, n_dq = _expected_qdq(qm, torch.randn(1, 3, 32, 32))
    assert (rep.num_quantize, rep.num_dequantize) == (n_q, n_dq)
    x = torch.randn(8, 3, 32, 32)
    ref = _reference(qm, x)
    opt = tmp_path / "resnet18_opt.onnx"
    out = _run(path, x, "all", optimized=opt)
    assert np.abs(out - ref).max() <= _out_step(qm)
    assert sum(_ops(opt)[k] for k in INT_CONV_OPS) == 20


def _small(preset) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    return _calibrated(randomize_bn(model), preset, shape=(3, 8, 8))


@pytest.mark.parametrize("opset", [13, 20])
@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic", "w8-weight-only", "w4-weight-only", "int8-symmetric"])
def test_modes_and_opsets(preset, opset, tmp_path):
    """Dynamic (DynamicQuantizeLinear), weight-only (weight DQ only) and TensorRT-style
    signed symmetric activations (int8 zero point 0, float bias) at the opset bounds."""
    if preset == "int8-symmetric":
        qc = qt.get_qconfig("w8a8")
        preset = qt.QConfig(qc.weight, qt.QuantizerConfig(qt.QuantSpec(8, signed=True, symmetric=True)), "static")
    qm = _small(preset)
    path = tmp_path / "m.onnx"
    rep = export_onnx(qm, torch.randn(1, 3, 8, 8), path, opset=opset, bias="float" if not isinstance(preset, str) else "int32")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    ops = _ops(path)
    mode = qm[0].qconfig.mode
    assert ops["DynamicQuantizeLinear"] == (2 if mode == "dynamic" else 0) == rep.num_dynamic_quantize
    assert ops["QuantizeLinear"] == (2 if mode == "static" else 0)
    if not isinstance(preset, str):
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert all(z.dtype == np.int8 and not z.any() for z in zps)
    x = torch.randn(6, 3, 8, 8)
    ref = _reference(qm, x)
    # dynamic / weight-only: float convs on the same values (float-rounding level); static:
    # the int32 bias (and ORT's integer kernels) may move a near-tie code: one output step
    tol = float(qm[4].output_quantizer.scale) if mode == "static" else 1e-4 * max(1.0, np.abs(ref).max())
    for level in ("none", "all"):
        assert np.abs(_run(path, x, level) - ref).max() <= tol, level


# --------------------------------------------------------------------------- failures
def test_uncalibrated_model_errors_and_writes_nothing(tmp_path):
    qm = qt.prepare(resnet20(num_classes=10, in_channels=1).eval(), "w8a8")
    path = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match=r"conv1\.input_quantizer.*calibrate"):
        export_onnx(qm, torch.randn(1, 1, 28, 28), path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_failure_keeps_existing_file(tmp_path):
    qm = qt.prepare(resnet20(num_classes=10, in_channels=1).eval(), "w8a8")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError):
        export_onnx(qm, torch.randn(1, 1, 28, 28), path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.onnx"]


class _ErfinvHead(nn.Module):
    def forward(self, x):
        return torch.erfinv(torch.tanh(x) * 0.5)


def test_unexpressible_op_names_op_and_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), _ErfinvHead())
    qm = _calibrated(model, shape=(1, 8, 8))
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"aten::erfinv.*4 \(_ErfinvHead\)"):
        export_onnx(qm, torch.randn(1, 1, 8, 8), path)
    assert os.listdir(tmp_path) == []


def test_unexpressible_grid_names_site(tmp_path):
    qc = qt.get_qconfig("w8a8")
    wide = qt.QConfig(qc.weight, qc.activation.with_bits(16), "static")
    qm = qt.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval(), "w8a8", overrides={"0": wide})
    qm = qt.calibrate(qm, [torch.randn(2, 1, 8, 8)], progress=False)
    path = tmp_path / "wide.onnx"
    with pytest.raises(ExportError, match=r"0\.input_quantizer: a 16-bit grid"):
        export_onnx(qm, torch.randn(1, 1, 8, 8), path)
    assert not path.exists()


def test_converted_model_is_rejected(tmp_path):
    qm = _calibrated(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), shape=(1, 8, 8))
    with pytest.raises(ExportError, match="convert"):
        export_onnx(qt.convert(qm), torch.randn(1, 1, 8, 8), tmp_path / "c.onnx")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(qm, torch.randn(1, 1, 8, 8), tmp_path / "c.onnx", opset=11)


def test_missing_onnx_gives_install_hint(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    qm = _small("w8a8")
    with pytest.raises(ImportError, match=r"qtoolkit\[export\]"):
        export_onnx(qm, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_static_batch_and_live_observer_warning(tmp_path):
    qm = _small("w8a8")
    qt.enable_observers(qm)
    with pytest.warns(UserWarning, match="disable_observers"):
        export_onnx(qm, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=False)
    assert _session(tmp_path / "m.onnx").get_inputs()[0].shape == [2, 3, 8, 8]


def test_export_leaves_model_untouched(r20, tmp_path):
    qm, _, _ = r20
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    export_onnx(qm, torch.randn(1, 1, 28, 28), tmp_path / "again.onnx")
    after = qm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(_out_step(qm))


@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 7)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 4, 5, 5)),
], ids=["convT2d", "convT2d-groups", "convT1d", "conv3d"])
def test_every_layer_kind_exports_and_matches_ort(layer, shape, tmp_path):
    from qtoolkit.layer_kinds import kind_of
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    first = layer()
    kind = kind_of(first)
    model = randomize_bn(nn.Sequential(first, kind.bn_type(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))).eval()
    x = torch.randn(*shape)
    model(x)  # materialize the LazyLinear
    qm = qt.prepare(model, "w8a8")
    qt.calibrate(qm, [torch.randn(*shape) for _ in range(4)], progress=False)
    path = tmp_path / "kind.onnx"
    export_onnx(qm, x, path, target="vnni")
    ops = _ops(path)
    assert ops[kind.onnx_op] == 1
    if kind.transposed and first.groups == 1:
        assert ops.get("Transpose", 0) == 0  # DQ (axis 1) feeds ConvTranspose directly
    ref = _reference(qm, x)
    out = _run(path, x)
    assert np.abs(out - ref).max() <= float(qm[-1].output_quantizer.scale) + 1e-6  # within one output step

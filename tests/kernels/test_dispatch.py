"""The ``"fast"`` execution (qtoolkit.kernels.dispatch) against the reference converted path.

Per layer kind: the fast path's output codes are within one output quantization step of the reference
path's output quantized to the same grid (fp32 outputs: within float rounding); end to end on a small
ResNet; residual adds (separate uint8 add and the fused conv ``sum``); dynamic Linear; int4 weights;
the warn-once fallback; no torch warnings; state_dict round trips; the int8 activation carrier.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import dispatch, onednn
from qtoolkit.kernels import fast_add as fast_add_module
from qtoolkit.kernels.dispatch import FastPathWarning
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.nn import Int8Add, Int8Layer
from qtoolkit.numerics import quantize
from tests.conftest import randomize_bn

pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 ops unavailable on this CPU/build")


@pytest.fixture(params=["native", "split"])
def strategy(request, monkeypatch):
    """Run a test with this CPU's own kernel choice, and again with the exact split kernel forced on every
    layer that could saturate without VNNI (as on an AVX2 CPU), so every machine tests both paths."""
    if request.param == "split":
        monkeypatch.setattr(dispatch.onednn, "saturates_u8s8", lambda kind="conv": kind != "depthwise")
    return request.param


def _expect_split(kind: str) -> bool:
    """Does a layer of this kernel class with 8-bit activations and weights take the split kernel here?
    (``onednn.saturates_u8s8`` is the real probe, or the forced one of the ``strategy`` fixture.)"""
    return dispatch.onednn.saturates_u8s8(kind)


def _convert(model: nn.Module, preset: str = "w8a8", shape=(4, 3, 12, 12), n: int = 3, **kw) -> tuple[nn.Module, nn.Module]:
    g = torch.Generator().manual_seed(0)
    qm = qt.prepare(randomize_bn(model).eval(), preset)
    qt.calibrate(qm, [torch.randn(*shape, generator=g) for _ in range(n)], progress=False)
    return qm, qt.convert(qm, **kw)


def _fast_and_reference(q: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        qt.set_execution(q, "fast")
        fast = q(x)
        qt.set_execution(q, "reference")
        ref = q(x)
        qt.set_execution(q, "fast")
    return fast, ref


def _code_diff(layer: nn.Module, fast: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|fast codes − reference codes| on the layer's output grid."""
    assert isinstance(fast, QuantizedActivation)
    lo, hi = fast.q_min, fast.q_max
    ref_codes = quantize(ref, layer.output_scale, layer.output_zero_point, lo, hi).to(torch.int32)
    return (fast.codes.to(torch.int32) - ref_codes).abs()


CONV_CASES = [
    dict(cin=3, cout=8, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(cin=1, cout=4, k=3, stride=1, padding=1, dilation=1, groups=1),  # C == 1: ambiguous strides
    dict(cin=8, cout=16, k=3, stride=2, padding=1, dilation=1, groups=1),
    dict(cin=8, cout=8, k=3, stride=1, padding=2, dilation=2, groups=1),
    dict(cin=8, cout=12, k=3, stride=1, padding=1, dilation=1, groups=4),
    dict(cin=8, cout=8, k=3, stride=1, padding=1, dilation=1, groups=8),  # depthwise
    dict(cin=16, cout=8, k=1, stride=1, padding=0, dilation=1, groups=1),
    dict(cin=6, cout=10, k=(3, 1), stride=(2, 1), padding=(1, 0), dilation=1, groups=2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_conv_fast_matches_reference_within_one_step(case, act, one_thread, strategy):
    torch.manual_seed(0)
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"], case["groups"])
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(case["cout"])]
    if act == "relu":
        layers.append(nn.ReLU())
    elif act == "relu6":
        layers.append(nn.ReLU6())
    _, q = _convert(nn.Sequential(*layers), shape=(4, case["cin"], 11, 13))
    layer = q[0]
    assert isinstance(layer, Int8Layer) and layer.execution == "fast" and layer.act == act
    kind = "depthwise" if 1 < case["groups"] == case["cin"] else "grouped" if case["groups"] > 1 else "conv"
    assert ("split" in dispatch.fast_status(q)["0"]) == _expect_split(kind)
    x = torch.randn(3, case["cin"], 11, 13) * 1.2
    # the model's output layer returns fp32: the same value as the reference path up to float rounding
    fast, ref = _fast_and_reference(q, x)
    assert type(fast) is torch.Tensor and fast.dtype == torch.float32 and fast.shape == ref.shape
    tol = 1e-4 * max(ref.abs().max().item(), 1.0)
    assert (fast - ref).abs().max().item() <= tol
    # as an inner layer it returns uint8 codes on its output grid: within one step of the reference
    layer.float_output = False
    dispatch.invalidate(layer)
    with torch.no_grad():
        fast = layer(x)
        layer.execution = "reference"
        ref = layer(x)
        layer.execution = "fast"
    assert isinstance(fast, QuantizedActivation) and fast.codes.dtype == torch.uint8
    assert fast.codes.is_contiguous(memory_format=torch.channels_last)
    d = _code_diff(layer, fast, ref)
    assert d.max().item() <= 1
    assert d.float().mean().item() < 1e-3  # off-by-one only at rounding ties


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("preset", ["w8a8", "w8a8-x86", "w4a8"])
def test_linear_and_chain_fast_matches_reference(act, preset, one_thread, strategy):
    torch.manual_seed(0)
    layers = [nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16)] + ([nn.ReLU()] if act else [])
    _, q = _convert(nn.Sequential(*layers), preset, shape=(16, 20))
    assert q[0].execution == "fast" and q[2].execution == "fast" and q[2].float_output
    # 7-bit (w8a8-x86) and 4-bit weights (w4a8) cannot saturate: one direct kernel call everywhere
    assert ("split" in dispatch.fast_status(q)["2"]) == (_expect_split("linear") and preset == "w8a8")
    x = torch.randn(7, 20)
    with torch.no_grad():
        inner = q[0](x)
    assert isinstance(inner, QuantizedActivation)  # int8 between layers
    fast, ref = _fast_and_reference(q, x)
    assert type(fast) is torch.Tensor
    # the inner layer's codes can differ by one step at a rounding tie: bound by one input step of the last layer
    last = q[2]
    step = float(last.input_scale) * float(last.dequantized_weight().abs().sum(1).max()) + 1e-4
    assert (fast - ref).abs().max().item() <= step


def test_dynamic_linear_uses_int8_gemm_and_matches_reference(one_thread, strategy):
    torch.manual_seed(0)
    _, q = _convert(nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8)), "w8a8-dynamic", shape=(8, 24))
    assert all(m.execution == "fast" for m in q.modules() if isinstance(m, Int8Layer))
    assert sorted(dispatch.fast_status(q)) == ["0", "2"]
    assert all(v.startswith("fast") for v in dispatch.fast_status(q).values())
    for batch in (1, 5, 33):
        x = torch.randn(batch, 24) * 3
        fast, ref = _fast_and_reference(q, x)
        assert type(fast) is torch.Tensor
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_weight_only_runs_reference_silently():
    _, q = _convert(nn.Sequential(nn.Linear(6, 4)), "w8-weight-only", shape=(5, 6))
    assert q[0].execution == "reference"  # "auto": no int8-activation kernel for weight-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qt.set_execution(q, "fast")
        x = torch.randn(3, 6)
        fast = q(x)
    qt.set_execution(q, "reference")
    assert torch.equal(fast, q(x))


class _Residual(nn.Module):
    """conv-bn-relu, conv-bn, + shortcut (identity or 1x1 conv), relu — a ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.short is None else self.short(x)
        return F.relu(out + identity)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_Residual(8, 8), _Residual(8, 16, 2), _Residual(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@pytest.mark.parametrize("fuse_adds,add_kernel", [(False, "onednn"), (False, "float"), (True, "onednn")])
def test_residual_add_fast_matches_reference(fuse_adds, add_kernel, one_thread, monkeypatch, strategy):
    # small tensors take the float-arithmetic add; force the oneDNN identity-conv add too
    monkeypatch.setattr(fast_add_module, "_ADD_KERNEL_MIN_NUMEL", 0 if add_kernel == "onednn" else 1 << 40)
    torch.manual_seed(0)
    _, q = _convert(_Net(), shape=(8, 3, 16, 16), fuse_adds=fuse_adds)
    adds = [m for m in q.modules() if isinstance(m, Int8Add)]
    assert len(adds) == 3 and all(a.execution == "fast" for a in adds)
    assert "fused_conv_add" in q.blocks[0].code if fuse_adds else "fused_conv_add" not in q.blocks[0].code
    x = torch.randn(6, 3, 16, 16)
    # one block in isolation, fed the stem's int8 output: the add's output codes within one step
    with torch.no_grad():
        h = q.stem(x)
        assert isinstance(h, QuantizedActivation)
        block = q.blocks[0]
        fast = block(h)
        qt.set_execution(block, "reference")
        ref = block(h)
        qt.set_execution(block, "fast")
    d = _code_diff(block.add_0, fast, ref)
    # the fused conv+sum skips rounding the conv output to its grid before the add: one more step at most
    assert d.max().item() <= (2 if fuse_adds else 1)
    assert d.float().mean().item() < (0.3 if fuse_adds else 1e-3)
    # end to end: the last add feeds avgpool (float), the fc returns fp32
    assert q.blocks[2].add_0.float_output and q.fc.float_output
    fast, ref = _fast_and_reference(q, x)
    assert type(fast) is torch.Tensor
    steps = ((fast - ref).abs() / float(q.fc.output_scale)).max().item()
    assert steps <= (1.5 if fuse_adds else 1.0), steps
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def test_int8_add_alone_matches_reference(one_thread):
    from qtoolkit.config import get_qconfig
    from qtoolkit.nn.quant_add import QuantAdd

    g = torch.Generator().manual_seed(0)
    for act, shape in ((None, (2, 5, 6, 7)), ("relu", (2, 5, 6, 7)), ("relu", (3, 9))):
        qa = QuantAdd(get_qconfig("w8a8"), act=act)
        a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 2
        qa(a, b)
        for fq in (qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer):
            fq.finalize()
        add = Int8Add.from_quant(qa)
        add.execution = "fast"
        fast = add(a, b)
        ref = add.forward_reference(a, b)
        assert (_code_diff(add, fast, ref)).max().item() <= 1


def _fast_int8_add(a: torch.Tensor, b: torch.Tensor) -> Int8Add:
    """A W8A8 ``Int8Add`` calibrated on ``a + b``, set to the fast execution."""
    from qtoolkit.config import get_qconfig
    from qtoolkit.nn.quant_add import QuantAdd

    qa = QuantAdd(get_qconfig("w8a8"))
    qa(a, b)
    for fq in (qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer):
        fq.finalize()
    add = Int8Add.from_quant(qa)
    add.execution = "fast"
    return add


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shapes", [((2, 50, 32), (1, 50, 32)), ((1, 9), (3, 9)), ((2, 5, 6, 7), (1, 5, 1, 7))])
def test_broadcasting_add_runs_fast_and_matches_reference(shapes, kernel, monkeypatch, one_thread):
    """One operand broadcasting over the other (ViT's ``x + pos_embedding``): fast, no fallback warning, on the
    identity-GEMM kernel and on the elementwise arithmetic, against the reference add."""
    monkeypatch.setattr(fast_add_module, "_ADD_KERNEL_MIN_NUMEL", 0 if kernel else 1 << 40)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(*shapes[0], generator=g), torch.randn(*shapes[1], generator=g) * 2 - 0.5
    add = _fast_int8_add(a, b)
    ref = add.forward_reference(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        with torch.no_grad():
            fast = add(a, b)
    assert fast.shape == ref.shape == torch.broadcast_shapes(a.shape, b.shape)
    assert _code_diff(add, fast, ref).max().item() <= 1


def test_add_where_both_operands_broadcast_falls_back_with_a_warning(one_thread):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 1, 7, generator=g), torch.randn(1, 5, 7, generator=g)
    add = _fast_int8_add(a, b)
    with pytest.warns(FastPathWarning, match="both operands broadcast"), torch.no_grad():
        y = add(a, b)
    assert torch.equal(y, add.forward_reference(a, b))


@pytest.mark.parametrize("layouts", ["cl/cl", "nchw/nchw", "cl/nchw"])
@pytest.mark.parametrize("donate", [None, 0, 1])
@pytest.mark.parametrize("act,preset,float_out", [(None, "w8a8", False), ("relu", "w8a8", False),
                                                  ("relu", "w8a8-x86", False), ("relu", "w8a8", True)])  # fmt: skip
def test_kernel_add_matches_reference(layouts, donate, act, preset, float_out, monkeypatch, one_thread):
    """The add kernels: any channel count, both memory layouts, in place or on a copy, uint8 / int8 (7-bit
    codes) / fp32 output — against the reference add on the same operand grids.  Codes outputs replay the
    fake-quant arithmetic (equal codes); the fp32 output runs the identity GEMM."""
    from qtoolkit.config import get_qconfig
    from qtoolkit.nn.quant_add import QuantAdd

    monkeypatch.setattr(fast_add_module, "_ADD_KERNEL_MIN_NUMEL", 0)
    calls = []
    real_op = onednn.op
    monkeypatch.setattr(onednn, "op", lambda *a: calls.append(a) or real_op(*a))
    real_ext = fast_add_module._ext_identity  # qtoolkit's oneDNN extension runs the same GEMM where it is built

    def ext_spy(*a):
        k = real_ext(*a)
        if k is not None:
            calls.append(("qlinear_pointwise", "binary"))
        return k

    monkeypatch.setattr(fast_add_module, "_ext_identity", ext_spy)
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 6, 8)  # 5 channels: the [-1, 16] rows cut across pixels
    qa = QuantAdd(get_qconfig(preset), act=act)
    a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 2 - 0.5
    qa(a, b)
    for fq in (qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer):
        fq.finalize()
    add = Int8Add.from_quant(qa)
    add.execution, add.fast_donate, add.float_output = "fast", donate, float_out
    st = dispatch._build_add(add)
    fmt = [torch.channels_last if f == "cl" else torch.contiguous_format for f in layouts.split("/")]
    ca = onednn.quantize_u8(a.contiguous(memory_format=fmt[0]), st.lhs_scale, st.lhs_zp, st.qmin, st.qmax)
    cb = onednn.quantize_u8(b.contiguous(memory_format=fmt[1]), st.rhs_scale, st.rhs_zp, st.qmin, st.qmax)
    A = QuantizedActivation.wrap(ca.clone(memory_format=torch.preserve_format), st.lhs_scale, st.lhs_zp, st.qmin, st.qmax)
    B = QuantizedActivation.wrap(cb.clone(memory_format=torch.preserve_format), st.rhs_scale, st.rhs_zp, st.qmin, st.qmax)
    ref = add.forward_reference(A.dequantize(), B.dequantize())
    ptr = {0: A.codes.data_ptr(), 1: B.codes.data_ptr()}
    with torch.no_grad():
        fast = add(A, B)
    assert (("qlinear_pointwise", "binary") in calls) == float_out
    if float_out:
        assert type(fast) is torch.Tensor and fast.dtype == torch.float32
        # the sum is not rounded to the output grid here: within half a step of the reference's value
        assert (fast - ref).abs().max().item() <= 0.5 * float(add.output_scale) + 1e-5
    else:  # the fake-quant model's codes, each one
        assert (_code_diff(add, fast, ref)).max().item() == 0
    in_place = donate is not None and not float_out and (layouts != "cl/nchw" or donate == 0)
    donor, kept = (A, B) if donate == 0 else (B, A)
    if in_place:
        assert donor.codes is None and fast.codes.data_ptr() == ptr[donate]  # the dead operand's memory, no copy
    else:  # nothing consumed, no operand changed
        assert A.codes is not None and B.codes is not None
        assert torch.equal(A.codes, ca) and torch.equal(B.codes, cb)
    if donate is not None and kept.codes is not None:
        assert torch.equal(kept.codes, cb if kept is B else ca)


def test_add_without_linear_sum_kernel_uses_float_arithmetic(monkeypatch, one_thread):
    """Where the in-place GEMM ``sum`` is not usable (probe False), the add still matches the reference."""
    from qtoolkit.config import get_qconfig
    from qtoolkit.nn.quant_add import QuantAdd

    assert onednn.linear_sum_in_place()  # the probe passes on this machine (the kernel add is tested above)
    monkeypatch.setattr(fast_add_module, "_ADD_KERNEL_MIN_NUMEL", 0)
    monkeypatch.setattr(onednn, "linear_sum_in_place", lambda: False)
    calls = []
    real_op = onednn.op
    monkeypatch.setattr(onednn, "op", lambda *a: calls.append(a) or real_op(*a))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    qa = QuantAdd(get_qconfig("w8a8"), act="relu")
    qa(a, b)
    for fq in (qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer):
        fq.finalize()
    add = Int8Add.from_quant(qa)
    add.execution = "fast"
    with torch.no_grad():
        fast = add(a, b)
    assert calls == []
    assert _code_diff(add, fast, add.forward_reference(a, b)).max().item() <= 1


def test_resnet20_end_to_end(one_thread, strategy):
    from recipes.models import resnet20

    torch.manual_seed(0)
    _, q = _convert(resnet20(), shape=(16, 3, 32, 32), n=2)
    assert all(m.execution == "fast" for m in q.modules() if isinstance(m, (Int8Layer, Int8Add)))
    x = torch.randn(16, 3, 32, 32)
    fast, ref = _fast_and_reference(q, x)
    d = (fast - ref).abs() / float(q.fc.output_scale)
    # 19 layers: a rare one-code tie in an early layer propagates (per layer, ~1e-5 of the codes differ by
    # one step, scripts/check_zoo.py's per-layer column); on this random-init net a few logits land a little
    # over one step away (97.5% within one step with the split kernel, 99%+ direct; the integer-only path is
    # ~2 steps from the reference here).  A saturating kernel is tens of steps off.
    assert d.max().item() <= 2.0
    assert (d <= 1.0).float().mean().item() >= 0.95
    assert (fast.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.9


def test_no_torch_warnings_during_convert_and_forward(one_thread):
    from recipes.models import resnet20

    torch.manual_seed(0)
    qm = qt.prepare(resnet20().eval(), "w8a8")
    qt.calibrate(qm, [torch.randn(4, 3, 32, 32)], progress=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = qt.convert(qm)
        with torch.no_grad():
            q(torch.randn(2, 3, 32, 32))
            q(torch.randn(4, 3, 32, 32))  # layer1's adds reach the identity-GEMM kernel (>= 65536 elements)
        q(torch.randn(1, 3, 32, 32))  # grad mode on too
        with torch.inference_mode():
            q(torch.randn(2, 3, 32, 32))
    # exact on every CPU (the split kernel where u8*s8 saturates): nothing to warn about, on any ISA
    assert not [f"{w.category.__name__}: {w.message} ({w.filename})" for w in rec]


def test_fallback_when_kernels_unavailable_warns_once(monkeypatch):
    torch.manual_seed(0)
    _, q = _convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    x = torch.randn(2, 3, 12, 12)
    qt.set_execution(q, "reference")
    with torch.no_grad():
        ref = q(x)
    monkeypatch.setattr(dispatch.onednn, "is_available", lambda: False)
    assert not dispatch.supports_fast(q[0])
    qt.set_execution(q, "fast")
    with pytest.warns(FastPathWarning, match="int8 fast path unavailable") as rec:
        with torch.no_grad():
            out = q(x)
    assert sorted(str(w.message).split(":")[0] for w in rec) == ["0", "2"]  # each layer named once
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(q(x), ref)  # once only
    assert dispatch.fast_status(q)["0"].startswith("reference (")


def test_fallback_for_unsupported_layer_kind():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    qm = qt.prepare(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU()).eval())
    qt.calibrate(qm, [torch.randn(2, 3, 10, generator=g)], progress=False)
    q = qt.convert(qm)
    assert q[0].execution == "reference"  # "auto" keeps unsupported layers on the reference path, silently
    x = torch.randn(2, 3, 10)
    ref = q(x)
    qt.set_execution(q, "fast")
    with pytest.warns(FastPathWarning, match="conv1d"):
        assert torch.equal(q(x), ref)


def test_strategy_per_layer_where_u8s8_saturates(monkeypatch):
    """Without VNNI: 8-bit activations x 8-bit weights take the exact split kernel, silently; 7-bit activations
    (2 * 127 * 127 <= 32767), 4-bit weights and depthwise convs (a kernel that does not saturate) run direct."""
    monkeypatch.setattr(dispatch.onednn, "saturates_u8s8", lambda kind="conv": kind != "depthwise")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, q = _convert(copy.deepcopy(net))
        _, q7 = _convert(copy.deepcopy(net), "w8a8-x86")
        _, q4 = _convert(copy.deepcopy(net), "w4a8")
    st = dispatch.fast_status(q)
    assert "split" in st["0"] and st["2"] == "fast" and "split" in st["4"]
    assert set(dispatch.fast_status(q7).values()) == {"fast"} and q7[0].act_qmax == 127
    assert set(dispatch.fast_status(q4).values()) == {"fast"}
    # the split state: weight repeated per half, kernel zero point 0 (folded into the bias)
    s0 = dispatch._get_state(q[0])
    assert s0.packed.shape[1] == 2 * 3 and s0.strategy == "split"


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_split_kernel_with_input_zero_point_and_padding(padding, mode, monkeypatch, one_thread):
    """Split kernel, asymmetric input (zero point ~128, the halves cannot share it): the correction is in the
    bias and padding holds the zero point's code — against the reference, for conv and linear."""
    monkeypatch.setattr(dispatch.onednn, "saturates_u8s8", lambda kind="conv": kind != "depthwise")
    torch.manual_seed(0)
    preset = "w8a8" if mode == "static" else "w8a8-dynamic"
    _, q = _convert(nn.Sequential(nn.Conv2d(5, 6, 3, padding=padding)), preset, shape=(4, 5, 9, 9))
    _, ql = _convert(nn.Sequential(nn.Linear(30, 7)), preset, shape=(4, 30))
    assert "split" in dispatch.fast_status(q)["0"] and "split" in dispatch.fast_status(ql)["0"]
    if mode == "static":
        assert int(q[0].input_zero_point) not in (0,) and dispatch._get_state(q[0]).pad == ([1, 1] if padding else None)
    for model, x in ((q, torch.randn(3, 5, 9, 9) + 0.3), (ql, torch.randn(6, 30) + 0.3)):
        fast, ref = _fast_and_reference(model, x)
        assert (fast - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_seven_bit_activations_use_the_int8_output_clamp(one_thread):
    torch.manual_seed(0)
    _, q = _convert(_Net(), "w8a8-x86", shape=(8, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16) * 3
    with torch.no_grad():
        h = q.stem(x)
    assert isinstance(h, QuantizedActivation) and h.q_max == 127 and int(h.codes.max()) <= 127
    fast, ref = _fast_and_reference(q, x)
    assert ((fast - ref).abs() / float(q.fc.output_scale)).max().item() <= 1.0


def test_state_dict_roundtrip_of_fast_model(tmp_path, one_thread):
    torch.manual_seed(0)
    qm, q = _convert(_Net(), shape=(8, 3, 16, 16))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        y = q(x)  # prepacked state exists now; it must not leak into the state_dict
    sd = q.state_dict()
    assert all(isinstance(t, torch.Tensor) and not t.is_mkldnn for t in sd.values())
    path = tmp_path / "q.pt"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    skeleton = qt.convert(qt.prepare(_Net().eval()), allow_uncalibrated=True)
    skeleton.load_state_dict(loaded)
    for k, v in q.state_dict().items():
        assert torch.equal(v, skeleton.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(skeleton(x), y)
    # deepcopy / pickle drop the prepacked weights; they are rebuilt on the next call
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        with torch.no_grad():
            assert torch.equal(clone(x), y)


def test_quantized_activation_behaves_like_its_float_value():
    codes = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    qa = QuantizedActivation.wrap(codes, 0.05, 7)
    ref = (codes.float() - 7) * 0.05
    assert isinstance(qa, torch.Tensor)
    assert qa.shape == (2, 3, 4, 5) and qa.dim() == 4 and qa.size(1) == 3 and qa.numel() == 120 and len(qa) == 2
    assert qa.dtype == torch.float32 and qa.is_floating_point() and qa.device.type == "cpu"
    assert torch.equal(qa.dequantize(), ref)
    for out in (F.adaptive_avg_pool2d(qa, 1), torch.flatten(qa, 1), qa + 1, qa.relu(), qa[0]):
        assert type(out) is torch.Tensor and out.dtype == torch.float32
    assert torch.equal(F.adaptive_avg_pool2d(qa, 1), F.adaptive_avg_pool2d(ref, 1))
    assert "QuantizedActivation(scale=0.05" in repr(qa)
    buf = io.BytesIO()
    torch.save(qa, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), ref)
    with pytest.warns(RuntimeWarning, match="in-place"):
        out = qa.add_(1)
    assert torch.equal(out, ref + 1) and torch.equal(qa.codes, codes)


def test_reference_and_integer_paths_accept_the_carrier():
    torch.manual_seed(0)
    _, q = _convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        h = q[0](x)
        assert isinstance(h, QuantizedActivation)
        for ex in ("reference", "integer"):
            q[2].execution = ex
            assert torch.equal(q[2](h), q[2](h.dequantize()))
    with pytest.raises(TypeError, match="floating-point"):
        q[2].execution = "fast"
        q[2](torch.zeros(2, 4, 10, 10, dtype=torch.int64))


def test_add_overwrites_only_a_dead_operand_and_says_so(monkeypatch, one_thread):
    monkeypatch.setattr(fast_add_module, "_ADD_KERNEL_MIN_NUMEL", 0)
    torch.manual_seed(0)
    _, q = _convert(_Net(), shape=(8, 3, 16, 16))
    block = q.blocks[1]  # conv2 -> add (lhs, single user: donated); shortcut conv -> add (rhs)
    assert block.add_0.fast_donate == 0 and q.blocks[0].add_0.fast_donate == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = q.blocks[0](q.stem(x))
        before = h.codes.clone()
        y1 = block(h)
        assert torch.equal(h.codes, before)  # the block input (a graph input) is never overwritten
        kept = []
        block.conv2.register_forward_hook(lambda m, i, o: kept.append(o))
        y2 = block(h)
    assert torch.equal(y1.codes, y2.codes)
    with pytest.raises(RuntimeError, match="consumed in place by 'blocks.1.add_0'"):
        kept[0].dequantize()
    with pytest.raises(RuntimeError, match="consumed in place"):
        kept[0] + 1


class _NHWCLinear(nn.Module):
    """ConvNeXt's pattern: a Linear over the channels of a permuted (N, H, W, C) activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_linear_on_a_4d_channels_last_activation(one_thread, strategy):
    torch.manual_seed(0)
    _, q = _convert(_NHWCLinear(), shape=(4, 3, 7, 9))
    assert q.fc.execution == "fast"
    x = torch.randn(3, 3, 7, 9)
    fast, ref = _fast_and_reference(q, x)
    assert fast.shape == ref.shape == (3, 6, 7, 9)
    step = float(q.fc.input_scale) * float(q.fc.dequantized_weight().abs().sum(1).max()) + 1e-4
    assert (fast - ref).abs().max().item() <= step  # the conv's codes may differ by one at a tie

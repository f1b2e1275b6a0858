"""Quantized functional ops (cat / mul / matmul), standalone BatchNorm as a depthwise conv, and int8 attention:
found in unmodified models, fake quant against torch's reference ops, converted (reference / integer) against
the fake-quant model, ONNX Runtime against the fake-quant model."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit as qt
from qtoolkit.nn import (
    Int8Activation,
    Int8Cat,
    Int8MatMul,
    Int8Mul,
    QuantActivation,
    QuantCat,
    QuantLayer,
    QuantMatMul,
    QuantMul,
    QuantMultiheadAttention,
)
from tests.conftest import randomize_bn


def _fq(x, fq):
    """torch's own per-tensor fake quantization with the quantizer's qparams (the oracle)."""
    return torch.fake_quantize_per_tensor_affine(x, float(fq.scale), int(fq.zero_point), fq.qmin, fq.qmax)


class Net(nn.Module):
    """A cat (two branches), a squeeze-excitation mul, a matmul, shape arithmetic and a constant scale."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = y * self.se(y)
        n = y.shape[0] * 1  # size arithmetic: not a tensor product
        t = y.flatten(2).transpose(1, 2)  # [N, HW, 8]
        att = torch.matmul(self.q(t), self.k(t).transpose(1, 2)) * 0.5  # constant scale stays float
        z = torch.bmm(att.softmax(-1), t).mean(1)
        return self.head(z).reshape(n, -1)


def _ort_output(qm, x, path):
    """Export ``qm`` (target "vnni") and run it in ONNX Runtime without graph optimizations: (output, report)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from qtoolkit.export import export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # e.g. torchvision's shape asserts in ViT.forward
        report = export_onnx(qm, x, path, target="vnni")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0], report


def _sqnr(x, ref):
    """SQNR of ``x`` against ``ref`` in dB."""
    return 10 * math.log10(ref.double().square().sum().item() / (x.double() - ref.double()).square().sum().item())


def _calibrated(model, shape=(4, 3, 8, 8), n=3):
    torch.manual_seed(0)
    data = [torch.randn(*shape) for _ in range(n)]
    return qt.calibrate(qt.prepare(model, "w8a8"), data, progress=False), data


def test_ops_are_found_quantized_and_keep_the_float_function():
    torch.manual_seed(0)
    model = Net().eval()
    qm = qt.prepare(model, "w8a8")
    kinds = [type(m) for m in qm.modules()]
    assert kinds.count(QuantCat) == 1 and kinds.count(QuantMul) == 1 and kinds.count(QuantMatMul) == 2
    # the sigmoid is a lookup table; nothing left float but the softmax (reported); the constant scale and the
    # size arithmetic need nothing
    assert kinds.count(QuantActivation) == 1 and [op.op for op in qt.float_ops(qm)] == ["softmax"]
    x = torch.randn(2, 3, 8, 8)
    with qt.fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=0, atol=1e-6)


def test_cat_shares_one_grid_whose_range_is_the_union():
    from torch.ao.quantization.observer import MinMaxObserver  # oracle only

    cat = QuantCat(qt.get_qconfig("w8a8"), dim=1)
    a, b = torch.rand(2, 3) - 0.2, 3 * torch.rand(2, 5)
    cat([a, b])
    cat.input_quantizer.finalize()
    oracle = MinMaxObserver(dtype=torch.quint8)
    oracle(torch.cat([a, b], 1))
    s, z = oracle.calculate_qparams()
    assert torch.allclose(cat.input_quantizer.scale, s) and int(cat.input_quantizer.zero_point) == int(z)
    cat.input_quantizer.enable_observer(False)
    y = cat([a, b])
    assert torch.equal(y, torch.cat([_fq(a, cat.input_quantizer), _fq(b, cat.input_quantizer)], 1))
    m = Int8Cat.from_quant(cat)
    assert torch.equal(m([a, b]), y)
    m.execution = "integer"
    assert torch.equal(m([a, b]), y)  # codes concatenated: the same values


@pytest.mark.parametrize("cls, twin, shapes", [
    (QuantMul, Int8Mul, ((2, 8, 4, 4), (2, 8, 1, 1))),
    (QuantMatMul, Int8MatMul, ((2, 3, 5, 16), (2, 3, 16, 7))),
])
def test_binary_ops_fake_quant_reference_and_integer(cls, twin, shapes):
    torch.manual_seed(0)
    op = cls(qt.get_qconfig("w8a8"))
    a, b = torch.randn(*shapes[0]), torch.rand(*shapes[1])
    y = op(a, b)
    for fq in (op.lhs_quantizer, op.rhs_quantizer, op.output_quantizer):
        fq.finalize()
        fq.enable_observer(False)
    y = op(a, b)
    ref = cls.op(_fq(a, op.lhs_quantizer).double(), _fq(b, op.rhs_quantizer).double())  # float64 oracle
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    m = twin.from_quant(op)
    assert torch.equal(m(a, b), y)  # reference execution: the fake-quant numbers
    m.execution = "integer"
    torch.testing.assert_close(m(a, b).double(), ref, rtol=0, atol=1e-5)  # exact integer accumulation
    step = float(op.output_quantizer.scale)
    assert (m.requantized(a, b) - y).abs().max() <= 0.5 * step + 1e-6  # one rounding to the output grid


def test_converted_model_matches_fake_quant_and_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    qm, data = _calibrated(Net().eval())
    x = data[0]
    with torch.no_grad():
        fq = qm(x)
    q = qt.convert(qm)
    assert {type(m) for m in q.modules()} >= {Int8Cat, Int8Mul, Int8MatMul, Int8Activation}
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.equal(q(x), fq)
    out, report = _ort_output(qm, x, tmp_path / "ops.onnx")
    assert len(report.quantized_ops) == 5
    assert np.abs(out - fq.numpy()).max() <= float(qm.head.output_quantizer.scale) + 1e-6


def test_standalone_batchnorm_becomes_an_exact_depthwise_conv():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.MaxPool2d(2), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.Conv2d(6, 4, 1))).eval()
    qm = qt.prepare(model, "w8a8")
    dw = qm[2].layer if hasattr(qm[2], "layer") else qm[2]
    assert isinstance(dw, QuantLayer) and dw.groups == 6 and dw.act == "relu" and isinstance(qm[3], nn.Identity)
    assert qt.float_ops(qm) == []
    x = torch.randn(2, 3, 10, 10)
    with qt.fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=0, atol=1e-5)
    bn = model[2]
    gamma_over_sigma = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    dw.calibrate_weight()
    wq = dw.weight_quantizer(dw.weight.detach()).reshape(-1)
    torch.testing.assert_close(wq, gamma_over_sigma, rtol=1e-6, atol=0)  # one value per channel: exact
    qat = qt.prepare(model, "w8a8", qat=True)  # QAT keeps a live BatchNorm (reported float)
    assert any(op.op == "BatchNorm2d" for op in qt.float_ops(qat))


@pytest.mark.parametrize("batch_first", [True, False])
def test_quant_attention_equals_float_attention_without_quantization(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10).eval()
    q = QuantMultiheadAttention(mha, qt.get_qconfig("w8a8"))
    L, S, B = 5, 7, 3
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    query, key, value = torch.randn(*shape(L, 16)), torch.randn(*shape(S, 12)), torch.randn(*shape(S, 10))
    masks = [
        {},
        {"attn_mask": torch.rand(L, S) > 0.8},
        {"attn_mask": torch.randn(L, S), "key_padding_mask": torch.tensor([[0.0] * (S - 1) + [float("-inf")]] * B)},
        {"need_weights": True, "average_attn_weights": False},
    ]
    with qt.fake_quant_disabled(q), torch.no_grad():
        for kw in masks:
            got, w = q(query, key, value, **kw)
            ref, rw = mha(query, key, value, **kw)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(w, rw, rtol=0, atol=1e-6)
        unb = mha(query[0] if batch_first else query[:, 0], key[0] if batch_first else key[:, 0],
                  value[0] if batch_first else value[:, 0])[0]
        got = q(query[0] if batch_first else query[:, 0], key[0] if batch_first else key[:, 0],
                value[0] if batch_first else value[:, 0])[0]
        torch.testing.assert_close(got, unb, rtol=0, atol=1e-5)


def test_vit_attention_matmuls_run_in_int8(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    qm, data = _calibrated(model, (4, 3, 16, 16))
    assert sum(isinstance(m, QuantMultiheadAttention) for m in qm.modules()) == 2
    assert not [op for op in qt.float_ops(qm) if op.op in ("MultiheadAttention", "forward")]
    x = data[0]
    with torch.no_grad():
        fq = qm(x)
    q = qt.convert(qm)
    assert sum(isinstance(m, Int8MatMul) for m in q.modules()) == 4  # q@kᵀ and attn@v in both layers
    for ex in ("reference", "integer", "fast"):
        qt.set_execution(q, ex)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # fast-path fallbacks are reported elsewhere
            out = q(x)
        if ex == "reference":
            assert torch.equal(out, fq)
        else:
            assert 10 * torch.log10(fq.pow(2).sum() / (out - fq).pow(2).sum()) > 25  # SQNR vs fake quant, dB
    out, _ = _ort_output(qm, x, tmp_path / "vit.onnx")
    np.testing.assert_allclose(out, fq.numpy(), rtol=0, atol=1e-4)


def test_constant_products_are_not_lifted_and_in_place_products_keep_their_value():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.c(x)
            y = y * 2.0  # a constant: nothing to quantize
            z = F.relu(y)
            z *= y  # torch.fx records ``z = z * y``: a tensor product, lifted
            return z

    model = M().eval()
    qm = qt.prepare(model, "w8a8")
    assert sum(isinstance(m, QuantMul) for m in qm.modules()) == 1
    x = torch.randn(2, 3, 4, 4)
    with qt.fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [nn.Hardswish(), nn.Hardsigmoid(), nn.SiLU(), nn.GELU(approximate="tanh"), nn.Sigmoid(),
                                    nn.Tanh(), nn.LeakyReLU(0.2)], ids=lambda m: type(m).__name__)
def test_lookup_table_activation_matches_torch_and_onnx(module, tmp_path):
    """Fake quant = torch's per-tensor fake quant around the float activation; the integer table lookup is
    bit-identical to it; ONNX Runtime runs the Q/DQ graph to the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), module, nn.Conv2d(4, 2, 1)).eval()
    qm, data = _calibrated(model, (4, 3, 8, 8))
    act = qm[1]
    assert isinstance(act, QuantActivation) and qt.float_ops(qm) == []
    x = data[0]
    with torch.no_grad():
        h = qm[0](x)
        want = _fq(module(_fq(h, act.input_quantizer)), act.output_quantizer)
        assert torch.equal(act(h), want)
        fq = qm(x)
    q = qt.convert(qm)
    for ex in ("reference", "integer"):
        qt.set_execution(q, ex)
        with torch.no_grad():
            assert torch.equal(q[1](h), want), ex
    out, _ = _ort_output(qm, x, tmp_path / "act.onnx")
    assert np.abs(out - fq.numpy()).max() <= float(qm[2].output_quantizer.scale) + 1e-6


def _swin_to_int8(model, twin):
    """A tiny torchvision Swin through prepare (every attention swapped for ``twin``; float when fake quant is
    off), calibrate and convert (both attention matmuls of each block in int8; the reference execution equals
    fake quant). Returns ``(prepared, converted, x, fake-quant output on x)``."""
    qm = qt.prepare(model, "w8a8")
    assert sum(type(m) is twin for m in qm.modules()) == 4
    x = torch.randn(2, 3, 36, 36)  # 9x9 tokens: padded windows, shifted and unshifted blocks
    with qt.fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=0, atol=1e-5)
    qt.calibrate(qm, [torch.randn(2, 3, 36, 36) for _ in range(2)] + [x], progress=False)
    with torch.no_grad():
        fq = qm(x)
    q = qt.convert(qm)
    assert sum(isinstance(m, Int8MatMul) for m in q.modules()) == 8
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.equal(q(x), fq)
    return qm, q, x, fq


def test_swin_window_attention_runs_in_int8(tmp_path, one_thread):
    from torchvision.models.swin_transformer import SwinTransformer

    from qtoolkit.nn import QuantShiftedWindowAttention

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=5).eval()
    qm, _, x, fq = _swin_to_int8(model, QuantShiftedWindowAttention)
    out, _ = _ort_output(qm, x, tmp_path / "swin.onnx")
    np.testing.assert_allclose(out, fq.numpy(), rtol=0, atol=1e-4)


def _swin_v2_attention(shift, seed=0):
    """torchvision's V2 attention with every float part random: a nonzero key bias (torchvision's forward must
    ignore it), one head's logit scale above the log(100) clamp, and a non-trivial ``cpb_mlp``."""
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    torch.manual_seed(seed)
    f = ShiftedWindowAttentionV2(16, [4, 4], shift, num_heads=2).eval()
    with torch.no_grad():
        f.qkv.bias.normal_()
        f.logit_scale.copy_(torch.tensor([math.log(150.0), 0.5]).view(2, 1, 1))
        for p in f.cpb_mlp.parameters():
            p.normal_(0, 0.5)
    return f


@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
@pytest.mark.parametrize("hw", [(7, 9), (10, 6)])
def test_swin_v2_window_attention_matches_torchvision(shift, hw, one_thread):
    from qtoolkit.nn import QuantShiftedWindowAttentionV2

    f = _swin_v2_attention(shift)
    q = QuantShiftedWindowAttentionV2(f, qt.get_qconfig("w8a8"))
    x = torch.randn(2, *hw, 16)  # not whole windows: padded
    with qt.fake_quant_disabled(q), torch.no_grad():
        want = f(x)
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5)
        q.qkv.bias[16:32] = 1.0  # the key bias is what the twin zeroed: a nonzero one changes the output
        assert (q(x) - want).abs().max() > 1e-3
    q.qkv.bias.data[16:32] = 0
    qt.calibrate(q, [x], progress=False)
    for fq in (q.scores.lhs_quantizer, q.scores.rhs_quantizer):  # cosine attention: the grid spans [-1, 1]
        scale, zp = float(fq.scale), int(fq.zero_point)
        lo, hi = (fq.qmin - zp) * scale, (fq.qmax - zp) * scale
        assert -1 - scale <= lo < -0.5 and 0.5 < hi <= 1 + scale
    with torch.no_grad():
        fq_out = q(x)
    assert _sqnr(fq_out, want) >= 25


def test_swin_v2_window_attention_runs_in_int8(tmp_path, one_thread):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    from qtoolkit.nn import QuantShiftedWindowAttentionV2

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    with torch.no_grad():  # torchvision zeroes these at init; the twin must still ignore the key part
        for m in model.modules():
            if type(m).__name__ == "ShiftedWindowAttentionV2":
                m.qkv.bias.normal_(0, 0.1)
    qm, q, x, fq = _swin_to_int8(model, QuantShiftedWindowAttentionV2)
    assert not any(type(m).__name__ == "ShiftedWindowAttentionV2" for m in qm.modules())
    for ex in ("integer", "fast"):  # fast: the padding tokens' keys, ~0 from an int8 kernel, must not normalize
        with warnings.catch_warnings():  # to unit vectors (a CPU without oneDNN int8 runs the reference, warned)
            warnings.simplefilter("ignore", RuntimeWarning)
            qt.set_execution(q, ex)
            with torch.no_grad():
                assert _sqnr(q(x), fq) >= 30, ex
    # V2 blocks LayerNorm the attention output before the residual add: ONNX Runtime's float LayerNorm can flip a
    # rounding tie of the add's input against torch's (seed 0: 50 dB, off by up to 5e-4), so the whole model is held
    # to the SQNR bar; the attention alone exports exactly (next test)
    out, _ = _ort_output(qm, x, tmp_path / "swin_v2.onnx")
    assert _sqnr(torch.from_numpy(out), fq) >= 30


def test_swin_v2_window_attention_exports_exactly(tmp_path, one_thread):
    from qtoolkit.nn import QuantShiftedWindowAttentionV2

    q = QuantShiftedWindowAttentionV2(_swin_v2_attention([2, 2]), qt.get_qconfig("w8a8")).eval()
    x = torch.randn(2, 7, 9, 16)
    qt.calibrate(q, [x, torch.randn(2, 7, 9, 16)], progress=False)
    with torch.no_grad():
        fq = q(x)
    out, _ = _ort_output(q, x, tmp_path / "swin_v2_attention.onnx")
    np.testing.assert_allclose(out, fq.numpy(), rtol=0, atol=1e-5)


def test_swin_v2_key_bias_stays_zero_in_qat(one_thread):
    import copy

    from qtoolkit.nn import QuantShiftedWindowAttentionV2

    q = copy.deepcopy(QuantShiftedWindowAttentionV2(_swin_v2_attention([2, 2]), qt.get_qconfig("w8a8"), qat=True))
    q.train()  # a deep copy drops tensor hooks: the forward registers its own
    opt = torch.optim.AdamW(q.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        q(torch.randn(2, 8, 8, 16)).square().mean().backward()
        assert q.qkv.bias.grad[16:32].abs().max() == 0 and q.qkv.bias.grad[:16].abs().max() > 0
        opt.step()
    assert q.qkv.bias[16:32].abs().max() == 0


def test_einsum_is_lifted_quantized_and_converted():
    from qtoolkit.nn import Int8Einsum, QuantEinsum

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.einsum("bid,bjd->bij", self.q(x), self.k(x)).softmax(-1)

    torch.manual_seed(0)
    model = M().eval()
    qm, data = _calibrated(model, (2, 5, 8))
    op = next(m for m in qm.modules() if isinstance(m, QuantEinsum))
    x = data[0]
    a, b = model.q(x), model.k(x)
    with torch.no_grad():
        want = torch.einsum("bid,bjd->bij", _fq(a, op.lhs_quantizer).double(), _fq(b, op.rhs_quantizer).double())
        torch.testing.assert_close(op(a, b).double(), want, rtol=0, atol=1e-5)
        fq = qm(x)
    q = qt.convert(qm)
    conv = next(m for m in q.modules() if isinstance(m, Int8Einsum))
    for ex in ("reference", "integer"):
        qt.set_execution(q, ex)
        with torch.no_grad():
            torch.testing.assert_close(conv(a, b).double(), want, rtol=0, atol=1e-5)
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.equal(q(x), fq)


def test_layernorm_stays_float_by_default_and_quantizes_on_request(tmp_path):
    from qtoolkit.nn import Int8Norm, QuantNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    qm = qt.prepare(model, "w8a8")
    (op,) = qt.float_ops(qm)
    assert op.op == "LayerNorm" and "overrides={nn.LayerNorm: 'w8a8'}" in op.reason
    data = [torch.randn(4, 6) for _ in range(3)]
    qm = qt.calibrate(qt.prepare(model, "w8a8", overrides={nn.LayerNorm: "w8a8"}), data, progress=False)
    norm = qm[1]
    assert isinstance(norm, QuantNorm) and qt.float_ops(qm) == []
    x = data[0]
    with torch.no_grad():
        h = qm[0](x)
        want = _fq(model[1](_fq(h, norm.input_quantizer)), norm.output_quantizer)
        assert torch.equal(norm(h), want)
        fq = qm(x)
    q = qt.convert(qm)
    assert isinstance(q[1], Int8Norm)
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.equal(q(x), fq)
    out, _ = _ort_output(qm, x, tmp_path / "ln.onnx")
    assert np.abs(out - fq.numpy()).max() <= float(qm[2].output_quantizer.scale) + 1e-6


def test_lookup_table_fast_execution_takes_and_passes_int8_codes():
    from qtoolkit.kernels import onednn
    from qtoolkit.kernels.qtensor import QuantizedActivation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 4, 1), nn.SiLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    qm, data = _calibrated(model)
    x = data[0]
    q = qt.convert(qm)
    act = q[1]
    assert isinstance(act, Int8Activation) and act.supports_fast()
    with torch.no_grad():
        h = qm[0](x)
        act.execution = "reference"
        ref = act(h)
        act.execution = "fast"
        fast = act(h)  # a float input: quantized, looked up, returned as codes
        assert type(fast) is QuantizedActivation and torch.equal(fast.dequantize(), ref)
    seen = []
    act.register_forward_pre_hook(lambda m, a: seen.append(type(a[0])))
    qt.set_execution(q, "reference")
    with torch.no_grad():
        out_ref = q(x)
    qt.set_execution(q, "fast")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_fast = q(x)
    if onednn.is_available():
        assert seen[-1] is QuantizedActivation  # the conv handed its codes over, no float round trip
    assert type(out_fast) is torch.Tensor
    assert (out_fast - out_ref).abs().max() <= 2 * float(qm[-1].output_quantizer.scale) + 1e-6

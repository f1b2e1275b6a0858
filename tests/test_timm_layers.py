"""timm's layer idioms through prepare -> calibrate -> convert, against float / float64 references.

Most tests use small stand-ins with timm's shapes (the library recognizes them by duck typing and never imports
timm); the last ones build real timm models when timm is installed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit as qt
from qtoolkit.fuse import fuse_model
from qtoolkit.nn import Int8Layer, Int8MatMul, QuantActivation, QuantLayer, QuantMatMul
from qtoolkit.nn.fused import FusedLayer, PadSame
from qtoolkit.nn.quant_attention import QuantScaledDotProductAttention
from qtoolkit.toggles import fake_quant_disabled


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's shape: a BatchNorm2d subclass with ``drop`` and ``act`` children."""

    def __init__(self, c: int, act: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: not a Sequential, traced one level."""

    def __init__(self, cin: int, cout: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(cout, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _bn_stats(m: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.5, 0.5, generator=g)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(*shape, generator=g))
    return m.eval()


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((out - ref).pow(2).sum().item(), 1e-30))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(inplace=True), nn.Hardswish(), nn.Identity()])
def test_batchnormact_folds_into_conv(act: nn.Module) -> None:
    m = _bn_stats(nn.Sequential(ConvNormAct(3, 8, act), nn.Conv2d(8, 4, 1), BatchNormAct2d(4, nn.GELU())), (8, 3, 12, 12))
    x = torch.randn(4, 3, 12, 12)
    fused, report = fuse_model(m)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=1e-5)
    qm = qt.prepare(m, "w8a8")
    assert qt.float_ops(qm) == []
    layers = [q for q in qm.modules() if isinstance(q, QuantLayer)]
    assert len(layers) == 2 and all(q.bn is None for q in layers)  # both BNs folded (PTQ)
    assert layers[0].act == ("relu" if isinstance(act, nn.ReLU) else None)
    n_tables = sum(isinstance(q, QuantActivation) for q in qm.modules())
    assert n_tables == (1 if isinstance(act, (nn.ReLU, nn.Identity)) else 2)  # GELU of the second, SiLU/hardswish
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    qt.calibrate(qm, [x], progress=False)
    q = qt.convert(qm)
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert _sqnr(m(x), q(x)) > 25


def test_standalone_batchnormact_is_a_depthwise_conv() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.norm = BatchNormAct2d(6, nn.SiLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(torch.cat([y, y], 1)[:, :6])

    m = _bn_stats(Block(), (8, 3, 10, 10))
    x = torch.randn(2, 3, 10, 10)
    qm = qt.prepare(m, "w8a8")
    assert [type(q).__name__ for q in qm.norm] == ["QuantLayer", "QuantActivation"]
    assert qm.norm[0].groups == 6 and qt.float_ops(qm) == []
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


class Attention(nn.Module):
    """timm's ViT attention: qkv Linear, unbind, F.scaled_dot_product_attention, proj."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def _fq(t: torch.Tensor, fq: nn.Module) -> torch.Tensor:
    """torch's reference fake-quant op with a calibrated quantizer's qparams, in float64."""
    return torch.fake_quantize_per_tensor_affine(t.float(), float(fq.scale), int(fq.zero_point), fq.spec.qmin, fq.spec.qmax).double()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_int8_matmuls_against_reference_ops(causal: bool) -> None:
    torch.manual_seed(0)
    m = Attention().eval()
    x = torch.randn(3, 5, 16)
    qm = qt.prepare(m, "w8a8")
    assert qt.float_ops(qm) == []
    sdpa = [s for s in qm.modules() if isinstance(s, QuantScaledDotProductAttention)]
    assert len(sdpa) == 1
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x, is_causal=causal), m(x, is_causal=causal), atol=1e-5, rtol=1e-5)
    qt.calibrate(qm, [x], progress=False)
    s = sdpa[0]
    q, k, v = torch.randn(3, 2, 2, 5, 8, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        out = s(q.float(), k.float(), v.float(), None, causal).double()
        scores = _fq(q, s.scores.lhs_quantizer) @ _fq(k.transpose(-2, -1), s.scores.rhs_quantizer)
        scores = scores / math.sqrt(8)  # the output quantizers only observe (the range an engine requantizes to)
        if causal:
            scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        ref = _fq(torch.softmax(scores, -1), s.context.lhs_quantizer) @ _fq(v, s.context.rhs_quantizer)
    assert _sqnr(ref, out) > 40  # same function up to float32 rounding at the odd tie
    conv = qt.convert(qm)
    assert sum(isinstance(mm, Int8MatMul) for mm in conv.modules()) == 2
    qt.set_execution(conv, "reference")
    with torch.no_grad():
        torch.testing.assert_close(conv(x), qm(x), atol=1e-5, rtol=1e-5)


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over tokens."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


@pytest.mark.parametrize("qat", [False, True])
def test_linear_batchnorm1d_over_tokens_folds(qat: bool) -> None:
    m = _bn_stats(nn.Sequential(LinearNorm(8, 12), nn.Hardswish(), LinearNorm(12, 4)), (4, 7, 8))
    x = torch.randn(2, 7, 8)
    fused, _ = fuse_model(m)
    assert isinstance(fused[0].linear, FusedLayer)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=1e-5)
    qm = qt.prepare(m, "w8a8", qat=qat).eval()
    assert not [f for f in qt.float_ops(qm) if "BatchNorm" in f.op]
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


def test_converted_layers_keep_float_attributes() -> None:
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(4 * 17 * 17, 3))
    x = torch.randn(2, 4, 10, 10)
    q = qt.convert(qt.calibrate(qt.prepare(m), [x], progress=False))
    for i in (0, 1, 3):
        layer = q[i]
        assert isinstance(layer, Int8Layer) and layer.weight.shape == m[i].weight.shape and not layer.weight.requires_grad
        step = layer.weight_scale.max().item()
        assert (layer.weight - m[i].weight.detach()).abs().max().item() <= step / 2 + 1e-6  # dequantized, float layout
        torch.testing.assert_close(layer.bias, m[i].bias.detach())
        with pytest.raises(AttributeError):
            layer.weight = torch.zeros(1)
    assert (q[0].in_channels, q[0].out_channels, q[3].in_features, q[3].out_features) == (4, 6, 4 * 17 * 17, 3)


def test_untraceable_forward_is_named_and_its_batchnorms_quantized() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = BatchNormAct2d(4, nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow
                y = y + 1
            return self.bn(y)

    m = _bn_stats(Branchy(), (4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    qm = qt.prepare(m)
    ops = qt.float_ops(qm)
    assert len(ops) == 1 and ops[0].where == "<model>" and ops[0].op == "forward"
    assert "not traceable" in ops[0].reason and "BatchNorms not folded into their layers: bn" in ops[0].reason
    assert isinstance(qm.bn, QuantLayer) and qm.bn.groups == 4 and qm.bn.act == "relu"
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


def test_forward_with_constant_default_is_kept_and_reported() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            if pre_logits:
                return x
            return self.act(self.fc(x)) * x

    class Plain(Head):  # timm's ClassifierHead: nothing it leaves float, nothing reported
        def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return x if pre_logits else self.fc(x)

    x = torch.randn(3, 4)
    for cls, n_ops in ((Head, 1), (Plain, 0)):
        m = cls().eval()
        qm = qt.prepare(m)
        ops = qt.float_ops(qm)
        assert len(ops) == n_ops and isinstance(qm.fc, QuantLayer)
        if n_ops:
            assert ops[0].op == "forward" and "only with pre_logits=False fixed" in ops[0].reason and "mul" in ops[0].reason
        with fake_quant_disabled(qm), torch.no_grad():
            torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(qm(x, True), m(x, True))  # the other path still runs


def test_ops_on_shapes_and_constants_are_not_reported() -> None:
    class PosEnc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(4, 3, 1)

        def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
            b, h, w = shape
            y = torch.arange(h, dtype=torch.float32).cumsum(0)[:, None].expand(h, w)
            pos = torch.stack([y.sin(), y.cos(), y / h, y.pow(2)], 0)[None].expand(b, 4, h, w)
            return self.proj(pos.to(self.proj.weight.dtype))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = PosEnc()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, _, h, w = x.shape
            return self.conv(x + self.pos((b, h, w)))

    m = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    qm = qt.prepare(m)
    assert qt.float_ops(qm) == []
    q = qt.convert(qt.calibrate(qm, [x], progress=False))  # reads self.proj.weight.dtype on the converted layer
    with torch.no_grad():
        assert _sqnr(m(x), q(x)) > 25


def test_same_padding_conv_is_split() -> None:
    class Conv2dSame(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(PadSame(self.kernel_size, self.stride, self.dilation)(x), self.weight, self.bias, self.stride,
                            0, self.dilation, self.groups)

    Conv2dSame.__module__ = "timm.layers.conv2d_same"

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = Conv2dSame(3, 4, 3, stride=2, bias=False)
            self.bn = BatchNormAct2d(4, nn.SiLU())
            self.seq = nn.Sequential(Conv2dSame(4, 4, 3, stride=2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(self.bn(self.conv(x)))

    m = _bn_stats(Net(), (4, 3, 9, 9))
    x = torch.randn(2, 3, 9, 9)
    qm = qt.prepare(m)
    assert qt.float_ops(qm) == [] and isinstance(qm.conv, QuantLayer) and qm.conv.padding == (0, 0)
    assert isinstance(qm.seq[0][0], PadSame) and isinstance(qm.seq[0][1], QuantLayer)
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def timm_mod():
    return pytest.importorskip("timm")


def _timm_roundtrip(timm_mod, name: str, size: int, **kw) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = _bn_stats(timm_mod.create_model(name, pretrained=False, num_classes=10, **kw), (4, 3, size, size))
    x = torch.randn(4, 3, size, size)
    qm = qt.calibrate(qt.prepare(m), [x], progress=False)
    return m, qm, qt.convert(qm), x


def test_timm_mobilenetv3_nothing_float(timm_mod) -> None:
    m, qm, q, x = _timm_roundtrip(timm_mod, "mobilenetv3_small_050", 32)
    assert qt.float_ops(qm) == []
    with torch.no_grad():
        assert _sqnr(m(x), qm(x)) > 20
        torch.testing.assert_close(q(x), qm(x), atol=0.05 * m(x).abs().max().item(), rtol=0)


def test_timm_vit_attention_int8(timm_mod) -> None:
    m, qm, q, x = _timm_roundtrip(timm_mod, "vit_tiny_patch16_224", 32, img_size=32, depth=2)
    assert {f.op for f in qt.float_ops(qm)} == {"LayerNorm"}
    assert sum(isinstance(mm, Int8MatMul) for mm in q.modules()) == 4


def test_string_padding_same_and_valid() -> None:
    """ConvMixer's ``nn.Conv2d(..., padding="same")``: the symmetric integer padding it stands for."""
    m = nn.Sequential(nn.Conv2d(3, 4, 5, padding="same", dilation=2), nn.Conv2d(4, 4, 3, padding="valid")).eval()
    x = torch.randn(2, 3, 9, 9)
    qm = qt.prepare(m)
    assert qm[0].padding == (4, 4) and qm[1].padding == (0, 0)
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="odd total padding"):
        qt.prepare(nn.Sequential(nn.Conv2d(3, 4, 4, padding="same")))


def test_module_under_two_names_is_quantized_once_and_shared() -> None:
    """CoaT registers one positional-encoding module on the model and on every block: one twin, both paths."""

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) + x

    class Block(nn.Module):
        def __init__(self, enc: nn.Module) -> None:
            super().__init__()
            self.enc, self.conv = enc, nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.enc(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = Enc()
            self.blocks = nn.Sequential(Block(self.enc), Block(self.enc))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)

    m = Net().eval()
    x = torch.randn(4, 4, 8, 8)
    qm = qt.prepare(m)
    assert qm.enc is qm.blocks[0].enc is qm.blocks[1].enc and isinstance(qm.enc.proj, QuantLayer)
    assert not any(isinstance(c, QuantLayer) for c in qm.enc.proj.modules() if c is not qm.enc.proj)  # not wrapped twice
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every quantizer sees data: none is left uncalibrated
        qm = qt.calibrate(qm, [x], progress=False)
        q = qt.convert(qm)
    assert q.enc is q.blocks[1].enc and isinstance(q.enc.proj, Int8Layer)
    with torch.no_grad():
        assert _sqnr(m.double()(x.double()), q(x)) > 30


def test_leaf_module_with_parameters_is_traced() -> None:
    """A model's own parameter-holding leaf (HaloNet's relative position logits): its matmul is int8."""

    class RelLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rel = nn.Parameter(torch.randn(8, 6))

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.interpolate((q @ self.rel).unfold(1, 2, 2).flatten(2), scale_factor=2.0)

    m = nn.Sequential(nn.Linear(8, 8), RelLogits()).eval()
    x = torch.randn(2, 4, 8)
    qm = qt.prepare(m)
    assert qt.float_ops(qm) == []  # unfold: data movement; interpolate: resampling, as pooling
    assert isinstance(qm[1].matmul_0, QuantMatMul)
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    q = qt.convert(qt.calibrate(qm, [x], progress=False))
    assert isinstance(q[1].matmul_0, Int8MatMul)
    with torch.no_grad():
        assert _sqnr(m.double()(x.double()), q(x)) > 30


def resize_if_needed(x: torch.Tensor) -> torch.Tensor:
    """Control flow on the input's size, as timm's CrossViT ``scale_image`` (registered opaque to torch.fx)."""
    return x if x.shape[-1] == 8 else F.interpolate(x, size=(8, 8))


def test_zoo_notrace_function_is_a_leaf_of_the_trace(timm_mod) -> None:
    """A helper timm marks opaque to torch.fx (its control flow inside) no longer stops the whole forward's trace:
    the adds around it are int8 and the report names the helper."""
    from timm.layers import _fx

    _fx.register_notrace_function(resize_if_needed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(resize_if_needed(x))
            return y + y.flip(1)

    m = Net().eval()
    qm = qt.prepare(m)
    assert [(f.where, f.op) for f in qt.float_ops(qm)] == [("<model>", "resize_if_needed"), ("<model>", "flip")]
    assert type(qm.add_0).__name__ == "QuantAdd"
    x = torch.randn(2, 3, 10, 10)
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


def test_forward_testing_a_none_default_is_not_traced_one_branch() -> None:
    """DLA's ``forward(x, shortcut=None)`` with ``if shortcut is None: shortcut = x``: a trace would keep the
    not-None branch only and break calls without the argument; the forward is kept and reported."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
            if shortcut is None:
                shortcut = x
            return self.bn(self.conv(x)) + shortcut

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Block(), Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x), x)

    m = _bn_stats(Net(), (4, 4, 6, 6))
    qm = qt.prepare(m)
    assert {(f.where, f.op) for f in qt.float_ops(qm)} == {("a", "forward"), ("b", "forward")}
    x = torch.randn(2, 4, 6, 6)
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)


def test_difference_of_activations_is_an_int8_add() -> None:
    """EfficientFormer / PoolFormer's token mixer ``pool(x) - x``: an add of ``x`` and its exact negation."""

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.pool(y) - y

    m = Mixer().eval()
    x = torch.randn(2, 3, 8, 8)
    qm = qt.prepare(m)
    assert qt.float_ops(qm) == [] and type(qm.add_0).__name__ == "QuantAdd"
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    q = qt.convert(qt.calibrate(qm, [x], progress=False))
    with torch.no_grad():
        assert _sqnr(m.double()(x.double()), q(x)) > 25

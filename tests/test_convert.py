import copy
import io
import math

import pytest
import torch
import torchvision
from torch import nn

import qtoolkit as qt
from qtoolkit.nn import Int8Add, Int8Layer
from tests.conftest import randomize_bn


def _calibrated(model, preset="w8a8", n=3, bs=8, size=32, **kw):
    qm = qt.prepare(randomize_bn(model).eval(), preset, **kw)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(bs, 3, size, size, generator=g) for _ in range(n)]
    return qt.calibrate(qm, data, progress=False)


@pytest.fixture(scope="module")
def resnet18_pair():
    torch.manual_seed(0)
    qm = _calibrated(torchvision.models.resnet18(num_classes=10))
    return qm, qt.convert(qm, execution="reference")  # "auto" would pick the fast kernels


def test_converted_weights_are_plain_int8(resnet18_pair):
    _, q = resnet18_pair
    layers = [m for m in q.modules() if isinstance(m, Int8Layer)]
    assert len(layers) == 21 and all(m.weight_q.dtype == torch.int8 for m in layers)
    assert sum(isinstance(m, Int8Add) for m in q.modules()) == 8
    for t in q.state_dict().values():
        assert t.dtype in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.float32)


def test_reference_matches_fake_quant(resnet18_pair):
    qm, q = resnet18_pair
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = qm(x), q(x)
    # same arithmetic: differences only from float summation order, far below one output step
    step = float(q.fc.input_scale) * float(q.fc.weight_scale.max()) * 4
    assert (ref - out).abs().max().item() <= step


def test_integer_only_agrees_per_layer_and_on_argmax():
    torch.manual_seed(0)
    qm = _calibrated(torchvision.models.resnet18(num_classes=10), n=4)
    q = qt.convert(qm)
    # per layer: integer path within one output step of the reference path
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, Int8Layer) and m.kind == "conv2d" and m.in_channels == 3:
                ref = m.forward_reference(x)
                integer = m.forward_integer(x)
                assert (ref - integer).abs().max().item() <= 1.0001 * float(m.output_scale) , name
    # end to end (random-init ResNet-18, near-tied logits): integer-only logits stay within about
    # three logit quantization steps of the fake-quant model's on average. The >= 99.9 % top-1
    # agreement claim is measured on the trained recipe ResNet-20 (recipes/ptq.py --integer-check).
    qi = qt.set_execution(qt.convert(qm), "integer")
    xs = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        a, b = qm(xs), qi(xs)
    assert (a - b).abs().mean().item() <= 3 * float(qi.fc.output_scale)
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.9


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_prepared_state_dict_roundtrip_bit_identical():
    torch.manual_seed(0)
    base = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    for preset, calib in (("w8a8", "minmax"), ("w4a8", "entropy")):
        qc = qt.get_qconfig(preset).with_activation_calibrator(calib)
        qm = qt.calibrate(qt.prepare(base, qc), [torch.randn(4, 3, 32, 32) for _ in range(2)], progress=False)
        fresh = qt.prepare(base, qc)
        fresh.load_state_dict(_roundtrip(qm.state_dict()))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(qm(x), fresh(x))


def test_converted_state_dict_roundtrip_and_size():
    torch.manual_seed(0)
    base = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    qm = qt.calibrate(qt.prepare(base), [torch.randn(4, 3, 32, 32)], progress=False)
    q = qt.convert(qm)
    sd = _roundtrip(q.state_dict())
    skeleton = qt.convert(qt.prepare(base), allow_uncalibrated=True)
    skeleton.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), skeleton(x))
        qt.set_execution(q, "integer")
        qt.set_execution(skeleton, "integer")
        assert torch.equal(q(x), skeleton(x))

    def nbytes(model):
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.tell()

    ratio = nbytes(q) / nbytes(base)
    assert ratio <= 0.27, ratio


def test_int4_weights_are_packed():
    torch.manual_seed(0)
    qm = _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), "w4a8", n=2, size=8)
    q = qt.convert(qm)
    assert q[0].packed and q[0].weight_q.dtype == torch.uint8
    assert q[0].weight_q.numel() == math.ceil(3 * 3 * 3 / 2) * 8
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), qm(x), rtol=1e-4, atol=1e-4)


def test_convert_before_calibration_names_sites():
    qm = qt.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)))
    with pytest.raises(RuntimeError, match=r"0\.input_quantizer"):
        qt.convert(qm)


def test_backward_through_converted_model_is_a_clear_error():
    qm = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), n=1, size=8)
    q = qt.convert(qm)
    y = q(torch.randn(1, 3, 8, 8, requires_grad=True)).sum()
    with pytest.raises(RuntimeError, match="converted"):
        y.backward()


def test_dynamic_and_weight_only_convert():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 16)
    for preset in ("w8a8-dynamic", "w8-weight-only"):
        qm = qt.prepare(m, preset)
        qm = qt.calibrate(qm, [x], progress=False)
        q = qt.convert(qm)
        with torch.no_grad():
            torch.testing.assert_close(q(x), qm(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="static"):
            qt.set_execution(q, "integer")


@pytest.mark.parametrize(
    "cin,cout,k,groups,n,hw",
    [(64, 64, 3, 1, 32, 12), (3, 16, 3, 1, 20, 28), (32, 32, 3, 32, 17, 9), (512, 8, 3, 1, 2, 4)],  # last: float64 fallback
)
def test_integer_accumulation_is_exact(cin, cout, k, groups, n, hw):
    """The integer-only path's split-float32 accumulation equals an int64 reference
    at the extremes of the code ranges (and falls back to float64 when K is too big)."""
    import torch.nn.functional as F

    from qtoolkit.nn.int8_layer import Int8Layer

    g = torch.Generator().manual_seed(cin + k)
    x = torch.randint(-255, 256, (n, cin, hw, hw), generator=g)
    w = torch.randint(-127, 128, (cout, cin // groups, k, k), generator=g)
    w[0].fill_(-127)
    x[0].fill_(255)
    # int64 reference: exact unfold-and-sum, no floating point at all
    cols = F.unfold(x.double(), k, padding=1).round().long()  # (n, cin*k*k, L)
    if groups == 1:
        ref = torch.einsum("ok,nkl->nol", w.reshape(cout, -1), cols)
    else:
        cols = cols.reshape(n, groups, -1, cols.shape[-1])
        ref = torch.einsum("gok,ngkl->ngol", w.reshape(groups, cout // groups, -1), cols).reshape(n, cout, -1)
    layer = Int8Layer.__new__(Int8Layer)  # only the geometry is needed
    layer.kind, layer.stride, layer.padding, layer.dilation, layer.groups = "conv2d", (1, 1), (1, 1), (1, 1), groups
    out = layer._int_accumulate(x, w)
    assert out.dtype == torch.int64
    assert torch.equal(out.reshape(n, cout, -1), ref)


# ------------------------------------------------------------------------------ bad inputs, odd inputs


def _small(preset="w8a8", **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5))  # fmt: skip
    return _calibrated(net, preset, size=8, **kw)


def test_weights_wider_than_8_bits_are_stored_without_wrapping():
    from qtoolkit.config import QConfig, Uint8ActPerTensor, int_weight_per_channel

    qm = _small(QConfig(int_weight_per_channel(12), Uint8ActPerTensor))
    q = qt.convert(qm)
    layer = q[0]
    assert layer.weight_q.dtype == torch.int16 and int(layer.weight_q.abs().max()) == 2047
    assert q[0].execution == "reference"  # the int8 kernels take <= 8-bit weights; silently the reference path
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = qm(x)
        for ex in ("reference", "integer"):
            qt.set_execution(q, ex)
            out = q(x)
            assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item() + float(q[5].output_scale), ex
    assert "int12" in qt.summary(qm)


def test_wrong_input_shape_names_the_layer_on_every_execution():
    q = qt.convert(_small())
    for ex in ("fast", "reference", "integer"):
        qt.set_execution(q, ex)
        with pytest.raises(ValueError, match=r"^0: conv2d expects a \[N, 3, \.\.\.\] input .* got shape \(2, 4, 8, 8\)"):
            q(torch.randn(2, 4, 8, 8))
        with pytest.raises(ValueError, match=r"^5: Linear expects inputs with 144 features"):
            q[5](torch.randn(2, 7))


def test_quantizer_state_of_the_wrong_shape_is_rejected_at_load_naming_it():
    qm = _small()
    sd = qm.state_dict()
    bad = dict(sd)
    bad["0.input_quantizer.scale"] = torch.ones(3)  # per-tensor quantizer: one value
    with pytest.raises(RuntimeError, match=r"0\.input_quantizer \(0\.input_quantizer\.scale\): shape \(3,\) does not fit"):
        _small().load_state_dict(bad)
    bad = dict(sd)
    bad["0.weight_quantizer.scale"] = torch.ones(5)  # per-channel over 8 output channels
    bad["0.weight_quantizer.zero_point"] = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"0\.weight_quantizer .*shape \(5,\) does not fit .* \(shape \(8,\)\)"):
        _small().load_state_dict(bad)
    target = _small()
    target.load_state_dict(sd)  # the right shapes still load
    assert torch.equal(target[0].input_quantizer.scale, qm[0].input_quantizer.scale)


def test_integer_execution_is_batch_and_layout_invariant_reference_within_a_step():
    """The integer path accumulates exactly: batch size and memory layout cannot change a bit.  The reference
    path is the fake-quant model's float arithmetic: its summation order (so a rounding tie) may depend on
    the batch and layout, and its docstring says so."""
    q = qt.convert(_small())
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        qt.set_execution(q, "integer")
        full = q(x)
        single = torch.cat([q(x[i:i + 1]) for i in range(16)])
        cl = q(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(full, single) and torch.equal(full, cl)
    assert "batch" in type(q[0]).forward_reference.__doc__


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_one_behaviour_everywhere(dtype):
    """Prepared and converted models (every execution) accept float16/bfloat16, compute in float32 and
    return the input's dtype; the value is the float32 model's, rounded to that dtype."""
    qm = _small()
    q = qt.convert(qm)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        models = {"prepared": qm}
        for ex in ("fast", "reference", "integer"):
            models[ex] = qt.set_execution(copy.deepcopy(q), ex)
        for name, m in models.items():
            ref = m(x.to(dtype).float())  # the same (rounded) input in float32
            out = m(x.to(dtype))
            assert out.dtype == dtype, name
            # per-layer outputs are rounded to `dtype` in between on the prepared / reference paths
            tol = 0.02 * ref.abs().max().item() + 2 * float(q[5].output_scale)
            assert (out.float() - ref).abs().max().item() <= tol, name


def test_layers_that_never_ran_stay_float_with_a_warning():
    """swin's pattern: a Linear whose weight is used through F.linear (the module itself never runs), and a
    branch the data never takes: no ranges; convert keeps them float (named) and converts the rest."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.qkv = nn.Linear(6, 6)
            self.branch = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

        def forward(self, x, use_branch: bool = False):
            x = torch.relu(self.a(x))
            x = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
            return self.branch(x) if use_branch else x

    torch.manual_seed(0)
    net = Net().eval()
    qm = qt.prepare(net)
    with pytest.warns(UserWarning, match="saw no data"):
        qt.calibrate(qm, [torch.randn(8, 6)], progress=False)
    with pytest.warns(UserWarning, match=r"2 quantized module\(s\) never ran .*: branch\.0, qkv"):
        q = qt.convert(qm)
    assert isinstance(q.a, Int8Layer) and type(q.qkv) is nn.Linear
    assert torch.equal(q.qkv.weight, net.qkv.weight)
    x = torch.randn(3, 6)
    with torch.no_grad():
        out, ref = q(x, True), net(x, True)  # the float branch runs; only layer a is int8
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 0.05
    with pytest.raises(RuntimeError, match="have no range"):  # nothing calibrated: still an error
        qt.convert(qt.prepare(net))


def test_set_execution_names_the_registered_executions():
    from qtoolkit.nn.int8_layer import EXECUTION_REGISTRY

    q = qt.convert(qt.calibrate(qt.prepare(nn.Sequential(nn.Linear(4, 2))), [torch.randn(3, 4)], progress=False))
    with pytest.raises(ValueError, match="one of \\('reference', 'integer', 'fast'\\).*integer-only arithmetic"):
        qt.set_execution(q, "turbo")
    assert set(EXECUTION_REGISTRY) == {"reference", "integer", "fast"}

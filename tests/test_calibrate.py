import warnings

import pytest
import torch
from torch import nn

import qtoolkit as qt
from tests.conftest import randomize_bn


def _net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_calibrate_accepts_pairs_dicts_and_num_batches():
    qm = qt.prepare(_net())
    data = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(5)]
    qt.calibrate(qm, data, num_batches=2, progress=False)
    assert qm[0].input_quantizer.is_calibrated
    assert int(qm[0].input_quantizer.observer_enabled) == 0 and int(qm[0].input_quantizer.fake_quant_enabled) == 1
    qm2 = qt.prepare(_net())
    qt.calibrate(qm2, [{"input": x} for x, _ in data[:2]], progress=False)
    # the same two batches through either path give the same ranges
    assert torch.equal(qm[0].input_quantizer.scale, qm2[0].input_quantizer.scale)


def test_calibrate_empty_iterable_is_an_error_and_changes_nothing():
    qm = qt.prepare(_net())
    before = _state(qm)
    with pytest.raises(ValueError, match="no batches"):
        qt.calibrate(qm, [], progress=False)
    after = _state(qm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nan_batch_names_the_layer_and_restores_state():
    qm = qt.prepare(_net())
    qt.calibrate(qm, [torch.randn(4, 3, 8, 8)], progress=False)
    before = _state(qm)
    bad = torch.randn(4, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"0\.input_quantizer"):
        qt.calibrate(qm, [torch.randn(4, 3, 8, 8), bad], progress=False)
    after = _state(qm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(qm[0].input_quantizer.fake_quant_enabled) == 1  # flags restored too


def test_calibrate_without_prepare_is_an_error():
    with pytest.raises(ValueError, match="prepare"):
        qt.calibrate(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False)


def test_branch_that_never_runs_warns():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    qm = qt.prepare(Branchy())
    with pytest.warns(UserWarning, match="b.input_quantizer"):
        qt.calibrate(qm, [torch.randn(2, 4)], progress=False)


torch_ao = pytest.importorskip("torch.ao.quantization")


def test_minmax_qparams_equal_torch_ao_observers():
    """Oracle: per-channel weight scales and per-tensor activation qparams equal torch.ao's
    PerChannelMinMaxObserver / MinMaxObserver configured alike."""
    net = _net()
    qm = qt.prepare(net, "w8a8")
    data = [torch.randn(4, 3, 8, 8) * (i + 1) for i in range(3)]
    qt.calibrate(qm, data, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_obs = torch_ao.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127)
        a_obs = torch_ao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    folded_w, _ = qm[0].folded_weight_bias()
    w_obs(folded_w.detach())
    ws, wz = w_obs.calculate_qparams()
    torch.testing.assert_close(qm[0].weight_quantizer.scale, ws.float(), rtol=1e-6, atol=0)
    assert torch.equal(qm[0].weight_quantizer.zero_point.long(), wz.long())
    for x in data:
        a_obs(x)
    s, z = a_obs.calculate_qparams()
    torch.testing.assert_close(qm[0].input_quantizer.scale.reshape(1), s.float(), rtol=1e-6, atol=0)
    assert int(qm[0].input_quantizer.zero_point) == int(z)


def test_calibrate_batches_whose_input_is_a_tuple_of_arguments():
    qm = qt.prepare(_net())
    data = [((torch.randn(4, 3, 8, 8),), torch.zeros(4)) for _ in range(2)]
    qt.calibrate(qm, data, progress=False)
    qm2 = qt.prepare(_net())
    qt.calibrate(qm2, [x for (x,), _ in data], progress=False)
    assert qm[0].input_quantizer.is_calibrated
    assert torch.equal(qm[0].input_quantizer.scale, qm2[0].input_quantizer.scale)


def test_a_non_tensor_reaching_a_quantizer_names_it():
    qm = qt.prepare(_net())
    with pytest.raises(TypeError, match=r"^0\.input_quantizer: expected a tensor, got a tuple"):
        qm((torch.randn(1, 3, 8, 8),))


def test_shared_tensor_is_observed_once_with_identical_ranges():
    """A layer's output quantizer and the next layer's input quantizer see the same tensor: one histogram is
    collected and both get the same statistics and range as when each observes on its own."""
    from qtoolkit.calibrate import _observe_first_batch

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    qc = qt.get_qconfig("w8a8").with_activation_calibrator("percentile", percentile=99.0)
    qm = qt.calibrate(qt.prepare(m, qc), data, progress=False)
    assert torch.equal(qm[0].output_quantizer.scale, qm[2].input_quantizer.scale)
    assert torch.equal(qm[0].output_quantizer.observer.hist, qm[2].input_quantizer.observer.hist)
    # the follower really stopped observing after the first batch
    fresh = qt.disable_fake_quant(qt.prepare(m, qc))
    fqs = list(qt.quantizers(fresh))
    followers = _observe_first_batch(fresh, fqs, data[0])
    assert len(followers) == 1 and not bool(fresh[2].input_quantizer.observer_enabled)
    # independent oracle: a quantizer fed the same batches directly
    from qtoolkit.fake_quant import FakeQuantize

    solo = FakeQuantize(qc.activation, role="activation")
    solo.enable_fake_quant(False)
    with torch.no_grad():
        for x in data:
            solo(torch.relu(m[0](x)))
    solo.finalize()
    torch.testing.assert_close(solo.scale, qm[2].input_quantizer.scale)
    assert int(solo.zero_point) == int(qm[2].input_quantizer.zero_point)


def test_calibrate_computes_qparams_once_and_leaves_output_quantizers_live():
    from qtoolkit.fake_quant import FakeQuantize

    cfg = qt.get_qconfig("w8a8").activation
    x = torch.randn(64) * 3
    fq = FakeQuantize(cfg, role="output")
    fq.collect_only = True  # as inside calibrate: statistics only
    fq(x)
    assert torch.equal(fq.scale, torch.ones(())) and not fq.is_calibrated
    fq.collect_only = False  # a hand-written QAT loop: output ranges follow the data
    fq(x)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert fq.is_calibrated and abs(float(fq.scale) - (hi - lo) / 255) < 1e-6
    qm = qt.prepare(_net())
    qt.calibrate(qm, [torch.randn(4, 3, 8, 8) for _ in range(2)], progress=False)
    assert not any(q.collect_only for _, q in qt.quantizers(qm))


def test_scale_floor_does_not_silently_zero_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-9)  # activations ~1e-9, as in a randomly initialized MobileNet
        model[0].bias.zero_()
    qm = qt.prepare(model)
    with pytest.warns(UserWarning, match=r"scale floor.*2[.]input_quantizer"):
        qt.calibrate(qm, [torch.randn(16, 8) for _ in range(2)], progress=False)
    # the warning is right: fake quantization zeroes that layer's input
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert torch.count_nonzero(qm[2].input_quantizer(torch.relu(model[0](x)))) == 0
    qm2 = qt.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal model: no warning
        qt.calibrate(qm2, [torch.randn(16, 8) for _ in range(2)], progress=False)


@pytest.mark.parametrize("act", ["silu", "hardswish"])
def test_inplace_activation_output_is_not_tied_to_its_input(act):
    """An in-place activation returns its input *object* with other values: its output quantizer must get the
    range of the output (as with the out-of-place module), not a copy of the input's range."""

    def net(inplace):
        torch.manual_seed(0)
        a = nn.SiLU(inplace=inplace) if act == "silu" else nn.Hardswish(inplace=inplace)
        return nn.Sequential(nn.Conv2d(3, 8, 3), a, nn.Conv2d(8, 4, 1)).eval()

    data = [3 * torch.randn(4, 3, 8, 8) for _ in range(3)]
    qms = {ip: qt.calibrate(qt.prepare(net(ip), "w8a8"), data, progress=False, fit_tables=False) for ip in (True, False)}
    for name in ("1", "2"):  # the activation table and the next conv
        for fq_name, fq in qms[True].get_submodule(name).named_children():
            if not isinstance(fq, qt.FakeQuantize) or fq.role == "weight":
                continue
            ref = qms[False].get_submodule(name).get_submodule(fq_name)
            assert torch.equal(fq.scale, ref.scale) and torch.equal(fq.zero_point, ref.zero_point), (name, fq_name)
    # and the grid after the activation starts where the data does (float64 reference of the activation)
    with torch.no_grad():
        pre = torch.cat([net(False)[0](x) for x in data]).double()
        post = nn.functional.silu(pre) if act == "silu" else nn.functional.hardswish(pre)
    fq = qms[True][2].input_quantizer
    lo = (fq.qmin - int(fq.zero_point)) * float(fq.scale)
    assert lo >= float(post.min()) - float(fq.scale) and float(pre.min()) < lo


def test_tensor_version_tells_in_place_changes_apart():
    from qtoolkit.calibrate import tensor_version

    t = torch.zeros(2)
    v = tensor_version(t)
    nn.functional.silu(t, inplace=True)
    assert tensor_version(t) != v
    with torch.inference_mode():
        assert tensor_version(torch.zeros(2)) is None
    assert tensor_version(3.0) is None

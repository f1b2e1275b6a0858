"""reconstruct(): AdaRound / BRECQ / QDrop on a tiny residual net — objective, faithfulness, state, errors."""

import copy

import pytest
import torch

import qtoolkit as qt
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.numerics import quantize
from qtoolkit.ptq.api import parse_methods
from qtoolkit.ptq.sites import find_units, probe


def _prepared(model, batches, preset="w4a4"):
    return qt.calibrate(qt.prepare(model, preset), batches, progress=False)


def _err(qm, fp, batches):
    """Output MSE of the fake-quant model against the float model over the batches (float64)."""
    with torch.no_grad():
        return sum(float((qm(x).double() - fp(x).double()).pow(2).mean()) for x, _ in batches)


def test_units_are_stem_blocks_and_fc(tiny_resnet, batches):
    qm = _prepared(tiny_resnet, batches)
    pr = probe(qm, batches[0])
    units, left = find_units(qm, pr, "block")
    assert [u.name for u in units] == ["conv1", "layer1.0", "layer1.1", "fc"] and left == []
    units, _ = find_units(qm, pr, "layer")
    assert [u.name for u in units] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                                       "layer1.1.conv2", "fc"]
    # the block output feeds the next block's conv1 and its residual operand: tied quantizers
    b0, b1 = qm.layer1[0], qm.layer1[1]
    group = pr.group_of(b1.conv1.input_quantizer)
    assert any(m is b0.add_0.output_quantizer for m in group)
    assert any(m is b1.add_0.rhs_quantizer for m in group)


@pytest.mark.parametrize(("method", "iters"), [("adaround", 200), ("brecq", 60), ("qdrop", 60)])
def test_rounding_methods_reduce_error_and_convert_faithfully(tiny_resnet, batches, method, iters):
    qm = _prepared(tiny_resnet, batches)
    before = _err(qm, tiny_resnet, batches)
    originals = {n: m.weight.detach().clone() for n, m in qm.named_modules() if isinstance(m, QuantLayer)}
    flags = {n: p.requires_grad for n, p in qm.named_parameters()}
    qm.train()
    report: list = []
    out = qt.reconstruct(qm, batches, method, iters=iters, progress=False, report=report)
    assert out is qm and qm.training  # in place, mode restored
    assert {n: p.requires_grad for n, p in qm.named_parameters()} == flags
    qm.eval()
    after = _err(qm, tiny_resnet, batches)
    assert after < before, (method, before, after)
    assert len(report) == (6 if method == "adaround" else 4)
    for n, m in qm.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        wq = m.weight_quantizer
        s = wq.scale.detach().reshape(-1, *([1] * (m.weight.dim() - 1)))
        xs = originals[n].double() / s.double()
        codes = quantize(m.weight.detach(), wq.scale, wq.zero_point, wq.qmin, wq.qmax, axis=0, dtype=torch.float64)
        # learned rounding: every code is floor(w/s) or floor(w/s) + 1 (AdaRound's two choices)
        fl = torch.floor(xs)
        ok = (codes == fl.clamp(wq.qmin, wq.qmax)) | (codes == (fl + 1).clamp(wq.qmin, wq.qmax))
        assert bool(ok.all()), n
        # the baked weight sits on the grid
        torch.testing.assert_close(m.weight.detach().double(), codes * s.double(), rtol=0, atol=1e-6)
    int8 = qt.convert(qm)
    qt.set_execution(int8, "reference")
    with torch.no_grad():
        for x, _ in batches[:2]:
            torch.testing.assert_close(int8(x), qm(x), rtol=0, atol=1e-5)
    # the learned rounding is in the int codes convert stored
    conv = int8.layer1[0].conv1
    q = qm.layer1[0].conv1
    want = quantize(q.weight.detach(), q.weight_quantizer.scale, q.weight_quantizer.zero_point,
                    q.weight_quantizer.qmin, q.weight_quantizer.qmax, axis=0)
    assert torch.equal(conv.int_weight(), want)


def test_learned_activation_scales_stay_tied(tiny_resnet, batches):
    qm = _prepared(tiny_resnet, batches)
    pr = probe(qm, batches[0])
    groups = [g for g in pr.groups if len(g) > 1]
    assert groups
    before = [float(g[0].scale) for g in groups]
    qt.reconstruct(qm, batches, "brecq", iters=40, progress=False)
    moved = False
    for g, b in zip(groups, before):
        vals = {float(m.scale) for m in g}
        assert len(vals) == 1, "tied quantizers must keep one scale"
        moved |= abs(vals.pop() - b) > 1e-9
    assert moved  # something was learned
    int8 = qt.convert(qm)
    qt.set_execution(int8, "reference")
    with torch.no_grad():
        x = batches[0][0]
        torch.testing.assert_close(int8(x), qm(x), rtol=0, atol=1e-5)


def test_seeded_and_repeatable(tiny_resnet, batches):
    a = _prepared(copy.deepcopy(tiny_resnet), batches)
    b = _prepared(copy.deepcopy(tiny_resnet), batches)
    qt.reconstruct(a, batches, "qdrop", iters=20, progress=False, seed=5)
    qt.reconstruct(b, batches, "qdrop", iters=20, progress=False, seed=5)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_bad_input_is_refused_before_anything_changes(tiny_resnet, batches):
    qm = qt.prepare(tiny_resnet, "w4a4")
    with pytest.raises(ValueError, match="calibrate"):
        qt.reconstruct(qm, batches, progress=False)
    qat = qt.calibrate(qt.prepare(tiny_resnet, "w4a4", qat=True), batches, progress=False)
    with pytest.raises(ValueError, match="live BatchNorm"):
        qt.reconstruct(qat, batches, progress=False)
    qm = _prepared(tiny_resnet, batches)
    sd = {k: v.clone() for k, v in qm.state_dict().items()}
    with pytest.raises(ValueError, match="unknown method 'adarond'"):
        qt.reconstruct(qm, batches, "adarond", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        qt.reconstruct(qm, [], progress=False)
    with pytest.raises(ValueError, match="iters"):
        qt.reconstruct(qm, batches, iters=0, progress=False)
    for k, v in qm.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_parse_methods():
    assert parse_methods("cle+bias_correction+qdrop") == ["cle", "bias_correction", "qdrop"]
    assert parse_methods(["adaround"]) == ["adaround"]
    with pytest.raises(ValueError, match="first"):
        parse_methods("bias_correction+cle")
    with pytest.raises(ValueError, match="one of"):
        parse_methods("adaround+qdrop")
    with pytest.raises(ValueError, match="last"):
        parse_methods("qdrop+bias_correction")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("cle+cle")


def test_chained_inputs_equal_captured_ones(tiny_resnet, batches):
    from qtoolkit.ptq.engine import chained_inputs, forward_chunks
    from qtoolkit.ptq.sites import FloatReference, capture, feeds

    qm = _prepared(tiny_resnet, batches)
    pr = probe(qm, batches[0])
    units, _ = find_units(qm, pr, "block")
    ref = FloatReference(qm)
    first, second, fc = units[1], units[2], units[3]
    assert feeds(pr, first, second) and not feeds(pr, second, fc)  # avgpool + flatten sit before fc
    x_q, _ = capture(qm, first.module, batches, want_output=False)
    with ref.active(qm):
        _, y_fp = capture(qm, first.module, batches, want_output=True)
    got = chained_inputs(qm, first, x_q, y_fp, second, batches[0], ref)
    assert got is not None
    want_q, _ = capture(qm, second.module, batches, want_output=False)
    with ref.active(qm):
        want_fp, _ = capture(qm, second.module, batches, want_output=False)
    torch.testing.assert_close(got[0], want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want_fp, rtol=1e-5, atol=1e-6)
    # a wrong "previous" output is noticed on the check batch
    assert chained_inputs(qm, first, x_q, y_fp * 1.5, second, batches[0], ref) is None
    assert forward_chunks(first.module, x_q, chunk=7).shape == want_q.shape


def test_time_budget_cuts_iterations(tiny_resnet, batches):
    qm = _prepared(tiny_resnet, batches)
    report: list = []
    qt.reconstruct(qm, batches, "brecq", iters=100_000, time_budget_s=2.0, progress=False, report=report)
    assert all(r["iters"] < 100_000 for r in report)
    assert sum(r["seconds"] for r in report) < 10.0
    with pytest.raises(ValueError, match="time_budget_s"):
        qt.reconstruct(qm, batches, "brecq", time_budget_s=0, progress=False)


def test_failure_half_way_leaves_the_model_as_it_was(tiny_resnet, batches, monkeypatch):
    import qtoolkit.ptq.api as api

    qm = _prepared(tiny_resnet, batches)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    real = api.reconstruct_unit
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "reconstruct_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        qt.reconstruct(qm, batches, "bias_correction+qdrop", iters=5, progress=False)
    after = qm.state_dict()
    assert after.keys() == before.keys()  # the biases bias correction added are gone again
    for k, v in before.items():
        assert torch.equal(after[k], v), k

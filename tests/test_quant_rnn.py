"""Dynamic LSTM / GRU: the float recurrence exactly, int8 gate weights per row (torch's per-channel fake quant as
oracle), converted reference = fake quant, the int8 kernels close to it, clear refusals."""

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.nn import Int8Layer, QuantRNN


def _rnn(kind, **kw):
    torch.manual_seed(0)
    return (nn.LSTM if kind == "lstm" else nn.GRU)(6, 8, **kw).eval()


CONFIGS = [dict(num_layers=2, batch_first=True), dict(num_layers=1, bidirectional=True),
           dict(num_layers=2, bidirectional=True, batch_first=True, bias=False)]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("kw", CONFIGS, ids=["2layers-bf", "bidir", "2layers-bidir-nobias"])
def test_float_recurrence_is_exact(kind, kw):
    rnn = _rnn(kind, **kw)
    q = QuantRNN(rnn, qt.get_qconfig("w8a8-dynamic"))
    x = torch.randn(3, 5, 6) if kw.get("batch_first") else torch.randn(5, 3, 6)
    dirs = 2 if kw.get("bidirectional") else 1
    h0 = torch.randn(kw["num_layers"] * dirs, 3, 8)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    with qt.fake_quant_disabled(q), torch.no_grad():
        for args in ((x,), (x, hx), (x[0] if kw.get("batch_first") else x[:, 0],)):
            got, want = q(*args), rnn(*args)  # batched, with an initial state, unbatched
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
            for g, w in zip(torch.utils._pytree.tree_leaves(got[1]), torch.utils._pytree.tree_leaves(want[1])):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_prepare_converts_dynamic_rnns_and_weights_are_per_gate_row(kind):
    model = nn.Sequential(_rnn(kind, num_layers=2, batch_first=True))
    qm = qt.prepare(model, "w8a8", overrides={type(model[0]): "w8a8-dynamic"})
    rnn = qm[0]
    assert isinstance(rnn, QuantRNN) and qt.float_ops(qm) == []
    ih = rnn.ih[0]
    ih.calibrate_weight()
    w = model[0].weight_ih_l0.detach()
    scale = (w.abs().amax(1) / 127).float()
    oracle = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -127, 127)
    assert torch.equal(ih.weight_quantizer(ih.weight.detach()), oracle)
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        fq = qm(x)[0]
    q = qt.convert(qm)
    assert sum(isinstance(m, Int8Layer) and m.mode == "dynamic" for m in q.modules()) == 4
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.equal(q(x)[0], fq)
        qt.set_execution(q, "fast")
        out = q(x)[0]
    assert (out - fq).abs().max() < 0.05  # int8 kernels: the same codes, float accumulation order differs
    with pytest.raises(ValueError, match="integer-only needs static"):
        qt.set_execution(q, "integer")


def test_static_qconfig_leaves_rnn_float_and_says_how():
    qm = qt.prepare(nn.Sequential(_rnn("lstm")), "w8a8")
    assert isinstance(qm[0], nn.LSTM)
    (op,) = qt.float_ops(qm)
    assert op.op == "LSTM" and "w8a8-dynamic" in op.reason
    with pytest.raises(ValueError, match="proj_size"):
        QuantRNN(nn.LSTM(4, 8, proj_size=2), qt.get_qconfig("w8a8-dynamic"))
    q = QuantRNN(_rnn("gru"), qt.get_qconfig("w8a8-dynamic"))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 6), [5, 3])
    with pytest.raises(TypeError, match="PackedSequence"):
        q(packed)

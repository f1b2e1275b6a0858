"""Cross-layer equalization: the float function is kept, ranges are equalized, foreign consumers revert."""

import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.ptq.cle import equalization_pairs


def _imbalanced():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    f = torch.tensor([50.0, 0.02, 1.0, 10.0, 0.1, 3.0])
    with torch.no_grad():  # same float function, very different channel ranges
        m[0].weight.mul_(f.view(-1, 1, 1, 1))
        m[0].bias.mul_(f)
        m[2].weight.div_(f.view(1, -1, 1, 1))
    return m


def _data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 9, 9, generator=g) for _ in range(3)]


def test_cle_keeps_function_equalizes_ranges_and_helps_per_tensor_weights():
    m, data = _imbalanced(), _data()
    qc = qt.get_qconfig("w4a8")
    from dataclasses import replace

    qc = replace(qc, weight=replace(qc.weight, spec=replace(qc.weight.spec, axis=None)))  # per-tensor weights
    qm = qt.calibrate(qt.prepare(m, qc), data, progress=False)
    assert equalization_pairs(qm, data[0]) == [("0", "2")]
    with torch.no_grad():
        ref = [m(x) for x in data]
        err_before = sum(float((qm(x) - r).pow(2).mean()) for x, r in zip(data, ref))
    rep: list = []
    qt.reconstruct(qm, data, "cle", progress=False, report=rep)
    assert rep[0]["pairs"] == ["0->2"] and rep[0]["reverted"] == []
    with torch.no_grad(), qt.fake_quant_disabled(qm):
        for x, r in zip(data, ref):
            torch.testing.assert_close(qm(x), r, rtol=1e-4, atol=1e-4)
    r1 = qm[0].weight.detach().abs().flatten(1).amax(1)
    r2 = qm[2].weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)
    with torch.no_grad():
        err_after = sum(float((qm(x) - r).pow(2).mean()) for x, r in zip(data, ref))
    assert err_after < 0.5 * err_before


class _Leaky(nn.Module):
    """conv1's output also reaches the output through a functional op CLE cannot see as a module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        return self.conv2(h) + h.mean()


def test_pair_with_an_unseen_consumer_is_put_back():
    torch.manual_seed(0)
    m = _Leaky().eval()
    with torch.no_grad():
        m.conv1.weight.mul_(torch.tensor([50.0, 0.02, 1.0, 10.0, 0.1, 3.0]).view(-1, 1, 1, 1))
    data = _data()
    qm = qt.calibrate(qt.prepare(m, "w8a8"), data, progress=False)
    w = qm.conv1.weight.detach().clone()
    rep: list = []
    qt.reconstruct(qm, data, "cle", progress=False, report=rep)
    assert rep[0]["pairs"] == [] and rep[0]["reverted"] == ["conv1->conv2"]
    assert torch.equal(qm.conv1.weight.detach(), w)


class _InplaceSiLU(nn.Module):
    """conv1 -> SiLU(inplace) -> conv2: the SiLU returns conv1's output object, changed; not an equalizable pair."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.act = nn.SiLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_inplace_activation_between_is_not_a_pair():
    torch.manual_seed(0)
    m = _InplaceSiLU().eval()
    data = _data()
    qm = qt.calibrate(qt.prepare(m, "w8a8"), data, progress=False)
    assert equalization_pairs(qm, data[0]) == []

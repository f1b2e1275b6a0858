"""fragile_activation_sites: the layer inputs a 4-bit grid cannot hold are found by measurement and raised."""

import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.ptq.activation_bits import fragile_activation_sites


class Outlier(nn.Module):
    """The second conv's input has one channel 200x larger than the others: a 4-bit per-tensor grid over it
    rounds every other channel to 0; the third conv's input is benign."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight[0].mul_(200.0)
            self.b.weight[:, 0].div_(200.0)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_outlier_input_is_raised_to_8_bits_and_weights_stay_4_bit():
    torch.manual_seed(0)
    m = Outlier().eval()
    data = [torch.randn(16, 3, 5, 5) for _ in range(2)]
    res = fragile_activation_sites(m, data, "w4a4", threshold_db=10.0)
    assert min(res.sqnr_db, key=res.sqnr_db.get) == "b"
    assert res.sqnr_db["b"] < 10.0 <= res.sqnr_db["c"]
    assert res.raised == ["b"]
    qc = res.overrides["b"]
    assert qc.activation.spec.bits == 8 and qc.weight.spec.bits == 4
    # float64 check of what was measured: b's input rounded to its 4-bit grid alone loses most of the output
    qm = qt.calibrate(qt.prepare(m, "w4a4"), data, progress=False)
    fin = qm.b.input_quantizer
    s, z = float(fin.scale), int(fin.zero_point)
    with torch.no_grad():
        x = data[0].double()
        mm = m.double()
        h = torch.relu(mm.a(x))
        hq = (torch.clamp(torch.round(h / s) + z, fin.qmin, fin.qmax) - z) * s
        ref = mm.c(torch.relu(mm.b(h)))
        out = mm.c(torch.relu(mm.b(hq)))
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert float(sqnr) < 10.0
    # the raised model is closer to float than the plain one
    raised = qt.calibrate(qt.prepare(m.float(), "w4a4", overrides=res.overrides), data, progress=False)
    with torch.no_grad():
        r = m(data[1])
        e_plain = float((qm(data[1]) - r).pow(2).mean())
        e_raised = float((raised(data[1]) - r).pow(2).mean())
    assert e_raised < 0.5 * e_plain

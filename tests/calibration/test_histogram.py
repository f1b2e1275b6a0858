"""HistogramObserver: the growing histogram (counts, sampling, percentile vs torch.quantile, the calibration
methods' ranges)."""

from __future__ import annotations

import pytest
import torch

from qtoolkit.calibration import HistogramObserver
from qtoolkit.spec import QuantSpec
from tests.calibration.observer_data import I8_SYM_NARROW, U8_ASYM

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("kind", ["signed", "relu", "negative"])
def test_histogram_grows_and_counts_everything(kind: str) -> None:
    obs = HistogramObserver(U8_ASYM, method="percentile", bins=512)
    g = torch.Generator().manual_seed(8)
    seen = []
    widths = []
    for i in range(6):
        x = torch.randn(3000, generator=g) * (1.6**i)  # widening range each batch
        if kind == "relu":
            x = x.relu()
        elif kind == "negative":
            x = -x.abs()
        obs(x)
        seen.append(x)
        widths.append(float(obs.bin_width))
        assert int(obs.hist.sum()) == 3000 * (i + 1)
    assert widths[-1] > widths[0]
    # the width only ever grows by integer factors (exact merging)
    for a, b in zip(widths, widths[1:]):
        assert b / a == pytest.approx(round(b / a), rel=1e-9) and round(b / a) >= 1
    allx = torch.cat(seen)
    counts, edges = obs.histogram()
    assert float(edges[0]) <= float(allx.min()) and float(edges[-1]) >= float(allx.max())
    assert float(edges[0]) <= 0.0 <= float(edges[-1])
    zero_edge = (edges / float(obs.bin_width)).round()
    assert torch.allclose(edges / float(obs.bin_width), zero_edge, atol=1e-6)  # 0 is on the lattice
    ref = torch.histogram(allx.double(), edges.double())[0]
    # the same histogram as all the data at once (up to values within float error of an edge)
    assert float((counts - ref).abs().sum()) <= 1e-3 * allx.numel()
    if kind == "relu":
        assert int(obs.bin_offset) == 0  # post-ReLU data only uses bins >= 0
    if kind == "negative":
        assert float(edges[-1]) == pytest.approx(0.0, abs=1e-12)


def test_histogram_zeros_first_then_data() -> None:
    obs = HistogramObserver(U8_ASYM, method="percentile", bins=64, percentile=100.0)
    obs(torch.zeros(100))
    assert obs.has_data and float(obs.bin_width) == 0.0
    s, _ = obs.calculate_qparams()
    assert float(s) > 0 and torch.isfinite(s)
    obs(torch.linspace(-1.0, 3.0, 401))
    assert int(obs.hist.sum()) == 501
    counts, edges = obs.histogram()
    k0 = int(obs.bin_offset)
    assert int(counts[-k0]) >= 100  # the zeros sit in the bin [0, w)
    lo, hi = obs.compute_range()
    assert float(lo) == pytest.approx(-1.0, abs=float(obs.bin_width)) and float(hi) == pytest.approx(3.0)


def test_histogram_percentile_close_to_torch_quantile() -> None:
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(20000, generator=g) * (1 + i) for i in range(4)]
    obs = HistogramObserver(U8_ASYM, method="percentile", percentile=99.0)
    sym = HistogramObserver(I8_SYM_NARROW, method="percentile", percentile=99.0)
    for x in xs:
        obs(x)
        sym(x)
    allx = torch.cat(xs)
    w = float(obs.bin_width)
    lo, hi = obs.compute_range()
    assert float(lo) == pytest.approx(float(torch.quantile(allx, 0.01)), abs=w)
    assert float(hi) == pytest.approx(float(torch.quantile(allx, 0.99)), abs=w)
    lo_s, hi_s = sym.compute_range()
    assert float(hi_s) == pytest.approx(float(torch.quantile(allx.abs(), 0.99)), abs=w)
    assert float(lo_s) == -float(hi_s)


def test_histogram_sampling_spreads_over_channels_and_keeps_exact_minmax() -> None:
    # value = channel index + noise: a sample that missed channels (blocks aligned with the layout) would show
    g = torch.Generator().manual_seed(11)
    c = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)
    x = c + 0.5 * torch.rand(64, 16, 28, 28, generator=g)
    obs = HistogramObserver(U8_ASYM, method="percentile", bins=2048)
    assert obs.max_samples == 1 << 15 and x.numel() > obs.max_samples
    per_channel = torch.zeros(16)
    for _ in range(3):
        before = obs.hist.clone()
        obs(x)
        added = int((obs.hist - before).sum())
        assert obs.max_samples // 2 < added <= obs.max_samples
        assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())  # every element
        counts, edges = obs.histogram()
        centre = (edges[:-1] + edges[1:]) / 2
        per_channel = torch.zeros(16, dtype=torch.float64).index_add_(0, centre.floor().clamp(0, 15).long(), counts)
    share = per_channel / per_channel.sum()
    assert float(share.min()) > 0.8 / 16 and float(share.max()) < 1.2 / 16
    # the minmax method and a 100th percentile use the exact extremes, not the sample's
    full = HistogramObserver(U8_ASYM, method="percentile", percentile=100.0)
    full(x)
    assert float(full.compute_range()[1]) == pytest.approx(float(x.max()), abs=float(full.bin_width))


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_sampling_close_to_exact_counting(method: str) -> None:
    # ReLU'd activations, 8 batches of 64x16x28x28 (0.8 M values each): the sampled histogram's range against
    # exact counting (max_samples=None) and, for the percentile, against torch.kthvalue of all the data
    g = torch.Generator().manual_seed(12)
    xs = [(torch.randn(64, 16, 28, 28, generator=g) * torch.linspace(0.5, 2.0, 16).view(1, 16, 1, 1)).relu()
          for _ in range(8)]
    sampled = HistogramObserver(U8_ASYM, method=method, percentile=99.9, max_samples=1 << 15)
    exact = HistogramObserver(U8_ASYM, method=method, percentile=99.9, max_samples=None)
    default = HistogramObserver(U8_ASYM, method=method)
    assert default.max_samples == (None if method == "entropy" else 1 << 15)
    for x in xs:
        sampled(x)
        exact(x)
    assert int(exact.hist.sum()) == 8 * xs[0].numel()
    assert int(sampled.hist.sum()) <= 8 * sampled.max_samples
    hi_s, hi_e = float(sampled.compute_range()[1]), float(exact.compute_range()[1])
    if method == "entropy":
        # why entropy counts everything by default: KL's threshold shrinks with the number of values counted
        # (a sparser tail costs more KL); here by 11% (11-21% over seeds 12-14)
        assert 0.6 * hi_e < hi_s < 0.95 * hi_e
        return
    assert hi_s == pytest.approx(hi_e, rel=0.03)
    if method == "percentile":
        allx = torch.cat([x.flatten() for x in xs])
        ref = float(torch.kthvalue(allx, int(0.999 * allx.numel())).values)
        assert hi_s == pytest.approx(ref, rel=0.02)


def test_histogram_sampling_argument_errors() -> None:
    for bad in (100, True, 2.5, "all"):
        with pytest.raises(ValueError, match="max_samples"):
            HistogramObserver(U8_ASYM, max_samples=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile", "minmax"])
@pytest.mark.parametrize("spec", [U8_ASYM, I8_SYM_NARROW], ids=["u8asym", "i8sym"])
def test_histogram_methods_give_sane_ranges(method: str, spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(50000, generator=g)
    x[:3] = torch.tensor([25.0, -20.0, 30.0])  # outliers
    # every element counted: the planted outliers are 3 of 50,000 (a sample would weigh them by where they sit)
    obs = HistogramObserver(spec, method=method, bins=2048, percentile=99.9, max_samples=None)
    obs(x)
    lo, hi = obs.compute_range()
    mn, mx = obs.observed_range()
    assert float(mn) == -20.0 and float(mx) == 30.0
    if method == "minmax":
        assert (float(lo), float(hi)) == (-20.0, 30.0)
    else:
        assert 2.0 < float(hi) < 0.9 * 30.0
        assert -0.9 * 30.0 < float(lo) < -2.0
    if spec.symmetric and method != "minmax":
        assert float(lo) == -float(hi)
    s, z = obs.calculate_qparams()
    assert s.shape == () and z.shape == () and float(s) > 0


def test_histogram_relu_data_entropy_range_from_zero() -> None:
    g = torch.Generator().manual_seed(11)
    obs = HistogramObserver(U8_ASYM, method="entropy")
    for _ in range(3):
        obs(torch.randn(4, 32, 16, 16, generator=g).relu())
    lo, hi = obs.compute_range()
    assert float(lo) == 0.0
    assert 2.0 < float(hi) <= float(obs.observed_range()[1])
    s, z = obs.calculate_qparams()
    assert int(z) == 0

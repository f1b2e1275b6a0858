"""Calibrator registry tests: a registered toy calibrator runs end to end through
prepare + calibrate, unknown names and duplicates are refused with clear errors,
and ``CALIBRATORS`` / ``make_observer`` / ``FakeQuantize.uses_histogram`` agree
with the registry."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

import qtoolkit as qt
import qtoolkit.config as qconfig
from qtoolkit.calibration import (
    COMMON_OPTIONS,
    CalibratorEntry,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
    PerChannelPercentileObserver,
    calibrator_names,
    get_calibrator,
    make_observer,
    register_calibrator,
    unregister_calibrator,
)
from qtoolkit.config import QuantizerConfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.numerics import compute_qparams
from qtoolkit.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTINS = ("minmax", "ema", "percentile", "entropy", "mse")
U8_ASYM = QuantSpec(8, signed=False, symmetric=False)
_ids = itertools.count()


# --------------------------------------------------------------------------------------
# a toy calibrator: symmetric range at `shrink` times the largest |x| (per tensor or per channel)
# --------------------------------------------------------------------------------------


def toy_range(lo: Tensor, hi: Tensor, shrink: float) -> tuple[Tensor, Tensor]:
    t = torch.maximum(lo.abs(), hi.abs()) * shrink
    return -t, t


class ToyObserver(MinMaxObserver):
    calibrator = "toy"

    def __init__(self, spec: QuantSpec, shrink: float = 0.5, *, ignore_nonfinite: bool = False) -> None:
        super().__init__(spec, ignore_nonfinite=ignore_nonfinite)
        self.shrink = float(shrink)

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        return toy_range(*super()._compute_range(), self.shrink)


@pytest.fixture
def toy():
    """Register a toy calibrator under a fresh name; unregister it afterwards (even on failure)."""
    names: list[str] = []

    def register(**kw) -> str:
        name = f"toy-{next(_ids)}"
        kw.setdefault("per_tensor", ToyObserver)
        kw.setdefault("options", {"shrink"})
        register_calibrator(name, **kw)
        names.append(name)
        return name

    yield register
    for name in names:
        if name in calibrator_names():
            unregister_calibrator(name)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()


def _batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 6, generator=g) * (1 + i) for i in range(3)]


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("uses_histogram", [False, True])
def test_toy_activation_calibrator_end_to_end(toy, uses_histogram: bool) -> None:
    name = toy(uses_histogram=uses_histogram)
    qc = qt.get_qconfig("w8a8").with_activation_calibrator(name, shrink=0.25)
    data = _batches()
    qm = qt.calibrate(qt.prepare(_model(), qc), data, progress=False)
    iq = qm[0].input_quantizer
    assert type(iq.observer) is ToyObserver and iq.observer.shrink == 0.25
    assert iq.uses_histogram is uses_histogram and iq.is_calibrated
    # the range is the one toy_range computes from the data's min/max
    x = torch.cat(data)
    lo, hi = toy_range(x.min(), x.max(), 0.25)
    assert torch.equal(torch.stack(iq.observer.compute_range()), torch.stack([lo, hi]))
    scale, zp = compute_qparams(lo, hi, iq.qmin, iq.qmax, iq.spec.symmetric)
    assert torch.equal(iq.scale, scale) and torch.equal(iq.zero_point, zp)
    # and it is not what min/max would give
    mm_scale, _ = compute_qparams(x.min(), x.max(), iq.qmin, iq.qmax, iq.spec.symmetric)
    assert not torch.allclose(iq.scale, mm_scale)


def test_toy_weight_calibrator_per_channel(toy) -> None:
    name = toy(per_channel=ToyObserver)
    qc = qt.get_qconfig("w8a8").with_weight_calibrator(name)
    qm = qt.calibrate(qt.prepare(_model(), qc), _batches(), progress=False)
    wq = qm[0].weight_quantizer
    assert type(wq.observer) is ToyObserver
    w = qm[0].weight.detach()
    t = w.abs().amax(1) * 0.5
    scale, zp = compute_qparams(-t, t, wq.qmin, wq.qmax, wq.spec.symmetric)
    assert scale.shape == (4,)
    assert torch.equal(wq.scale, scale) and torch.equal(wq.zero_point, zp)


def test_uses_histogram_flag_reaches_fake_quantize(toy) -> None:
    """With uses_histogram the qparams are not refreshed per batch (the search runs once at finalize)."""
    cheap = FakeQuantize(QuantizerConfig(U8_ASYM, toy()))
    expensive = FakeQuantize(QuantizerConfig(U8_ASYM, toy(uses_histogram=True)))
    x = torch.randn(4, 6)
    assert torch.equal(cheap(x), cheap(x)) and cheap.is_calibrated  # live qparams
    with pytest.raises(RuntimeError, match="no range was computed"):
        expensive(x)
    expensive.finalize()
    assert expensive.is_calibrated and torch.equal(expensive.scale, cheap.scale)


# --------------------------------------------------------------------------------------
# the registry drives CALIBRATORS, make_observer and uses_histogram
# --------------------------------------------------------------------------------------


def test_calibrators_tuple_follows_the_registry(toy) -> None:
    assert qconfig.CALIBRATORS == calibrator_names() == BUILTINS
    assert isinstance(qconfig.CALIBRATORS, tuple)
    name = toy()
    assert qconfig.CALIBRATORS == (*BUILTINS, name)
    assert QuantizerConfig(U8_ASYM, name).calibrator == name
    unregister_calibrator(name)
    assert qconfig.CALIBRATORS == BUILTINS
    with pytest.raises(ValueError, match="must be one of"):
        QuantizerConfig(U8_ASYM, name)


@pytest.mark.parametrize("calibrator", BUILTINS)
@pytest.mark.parametrize("axis", [None, 0])
def test_builtins_agree_with_make_observer_and_fake_quant(calibrator: str, axis) -> None:
    entry = get_calibrator(calibrator)
    assert isinstance(entry, CalibratorEntry) and entry.name == calibrator
    cfg = QuantizerConfig(QuantSpec(8, axis=axis), calibrator)
    # the histogram calibrators are exactly those computed once (as before the registry)
    assert FakeQuantize(QuantizerConfig(QuantSpec(8), calibrator)).uses_histogram is entry.uses_histogram
    assert entry.uses_histogram is (calibrator in ("percentile", "entropy", "mse"))
    if entry.factory(axis is not None) is None:
        with pytest.raises(ValueError, match="not supported"):
            make_observer(cfg)
        return
    assert make_observer(cfg).calibrator == calibrator
    assert COMMON_OPTIONS <= entry.options(axis is not None)


def test_builtin_entries() -> None:
    mm, ema, pct, ent, mse = (get_calibrator(n) for n in BUILTINS)
    assert (mm.per_tensor, mm.per_channel) == (MinMaxObserver, PerChannelMinMaxObserver)
    assert ema.per_tensor is ema.per_channel is MovingAverageMinMaxObserver
    assert pct.per_channel is PerChannelPercentileObserver and mse.per_channel is PerChannelMSEObserver
    assert ent.per_channel is None and "mse" in ent.unsupported_hint
    for e in (pct, ent, mse):
        assert e.per_tensor.func is HistogramObserver and e.per_tensor.keywords == {"method": e.name}
    assert ema.options(False) == ema.options(True) == {"momentum", "ignore_nonfinite"}
    assert pct.options(False) == {"percentile", "bins", "max_samples", "ignore_nonfinite"}
    assert pct.options(True) == {"percentile", "ignore_nonfinite"}
    assert ent.options(False) == {"bins", "max_clip_fraction", "max_samples", "ignore_nonfinite"}
    assert mse.options(False) == {"bins", "num_candidates", "max_samples", "ignore_nonfinite"}
    assert mse.options(True) == {"num_candidates", "ignore_nonfinite"}
    assert mm.options(False) == mm.options(True) == COMMON_OPTIONS


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_unknown_calibrator_names_the_known_ones(toy) -> None:
    name = toy()
    for call in (
        lambda: QuantizerConfig(U8_ASYM, "kl"),
        lambda: qt.get_qconfig("w8a8").with_activation_calibrator("kl"),
        lambda: get_calibrator("kl"),
    ):
        with pytest.raises(ValueError, match="'kl'") as err:
            call()
        for known in (*BUILTINS, name):
            assert repr(known) in str(err.value)
    # a config made while its calibrator was registered, used after it was removed
    cfg = QuantizerConfig(U8_ASYM, name)
    unregister_calibrator(name)
    with pytest.raises(ValueError, match=rf"unknown calibrator '{name}'; registered calibrators: .*'minmax'"):
        make_observer(cfg)
    with pytest.raises(ValueError, match="unknown calibrator"):
        unregister_calibrator(name)


def test_duplicate_registration_is_refused(toy) -> None:
    name = toy()
    with pytest.raises(ValueError, match=rf"'{name}' is already registered.*unregister_calibrator"):
        register_calibrator(name, per_tensor=MinMaxObserver)
    with pytest.raises(ValueError, match="'minmax' is already registered"):
        register_calibrator("minmax", per_tensor=MinMaxObserver)
    assert get_calibrator(name).per_tensor is ToyObserver  # unchanged
    assert get_calibrator("minmax").per_tensor is MinMaxObserver


def test_bad_registrations_and_builtin_removal() -> None:
    with pytest.raises(ValueError, match="per_tensor and/or a per_channel"):
        register_calibrator("toy-none")
    with pytest.raises(TypeError, match="callable"):
        register_calibrator("toy-bad", per_tensor="MinMaxObserver")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of option names"):
        register_calibrator("toy-str", per_tensor=MinMaxObserver, options="shrink")
    with pytest.raises(TypeError, match="non-empty str"):
        register_calibrator("", per_tensor=MinMaxObserver)
    with pytest.raises(ValueError, match="built in"):
        unregister_calibrator("minmax")
    assert calibrator_names() == BUILTINS


def test_unsupported_granularity_and_options(toy) -> None:
    name = toy(unsupported_hint="use 'minmax' for weights")
    with pytest.raises(ValueError, match=rf"calibrator '{name}' is not supported for per-channel .*use 'minmax' for weights"):
        make_observer(QuantizerConfig(QuantSpec(8, axis=0), name))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['shrnk'\] .*accepted: \['ignore_nonfinite', 'shrink'\]"):
        make_observer(QuantizerConfig(U8_ASYM, name, {"shrnk": 0.5}))
    obs = make_observer(QuantizerConfig(U8_ASYM, name, {"shrink": 0.75, "ignore_nonfinite": True}))
    assert obs.shrink == 0.75 and obs.ignore_nonfinite
    # per-channel only: per-tensor is the unsupported side
    pc = toy(per_tensor=None, per_channel=ToyObserver, options=())
    with pytest.raises(ValueError, match=rf"'{pc}' is not supported for per-tensor quantization \(spec uint8-asym/tensor\)$"):
        make_observer(QuantizerConfig(U8_ASYM, pc))
    assert get_calibrator(pc).options(True) == COMMON_OPTIONS

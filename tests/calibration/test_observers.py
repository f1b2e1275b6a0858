"""Observer tests: torch.ao observers as oracles for min/max and EMA, state_dict
round trips, caching, dtypes and devices, errors and the factory (the histogram: test_histogram.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from qtoolkit.calibration import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
    PerChannelPercentileObserver,
    make_observer,
)
from qtoolkit.config import QuantizerConfig
from qtoolkit.spec import QuantSpec
from tests.calibration.observer_data import I8_SYM_NARROW, U8_ASYM, batches

try:  # oracles only
    from torch.ao.quantization import observer as ao_obs
except Exception:  # pragma: no cover - torch built without torch.ao
    ao_obs = None

needs_ao = pytest.mark.skipif(ao_obs is None, reason="torch.ao.quantization not available")

pytestmark = pytest.mark.usefixtures("one_thread")




def ao(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kw)


def assert_qparams_match(ours, ref) -> None:
    s, z = ours
    rs, rz = ref
    assert s.dtype == torch.float32 and z.dtype == torch.int32
    if s.dim() == 0:  # torch.ao returns shape [1] for per-tensor qparams
        rs, rz = rs.reshape(()), rz.reshape(())
    assert s.shape == rs.shape
    assert torch.allclose(s, rs.float(), rtol=1e-6, atol=0)
    assert torch.equal(z.long(), rz.long())


# --------------------------------------------------------------------------------------
# torch.ao oracles
# --------------------------------------------------------------------------------------


@needs_ao
@pytest.mark.parametrize("relu", [False, True])
def test_minmax_per_tensor_affine_uint8_matches_torch_ao(relu: bool) -> None:
    ours = MinMaxObserver(U8_ASYM)
    ref = ao(ao_obs.MinMaxObserver, dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    for x in batches(relu=relu):
        assert ours(x) is x
        ref(x)
        assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())


@needs_ao
def test_minmax_per_tensor_symmetric_int8_narrow_matches_torch_ao() -> None:
    ours = MinMaxObserver(I8_SYM_NARROW)
    ref = ao(ao_obs.MinMaxObserver, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    for x in batches(seed=1):
        ours(x)
        ref(x)
    assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())
    lo, hi = ours.observed_range()
    assert float(lo) == float(torch.cat([b.flatten() for b in batches(seed=1)]).min())


@needs_ao
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_symmetric_matches_torch_ao(axis: int) -> None:
    spec = QuantSpec(8, signed=True, symmetric=True, narrow_range=True, axis=axis)
    ours = PerChannelMinMaxObserver(spec)
    ref = ao(
        ao_obs.PerChannelMinMaxObserver, ch_axis=axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        quant_min=-127, quant_max=127,
    )
    for x in batches(n=3, seed=2):
        ours(x)
        ref(x)
    assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())


@needs_ao
def test_per_channel_affine_matches_torch_ao() -> None:
    spec = QuantSpec(8, signed=False, symmetric=False, axis=1)
    ours = MinMaxObserver(spec)
    ref = ao(ao_obs.PerChannelMinMaxObserver, ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine,
             quant_min=0, quant_max=255)
    for x in batches(n=3, seed=3):
        ours(x)
        ref(x)
    assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())


@needs_ao
@pytest.mark.parametrize("momentum", [0.01, 0.3])
def test_ema_matches_torch_ao(momentum: float) -> None:
    ours = MovingAverageMinMaxObserver(U8_ASYM, momentum=momentum)
    ref = ao(ao_obs.MovingAverageMinMaxObserver, averaging_constant=momentum, dtype=torch.quint8,
             qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    for x in batches(n=6, seed=4):
        ours(x)
        ref(x)
        assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())


@needs_ao
def test_ema_per_channel_matches_torch_ao() -> None:
    spec = QuantSpec(8, signed=True, symmetric=True, narrow_range=True, axis=0)
    ours = MovingAverageMinMaxObserver(spec, momentum=0.2)
    ref = ao(ao_obs.MovingAveragePerChannelMinMaxObserver, averaging_constant=0.2, ch_axis=0, dtype=torch.qint8,
             qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127)
    for x in batches(n=4, seed=5):
        ours(x)
        ref(x)
    assert_qparams_match(ours.calculate_qparams(), ref.calculate_qparams())


def test_ema_first_batch_initializes_then_averages() -> None:
    obs = MovingAverageMinMaxObserver(QuantSpec(8), momentum=0.25)
    obs(torch.tensor([-2.0, 4.0]))
    assert float(obs.min_val) == -2.0 and float(obs.max_val) == 4.0
    obs(torch.tensor([-6.0, 0.0]))
    assert float(obs.min_val) == pytest.approx(-2.0 + 0.25 * (-6.0 + 2.0))
    assert float(obs.max_val) == pytest.approx(4.0 + 0.25 * (0.0 - 4.0))


# --------------------------------------------------------------------------------------
# state_dict round trips
# --------------------------------------------------------------------------------------


def _make_all() -> list[tuple[str, callable]]:
    pc = QuantSpec(8, signed=True, symmetric=True, narrow_range=True, axis=1)
    return [
        ("minmax", lambda: MinMaxObserver(U8_ASYM)),
        ("minmax_pc", lambda: PerChannelMinMaxObserver(pc)),
        ("ema_pc", lambda: MovingAverageMinMaxObserver(pc, momentum=0.1)),
        ("hist_entropy", lambda: HistogramObserver(U8_ASYM, method="entropy", bins=256)),
        ("hist_percentile_sym", lambda: HistogramObserver(I8_SYM_NARROW, method="percentile", bins=512, percentile=99.9)),
        ("hist_mse", lambda: HistogramObserver(QuantSpec(4, signed=False, symmetric=False), method="mse", bins=512)),
        ("pc_percentile", lambda: PerChannelPercentileObserver(pc, percentile=99.0)),
        ("pc_mse", lambda: PerChannelMSEObserver(pc.with_axis(0))),
    ]


@pytest.mark.parametrize("name,factory", _make_all(), ids=[n for n, _ in _make_all()])
@pytest.mark.parametrize("finalize", [False, True])
def test_state_dict_round_trip_into_fresh_observer(name: str, factory, finalize: bool) -> None:
    obs = factory()
    for x in batches(n=3, seed=6):
        obs(x)
    if finalize:
        obs.finalize()
    s, z = obs.calculate_qparams()
    fresh = factory()
    assert not fresh.has_data
    fresh.load_state_dict(obs.state_dict())
    assert fresh.has_data and fresh.is_finalized == finalize
    s2, z2 = fresh.calculate_qparams()
    assert torch.equal(s, s2) and torch.equal(z, z2)
    lo, hi = obs.observed_range()
    lo2, hi2 = fresh.observed_range()
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)
    # and it keeps observing from the restored state
    more = batches(n=1, seed=7)[0]
    obs(more)
    fresh(more)
    assert torch.equal(obs.calculate_qparams()[0], fresh.calculate_qparams()[0])


def test_reset_then_load_smaller_and_unobserved_state() -> None:
    pc = QuantSpec(8, axis=0)
    a = MinMaxObserver(pc)
    a(torch.randn(5, 3))
    b = MinMaxObserver(pc)  # never observed: empty per-channel buffers load into a used one
    a.load_state_dict(b.state_dict())
    assert not a.has_data
    a(torch.randn(7, 2))  # a new channel count after loading an empty state is fine
    assert a.calculate_qparams()[0].shape == (7,)


def test_finalize_caches_and_new_data_invalidates() -> None:
    obs = HistogramObserver(U8_ASYM, method="entropy", bins=512)
    obs(torch.randn(5000))
    before = obs.calculate_qparams()
    obs.finalize()
    assert obs.is_finalized
    assert torch.equal(obs.clip_hi, obs.compute_range()[1])
    assert torch.equal(obs.calculate_qparams()[0], before[0])
    obs(torch.randn(5000) * 10)
    assert not obs.is_finalized
    assert float(obs.calculate_qparams()[0]) > float(before[0])


def test_bf16_input_and_identity() -> None:
    for obs in (MinMaxObserver(U8_ASYM), HistogramObserver(U8_ASYM, bins=128), PerChannelMSEObserver(QuantSpec(8, axis=0))):
        x = torch.randn(4, 10).to(torch.bfloat16)
        assert obs(x) is x
        lo, hi = obs.observed_range()
        assert lo.dtype == torch.float32
        assert torch.allclose(hi.reshape(-1), x.float().amax(dim=None if hi.dim() == 0 else 1).reshape(-1))


def test_observer_forward_does_not_track_grad() -> None:
    x = torch.randn(10, requires_grad=True)
    obs = HistogramObserver(U8_ASYM, bins=64)
    y = obs(x)
    assert y is x
    assert not obs.hist.requires_grad and not obs.min_val.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("factory", [f for _, f in _make_all()])
def test_cuda_matches_cpu(factory) -> None:  # pragma: no cover - exercised on GPU machines
    cpu, gpu = factory(), factory().to("cuda")
    for x in batches(n=3, seed=12):
        cpu(x)
        gpu(x.cuda())
    s, z = cpu.calculate_qparams()
    s2, z2 = gpu.calculate_qparams()
    # float reductions may differ in the last bits across devices: scales close, zero points within a code
    assert torch.allclose(s, s2.cpu(), rtol=1e-3)
    assert int((z.long() - z2.cpu().long()).abs().max()) <= 1


# --------------------------------------------------------------------------------------
# per-channel weight calibrators
# --------------------------------------------------------------------------------------


def test_per_channel_percentile_and_mse_observers() -> None:
    g = torch.Generator().manual_seed(13)
    w = torch.distributions.StudentT(3.0).sample((16, 8, 3, 3)) * torch.rand(16, 1, 1, 1, generator=g)
    spec = QuantSpec(4, signed=True, symmetric=True, narrow_range=True, axis=0)
    p = PerChannelPercentileObserver(spec, percentile=99.0)
    m = PerChannelMSEObserver(spec)
    mm = PerChannelMinMaxObserver(spec)
    for o in (p, m, mm):
        o(w)
    amax = w.abs().flatten(1).amax(1)
    for o in (p, m):
        lo, hi = o.compute_range()
        assert lo.shape == hi.shape == (16,)
        assert torch.equal(lo, -hi)
        assert (hi <= amax + 1e-6).all() and (hi > 0).all()
        s, z = o.calculate_qparams()
        assert s.shape == (16,) and (z == 0).all()
    ref = torch.quantile(w.abs().flatten(1), 0.99, dim=1)
    assert torch.allclose(p.compute_range()[1], ref, rtol=1e-5, atol=1e-6)
    assert p.calibrator == "percentile" and m.calibrator == "mse"


def test_per_channel_observers_see_the_last_tensor_only() -> None:
    obs = PerChannelPercentileObserver(QuantSpec(8, axis=0), percentile=100.0)
    obs(torch.full((2, 4), 5.0))
    obs(torch.ones(2, 4))
    assert torch.equal(obs.compute_range()[1], torch.ones(2))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


ALL_FACTORIES = [f for _, f in _make_all()] + [lambda: MovingAverageMinMaxObserver(U8_ASYM)]


@pytest.mark.parametrize("factory", ALL_FACTORIES)
def test_no_data_raises_runtime_error_naming_the_observer(factory) -> None:
    obs: ObserverBase = factory()
    obs.name = "layer1.0.conv1.input_quantizer"
    for call in (obs.calculate_qparams, obs.compute_range, obs.observed_range, obs.finalize):
        with pytest.raises(RuntimeError, match=r"layer1\.0\.conv1\.input_quantizer.*calibrat"):
            call()


@pytest.mark.parametrize("factory", ALL_FACTORIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises_value_error_naming_the_observer(factory, bad: float) -> None:
    obs: ObserverBase = factory()
    obs.name = "stem.act_quant"
    x = torch.randn(4, 6, 3)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"stem\.act_quant.*ignore_nonfinite=True"):
        obs(x)
    assert not obs.has_data


@pytest.mark.parametrize("name,factory", _make_all(), ids=[n for n, _ in _make_all()])
def test_ignore_nonfinite_drops_values(name: str, factory) -> None:
    dirty = batches(n=2, seed=14)
    dirty[0].view(-1)[::97] = float("nan")
    dirty[1].view(-1)[5] = float("inf")
    dirty[1].view(-1)[9] = float("-inf")
    a = factory()
    a.ignore_nonfinite = True
    for x in dirty:
        a(x)
    lo, hi = a.observed_range()
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    s, z = a.calculate_qparams()
    assert torch.isfinite(s).all() and (s > 0).all()
    if lo.dim() == 0:  # per-tensor: exactly as if only the finite values had been fed
        b = factory()
        for x in dirty:
            b(x[torch.isfinite(x)])
        assert torch.equal(a.calculate_qparams()[0], b.calculate_qparams()[0])
        fin = torch.cat([x[torch.isfinite(x)] for x in dirty])
        assert float(lo) == float(fin.min()) and float(hi) == float(fin.max())
        if isinstance(a, HistogramObserver):
            assert int(a.hist.sum()) == fin.numel()


def test_ignore_nonfinite_all_nan_batch_records_nothing() -> None:
    obs = MinMaxObserver(U8_ASYM, ignore_nonfinite=True)
    obs(torch.full((5,), float("nan")))
    assert not obs.has_data
    obs(torch.tensor([1.0, float("nan"), -2.0]))
    assert obs.observed_range() == (torch.tensor(-2.0), torch.tensor(1.0))


def test_integer_input_raises_type_error() -> None:
    for obs in (MinMaxObserver(U8_ASYM), HistogramObserver(U8_ASYM), PerChannelMSEObserver(QuantSpec(8, axis=0))):
        obs.name = "fc.input_quantizer"
        with pytest.raises(TypeError, match="fc.input_quantizer"):
            obs(torch.arange(10).reshape(2, 5))


def test_axis_out_of_range_raises_value_error_with_axis_and_shape() -> None:
    for obs in (MinMaxObserver(QuantSpec(8, axis=3)), PerChannelPercentileObserver(QuantSpec(8, axis=3)),
                MovingAverageMinMaxObserver(QuantSpec(8, axis=-4))):
        with pytest.raises(ValueError, match=r"axis=-?[34].*\(2, 5\)"):
            obs(torch.randn(2, 5))


def test_channel_count_change_raises() -> None:
    obs = MinMaxObserver(QuantSpec(8, axis=0))
    obs(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        obs(torch.randn(5, 3))
    obs.reset()
    obs(torch.randn(5, 3))
    assert obs.calculate_qparams()[0].shape == (5,)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="per-tensor"):
        HistogramObserver(QuantSpec(8, axis=0))
    with pytest.raises(ValueError):
        HistogramObserver(U8_ASYM, method="kl")
    with pytest.raises(ValueError):
        PerChannelMinMaxObserver(QuantSpec(8))
    with pytest.raises(ValueError):
        PerChannelPercentileObserver(QuantSpec(8))
    with pytest.raises(ValueError):
        MovingAverageMinMaxObserver(U8_ASYM, momentum=0.0)
    with pytest.raises(TypeError):
        MinMaxObserver("int8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "calibrator,axis,cls,method",
    [
        ("minmax", None, MinMaxObserver, None),
        ("minmax", 0, PerChannelMinMaxObserver, None),
        ("ema", None, MovingAverageMinMaxObserver, None),
        ("ema", 0, MovingAverageMinMaxObserver, None),
        ("percentile", None, HistogramObserver, "percentile"),
        ("entropy", None, HistogramObserver, "entropy"),
        ("mse", None, HistogramObserver, "mse"),
        ("percentile", 0, PerChannelPercentileObserver, None),
        ("mse", 0, PerChannelMSEObserver, None),
    ],
)
def test_make_observer_mapping(calibrator: str, axis, cls, method) -> None:
    obs = make_observer(QuantizerConfig(QuantSpec(8, axis=axis), calibrator))
    assert type(obs) is cls
    assert obs.calibrator == (method or calibrator)
    if method:
        assert obs.method == method


def test_make_observer_options_and_errors() -> None:
    obs = make_observer(QuantizerConfig(U8_ASYM, "percentile", {"percentile": 99.5, "bins": 1024}))
    assert obs.percentile == 99.5 and obs.bins == 1024
    assert make_observer(QuantizerConfig(U8_ASYM, "ema", {"momentum": 0.2})).momentum == 0.2
    assert make_observer(QuantizerConfig(U8_ASYM, "minmax", {"ignore_nonfinite": True})).ignore_nonfinite
    with pytest.raises(ValueError, match="per-channel"):
        make_observer(QuantizerConfig(QuantSpec(8, axis=0), "entropy"))
    with pytest.raises(TypeError, match="momentun"):
        make_observer(QuantizerConfig(U8_ASYM, "ema", {"momentun": 0.1}))
    with pytest.raises(TypeError, match="bins"):
        make_observer(QuantizerConfig(QuantSpec(8, axis=0), "percentile", {"bins": 100}))
    with pytest.raises(TypeError):
        make_observer(U8_ASYM)  # type: ignore[arg-type]


def test_histogram_counts_values_on_bin_edges() -> None:
    """Values exactly on (float32-rounded) edges, the top edge included, are all counted."""
    obs = HistogramObserver(U8_ASYM, method="percentile", bins=32)
    obs(torch.linspace(-1.0, 3.0, 50))
    total = 50
    for _ in range(3):
        e = obs.edges.float()
        x = torch.cat([e, e[-1:].repeat(5), e[:1].repeat(5)])
        obs(x)
        total += x.numel()
        assert int(obs.hist.sum()) == total
        assert int(obs.hist[-1]) >= 5 and int(obs.hist[0]) >= 5


def test_package_reexports_one_module_per_role() -> None:
    """qtoolkit.calibration is the import path; the classes live in one module per role."""
    import qtoolkit.calibration as cal
    from qtoolkit.calibration import base, histogram, minmax, per_channel

    homes = {
        "ObserverBase": base,
        "MinMaxObserver": minmax,
        "PerChannelMinMaxObserver": minmax,
        "MovingAverageMinMaxObserver": minmax,
        "HistogramObserver": histogram,
        "PerChannelPercentileObserver": per_channel,
        "PerChannelMSEObserver": per_channel,
    }
    for name, module in homes.items():
        assert getattr(cal, name) is getattr(module, name) and name in cal.__all__
        assert issubclass(getattr(cal, name), ObserverBase)


OLD_PATHS = {  # module users imported before the package existed -> its home now
    "observer_base": "base",
    "minmax_observers": "minmax",
    "per_channel_observers": "per_channel",
    "histogram_observer": "histogram",
    "histogram_calibrators": "histogram_ranges",
    "tensor_calibrators": "tensor_ranges",
    "calibrator_registry": "registry",
}


@pytest.mark.parametrize("old", [*OLD_PATHS, "observers", "calibrators"])
def test_old_import_paths_keep_working(old: str) -> None:
    import importlib

    import qtoolkit.calibration as cal

    shim = importlib.import_module(f"qtoolkit.{old}")
    home = importlib.import_module(f"qtoolkit.calibration.{OLD_PATHS[old]}") if old in OLD_PATHS else cal
    assert shim.__all__ and all(getattr(shim, n) is getattr(home, n) for n in shim.__all__)
    if old == "observers":
        assert set(shim.__all__) >= {"HistogramObserver", "MinMaxObserver", "ObserverBase", "make_observer"}


def test_the_package_does_not_import_the_old_paths() -> None:
    import ast
    from pathlib import Path

    import qtoolkit.calibration as cal

    old = {f"qtoolkit.{m}" for m in [*OLD_PATHS, "observers", "calibrators"]}
    bad = []
    for path in Path(cal.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names if n in old]
    assert bad == []


def test_make_observer_refuses_what_is_not_a_quantizer_config() -> None:
    with pytest.raises(TypeError, match="make_observer expects a QuantizerConfig"):
        make_observer(U8_ASYM)  # a QuantSpec, not a config


def test_make_observer_unknown_calibrator_names_the_registered_ones() -> None:
    cfg = QuantizerConfig(U8_ASYM, "minmax")
    object.__setattr__(cfg, "calibrator", "kl")  # bypass the config's own check
    with pytest.raises(ValueError, match=r"unknown calibrator 'kl'; registered calibrators: \('minmax', 'ema'"):
        make_observer(cfg)

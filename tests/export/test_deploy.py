"""qt.deploy: OpenVINO / ONNX Runtime deployment, checked against the fake-quant model in float64.

Exact regime (as in test_onnx.py): power-of-two scales and biases on the int32 grid make every conv a sum of
integers times one power of two, exact in float32 in any order, so a faithful engine matches the float64
fake-quant model to the last bits (up to the float tail).  Residual models are checked through the
verification itself (per site, teacher-forced) and by the errors it must raise.  No test reads the CPU's
flags: the no-VNNI case runs in a subprocess with ``ONEDNN_MAX_CPU_ISA=AVX2``, which OpenVINO's oneDNN honours.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.export import ExportError
from qtoolkit.export.deploy import DeployError, check_engine_support
from qtoolkit.export.engine_probe import u8s8_saturates
from qtoolkit.export.engine_verify import verify_engine
from qtoolkit.export.engines import get_engine
from recipes.models import resnet20
from tests.conftest import randomize_bn
from tests.export.test_onnx import _snap_pow2

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
try:
    import openvino  # noqa: F401

    ENGINES = ["openvino", "onnxruntime"]
except ImportError:  # pragma: no cover
    ENGINES = [pytest.param("openvino", marks=pytest.mark.skip(reason="openvino not installed: pip install 'qtoolkit[openvino]'")),
               "onnxruntime"]  # fmt: skip
needs_ov = pytest.mark.skipif("openvino" not in ENGINES, reason="openvino not installed: pip install 'qtoolkit[openvino]'")
ROOT = Path(__file__).resolve().parents[2]


def _calibrated(model: nn.Module, preset="w8a8", shape=(1, 12, 12), **kw) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    qm = qt.prepare(model.eval(), preset, **kw)
    return qt.calibrate(qm, [torch.randn(8, *shape, generator=g) for _ in range(3)], progress=False)


def _plain(preset="w8a8") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))  # fmt: skip
    return _snap_pow2(_calibrated(randomize_bn(net), preset))


def _resnet(preset="w8a8", **kw) -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(randomize_bn(resnet20(num_classes=10, in_channels=1)), preset, **kw)


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _float64(qm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(qm).double()(x.double())


# --------------------------------------------------------------------------- faithful, any batch
@pytest.mark.parametrize("engine", ENGINES)
def test_deployed_matches_float64_fake_quant_exact_regime(engine):
    qm = _plain()
    dm = qt.deploy(qm, _x(2), engine=engine)
    assert dm.report.verification.faithful and dm.report.verification.sites_checked
    for n in (1, 5):  # dynamic batch axis
        x = _x(n, seed=n)
        y, ref = dm(x), _float64(qm, x)
        assert isinstance(y, torch.Tensor) and y.shape == ref.shape == (n, 10)
        assert float((y.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("engine", ENGINES)
def test_resnet_faithful_per_site_and_defaults_visible(engine):
    qm = _resnet()
    dm = qt.deploy(qm, _x(4), engine=engine, threads=1)
    rep = dm.report
    assert rep.verification.faithful and len(rep.verification.sites) >= 10
    assert rep.verification.top1_agreement >= 0.75
    if engine == "openvino":
        assert rep.defaults["INFERENCE_PRECISION_HINT"] == "f32" and rep.settings["INFERENCE_NUM_THREADS"] == 1
    else:
        assert rep.settings["intra_op_num_threads"] == 1 and rep.settings["graph_optimization_level"] == "all"
    assert rep.target in ("vnni", "portable") and "probe" in rep.target_reason
    assert "faithful" in str(rep)


def test_verification_names_the_layer_that_differs():
    """The verifier must be able to fail: a model whose one conv differs from what was compiled."""
    qm = _resnet()
    dm = qt.deploy(qm, _x(2), engine="onnxruntime", verify=False)
    proto = onnx.load_from_string(dm._runner.source)
    bad = copy.deepcopy(qm)
    with torch.no_grad():
        bad.layer2[1].conv1.weight.mul_(1.5)
    eng = get_engine("onnxruntime")
    rep = verify_engine(eng, dm.settings, proto, dm._runner, bad, _x(4))
    assert not rep.faithful and rep.first_divergent.site == "layer2.1.conv2.input_quantizer"
    assert "NOT faithful" in str(rep)


@needs_ov
def test_openvino_bf16_is_refused_naming_a_site():
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("OpenVINO reports no bf16 on this CPU: the hint is ignored")
    with pytest.raises(DeployError, match=r"not faithful .*INFERENCE_PRECISION_HINT.*bf16.*(layer \S+_quantizer|model output \(float ops after fc)"):
        qt.deploy(_resnet(), _x(4), engine="openvino", INFERENCE_PRECISION_HINT="bf16")
    dm = qt.deploy(_resnet(), _x(4), engine="openvino", INFERENCE_PRECISION_HINT="bf16", strict=False)
    assert not dm.report.verification.faithful and dm.report.overrides == {"INFERENCE_PRECISION_HINT": "bf16"}


# --------------------------------------------------------------------------- 4-bit and mixed
@pytest.mark.parametrize("preset", ["w4a8", "w4a4"])
def test_four_bit_on_onnxruntime_is_exact(preset):
    qm = _resnet(preset)
    dm = qt.deploy(qm, _x(4), engine="onnxruntime")
    assert dm.report.verification.faithful
    if preset == "w4a4":  # 4-bit grids: ORT is exact end to end
        assert dm.report.verification.rel_l2 < 1e-5


@needs_ov
def test_four_bit_on_openvino():
    dm = qt.deploy(_resnet("w4a8"), _x(4), engine="openvino")
    assert dm.report.verification.faithful
    dm = qt.deploy(_plain("w4a4"), _x(2), engine="openvino")  # 4-bit activations without adds: exact
    assert float((dm(_x(3)).double() - _float64(_plain("w4a4"), _x(3))).abs().max()) < 1e-4
    with pytest.raises(DeployError, match=r"engine='openvino'.*layer1\.0\.add_0 .*4-bit"):
        qt.deploy(_resnet("w4a4"), _x(2), engine="openvino")
    mixed = _resnet("w8a8", overrides={"layer2.*": "w4a4"})  # mixed: 4-bit adds in stage 2 only
    with pytest.raises(DeployError, match=r"layer2\.0\.add_0"):
        check_engine_support(mixed, "openvino")
    assert qt.deploy(mixed, _x(4), engine="onnxruntime").report.verification.faithful


# --------------------------------------------------------------------------- save / load, errors
@pytest.mark.parametrize("engine", ENGINES)
def test_save_and_load(engine, tmp_path):
    qm = _plain()
    dm = qt.deploy(qm, _x(2), engine=engine)
    paths = dm.save(tmp_path / "d")
    names = {p.name for p in paths}
    assert names == ({"model.xml", "model.bin", "deploy.json"} if engine == "openvino" else {"model.onnx", "deploy.json"})
    meta = json.loads((tmp_path / "d" / "deploy.json").read_text())
    assert meta["engine"] == engine and meta["verification"]["faithful"] and meta["settings"] == dm.settings
    dm2 = qt.load_deployed(tmp_path / "d", threads=1)
    x = _x(3, seed=7)
    assert torch.equal(dm(x), dm2(x))
    assert dm2.report.overrides


def test_bad_inputs_are_named(tmp_path):
    qm = _plain()
    with pytest.raises(ValueError, match="engine must be one of"):
        qt.deploy(qm, _x(1), engine="tensorrt")
    with pytest.raises(ValueError, match="target must be"):
        qt.deploy(qm, _x(1), engine="onnxruntime", target="int4")
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        qt.deploy(qm, [1, 2], engine="onnxruntime")
    with pytest.raises(ValueError, match="threads must be a positive int"):
        qt.deploy(qm, _x(1), engine="onnxruntime", threads=0)
    with pytest.raises(ValueError, match="unknown setting 'bogus'"):
        qt.deploy(qm, _x(1), engine="onnxruntime", bogus=1)
    with pytest.raises(ExportError):
        qt.deploy(qt.convert(qm), _x(1), engine="onnxruntime")
    with pytest.raises(FileNotFoundError, match="deploy.json"):
        qt.load_deployed(tmp_path)
    dm = qt.deploy(qm, _x(1), engine="onnxruntime", verify=False)
    assert dm.report.verification is None
    with pytest.raises(ValueError, match="takes 1 input"):
        dm(_x(1), _x(1))


# --------------------------------------------------------------------------- the probe
@pytest.mark.parametrize("engine", ENGINES)
def test_probe_portable_form_is_exact(engine):
    eng = get_engine(engine)
    assert u8s8_saturates(eng, eng.defaults(1), "uint8") is False
    assert isinstance(u8s8_saturates(eng, eng.defaults(1), "int8"), bool)


@needs_ov
def test_openvino_without_vnni_saturates_and_deploy_picks_portable():
    """OpenVINO's oneDNN capped to AVX2 (no VNNI): int8 weights saturate, deploy chooses uint8 weights."""
    code = textwrap.dedent("""
        import torch, qtoolkit as qt
        from qtoolkit.export.engine_probe import u8s8_saturates
        from qtoolkit.export.engines import get_engine
        from tests.export.test_deploy import _calibrated, _snap_pow2, _x
        eng = get_engine("openvino")
        s = eng.defaults(1)
        print(u8s8_saturates(eng, s, "int8"), u8s8_saturates(eng, s, "uint8"))
        conv = _snap_pow2(_calibrated(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))))
        dm = qt.deploy(conv, _x(2), engine="openvino", threads=1)
        print(dm.report.target, dm.report.verification.faithful)
    """)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "portable", "True"]

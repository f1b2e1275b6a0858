"""``scripts/check_zoo.py`` on a fast subset: the table's columns are computed and mean what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qtoolkit.kernels import onednn

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 ops unavailable on this CPU/build")


def _load():
    spec = importlib.util.spec_from_file_location("check_zoo", ROOT / "scripts" / "check_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_zoo_on_two_small_classifiers(tmp_path, capsys):
    zoo = _load()
    out = tmp_path / "zoo.json"
    rows = zoo.main(["--models", "squeezenet1_1,mobilenet_v3_small", "--size", "64", "--batch", "2", "--calib-batches", "1",
                     "--eval-batches", "1", "--executions", "fast,reference", "--drift-floor", "--threads", "1",
                     "--json", str(out)])  # fmt: skip
    assert [r["model"] for r in rows] == ["squeezenet1_1", "mobilenet_v3_small"]
    for r in rows:
        assert "error" not in r, r
        # every converted layer within one output step of the reference on the same input; reference = fake quant
        assert r["fast_max_layer_steps"] <= 1.0 and r["reference_sqnr_db"] == float("inf")
        assert sum(r["strategies"].values()) > 0 and r["fast_sqnr_db"] > 20
        assert r["fakequant32_vs_64_sqnr_db"] > 20 and r["fast_vs_fakequant64_sqnr_db"] > 20
        # squeezenet's cats, MobileNetV3's squeeze-excitation muls and hardswish/hardsigmoid (lookup tables) are
        # quantized too: nothing left float
        assert r["float_ops"] == 0 and r["float_op_kinds"] == [] and r["int8_flops_%"] >= 95.0
    saved = json.loads(out.read_text())
    assert "u8s8 saturates (probed)" in saved["cpu"] and len(saved["rows"]) == 2
    table = zoo.markdown_table(saved["rows"])
    assert table.count("\n") == 3 and "| squeezenet1_1 |" in table
    assert "| mobilenet_v3_small |" in capsys.readouterr().out


def test_check_zoo_timm_subset(tmp_path):
    """``--source timm`` on two small families: timm's BatchNormAct2d folded, squeeze-excitation and SiLU/hardswish
    tables int8; the bars' columns computed (the counterpart's SQNR read from a torchvision --json file)."""
    pytest.importorskip("timm")
    zoo = _load()
    tv = tmp_path / "tv.json"
    tv.write_text(json.dumps({"cpu": "", "rows": [{"model": "efficientnet_b0", "fakequant_vs_fp32_sqnr_db": 30.0}]}))
    out = tmp_path / "zoo_timm.json"
    rows = zoo.main(["--source", "timm", "--models", "efficientnet:efficientnet_b0,mobilenetv3:mobilenetv3_small_050",
                     "--size", "64", "--batch", "2", "--calib-batches", "1", "--eval-batches", "1", "--executions", "fast",
                     "--drift-floor", "--threads", "1", "--counterpart-json", str(tv), "--json", str(out)])  # fmt: skip
    assert [r["model"] for r in rows] == ["efficientnet_b0", "mobilenetv3_small_050"]
    for r in rows:
        assert "error" not in r, r
        assert r["float_ops"] == 0 and r["float_ops_other"] == [] and r["int8_flops_%"] >= 95.0
        assert r["fakequant_vs_fp32_sqnr_db"] > 20 and r["fast_vs_fakequant64_sqnr_db"] > 20
        assert r["meets"]["converts"] and r["meets"]["only_norm_softmax_movement_float"] and r["meets"]["int8_flops_95"]
    assert rows[0]["torchvision_counterpart"] == "efficientnet_b0" and rows[0]["torchvision_fakequant_vs_fp32_sqnr_db"] == 30.0
    assert rows[0]["meets"]["within_3db_of_torchvision"] == (rows[0]["fakequant_vs_fp32_sqnr_db"] >= 27.0)
    saved = json.loads(out.read_text())
    assert saved["source"] == "timm" and saved["threads"] == 1
    # the command that reproduces the run, in the header and in every row (rows of several runs may be merged)
    assert saved["command"].startswith(".venv/bin/python scripts/check_zoo.py --source timm --models efficientnet:")
    assert saved["command"].endswith(f"--json {out}") and all(r["command"] == saved["command"] for r in saved["rows"])
    assert zoo.allowed_float("LayerNorm2d") and zoo.allowed_float("softmax") and not zoo.allowed_float("add")

"""Smoke test of recipes.train_fp32 and tests of recipes.checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.checkpoints import (
    SHIPPED,
    ChecksumMismatchError,
    StateDictMismatchError,
    load_checkpoint,
    registry_entry,
    sha256_file,
)
from recipes.models import resnet20
from recipes.train_fp32 import main as train_main


@pytest.fixture
def trained(tiny_fashion: Path, tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "out"
    report = train_main(
        ["--epochs", "1", "--max-batches", "2", "--batch-size", "8", "--data-dir", str(tiny_fashion),
         "--out", str(out), "--threads", "1", "--no-progress"]
    )
    return report, out


def test_train_smoke(trained: tuple[dict, Path]) -> None:
    report, out = trained
    ckpt = out / "resnet20_fashion-mnist.pt"
    assert ckpt.is_file() and not list(out.glob("*.tmp"))
    assert report["sha256"] == sha256_file(ckpt)
    data = json.loads((out / "train_resnet20_fashion-mnist.json").read_text())
    assert data["sha256"] == report["sha256"] and len(data["epochs"]) == 1
    assert 0.0 <= data["final_test_top1"] <= 100.0 and data["wall_time_s"] > 0
    assert data["args"]["max_batches"] == 2
    assert report["sha256"] in (out / "train_resnet20_fashion-mnist.md").read_text()
    state = torch.load(ckpt, weights_only=True)
    assert set(state) == set(resnet20(10, 1).state_dict())
    assert registry_entry(out / "train_resnet20_fashion-mnist.json")["sha256"] == report["sha256"]


def test_load_checkpoint_ok(trained: tuple[dict, Path]) -> None:
    report, out = trained
    model = resnet20(10, 1)
    load_checkpoint(model, out / "resnet20_fashion-mnist.pt", expected_sha256=report["sha256"])
    saved = torch.load(out / "resnet20_fashion-mnist.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sha256_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(resnet20(10, 1).state_dict(), path)
    model = resnet20(10, 1)
    before = _snapshot(model)
    with pytest.raises(ChecksumMismatchError) as info:
        load_checkpoint(model, path, expected_sha256="0" * 64)
    msg = str(info.value)
    assert str(path) in msg and "0" * 64 in msg and sha256_file(path) in msg and "regenerate" in msg
    assert _unchanged(model, before)


def test_shape_mismatch_leaves_model_untouched(tmp_path: Path) -> None:
    path = tmp_path / "m3.pt"
    torch.save(resnet20(10, 3).state_dict(), path)  # 3 input channels
    model = resnet20(10, 1)
    before = _snapshot(model)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(model, path)
    assert "conv1.weight" in str(info.value) and "(16, 3, 3, 3)" in str(info.value)
    assert _unchanged(model, before)


def test_missing_keys_listed(tmp_path: Path) -> None:
    state = resnet20(10, 1).state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "k.pt"
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError, match=r"(?s)missing keys.*fc\.bias.*unexpected keys.*extra\.weight"):
        load_checkpoint(resnet20(10, 1), path)


def test_shipped_registry_shape() -> None:
    entry = SHIPPED["resnet20_fashion-mnist"]
    assert entry["path"] == "recipes/checkpoints/resnet20_fashion-mnist.pt"
    assert "recipes.train_fp32" in entry["command"]
    # the registry is filled from the training run's own report, and the file matches it
    import json
    from pathlib import Path

    from recipes.checkpoints import REPO_ROOT, sha256_file

    report = json.loads(Path(REPO_ROOT, "recipes/checkpoints/train_resnet20_fashion-mnist.json").read_text())
    assert entry["sha256"] == report["sha256"] == sha256_file(Path(REPO_ROOT, entry["path"]))
    assert entry["test_top1"] == round(report["final_test_top1"], 2) >= 93.5
    assert entry["command"].split("train_fp32")[1] == report["command"].split("train_fp32")[1]

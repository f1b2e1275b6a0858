"""recipes.qat tuning options: ``--scale-lr`` (own learning rate for LSQ step sizes), ``--schedule linear``,
``--label-smoothing`` and ``--no-augment``, on the tiny Fashion-MNIST fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes import qat


def _common(data: Path, ckpt: Path) -> list[str]:
    return ["--data-dir", str(data), "--checkpoint", str(ckpt), "--threads", "1", "--max-batches", "1",
            "--batch-size", "8", "--no-progress", "--train-batch-size", "8", "--calib-batch-size", "8",
            "--init", "calibrate", "--no-eval-init", "--wd", "0", "--schedule", "constant"]


def _saved(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "qat_w4a4.pt", weights_only=True)["state_dict"]


def test_scale_lr_zero_keeps_the_step_sizes(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    common = _common(tiny_fashion, tiny_ckpt) + ["--lsq", "--epochs", "1"]
    qat.main(common + ["--out", str(tmp_path / "ref"), "--lr", "0"])  # nothing moves: the calibrated start
    qat.main(common + ["--out", str(tmp_path / "s0"), "--lr", "0.05", "--scale-lr", "0"])
    qat.main(common + ["--out", str(tmp_path / "s1"), "--lr", "0.05", "--scale-lr", "1"])
    ref, s0, s1 = _saved(tmp_path / "ref"), _saved(tmp_path / "s0"), _saved(tmp_path / "s1")
    scales = [k for k in ref if k.endswith(("weight_quantizer.scale", "input_quantizer.scale"))]
    weights = [k for k in ref if k.endswith("conv1.weight")]
    assert scales and weights
    assert all(torch.equal(s0[k], ref[k]) for k in scales)  # step sizes frozen at scale-lr 0
    assert any(not torch.equal(s0[k], ref[k]) for k in weights)  # while the weights trained
    assert any(not torch.equal(s1[k], ref[k]) for k in scales)  # and at scale-lr 1 the step sizes move


def test_linear_schedule_decays_to_zero(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    args = _common(tiny_fashion, tiny_ckpt)
    args[args.index("constant")] = "linear"
    res = qat.main(args + ["--out", str(tmp_path / "lin"), "--lr", "0.01", "--epochs", "4"])
    # one step per epoch, 4 steps in all: lr at the start of epoch e is 0.01 * (1 - e / 4)
    assert [h["lr"] for h in res["history"]] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


def test_label_smoothing_and_no_augment_change_the_loss(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    common = _common(tiny_fashion, tiny_ckpt) + ["--epochs", "1", "--lr", "0.01"]
    base = qat.main(common + ["--out", str(tmp_path / "base")])
    again = qat.main(common + ["--out", str(tmp_path / "again")])
    smooth = qat.main(common + ["--out", str(tmp_path / "ls"), "--label-smoothing", "0.2"])
    clean = qat.main(common + ["--out", str(tmp_path / "clean"), "--no-augment"])
    loss = base["history"][0]["train_loss"]
    assert again["history"][0]["train_loss"] == pytest.approx(loss)  # same seed, same loss: the checks below mean something
    assert smooth["history"][0]["train_loss"] != pytest.approx(loss)
    assert clean["history"][0]["train_loss"] != pytest.approx(loss)
    assert smooth["args"]["label_smoothing"] == 0.2 and clean["args"]["no_augment"]

"""recipes.qat with distillation from the FP32 model (``--distill``): the run records its loss, the labels are
not needed with ``--distill 1``, and the FP32 model used as teacher is left as it was."""

from __future__ import annotations

from pathlib import Path

import torch

from recipes import qat


def test_qat_distill_runs_and_records_the_loss(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    before = torch.load(tiny_ckpt, weights_only=True)
    common = ["--data-dir", str(tiny_fashion), "--checkpoint", str(tiny_ckpt), "--threads", "1", "--max-batches", "2",
              "--batch-size", "8", "--no-progress", "--train-batch-size", "8", "--calib-batch-size", "8",
              "--epochs", "1", "--init", "calibrate", "--lr", "0.01", "--wd", "0"]
    res = qat.main(common + ["--out", str(tmp_path / "kd"), "--distill", "1", "--distill-temperature", "2"])
    assert res["args"]["distill"] == 1.0 and res["epochs_done"] == 1
    md = (tmp_path / "kd" / "qat_results.md").read_text()
    assert "distillation from the FP32 model's logits (temperature 2.0), labels unused" in md
    ce = qat.main(common + ["--out", str(tmp_path / "ce")])
    assert "cross-entropy on the labels" in (tmp_path / "ce" / "qat_results.md").read_text()
    # same start, same data order: a different loss trains a different model
    assert res["history"][0]["train_loss"] != ce["history"][0]["train_loss"]
    after = torch.load(tiny_ckpt, weights_only=True)
    assert before.keys() == after.keys()

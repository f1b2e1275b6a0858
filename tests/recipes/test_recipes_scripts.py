"""Smoke tests of the quantization recipes (ptq, qat, evaluate, main_job, report) on the
tiny Fashion-MNIST idx fixture with a checkpoint trained for 2 batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes import evaluate, main_job, ptq, qat, report
from recipes.common import load_fp32, load_prepared, make_qconfig, predict, top1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _common(data: Path, ckpt: Path) -> list[str]:
    return ["--data-dir", str(data), "--checkpoint", str(ckpt), "--threads", "1", "--max-batches", "2",
            "--batch-size", "8", "--no-progress"]


@pytest.mark.parametrize("module", [ptq, qat, evaluate, main_job, report])
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_make_qconfig() -> None:
    qc = make_qconfig("w4a8", "percentile", percentile=99.9, per_tensor_weights=True, lsq=True)
    assert qc.activation.calibrator == "percentile" and qc.activation.options == {"percentile": 99.9}
    assert qc.weight.spec.axis is None and qc.weight.spec.bits == 4
    assert qc.weight.learnable and qc.activation.learnable


def test_ptq_and_evaluate(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ptq"
    res = ptq.main(_common(tiny_fashion, tiny_ckpt) + [
        "--out", str(out), "--presets", "w8a8,w4a8", "--calibrators", "minmax,percentile", "--calib-batch-size", "8",
        "--keep-8bit", "conv1,fc", "--integer-check"])
    data = json.loads((out / "ptq_results.json").read_text())
    assert data["smoke"] and data["calibration"]["split"] == "train" and data["calibration"]["samples"] == 16
    assert [(r["preset"], r["calibrator"]) for r in data["results"]] == [
        ("w8a8", "minmax"), ("w8a8", "percentile"), ("w4a8", "minmax"), ("w4a8", "percentile")]
    for r in data["results"]:
        assert {"top1", "drop_pt", "calibration_s", "size_bytes", "clip_ranges"} <= set(r)
        assert 0.0 <= r["top1"] <= 100.0 and r["calibration_s"] > 0 and r["size_bytes"] > 0
        assert "layer1.0.conv1" in r["clip_ranges"]
    sizes = {r["preset"]: r["size_bytes"] for r in data["results"]}
    assert sizes["w4a8"] < sizes["w8a8"] < data["fp32"]["size_bytes"]  # int4 packed < int8 < fp32
    assert sum(r["best_of_preset"] for r in data["results"]) == 2
    ic = data["integer_check"]
    assert set(ic["executions"]) >= {"reference", "integer"}
    for e in (ic["executions"]["reference"], ic["executions"]["integer"]):
        assert {"top1", "agreement_vs_fake_quant", "pass"} <= set(e)
    assert ic["executions"]["reference"]["agreement_vs_fake_quant"] == 100.0
    md = (out / "ptq_results.md").read_text()
    assert "| w4a8 | percentile" in md and "Converted int8 model" in md
    hist = json.loads((out / "ptq_histograms.json").read_text())
    assert "layer1.0.conv1" in hist["histograms"]["w8a8"] and "w8a8/minmax" in hist["clip_ranges"]

    # the saved best W8A8 model reloads to the same predictions (evaluate.py path)
    best = out / "ptq_best_w8a8.pt"
    assert best.is_file() and res["best"]["w8a8"]["path"] == str(best)
    ev = evaluate.main(_common(tiny_fashion, tiny_ckpt) + ["--out", str(tmp_path / "eval"), "--quantized", str(best),
                                                           "--executions", "reference,integer,fast"])
    assert ev["fake_quant"]["top1"] == pytest.approx(res["best"]["w8a8"]["top1"])
    assert ev["fp32"]["top1"] == pytest.approx(data["fp32"]["top1"])
    assert ev["converted"]["reference"]["agreement_vs_fake_quant"] == 100.0
    assert "fast" in ev["converted"]  # measured, or the reason it is unavailable
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert {"fp32", "fake_quant", "converted", "env"} <= set(saved)
    assert (tmp_path / "eval" / "eval_results.md").is_file()


def test_ptq_reconstruction_and_mixed_precision_reload(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ptq"
    res = ptq.main(_common(tiny_fashion, tiny_ckpt) + [
        "--out", str(out), "--presets", "w4a4", "--calibrators", "mse", "--calib-batch-size", "8",
        "--method", "bias_correction+adaround", "--recon-iters", "3", "--mixed-precision", "--size-budget", "1.2"])
    rows = res["results"]
    assert [(r["preset"], r["method"]) for r in rows] == [("w4a4", "bias_correction+adaround"),
                                                          ("w4a4+mixed", "bias_correction+adaround")]
    mp = rows[1]["mixed_precision"]
    assert mp["high_layers"] and mp["weight_bytes"] <= 1.2 * mp["low_weight_bytes"]
    assert rows[0]["reconstruct_s"] > 0 and rows[0]["reconstruct_units"]
    md = (out / "ptq_results.md").read_text()
    assert "bias_correction+adaround" in md and "### Mixed precision" in md
    # the saved mixed-precision model (rounded weights, corrected biases, 8-bit layers) reloads to the same top-1
    fp32, _ = load_fp32("resnet20", "fashion-mnist", tiny_ckpt)
    qm, meta = load_prepared(out / "ptq_best_w4a4_mixed.pt", fp32)
    assert meta["high_layers"] == mp["high_layers"]
    test = ptq.test_loader("fashion-mnist", 8, str(tiny_fashion), False)
    preds, labels, _ = predict(qm, test, max_batches=2, progress=False)
    assert top1(preds, labels) == pytest.approx(rows[1]["top1"])
    with pytest.raises(ValueError, match="unknown method"):
        ptq.main(_common(tiny_fashion, tiny_ckpt) + ["--out", str(tmp_path / "x"), "--method", "adarond"])


def test_qat_resume_and_reload(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    args = _common(tiny_fashion, tiny_ckpt) + ["--out", str(out), "--train-batch-size", "8", "--calib-batch-size", "8",
                                               "--freeze-observers-epoch", "1", "--freeze-bn-epoch", "1",
                                               "--act-calibrator", "ema", "--init", "calibrate", "--bn", "live"]
    first = qat.main(args + ["--epochs", "1"])
    assert first["epochs_done"] == 1 and first["init"]["top1"] is not None
    assert (out / "qat_checkpoint.pt").is_file() and (out / "qat_w4a4.pt").is_file()
    second = qat.main(args + ["--epochs", "2", "--resume"])
    assert second["epochs_done"] == 2
    assert second["history"][0] == first["history"][0]  # epoch 1 restored from the checkpoint, not retrained
    assert second["history"][1]["observers_frozen"] and second["history"][1]["bn_frozen"]
    data = json.loads((out / "qat_results.json").read_text())
    assert {"history", "top1", "train_time_s", "size_bytes", "init", "keep_8bit"} <= set(data)
    assert data["keep_8bit"] == ["conv1", "fc"] and data["weight_bits"] == 4 and data["activation_bits"] == 4
    assert "| 2 |" in (out / "qat_results.md").read_text()

    # the saved prepared QAT model reloads and reproduces the final evaluation
    fp32, _ = load_fp32("resnet20", "fashion-mnist", tiny_ckpt)
    qm, meta = load_prepared(out / "qat_w4a4.pt", fp32)
    assert meta["qat"] and meta["keep_8bit"] == ["conv1", "fc"]
    test = ptq.test_loader("fashion-mnist", 8, str(tiny_fashion), False)
    preds, labels, _ = predict(qm, test, max_batches=2, progress=False)
    assert top1(preds, labels) == pytest.approx(second["top1"])


def test_qat_lsq_converts(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    res = qat.main(_common(tiny_fashion, tiny_ckpt) + [
        "--out", str(tmp_path / "qat"), "--train-batch-size", "8", "--calib-batch-size", "8", "--epochs", "1",
        "--lsq", "--act-calibrator", "percentile", "--no-eval-init", "--lr", "0.05", "--init", "calibrate"])
    assert res["args"]["lsq"] and res["act_calibrator"] == "percentile" and res["init"]["bn"] == "folded"
    assert res["size_bytes"] is not None  # learned scales stay positive, so the model converts
    sd = torch.load(tmp_path / "qat" / "qat_w4a4.pt", weights_only=True)["state_dict"]
    assert all((v > 0).all() for k, v in sd.items() if k.endswith("_quantizer.scale"))
    # the saved LSQ model reloads (scales as parameters) and reproduces the final evaluation
    fp32, _ = load_fp32("resnet20", "fashion-mnist", tiny_ckpt)
    qm, meta = load_prepared(tmp_path / "qat" / "qat_w4a4.pt", fp32)
    assert meta["lsq"] and not meta["qat"]
    test = ptq.test_loader("fashion-mnist", 8, str(tiny_fashion), False)
    preds, labels, _ = predict(qm, test, max_batches=2, progress=False)
    assert top1(preds, labels) == pytest.approx(res["top1"])


def test_qat_starts_from_a_saved_reconstructed_model(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    ptq_res = ptq.main(_common(tiny_fashion, tiny_ckpt) + [
        "--out", str(tmp_path / "ptq"), "--presets", "w4a4", "--calibrators", "mse", "--calib-batch-size", "8",
        "--keep-8bit", "conv1,fc", "--method", "adaround", "--recon-iters", "2", "--hist-layers", ""])
    saved = ptq_res["best"]["w4a4"]["path"]
    res = qat.main(_common(tiny_fashion, tiny_ckpt) + [
        "--out", str(tmp_path / "qat"), "--train-batch-size", "8", "--epochs", "1", "--init", saved,
        "--preset", "w8a8", "--keep-8bit", ""])  # the file's preset and kept layers win
    assert res["keep_8bit"] == ["conv1", "fc"] and res["weight_bits"] == 4
    assert res["init"]["method"] == "adaround" and res["init"]["bn"] == "folded"
    assert res["init"]["top1"] == pytest.approx(ptq_res["best"]["w4a4"]["top1"])  # the very model PTQ evaluated
    assert res["curve"] == [] or all("step" in c for c in res["curve"])


def test_qat_user_model_class_and_checkpoint(tiny_fashion: Path, tmp_path: Path) -> None:
    from tests.recipes.peer_model import PeerNet

    torch.manual_seed(0)
    ckpt = tmp_path / "peer.pt"
    torch.save(PeerNet().state_dict(), ckpt)
    res = qat.main(_common(tiny_fashion, ckpt) + [
        "--model", "tests.recipes.peer_model:PeerNet", "--out", str(tmp_path / "qat"), "--train-batch-size", "8",
        "--calib-batch-size", "8", "--epochs", "1", "--init", "calibrate", "--keep-8bit", "conv1,fc"])
    assert res["checkpoint"]["model_class"] == "tests.recipes.peer_model:PeerNet" and res["epochs_done"] == 1
    with pytest.raises(Exception, match="needs its FP32 weights"):
        load_fp32("tests.recipes.peer_model:PeerNet", "fashion-mnist", None)


def test_main_job_smoke(tiny_fashion: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = main_job.main(["--data-dir", str(tiny_fashion), "--checkpoint", str(tiny_ckpt), "--threads", "1",
                         "--max-batches", "2", "--no-progress", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                         "--calibrators", "minmax,percentile", "--qat-epochs", "1", "--no-install",
                         "--qat-args=--lsq --train-batch-size 8", "--recon-iters", "3", "--qat-eval-every", "1"])
    data = json.loads((out / "results.json").read_text())
    assert {"meta", "fp32", "rows", "checks", "plots", "ptq", "qat"} <= set(data)
    methods = [r["method"] for r in data["rows"]]
    assert methods[0] == "FP32" and "PTQ minmax" in methods and "QAT + LSQ from PTQ mse + qdrop" in methods
    assert "int8 converted (integer)" in methods and "int8 converted (reference)" in methods
    # QAT starts from the reconstructed W4A4 model (conv1/fc at W8A8) of step 2b: the same top-1 at its start
    start = next(r for r in data["rows"] if r["method"] == "PTQ mse + qdrop (QAT start)")
    keep8_qdrop = [r for r in data["rows"] if r["method"] == "PTQ mse + qdrop" and r["bits"] == "W4A4"
                   and r["notes"] == "conv1, fc at W8A8"]
    assert len(keep8_qdrop) == 1 and start["top1"] == pytest.approx(keep8_qdrop[0]["top1"])
    # step 2b: reconstruction rows (uniform, mixed precision, W4A8, and the stem/classifier-at-8-bit runs)
    assert methods.count("PTQ mse + qdrop") == 4 and "PTQ mse + qdrop (mixed precision)" in methods
    bars = [c["bar"] for c in data["checks"]]
    for bar in ("W4A4 all layers PTQ", "W4A4 PTQ, conv1, fc at W8A8", "W4A8 PTQ drop", "W2A4 PTQ reported",
                "mixed precision at 1.10x", "reconstruction <="):
        assert any(b.startswith(bar) for b in bars), bar
    for r in data["rows"]:
        assert {"bits", "top1", "drop_pt", "size_bytes", "time_s"} <= set(r)
    assert {r["bits"] for r in data["rows"]} >= {"FP32", "W8A8", "W4A8", "W4A4"}
    assert data["meta"]["smoke"] and data["meta"]["wall_time_s"] > 0
    assert any("QAT drop <= 0.1 pt after <= 1 epoch" in c["bar"] for c in data["checks"])
    assert any("QAT >= the model it starts from (PTQ mse + qdrop)" in c["bar"] for c in data["checks"])
    assert [r["bits"] for r in data["rows"] if r["method"].startswith("QAT")] == ["W4A4"]  # default --qat-preset
    assert (out / "results.md").read_text().count("## QAT per epoch") == 1
    assert any("eval_acc" in c for c in data["qat"][0]["curve"])  # --qat-eval-every reached recipes.qat
    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md and "| method | bits | top-1 (%)" in md and "## Accuracy bars" in md
    for png in ("accuracy_vs_bits.png", "activation_histograms.png", "qat_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert res["plots"].keys() == {"accuracy_vs_bits", "activation_histograms", "sensitivity_w4a4_mse", "qat_curves"}
    assert (out / "sensitivity_w4a4_mse.png").read_bytes()[:8] == PNG_MAGIC

    # the report can be rebuilt from the saved JSON files
    work = tmp_path / "work"
    again = report.main(["--fp32", str(work / "eval" / "eval_results.json"), "--ptq", str(work / "ptq" / "ptq_results.json"),
                         *[str(work / f"ptq_qdrop_{n}" / "ptq_results.json") for n in ("w4a4_all", "w4a8_all", "keep8")],
                         "--qat", str(work / "qat" / "qat_results.json"), "--out", str(tmp_path / "report2")])
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in data["rows"]]


def test_main_job_cifar_trains_fp32_first(tiny_cifar: Path, tmp_path: Path, capsys) -> None:
    res = main_job.main(["--dataset", "cifar10", "--data-dir", str(tiny_cifar), "--threads", "1", "--max-batches", "1",
                         "--fp32-epochs", "1", "--no-progress", "--out", str(tmp_path / "report"),
                         "--work-dir", str(tmp_path / "work"), "--presets", "w8a8", "--calibrators", "minmax",
                         "--skip-qat", "--skip-integer-check", "--skip-reconstruction", "--no-install"])
    assert "training one first" in capsys.readouterr().out
    assert (tmp_path / "work" / "fp32" / "resnet20_cifar10.pt").is_file()
    assert "trained by this job" in res["meta"]["checkpoint"]


def test_missing_dataset_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main_job.ensure_dataset("cifar10", str(tmp_path), download=False, allow_install=False)
    assert "cifar10 dataset is not available" in str(info.value) and "--data-dir" in str(info.value)


def test_estimate_fp32_training() -> None:
    torch.manual_seed(0)
    est = main_job.estimate_fp32_training("resnet20", "fashion-mnist", epochs=1, batch_size=4, steps=1)
    assert est > 0


def test_missing_fashion_mnist_is_installed_with_apt_when_root(monkeypatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    state = {"installed": False}

    class _DS:
        source = "/usr/share/datasets/fashion-mnist"

    def fake_get_dataset(name, split, data_dir=None, augment=None, download=False):
        if not state["installed"]:
            raise main_job.DatasetNotFoundError("Fashion-MNIST idx files not found")
        return _DS()

    def fake_call(cmd, env=None):
        calls.append(cmd)
        state["installed"] = True
        return 0

    monkeypatch.setattr(main_job, "get_dataset", fake_get_dataset)
    monkeypatch.setattr(main_job.subprocess, "call", fake_call)
    monkeypatch.setattr(main_job.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(main_job.os, "geteuid", lambda: 0)
    assert main_job.ensure_dataset("fashion-mnist", None, False, allow_install=True) == _DS.source
    assert calls == [["/usr/bin/apt-get", "install", "-y", "dataset-fashion-mnist"]]

    # not root: no install attempt, a clear message instead
    state["installed"], calls[:] = False, []
    monkeypatch.setattr(main_job.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as info:
        main_job.ensure_dataset("fashion-mnist", None, False, allow_install=True)
    assert calls == [] and "apt-get install -y dataset-fashion-mnist" in str(info.value)

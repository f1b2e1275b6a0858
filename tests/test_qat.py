"""QAT fine-tuning: schedule, checkpoints/resume, bad input, 2-process DDP."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import qtoolkit as qt
from qtoolkit.nn import QuantLayer
from qtoolkit.qat import QATConfig, QATTrainer, evaluate_top1, fit_qat, sync_quantizers
from tests._ddp_worker import TinyNet, make_data

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"


# ---------------------------------------------------------------------------- helpers


def _loaders(seed: int = 0, n: int = 192, batch: int = 32):
    x, y = make_data(n, seed=1)
    ex, ey = make_data(128, seed=2)
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    evl = DataLoader(TensorDataset(ex, ey), batch_size=64)
    return train, evl


def _qat_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return qt.prepare(TinyNet(**kw), "w8a8", qat=True)


def _states_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bitwise) or are missing."""
    diff = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        if not torch.equal(a[k], b[k]):
            diff.append(k)
    return diff


def _clone_sd(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------- training + schedule


def test_training_improves_and_schedule_applies_at_the_right_epochs():
    model = _qat_model()
    train, evl = _loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snaps = []

    def eval_fn(m):
        assert not m.training
        assert all(not bool(fq.observer_enabled) for _, fq in qt.quantizers(m))  # observers off while evaluating
        snaps.append({
            "act_scale": m.conv1.input_quantizer.scale.clone(),
            "add_scale": m.add_0.lhs_quantizer.scale.clone(),
            "w_scale": m.conv2.weight_quantizer.scale.clone(),
            "bn_mean": m.conv1.bn.running_mean.clone(),
        })
        return evaluate_top1(m, evl)

    cfg = QATConfig(epochs=4, freeze_bn_epoch=2, freeze_observers_epoch=3, progress=False)
    trainer = QATTrainer(model, train, opt, config=cfg, eval_fn=eval_fn)
    hist = trainer.fit()

    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert hist[-1]["train_acc"] > hist[0]["train_acc"]
    assert hist[-1]["eval_acc"] >= 0.9
    assert set(hist[0]) >= {"epoch", "train_loss", "train_acc", "eval_acc", "lr", "seconds"}
    # schedule: BN frozen from epoch index 2, observers from index 3
    assert [h["bn_frozen"] for h in hist] == [False, False, True, True]
    assert [h["observers_frozen"] for h in hist] == [False, False, False, True]
    same = [[torch.equal(snaps[i][k], snaps[i + 1][k]) for i in range(3)] for k in ("act_scale", "add_scale", "w_scale", "bn_mean")]
    assert same[0] == [False, False, True]  # activation range moves until observers freeze
    assert same[1] == [False, False, True]
    assert same[2] == [False, False, True]  # weight range frozen too
    assert same[3] == [False, True, True]  # BN statistics stop after freeze_bn_epoch
    # final flags / buffers; the model is back in train mode
    assert all(int(fq.observer_enabled) == 0 for _, fq in qt.quantizers(model))
    bn_layers = [m for m in model.modules() if isinstance(m, QuantLayer) and m.bn is not None]
    assert len(bn_layers) == 2 and all(int(m.bn_frozen) == 1 for m in bn_layers)
    assert model.training
    # every range is known after QAT (observe-only output quantizers included): convert works
    assert qt.uncalibrated_sites(model) == []
    int8 = qt.convert(model)
    ex, ey = evl.dataset.tensors
    with torch.no_grad():
        int8_acc = (int8(ex).argmax(1) == ey).float().mean().item()
    assert abs(int8_acc - hist[-1]["eval_acc"]) <= 0.05


def test_fit_qat_scheduler_per_batch_grad_clip_and_max_batches():
    model = _qat_model()
    train, evl = _loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cfg = QATConfig(epochs=2, max_batches_per_epoch=3, grad_clip=1.0, progress=False)
    hist = fit_qat(model, train, opt, cfg, scheduler=sched, scheduler_step="batch", eval_loader=evl)
    assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1 * 0.5**3])  # 3 scheduler steps per epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert all(0.0 <= h["eval_acc"] <= 1.0 for h in hist)


def test_evaluate_top1_restores_mode_and_flags():
    model = _qat_model()
    train, evl = _loaders()
    model(next(iter(train))[0])  # observers record once
    before = _clone_sd(model)
    acc = evaluate_top1(model, evl, max_batches=1)
    assert 0.0 <= acc <= 1.0
    assert model.training and all(int(fq.observer_enabled) == 1 for _, fq in qt.quantizers(model))
    assert _states_equal(before, _clone_sd(model)) == []  # evaluation moved nothing
    assert sync_quantizers(model) is model  # not distributed: no-op


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_each_epoch_is_atomic_and_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "qat.pt"
    model = _qat_model()
    train, evl = _loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    QATTrainer(model, train, opt, config=QATConfig(epochs=2, progress=False), scheduler=sched,
               eval_loader=evl, checkpoint_path=path).fit()
    assert os.listdir(tmp_path) == ["qat.pt"]  # no temporary files left
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert {"model", "optimizer", "scheduler", "rng", "qat_schedule", "history"} <= set(ckpt)
    assert isinstance(ckpt["rng"][0]["torch"], torch.Tensor) and ckpt["rng"][0]["torch"].dtype == torch.uint8
    assert ckpt["qat_schedule"]["freeze_observers_epoch"] == 4
    assert _states_equal(ckpt["model"], model.state_dict()) == []

    # a crash while writing epoch 2's checkpoint leaves epoch 1's intact
    path2 = tmp_path / "crash" / "qat.pt"
    path2.parent.mkdir()
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    model = _qat_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(OSError, match="disk full"):
        QATTrainer(model, train, opt, config=QATConfig(epochs=2, progress=False), checkpoint_path=path2).fit()
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(path2.parent) == ["qat.pt"]
    assert torch.load(path2, weights_only=True)["epoch"] == 1


def _resume_setup(seed: int):
    model = _qat_model(seed=seed, dropout=0.2)  # dropout: the global torch RNG matters too
    train, evl = _loaders(seed=seed)  # the shuffle generator's state is checkpointed
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, train, evl, opt, sched


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = dict(freeze_bn_epoch=1, freeze_observers_epoch=2, progress=False)
    # uninterrupted: 3 epochs
    torch.manual_seed(123)
    model, train, evl, opt, sched = _resume_setup(0)
    ref = QATTrainer(model, train, opt, config=QATConfig(epochs=3, **cfg), scheduler=sched, eval_loader=evl)
    ref_hist = ref.fit()
    # interrupted: 1 epoch + checkpoint ...
    torch.manual_seed(123)
    path = tmp_path / "qat.pt"
    model1, train1, evl1, opt1, sched1 = _resume_setup(0)
    QATTrainer(model1, train1, opt1, config=QATConfig(epochs=1, **cfg), scheduler=sched1, eval_loader=evl1,
               checkpoint_path=path).fit()
    # ... then a fresh process-like start (other seeds, other init) resumes and trains epochs 2-3
    torch.manual_seed(999)
    model2, train2, evl2, opt2, sched2 = _resume_setup(7)
    tr = QATTrainer(model2, train2, opt2, config=QATConfig(epochs=3, **cfg), scheduler=sched2, eval_loader=evl2,
                    checkpoint_path=path, resume=True)
    assert tr.epoch == 1 and len(tr.history) == 1
    hist = tr.fit()

    assert _states_equal(model2.state_dict(), model.state_dict()) == []  # weights, BN, quantizers, flags
    assert _nested_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(hist) == drop(ref_hist)
    assert torch.load(path, weights_only=True)["epoch"] == 3


# ---------------------------------------------------------------------------- bad input


class _TinyNetWithHead(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(super().forward(x))


def test_bad_inputs_fail_before_training(tmp_path):
    train, _ = _loaders()
    model = _qat_model()
    before = _clone_sd(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = QATConfig(epochs=1, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QATTrainer(model, train, opt, config=cfg, checkpoint_path=tmp_path / "missing_dir" / "qat.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        QATTrainer(model, train, opt, config=cfg, checkpoint_path=tmp_path / "none.pt", resume=True)
    with pytest.raises(ValueError, match="scheduler_step"):
        QATTrainer(model, train, opt, config=cfg, scheduler_step="step")
    with pytest.raises(ValueError, match="not both"):
        QATTrainer(model, train, opt, config=cfg, eval_loader=train, eval_fn=lambda m: 0.0)
    with pytest.raises(ValueError, match="freeze_bn_epoch"):
        QATConfig(freeze_bn_epoch=-1)
    assert _states_equal(before, _clone_sd(model)) == []

    ptq = qt.prepare(TinyNet(), "w8a8")  # qat=False
    with pytest.raises(ValueError, match=r"qat=True"):
        QATTrainer(ptq, train, torch.optim.SGD(ptq.parameters(), lr=0.1), config=cfg)
    plain = TinyNet()
    with pytest.raises(ValueError, match="no quantizers"):
        QATTrainer(plain, train, torch.optim.SGD(plain.parameters(), lr=0.1), config=cfg)
    float_model = TinyNet()
    qat_model = qt.prepare(float_model, "w8a8", qat=True)
    with pytest.raises(ValueError, match="optimizer holds none"):  # optimizer built on the float model
        QATTrainer(qat_model, train, torch.optim.SGD(float_model.parameters(), lr=0.1), config=cfg)
    frozen = _qat_model()
    with pytest.raises(RuntimeError, match="no range yet"):  # observers frozen from epoch 0, never calibrated
        QATTrainer(frozen, train, torch.optim.SGD(frozen.parameters(), lr=0.1),
                   config=QATConfig(epochs=1, freeze_observers_epoch=0, progress=False)).fit()


def test_resume_from_mismatched_checkpoint_names_keys_and_leaves_model_unchanged(tmp_path):
    train, _ = _loaders()
    path = tmp_path / "qat.pt"
    src = _qat_model()
    QATTrainer(src, train, torch.optim.SGD(src.parameters(), lr=0.05), config=QATConfig(epochs=1, progress=False),
               checkpoint_path=path).fit()

    torch.manual_seed(1)
    other = qt.prepare(_TinyNetWithHead(), "w8a8", qat=True)
    other(next(iter(train))[0])  # some quantizer state to protect
    opt = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    before, opt_before = _clone_sd(other), opt.state_dict()
    with pytest.raises(ValueError, match=r"head\.weight") as err:
        QATTrainer(other, train, opt, config=QATConfig(epochs=2, progress=False), checkpoint_path=path, resume=True)
    assert "missing from the checkpoint" in str(err.value) and "head.input_quantizer.*" in str(err.value)
    assert _states_equal(before, _clone_sd(other)) == []
    assert _nested_equal(opt.state_dict(), opt_before)

    wrong_classes = qt.prepare(TinyNet(classes=3), "w8a8", qat=True)
    before = _clone_sd(wrong_classes)
    with pytest.raises(ValueError, match=r"shape mismatch: fc\.bias"):
        QATTrainer(wrong_classes, train, torch.optim.SGD(wrong_classes.parameters(), lr=0.05),
                   config=QATConfig(epochs=2, progress=False), checkpoint_path=path, resume=True)
    assert _states_equal(before, _clone_sd(wrong_classes)) == []


# ---------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo unavailable")
def test_ddp_two_ranks_end_with_identical_quantizers(tmp_path):
    world, port = 2, str(_free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(tmp_path)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    deadline = time.monotonic() + 120
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("DDP workers timed out after 120 s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{out[-3000:]}" for r, (p, out) in enumerate(zip(procs, outputs)))
        pytest.fail(f"DDP workers failed:\n{logs}")

    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    a, b = res[0]["after_fit"], res[1]["after_fit"]
    assert a["quantizers"], "no quantizer state saved"
    scales = [k for k in a["quantizers"] if k.endswith((".scale", ".zero_point"))]
    assert len(scales) >= 10
    assert _states_equal(a["quantizers"], b["quantizers"]) == []  # scales, zero points, observer buffers
    assert _states_equal(a["params"], b["params"]) == []
    assert _states_equal(a["buffers"], b["buffers"]) == []
    for r in range(world):  # resuming under DDP restores rank 0's final state on every rank
        assert _states_equal(res[r]["resumed"]["buffers"], a["buffers"]) == []
        assert _states_equal(res[r]["resumed"]["params"], a["params"]) == []
    assert res[0]["history"] == [{**res[1]["history"][0], "seconds": res[0]["history"][0]["seconds"]}]
    # without a sync, local observer updates make the ranks disagree; sync_quantizers fixes it
    assert _states_equal(res[0]["diverged"]["quantizers"], res[1]["diverged"]["quantizers"]) != []
    assert _states_equal(res[0]["after_sync"]["quantizers"], res[1]["after_sync"]["quantizers"]) == []
    assert _states_equal(res[0]["after_sync"]["buffers"], res[1]["after_sync"]["buffers"]) == []
    # rank 0 wrote the checkpoint, with rank 0's final state
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == world and len(ckpt["rng"]) == world
    assert _states_equal({k: v for k, v in ckpt["model"].items() if k in a["params"]}, a["params"]) == []
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "rank0.pt", "rank1.pt"]


def test_hand_written_qat_loop_converts_without_calibrate():
    """A plain optimizer loop (no QATTrainer, no calibrate) must leave every
    observe-only output quantizer with qparams, so convert() succeeds and the
    converted reference path tracks the fake-quant model."""
    train, _ = _loaders()
    model = _qat_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for x, y in train:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert qt.uncalibrated_sites(model) == []
    model.eval()
    x = make_data(16, seed=5)[0]
    with torch.no_grad(), qt.observers_disabled(model):
        ref = model(x)
        out = qt.convert(model)(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()


# ---------------------------------------------------------------------------- damaged checkpoints


def _saved_checkpoint(tmp_path) -> tuple[Path, torch.nn.Module, QATTrainer]:
    path = tmp_path / "qat.pt"
    model = _qat_model()
    train, _ = _loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = QATTrainer(model, train, opt, config=QATConfig(epochs=1, progress=False, max_batches_per_epoch=2), checkpoint_path=path)
    trainer.fit()
    return path, model, trainer


def _fresh_trainer() -> tuple[torch.nn.Module, QATTrainer]:
    model = _qat_model(seed=1)
    train, _ = _loaders()
    return model, QATTrainer(model, train, torch.optim.SGD(model.parameters(), lr=0.05), config=QATConfig(epochs=1, progress=False))


def test_checkpoint_with_flipped_bytes_is_rejected_and_model_unchanged(tmp_path):
    path, _, _ = _saved_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    # flip bytes inside the largest stored tensor (the zip layout stays valid; only the content changes)
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(16):
        data[start + 64 + k] ^= 0xFF
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    model, trainer = _fresh_trainer()
    before = _clone_sd(model)
    with pytest.raises(ValueError, match="corrupted: its content does not match the sha256"):
        trainer.load_checkpoint(path)
    assert _states_equal(before, model.state_dict()) == []


def test_truncated_and_empty_checkpoints_say_what_is_wrong(tmp_path):
    path, _, _ = _saved_checkpoint(tmp_path)
    data = path.read_bytes()
    _, trainer = _fresh_trainer()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*bytes\): \w+.*truncated"):
        trainer.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        trainer.load_checkpoint(path)


def test_stale_temporary_of_a_crashed_save_is_removed(tmp_path):
    stale = tmp_path / ".qat.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint from a killed process")
    other = tmp_path / ".other.pt.x.tmp"
    other.write_bytes(b"not ours")
    _saved_checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".other.pt.x.tmp", "qat.pt"]


def test_batches_whose_input_is_a_tuple_of_arguments():
    """((x,), y) batches: the input tuple is the model's positional arguments, for the trainer and evaluation."""
    model = _qat_model()
    x, y = make_data(64, seed=1)
    batches = [((x[i:i + 32],), y[i:i + 32]) for i in (0, 32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hist = QATTrainer(model, batches, opt, config=QATConfig(epochs=1, progress=False)).fit()
    assert len(hist) == 1 and math.isfinite(hist[0]["train_loss"])
    assert 0.0 <= evaluate_top1(model, batches) <= 1.0


# ---------------------------------------------------------------------------- QAT from a PTQ state


def _ptq_model(seed: int = 0, preset: str = "w4a4") -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    x, _ = make_data(64, seed=3)
    calib = [x[i:i + 32] for i in range(0, 64, 32)]
    qm = qt.prepare(TinyNet().eval(), preset)
    qt.calibrate(qm, calib, progress=False)
    return qm, calib


def _weights_on_grid(qm: torch.nn.Module) -> bool:
    return all(torch.equal(m.weight_quantizer(m.weight.detach()), m.weight.detach())
               for m in qm.modules() if isinstance(m, QuantLayer))


def test_start_from_reconstructed_keeps_rounding_and_step_sizes_then_trains():
    from qtoolkit.qat import start_from_prepared

    qm, calib = _ptq_model()
    qt.reconstruct(qm, calib, "adaround", iters=8, batch_size=16, progress=False)
    assert _weights_on_grid(qm)  # reconstruction wrote code * scale into the weights
    before = _clone_sd(qm)
    eval_x = calib[0]
    with torch.no_grad():
        out_before = qm.eval()(eval_x)
    start_from_prepared(qm)
    assert all(not bool(fq.observer_enabled) for _, fq in qt.quantizers(qm))
    assert _states_equal(before, _clone_sd(qm)) == []  # nothing recomputed: same codes, same scales
    with torch.no_grad():
        assert torch.equal(qm.eval()(eval_x), out_before)
    train, _ = _loaders()
    opt = torch.optim.SGD(qm.parameters(), lr=0.02, momentum=0.9)
    hist = QATTrainer(qm, train, opt, config=QATConfig(epochs=1, progress=False, log_interval=2)).fit()
    after = _clone_sd(qm)
    scales = [k for k in before if k.endswith(".scale") or k.endswith(".zero_point")]
    assert scales and all(torch.equal(before[k], after[k]) for k in scales)  # ranges stayed frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # weights trained
    assert math.isfinite(hist[0]["train_loss"])


def test_lsq_from_calibrated_state_learns_scales_from_their_calibrated_values():
    from qtoolkit.qat import start_from_prepared

    qm, _ = _ptq_model(seed=1)
    calibrated = {n: fq.scale.detach().clone() for n, fq in qt.quantizers(qm) if fq.role in ("weight", "activation")}
    start_from_prepared(qm, lsq=True)
    learnable = {n: fq for n, fq in qt.quantizers(qm) if isinstance(fq.scale, torch.nn.Parameter)}
    assert set(learnable) == set(calibrated)
    assert all(torch.equal(fq.scale.detach(), calibrated[n]) for n, fq in learnable.items())
    train, _ = _loaders()
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    QATTrainer(qm, train, opt, config=QATConfig(epochs=1, progress=False, max_batches_per_epoch=3)).fit()
    assert any(not torch.equal(fq.scale.detach(), calibrated[n]) for n, fq in learnable.items())
    sd = qm.state_dict()  # same keys as before (the buffer became a parameter of the same name)
    assert all(f"{n}.scale" in sd for n in learnable)


def test_trainer_refuses_an_uncalibrated_ptq_model_and_start_from_prepared_names_it():
    from qtoolkit.qat import start_from_prepared

    train, _ = _loaders()
    ptq = qt.prepare(TinyNet(), "w8a8")
    with pytest.raises(ValueError, match="not calibrated"):
        QATTrainer(ptq, train, torch.optim.SGD(ptq.parameters(), lr=0.1), config=QATConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="no range yet"):
        start_from_prepared(ptq)


def test_reestimate_bn_equals_float64_batch_averages():
    """With fake quantization off, the re-estimated running mean/var of the stem BN are the averages of the
    per-batch mean / unbiased variance of conv1's output (computed here in float64)."""
    from qtoolkit.qat import reestimate_bn

    torch.manual_seed(0)
    float_model = TinyNet().eval()
    qm = qt.prepare(float_model, "w8a8", qat=True)
    x, _ = make_data(96, seed=4)
    batches = [x[i:i + 32] for i in range(0, 96, 32)]
    qt.calibrate(qm, batches, progress=False)
    qt.disable_fake_quant(qm)
    layer = next(m for m in qm.modules() if isinstance(m, QuantLayer) and m.bn is not None)
    assert reestimate_bn(qm, batches) == 3
    w = float_model.conv1.weight.double()
    means, vars_ = [], []
    for b in batches:
        y = torch.nn.functional.conv2d(b.double(), w, None, padding=1)
        means.append(y.mean(dim=(0, 2, 3)))
        vars_.append(y.var(dim=(0, 2, 3), unbiased=True))
    assert torch.allclose(layer.bn.running_mean.double(), torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(layer.bn.running_var.double(), torch.stack(vars_).mean(0), rtol=1e-4, atol=1e-6)
    assert layer.bn.momentum == float_model.bn1.momentum  # restored


def test_training_curve_points_every_log_interval():
    train, _ = _loaders(n=192, batch=32)  # 6 steps
    model = _qat_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = QATTrainer(model, train, opt, config=QATConfig(epochs=2, progress=False, log_interval=3,
                                                             eval_every_batches=3), eval_loader=train)
    hist = trainer.fit()
    train_pts = [c for c in trainer.curve if "train_loss" in c]
    assert [c["step"] for c in train_pts] == [3, 6, 9, 12]
    assert [c["epoch"] for c in train_pts] == [0.5, 1.0, 1.5, 2.0]
    # the two windows of an epoch average to the epoch's loss (equal batch sizes)
    assert (train_pts[0]["train_loss"] + train_pts[1]["train_loss"]) / 2 == pytest.approx(hist[0]["train_loss"], rel=1e-9)
    assert [c["step"] for c in trainer.curve if "eval_acc" in c] == [3, 9]  # mid-epoch only (epoch ends: history)

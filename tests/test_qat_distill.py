"""Distillation from a float teacher in QATTrainer: the loss against a float64 reference, one training step
against a hand-written step, and the argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.qat import QATConfig, QATTrainer, distillation_loss, start_from_prepared


def _kd_reference(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    s64, t64 = s.double() / temp, t.double() / temp
    p = torch.exp(s64) / torch.exp(s64).sum(dim=1, keepdim=True)
    q = torch.exp(t64) / torch.exp(t64).sum(dim=1, keepdim=True)
    return (q * (torch.log(q) - torch.log(p))).sum(dim=1).mean() * temp * temp


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_distillation_loss_matches_float64(temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    torch.testing.assert_close(distillation_loss(s, t, temp).double(), _kd_reference(s, t, temp), rtol=1e-5, atol=1e-6)
    sr = s.clone().requires_grad_(True)
    distillation_loss(sr, t, temp).backward()
    # d/ds of T²·KL averaged over N: T·(p − q)/N
    p, q = torch.softmax(s.double() / temp, 1), torch.softmax(t.double() / temp, 1)
    torch.testing.assert_close(sr.grad.double(), temp * (p - q) / s.shape[0], rtol=1e-5, atol=1e-7)
    assert float(distillation_loss(s, s, temp)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, 0.0)


def _setup():
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 6), torch.randint(0, 4, (8,))) for _ in range(2)]
    qm = qt.calibrate(qt.prepare(fp32, "w4a4"), [x for x, _ in data], progress=False)
    return fp32, start_from_prepared(qm), data


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_trainer_step_with_teacher_matches_hand_written_step(weight):
    fp32, qm, data = _setup()
    ref = copy.deepcopy(qm)
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    cfg = QATConfig(epochs=1, progress=False, max_batches_per_epoch=1, distill_weight=weight, distill_temperature=2.0)
    QATTrainer(qm, data, opt, config=cfg, teacher=copy.deepcopy(fp32)).fit()
    # the same step by hand
    x, y = data[0]
    ref.train()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    with torch.no_grad():
        t = fp32(x)
    out = ref(x)
    log_p, log_q = torch.log_softmax(out / 2.0, 1), torch.log_softmax(t / 2.0, 1)
    kd = (log_q.exp() * (log_q - log_p)).sum(1).mean() * 4.0
    loss = kd if weight == 1.0 else (1 - weight) * nn.functional.cross_entropy(out, y) + weight * kd
    loss.backward()
    opt_r.step()
    for (n, a), (_, b) in zip(qm.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_labels_unused_with_full_distillation():
    """distill_weight=1: the step does not depend on the labels."""
    fp32, qm, data = _setup()
    qm2 = copy.deepcopy(qm)
    other = [(x, (y + 1) % 4) for x, y in data]
    for model, d in ((qm, data), (qm2, other)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        QATTrainer(model, d, opt, config=QATConfig(epochs=1, progress=False), teacher=copy.deepcopy(fp32)).fit()
    for a, b in zip(qm.parameters(), qm2.parameters()):
        assert torch.equal(a, b)


def test_teacher_checks():
    fp32, qm, data = _setup()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shares parameters"):
        QATTrainer(qm, data, opt, config=QATConfig(epochs=1, progress=False), teacher=qm)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        QATTrainer(qm, data, opt, config=QATConfig(epochs=1, progress=False), teacher="fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distill_weight"):
        QATConfig(distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature"):
        QATConfig(distill_temperature=0)

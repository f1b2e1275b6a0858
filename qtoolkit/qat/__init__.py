"""Quantization-aware fine-tuning: a small trainer with torchvision's QAT schedule.

:class:`QATTrainer` fine-tunes a model returned by
``qtoolkit.prepare(model, qconfig, qat=True)`` (fake quantization + live BN), or
a calibrated / reconstructed PTQ model made ready by :func:`start_from_prepared`
(BN folded, learned rounding and step sizes kept, optional LSQ): QAT that starts
where PTQ ends.

* **schedule** (applied at the start of every epoch, 0-based, as in torchvision's
  ``train_quantization.py``): ``epoch >= freeze_observers_epoch`` →
  :func:`~qtoolkit.toggles.disable_observers` (quantizer ranges frozen);
  ``epoch >= freeze_bn_epoch`` → :func:`~qtoolkit.toggles.freeze_bn` (BN uses its
  running statistics). The trainer only ever *freezes*; it never re-enables
  observers or BN updates you switched off yourself.
* **output ranges**: after every epoch the observe-only output quantizers get
  their scale / zero point from what they recorded, so the trained model can go
  straight to :func:`qtoolkit.convert`.
* **evaluation** after every epoch: top-1 of the fake-quantized model in eval mode
  with observers disabled (:func:`evaluate_top1`), or your own ``eval_fn``.
* **checkpoints** after every epoch, atomically (temporary file in the same
  directory + ``os.replace``), loadable with ``torch.load(path, weights_only=True)``:
  model / optimizer / scheduler state, epoch, history, RNG states (torch, CUDA,
  Python, NumPy and the data loader's generator) and the QAT schedule.
  ``resume=True`` continues bit-for-bit where the checkpoint left off.
* **DistributedDataParallel**: pass the DDP-wrapped model; toggles, checkpoints and
  evaluation use ``.module``. After every epoch :func:`sync_quantizers` broadcasts
  the quantizers' state (and the BN statistics) from rank 0, so every rank holds
  the same ranges; loss/accuracy are averaged over ranks; only rank 0 writes
  checkpoints.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> from qtoolkit.qat import QATConfig, QATTrainer
    >>> float_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                             nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    >>> model = qt.prepare(float_model, "w8a8", qat=True)
    >>> data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(4)]
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    >>> trainer = QATTrainer(model, data, opt, config=QATConfig(epochs=2, progress=False),
    ...                      eval_loader=data)
    >>> history = trainer.fit()
    >>> sorted(history[-1])[:4]
    ['bn_frozen', 'epoch', 'eval_acc', 'lr']
"""

from qtoolkit.qat.checkpoint import payload_checksum, read_checkpoint
from qtoolkit.qat.config import QATConfig
from qtoolkit.qat.distributed import sync_quantizers, unwrap_model
from qtoolkit.qat.evaluation import evaluate_top1
from qtoolkit.qat.from_prepared import has_live_bn, is_ptq_form, reestimate_bn, start_from_prepared
from qtoolkit.qat.trainer import QATTrainer, distillation_loss, fit_qat

__all__ = ["QATConfig", "QATTrainer", "fit_qat", "distillation_loss", "sync_quantizers", "evaluate_top1", "unwrap_model", "read_checkpoint",
           "payload_checksum", "start_from_prepared", "reestimate_bn", "has_live_bn", "is_ptq_form"]

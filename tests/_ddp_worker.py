"""Helper for tests/test_qat.py: one rank of a 2-process gloo DDP QAT run.

Usage: ``python tests/_ddp_worker.py RANK WORLD_SIZE PORT OUT_DIR``

Each rank trains one short epoch on its own data shard with
:class:`qtoolkit.qat.QATTrainer` on a ``DistributedDataParallel`` model and saves
``OUT_DIR/rank{RANK}.pt`` with its quantizer state, parameters and buffers:

* ``after_fit``: right after ``fit`` (the trainer synchronized the quantizers);
* ``diverged``: after one more local forward on rank-specific data (observers move);
* ``after_sync``: after an explicit ``sync_quantizers``;
* ``resumed``: a fresh DDP model resumed from rank 0's checkpoint.

The tiny model and the synthetic data live here so the test can share them.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch import nn

NUM_CLASSES = 4


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN + add + ReLU, global pool, (dropout,) Linear; 3×8×8 inputs."""

    def __init__(self, classes: int = NUM_CLASSES, dropout: float = 0.0, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out = torch.relu(out + x)
        out = torch.flatten(self.pool(out), 1)
        return self.fc(self.drop(out))


def make_data(n: int, seed: int, classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic images: a per-class colour + spatial pattern, plus noise."""
    proto = torch.Generator().manual_seed(1234)  # the class prototypes are the same for every split
    colours = torch.randn(classes, 3, 1, 1, generator=proto) * 1.5
    patterns = torch.randn(classes, 3, 8, 8, generator=proto) * 0.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = colours[y] + patterns[y] + 0.7 * torch.randn(n, 3, 8, 8, generator=g)
    return x, y


def snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Quantizer state (FakeQuantize + observer buffers), parameters and all buffers."""
    from qtoolkit.toggles import quantizers

    quant = {}
    for name, fq in quantizers(model):
        for key, value in fq.state_dict().items():
            quant[f"{name}.{key}"] = value.detach().clone()
    return {
        "quantizers": quant,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
    }


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    import qtoolkit as qt
    from qtoolkit.qat import QATConfig, QATTrainer, sync_quantizers

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        model = qt.prepare(TinyNet(), "w8a8", qat=True)
        ddp = DDP(model)
        x, y = make_data(64 * world, seed=7)
        xs, ys = x[rank::world], y[rank::world]  # a different shard per rank
        xs = xs * (1.0 + 0.5 * rank)  # and a different activation range, so unsynced observers would differ
        loader = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(100 + rank))
        ex, ey = make_data(32 * world, seed=8)
        eval_loader = DataLoader(TensorDataset(ex[rank::world], ey[rank::world]), batch_size=32)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        trainer = QATTrainer(ddp, loader, opt, config=QATConfig(epochs=1, progress=False), eval_loader=eval_loader,
                             checkpoint_path=os.path.join(out_dir, "ckpt.pt"))
        history = trainer.fit()
        result = {"after_fit": snapshot(model), "history": history}
        # every rank resumes a fresh DDP model from rank 0's checkpoint (nothing left to train)
        torch.manual_seed(1 + rank)
        fresh = qt.prepare(TinyNet(), "w8a8", qat=True)
        fresh_ddp = DDP(fresh)
        resumed = QATTrainer(fresh_ddp, loader, torch.optim.SGD(fresh_ddp.parameters(), lr=0.05, momentum=0.9),
                             config=QATConfig(epochs=1, progress=False), checkpoint_path=os.path.join(out_dir, "ckpt.pt"),
                             resume=True)
        def no_time(hs):
            return [{k: v for k, v in h.items() if k != "seconds"} for h in hs]

        assert no_time(resumed.fit()) == no_time(history)  # rank 0's history (wall times differ per rank)
        result["resumed"] = snapshot(fresh)
        model.train()
        with torch.no_grad():  # local forward: this rank's observers move on their own
            model(xs[:16] * (1.0 + rank))
        if rank == 1:  # lazily sized per-channel statistics: sync must reallocate them to rank 0's shapes
            model.conv1.weight_quantizer.observer.reset()
        result["diverged"] = snapshot(model)
        sync_quantizers(ddp, include_model_buffers=True)
        result["after_sync"] = snapshot(model)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

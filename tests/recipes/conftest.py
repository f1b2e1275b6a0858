"""Fixtures for the recipes tests: tiny on-disk Fashion-MNIST / CIFAR-10 datasets."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # make `import recipes` work with plain `pytest`
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep tests light on the shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed idx file (big-endian header)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> Path:
    """Fashion-MNIST-format idx.gz set: 40 train images (labels 0..9), 20 test images.

    Train images are filled with value 200 + label, test images with 10 + label, so tests
    can tell which split a sample came from.
    """
    d = tmp_path / "fashion"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n, base in (("train", 40, 200), ("t10k", 20, 10)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.broadcast_to((base + labels)[:, None, None], (n, 28, 28)).copy()
        images[:, 0, 0] = rng.integers(0, 256, n)  # a little noise in one pixel
        write_idx_gz(d / f"{split}-images-idx3-ubyte.gz", images)
        write_idx_gz(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """CIFAR-10 python-pickle layout with 6 random images per batch file."""
    root = tmp_path / "cifar"
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, 6)],
            b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(6)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return root


@pytest.fixture
def tiny_ckpt(tiny_fashion: Path, tmp_path: Path) -> Path:
    """A ResNet-20 FP32 checkpoint trained for two batches on the tiny Fashion-MNIST (recipes.train_fp32)."""
    from recipes.train_fp32 import main as train_main

    out = tmp_path / "fp32"
    train_main(["--epochs", "1", "--max-batches", "2", "--batch-size", "8", "--data-dir", str(tiny_fashion),
                "--out", str(out), "--threads", "1", "--no-progress"])
    return out / "resnet20_fashion-mnist.pt"

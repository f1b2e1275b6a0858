"""Tests for recipes.data on tiny on-disk datasets made by the fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recipes.data as rdata
from recipes.data import (
    DatasetNotFoundError,
    get_calibration_loader,
    get_dataset,
    get_loaders,
    random_crop_flip,
    read_idx,
)


def test_read_idx_roundtrip(tiny_fashion: Path) -> None:
    images = read_idx(tiny_fashion / "train-images-idx3-ubyte.gz")
    labels = read_idx(tiny_fashion / "train-labels-idx1-ubyte.gz")
    assert images.shape == (40, 28, 28) and labels.shape == (40,)
    assert images[3, 5, 5] == 203 and labels[3] == 3


def test_fashion_loaders(tiny_fashion: Path) -> None:
    train, test = get_loaders("fashion-mnist", batch_size=16, data_dir=tiny_fashion, seed=0)
    assert len(train.dataset) == 40 and len(test.dataset) == 20
    assert train.dataset.source == str(tiny_fashion)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    xt, yt = next(iter(test))
    # test: no augmentation, in order; value 10 + label normalized with mean/std of Fashion-MNIST
    expected = ((10 + yt[:, None, None]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(xt[:, 0, 1:, 1:], expected.expand(-1, 27, 27), atol=1e-5)
    assert yt.tolist() == [i % 10 for i in range(len(yt))]


def test_fashion_loader_seeded(tiny_fashion: Path) -> None:
    a, _ = get_loaders("fashion-mnist", 8, tiny_fashion, seed=3)
    b, _ = get_loaders("fashion-mnist", 8, tiny_fashion, seed=3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first, second = [torch.cat([y for _, y in a]) for _ in range(2)]  # epochs 2 and 3
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)


def test_random_crop_flip_is_crop_of_padded() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, pad=2, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        candidates = windows + [w.flip(-1) for w in windows]
        assert any(torch.equal(out[b], w) for w in candidates)


def test_cifar_loaders(tiny_cifar: Path) -> None:
    train, test = get_loaders("cifar10", batch_size=8, data_dir=tiny_cifar, seed=0)
    assert len(train.dataset) == 30 and len(test.dataset) == 6
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.min() >= 0 and y.max() < 10
    raw = get_dataset("cifar10", "test", tiny_cifar)
    import pickle

    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert torch.equal(raw.images.reshape(6, -1), torch.from_numpy(entry[b"data"]))
    assert raw.labels.tolist() == entry[b"labels"]


def test_calibration_from_train_split(tiny_fashion: Path) -> None:
    calib = get_calibration_loader("fashion-mnist", batch_size=4, num_batches=3, data_dir=tiny_fashion, seed=1)
    batches = list(calib)
    assert len(batches) == 3 and all(len(y) == 4 for _, y in batches)
    # train images have pixel value 200 + label (test: 10 + label): all must be train ones
    for x, y in batches:
        raw = torch.round((x[:, 0, 5, 5] * 0.3530 + 0.2860) * 255)
        assert torch.equal(raw.long(), 200 + y)
    again = list(get_calibration_loader("fashion-mnist", 4, 3, tiny_fashion, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_missing_fashion_lists_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_debian = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(rdata, "DEBIAN_FASHION_MNIST_DIR", fake_debian)
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset("fashion-mnist", "train", data_dir=empty)
    msg = str(info.value)
    for place in (empty, empty / "FashionMNIST" / "raw", fake_debian):
        assert str(place) in msg
    assert "apt-get install" in msg and "--data-dir" in msg and "--download" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_cifar_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        get_dataset("cifar10", "test", data_dir=tmp_path)

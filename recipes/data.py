"""Fast, seeded, in-memory data pipelines for CIFAR-10 and Fashion-MNIST.

The whole dataset is held as one ``uint8`` tensor of shape ``(N, C, H, W)``;
augmentation (random crop with zero padding + horizontal flip) and normalization
are done on whole batches of tensors, which is far cheaper on a small CPU than
per-image PIL transforms.

Data sources (no network access is needed when the files are present):

* ``fashion-mnist``: the raw idx ``.gz`` files, looked up in ``data_dir``,
  ``data_dir/FashionMNIST/raw``, ``data_dir/fashion-mnist`` and the Debian package
  location ``/usr/share/datasets/fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``). Only if nothing is found and ``download=True`` does it
  fall back to ``torchvision.datasets.FashionMNIST(download=True)``.
* ``cifar10``: the python pickle batches (``cifar-10-batches-py``) in ``data_dir``,
  or ``torchvision.datasets.CIFAR10(download=True)`` when ``download=True``.

Calibration data for post-training quantization always comes from the *training*
split without augmentation (:func:`get_calibration_loader`), never the test split.

Example:
    >>> train_loader, test_loader = get_loaders("fashion-mnist", batch_size=128)  # doctest: +SKIP
    >>> images, labels = next(iter(train_loader))  # doctest: +SKIP
    >>> images.shape, images.dtype  # doctest: +SKIP
    (torch.Size([128, 1, 28, 28]), torch.float32)
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetInfo",
    "DatasetNotFoundError",
    "InMemoryImageDataset",
    "TensorBatchLoader",
    "get_calibration_loader",
    "get_dataset",
    "get_loaders",
    "read_idx",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_DIR = Path("data")

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset cannot be found locally and downloading is not allowed."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset (shape, classes, normalization, crop padding)."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4),
    "fashion-mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), 2),
}


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(
    images: torch.Tensor, pad: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip`` on tensors.

    Args:
        images: ``(B, C, H, W)`` tensor (any dtype); zero padding is used.
        pad: Padding on each side; crop offsets are uniform in ``[0, 2 * pad]``.
        generator: Optional CPU generator for reproducibility.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> random_crop_flip(x, pad=1).shape
        torch.Size([1, 1, 4, 4])
    """
    b, c, h, w = images.shape
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # B,1,H,1
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # B,1,1,W
        bidx = torch.arange(b)[:, None, None, None]
        cidx = torch.arange(c)[None, :, None, None]
        images = padded[bidx, cidx, rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# --------------------------------------------------------------------------- dataset


class InMemoryImageDataset(Dataset):
    """A whole image dataset as a ``uint8`` ``(N, C, H, W)`` tensor plus labels.

    ``__getitem__`` returns a normalized float ``(C, H, W)`` tensor (augmented if
    ``augment``), so it also works with a plain :class:`torch.utils.data.DataLoader`.
    :class:`TensorBatchLoader` uses :meth:`make_batch` to process whole batches.

    Example:
        >>> ds = InMemoryImageDataset(
        ...     torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
        ...     mean=(0.5,), std=(0.5,))
        >>> ds[0][0].shape
        torch.Size([1, 28, 28])
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        pad: int = 0,
        source: str = "",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = labels.to(torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` batch -> normalized ``float32`` batch."""
        return (images.to(torch.float32).div_(255.0) - self.mean).div_(self.std)

    def make_batch(
        self, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, (optionally) augment and normalize the samples at ``index``."""
        x = self.images[index]
        if self.augment:
            x = random_crop_flip(x, self.pad, generator)
        return self.normalize(x), self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.make_batch(torch.tensor([i]))
        return x[0], int(y[0])


class TensorBatchLoader:
    """Minimal seeded batch iterator over an :class:`InMemoryImageDataset`.

    Each epoch (each ``iter()``) uses a fresh permutation drawn from a generator
    seeded with ``seed + epoch``, so runs are reproducible.

    Args:
        dataset: The in-memory dataset.
        batch_size: Samples per batch.
        shuffle: Shuffle each epoch.
        drop_last: Drop the last incomplete batch.
        seed: Base seed.
        max_batches: Stop after this many batches per epoch (``None``: all).

    Example:
        >>> ds = InMemoryImageDataset(torch.zeros(10, 1, 8, 8, dtype=torch.uint8),
        ...                           torch.arange(10), mean=(0.,), std=(1.,))
        >>> [len(y) for _, y in TensorBatchLoader(ds, batch_size=4)]
        [4, 4, 2]
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        max_batches: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.max_batches = max_batches
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        nb = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return nb if self.max_batches is None else min(nb, self.max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.dataset.make_batch(idx, g)


# --------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array.

    Format: 2 zero bytes, a dtype code (0x08 = uint8), the number of dimensions,
    then one big-endian ``uint32`` per dimension, then the data.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
        (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only uint8 idx files are supported (dtype code {data[2]:#x})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _fashion_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    roots = [Path(data_dir)] if data_dir is not None else [DEFAULT_DATA_DIR]
    for root in roots:
        dirs += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _find_fashion(dirs: list[Path]) -> Path | None:
    needed = FASHION_FILES["train"] + FASHION_FILES["test"]
    for d in dirs:
        if all((d / f).is_file() or (d / f[:-3]).is_file() for f in needed):
            return d
    return None


def _load_fashion(split: str, data_dir: str | os.PathLike | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    dirs = _fashion_candidates(data_dir)
    found = _find_fashion(dirs)
    if found is None and download:
        import torchvision

        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        found = _find_fashion([root / "FashionMNIST" / "raw"])
    if found is None:
        looked = "\n".join(f"  - {d}" for d in dirs)
        raise DatasetNotFoundError(
            "Fashion-MNIST idx files ("
            + ", ".join(FASHION_FILES["train"] + FASHION_FILES["test"])
            + f") not found. Looked in:\n{looked}\n"
            "To get the data, either:\n"
            "  * apt-get install -y dataset-fashion-mnist   (installs to "
            f"{DEBIAN_FASHION_MNIST_DIR})\n"
            "  * pass --data-dir DIR pointing at a folder holding the four .gz files\n"
            "  * pass --download (download=True) to fetch them with torchvision (needs internet)"
        )
    img_name, lbl_name = FASHION_FILES[split]

    def _path(name: str) -> Path:
        p = found / name
        return p if p.is_file() else found / name[:-3]

    images = torch.from_numpy(read_idx(_path(img_name))).unsqueeze(1)  # N,1,28,28
    labels = torch.from_numpy(read_idx(_path(lbl_name)).astype(np.int64))
    return images, labels, str(found)


def _cifar_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    return [root / "cifar-10-batches-py", root]


def _find_cifar(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if all((d / f).is_file() for f in CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES):
            return d
    return None


def _load_cifar(split: str, data_dir: str | os.PathLike | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    dirs = _cifar_candidates(data_dir)
    found = _find_cifar(dirs)
    if found is None and download:
        import torchvision

        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        found = _find_cifar([root / "cifar-10-batches-py"])
    if found is None:
        looked = "\n".join(f"  - {d}" for d in dirs)
        raise DatasetNotFoundError(
            "CIFAR-10 python batches (data_batch_1..5, test_batch) not found. Looked in:\n"
            f"{looked}\n"
            "To get the data, either:\n"
            "  * pass --data-dir DIR where DIR/cifar-10-batches-py is the extracted "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz\n"
            "  * pass --download (download=True) to fetch it with torchvision (needs internet)"
        )
    names = CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES
    xs, ys = [], []
    for name in names:
        with open(found / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry[b"data"] if b"data" in entry else entry["data"]
        labels = entry.get(b"labels", entry.get(b"fine_labels", entry.get("labels")))
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    images = torch.from_numpy(np.concatenate(xs))
    return images, torch.from_numpy(np.concatenate(ys)), str(found)


# --------------------------------------------------------------------------- public API


def get_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    download: bool = False,
) -> InMemoryImageDataset:
    """Load ``split`` (``"train"`` / ``"test"``) of dataset ``name`` into memory.

    Args:
        name: ``"cifar10"`` or ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        data_dir: Where to look (and download to); default ``./data``.
        augment: Random crop + flip; default ``True`` for train, ``False`` for test.
        download: Allow downloading with torchvision if the files are not found.

    Raises:
        DatasetNotFoundError: the files are missing and ``download`` is ``False``.

    Example:
        >>> ds = get_dataset("fashion-mnist", "test")  # doctest: +SKIP
        >>> len(ds), ds.images.shape  # doctest: +SKIP
        (10000, torch.Size([10000, 1, 28, 28]))
    """
    info = _info(name)
    _check_split(split)
    loader = _load_fashion if name == "fashion-mnist" else _load_cifar
    images, labels, source = loader(split, data_dir, download)
    if augment is None:
        augment = split == "train"
    return InMemoryImageDataset(images, labels, info.mean, info.std, augment, info.pad, source)


def _make_loader(
    dataset: InMemoryImageDataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    workers: int,
    max_batches: int | None = None,
) -> TensorBatchLoader | DataLoader:
    if workers <= 0:
        return TensorBatchLoader(dataset, batch_size, shuffle, drop_last, seed, max_batches)
    # Optional multi-process path (per-item tensor transforms); rarely faster here.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(seed),
    )


def get_loaders(
    name: str,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    workers: int = 0,
    seed: int = 0,
    download: bool = False,
    augment: bool = True,
    test_batch_size: int | None = None,
) -> tuple[TensorBatchLoader | DataLoader, TensorBatchLoader | DataLoader]:
    """Return ``(train_loader, test_loader)``.

    The train loader shuffles (seeded) and augments; the test loader is in order
    without augmentation. ``workers=0`` (default) uses the in-memory
    :class:`TensorBatchLoader` with batched augmentation (fastest on small CPUs);
    ``workers>0`` uses a :class:`torch.utils.data.DataLoader`.

    Example:
        >>> train, test = get_loaders("fashion-mnist", 128, seed=0)  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (469, 40)
    """
    train_ds = get_dataset(name, "train", data_dir, augment=augment, download=download)
    test_ds = get_dataset(name, "test", data_dir, augment=False, download=download)
    train = _make_loader(train_ds, batch_size, True, False, seed, workers)
    test = _make_loader(test_ds, test_batch_size or 2 * batch_size, False, False, seed, workers)
    return train, test


def get_calibration_loader(
    name: str,
    batch_size: int,
    num_batches: int,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = False,
) -> TensorBatchLoader:
    """Calibration batches for PTQ: drawn from the TRAINING split, no augmentation.

    The subset is a fixed seeded random sample, so every call (and every
    iteration) yields the same ``num_batches`` batches.

    Example:
        >>> calib = get_calibration_loader("fashion-mnist", 64, num_batches=8)  # doctest: +SKIP
        >>> sum(len(y) for _, y in calib)  # doctest: +SKIP
        512
    """
    ds = get_dataset(name, "train", data_dir, augment=False, download=download)
    n = min(len(ds), batch_size * num_batches)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    subset = InMemoryImageDataset(
        ds.images[idx], ds.labels[idx], DATASETS[name].mean, DATASETS[name].std, False, 0,
        source=f"{ds.source} (train split, {n} calibration samples, seed {seed})",
    )
    return TensorBatchLoader(subset, batch_size, shuffle=False, drop_last=False, seed=seed)

"""Verified checkpoint loading and the registry of shipped FP32 checkpoints.

:func:`load_checkpoint` checks, *before* touching the model, that

1. the file exists and (optionally) its sha256 matches ``expected_sha256``;
2. it loads with ``torch.load(..., weights_only=True)``;
3. its keys and tensor shapes match ``model.state_dict()`` exactly.

Only then is ``model.load_state_dict`` called, so a failed load never leaves the
model half-loaded.

Example:
    >>> from recipes.models import resnet20
    >>> model = resnet20(num_classes=10, in_channels=1)
    >>> load_shipped(model, "resnet20_fashion-mnist")  # doctest: +SKIP

After (re)training, print the registry entry to paste into :data:`SHIPPED` with::

    python -m recipes.checkpoints recipes/checkpoints/train_resnet20_fashion-mnist.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "REPO_ROOT",
    "SHIPPED",
    "CheckpointError",
    "ChecksumMismatchError",
    "StateDictMismatchError",
    "load_checkpoint",
    "load_shipped",
    "sha256_file",
    "shipped_path",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

TRAIN_COMMAND_RESNET20_FMNIST = (
    "python -m recipes.train_fp32 --model resnet20 --dataset fashion-mnist "
    "--epochs 16 --out recipes/checkpoints --threads 1 --no-progress"
)


def _train_command(model: str, steps: int, epochs: int = 2, extra: str = "") -> str:
    return (f"python -m recipes.train_fp32 --model {model} --epochs {epochs} --steps-per-epoch {steps}{extra} "
            "--dataset fashion-mnist --out recipes/checkpoints --threads 1 --no-progress")


def _full_train_command(model: str, epochs: int) -> str:
    return (f"python -m recipes.train_fp32 --model {model} --epochs {epochs} --dataset fashion-mnist "
            "--out recipes/checkpoints --threads 1 --no-progress")


#: Shipped FP32 checkpoints. ``path`` is relative to the repository root.
#: ``sha256`` / ``test_top1`` come from ``recipes/checkpoints/train_<name>.json``
#: written by the training run (``None`` until that run has finished and the entry
#: has been filled in; see the module docstring).
SHIPPED: dict[str, dict[str, Any]] = {
    "resnet20_fashion-mnist": {
        "path": "recipes/checkpoints/resnet20_fashion-mnist.pt",
        "model": "resnet20",
        "dataset": "fashion-mnist",
        "sha256": "47bc8243311b6cb033a5decc459d7882f48a9f9b92eade1b4892a7ed4a2df7e4",
        "test_top1": 94.18,
        "command": TRAIN_COMMAND_RESNET20_FMNIST,
    },
    # beyond ResNet (recipes/checkpoints/README.md): MobileNetV2 3 and EfficientNet 4 full epochs, ViT 120 steps
    "mobilenet_v2_fashion-mnist": {
        "path": "recipes/checkpoints/mobilenet_v2_fashion-mnist.pt",
        "model": "mobilenet_v2",
        "dataset": "fashion-mnist",
        "sha256": "c324ce9383250536f7fc2b0fc8b1ef4f3fda147793c8acd14afb86ddc93aee3a",
        "test_top1": 90.16,
        "command": _full_train_command("mobilenet_v2", 3),
    },
    "efficientnet_small_fashion-mnist": {
        "path": "recipes/checkpoints/efficientnet_small_fashion-mnist.pt",
        "model": "efficientnet_small",
        "dataset": "fashion-mnist",
        "sha256": "04bf104b39894bdfaad1bfbe7822ae3ceb5c13a6713e2f87e7072746b2e050e9",
        "test_top1": 91.15,
        "command": _full_train_command("efficientnet_small", 4),
    },
    "vit_small_fashion-mnist": {
        "path": "recipes/checkpoints/vit_small_fashion-mnist.pt",
        "model": "vit_small",
        "dataset": "fashion-mnist",
        "sha256": "d0f541e9524c592af4b4095f99190179aaf8ca9dd86eb4ba8a0b7ba71121fafc",
        "test_top1": 49.75,
        "command": _train_command("vit_small", 60, extra=" --optimizer adamw --lr 2e-3 --wd 0.05"),
    },
}


class CheckpointError(RuntimeError):
    """Base class for checkpoint loading errors."""


class ChecksumMismatchError(CheckpointError):
    """The checkpoint file's sha256 differs from the expected one."""


class StateDictMismatchError(CheckpointError):
    """Checkpoint keys or tensor shapes do not match the model."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file.

    Example:
        >>> sha256_file("recipes/checkpoints/resnet20_fashion-mnist.pt")  # doctest: +SKIP
        '3f2a...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _regen_hint(path: Path, hint: str | None) -> str:
    if hint:
        return hint
    for entry in SHIPPED.values():
        if (REPO_ROOT / entry["path"]).resolve() == path.resolve():
            return f"regenerate it with: {entry['command']}"
    return "regenerate it with: python -m recipes.train_fp32 --model ... --dataset ... --out DIR"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    regenerate_hint: str | None = None,
) -> nn.Module:
    """Verify and load a ``state_dict`` checkpoint into ``model`` (all or nothing).

    Args:
        model: Model whose ``state_dict`` keys/shapes the checkpoint must match.
        path: ``.pt`` file holding a plain ``state_dict`` of tensors.
        expected_sha256: If given, the file's sha256 must equal it.
        regenerate_hint: Text appended to errors telling how to rebuild the file.

    Returns:
        ``model`` (loaded in place).

    Raises:
        FileNotFoundError: no such file.
        ChecksumMismatchError: sha256 differs (file named, expected vs actual).
        StateDictMismatchError: missing/unexpected keys or shape mismatches (listed).

    Example:
        >>> load_checkpoint(model, "ckpt.pt", expected_sha256="ab12...")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {_regen_hint(path, regenerate_hint)}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.lower():
            raise ChecksumMismatchError(
                f"sha256 mismatch for checkpoint {path}:\n"
                f"  expected {expected_sha256}\n"
                f"  actual   {actual}\n"
                f"The file is corrupt, truncated or from a different training run; "
                f"{_regen_hint(path, regenerate_hint)} (and update the expected sha256)."
            )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StateDictMismatchError(f"checkpoint {path} is not a plain state_dict of tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {path} does not match {type(model).__name__}:"]
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}):\n    " + "\n    ".join(shapes))
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        parts.append("  (wrong --model / num_classes / in_channels?) " + _regen_hint(path, regenerate_hint))
        raise StateDictMismatchError("\n".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def shipped_path(name: str) -> Path:
    """Absolute path of a shipped checkpoint. Example: ``shipped_path("resnet20_fashion-mnist")``."""
    try:
        return REPO_ROOT / SHIPPED[name]["path"]
    except KeyError:
        raise KeyError(f"no shipped checkpoint {name!r}; available: {sorted(SHIPPED)}") from None


def load_shipped(model: nn.Module, name: str) -> nn.Module:
    """Load the shipped checkpoint ``name`` into ``model``, verifying its sha256.

    Example:
        >>> load_shipped(resnet20(10, 1), "resnet20_fashion-mnist")  # doctest: +SKIP
    """
    entry = SHIPPED[name] if name in SHIPPED else None
    path = shipped_path(name)
    if entry is None or entry["sha256"] is None:
        raise CheckpointError(
            f"shipped checkpoint {name!r} has no pinned sha256 yet; after `{SHIPPED[name]['command']}` "
            f"finishes, run `python -m recipes.checkpoints {path.parent / ('train_' + name + '.json')}` "
            "and paste the printed entry into recipes/checkpoints.py:SHIPPED"
        )
    return load_checkpoint(model, path, entry["sha256"], f"regenerate it with: {entry['command']}")


def registry_entry(report_json: str | os.PathLike) -> dict[str, Any]:
    """Build a :data:`SHIPPED` entry from a ``train_<model>_<dataset>.json`` report.

    Example:
        >>> registry_entry("recipes/checkpoints/train_resnet20_fashion-mnist.json")  # doctest: +SKIP
    """
    report = json.loads(Path(report_json).read_text())
    a = report["args"]
    ckpt = Path(report["checkpoint"])
    actual = sha256_file(ckpt if ckpt.is_absolute() else REPO_ROOT / ckpt)
    if actual != report["sha256"]:
        raise ChecksumMismatchError(f"{ckpt}: report says {report['sha256']} but file is {actual}")
    return {
        "path": str(ckpt),
        "model": a["model"],
        "dataset": a["dataset"],
        "sha256": actual,
        "test_top1": round(report["final_test_top1"], 2),
        "command": report["command"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the SHIPPED entry for a training report. Example: see module docstring."""
    p = argparse.ArgumentParser(prog="python -m recipes.checkpoints", description=main.__doc__)
    p.add_argument("report", help="train_<model>_<dataset>.json written by recipes.train_fp32")
    args = p.parse_args(argv)
    entry = registry_entry(args.report)
    name = f"{entry['model']}_{entry['dataset']}"
    print(json.dumps({name: entry}, indent=4))
    return entry


if __name__ == "__main__":
    main()

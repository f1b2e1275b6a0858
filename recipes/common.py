"""Shared plumbing of the quantization recipes (``ptq``, ``qat``, ``evaluate``, ``main_job``).

* :func:`load_fp32` — build a model and load an FP32 checkpoint (default: the
  shipped, sha256-pinned one from :mod:`recipes.checkpoints`);
* :func:`make_qconfig` / :func:`make_overrides` — a preset with a chosen activation
  calibrator, per-tensor weights, LSQ and ``--keep-8bit`` layers;
* :func:`predict` / :func:`top1` — test-set predictions (argmax) with a tqdm bar;
* :func:`save_prepared` / :func:`load_prepared` — a prepared model's ``state_dict``
  plus the metadata needed to rebuild it (preset, calibrator, overrides, QAT);
* :func:`state_dict_bytes` — model size as serialized bytes;
* :func:`write_json` / :func:`write_text` — atomic result files.

Example:
    >>> qc = make_qconfig("w4a8", "mse", per_tensor_weights=True)
    >>> qc.activation.calibrator, qc.weight.spec.axis
    ('mse', None)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.atomic import atomic_write
from recipes.checkpoints import SHIPPED, CheckpointError, load_checkpoint, load_shipped, sha256_file, shipped_path
from recipes.data import DATASETS
from recipes.models import build_model

__all__ = [
    "PREPARED_FORMAT",
    "add_common_args",
    "agreement",
    "build_user_model",
    "command_line",
    "env_info",
    "load_fp32",
    "load_prepared",
    "make_overrides",
    "make_qconfig",
    "parse_list",
    "predict",
    "save_prepared",
    "seed_everything",
    "setup_threads",
    "state_dict_bytes",
    "top1",
    "write_json",
    "write_text",
]

PREPARED_FORMAT = "recipes.prepared/1"
PERCENTILE_DEFAULT = 99.99


# ----------------------------------------------------------------------------- CLI bits


def parse_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; ``None``/``""`` -> ``[]``."""
    if not text:
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def add_common_args(p: Any, out_default: str) -> None:
    """Arguments every recipe takes: model/dataset/checkpoint/data/threads/seed/out/smoke."""
    p.add_argument("--model", default="resnet20",
                   help="architecture (recipes.models.MODELS), or your own class / factory as 'package.module:Name' "
                   "(with --checkpoint; num_classes / in_channels passed when it takes them)")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS), help="dataset")
    p.add_argument("--checkpoint", default=None,
                   help="FP32 state_dict .pt (default: the shipped, sha256-verified <model>_<dataset> checkpoint)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: ./data, then /usr/share/datasets)")
    p.add_argument("--download", action="store_true", help="allow downloading the dataset with torchvision")
    # 64: ResNet-20's activations stay in cache; on a 2-core Zen 3 evaluating 5,120 test images took FP32 4.0 /
    # 6.0 s and fake quant 5.5 / 7.0 s at batch 64 / 256 (medians of 3), the integer-only execution 56 / 80 s per 10k
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--max-batches", type=int, default=None,
                   help="smoke runs: at most this many batches per evaluation / epoch / calibration")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, subsets and init")
    p.add_argument("--out", default=out_default, help="output folder (JSON, Markdown, .pt)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")


def setup_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def env_info() -> dict[str, Any]:
    """Versions, threads and host facts recorded with every result file."""
    return {
        "torch": torch.__version__,
        "qtoolkit": qt.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a run: ``python -m <module> <args>``."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in args])


# ----------------------------------------------------------------------------- FP32 model


def load_fp32(model: str, dataset: str, checkpoint: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``model`` for ``dataset`` and load FP32 weights (eval mode).

    ``model`` is a name from :data:`recipes.models.MODELS` or a user class / factory
    ``"package.module:Name"`` (:func:`build_user_model`; needs ``checkpoint``).
    ``checkpoint=None`` loads the shipped ``<model>_<dataset>`` checkpoint and checks
    its sha256 (:func:`recipes.checkpoints.load_shipped`). Returns the model and a
    description of what was loaded (path, sha256).

    Raises:
        CheckpointError: no shipped checkpoint for this model/dataset (train one with
            ``python -m recipes.train_fp32``) or its sha256 is not pinned yet.
    """
    info = DATASETS[dataset]
    if ":" in model:  # a user model class: "package.module:ClassOrFactory"
        if checkpoint is None:
            raise CheckpointError(f"--model {model}: a user model class needs its FP32 weights: pass --checkpoint PATH "
                                  "(a state_dict .pt file)")
        net = build_user_model(model, info.num_classes, info.in_channels)
        load_checkpoint(net, checkpoint)
        net.eval()
        return net, {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "shipped": None, "model_class": model}
    net = build_model(model, info.num_classes, info.in_channels)
    if checkpoint is None:
        name = f"{model}_{dataset}"
        if name not in SHIPPED:
            raise CheckpointError(
                f"no shipped FP32 checkpoint for {model} on {dataset} (shipped: {sorted(SHIPPED)}); train one with\n"
                f"  python -m recipes.train_fp32 --model {model} --dataset {dataset} --out runs/fp32\n"
                f"and pass --checkpoint runs/fp32/{name}.pt"
            )
        load_shipped(net, name)
        path = shipped_path(name)
        desc = {"path": str(path), "sha256": SHIPPED[name]["sha256"], "shipped": name}
    else:
        load_checkpoint(net, checkpoint)
        desc = {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "shipped": None}
    net.eval()
    return net, desc


def build_user_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiate ``"package.module:Name"`` (a class or factory importable from the working directory).

    ``num_classes`` / ``in_channels`` are passed when its signature takes them (by those names).
    Example: ``build_user_model("recipes.models:resnet20", 10, 1)``.
    """
    import importlib
    import inspect

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--model {spec!r}: a user model is written 'package.module:ClassName'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {spec!r}: cannot import {attr} from {mod_name} ({e}); run from the folder that "
                         "holds the package, or add it to PYTHONPATH") from e
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in params}
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError(f"--model {spec!r}: {attr}(...) returned a {type(net).__name__}, not a torch.nn.Module")
    return net


# ----------------------------------------------------------------------------- qconfigs


def make_qconfig(
    preset: str,
    calibrator: str | None = None,
    *,
    percentile: float = PERCENTILE_DEFAULT,
    per_tensor_weights: bool = False,
    lsq: bool = False,
    weight_calibrator: str | None = None,
) -> qt.QConfig:
    """A preset with another activation calibrator, per-tensor weights and/or LSQ scales.

    ``calibrator=None`` keeps the preset's (``minmax``; ``prepare(qat=True)`` turns
    it into ``ema``). ``percentile`` is used by the ``percentile`` calibrator.
    Besides qtoolkit's presets, ``"w<bits>a<bits>"`` (e.g. ``"w2a4"``) is W8A8 with those bit widths.
    """
    qc = preset_qconfig(preset)
    if weight_calibrator is not None and weight_calibrator != "minmax" and qc.weight is not None:
        qc = qc.with_weight_calibrator(weight_calibrator)
    if calibrator is not None and qc.activation is not None:
        opts = {"percentile": percentile} if calibrator == "percentile" else {}
        qc = qc.with_activation_calibrator(calibrator, **opts)
    if per_tensor_weights and qc.weight is not None:
        qc = replace(qc, weight=replace(qc.weight, spec=replace(qc.weight.spec, axis=None)))
    if lsq:
        w = replace(qc.weight, learnable=True) if qc.weight is not None else None
        a = replace(qc.activation, learnable=True) if qc.activation is not None and qc.mode == "static" else qc.activation
        qc = replace(qc, weight=w, activation=a)
    return qc


def preset_qconfig(preset: str) -> qt.QConfig:
    """A qtoolkit preset, or ``"w<W>a<A>"`` built from ``w8a8`` with ``W``-bit weights and ``A``-bit activations."""
    if preset in qt.PRESETS:
        return qt.get_qconfig(preset)
    m = re.fullmatch(r"w(\d+)a(\d+)", preset)
    if m is None:
        return qt.get_qconfig(preset)  # raises with the list of presets
    return qt.get_qconfig("w8a8").with_bits(weight_bits=int(m.group(1)), activation_bits=int(m.group(2)))


def make_overrides(keep_8bit: Iterable[str], calibrator: str | None = None, **kwargs: Any) -> dict[str, qt.QConfig]:
    """``--keep-8bit conv1,fc``: those layers (name globs) at W8A8 with the same
    calibrator / weight granularity / LSQ as the rest."""
    names = list(keep_8bit)
    if not names:
        return {}
    qc8 = make_qconfig("w8a8", calibrator, **kwargs)
    return {name: qc8 for name in names}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Any,
    *,
    max_batches: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run ``model`` (eval mode, observers off) over ``loader``.

    Returns ``(argmax predictions, labels, seconds)`` as int64 CPU tensors.
    """
    was_training = model.training
    model.eval()
    n = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and n is not None:
        n = min(n, max_batches)
    preds, labels = [], []
    ctx = qt.observers_disabled(model) if any(True for _ in qt.quantizers(model)) else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        from tqdm import tqdm

        with ctx:
            bar = tqdm(loader, total=n, desc=desc, leave=False, disable=not progress, mininterval=2.0, file=sys.stderr)
            for i, (x, y) in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                preds.append(model(x).argmax(1).cpu())
                labels.append(y.cpu())
            bar.close()
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError(f"{desc}: the loader yielded no batches")
    return torch.cat(preds), torch.cat(labels), time.perf_counter() - start


def top1(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((preds == labels).sum()) / max(len(labels), 1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percentage of samples where two models' argmax predictions agree."""
    return 100.0 * float((a == b).sum()) / max(len(a), 1)


def state_dict_bytes(model_or_sd: nn.Module | dict[str, torch.Tensor]) -> int:
    """Size of ``torch.save(state_dict)`` in bytes (what a deployment would store)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getbuffer().nbytes


# ----------------------------------------------------------------------------- saving


def _atomic(path: Path, write: Any) -> None:
    """``write(file object)`` atomically onto ``path`` (:func:`qtoolkit.atomic.atomic_write`)."""
    atomic_write(path, write, make_dirs=True)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN -> null
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    path = Path(path)
    _atomic(path, lambda f: f.write((json.dumps(_plain(obj), indent=2) + "\n").encode()))
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    _atomic(path, lambda f: f.write(text.encode()))
    return path


def save_prepared(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save a prepared model's ``state_dict`` with the metadata to rebuild it.

    ``meta`` keys: ``model``, ``dataset``, ``preset``, ``calibrator``, ``percentile``,
    ``per_tensor_weights``, ``lsq``, ``keep_8bit`` (list), ``qat`` (bool); optional ``weight_calibrator``,
    ``high_layers`` (mixed precision: layers at ``mp_high``).
    Loadable with ``torch.load(path, weights_only=True)``.
    """
    payload = {
        "format": PREPARED_FORMAT,
        "meta": _plain(meta),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    _atomic(path, lambda f: torch.save(payload, f))
    return path


def prepare_from_meta(fp32: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """``qtoolkit.prepare`` with the settings recorded in ``meta``."""
    kw = {
        "percentile": meta.get("percentile", PERCENTILE_DEFAULT),
        "per_tensor_weights": bool(meta.get("per_tensor_weights", False)),
        "lsq": bool(meta.get("lsq", False)),
        "weight_calibrator": meta.get("weight_calibrator"),
    }
    qc = make_qconfig(meta["preset"], meta.get("calibrator"), **kw)
    overrides: dict[str, Any] = dict(make_overrides(meta.get("keep_8bit") or [], meta.get("calibrator"), **kw))
    for name in meta.get("high_layers") or []:  # mixed precision
        overrides[name] = make_qconfig(meta.get("mp_high", "w8a8"), meta.get("calibrator"), **kw)
    return qt.prepare(fp32, qc, qat=bool(meta.get("qat", False)), overrides=overrides)


def load_prepared(path: str | os.PathLike, fp32: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a prepared model saved by :func:`save_prepared` on top of ``fp32``
    (architecture only; its weights are replaced by the saved ones). Eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{path}: not a prepared-model file written by recipes (format {PREPARED_FORMAT!r})")
    meta = payload["meta"]
    qm = prepare_from_meta(fp32, meta)
    qm.load_state_dict(payload["state_dict"], strict=True)
    qm.eval()
    return qm, meta

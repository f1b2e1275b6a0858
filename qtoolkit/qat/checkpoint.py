"""QAT checkpoint I/O: the payload's RNG states, the plain-types check, the content checksum, atomic saves
and the checked read (:func:`read_checkpoint`).  Used by :class:`qtoolkit.qat.QATTrainer`.

A checkpoint is a dict of plain tensors, numbers, strings, lists and dicts (``torch.load(path,
weights_only=True)`` reads it), written atomically (:func:`qtoolkit.atomic.atomic_write`), with
``"checksum"``: the sha256 of its content (:func:`payload_checksum`), checked on load.

Example::

    >>> payload_checksum({"epoch": 1}) == payload_checksum({"epoch": 1})
    True
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from typing import Any

import torch
from torch import Tensor

from qtoolkit.atomic import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "payload_checksum", "read_checkpoint"]

logger = logging.getLogger("qtoolkit.qat")

CHECKPOINT_FORMAT = "qtoolkit.qat/1"


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` s a DataLoader shuffles/seeds with (loader, sampler, batch sampler)."""
    gens: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _rng_state(loader: Any) -> dict[str, Any]:
    """This process's RNG states as plain tensors / lists / numbers."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "loader_generators": [g.get_state() for g in _loader_generators(loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss),
        }
    return state


def _set_rng_state(state: dict[str, Any], loader: Any) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    gens = _loader_generators(loader)
    saved = state.get("loader_generators", [])
    if len(saved) != len(gens):
        logger.warning(
            "qtoolkit.qat: the checkpoint has %d data-loader generator state(s) but the loader uses %d; "
            "the data order after resuming may differ", len(saved), len(gens),
        )
    for g, s in zip(gens, saved):
        g.set_state(s)


_PLAIN = (Tensor, str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` rejects."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"QATTrainer: checkpoint key {where}[{k!r}] is a {type(k).__name__}; only str/int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"QATTrainer: {where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot read back; "
        "checkpoints hold only tensors, dicts, lists, numbers and strings (use a scheduler / optimizer whose "
        "state_dict is plain, e.g. no lambdas)"
    )


def payload_checksum(obj: Any) -> str:
    """sha256 of a checkpoint payload's content (tensors' dtype, shape and bytes; keys, strings, numbers).

    Stored in the QAT checkpoint and checked on load, so bytes changed after the save (a flipped bit on
    disk, a partial copy) are an error instead of a silently different model.  Depends on content only,
    not on the file's zip layout, so it is the same after ``torch.load``.

    Example::

        >>> payload_checksum({"a": torch.ones(2)}) == payload_checksum({"a": torch.ones(2)})
        True
    """
    h = hashlib.sha256()
    _hash_into(h, obj)
    return h.hexdigest()


def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _hash_into(h, v)
    else:  # str, int, float, bool, None (_check_plain allows nothing else)
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _atomic_save(payload: dict[str, Any], path: str) -> None:
    """``torch.save`` through :func:`qtoolkit.atomic.atomic_write` (temporaries of crashed saves removed first)."""
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a QAT checkpoint (``weights_only=True``) and verify its format and checksum.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, truncated or not a torch file; not a qtoolkit QAT checkpoint; or its
            content does not match the checksum stored at save time (corrupted after it was written).

    Example::

        >>> read_checkpoint("missing.pt")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: QATTrainer: no checkpoint at 'missing.pt'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QATTrainer: no checkpoint at {path!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(
            f"QATTrainer: checkpoint {path!r} is empty (0 bytes): it was never written completely (a save that "
            "crashed or a full disk?); delete it or resume from another checkpoint"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ValueError(
            f"QATTrainer: cannot read checkpoint {path!r} ({size:,} bytes): {detail}. The file is truncated, "
            "corrupted or not a torch checkpoint; resume from another one"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"QATTrainer: {path!r} is not a qtoolkit QAT checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    stored = ckpt.pop("checksum", None)
    if stored is None:
        logger.warning("qtoolkit.qat: checkpoint %s has no checksum (saved by an older qtoolkit); not verified", path)
    elif payload_checksum(ckpt) != stored:
        raise ValueError(
            f"QATTrainer: checkpoint {path!r} is corrupted: its content does not match the sha256 stored when it was "
            "saved (bytes changed on disk or in a copy); resume from another checkpoint. The model was not modified."
        )
    return ckpt


def _check_checkpoint_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"QATTrainer: checkpoint_path {path!r} is a directory; give a file path, e.g. {path}/qat.pt")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"QATTrainer: the directory of checkpoint_path {path!r} does not exist ({directory}); create it first"
        )
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"QATTrainer: cannot write checkpoints to {directory} (no write permission)")


def _summarize_keys(keys: list[str], limit: int = 10) -> str:
    """Parameter / buffer keys first; a quantizer's many buffers as one ``name.*`` entry."""
    plain: list[str] = []
    quant: list[str] = []
    for key in keys:
        parts = key.split(".")
        idx = next((i for i, p in enumerate(parts[:-1]) if p.endswith("_quantizer")), None)
        if idx is None:
            plain.append(key)
        else:
            name = ".".join(parts[: idx + 1]) + ".*"
            if name not in quant:
                quant.append(name)
    items = plain + quant
    return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")

"""Atomic file writes: a reader sees the old file or the new one, never half of one.

One helper for every artefact qtoolkit and its recipes write (QAT checkpoints, ONNX files, FP32
checkpoints, reports): write to a temporary file in the target's directory, flush and fsync it, make it
world-readable like a normal file, ``os.replace`` it onto the target, then fsync the directory.  On any
error (or Ctrl-C) the temporary file is removed and the target is untouched.  Temporaries that a *killed*
earlier write of the same target left behind (``.<name>.<random>.tmp``) are removed first.

Example::

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> atomic_write(os.path.join(d, "a.txt"), lambda f: f.write(b"hello"))
    >>> open(os.path.join(d, "a.txt"), "rb").read()
    b'hello'
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["atomic_write", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete ``.<name>.*.tmp`` files next to ``path`` that an interrupted write of ``path`` left behind.

    Returns the names removed.
    """
    path = os.fspath(path)
    directory, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(f".{base}.") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
                logger.warning("qtoolkit: removed %s, left by an interrupted write of %s", name, base)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, make_dirs: bool = False) -> None:
    """Write ``path`` atomically: ``write(f)`` gets a binary file object of a temporary file beside it.

    Args:
        path: the target file.
        write: writes the content, e.g. ``lambda f: torch.save(obj, f)``.
        make_dirs: create the target's directory if missing (else it must exist).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

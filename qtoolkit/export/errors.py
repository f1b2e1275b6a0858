"""The exception every ONNX-export failure raises (re-exported by :mod:`qtoolkit.export.onnx`)."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """The model cannot be exported (the message names the site); nothing was written."""

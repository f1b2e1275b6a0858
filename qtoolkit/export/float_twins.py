"""Export twins of float modules that ``torch.onnx.export`` cannot express for some input sizes.

``nn.AdaptiveAvgPool2d`` exports as ONNX ``AveragePool`` / ``GlobalAveragePool`` only when each input side is a
multiple of the output side; torchvision's VGG and AlexNet pool to 7×7, so below 224² inputs (a 2×2 map at 64²)
the exporter refuses them.  Adaptive average pooling is linear: output ``(i, j)`` is the mean of input rows
``[⌊i·H/oh⌋, ⌈(i+1)·H/oh⌉)`` and the same columns, i.e. ``A_h · x · A_wᵀ`` with constant averaging matrices.
:class:`ExportAdaptiveAvgPool2d` exports that form (two ``MatMul`` with constants) where the exporter would
fail, and the module itself otherwise.  The values are torch's up to float32 summation order (windows of one or
two elements, the upsampling case, are exact).

Example::

    >>> import torch
    >>> from torch import nn
    >>> pool = nn.AdaptiveAvgPool2d((7, 7))
    >>> x = torch.randn(1, 4, 2, 3)
    >>> bool(torch.allclose(ExportAdaptiveAvgPool2d(pool)(x), pool(x)))
    True
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ExportAdaptiveAvgPool2d", "adaptive_avg_matrix"]


def adaptive_avg_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 matrix of adaptive average pooling along one axis (torch's windows)."""
    a = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


class ExportAdaptiveAvgPool2d(nn.Module):
    """Export twin of ``nn.AdaptiveAvgPool2d`` (module docstring): the module's own op where ONNX can express it,
    constant averaging matrices where it cannot."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d) -> None:
        super().__init__()
        size = pool.output_size
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        with warnings.catch_warnings():  # the map size is fixed by the example input (only the batch is dynamic)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = (h if self.output_size[0] is None else self.output_size[0]), (w if self.output_size[1] is None else self.output_size[1])
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        with warnings.catch_warnings():  # constants of the trace, by design
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ah = torch.from_numpy(adaptive_avg_matrix(h, oh)).to(x.dtype)
            aw = torch.from_numpy(np.ascontiguousarray(adaptive_avg_matrix(w, ow).T)).to(x.dtype)
        return torch.matmul(torch.matmul(ah, x), aw)

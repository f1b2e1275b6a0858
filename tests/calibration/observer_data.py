"""Grids and data shared by the observer tests (``test_observers.py``, ``test_histogram.py``)."""

from __future__ import annotations

import torch

from qtoolkit.spec import QuantSpec

U8_ASYM = QuantSpec(8, signed=False, symmetric=False)
I8_SYM_NARROW = QuantSpec(8, signed=True, symmetric=True, narrow_range=True)


def batches(n: int = 5, shape=(8, 16, 6, 6), seed: int = 0, relu: bool = False) -> list[torch.Tensor]:
    """``n`` seeded batches whose scale and offset grow batch by batch (ReLU'd with ``relu``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * (1 + 0.5 * i) + 0.3 * (i - 2)
        out.append(x.relu() if relu else x)
    return out

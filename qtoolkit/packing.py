"""Sub-byte packing: two signed 4-bit (or smaller) codes per ``uint8`` byte.

Codes are flattened per output channel (row-major), padded to an even count and
stored low nibble first: ``byte = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)``.

Example::

    >>> import torch
    >>> q = torch.tensor([[-8, 7, 3]], dtype=torch.int8)
    >>> torch.equal(unpack_int4(pack_int4(q), q.shape), q)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 codes in ``[-8, 7]`` (shape ``[C, ...]``) into ``uint8`` ``[C, ceil(K/2)]``."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    flat = q.reshape(q.shape[0], -1).to(torch.int16) & 0xF
    if flat.shape[1] % 2:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
    packed = flat[:, 0::2] | (flat[:, 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_int4`: ``uint8`` ``[C, ceil(K/2)]`` → int8 codes of ``shape``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    flat = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)
    flat = torch.where(flat >= 8, flat - 16, flat)
    k = 1
    for d in shape[1:]:
        k *= d
    return flat[:, :k].to(torch.int8).reshape(shape)

"""torch.distributed helpers of QAT: rank / world size, cross-rank error agreement (:func:`_agree`),
:func:`unwrap_model` and :func:`sync_quantizers` (broadcast of the quantizers' state from one rank)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtoolkit.toggles import quantizers

__all__ = ["sync_quantizers", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _comm_device() -> torch.device:
    """Device for collective buffers: CUDA for NCCL, CPU otherwise."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (no-op when not distributed)."""
    if not _dist_on():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _agree(error: BaseException | None, what: str) -> None:
    """Raise ``error`` here, and a pointer to it on the other ranks, if any rank failed
    (so one rank's bad input cannot leave the others hanging in a collective)."""
    if _any_rank(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on another rank (see that rank's error)")


def _quantizer_tensors(module: nn.Module, include_model_buffers: bool) -> list[tuple[nn.Module, str, str, Tensor, bool]]:
    """``(owner, attr, qualified_name, tensor, is_param)`` of everything to broadcast."""
    out: list[tuple[nn.Module, str, str, Tensor, bool]] = []
    owners: set[int] = set()

    def add(sub_name: str, sub: nn.Module, params: bool) -> None:
        if id(sub) in owners:
            return
        owners.add(id(sub))
        for bname, buf in sub._buffers.items():
            if buf is not None:
                out.append((sub, bname, f"{sub_name}.{bname}" if sub_name else bname, buf, False))
        if params:
            for pname, p in sub._parameters.items():
                if p is not None:
                    out.append((sub, pname, f"{sub_name}.{pname}" if sub_name else pname, p, True))

    for fq_name, fq in quantizers(module):
        for sub_name, sub in fq.named_modules(prefix=fq_name):
            add(sub_name, sub, params=True)  # LSQ scales are parameters
    if include_model_buffers:
        for sub_name, sub in module.named_modules():
            add(sub_name, sub, params=False)
    return out


@torch.no_grad()
def sync_quantizers(model: nn.Module, src: int = 0, *, include_model_buffers: bool = False) -> nn.Module:
    """Broadcast every quantizer's state from rank ``src`` so all ranks hold the same ranges.

    Each :class:`~qtoolkit.fake_quant.FakeQuantize`'s buffers (``scale``,
    ``zero_point``, enable flags, ``calibrated``) and its observer's buffers
    (running min/max, histogram, cached clip range) — plus a learnable (LSQ) scale —
    are broadcast with ``torch.distributed.broadcast``, one flat tensor per dtype.
    Buffers whose shape differs on a receiving rank (lazily sized per-channel
    statistics) are reallocated first. A no-op unless ``torch.distributed`` is
    initialized. Collective: every rank must call it.

    Why: DDP's ``broadcast_buffers=True`` copies rank 0's buffers at the *start* of
    each forward, but the observers then update from each rank's own batch, so after
    the last step the ranks' ranges differ. The trainer calls this after each epoch.

    Args:
        model: the prepared model, DDP-wrapped or not.
        src: the rank whose state wins.
        include_model_buffers: also broadcast every other buffer of the model (BN
            running statistics), as DDP does at each forward.

    Returns:
        ``model``.

    Example::

        >>> import qtoolkit as qt
        >>> from torch import nn
        >>> m = qt.prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> sync_quantizers(m) is m            # not distributed: nothing to do
        True
    """
    if not _dist_on():
        return model
    module = unwrap_model(model)
    entries = _quantizer_tensors(module, include_model_buffers)
    meta = [(name, tuple(t.shape), str(t.dtype)) for _, _, name, t, _ in entries]
    box: list[Any] = [meta if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if _comm_device().type == "cuda" else None)
    src_meta = box[0]
    problem = None
    if [m[0] for m in src_meta] != [m[0] for m in meta]:
        mine = {m[0] for m in meta}
        theirs = {m[0] for m in src_meta}
        diff = sorted(mine ^ theirs)[:5] or ["(same names, different order)"]
        problem = RuntimeError(f"sync_quantizers: the models differ between ranks (quantizer state {diff})")
    else:
        for (_, _, name, t, is_param), (_, shape, dtype) in zip(entries, src_meta):
            if is_param and (tuple(t.shape) != shape or str(t.dtype) != dtype):
                problem = RuntimeError(
                    f"sync_quantizers: parameter {name} has shape {tuple(t.shape)} here and {shape} on rank {src}"
                )
                break
    _agree(problem, "sync_quantizers")
    # reallocate lazily sized buffers to the source's shapes
    tensors: list[Tensor] = []
    for (owner, attr, _, t, _), (_, shape, dtype) in zip(entries, src_meta):
        if tuple(t.shape) != shape or str(t.dtype) != dtype:  # a buffer (parameters were checked above)
            t = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=t.device)
            owner._buffers[attr] = t
        tensors.append(t)
    comm = _comm_device()
    groups: dict[str, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(str(t.dtype), []).append(t)
    for ts in groups.values():
        total = sum(t.numel() for t in ts)
        if total == 0:
            continue
        is_bool = ts[0].dtype == torch.bool
        flat = torch.cat([(t.to(torch.uint8) if is_bool else t).detach().reshape(-1).to(comm) for t in ts])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in ts:
            n = t.numel()
            chunk = flat[offset:offset + n].view(t.shape)
            t.copy_(chunk.bool() if is_bool else chunk)
            offset += n
    return model

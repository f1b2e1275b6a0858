"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1).

For a layer ``L1`` whose output, through a ReLU or nothing, feeds only a layer ``L2``, output channel ``i``
of ``L1`` and input channel ``i`` of ``L2`` can be rescaled against each other without changing the
float function (ReLU is positive-homogeneous): ``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i``.
With ``s_i = √(r1_i · r2_i) / r2_i`` (``r`` = the channel's weight range) both channels end with the same
range ``√(r1_i r2_i)``, which per-tensor and small-bit-width weight grids handle much better.

Pairs are found by running the model once (``L1``'s output tensor reaching no module but ``L2``) and each
rescaling is checked on that batch: if the float model's output moved (an unseen functional consumer),
the pair is put back.  The activation and weight ranges are then calibrated again.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    >>> qm = qt.calibrate(qt.prepare(m, "w4a8"), data, progress=False)
    >>> qm = qt.reconstruct(qm, data, method="cle", progress=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, calibrate, call_model, model_device, to_device
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.ptq.sites import probe
from qtoolkit.toggles import fake_quant_disabled

__all__ = ["cross_layer_equalization", "equalization_pairs"]


def _is_depthwise(layer: QuantLayer) -> bool:
    return layer.kind != "linear" and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def _out_channels(layer: QuantLayer) -> int:
    return layer.out_features if layer.kind == "linear" else layer.out_channels


def _in_channels(layer: QuantLayer) -> int:
    return layer.in_features if layer.kind == "linear" else layer.in_channels


def equalization_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """``(L1, L2)`` names of quantized layers that CLE may rescale against each other."""
    pr = probe(model, batch)
    named = dict(model.named_modules())
    pairs = []
    for n1 in pr.order:
        l1 = named[n1]
        if l1.act not in (None, "relu") or id(l1) not in pr.outputs:
            continue
        # modules the tensor reaches, leaving out L1's own quantizers and pass-through modules (Identity, eval
        # Dropout) that hand the very same tensor on
        users = [m for m in pr.consumers.get(pr.outputs[id(l1)], [])
                 if not _contains(l1, m) and id(m) not in pr.passthrough]
        layers = [m for m in users if isinstance(m, QuantLayer)]
        if len(layers) != 1:
            continue
        l2 = layers[0]
        # anything else reading it must be L2's own quantizer or a container that only passes it to L2;
        # a functional reader the probe cannot see is caught by the float-output check afterwards
        if any(not _contains(l2, m) and not _contains(m, l2) for m in users):
            continue
        if _in_channels(l2) != _out_channels(l1):
            continue
        if l2.kind != "linear" and l2.groups != 1 and not _is_depthwise(l2):
            continue
        n2 = next(n for n, m in named.items() if m is l2)
        pairs.append((n1, n2))
    return pairs


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _ranges(l1: QuantLayer, l2: QuantLayer) -> tuple[Tensor, Tensor]:
    w1, w2 = l1.weight.detach(), l2.weight.detach()
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(dim=1)
    if _is_depthwise(l2):
        r2 = w2.abs().reshape(w2.shape[0], -1).amax(dim=1)
    else:
        r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(dim=1)
    return r1, r2


@torch.no_grad()
def _rescale(l1: QuantLayer, l2: QuantLayer, s: Tensor) -> None:
    shape1 = [-1] + [1] * (l1.weight.dim() - 1)
    l1.weight.div_(s.reshape(shape1))
    if l1.bias is not None:
        l1.bias.div_(s)
    if _is_depthwise(l2):
        l2.weight.mul_(s.reshape([-1] + [1] * (l2.weight.dim() - 1)))
    else:
        l2.weight.mul_(s.reshape([1, -1] + [1] * (l2.weight.dim() - 2)))


@torch.no_grad()
def cross_layer_equalization(
    model: nn.Module, batches: Sequence[Any], *, tolerance: float = 1e-4, progress: bool = True
) -> dict[str, Any]:
    """Equalize every pair in place, then recalibrate ranges on ``batches``; returns a summary."""
    batch = batches[0]
    pairs = equalization_pairs(model, batch)
    named = dict(model.named_modules())
    x = to_device(batch_input(batch), model_device(model))

    def float_out() -> Tensor:
        with fake_quant_disabled(model):
            return call_model(model, x).float()

    reference = float_out()
    kept, reverted = [], []
    for n1, n2 in pairs:
        l1, l2 = named[n1], named[n2]
        saved = [t.detach().clone() for t in (l1.weight, l2.weight)] + ([l1.bias.detach().clone()] if l1.bias is not None else [])
        r1, r2 = _ranges(l1, l2)  # one step equalizes a pair: both ranges become sqrt(r1 * r2)
        ok = (r1 > 0) & (r2 > 0)
        s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
        _rescale(l1, l2, s)
        out = float_out()
        err = float((out - reference).norm() / reference.norm().clamp_min(1e-30))
        if err > tolerance or not torch.isfinite(out).all():
            l1.weight.copy_(saved[0])
            l2.weight.copy_(saved[1])
            if l1.bias is not None:
                l1.bias.copy_(saved[2])
            reverted.append(f"{n1}->{n2}")
        else:
            kept.append(f"{n1}->{n2}")
    if kept:
        calibrate(model, batches, progress=progress)  # weight and activation ranges of the new weights
    return {"pairs": kept, "reverted": reverted}

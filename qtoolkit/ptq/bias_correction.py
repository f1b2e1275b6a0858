"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, empirical variant).

Quantization shifts the mean of a layer's output: ``E[W̃x̃] ≠ E[Wx]``, and the shift adds up through the
network.  Layer by layer, in the order they run, the quantized layer's per-channel pre-activation output
mean over the calibration data (its input taken from the already corrected quantized model) is set equal
to the float model's: ``b ← b_fp + E[W x_fp] − E[W̃ x̃]``.  A layer without a bias gets one.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    >>> qm = qt.calibrate(qt.prepare(m, "w4a8"), data, progress=False)
    >>> qm = qt.reconstruct(qm, data, method="bias_correction", progress=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.ptq.sites import FloatReference, capture, probe

__all__ = ["bias_correction"]


def _channel_mean(y: Tensor) -> Tensor:
    """Mean over every dimension but the channels (dim 1)."""
    return y.double().mean(dim=[d for d in range(y.dim()) if d != 1])


@torch.no_grad()
def _pre_activation_mean(layer: QuantLayer, x: Tensor, weight: Tensor, quantized: bool, chunk: int = 256) -> Tensor:
    total: Tensor | None = None
    count = 0
    w = layer.weight_quantizer(weight) if quantized else weight
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        if quantized and layer.input_quantizer is not None:
            xb = layer.input_quantizer(xb)
        y = layer._op(xb, w, None)
        y = y.movedim(-1, 1) if layer.kind == "linear" and y.dim() > 2 else y  # Linear: features last
        m = _channel_mean(y) * xb.shape[0]
        total = m if total is None else total + m
        count += xb.shape[0]
    assert total is not None
    return total / max(count, 1)


@torch.no_grad()
def bias_correction(
    model: nn.Module, batches: Sequence[Any], reference: FloatReference, *, progress: bool = True
) -> dict[str, Any]:
    """Correct every quantized layer's bias in place (see the module docstring); returns a summary."""
    pr = probe(model, batches[0])
    mods = dict(model.named_modules())
    from tqdm.auto import tqdm

    shifts: dict[str, float] = {}
    for name in tqdm(pr.order, desc="bias correction", unit="layer", leave=False, disable=not progress):
        layer = mods[name]
        assert isinstance(layer, QuantLayer)
        if not bool(layer.weight_quantizer.fake_quant_enabled):
            continue
        x_q, _ = capture(model, layer, batches, want_output=False)
        with reference.active(model):
            x_fp, _ = capture(model, layer, batches, want_output=False)
        _, w_fp, b_fp = reference.params[id(layer)]
        delta = _pre_activation_mean(layer, x_fp, w_fp, False) - _pre_activation_mean(layer, x_q, layer.weight, True)
        base = b_fp.double() if b_fp is not None else torch.zeros_like(delta)
        new_bias = (base + delta).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)
        shifts[name] = float(delta.abs().mean())
    return {"layers": len(shifts), "mean_abs_shift": shifts}

"""Activation bits chosen per site: the layer inputs a low-bit grid cannot hold get a higher one.

A few activation sites can carry a whole network's sensitivity to 4-bit activations: on the EfficientNet-style
recipe net (SiLU, squeeze-excitation), W4A4 with the stem, classifier, tables and SE products on 8-bit grids
still collapses to chance, and quantizing *only* the head conv's input at 4 bits (everything else float)
already drops top-1 from 92.0 to 36.6%.  :func:`fragile_activation_sites` finds such sites without naming
them: for each quantized layer whose input grid has fewer than ``high_bits`` bits it measures the model's
output SQNR against the float model with *only that input* rounded (one forward pass over a few calibration
batches per site, no labels) and raises the inputs below ``threshold_db`` to ``high_bits`` (weights keep the
low bits, so weight storage does not change).

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    >>> res = fragile_activation_sites(m, data, "w4a4", threshold_db=100.0)
    >>> sorted(res.raised), res.overrides["0"].activation.spec.bits
    (['0', '2'], 8)
    >>> qm = qt.prepare(m, "w4a4", overrides=res.overrides)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qtoolkit.calibrate import calibrate
from qtoolkit.config import QConfig, get_qconfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.prepare import prepare
from qtoolkit.ptq.sensitivity import _outputs, output_sqnr

__all__ = ["ActivationBitsResult", "fragile_activation_sites"]


@dataclass
class ActivationBitsResult:
    """What :func:`fragile_activation_sites` measured and chose.

    Attributes:
        overrides: ``prepare`` overrides: the user's, plus ``high_bits`` activations for each raised layer.
        raised: the layers whose input was raised, worst first.
        sqnr_db: ``{layer: output SQNR (dB) with only its input rounded to the low grid}`` for every candidate.
        threshold_db: the threshold used.

    Example::

        >>> ActivationBitsResult({}, [], {"conv": 31.5}, 10.0).table().splitlines()[0]
        '| layer | SQNR, only its input low-bit (dB) | raised |'
    """

    overrides: dict[str, Any]
    raised: list[str]
    sqnr_db: dict[str, float] = field(default_factory=dict)
    threshold_db: float = 10.0

    def table(self) -> str:
        """Markdown table, worst site first."""
        rows = ["| layer | SQNR, only its input low-bit (dB) | raised |", "|---|---|---|"]
        for name, v in sorted(self.sqnr_db.items(), key=lambda kv: kv[1]):
            rows.append(f"| {name} | {v:.2f} | {'yes' if name in self.raised else ''} |")
        return "\n".join(rows)


@torch.no_grad()
def fragile_activation_sites(
    model: nn.Module,
    data: Iterable[Any],
    qconfig: str | QConfig,
    *,
    overrides: Mapping[Any, Any] | None = None,
    high_bits: int = 8,
    threshold_db: float = 10.0,
    num_batches: int | None = None,
    metric_batches: int = 2,
) -> ActivationBitsResult:
    """Find the layer inputs whose low-bit grid alone wrecks the output, and raise them to ``high_bits``.

    Args:
        model: the float model (not modified).
        data: calibration batches (targets unused).
        qconfig: the low-bit preset (e.g. ``"w4a4"``) the model will be prepared with.
        overrides: the user's ``prepare`` overrides (kept; layers they name are measured with their config).
        high_bits: activation bits of a raised input.
        threshold_db: inputs whose "only this one rounded" output SQNR is below this are raised (10 dB: the
            error energy of that single site is a tenth of the output's).
        num_batches: calibration batches used (default: all of ``data``).
        metric_batches: the first this many calibration batches are the metric's data.

    Returns:
        an :class:`ActivationBitsResult`; ``prepare(model, qconfig, overrides=result.overrides)`` builds it.

    Example::

        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
        >>> res = fragile_activation_sites(m, [torch.randn(8, 3, 10, 10)], "w4a4", threshold_db=-1.0)
        >>> res.raised, len(res.sqnr_db)
        ([], 2)
    """
    qc = get_qconfig(qconfig)
    if qc.activation is None or qc.mode != "static":
        raise ValueError(f"fragile_activation_sites: needs a static preset with activation quantizers, got {qc.mode!r}")
    if not 2 <= int(high_bits) <= 16:
        raise ValueError(f"fragile_activation_sites: high_bits must be in 2..16, got {high_bits}")
    batches = list(itertools.islice(iter(data), num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("fragile_activation_sites: `data` yielded no batches")
    user = dict(overrides or {})
    qm = calibrate(prepare(model, qc, overrides=user), batches, progress=False)
    qm.eval()
    fqs = [fq for fq in qm.modules() if isinstance(fq, FakeQuantize)]
    flags = [bool(fq.fake_quant_enabled) for fq in fqs]
    metric_data = batches[:metric_batches]
    sqnr: dict[str, float] = {}
    try:
        for fq in fqs:
            fq.enable_fake_quant(False)
        metric = output_sqnr(metric_data, _outputs(qm, metric_data))
        for name, m in qm.named_modules():
            fin = getattr(m, "input_quantizer", None) if isinstance(m, QuantLayer) else None
            if fin is None or fin.role != "activation" or fin.spec.bits >= high_bits:
                continue
            fin.enable_fake_quant(True)
            sqnr[name] = float(metric(qm))
            fin.enable_fake_quant(False)
    finally:
        for fq, on in zip(fqs, flags):
            fq.enable_fake_quant(on)
    raised = sorted((n for n, v in sqnr.items() if v < threshold_db), key=lambda n: sqnr[n])
    layers = dict(qm.named_modules())
    out = dict(user)
    for name in raised:
        out[name] = layers[name].qconfig.with_bits(activation_bits=int(high_bits))
    return ActivationBitsResult(out, raised, sqnr, float(threshold_db))

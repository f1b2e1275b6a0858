"""Which tensors a low-bit preset rounds to its low bit width, found by kind rather than by layer name.

A ``w4a4`` preset read literally rounds *every* activation quantizer to 4 bits, including the ones of
elementwise ops that are no operand of any weight layer: the input and output of an activation lookup
table (SiLU, sigmoid, GELU, hardswish, ...) and the operands of an elementwise ``mul`` (a squeeze-excitation
gate times its features).  On SE/SiLU networks (EfficientNet, MobileNetV3) that collapses the model: a SiLU
table's input is the pre-activation (long negative tail), 16 codes over it leave the curve's knee with one
or two codes, and the sigmoid gate's 4-bit input moves the gate of every channel by up to 0.15 at once.

What an integer engine multiplies at low precision are the operands of convolutions, linear layers and
matmuls; an elementwise table with 256 entries instead of 16, or a ``uint8 × uint8`` product, costs nothing
measurable.  :func:`elementwise_overrides` gives ``prepare`` overrides that keep those elementwise sites on
an 8-bit grid while every weight layer's (and matmul's) inputs keep the preset's bits, and
:func:`first_last_overrides` the usual stem / classifier exception, both found from the model itself.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> ov = elementwise_overrides(m, "w4a4")
    >>> sorted(ov), ov["1"].activation.spec.bits
    (['1'], 8)
    >>> qm = qt.prepare(m, "w4a4", overrides=ov)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qtoolkit.config import QConfig, get_qconfig
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantMul
from qtoolkit.table_grids import WINDOW_POINTS, fit_table_input_grids, table_input_window  # noqa: F401 - re-exported

__all__ = [
    "ELEMENTWISE_KINDS",
    "elementwise_overrides",
    "first_last_overrides",
    "fit_table_input_grids",
    "table_input_window",
    "tighten_activation_grids",
]

#: site kinds :func:`elementwise_overrides` can keep at a higher precision
ELEMENTWISE_KINDS: dict[str, type[nn.Module]] = {"activation": QuantActivation, "mul": QuantMul}


def _prepared(model: nn.Module, qconfig: QConfig, overrides: Mapping[Any, Any] | None) -> nn.Module:
    from qtoolkit.prepare import prepare

    return prepare(model, qconfig, overrides=dict(overrides or {}))


def elementwise_overrides(
    model: nn.Module,
    qconfig: str | QConfig,
    *,
    bits: int = 8,
    kinds: Sequence[str] = ("activation", "mul"),
    overrides: Mapping[Any, Any] | None = None,
) -> dict[str, QConfig]:
    """``prepare`` overrides keeping activation tables and elementwise products at ``bits``-bit grids.

    Args:
        model: the float model (not modified; a prepared copy is inspected).
        qconfig: the low-bit preset the model will be prepared with.
        bits: activation bits of those sites (8: a 256-entry table, a ``uint8`` product).
        kinds: which elementwise sites (:data:`ELEMENTWISE_KINDS`): ``"activation"`` (lookup-table
            activations: SiLU, sigmoid, GELU, ...) and/or ``"mul"``.
        overrides: the user's own overrides; sites they already name keep them.

    Returns:
        ``{qualified name: QConfig}`` for every such site whose activation bits are below ``bits`` (empty
        for a model without them, e.g. ReLU networks, whose ReLUs are fused into the convolutions).

    Raises:
        ValueError: an unknown kind, ``bits`` outside 2..16, or a preset without activation quantizers.

    Example::

        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid()).eval()
        >>> list(elementwise_overrides(m, "w4a4"))
        ['1']
    """
    unknown = [k for k in kinds if k not in ELEMENTWISE_KINDS]
    if unknown:
        raise ValueError(f"elementwise_overrides: unknown kinds {unknown}; choose from {tuple(ELEMENTWISE_KINDS)}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"elementwise_overrides: bits must be in 2..16, got {bits}")
    qc = get_qconfig(qconfig)
    if qc.activation is None or qc.mode != "static":
        raise ValueError(f"elementwise_overrides: needs a static preset with activation quantizers, got mode {qc.mode!r}")
    types = tuple(ELEMENTWISE_KINDS[k] for k in kinds)
    qm = _prepared(model, qc, overrides)
    out: dict[str, QConfig] = {}
    user = dict(overrides or {})
    for name, m in qm.named_modules():
        if not isinstance(m, types) or name in user:
            continue
        mqc: QConfig = m.qconfig
        if mqc.activation is not None and mqc.activation.spec.bits < bits:
            out[name] = mqc.with_bits(activation_bits=int(bits))
    return out


def first_last_overrides(
    model: nn.Module,
    qconfig: str | QConfig,
    example: Any,
    *,
    high: str | QConfig = "w8a8",
    overrides: Mapping[Any, Any] | None = None,
) -> dict[str, QConfig]:
    """``prepare`` overrides putting the first and the last quantized layer to run (stem, classifier) at ``high``.

    The order is the one of a forward pass on ``example`` (one batch), so it holds for any module
    registration order.  ``high`` keeps the activation calibrator of ``qconfig``.

    Example::

        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
        >>> sorted(first_last_overrides(m, "w4a4", torch.randn(1, 3, 8, 8)))  # doctest: +SKIP
        ['0', '2']
    """
    from qtoolkit.ptq.sites import probe

    qc = get_qconfig(qconfig)
    hi = get_qconfig(high)
    if qc.activation is not None and hi.activation is not None:
        hi = hi.with_activation_calibrator(qc.activation.calibrator, **qc.activation.options)
    from qtoolkit.toggles import disable_fake_quant, disable_observers

    qm = disable_observers(disable_fake_quant(_prepared(model, qc, overrides)))  # a throw-away copy, run float
    order = probe(qm, example).order
    if not order:
        raise ValueError("first_last_overrides: the model ran no quantized layer on `example`")
    layers = {n for n, m in qm.named_modules() if isinstance(m, QuantLayer)}
    return {name: hi for name in dict.fromkeys([order[0], order[-1]]) if name in layers}


@torch.no_grad()
def tighten_activation_grids(model: nn.Module, *, min_gain: float = 1.05) -> list[str]:
    """Shrink calibrated per-tensor activation grids to the range the data actually covered (0 kept exact).

    A calibrator may place an asymmetric grid's ends beyond the observed data — e.g. an MSE search that
    returns ``[-2.66, 3.99]`` for SiLU outputs in ``[-0.278, 6.44]``: 6 of 16 codes of a 4-bit grid lie below
    the smallest value ever seen.  Each grid whose step would shrink by at least ``min_gain`` is refitted to
    ``[max(lo, min(data_min, 0)), min(hi, max(data_max, 0))]``, with scale and zero point recomputed from that
    range.  Quantizers observing the same tensor see the same data and get the same grid (ties are kept).
    Call it after :func:`qtoolkit.calibrate`, before reconstruction or ``convert``.

    Returns:
        the names of the quantizers changed.

    Example::

        >>> qm = qt.calibrate(qt.prepare(m, "w4a4"), data)  # doctest: +SKIP
        >>> tighten_activation_grids(qm)  # doctest: +SKIP
        ['1.output_quantizer', '2.input_quantizer']
    """
    from qtoolkit.fake_quant import FakeQuantize

    changed = []
    for name, fq in model.named_modules():
        if not isinstance(fq, FakeQuantize) or fq.role not in ("activation", "output") or fq.spec.axis is not None:
            continue
        obs = getattr(fq, "observer", None)
        dmin, dmax = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
        if not fq.is_calibrated or dmin is None or dmax is None or fq.scale.numel() != 1:
            continue
        dmin, dmax = float(dmin), float(dmax)
        if not (math.isfinite(dmin) and math.isfinite(dmax)):
            continue
        s, z = float(fq.scale), int(fq.zero_point)
        lo, hi = (fq.qmin - z) * s, (fq.qmax - z) * s
        new_lo, new_hi = max(lo, min(dmin, 0.0)), min(hi, max(dmax, 0.0))
        s_new = (new_hi - new_lo) / (fq.qmax - fq.qmin)
        if s_new <= 0 or s / s_new < min_gain:
            continue
        z_new = int(min(max(fq.qmin - round(new_lo / s_new), fq.qmin), fq.qmax))
        fq._load_qparams(torch.tensor(s_new, dtype=fq.scale.dtype).reshape(fq.scale.shape),
                         torch.tensor(z_new, dtype=fq.zero_point.dtype).reshape(fq.zero_point.shape))
        changed.append(name)
    return changed

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


#: points at which :func:`table_input_window` evaluates the activation between the grid's ends
WINDOW_POINTS = 8193


@torch.no_grad()
def table_input_window(
    fn: Any, lo: float, hi: float, out_scale: float, out_zero_point: int, qmin: int, qmax: int,
    *, points: int = WINDOW_POINTS,
) -> tuple[float, float]:
    """The part of an activation table's input range ``[lo, hi]`` whose outputs the output grid can tell apart.

    A lookup table rounds ``fn(x)`` to its output grid.  Where ``fn`` saturates (a sigmoid gate's tails, SiLU's
    and GELU's negative tail, tanh, hardsigmoid, ReLU6...) a whole stretch of inputs at either end of the range
    gives one and the same output code: input codes spent there change nothing.  Returns ``(a, b)``, the
    smallest interval (0 included) such that every ``x`` in ``[lo, a]`` gives the output code of ``fn(lo)`` and
    every ``x`` in ``[b, hi]`` the code of ``fn(hi)`` — so clamping the input to ``[a, b]`` leaves the table's
    output unchanged, and an input grid over ``[a, b]`` is finer.  ``fn`` is evaluated at ``points`` evenly
    spaced inputs in float64.

    Example::

        >>> a, b = table_input_window(torch.sigmoid, -80.0, 84.0, 1 / 255, 0, 0, 255)
        >>> round(a, 1), round(b, 1)   # sigmoid(x) rounds to code 0 below ~-6.2 and to 255 above ~6.2
        (-6.2, 6.2)
    """
    if not hi > lo:
        return lo, hi
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    y = fn(x.clone()).to(torch.float64)  # a copy: in-place activations (SiLU(inplace=True)) change their input
    codes = torch.clamp(torch.round(y / out_scale) + out_zero_point, qmin, qmax)
    same_lo = (codes == codes[0]).to(torch.int64).cumprod(0)  # 1 while the code stays that of fn(lo)
    same_hi = (codes == codes[-1]).to(torch.int64).flip(0).cumprod(0).flip(0)
    i = int(same_lo.sum()) - 1  # last index of the constant run from the bottom
    j = points - int(same_hi.sum())  # first index of the constant run to the top
    if i >= j:  # fn is constant (to the output grid) over the whole range: keep it
        return lo, hi
    a, b = float(x[i]), float(x[j])
    return min(a, 0.0), max(b, 0.0)


def _tied_groups(model: nn.Module, groups: Sequence[Sequence[Any]] | None) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for g in groups or ():
        for fq in g:
            out[id(fq)] = list(g)
    return out


@torch.no_grad()
def fit_table_input_grids(
    model: nn.Module,
    groups: Sequence[Sequence[Any]] | None = None,
    *,
    min_gain: float = 1.01,
) -> list[str]:
    """Shrink every calibrated lookup-table activation's input grid to where its output codes change.

    For each :class:`~qtoolkit.nn.QuantActivation` (SiLU, sigmoid, GELU, hardswish, tanh...), the input grid is
    refitted to :func:`table_input_window` of its calibrated range under its calibrated output grid: the
    saturated tails, which all map to one output code, get no input codes.  A squeeze-excitation gate's sigmoid
    calibrated on ``[-80, 84]`` keeps ``[-6.2, 6.2]`` at 8 bits (13× finer), ``[-3.4, 3.4]`` at 4 bits; a 4-bit
    SiLU table whose output grid cannot resolve SiLU's negative lobe keeps only ``[0, max]``.  The table's
    outputs are unchanged for every input; only the rounding of the input gets finer.

    ``groups`` are the quantizers that observe the very same tensor (as :func:`qtoolkit.calibrate` finds them:
    the producing layer's observe-only output quantizer and this table's input quantizer), which the converted
    model requantizes once to one grid: the new grid is set on all of them, and a table whose input tensor is
    also rounded by another consumer (not observe-only) is left alone.  Called by :func:`qtoolkit.calibrate`.

    Returns:
        the names of the tables whose input grid changed (step at least ``min_gain`` × finer).

    Example::

        >>> import qtoolkit as qt
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Sigmoid()).eval()
        >>> with torch.no_grad():
        ...     _ = m[0].weight.fill_(40.0), m[0].bias.zero_()
        >>> qm = qt.calibrate(qt.prepare(m, "w8a8"), [torch.randn(8, 1, 4, 4)], progress=False)
        >>> s = float(qm[1].input_quantizer.scale)   # calibrate already refitted the gate's input grid
        >>> 0.04 < s < 0.06
        True
    """
    from qtoolkit.numerics import compute_qparams

    tied = _tied_groups(model, groups)
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantActivation):
            continue
        fin, fout = m.input_quantizer, m.output_quantizer
        if not (fin.is_calibrated and fout.is_calibrated) or fin.scale.numel() != 1 or fout.scale.numel() != 1:
            continue
        group = tied.get(id(fin), [fin])
        if any(g is not fin and g.role != "output" for g in group):
            continue  # another consumer rounds this tensor to this grid: keep its range
        s, z = float(fin.scale), int(fin.zero_point)
        lo, hi = (fin.qmin - z) * s, (fin.qmax - z) * s
        a, b = table_input_window(m.fn, lo, hi, float(fout.scale), int(fout.zero_point), fout.qmin, fout.qmax)
        if not (b - a) * min_gain <= (hi - lo):
            continue
        scale, zp = compute_qparams(torch.tensor(a), torch.tensor(b), fin.qmin, fin.qmax, fin.spec.symmetric)
        for g in group:
            g._load_qparams(scale.reshape(g.scale.shape).to(g.scale.dtype), zp.reshape(g.zero_point.shape))
        changed.append(name)
    return changed

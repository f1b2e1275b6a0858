"""Lookup-table activations' input grids fitted to where their output codes change (run by :func:`qtoolkit.calibrate`).

A table rounds ``fn(x)`` to its output grid; where ``fn`` saturates, a stretch of inputs maps to one output code and
input codes spent there change nothing.  :func:`fit_table_input_grids` refits each calibrated table's input grid to
:func:`table_input_window` of its range (also re-exported by :mod:`qtoolkit.ptq.activation_grids`).

Example::

    >>> import torch
    >>> a, b = table_input_window(torch.sigmoid, -80.0, 84.0, 1 / 255, 0, 0, 255)
    >>> round(a, 1), round(b, 1)
    (-6.2, 6.2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qtoolkit.nn.quant_ops import QuantActivation

__all__ = ["WINDOW_POINTS", "fit_table_input_grids", "table_input_window"]

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

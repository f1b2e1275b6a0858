"""``summary``: a readable table of every quantized site and of what stays float.

Per site: kind, bits, granularity, calibrator, scale and zero-point ranges, clip
ratio (representable range / observed range: < 1 means the calibrator clips
outliers) and, for weights, the SQNR in dB (``10·log10(‖w‖² / ‖w − ŵ‖²)``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate, summary
    >>> qm = calibrate(prepare(nn.Sequential(nn.Linear(8, 4))), [torch.randn(8, 8)], progress=False)
    >>> print(summary(qm))  # doctest: +ELLIPSIS
    site ...
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.numerics import fake_quantize
from qtoolkit.prepare import float_ops

__all__ = ["summary", "summary_rows"]


def _fmt_range(t: torch.Tensor, fmt: str = "{:.3g}") -> str:
    if t.numel() == 0:
        return "-"
    lo, hi = float(t.min()), float(t.max())
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


def _clip_ratio(fq: FakeQuantize) -> float | None:
    if not fq.is_calibrated or fq.role == "dynamic" or not fq.observer.has_data:
        return None
    try:
        lo, hi = fq.observer.observed_range()
    except Exception:
        return None
    s, z = fq.scale.detach().double(), fq.zero_point.double()
    rep_lo, rep_hi = (fq.qmin - z) * s, (fq.qmax - z) * s
    obs = (hi.double().max() - lo.double().min()).item()
    if obs <= 0:
        return None
    rep = (torch.minimum(rep_hi, hi.double().max()) - torch.maximum(rep_lo, lo.double().min())).max().item()
    return rep / obs


def _weight_sqnr(layer: QuantLayer) -> float | None:
    fq = layer.weight_quantizer
    if not fq.is_calibrated:
        return None
    w, _ = layer.folded_weight_bias()
    w = w.detach().float()
    wq = fake_quantize(w, fq.scale.detach(), fq.zero_point, fq.qmin, fq.qmax, axis=fq.spec.axis)
    err = (w - wq).pow(2).sum().item()
    sig = w.pow(2).sum().item()
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else None


def _quantizer_row(site: str, kind: str, role: str, fq: FakeQuantize, sqnr: float | None = None) -> dict[str, Any]:
    spec = fq.spec
    calibrated = fq.is_calibrated
    return {
        "site": site,
        "kind": kind,
        "role": role,
        "bits": spec.bits,
        "dtype": ("int" if spec.signed else "uint") + str(spec.bits),
        "granularity": "per-tensor" if spec.axis is None else f"per-channel(axis={spec.axis})",
        "calibrator": "dynamic" if fq.role == "dynamic" else fq.config.calibrator,
        "scale": _fmt_range(fq.scale.detach()) if calibrated and fq.role != "dynamic" else "-",
        "zero_point": _fmt_range(fq.zero_point, "{:.0f}") if calibrated and fq.role != "dynamic" else "-",
        "clip_ratio": _clip_ratio(fq),
        "sqnr_db": sqnr,
        "calibrated": calibrated,
    }


def summary_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One dict per quantizer of a prepared model (or per converted module).

    Keys: ``site``, ``kind``, ``role``, ``bits``, ``dtype``, ``granularity``, ``calibrator``, ``scale``,
    ``zero_point``, ``clip_ratio``, ``sqnr_db``, ``calibrated``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import calibrate, prepare
        >>> qm = calibrate(prepare(nn.Sequential(nn.Linear(8, 4))), [torch.randn(8, 8)], progress=False)
        >>> [(r["site"], r["role"], r["granularity"], r["calibrated"]) for r in summary_rows(qm)]
        [('0', 'weight', 'per-channel(axis=0)', True), ('0', 'input', 'per-tensor', True)]
    """
    rows: list[dict[str, Any]] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            rows.append(_quantizer_row(name, m.kind + (f"+{m.act}" if m.act else ""), "weight", m.weight_quantizer, _weight_sqnr(m)))
            if m.input_quantizer is not None:
                rows.append(_quantizer_row(name, m.kind, "input", m.input_quantizer))
        elif isinstance(m, QuantAdd):
            rows.append(_quantizer_row(name, "add" + (f"+{m.act}" if m.act else ""), "lhs", m.lhs_quantizer))
            rows.append(_quantizer_row(name, "add", "rhs", m.rhs_quantizer))
        elif isinstance(m, Int8Layer):
            rows.append({
                "site": name, "kind": m.kind, "role": "weight", "bits": m.weight_bits,
                "dtype": f"int{m.weight_bits}" + (" packed" if m.packed else ""), "granularity": "per-channel(axis=0)",
                "calibrator": "-", "scale": _fmt_range(m.weight_scale), "zero_point": _fmt_range(m.weight_zero_point, "{:.0f}"),
                "clip_ratio": None, "sqnr_db": None, "calibrated": True,
            })
        elif isinstance(m, Int8Add):
            rows.append({
                "site": name, "kind": "add", "role": "lhs/rhs", "bits": None, "dtype": "-", "granularity": "per-tensor",
                "calibrator": "-", "scale": f"{float(m.lhs_scale):.3g}/{float(m.rhs_scale):.3g}", "zero_point": f"{int(m.lhs_zero_point)}/{int(m.rhs_zero_point)}",
                "clip_ratio": None, "sqnr_db": None, "calibrated": True,
            })
    return rows


def summary(model: nn.Module) -> str:
    """A plain-text table of the quantized sites (:func:`summary_rows`) and the ops left in float.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import calibrate, prepare
        >>> qm = calibrate(prepare(nn.Sequential(nn.Linear(8, 4))), [torch.randn(8, 8)], progress=False)
        >>> print(summary(qm).splitlines()[-2])
        1 quantized sites, 2 quantizers.
    """
    rows = summary_rows(model)
    cols = ["site", "kind", "role", "dtype", "granularity", "calibrator", "scale", "zero_point", "clip_ratio", "sqnr_db"]

    def cell(r: dict[str, Any], c: str) -> str:
        v = r[c]
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}" if c == "clip_ratio" else f"{v:.1f}"
        if c == "scale" and not r["calibrated"]:
            return "uncalibrated"
        return str(v)

    table = [cols] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_sites = len({r["site"] for r in rows})
    lines.append(f"\n{n_sites} quantized sites, {len(rows)} quantizers.")
    ops = float_ops(model)
    if ops:
        lines.append("Left in float:")
        for op in ops:
            lines.append(f"  {op.where}: {op.op} — {op.reason}")
    else:
        lines.append("Left in float: nothing (besides data movement: pooling, flatten, reshape).")
    return "\n".join(lines)

"""Automatic mixed precision: per-layer bit widths from a sensitivity measurement.

Both candidate configurations (``low``, e.g. ``"w4a4"``, and ``high``, e.g. ``"w8a8"``) are prepared and
calibrated once; a *hybrid* swaps single layers of the low model for their calibrated high twins, so every
measurement is one forward pass over ``data``.  Each layer's *gain* is the metric of "all low but this layer
high" minus "all low"; its *cost* is the extra weight storage in bytes.  Then

* ``size_budget`` (bytes of quantized-layer weight storage): layers are raised greedily by gain per byte
  while they fit;
* ``metric_target``: layers are raised in that order until the measured metric of the hybrid reaches it
  (the fewest extra bytes the greedy order finds).

The result's ``overrides`` is what :func:`qtoolkit.prepare` takes.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    >>> res = qt.mixed_precision(m, data, size_budget=1.1 * qt.weight_bytes(m, "w4a4"), progress=False)
    >>> qm = qt.prepare(m, "w4a4", overrides=res.overrides)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qtoolkit.calibrate import calibrate
from qtoolkit.config import QConfig, get_qconfig
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.prepare import prepare
from qtoolkit.ptq.sensitivity import _outputs, output_sqnr
from qtoolkit.toggles import fake_quant_disabled

__all__ = ["MixedPrecisionResult", "mixed_precision", "weight_bytes"]


def _layer_bytes(m: QuantLayer) -> float:
    return m.weight.numel() * m.qconfig.weight.spec.bits / 8.0  # type: ignore[union-attr]


def weight_bytes(model: nn.Module, qconfig: str | QConfig | None = None,
                 overrides: Mapping[Any, Any] | None = None) -> float:
    """Weight storage of the quantized layers in bytes (``numel · bits / 8``; int4 is packed two per byte).

    ``model`` is a prepared model, or a float model with ``qconfig`` (and ``overrides``) to prepare it with.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 4))
        >>> weight_bytes(net, "w8a8"), weight_bytes(net, "w4a4")
        (64.0, 32.0)
    """
    if qconfig is not None:
        model = prepare(model, qconfig, overrides=dict(overrides or {}))
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("weight_bytes: no quantized layers; pass a prepared model or qconfig=")
    return float(sum(_layer_bytes(m) for m in layers))


@dataclass
class MixedPrecisionResult:
    """The chosen layers and what was measured (returned by :func:`mixed_precision`).

    Example::

        >>> res = MixedPrecisionResult({}, ["0"], 48.0, 32.0, 64.0, 30.1, 25.0, 31.0, "output SQNR (dB)",
        ...                            [{"layer": "0", "params": 64, "gain": 5.1, "extra_bytes": 16.0, "high": True}])
        >>> print(res.table().splitlines()[-1])
        | 0 | 64 | +5.100 | 16 | yes |
    """

    overrides: dict[str, QConfig]
    high_layers: list[str]
    weight_bytes: float
    low_weight_bytes: float
    high_weight_bytes: float
    metric: float
    low_metric: float
    high_metric: float
    metric_name: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Markdown: per layer its gain, extra bytes and whether it was raised."""
        lines = [
            f"metric: {self.metric_name}; all low {self.low_metric:.3f}, all high {self.high_metric:.3f}, "
            f"chosen {self.metric:.3f}; weight bytes {self.weight_bytes:.0f} (all low {self.low_weight_bytes:.0f}, "
            f"all high {self.high_weight_bytes:.0f})",
            "",
            "| layer | weights | gain when high | extra bytes | high |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r['layer']} | {r['params']} | {r['gain']:+.3f} | {r['extra_bytes']:.0f} | "
                         f"{'yes' if r['high'] else ''} |")
        return "\n".join(lines)


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def mixed_precision(
    model: nn.Module,
    data: Iterable[Any],
    *,
    low: str | QConfig = "w4a4",
    high: str | QConfig = "w8a8",
    size_budget: float | None = None,
    metric_target: float | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    overrides: Mapping[Any, Any] | None = None,
    num_batches: int | None = None,
    metric_batches: int | None = 8,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Choose per-layer ``low`` / ``high`` configs for a float model (see the module docstring).

    Args:
        model: the float model (not modified).
        data: calibration batches (targets unused); also the default metric's data.
        low / high: the two candidate presets or QConfigs (same mode).
        size_budget: weight-storage budget in bytes (see :func:`weight_bytes`), e.g.
            ``1.1 * weight_bytes(model, "w4a4")``.
        metric_target: smallest acceptable metric instead (exactly one of the two budgets).
        eval_fn: ``prepared model -> float``, higher is better (e.g. top-1 on held-out data); default: output
            SQNR (dB) against the float model over ``data``, no labels.
        overrides: per-layer configs fixed by the user (kept, never chosen by the search), as in ``prepare``.
        num_batches: batches of ``data`` used for calibration.
        metric_batches: the first this many of them are the default metric's data (one forward per layer each;
            ``None``: all).
        progress: tqdm progress bar.

    Returns:
        a :class:`MixedPrecisionResult`; ``prepare(model, low, overrides=result.overrides)`` builds it.

    Raises:
        ValueError: neither or both budgets, or a size budget below the all-low size.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
        >>> data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
        >>> res = mixed_precision(net, data, size_budget=1.5 * weight_bytes(net, "w4a4"), progress=False)
        >>> sorted(res.overrides) == sorted(res.high_layers), res.weight_bytes <= 1.5 * res.low_weight_bytes
        (True, True)
    """
    if (size_budget is None) == (metric_target is None):
        raise ValueError("mixed_precision: give exactly one of size_budget (bytes) or metric_target")
    low_qc, high_qc = get_qconfig(low), get_qconfig(high)
    if low_qc.mode != high_qc.mode:
        raise ValueError(f"mixed_precision: low and high must share a mode, got {low_qc.mode} and {high_qc.mode}")
    batches = list(itertools.islice(iter(data), num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("mixed_precision: `data` yielded no batches")
    fixed = dict(overrides or {})
    low_qm = calibrate(prepare(model, low_qc, overrides=fixed), batches, progress=False)
    high_qm = calibrate(prepare(model, high_qc, overrides=fixed), batches, progress=False)
    low_qm.eval()
    high_layers_all = {n: m for n, m in high_qm.named_modules() if isinstance(m, QuantLayer)}
    candidates = [
        (n, m) for n, m in low_qm.named_modules()
        if isinstance(m, QuantLayer) and n in high_layers_all and m.qconfig == low_qc
    ]
    if eval_fn is None:
        metric_data = batches[:metric_batches] if metric_batches else batches
        with fake_quant_disabled(low_qm):
            ref = _outputs(low_qm, metric_data)
        eval_fn = output_sqnr(metric_data, ref)
        metric_name = "output SQNR vs float (dB)"
    else:
        metric_name = getattr(eval_fn, "__name__", "metric")
    low_bytes = weight_bytes(low_qm)
    high_bytes = weight_bytes(high_qm)
    if size_budget is not None and size_budget < low_bytes:
        raise ValueError(f"mixed_precision: size_budget {size_budget:.0f} B is below the all-low weight size "
                         f"{low_bytes:.0f} B")
    from tqdm.auto import tqdm

    with torch.no_grad():
        low_metric = float(eval_fn(low_qm))
        high_metric = float(eval_fn(high_qm))
        rows = []
        for name, m in tqdm(candidates, desc="mixed precision", unit="layer", leave=False, disable=not progress):
            _set_child(low_qm, name, high_layers_all[name])
            gain = float(eval_fn(low_qm)) - low_metric
            _set_child(low_qm, name, m)
            extra = _layer_bytes(high_layers_all[name]) - _layer_bytes(m)
            rows.append({"layer": name, "params": int(m.weight.numel()), "gain": gain, "extra_bytes": extra,
                         "high": False})
        order = sorted(rows, key=lambda r: r["gain"] / max(r["extra_bytes"], 1e-9), reverse=True)
        size = low_bytes
        hybrid = copy.deepcopy(low_qm)
        chosen: list[str] = []
        metric = low_metric
        for r in order:
            if r["gain"] <= 0:
                break
            if size_budget is not None:
                if size + r["extra_bytes"] > size_budget:
                    continue
            elif metric >= metric_target:  # type: ignore[operator]
                break
            _set_child(hybrid, r["layer"], copy.deepcopy(high_layers_all[r["layer"]]))
            r["high"] = True
            size += r["extra_bytes"]
            chosen.append(r["layer"])
            if metric_target is not None:
                metric = float(eval_fn(hybrid))
        if size_budget is not None:
            metric = float(eval_fn(hybrid))
    final = {**fixed, **{n: high_qc for n in chosen}}
    return MixedPrecisionResult(final, chosen, size, low_bytes, high_bytes, metric, low_metric, high_metric,
                                metric_name, rows)

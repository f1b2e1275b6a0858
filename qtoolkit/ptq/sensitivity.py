"""Per-site sensitivity: which quantized layers / adds cost the most.

Two views, both on a calibrated prepared model, toggling fake quantization per *site*: a layer's weight and
input quantizers, or the rounding quantizers of any other quantized op — a residual add's operands, an
elementwise activation's lookup-table input and output (SiLU, sigmoid, GELU, ...), a ``mul`` / ``matmul``'s
operands (a squeeze-excitation gate), a ``cat``'s shared grid, a quantized normalization:

* ``"quantize_one"`` — everything float except this site: the damage this site does on its own;
* ``"float_one"`` — everything quantized except this site: what keeping it float buys back.

The metric is ``eval_fn(model) -> float`` (higher is better, e.g. top-1 on a held-out set) or, by default,
the label-free :func:`output_sqnr` of the model's output against the float model's over ``data``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    >>> rep = qt.sensitivity(m, data, qconfig="w4a4", progress=False)
    >>> [r.site for r in rep.rows]
    ['0', '2']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, calibrate, call_model, model_device, to_device
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.toggles import quantizers

__all__ = ["SiteSensitivity", "SensitivityReport", "sensitivity", "output_sqnr", "sites"]

MODES = ("quantize_one", "float_one")


def sites(model: nn.Module) -> list[tuple[str, nn.Module, list[FakeQuantize]]]:
    """``(name, module, quantizers)`` of every site, in registration order: a quantized layer (weight + input
    quantizers), or any other module owning rounding quantizers as direct children (a residual add's operands,
    an activation table's input and output, a ``mul``'s operands, ...).  Observe-only output quantizers
    (role ``"output"``) never change the fake-quant output and belong to no site.

    Example::

        >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1)).eval()
        >>> import qtoolkit as qt
        >>> [n for n, _, _ in sites(qt.prepare(m, "w8a8"))]  # doctest: +SKIP
        ['0', '1', '2']
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            continue
        if isinstance(m, QuantLayer):
            fqs = [m.weight_quantizer] + ([m.input_quantizer] if m.input_quantizer is not None else [])
        else:
            fqs = [c for c in m.children() if isinstance(c, FakeQuantize) and c.role != "output"]
            if not fqs:
                continue
        out.append((name, m, fqs))
    return out


def _outputs(model: nn.Module, batches: Sequence[Any]) -> list[Tensor]:
    device = model_device(model)
    with torch.no_grad():
        return [call_model(model, to_device(batch_input(b), device)).detach().float() for b in batches]


def output_sqnr(batches: Sequence[Any], reference: Sequence[Tensor]) -> Callable[[nn.Module], float]:
    """A label-free metric: SQNR in dB of the model's output against ``reference`` outputs over ``batches``
    (signal and noise energies summed over all batches)."""

    def metric(model: nn.Module) -> float:
        sig = noise = 0.0
        for out, ref in zip(_outputs(model, batches), reference):
            sig += float(ref.double().pow(2).sum())
            noise += float((out.double() - ref.double()).pow(2).sum())
        if noise == 0.0:
            return float("inf")
        return 10.0 * torch.log10(torch.tensor(max(sig, 1e-300) / noise)).item()

    return metric


@dataclass
class SiteSensitivity:
    """One site's row: its metric with only it quantized / with only it float, and its weight count."""

    site: str
    kind: str
    bits: str
    params: int
    quantize_one: float | None = None
    float_one: float | None = None


@dataclass
class SensitivityReport:
    """Rows in forward-registration order plus the all-float and all-quantized metrics.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        >>> rep = sensitivity(net, [torch.randn(4, 3, 12, 12)], qconfig="w4a4", progress=False)
        >>> rep.float_metric > rep.quantized_metric, len(rep.ranked()) == len(rep.rows) > 0
        (True, True)
    """

    metric: str
    float_metric: float
    quantized_metric: float
    rows: list[SiteSensitivity] = field(default_factory=list)

    def ranked(self, by: str = "quantize_one") -> list[SiteSensitivity]:
        """Most sensitive first: lowest metric with only this site quantized (``quantize_one``) or highest
        metric with only this site float (``float_one``)."""
        if by not in MODES:
            raise ValueError(f"ranked: by must be one of {MODES}, got {by!r}")
        rows = [r for r in self.rows if getattr(r, by) is not None]
        return sorted(rows, key=lambda r: getattr(r, by), reverse=(by == "float_one"))

    def table(self) -> str:
        """A Markdown table."""
        lines = [
            f"metric: {self.metric}; all float {self.float_metric:.3f}, all quantized {self.quantized_metric:.3f}",
            "",
            "| site | kind | bits | weights | only this quantized | only this float |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            q = "" if r.quantize_one is None else f"{r.quantize_one:.3f}"
            f = "" if r.float_one is None else f"{r.float_one:.3f}"
            lines.append(f"| {r.site} | {r.kind} | {r.bits} | {r.params} | {q} | {f} |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Bar chart of both views per site, written to ``path`` (PNG); needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.site for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4.0))
        xs = range(len(names))
        for off, mode, label in ((-0.2, "quantize_one", "only this site quantized"),
                                 (0.2, "float_one", "only this site float")):
            vals = [getattr(r, mode) for r in self.rows]
            if any(v is not None for v in vals):
                ax.bar([x + off for x in xs], [v if v is not None else 0.0 for v in vals], width=0.4, label=label)
        ax.axhline(self.quantized_metric, color="k", lw=0.8, ls="--", label="all quantized")
        if math.isfinite(self.float_metric):  # the default SQNR metric is infinite for the float model
            ax.axhline(self.float_metric, color="g", lw=0.8, ls=":", label="all float")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel(self.metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _set_sites(entries: list[tuple[str, nn.Module, list[FakeQuantize]]], on: set[str]) -> None:
    for name, _, fqs in entries:
        for fq in fqs:
            fq.fake_quant_enabled.fill_(int(name in on))


def _describe(m: nn.Module, fqs: list[FakeQuantize]) -> tuple[str, str, int]:
    if isinstance(m, QuantLayer):
        qc = m.qconfig
        bits = f"w{qc.weight.spec.bits}" + (f"a{qc.activation.spec.bits}" if qc.activation is not None else "")
        return m.kind, bits, int(m.weight.numel())
    if isinstance(m, QuantAdd):
        kind = "add"
    elif isinstance(getattr(m, "act", None), str):
        kind = str(m.act)  # an activation table: silu, sigmoid, gelu, ...
    else:
        kind = str(getattr(m, "op_name", "") or type(m).__name__.removeprefix("Quant").lower())
    bits = sorted({int(fq.spec.bits) for fq in fqs})
    return kind, "a" + "/".join(str(b) for b in bits), 0


def sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    eval_fn: Callable[[nn.Module], float] | None = None,
    *,
    modes: Sequence[str] = MODES,
    qconfig: Any = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> SensitivityReport:
    """Measure each site's effect on ``eval_fn`` (see the module docstring).

    Args:
        model: a calibrated prepared model, or a float model together with ``qconfig`` (it is then
            prepared — a copy — and calibrated on ``data``).
        data: batches for the default metric and for calibration (targets unused).
        eval_fn: ``model -> float``, higher is better; default: :func:`output_sqnr` against the float model.
        modes: ``"quantize_one"`` and/or ``"float_one"``.
        qconfig: preset name or QConfig when ``model`` is a float model.
        num_batches: batches of ``data`` to use (default all).
        progress: tqdm progress bar.

    Returns:
        a :class:`SensitivityReport` (``.table()``, ``.ranked()``, ``.plot(path)``).  The model's
        fake-quantization flags are restored.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        >>> rep = sensitivity(net, [torch.randn(4, 3, 12, 12)], qconfig="w4a4", progress=False)
        >>> rep.ranked()[0].quantize_one <= rep.ranked()[-1].quantize_one
        True
    """
    for mo in modes:
        if mo not in MODES:
            raise ValueError(f"sensitivity: modes must be among {MODES}, got {mo!r}")
    batches = list(itertools.islice(iter(data), num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("sensitivity: `data` yielded no batches")
    if not any(True for _ in quantizers(model)):
        if qconfig is None:
            raise ValueError("sensitivity: the model is not prepared; pass qconfig= (e.g. 'w4a4') or a prepared, "
                             "calibrated model")
        from qtoolkit.prepare import prepare

        model = calibrate(prepare(model, qconfig), batches, progress=False)
    elif qconfig is not None:
        raise ValueError("sensitivity: qconfig= is for float models; this model is already prepared")
    entries = sites(model)
    if not entries:
        raise ValueError("sensitivity: the model has no quantized layers or adds")
    saved = [(fq, int(fq.fake_quant_enabled)) for _, fq in quantizers(model)]
    was_training = model.training
    model.eval()
    names = {n for n, _, _ in entries}
    try:
        _set_sites(entries, set())
        if eval_fn is None:
            ref = _outputs(model, batches)
            eval_fn = output_sqnr(batches, ref)
            metric_name = "output SQNR vs float (dB)"
        else:
            metric_name = getattr(eval_fn, "__name__", "metric")
        float_metric = float(eval_fn(model))
        _set_sites(entries, names)
        quantized_metric = float(eval_fn(model))
        report = SensitivityReport(metric_name, float_metric, quantized_metric)
        from tqdm.auto import tqdm

        for name, m, fqs in tqdm(entries, desc="sensitivity", unit="site", leave=False, disable=not progress):
            kind, bits, params = _describe(m, fqs)
            row = SiteSensitivity(name, kind, bits, params)
            if "quantize_one" in modes:
                _set_sites(entries, {name})
                row.quantize_one = float(eval_fn(model))
            if "float_one" in modes:
                _set_sites(entries, names - {name})
                row.float_one = float(eval_fn(model))
            report.rows.append(row)
    finally:
        for fq, flag in saved:
            fq.fake_quant_enabled.fill_(flag)
        model.train(was_training)
    return report

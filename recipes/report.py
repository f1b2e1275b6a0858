"""Tables and plots of the quantization recipes' results.

:func:`build_report` merges the JSON files written by :mod:`recipes.evaluate` (FP32),
:mod:`recipes.ptq` and :mod:`recipes.qat` into

* ``results.json`` — one row per (method, bits) with top-1, drop vs FP32, model size,
  calibration / training time, plus the converted-model check and the accuracy bars;
* ``results.md`` — the same as Markdown tables;
* ``accuracy_vs_bits.png`` — top-1 vs weight/activation bits, one line per method;
* ``activation_histograms.png`` — calibration histograms of a few layers' input
  activations with each calibrator's chosen clip range as vertical lines.

Plots use matplotlib's Agg backend (no display needed).

Example:
    python -m recipes.report --fp32 runs/eval/eval_results.json --ptq runs/ptq/ptq_results.json \\
        --qat runs/qat/qat_results.json --out report   # --qat may be repeated
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "build_report", "fmt_bytes", "md_table", "plot_accuracy_vs_bits", "plot_activation_histograms",
           "plot_qat_curves"]

#: Accuracy bars of the main job (issue 3/5).
TARGETS = {
    "fp32_min_top1": 93.5,
    "w8a8_max_drop_pt": 0.2,
    "converted_within_pt": 0.05,
    "integer_agreement_pct": 99.9,
    "w4a4_qat_max_drop_pt": 0.1,  # conv1 / fc at W8A8, <= 1 epoch, from the QDrop model
    "w4a4_all_qat_max_drop_pt": 0.5,  # every layer at W4A4
    "qat_max_epochs": 1,
    # issue 12: PTQ without training (reconstruction), no labels used
    "w4a4_ptq_min_top1": 92.7,
    "w4a4_keep8_ptq_min_top1": 93.5,
    "w4a8_ptq_max_drop_pt": 0.2,
    "reconstruct_max_s": 300.0,
}

CALIBRATOR_COLORS = {"minmax": "tab:blue", "percentile": "tab:orange", "entropy": "tab:green", "mse": "tab:red",
                     "ema": "tab:purple"}
BITS_ORDER = ["W8A8", "W4A8", "W4A4"]


def _method_style(name: str) -> str:
    """Line style and marker per method, so rows sharing a calibrator's colour stay apart: plain PTQ solid
    circles, reconstruction dashed squares, its QAT start dotted triangles, mixed precision dash-dot diamonds,
    QAT stars."""
    if not name.startswith("PTQ"):
        return "-*"
    if "QAT" in name:
        return ":^"
    if "mixed" in name:
        return "-.D"
    if "+" in name:
        return "--s"
    return "-o"


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines. Example: ``md_table(["a"], [[1]])`` -> ``['| a |', '|---|', '| 1 |']``."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def fmt_bytes(n: int | float | None) -> str:
    """``276480`` -> ``'270.0 KiB'``."""
    if n is None:
        return "-"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def _bits_label(wb: int | None, ab: int | None) -> str:
    if wb is None:
        return "FP32"
    return f"W{wb}A{ab}" if ab is not None else f"W{wb}"


# ----------------------------------------------------------------------------- rows


def _qat_list(qat: dict[str, Any] | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """QAT results as a list (one ``qat_results.json`` dict, a list of them, or None)."""
    if not qat:
        return []
    return list(qat) if isinstance(qat, (list, tuple)) else [qat]


def _ptq_list(ptq: dict[str, Any] | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """PTQ results as a list (one ``ptq_results.json`` dict, a list of them, or None)."""
    if not ptq:
        return []
    return list(ptq) if isinstance(ptq, (list, tuple)) else [ptq]


def _ptq_method(r: dict[str, Any]) -> str:
    method = r.get("method") or "none"
    label = f"PTQ {r['calibrator']}" + ("" if method == "none" else f" + {method}")
    if r.get("mixed_precision"):
        label += " (mixed precision)"
    return label


def _rows(fp32: dict[str, Any], ptq: Any, qat_results: Any) -> list[dict[str, Any]]:
    base = fp32["top1"]
    rows: list[dict[str, Any]] = [{
        "method": "FP32", "bits": "FP32", "weight_bits": 32, "activation_bits": 32, "top1": base, "drop_pt": 0.0,
        "size_bytes": fp32.get("size_bytes"), "time_s": fp32.get("train_time_s"), "time_kind": "FP32 training",
        "notes": "shipped checkpoint" if fp32.get("shipped") else "",
    }]
    for run in _ptq_list(ptq):
        keep = run.get("keep_8bit") or []
        for r in run["results"]:
            bits = _bits_label(r["weight_bits"], r["activation_bits"])
            note = []
            if r.get("best_of_preset") and (r.get("method") or "none") == "none":
                note.append("best of preset")
            if keep and r["preset"] != "w8a8":
                note.append(f"{', '.join(keep)} at W8A8")
            if run["args"].get("per_tensor_weights"):
                note.append("per-tensor weights")
            if r.get("weight_calibrator", "minmax") != "minmax":
                note.append(f"{r['weight_calibrator']} weight ranges")
            mp = r.get("mixed_precision")
            if mp:
                note.append(f"{len(mp['high_layers'])} layers at {run['args'].get('mp_high', 'w8a8').upper()} "
                            f"({', '.join(mp['high_layers'][:6])}{' ...' if len(mp['high_layers']) > 6 else ''}), "
                            f"weights {mp['weight_bytes'] / mp['low_weight_bytes']:.2f}x all-{bits[:2]}")
            recon = r.get("reconstruct_s") or 0.0
            rows.append({
                "method": _ptq_method(r), "bits": bits if not mp else f"{bits} mixed", "weight_bits": r["weight_bits"],
                "activation_bits": r["activation_bits"], "top1": r["top1"], "drop_pt": base - r["top1"],
                "size_bytes": r["size_bytes"], "time_s": r["calibration_s"] + recon,
                "time_kind": "calibration + reconstruction" if recon else "calibration",
                "notes": "; ".join(note),
            })
        ic = run.get("integer_check")
        if ic and ic.get("executions"):
            for ex, e in ic["executions"].items():
                if "error" in e:
                    continue
                rows.append({
                    "method": f"int8 converted ({ex})", "bits": "W8A8", "weight_bits": 8, "activation_bits": 8,
                    "top1": e["top1"], "drop_pt": base - e["top1"], "size_bytes": ic["size_bytes"],
                    "time_s": ic["convert_s"], "time_kind": "conversion",
                    "notes": f"from PTQ {ic['calibrator']}; argmax agreement with fake quant {e['agreement_vs_fake_quant']:.2f}%",
                })
    for qat in _qat_list(qat_results):
        bits = _bits_label(qat["weight_bits"], qat["activation_bits"])
        keep = qat.get("keep_8bit") or []
        tag = " + LSQ" if qat["args"].get("lsq") else ""
        init = qat.get("init") or {}
        method = init.get("method") if init.get("method") not in (None, "none") else None
        start = f"PTQ {init.get('calibrator')}" + (f" + {method}" if method else "")
        if init.get("top1") is not None:
            from_file = init.get("source") not in (None, "calibrate", "reconstruct")
            rows.append({
                "method": f"{start} (QAT start)", "bits": bits, "weight_bits": qat["weight_bits"],
                "activation_bits": qat["activation_bits"], "top1": init["top1"], "drop_pt": base - init["top1"],
                "size_bytes": qat.get("size_bytes"),
                "time_s": None if from_file else (init.get("calibration_s") or 0.0) + (init.get("reconstruct_s") or 0.0),
                "time_kind": "calibration" + (" + reconstruction" if method else ""),
                "notes": "; ".join(filter(None, [
                    "the saved model of the row above it, reloaded" if from_file else "",
                    f"BN {init['bn']}" if init.get("bn") else "", f"{', '.join(keep)} at W8A8" if keep else ""])),
            })
        rows.append({
            "method": f"QAT{tag} from {start}" if init.get("source") else f"QAT{tag}", "bits": bits,
            "weight_bits": qat["weight_bits"],
            "activation_bits": qat["activation_bits"], "top1": qat["top1"], "drop_pt": base - qat["top1"],
            "size_bytes": qat.get("size_bytes"), "time_s": qat["train_time_s"], "time_kind": "training",
            "notes": "; ".join(filter(None, [
                f"{qat['epochs_done']} epoch(s) on {100 * qat['args']['train_fraction']:.0f}% of the training set",
                f"{', '.join(keep)} at W8A8" if keep else ""])),
        })
    return rows


def _reconstruction_checks(runs: list[dict[str, Any]], fp32: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's bars over every PTQ run that used a reconstruction method or mixed precision."""
    t = TARGETS
    recs = []
    for run in runs:
        keep = tuple(run.get("keep_8bit") or [])
        for r in run["results"]:
            recs.append({**r, "keep": keep})
    out: list[dict[str, Any]] = []

    def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(rows, key=lambda r: r["top1"]) if rows else None

    recon = [r for r in recs if (r.get("method") or "none") != "none"]
    if not recon:
        return out
    w4a4 = best([r for r in recon if r["preset"] == "w4a4" and not r["keep"]])
    if w4a4:
        out.append({"bar": f"W4A4 all layers PTQ >= {t['w4a4_ptq_min_top1']}%",
                    "value": f"{w4a4['top1']:.2f}% ({_ptq_method(w4a4)})", "pass": w4a4["top1"] >= t["w4a4_ptq_min_top1"]})
    keep8 = best([r for r in recon if r["preset"] == "w4a4" and r["keep"]])
    if keep8:
        out.append({"bar": f"W4A4 PTQ, {', '.join(keep8['keep'])} at W8A8 >= {t['w4a4_keep8_ptq_min_top1']}%",
                    "value": f"{keep8['top1']:.2f}% ({_ptq_method(keep8)})",
                    "pass": keep8["top1"] >= t["w4a4_keep8_ptq_min_top1"]})
    w4a8 = best([r for r in recs if r["preset"] == "w4a8" and not r["keep"]])
    if w4a8:
        drop = fp32["top1"] - w4a8["top1"]
        out.append({"bar": f"W4A8 PTQ drop <= {t['w4a8_ptq_max_drop_pt']} pt", "value": f"{drop:+.2f} pt ({_ptq_method(w4a8)})",
                    "pass": drop <= t["w4a8_ptq_max_drop_pt"] + 1e-9})
    w2 = [r for r in recs if r["weight_bits"] == 2]
    if w2:
        b = best(w2)
        assert b is not None
        out.append({"bar": "W2A4 PTQ reported", "value": f"{b['top1']:.2f}% ({_ptq_method(b)}"
                    + (f"; {', '.join(b['keep'])} at W8A8)" if b["keep"] else ")"), "pass": True})
    for r in recs:
        mp = r.get("mixed_precision")
        if not mp:
            continue
        uniform = best([u for u in recs if u["preset"] == r["base_preset"] and not u.get("mixed_precision")
                        and u["keep"] == r["keep"] and u.get("method") == r.get("method")
                        and u["calibrator"] == r["calibrator"]])
        if uniform is None:
            continue
        out.append({"bar": f"mixed precision at {mp['size_budget_factor']:.2f}x the all-{r['base_preset'].upper()} weight "
                           f"bytes beats uniform {r['base_preset'].upper()}",
                    "value": f"{r['top1']:.2f}% vs {uniform['top1']:.2f}% ({_ptq_method(uniform)}; weights "
                             f"{mp['weight_bytes'] / mp['low_weight_bytes']:.2f}x)",
                    "pass": r["top1"] > uniform["top1"]})
    slowest = max(recon, key=lambda r: r.get("reconstruct_s") or 0.0)
    out.append({"bar": f"reconstruction <= {t['reconstruct_max_s'] / 60:.0f} min per model",
                "value": f"slowest {slowest['reconstruct_s']:.0f} s ({slowest['preset']}, {slowest['method']})",
                "pass": slowest["reconstruct_s"] <= t["reconstruct_max_s"]})
    return out


def _checks(rows: list[dict[str, Any]], ptq: Any, qat: dict[str, Any] | None,
            fp32: dict[str, Any]) -> list[dict[str, Any]]:
    t = TARGETS
    checks = [{"bar": f"FP32 top-1 >= {t['fp32_min_top1']}%", "value": f"{fp32['top1']:.2f}%",
               "pass": fp32["top1"] >= t["fp32_min_top1"]}]
    runs = _ptq_list(ptq)
    ptq = runs[0] if runs else None
    if ptq:
        w8 = [r for r in ptq["results"] if r["preset"] == "w8a8"]
        if w8:
            b = max(w8, key=lambda r: r["top1"])
            drop = fp32["top1"] - b["top1"]
            checks.append({"bar": f"W8A8 PTQ best calibrator drop <= {t['w8a8_max_drop_pt']} pt",
                           "value": f"{drop:+.2f} pt ({b['calibrator']})", "pass": drop <= t["w8a8_max_drop_pt"] + 1e-9})
        ic = ptq.get("integer_check")
        if ic:
            if ic.get("error"):
                checks.append({"bar": "best W8A8 model converts to int8", "value": ic["error"][:120], "pass": False})
            for ex, e in ic["executions"].items():
                if "error" in e:
                    continue
                checks.append({"bar": f"converted int8 ({ex}) within {t['converted_within_pt']} pt of fake quant",
                               "value": f"{e['delta_vs_fake_quant_pt']:+.2f} pt",
                               "pass": abs(e["delta_vs_fake_quant_pt"]) <= t["converted_within_pt"] + 1e-9})
                if ex in ("integer", "fast"):
                    what = "integer-only" if ex == "integer" else "fast int8 kernels'"
                    checks.append({"bar": f"{what} argmax agreement with fake quant >= {t['integer_agreement_pct']}%",
                                   "value": f"{e['agreement_vs_fake_quant']:.2f}%",
                                   "pass": e["agreement_vs_fake_quant"] >= t["integer_agreement_pct"]})
        w4 = [r for r in ptq["results"] if r["preset"] == "w4a8"]
        if w4:
            checks.append({"bar": "W4A8 PTQ: every calibrator reported", "value": ", ".join(
                f"{r['calibrator']} {r['top1']:.2f}%" for r in w4), "pass": True})
    for q in _qat_list(qat):
        drop = fp32["top1"] - q["top1"]
        label = _bits_label(q["weight_bits"], q["activation_bits"])
        value = (f"{drop:+.2f} pt after {q['epochs_done']} epoch(s) on "
                 f"{100 * q['args']['train_fraction']:.0f}% of the training set")
        if label == "W4A4":
            keep = q.get("keep_8bit") or []
            bar = t["w4a4_qat_max_drop_pt"] if keep else t["w4a4_all_qat_max_drop_pt"]
            what = f"W4A4 ({', '.join(keep)} at W8A8)" if keep else "W4A4 (all layers)"
            checks.append({"bar": f"{what} QAT drop <= {bar} pt after <= {t['qat_max_epochs']} epoch",
                           "value": value, "pass": drop <= bar + 1e-9 and q["epochs_done"] <= t["qat_max_epochs"]})
            init = q.get("init") or {}
            if init.get("top1") is not None:
                start = f"PTQ {init.get('calibrator')}" + (f" + {init['method']}" if init.get("method") not in (None, "none") else "")
                checks.append({"bar": f"{what} QAT >= the model it starts from ({start})",
                               "value": f"{q['top1']:.2f}% vs {init['top1']:.2f}%", "pass": q["top1"] >= init["top1"] - 1e-9})
        else:  # no bar for other bit widths: reported
            checks.append({"bar": f"{label} QAT reported", "value": f"top-1 {q['top1']:.2f}%, drop {value}", "pass": True})
    checks += _reconstruction_checks(runs, fp32)
    return checks


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_bits(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Top-1 vs bits (W8A8, W4A8, W4A4), one line per method, FP32 as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp32 = next((r["top1"] for r in rows if r["method"] == "FP32"), None)
    series: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["method"] == "FP32" or r["method"].startswith("int8") or r["bits"] not in BITS_ORDER:
            continue
        name = r["method"]
        series.setdefault(name, {})[r["bits"]] = r["top1"]
    xs = {b: i for i, b in enumerate(BITS_ORDER)}
    for name, pts in series.items():
        order = [b for b in BITS_ORDER if b in pts]
        cal = name.split()[1] if name.startswith("PTQ") else None
        color = CALIBRATOR_COLORS.get(cal or "", "black")
        style = _method_style(name)
        ax.plot([xs[b] for b in order], [pts[b] for b in order], style, color=color, label=name,
                markersize=10 if style == "-*" else 6)
    if fp32 is not None:
        ax.axhline(fp32, ls="--", color="gray", label=f"FP32 {fp32:.2f}%")
    ax.set_xticks(range(len(BITS_ORDER)), BITS_ORDER)
    ax.set_xlim(-0.3, len(BITS_ORDER) - 0.7)
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "Top-1 vs bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_qat_curves(qat: Any, rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """QAT training curves beside the PTQ results: per run, the training loss (every logged window of steps,
    left) and the test top-1 (start, within and after each epoch, right) over epochs, with the FP32 top-1
    and the best PTQ row of the same bit width as horizontal lines."""
    runs = [q for q in _qat_list(qat) if q.get("history")]
    if not runs:
        return None
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    fp32 = next((r["top1"] for r in rows if r["method"] == "FP32"), None)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for i, q in enumerate(runs):
        c = colors[i % len(colors)]
        label = _bits_label(q["weight_bits"], q["activation_bits"]) + (" + LSQ" if q["args"].get("lsq") else "")
        pts = [p for p in q.get("curve") or [] if "train_loss" in p and p.get("epoch") is not None]
        if pts:
            ax_l.plot([p["epoch"] for p in pts], [p["train_loss"] for p in pts], "-", color=c, lw=1, alpha=0.8,
                      label=f"{label} train loss (per {q['args'].get('log_interval', 10)} steps)")
        ax_l.plot([h["epoch"] for h in q["history"]], [h["train_loss"] for h in q["history"]], "o", color=c,
                  label=f"{label} epoch mean")
        acc = [(0.0, q["init"]["top1"])] if (q.get("init") or {}).get("top1") is not None else []
        acc += [(p["epoch"], 100 * p["eval_acc"]) for p in q.get("curve") or []
                if p.get("eval_acc") is not None and p.get("epoch") is not None]
        acc += [(float(h["epoch"]), 100 * h["eval_acc"]) for h in q["history"] if h.get("eval_acc") is not None]
        acc.sort()
        ax_a.plot([a for a, _ in acc], [b for _, b in acc], "-o", color=c, label=f"QAT {label} test top-1")
        bits = _bits_label(q["weight_bits"], q["activation_bits"])
        ptq = [r for r in rows if r["bits"] == bits and r["method"].startswith("PTQ") and "QAT start" not in r["method"]
               and (r["notes"] or "").count("W8A8") == (1 if q.get("keep_8bit") else 0)]
        if ptq:
            best = max(ptq, key=lambda r: r["top1"])
            ax_a.axhline(best["top1"], ls=":", color=c, label=f"best PTQ {bits}: {best['method']} {best['top1']:.2f}%")
    if fp32 is not None:
        ax_a.axhline(fp32, ls="--", color="gray", label=f"FP32 {fp32:.2f}%")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss (fake quant)")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("test top-1 (%)")
    ax_l.legend(fontsize=7)
    ax_a.legend(fontsize=7, loc="lower right")
    ax_l.grid(alpha=0.3)
    ax_a.grid(alpha=0.3)
    fig.suptitle("QAT curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_activation_histograms(hist: dict[str, Any], path: str | Path, preset: str = "w8a8") -> Path | None:
    """Calibration histograms (log counts) of a few layers' input activations with each
    calibrator's clip range (``preset``'s configurations) as vertical lines."""
    layers = hist.get("histograms", {}).get(preset) or next(iter(hist.get("histograms", {}).values()), {})
    if not layers:
        return None
    plt = _plt()
    names = list(layers)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    clips = {k.split("/", 1)[1]: v for k, v in hist.get("clip_ranges", {}).items() if k.split("/", 1)[0] == preset}
    for ax, name in zip(axes[0], names):
        h = layers[name]
        edges, counts = h["edges"], h["counts"]
        group = max(1, -(-len(counts) // 256))  # at most 256 bars
        if group > 1:
            counts = [sum(counts[i:i + group]) for i in range(0, len(counts), group)]
            edges = edges[::group][: len(counts)] + [h["edges"][-1]]
        ax.stairs(counts, edges, fill=True, alpha=0.5, color="tab:gray", label="calibration histogram")
        ax.set_yscale("log")
        for cal, ranges in clips.items():
            if name not in ranges:
                continue
            lo, hi = ranges[name]
            color = CALIBRATOR_COLORS.get(cal, "black")
            ax.axvline(hi, color=color, lw=1.5, label=f"{cal}: [{lo:.2f}, {hi:.2f}]")
            if lo < -1e-6:
                ax.axvline(lo, color=color, lw=1.5)
        ax.set_title(f"{name} input (max {h['max']:.2f})", fontsize=10)
        ax.set_xlabel("activation value")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.suptitle(f"Activation clip ranges per calibrator ({preset.upper()})", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.84, wspace=0.25)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report


def _fmt_time(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def build_report(
    out: str | Path,
    fp32: dict[str, Any],
    ptq: dict[str, Any] | list[dict[str, Any]] | None = None,
    qat: dict[str, Any] | list[dict[str, Any]] | None = None,
    hist: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the PNG plots into ``out``.

    Args:
        fp32: ``{"top1", "size_bytes", "samples", "shipped", "train_time_s"?, "checkpoint"?}``.
        ptq: ``ptq_results.json`` contents, or a list of them (the calibrator sweep first, then the
            reconstruction / mixed-precision runs). qat: ``qat_results.json`` contents (or a
            list of them, one per QAT preset).
        hist: ``ptq_histograms.json`` contents. meta: anything else to record
            (commands, wall time, dataset, smoke flag).
    """
    from recipes.common import write_json, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    rows = _rows(fp32, ptq, qat)
    checks = _checks(rows, ptq, qat, fp32)
    plots = {"accuracy_vs_bits": str(plot_accuracy_vs_bits(rows, out / "accuracy_vs_bits.png", meta.get("title", "")))}
    qat_plot = plot_qat_curves(qat, rows, out / "qat_curves.png")
    if qat_plot is not None:
        plots["qat_curves"] = str(qat_plot)
    if hist:
        p = plot_activation_histograms(hist, out / "activation_histograms.png")
        if p is not None:
            plots["activation_histograms"] = str(p)
    for run in _ptq_list(ptq):  # per-site sensitivity plots of the PTQ runs (recipes.ptq --sensitivity)
        for r in run["results"]:
            sens = r.get("sensitivity")
            if sens and Path(sens["plot"]).is_file():
                dst = out / Path(sens["plot"]).name
                if Path(sens["plot"]).resolve() != dst.resolve():
                    shutil.copyfile(sens["plot"], dst)
                plots[f"sensitivity_{r['preset']}_{r['calibrator']}"] = str(dst)
    results = {"meta": meta, "fp32": fp32, "rows": rows, "checks": checks, "plots": plots,
               "ptq": ptq, "qat": qat}
    write_json(out / "results.json", results)

    lines = [f"# {meta.get('title', 'Quantization results')}", ""]
    if meta.get("smoke"):
        lines += ["**SMOKE RUN** (`--max-batches`): numbers are on a few batches only and mean nothing.", ""]
    labels = {"dataset": "dataset", "model": "model", "checkpoint": "FP32 checkpoint", "wall_time_s": "wall time",
              "threads": "torch threads", "host": "host", "started_utc": "started"}
    for key, label in labels.items():
        if key in meta:
            val = _fmt_time(meta[key]) + f" ({meta[key] / 60:.1f} min)" if key == "wall_time_s" else meta[key]
            lines.append(f"- {label}: {val}")
    if meta.get("steps_s"):
        lines.append("- time per step: " + ", ".join(f"{k} {_fmt_time(v)}" for k, v in meta["steps_s"].items()))
    lines += ["", "## Results (test set top-1)", ""]
    lines += md_table(
        ["method", "bits", "top-1 (%)", "drop vs FP32 (pt)", "model size", "time", "notes"],
        [[r["method"], r["bits"], f"{r['top1']:.2f}", f"{r['drop_pt']:+.2f}", fmt_bytes(r["size_bytes"]),
          f"{_fmt_time(r['time_s'])} {r['time_kind']}" if r["time_s"] is not None else "-", r["notes"]] for r in rows],
    )
    lines += ["", "Model size = bytes of `torch.save(state_dict)` of the converted model (int8 weights, int4 packed "
              "two per byte, float scales); FP32 = the float checkpoint.", "", "## Accuracy bars", ""]
    lines += md_table(["bar", "measured", "status"],
                      [[c["bar"], c["value"], "PASS" if c["pass"] else "**MISSED**"] for c in checks])
    for q in _qat_list(qat):
        if not q.get("history"):
            continue
        lines += ["", f"## QAT per epoch ({_bits_label(q['weight_bits'], q['activation_bits'])})", ""]
        lines += md_table(["epoch", "lr (start)", "train loss", "train top-1 (%)", "test top-1 (%)", "time",
                           "observers frozen", "BN frozen"],
                          [[h["epoch"], f"{h['lr']:.5f}", f"{h['train_loss']:.4f}",
                            f"{100 * h['train_acc']:.2f}" if h.get("train_acc") is not None else "-",
                            f"{100 * h['eval_acc']:.2f}" if h.get("eval_acc") is not None else "-",
                            _fmt_time(h["seconds"]), h["observers_frozen"], h["bn_frozen"]] for h in q["history"]])
    lines += ["", "## Plots", ""]
    for name, p in plots.items():
        lines.append(f"![{name}]({Path(p).name})")
    if meta.get("commands"):
        lines += ["", "## Commands", ""] + [f"- `{c}`" for c in meta["commands"]]
    lines.append("")
    write_text(out / "results.md", "\n".join(lines))
    return results


def _load(path: str | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Rebuild the report from saved JSON files."""
    p = argparse.ArgumentParser(prog="python -m recipes.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fp32", required=True, help="eval_results.json of recipes.evaluate (its 'fp32' entry is used)")
    p.add_argument("--ptq", default=None, nargs="*", help="ptq_results.json (the sweep first; then reconstruction runs)")
    p.add_argument("--hist", default=None, help="ptq_histograms.json (default: next to --ptq)")
    p.add_argument("--qat", action="append", default=None, help="qat_results.json (repeat for several presets)")
    p.add_argument("--out", default="report", help="output folder")
    args = p.parse_args(argv)
    ev = _load(args.fp32)
    assert ev is not None
    fp32 = ev.get("fp32", ev)
    hist_path = args.hist or (str(Path(args.ptq[0]).with_name("ptq_histograms.json")) if args.ptq else None)
    hist = _load(hist_path) if hist_path and Path(hist_path).is_file() else None
    ptq = [_load(p) for p in args.ptq or []]
    return build_report(args.out, fp32, ptq or None, [_load(q) for q in args.qat or []], hist)


if __name__ == "__main__":
    main()

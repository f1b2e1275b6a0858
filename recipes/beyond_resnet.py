"""Accuracy beyond ResNet: PTQ of the shipped MobileNetV2 / EfficientNet-style / ViT checkpoints.

Per model (``--models``), on Fashion-MNIST, calibration on ``--calib-batches`` x ``--calib-batch-size``
TRAINING images, top-1 on the first ``--test-samples`` test images (default all 10k):

* FP32 top-1;
* W8A8 PTQ per activation calibrator (``--calibrators``); the best one is converted and run with the
  ``fast`` (oneDNN) and ``integer`` executions: argmax agreement with its fake-quant model;
* W4A8 and W4A4 (first and last layer W8A8, found from a forward pass) PTQ with the MSE calibrator, then
  + QDrop reconstruction (``--recon-time`` seconds each).  W4A4 runs twice on models with elementwise
  sites: ``plain`` (every activation quantizer at 4 bits) and ``grids`` (activation tables and elementwise
  products on 8-bit grids, :func:`qtoolkit.ptq.activation_grids.elementwise_overrides`; every conv /
  linear / matmul input still 4-bit);
* mixed precision: :func:`qtoolkit.mixed_precision` raises layers of the W4A4 (``grids``) model to W8A8
  within ``--size-budget`` x its weight bytes, then QDrop;
* :func:`qtoolkit.sensitivity` ("only this site quantized", output SQNR) of the plain W4A4 PTQ model:
  table (top sites) in the JSON, plot as PNG.

Writes ``beyond_resnet.json`` / ``beyond_resnet.md`` and ``sensitivity_<model>.png`` into ``--out``.

Example:
    python -m recipes.beyond_resnet --out runs/beyond_resnet --threads 2
    python -m recipes.beyond_resnet --models efficientnet_small --test-samples 2000 --recon-time 30
    python -m recipes.beyond_resnet --models mobilenet_v2 --max-batches 1 --recon-time 2   # smoke
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

import qtoolkit as qt
from qtoolkit.ptq.activation_grids import elementwise_overrides, first_last_overrides
from recipes.common import (
    agreement,
    command_line,
    env_info,
    load_fp32,
    make_qconfig,
    parse_list,
    predict,
    seed_everything,
    setup_threads,
    state_dict_bytes,
    top1,
    write_json,
    write_text,
)
from recipes.data import InMemoryImageDataset, TensorBatchLoader, get_calibration_loader, get_dataset

__all__ = ["build_parser", "main", "BARS"]

MODELS = ("mobilenet_v2", "efficientnet_small", "vit_small")
#: the bars (points of top-1 below FP32, or agreement in %)
BARS = {"w8a8_drop": 0.2, "agreement": 99.9, "w4a8_drop": 0.5, "w4a4_drop": 1.5, "w4a4_drop_vit": 2.0,
        "mixed_drop": 0.5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.beyond_resnet", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated recipe models")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder with <model>_<dataset>.pt (default: the shipped, sha256-checked checkpoints)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calibrators", default="minmax,percentile,entropy,mse", help="W8A8 activation calibrators")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--test-samples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    p.add_argument("--recon-time", type=float, default=60.0, help="QDrop wall-clock budget per model variant (s)")
    p.add_argument("--recon-iters", type=int, default=300, help="QDrop iterations per unit (upper bound)")
    p.add_argument("--size-budget", type=float, default=1.1, help="mixed precision: x the all-W4 weight bytes")
    p.add_argument("--sens-batches", type=int, default=2, help="calibration batches for the sensitivity metric")
    p.add_argument("--skip", default="", help="steps to skip: w8a8,convert,w4a8,w4a4,plain,mixed,sensitivity")
    p.add_argument("--max-batches", type=int, default=None, help="smoke: batches per evaluation / calibration")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/beyond_resnet")
    p.add_argument("--no-progress", action="store_true")
    return p


def _test_loader(args: argparse.Namespace) -> TensorBatchLoader:
    ds = get_dataset(args.dataset, "test", args.data_dir, augment=False)
    if args.test_samples is not None and args.test_samples < len(ds):
        n = args.test_samples
        ds = InMemoryImageDataset(ds.images[:n], ds.labels[:n], tuple(ds.mean.flatten().tolist()),
                                  tuple(ds.std.flatten().tolist()), False, 0,
                                  source=f"{ds.source} (first {n} test images)")
    return TensorBatchLoader(ds, args.batch_size, shuffle=False)


class _Ctx:
    """What every step of one model needs."""

    def __init__(self, args: argparse.Namespace, name: str, fp32: torch.nn.Module, calib: Any, test: Any) -> None:
        self.args, self.name, self.fp32, self.calib, self.test = args, name, fp32, calib, test
        self.progress = not args.no_progress
        self.fp32_top1 = math.nan

    def evaluate(self, model: torch.nn.Module, desc: str) -> tuple[float, torch.Tensor, float]:
        preds, labels, secs = predict(model, self.test, max_batches=self.args.max_batches, desc=desc,
                                      progress=self.progress)
        self.labels = labels
        return top1(preds, labels), preds, secs

    def ptq(self, qc: qt.QConfig, overrides: dict[str, Any], label: str, recon: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        qm = qt.calibrate(qt.prepare(self.fp32, qc, overrides=overrides), self.calib, progress=False)
        calib_s = time.perf_counter() - t0
        acc, _, _ = self.evaluate(qm, label)
        rec: dict[str, Any] = {"ptq_top1": acc, "ptq_drop": self.fp32_top1 - acc, "calibration_s": calib_s,
                               "overrides": sorted(overrides)}
        print(f"[beyond] {self.name} {label}: PTQ {acc:.2f} ({acc - self.fp32_top1:+.2f} pt)", flush=True)
        if recon:
            t0 = time.perf_counter()
            qt.reconstruct(qm, self.calib, "qdrop", iters=self.args.recon_iters, time_budget_s=self.args.recon_time,
                           seed=self.args.seed, progress=False)
            rec["reconstruct_s"] = time.perf_counter() - t0
            acc, _, _ = self.evaluate(qm, label + "+qdrop")
            rec.update(qdrop_top1=acc, qdrop_drop=self.fp32_top1 - acc)
            print(f"[beyond] {self.name} {label}: + QDrop {acc:.2f} ({acc - self.fp32_top1:+.2f} pt, "
                  f"{rec['reconstruct_s']:.0f} s)", flush=True)
        rec["weight_bytes"] = qt.weight_bytes(qm)
        rec["_model"] = qm
        return rec


def _convert_check(ctx: _Ctx, qm: torch.nn.Module, fq_preds: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    int8 = qt.convert(qm)
    out["convert_s"] = time.perf_counter() - t0
    out["size_bytes"] = state_dict_bytes(int8)
    for ex in ("fast", "integer"):
        try:
            qt.set_execution(int8, ex)
            acc, preds, secs = ctx.evaluate(int8, f"int8 {ex}")
        except Exception as e:  # noqa: BLE001 - report the execution, keep the job going
            out[ex] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[beyond] {ctx.name} int8 {ex}: {type(e).__name__}: {e}", flush=True)
            continue
        agree = agreement(preds, fq_preds)
        out[ex] = {"top1": acc, "agreement": agree, "eval_s": secs, "disagreeing": int((preds != fq_preds).sum())}
        print(f"[beyond] {ctx.name} int8 {ex}: top-1 {acc:.2f}, agreement with fake quant {agree:.2f}% "
              f"({secs:.0f} s)", flush=True)
    return out


def run_model(args: argparse.Namespace, name: str, calib: Any, test: Any, out: Path) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring)."""
    skip = set(parse_list(args.skip))
    ckpt = None if args.checkpoint_dir is None else str(Path(args.checkpoint_dir) / f"{name}_{args.dataset}.pt")
    fp32, desc = load_fp32(name, args.dataset, ckpt)
    ctx = _Ctx(args, name, fp32, calib, test)
    ctx.fp32_top1, _, fp32_s = ctx.evaluate(fp32, "FP32")
    res: dict[str, Any] = {"checkpoint": desc, "fp32_top1": ctx.fp32_top1, "test_samples": int(ctx.labels.numel())}
    print(f"[beyond] {name}: FP32 {ctx.fp32_top1:.2f} on {res['test_samples']} test images", flush=True)
    example = next(iter(calib))

    if "w8a8" not in skip:
        best = None
        res["w8a8"] = {}
        for cal in parse_list(args.calibrators):
            qc = make_qconfig("w8a8", cal)
            qm = qt.calibrate(qt.prepare(fp32, qc), calib, progress=False)
            acc, preds, _ = ctx.evaluate(qm, f"w8a8/{cal}")
            res["w8a8"][cal] = {"top1": acc, "drop": ctx.fp32_top1 - acc}
            print(f"[beyond] {name} W8A8 {cal}: {acc:.2f} ({acc - ctx.fp32_top1:+.2f} pt)", flush=True)
            if best is None or acc > best[0]:
                best = (acc, cal, qm, preds)
        if best is not None and "convert" not in skip:
            res["convert"] = {"calibrator": best[1], "fake_quant_top1": best[0], **_convert_check(ctx, best[2], best[3])}

    qc4 = make_qconfig("w4a4", "mse")
    fl = first_last_overrides(fp32, qc4, example, high=make_qconfig("w8a8", "mse"))
    grids = elementwise_overrides(fp32, qc4, overrides=fl)
    res["first_last"] = sorted(fl)
    res["elementwise_8bit_sites"] = len(grids)
    if "w4a8" not in skip:
        rec = ctx.ptq(make_qconfig("w4a8", "mse"), {}, "W4A8", recon=True)
        rec.pop("_model")
        res["w4a8"] = rec
    w4a4_plain = None
    if "w4a4" not in skip:
        variants = [("grids", {**fl, **grids})]
        if grids and "plain" not in skip:
            variants.insert(0, ("plain", fl))
        res["w4a4"] = {}
        for label, ov in variants:
            rec = ctx.ptq(qc4, ov, f"W4A4 ({label})", recon=True)
            qm = rec.pop("_model")
            if label == "plain":
                w4a4_plain = ov
            res["w4a4"][label] = rec
            del qm
    if "mixed" not in skip:
        base = {**fl, **grids}
        budget = args.size_budget * qt.weight_bytes(fp32, qc4, base)
        t0 = time.perf_counter()
        mp = qt.mixed_precision(fp32, calib, low=qc4, high=make_qconfig("w8a8", "mse"), size_budget=budget,
                                overrides=base, progress=False)
        rec = ctx.ptq(qc4, mp.overrides, "mixed", recon=True)
        rec.pop("_model")
        rec.update(search_s=time.perf_counter() - t0, high_layers=mp.high_layers, budget_bytes=budget,
                   all_w4_bytes=mp.low_weight_bytes, size_factor=mp.weight_bytes / mp.low_weight_bytes)
        res["mixed"] = rec
    if "sensitivity" not in skip:
        t0 = time.perf_counter()
        ov = w4a4_plain if w4a4_plain is not None else {**fl, **grids}
        qm = qt.calibrate(qt.prepare(fp32, qc4, overrides=ov), calib, progress=False)
        rep = qt.sensitivity(qm, calib, modes=("quantize_one",), num_batches=args.sens_batches, progress=False)
        png = rep.plot(str(out / f"sensitivity_{name}.png"))
        ranked = rep.ranked("quantize_one")
        by_kind: dict[str, list[float]] = {}
        for r in rep.rows:
            by_kind.setdefault(r.kind, []).append(r.quantize_one)  # type: ignore[arg-type]
        res["sensitivity"] = {
            "model": "W4A4 " + ("plain" if w4a4_plain is not None else "grids") + " PTQ (MSE)",
            "metric": rep.metric, "quantized_metric": rep.quantized_metric, "plot": png, "sites": len(rep.rows),
            "worst": [{"site": r.site, "kind": r.kind, "bits": r.bits, "sqnr_db": r.quantize_one} for r in ranked[:12]],
            "median_by_kind": {k: sorted(v)[len(v) // 2] for k, v in by_kind.items()},
            "seconds": time.perf_counter() - t0,
        }
    res["bars"] = _bars(name, res)
    return res


def _bars(name: str, res: dict[str, Any]) -> dict[str, Any]:
    bars: dict[str, Any] = {}
    if "w8a8" in res:
        worst = max(v["drop"] for v in res["w8a8"].values())
        best = min(v["drop"] for v in res["w8a8"].values())
        bars["w8a8_best_drop<=0.2"] = best <= BARS["w8a8_drop"]
        bars["w8a8_every_calibrator_drop<=0.2"] = worst <= BARS["w8a8_drop"]
    if "convert" in res:
        for ex in ("fast", "integer"):
            a = res["convert"].get(ex, {}).get("agreement")
            bars[f"{ex}_agreement>=99.9"] = a is not None and a >= BARS["agreement"]
    if "w4a8" in res:
        bars["w4a8_qdrop_drop<=0.5"] = res["w4a8"]["qdrop_drop"] <= BARS["w4a8_drop"]
    if "w4a4" in res and "grids" in res["w4a4"]:
        lim = BARS["w4a4_drop_vit"] if name.startswith("vit") else BARS["w4a4_drop"]
        bars[f"w4a4_qdrop_drop<={lim}"] = res["w4a4"]["grids"]["qdrop_drop"] <= lim
    if "mixed" in res:
        bars["mixed_1.1x_drop<=0.5"] = res["mixed"]["qdrop_drop"] <= BARS["mixed_drop"]
    return bars


def _fmt(x: Any, nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def _markdown(res: dict[str, Any]) -> str:
    e = res["env"]
    lines = [
        "# Beyond ResNet: PTQ of MobileNetV2, an EfficientNet-style net and a ViT (Fashion-MNIST)", "",
        f"- command: `{res['command']}`", f"- CPU: {res['cpu']}; threads {e['threads']}; load average at start "
        f"{res['loadavg']}; torch {e['torch']}; {e['time_utc']}; wall time {res['wall_time_s']:.0f} s", "",
        "| model | FP32 | W8A8 per calibrator (drop) | converted fast / integer agreement | W4A8 PTQ → +QDrop |"
        " W4A4 plain PTQ → +QDrop | W4A4 8-bit tables PTQ → +QDrop | mixed 1.1× → +QDrop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        w8 = ", ".join(f"{c} {v['top1']:.2f} ({-v['drop']:+.2f})" for c, v in r.get("w8a8", {}).items())
        cv = r.get("convert", {})
        agree = " / ".join(_fmt(cv.get(ex, {}).get("agreement")) + "%" for ex in ("fast", "integer")) if cv else ""

        def pair(rec: dict[str, Any] | None) -> str:
            if not rec:
                return ""
            return f"{rec['ptq_top1']:.2f} → {rec['qdrop_top1']:.2f} ({-rec['qdrop_drop']:+.2f})"

        w4 = r.get("w4a4", {})
        mixed = r.get("mixed")
        mx = pair(mixed) + (f", {mixed['size_factor']:.2f}× W4 bytes" if mixed else "")
        lines.append(f"| {name} | {r['fp32_top1']:.2f} | {w8} | {agree} | {pair(r.get('w4a8'))} | "
                     f"{pair(w4.get('plain')) or 'same as 8-bit tables (no elementwise sites)'} | "
                     f"{pair(w4.get('grids'))} | {mx} |")
    lines += ["", "## Bars", ""]
    for name, r in res["models"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {'holds' if v else '**fails**'}" for k, v in r["bars"].items()))
    lines += ["", "## Most sensitive sites of the plain W4A4 PTQ model (output SQNR, only this site quantized)", ""]
    for name, r in res["models"].items():
        s = r.get("sensitivity")
        if not s:
            continue
        lines.append(f"### {name} ({s['sites']} sites, all quantized {s['quantized_metric']:.2f} dB; "
                     f"plot `{Path(s['plot']).name}`)")
        lines += ["", "| site | kind | bits | SQNR (dB) |", "|---|---|---|---|"]
        lines += [f"| {w['site']} | {w['kind']} | {w['bits']} | {w['sqnr_db']:.2f} |" for w in s["worst"]]
        lines += ["", "median by kind: " + ", ".join(f"{k} {v:.1f} dB" for k, v in s["median_by_kind"].items()), ""]
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keys = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(keys)})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the results (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    setup_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    loadavg = tuple(round(x, 2) for x in os.getloadavg())
    n_calib = args.calib_batches if args.max_batches is None else min(args.calib_batches, args.max_batches)
    calib = get_calibration_loader(args.dataset, args.calib_batch_size, n_calib, args.data_dir, args.seed)
    test = _test_loader(args)
    models: dict[str, Any] = {}
    for name in parse_list(args.models):
        t0 = time.perf_counter()
        models[name] = run_model(args, name, calib, test, out)
        models[name]["seconds"] = time.perf_counter() - t0
    res = {"command": command_line("recipes.beyond_resnet", argv), "args": vars(args), "cpu": _cpu(),
           "loadavg": loadavg, "calibration_samples": len(calib.dataset), "models": models, "bars_def": BARS,
           "wall_time_s": time.perf_counter() - t_start, "env": env_info()}
    write_json(out / "beyond_resnet.json", res)
    write_text(out / "beyond_resnet.md", _markdown(res))
    print(f"[beyond] wrote {out / 'beyond_resnet.json'} and .md ({res['wall_time_s']:.0f} s)", flush=True)
    return res


if __name__ == "__main__":
    main()

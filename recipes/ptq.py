"""Post-training quantization sweep: presets x activation calibrators on an FP32 checkpoint.

For every ``--presets`` x ``--calibrators`` pair: ``prepare`` (BN folded), ``calibrate``
on ``--calib-batches`` batches of the TRAINING split (:func:`recipes.data.get_calibration_loader`,
never the test split), then the fake-quant top-1 on the test set, the calibration
time and the model size (bytes of the *converted* model's serialized ``state_dict``;
4-bit weights are packed two per byte). The best configuration of each preset is saved
as a prepared ``state_dict`` (``ptq_best_<preset>.pt``, reload with
:func:`recipes.common.load_prepared` / ``recipes.evaluate --quantized``).

``--integer-check`` converts the best W8A8 model and measures the converted model with
``set_execution(m, "reference")`` and ``"integer"`` (integer-only arithmetic), and the
argmax agreement of each with the fake-quant model over the test set (target >= 99.9 %).

Writes ``ptq_results.json`` / ``ptq_results.md`` and ``ptq_histograms.json`` (the
calibration histograms of ``--hist-layers``' input quantizers, for
:mod:`recipes.report`'s plots) into ``--out``.

``--method qdrop`` (or ``adaround``, ``brecq``, ``bias_correction``, ``cle``, joined with ``+``) runs
:func:`qtoolkit.reconstruct` after each calibration (calibration data only, no labels);
``--mixed-precision --size-budget 1.1`` adds, per preset, a model whose layers :func:`qtoolkit.mixed_precision`
raised to ``--mp-high`` within 1.1x the preset's weight bytes.  Presets may also be ``w<W>a<A>`` (e.g. ``w2a4``).

Example:
    python -m recipes.ptq --presets w4a4 --calibrators mse --method qdrop --mixed-precision --size-budget 1.1
    python -m recipes.ptq --presets w8a8,w4a8 --calibrators minmax,percentile,entropy,mse \\
        --integer-check --out runs/ptq --threads 2
    python -m recipes.ptq --checkpoint /tmp/quick_ckpt/resnet20_fashion-mnist.pt --max-batches 2  # smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import qtoolkit as qt
from recipes.common import (
    PERCENTILE_DEFAULT,
    add_common_args,
    agreement,
    command_line,
    env_info,
    load_fp32,
    make_overrides,
    make_qconfig,
    parse_list,
    predict,
    preset_qconfig,
    save_prepared,
    seed_everything,
    setup_threads,
    state_dict_bytes,
    top1,
    write_json,
    write_text,
)
from recipes.data import TensorBatchLoader, get_calibration_loader, get_dataset

__all__ = ["build_parser", "main", "clip_ranges", "test_loader"]

INTEGER_AGREEMENT_TARGET = 99.9  # percent
CONVERTED_TOL_PT = 0.05  # converted int8 top-1 within this of its fake-quant twin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.ptq",
        description="PTQ sweep (presets x calibrators) of an FP32 checkpoint; fake-quant top-1, "
        "calibration time, model size; optional integer-only check of the best W8A8 model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(p, "runs/ptq")
    p.add_argument("--presets", default="w8a8,w4a8", help="comma-separated qtoolkit presets")
    p.add_argument("--calibrators", default="minmax,percentile,entropy,mse",
                   help="comma-separated activation calibrators")
    p.add_argument("--percentile", type=float, default=PERCENTILE_DEFAULT, help="percentile calibrator's percentile")
    p.add_argument("--per-tensor-weights", action="store_true", help="per-tensor weights (default: per-channel)")
    p.add_argument("--calib-batches", type=int, default=32, help="calibration batches (training split)")
    p.add_argument("--calib-batch-size", type=int, default=64, help="calibration batch size")
    p.add_argument("--keep-8bit", default="",
                   help="comma-separated layer names/globs kept at W8A8 in every preset, e.g. conv1,fc")
    p.add_argument("--integer-check", action="store_true",
                   help="convert the best W8A8 model; top-1 of reference/integer execution and argmax agreement")
    p.add_argument("--fast", action="store_true", help="(kept for compatibility: the 'fast' int8 kernels are always checked)")
    p.add_argument("--hist-layers", default="layer1.0.conv1,layer3.0.conv1,fc",
                   help="layers whose input-activation histograms are saved for the report")
    p.add_argument("--fp32-top1", type=float, default=None,
                   help="reuse this FP32 top-1 instead of evaluating the FP32 model again")
    p.add_argument("--weight-calibrator", default="minmax", help="weight calibrator (minmax, percentile, mse)")
    p.add_argument("--method", default="none",
                   help="after calibration: none, or qtoolkit.reconstruct methods joined with '+' "
                        f"({', '.join(qt.ptq.METHODS)}), e.g. qdrop or cle+bias_correction+adaround")
    p.add_argument("--recon-iters", type=int, default=300, help="reconstruction steps per layer / block")
    p.add_argument("--recon-time-budget", type=float, default=None,
                   help="seconds for each model's reconstruction (fewer steps per unit if needed)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="also a mixed-precision row per preset: layers raised to --mp-high by qtoolkit.mixed_precision "
                        "within --size-budget (label-free output-SQNR sensitivity on the calibration data)")
    p.add_argument("--size-budget", type=float, default=1.1,
                   help="mixed precision weight-storage budget, as a multiple of the preset's all-layer weight bytes")
    p.add_argument("--mp-high", default="w8a8", help="the higher-precision config mixed precision may choose")
    p.add_argument("--sensitivity", action="store_true",
                   help="per-site sensitivity of each calibrated (not mixed) model before any reconstruction: "
                        "qtoolkit.sensitivity on --sensitivity-batches calibration batches, table + "
                        "sensitivity_<preset>_<calibrator>.png")
    p.add_argument("--sensitivity-batches", type=int, default=4,
                   help="calibration batches (x --calib-batch-size images) of the sensitivity metric")
    return p


def test_loader(dataset: str, batch_size: int, data_dir: str | None, download: bool) -> TensorBatchLoader:
    """The full test split, in order, no augmentation."""
    ds = get_dataset(dataset, "test", data_dir, augment=False, download=download)
    return TensorBatchLoader(ds, batch_size, shuffle=False)


def clip_ranges(model: torch.nn.Module) -> dict[str, list[float]]:
    """``{layer: [lo, hi]}``: the representable range of every calibrated per-tensor
    activation quantizer (inputs of conv/linear, both inputs of adds)."""
    out: dict[str, list[float]] = {}
    for name, fq in qt.quantizers(model):
        if fq.role != "activation" or fq.spec.axis is not None or not fq.is_calibrated:
            continue
        s, z = float(fq.scale.detach()), float(fq.zero_point)
        site = name.rsplit(".", 1)[0] if name.endswith(".input_quantizer") else name
        out[site] = [(fq.qmin - z) * s, (fq.qmax - z) * s]
    return out


def _histograms(model: torch.nn.Module, layers: list[str]) -> dict[str, Any]:
    """Calibration histograms (trimmed to the occupied bins) of ``layers``' input quantizers."""
    mods = dict(model.named_modules())
    out: dict[str, Any] = {}
    for layer in layers:
        fq = getattr(mods.get(layer), "input_quantizer", None)
        obs = getattr(fq, "observer", None)
        if obs is None or not hasattr(obs, "histogram") or not obs.has_data:
            continue
        counts, edges = obs.histogram()
        nz = torch.nonzero(counts).flatten()
        if len(nz) == 0:
            continue
        a, b = int(nz[0]), int(nz[-1]) + 1
        out[layer] = {
            "counts": [int(c) for c in counts[a:b]],
            "edges": [float(e) for e in edges[a:b + 1]],
            "min": float(obs.min_val),
            "max": float(obs.max_val),
        }
    return out


def _markdown(res: dict[str, Any]) -> str:
    from recipes.report import fmt_bytes, md_table

    fp = res["fp32"]
    lines = [
        f"# PTQ sweep: {res['args']['model']} on {res['args']['dataset']}",
        "",
        f"- command: `{res['command']}`",
        f"- FP32 checkpoint: `{res['checkpoint']['path']}` (sha256 `{res['checkpoint']['sha256'][:16]}...`)",
        f"- FP32 top-1: **{fp['top1']:.2f}%**, size {fmt_bytes(fp['size_bytes'])}",
        f"- calibration: {res['calibration']['samples']} training-split samples "
        f"({res['calibration']['batches']} x {res['calibration']['batch_size']}); "
        f"weights {'per-tensor' if res['args']['per_tensor_weights'] else 'per-channel'}; "
        f"kept at W8A8: {', '.join(res['keep_8bit']) or 'none'}",
        f"- test samples: {fp['samples']}{' (SMOKE RUN: --max-batches)' if res['smoke'] else ''}",
        f"- wall time: {res['wall_time_s']:.0f} s, threads {res['env']['threads']}",
        "",
        "| preset | calibrator | method | fake-quant top-1 (%) | drop vs FP32 (pt) | calibration (s) | "
        "reconstruction (s) | eval (s) | converted size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        best = " **(best)**" if r["best_of_preset"] else ""
        lines.append(
            f"| {r['preset']} | {r['calibrator']}{best} | {r.get('method', 'none')} | {r['top1']:.2f} | "
            f"{r['drop_pt']:+.2f} | {r['calibration_s']:.1f} | {r.get('reconstruct_s', 0.0):.0f} | {r['eval_s']:.1f} | "
            f"{fmt_bytes(r['size_bytes'])} |"
        )
    for r in res["results"]:
        if r.get("sensitivity"):
            lines += ["", f"### Sensitivity ({r['preset']}, {r['calibrator']}, before reconstruction)", "",
                      r["sensitivity"]["table"], "", f"![sensitivity]({Path(r['sensitivity']['plot']).name})"]
        if r.get("mixed_precision"):
            lines += ["", f"### Mixed precision ({r['preset']}, {r['calibrator']})", "", r["mixed_precision"]["table"]]
    ic = res.get("integer_check")
    if ic:
        lines += [
            "",
            f"## Converted int8 model (best W8A8: {ic['calibrator']})",
            "",
            f"Fake-quant top-1 {ic['fake_quant_top1']:.2f}%. Targets: converted top-1 within "
            f"{CONVERTED_TOL_PT} pt of fake-quant; integer-only argmax agreement >= {INTEGER_AGREEMENT_TARGET}%.",
            "",
        ]
        if ic.get("error"):
            lines += [f"**Conversion failed**: {ic['error']}", ""]
        rows = []
        for ex, e in ic["executions"].items():
            if "error" in e:
                rows.append([ex, "n/a", "-", "-", "-", e["error"][:80]])
            else:
                rows.append([ex, f"{e['top1']:.2f}", f"{e['delta_vs_fake_quant_pt']:+.2f}",
                             f"{e['agreement_vs_fake_quant']:.2f}", f"{e['eval_s']:.1f}", "ok" if e["pass"] else "MISSED"])
        lines += md_table(["execution", "top-1 (%)", "vs fake-quant (pt)", "argmax agreement (%)", "eval (s)", "target"], rows)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results dict (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    setup_threads(args.threads)
    seed_everything(args.seed)
    presets = parse_list(args.presets)
    calibrators = parse_list(args.calibrators)
    keep8 = parse_list(args.keep_8bit)
    hist_layers = parse_list(args.hist_layers)
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not presets or not calibrators:
        raise SystemExit("ptq: --presets and --calibrators must not be empty")
    for pr in presets:
        preset_qconfig(pr)  # fail early on a typo

    t_start = time.perf_counter()
    fp32, ckpt = load_fp32(args.model, args.dataset, args.checkpoint)
    test = test_loader(args.dataset, args.batch_size, args.data_dir, args.download)
    n_calib = args.calib_batches if args.max_batches is None else min(args.calib_batches, args.max_batches)
    calib = get_calibration_loader(args.dataset, args.calib_batch_size, n_calib, args.data_dir, args.seed, args.download)
    print(f"[ptq] {args.model}/{args.dataset}: checkpoint {ckpt['path']}; calibration on "
          f"{len(calib.dataset)} training samples; test {len(test.dataset)} samples; threads {torch.get_num_threads()}",
          flush=True)

    if args.fp32_top1 is None:
        fp32_preds, labels, fp32_s = predict(fp32, test, max_batches=args.max_batches, desc="FP32", progress=progress)
        fp32_top1: float = top1(fp32_preds, labels)
        print(f"[ptq] FP32 top-1 {fp32_top1:.2f}% ({fp32_s:.1f} s)", flush=True)
    else:
        fp32_top1, fp32_s = args.fp32_top1, None
        print(f"[ptq] FP32 top-1 {fp32_top1:.2f}% (given with --fp32-top1)", flush=True)

    results: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    histograms: dict[str, Any] = {}
    sizes: dict[str, int | None] = {}
    from tqdm import tqdm

    method = "none" if args.method in ("", "none") else args.method
    if method != "none":
        from qtoolkit.ptq.api import parse_methods

        parse_methods(method)  # fail early on a typo
    sweep = [(pr, cal, False) for pr in presets for cal in calibrators]
    if args.mixed_precision:
        sweep += [(pr, cal, True) for pr in presets for cal in calibrators]
    bar = tqdm(sweep, desc="PTQ sweep", disable=not progress, file=sys.stderr)
    for preset, cal, mixed in bar:
        label = f"{preset}+mixed" if mixed else preset
        bar.set_postfix_str(f"{label}/{cal}")
        kw = {"percentile": args.percentile, "per_tensor_weights": args.per_tensor_weights,
              "weight_calibrator": args.weight_calibrator}
        qc = make_qconfig(preset, cal, **kw)
        overrides: dict[str, Any] = dict(make_overrides(keep8, cal, **kw))
        mp = None
        t0 = time.perf_counter()
        if mixed:
            budget = args.size_budget * qt.weight_bytes(fp32, qc, overrides)
            mp = qt.mixed_precision(fp32, calib, low=qc, high=make_qconfig(args.mp_high, cal, **kw),
                                    size_budget=budget, overrides=overrides, progress=False)
            overrides = mp.overrides
        mp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        qm = qt.prepare(fp32, qc, overrides=overrides)
        qt.calibrate(qm, calib, progress=False)
        calib_s = time.perf_counter() - t0
        sens = None
        if args.sensitivity and not mixed:
            t0 = time.perf_counter()
            rep = qt.sensitivity(qm, calib, num_batches=args.sensitivity_batches, progress=False)
            png = rep.plot(str(out / f"sensitivity_{label}_{cal}.png"))
            sens = {"table": rep.table(), "plot": png, "seconds": time.perf_counter() - t0,
                    "rows": [vars(r) for r in rep.rows], "metric": rep.metric,
                    "float_metric": rep.float_metric if math.isfinite(rep.float_metric) else None,
                    "quantized_metric": rep.quantized_metric}
        recon: list[dict[str, Any]] = []
        recon_s = 0.0
        if method != "none":
            t0 = time.perf_counter()
            qt.reconstruct(qm, calib, method, iters=args.recon_iters, time_budget_s=args.recon_time_budget,
                           seed=args.seed, progress=progress, report=recon)
            recon_s = time.perf_counter() - t0
        preds, labels, eval_s = predict(qm, test, max_batches=args.max_batches, desc=f"{label}/{cal}", progress=progress)
        acc = top1(preds, labels)
        if label not in sizes:  # the converted layout depends on the bits only, not on the calibrator
            try:
                sizes[label] = state_dict_bytes(qt.convert(qm))
            except Exception as e:  # noqa: BLE001 - report the model, not crash the sweep
                print(f"[ptq] convert failed for {label}/{cal}, size not measured: {type(e).__name__}: {e}", flush=True)
                sizes[label] = None
        size = sizes[label]
        rec = {
            "preset": label,
            "base_preset": preset,
            "method": method,
            "weight_calibrator": args.weight_calibrator,
            "reconstruct_s": recon_s,
            "reconstruct_units": [{k: v for k, v in r.items() if k != "layers"} for r in recon],
            "mixed_precision": None if mp is None else {
                "high_layers": mp.high_layers, "weight_bytes": mp.weight_bytes, "low_weight_bytes": mp.low_weight_bytes,
                "size_budget_factor": args.size_budget, "metric": mp.metric, "low_metric": mp.low_metric,
                "search_s": mp_s, "table": mp.table()},
            "sensitivity": sens,
            "calibrator": cal,
            "weight_bits": qc.weight.spec.bits,
            "activation_bits": qc.activation.spec.bits if qc.activation is not None else None,
            "top1": acc,
            "drop_pt": fp32_top1 - acc,
            "calibration_s": calib_s,
            "eval_s": eval_s,
            "size_bytes": size,
            "clip_ranges": clip_ranges(qm),
            "best_of_preset": False,
        }
        results.append(rec)
        tqdm.write(f"[ptq] {label:6s} {cal:10s} {'' if method == 'none' else method + ' '}top-1 {acc:6.2f}% "
                   f"(drop {fp32_top1 - acc:+.2f} pt), calibration {calib_s:.1f} s"
                   + (f", reconstruction {recon_s:.0f} s" if method != "none" else "")
                   + (f", mixed precision: {len(mp.high_layers)} layers at {args.mp_high}" if mp is not None else "")
                   + f", eval {eval_s:.1f} s, size "
                   + (f"{size / 1024:.0f} KiB" if size is not None else "n/a"), file=sys.stdout)
        sys.stdout.flush()
        if not mixed and not histograms.get(preset) and any(fq.uses_histogram for _, fq in qt.quantizers(qm) if fq.role == "activation"):
            histograms[preset] = _histograms(qm, hist_layers)
        if label not in best or acc > best[label]["rec"]["top1"]:
            best[label] = {"rec": rec, "model": qm, "preds": preds, "overrides": overrides}
    bar.close()

    saved: dict[str, str] = {}
    for preset, b in best.items():
        b["rec"]["best_of_preset"] = True
        mp = b["rec"]["mixed_precision"]
        meta = {
            "model": args.model, "dataset": args.dataset, "preset": b["rec"]["base_preset"],
            "calibrator": b["rec"]["calibrator"], "weight_calibrator": args.weight_calibrator,
            "percentile": args.percentile, "per_tensor_weights": args.per_tensor_weights, "lsq": False,
            "keep_8bit": keep8, "qat": False, "top1": b["rec"]["top1"], "method": b["rec"]["method"],
            "high_layers": mp["high_layers"] if mp else [], "mp_high": args.mp_high,
        }
        path = save_prepared(out / f"ptq_best_{preset.replace('+', '_')}.pt", b["model"], meta)
        saved[preset] = str(path)

    integer_check = None
    if args.integer_check:
        if "w8a8" not in best:
            raise SystemExit("ptq: --integer-check needs 'w8a8' in --presets")
        integer_check = run_integer_check(best["w8a8"], test, labels, args.max_batches, args.fast, progress)

    res: dict[str, Any] = {
        "args": vars(args),
        "command": command_line("recipes.ptq", argv),
        "checkpoint": ckpt,
        "smoke": args.max_batches is not None,
        "fp32": {"top1": fp32_top1, "size_bytes": state_dict_bytes(fp32), "eval_s": fp32_s, "samples": len(labels)},
        "calibration": {"batches": len(calib), "batch_size": args.calib_batch_size, "samples": len(calib.dataset),
                        "split": "train"},
        "keep_8bit": keep8,
        "results": results,
        "best": {pr: {"calibrator": b["rec"]["calibrator"], "top1": b["rec"]["top1"], "path": saved[pr]}
                 for pr, b in best.items()},
        "integer_check": integer_check,
        "wall_time_s": time.perf_counter() - t_start,
        "env": env_info(),
    }
    write_json(out / "ptq_results.json", res)
    write_json(out / "ptq_histograms.json", {"layers": hist_layers, "histograms": histograms,
                                             "clip_ranges": {f"{r['preset']}/{r['calibrator']}": r["clip_ranges"]
                                                             for r in results}})
    write_text(out / "ptq_results.md", _markdown(res))
    print(f"[ptq] wrote {out / 'ptq_results.json'} and .md ({res['wall_time_s']:.0f} s)", flush=True)
    return res


def run_integer_check(
    best: dict[str, Any], test: Any, labels: torch.Tensor, max_batches: int | None, fast: bool, progress: bool
) -> dict[str, Any]:
    """Convert the best W8A8 model; reference / integer (/ fast) top-1 and agreement with fake quant."""
    fq_preds, fq_top1 = best["preds"], best["rec"]["top1"]
    t0 = time.perf_counter()
    try:
        int8 = qt.convert(best["model"])
    except Exception as e:  # noqa: BLE001
        print(f"[ptq] int8 check: convert failed: {type(e).__name__}: {e}", flush=True)
        return {"preset": "w8a8", "calibrator": best["rec"]["calibrator"], "fake_quant_top1": fq_top1,
                "error": f"convert failed: {type(e).__name__}: {e}", "executions": {}, "size_bytes": None,
                "convert_s": None}
    convert_s = time.perf_counter() - t0
    executions: dict[str, Any] = {}
    for ex in ["fast", "reference", "integer"]:  # "fast" (real int8 kernels) is convert()'s default
        try:
            qt.set_execution(int8, ex)
            preds, lab, secs = predict(int8, test, max_batches=max_batches, desc=f"int8 {ex}", progress=progress)
        except Exception as e:  # noqa: BLE001 - e.g. fast kernels not available on this machine
            executions[ex] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[ptq] int8 {ex}: not available ({type(e).__name__}: {e})", flush=True)
            continue
        acc = top1(preds, lab)
        agree = agreement(preds, fq_preds)
        ok = abs(acc - fq_top1) <= CONVERTED_TOL_PT + 1e-9 and (ex == "reference" or agree >= INTEGER_AGREEMENT_TARGET)
        executions[ex] = {"top1": acc, "delta_vs_fake_quant_pt": acc - fq_top1, "agreement_vs_fake_quant": agree,
                          "eval_s": secs, "pass": bool(ok)}
        print(f"[ptq] int8 {ex:9s} top-1 {acc:.2f}% ({acc - fq_top1:+.2f} pt vs fake quant), "
              f"argmax agreement {agree:.2f}%, {secs:.1f} s", flush=True)
    return {
        "preset": "w8a8",
        "calibrator": best["rec"]["calibrator"],
        "fake_quant_top1": fq_top1,
        "convert_s": convert_s,
        "size_bytes": state_dict_bytes(int8),
        "executions": executions,
        "targets": {"converted_within_pt": CONVERTED_TOL_PT, "integer_agreement_pct": INTEGER_AGREEMENT_TARGET},
    }


if __name__ == "__main__":
    main()

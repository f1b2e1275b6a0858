"""Evaluate FP32, fake-quant and converted int8 models on the test set.

* FP32: the checkpoint (default: the shipped, sha256-verified one);
* fake quant: ``--quantized PATH``, a prepared ``state_dict`` saved by
  :mod:`recipes.ptq` (``ptq_best_<preset>.pt``) or :mod:`recipes.qat`
  (``qat_<preset>.pt``); the file records its preset / calibrator / ``--keep-8bit``
  layers / QAT flag, so the prepared model is rebuilt exactly;
* converted: ``qtoolkit.convert`` of that model, run with each of ``--executions``
  (``reference``, ``integer`` = integer-only arithmetic, ``fast`` = optimized int8
  kernels where available; an unavailable one is reported, not fatal), with the
  argmax agreement against the fake-quant model.

Writes ``eval_results.json`` / ``eval_results.md`` into ``--out``.

Example:
    python -m recipes.evaluate                                   # FP32 only, shipped checkpoint
    python -m recipes.evaluate --quantized runs/ptq/ptq_best_w8a8.pt --executions reference,integer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import qtoolkit as qt
from recipes.common import (
    add_common_args,
    agreement,
    command_line,
    env_info,
    load_fp32,
    load_prepared,
    parse_list,
    predict,
    seed_everything,
    setup_threads,
    state_dict_bytes,
    top1,
    write_json,
    write_text,
)
from recipes.ptq import test_loader

__all__ = ["build_parser", "main", "fp32_train_time"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.evaluate",
        description="Test-set top-1 of the FP32 model, a saved fake-quant (prepared) model and its converted int8 form.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(p, "runs/eval")
    p.add_argument("--quantized", default=None,
                   help="prepared state_dict written by recipes.ptq / recipes.qat (ptq_best_w8a8.pt, qat_w4a4.pt)")
    p.add_argument("--executions", default="reference,integer,fast",
                   help="converted-model executions to run (reference, integer, fast); empty: skip conversion")
    p.add_argument("--skip-fp32", action="store_true", help="do not evaluate the FP32 model")
    return p


def fp32_train_time(checkpoint_path: str, model: str, dataset: str) -> float | None:
    """Wall time of the FP32 training run, from ``train_<model>_<dataset>.json`` next to the checkpoint."""
    report = Path(checkpoint_path).with_name(f"train_{model}_{dataset}.json")
    try:
        return float(json.loads(report.read_text())["wall_time_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _markdown(res: dict[str, Any]) -> str:
    from recipes.report import fmt_bytes, md_table

    lines = [f"# Evaluation: {res['args']['model']} on {res['args']['dataset']}", "",
             f"- command: `{res['command']}`", f"- FP32 checkpoint: `{res['checkpoint']['path']}`",
             f"- test samples: {res['samples']}{' (SMOKE RUN: --max-batches)' if res['smoke'] else ''}", ""]
    rows = []
    if res.get("fp32"):
        f = res["fp32"]
        rows.append(["FP32", f"{f['top1']:.2f}", "-", fmt_bytes(f["size_bytes"]), f"{f['eval_s']:.1f}"])
    fq = res.get("fake_quant")
    if fq:
        rows.append([f"fake quant ({fq['meta']['preset']}, {fq['meta']['calibrator'] or 'default'}"
                     f"{', QAT' if fq['meta'].get('qat') else ''})", f"{fq['top1']:.2f}", "-", "-", f"{fq['eval_s']:.1f}"])
    for ex, e in (res.get("converted") or {}).items():
        if "error" in e:
            rows.append([f"converted ({ex})", "n/a: " + e["error"][:60], "-", "-", "-"])
        else:
            rows.append([f"converted ({ex})", f"{e['top1']:.2f}", f"{e['agreement_vs_fake_quant']:.2f}",
                         fmt_bytes(e["size_bytes"]), f"{e['eval_s']:.1f}"])
    lines += md_table(["model", "top-1 (%)", "argmax agreement with fake quant (%)", "size", "eval (s)"], rows)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate; returns the results dict (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    setup_threads(args.threads)
    seed_everything(args.seed)
    progress = not args.no_progress
    out = Path(args.out)
    t_start = time.perf_counter()
    fp32, ckpt = load_fp32(args.model, args.dataset, args.checkpoint)
    test = test_loader(args.dataset, args.batch_size, args.data_dir, args.download)
    res: dict[str, Any] = {"args": vars(args), "command": command_line("recipes.evaluate", argv), "checkpoint": ckpt,
                           "smoke": args.max_batches is not None}
    labels = None
    if not args.skip_fp32:
        preds, labels, secs = predict(fp32, test, max_batches=args.max_batches, desc="FP32", progress=progress)
        res["fp32"] = {"top1": top1(preds, labels), "size_bytes": state_dict_bytes(fp32), "eval_s": secs,
                       "samples": len(labels), "shipped": ckpt["shipped"], "checkpoint": ckpt["path"],
                       "train_time_s": fp32_train_time(ckpt["path"], args.model, args.dataset)}
        print(f"[evaluate] FP32 top-1 {res['fp32']['top1']:.2f}% ({secs:.1f} s)", flush=True)
    if args.quantized:
        qm, meta = load_prepared(args.quantized, fp32)
        fq_preds, labels, secs = predict(qm, test, max_batches=args.max_batches, desc="fake quant", progress=progress)
        res["fake_quant"] = {"path": args.quantized, "meta": meta, "top1": top1(fq_preds, labels), "eval_s": secs}
        print(f"[evaluate] fake-quant ({meta['preset']}) top-1 {res['fake_quant']['top1']:.2f}% ({secs:.1f} s)", flush=True)
        executions = parse_list(args.executions)
        if executions:
            int8 = qt.convert(qm)
            size = state_dict_bytes(int8)
            res["converted"] = {}
            for ex in executions:
                try:
                    qt.set_execution(int8, ex)
                    preds, labels, secs = predict(int8, test, max_batches=args.max_batches, desc=f"int8 {ex}",
                                                  progress=progress)
                except Exception as e:  # noqa: BLE001 - an execution path may be unavailable here
                    res["converted"][ex] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"[evaluate] converted ({ex}): not available ({type(e).__name__}: {e})", flush=True)
                    continue
                res["converted"][ex] = {"top1": top1(preds, labels), "agreement_vs_fake_quant": agreement(preds, fq_preds),
                                        "size_bytes": size, "eval_s": secs}
                print(f"[evaluate] converted ({ex}) top-1 {res['converted'][ex]['top1']:.2f}%, agreement "
                      f"{res['converted'][ex]['agreement_vs_fake_quant']:.2f}% ({secs:.1f} s)", flush=True)
    res["samples"] = 0 if labels is None else len(labels)
    res["wall_time_s"] = time.perf_counter() - t_start
    res["env"] = env_info()
    write_json(out / "eval_results.json", res)
    write_text(out / "eval_results.md", _markdown(res))
    return res


if __name__ == "__main__":
    main()

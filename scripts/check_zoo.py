"""Every torchvision classifier through prepare -> calibrate -> convert: is the converted model faithful?

Usage::

    .venv/bin/python scripts/check_zoo.py                       # the default list, w8a8, all executions
    .venv/bin/python scripts/check_zoo.py --models resnet18,mobilenet_v2 --preset w8a8-x86
    .venv/bin/python scripts/check_zoo.py --executions fast --json zoo.json

For each model: random weights (``torchvision.models.get_model(name, num_classes=10)``, no download), BatchNorm
statistics set from data (a few forward passes in train mode on random images), ``qt.prepare(model, preset)``,
``qt.calibrate`` on ``--calib-batches`` random batches, ``qt.convert``; then on ``--eval-batches`` fresh batches
the converted model in each execution (``fast`` — the default oneDNN kernels —, ``reference``, ``integer``) is
compared with its own fake-quant model: top-1 agreement and SQNR (dB, ``10·log10(Σ ref² / Σ (out − ref)²)``),
and the fake-quant model against FP32 (SQNR).  ``--drift-floor`` adds the float32 fake-quant model and the fast path
each against the fake-quant model run in float64: on a deep random network a one-code rounding tie flips and
grows, so float32 summation order alone moves the fake-quant model; the fast path and the integer-only
execution (exact integer sums, fixed-point requantization) are compared with the same yardstick (SQNR, and top-1
agreement in the JSON).  ``--speed`` adds the FP32 / converted forward-time ratio on one batch.  The
``int8 sites / float ops`` column counts converted modules and what ``prepare`` left float (``qt.float_ops``); the
int8 share counts conv / matmul FLOPs (``torch.utils.flop_counter``) inside converted modules.  The ``strategies`` column counts the fast path's per-layer kernel
choice (:func:`qtoolkit.kernels.dispatch.fast_status`), e.g. ``split`` where an 8-bit-activation layer runs the
exact two-part kernel on a CPU without VNNI.  The CPU (``lscpu`` model and the ISA flags that matter) and
oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, if set) are printed first.

Random data and random weights make agreement a strict test: logits are close to each other, so any
per-layer deviation shows up as a flipped argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtoolkit as qt  # noqa: E402
from qtoolkit.kernels import dispatch  # noqa: E402
from qtoolkit.kernels.cpuinfo import cpu_report  # noqa: E402
from qtoolkit.numerics import fake_quantize  # noqa: E402

# the smallest member of every torchvision classification family (``torchvision.models.list_models``)
DEFAULT_MODELS = (
    "alexnet,convnext_tiny,densenet121,efficientnet_b0,efficientnet_v2_s,googlenet,inception_v3,maxvit_t,"
    "mnasnet0_5,mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large,regnet_x_400mf,regnet_y_400mf,resnet18,"
    "resnet50,resnext50_32x4d,shufflenet_v2_x0_5,squeezenet1_0,swin_t,swin_v2_t,vgg11_bn,vit_b_32,wide_resnet50_2"
)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (out - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * float(torch.log10(ref.pow(2).sum() / noise))


def build(name: str, size: int, gen: torch.Generator) -> torch.nn.Module:
    import torchvision

    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    m = torchvision.models.get_model(name, weights=None, **kwargs)
    for mod in m.modules():  # e.g. ViT's zero-initialized head: every logit 0, nothing to compare
        if isinstance(mod, torch.nn.Linear) and not bool(mod.weight.detach().any()):
            torch.nn.init.normal_(mod.weight, std=0.02)
    m.train()
    with torch.no_grad():  # BN statistics from data (random weights, random images)
        for _ in range(3):
            m(torch.randn(8, 3, size, size, generator=gen))
    return m.eval()


def per_layer_steps(q: torch.nn.Module, batch: torch.Tensor) -> tuple[float, str]:
    """Largest ``|fast - reference|`` of any converted module on the *same* input, in its output steps.

    Each module's inputs are recorded in a reference-execution forward; the module then runs alone in
    ``fast`` and in ``reference`` on them.  Isolates per-layer exactness from the drift that one-step tie
    differences accumulate through a deep random network.
    """
    from qtoolkit.nn import Int8Add, Int8Layer

    mods = [m for m in q.modules() if isinstance(m, (Int8Layer, Int8Add)) and dispatch.supports_fast(m)]
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod, a)) for m in mods]
    qt.set_execution(q, "reference")
    q(batch)
    for h in hooks:
        h.remove()
    worst, where = 0.0, "-"
    for m in mods:
        if m not in seen or getattr(m, "mode", "static") != "static":
            continue
        ref = m(*seen[m])
        m.execution = "fast"
        out = m(*seen[m])
        m.execution = "reference"
        if type(out) is not torch.Tensor:  # int8 carrier: compare with the reference rounded to the same grid
            ref = fake_quantize(ref, out.q_scale, out.q_zero_point, out.q_min, out.q_max)
            out = out.dequantize()
        steps = ((out.float() - ref.float()).abs().max() / float(m.output_scale)).item()
        if steps > worst:
            worst, where = steps, m.name
    return round(worst, 3), where


def int8_flop_share(q: torch.nn.Module, x: torch.Tensor) -> tuple[float, int, int]:
    """Share of the converted model's conv / matmul FLOPs that run inside converted (integer-weight) modules,
    counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the reference execution; and the number of
    converted modules and of the float ops ``prepare`` reported."""
    from torch.utils.flop_counter import FlopCounterMode

    from qtoolkit.convert import CONVERTED

    converted = {n for n, m in q.named_modules() if isinstance(m, tuple(CONVERTED.values()))}
    qt.set_execution(q, "reference")
    q.requires_grad_(False)  # inference only; the counter's module tracker trips over a grad-requiring float param
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        q(x)
    total = fc.get_total_flops()
    inside = 0
    for key, ops in fc.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else ""
        if name in converted:
            inside += sum(ops.values())
    return round(100.0 * inside / total if total else 100.0, 2), len(converted), 0


def fast_speedup(model: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """FP32 forward time / converted ("fast" where the kernels apply) forward time on one batch: median of
    ``repeats`` interleaved runs after one warm-up each (``torch.set_num_threads`` as set by ``--threads``)."""
    qt.set_execution(q, "fast")
    for m in q.modules():  # fast where possible, as convert() chose
        if hasattr(m, "execution") and not dispatch.supports_fast(m):
            m.execution = "reference"
    ta, tb = [], []
    with torch.no_grad():
        model(x), q(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            t1 = time.perf_counter()
            q(x)
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    return round(sorted(ta)[len(ta) // 2] / sorted(tb)[len(tb) // 2], 2)


def run(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build(name, args.size, gen)
    calib = [torch.randn(args.batch, 3, args.size, args.size, generator=gen) for _ in range(args.calib_batches)]
    evals = [torch.randn(args.batch, 3, args.size, args.size, generator=gen) for _ in range(args.eval_batches)]
    t0 = time.perf_counter()
    qm = qt.calibrate(qt.prepare(model, args.preset), calib, progress=False)
    q = qt.convert(qm)
    row: dict = {"model": name, "preset": args.preset, "prepare+calibrate+convert_s": round(time.perf_counter() - t0, 1)}
    status = dispatch.fast_status(q)
    strategies: dict[str, int] = {}
    for v in status.values():
        key = ("fast-split" if "split" in v else "fast") if v.startswith("fast") else v.split(" (")[0]
        strategies[key] = strategies.get(key, 0) + 1
    row["strategies"] = strategies
    row["int8_flops_%"], row["converted_sites"], _ = int8_flop_share(q, evals[0])
    row["float_ops"] = len(qt.float_ops(qm))
    row["float_op_kinds"] = sorted({op.op for op in qt.float_ops(qm)})
    if args.speed:
        row["fast_speedup_x"] = fast_speedup(model, q, evals[0])
    with torch.no_grad():
        fp32 = torch.cat([model(x) for x in evals])
        fq = torch.cat([qm(x) for x in evals])
        row["fakequant_vs_fp32_sqnr_db"] = round(sqnr(fp32, fq), 1)
        if "fast" in args.executions:
            row["fast_max_layer_steps"], row["worst_layer"] = per_layer_steps(q, evals[0])
        for ex in args.executions:
            if ex == "fast":
                qt.set_execution(q, "fast")
                for m in q.modules():  # fast where possible, as convert() chose
                    if hasattr(m, "execution") and not dispatch.supports_fast(m):
                        m.execution = "reference"
            else:
                try:
                    qt.set_execution(q, ex)
                except ValueError as e:  # e.g. integer-only needs static layers
                    row[f"{ex}_error"] = str(e)[:80]
                    continue
            out = torch.cat([q(x) for x in evals])
            row[f"{ex}_agree_%"] = round(100.0 * (out.argmax(1) == fq.argmax(1)).double().mean().item(), 2)
            row[f"{ex}_sqnr_db"] = round(sqnr(fq, out), 1)
        if args.drift_floor:
            # the fake-quant model in float64 (the convs' sums nearly exact): how far float32 rounding alone
            # takes the float32 fake-quant model, and the fast path, from it
            import copy

            q64 = copy.deepcopy(qm).double()
            fq64 = torch.cat([q64(x.double()) for x in evals])
            row["fakequant32_vs_64_sqnr_db"] = round(sqnr(fq64, fq), 1)
            if "fast" in args.executions:
                qt.set_execution(q, "fast")
                row["fast_vs_fakequant64_sqnr_db"] = round(sqnr(fq64, torch.cat([q(x) for x in evals])), 1)
            if "integer" in args.executions and "integer_error" not in row:
                qt.set_execution(q, "integer")  # exact integer sums, fixed-point requantization
                out = torch.cat([q(x) for x in evals])
                row["integer_vs_fakequant64_sqnr_db"] = round(sqnr(fq64, out), 1)
                row["integer_vs_fakequant64_agree_%"] = round(
                    100.0 * (out.argmax(1) == fq64.argmax(1)).double().mean().item(), 2)
                row["fakequant32_vs_64_agree_%"] = round(100.0 * (fq.argmax(1) == fq64.argmax(1)).double().mean().item(), 2)
    return row


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (the README's)."""

    def num(r: dict, k: str, fmt: str = "{:.1f}") -> str:
        v = r.get(k)
        return "—" if v is None else ("∞" if v == float("inf") else fmt.format(v))

    head = ("| model | int8 sites / float ops | int8 share of conv+matmul FLOPs % | speed vs FP32 | layers fast (exact split) | max per-layer diff, fast vs reference (steps) | fast vs fake-quant: "
            "top-1 agree % / SQNR dB | float32 fake-quant vs float64 fake-quant SQNR dB | fast vs float64 fake-quant SQNR dB "
            "| reference vs fake-quant SQNR dB |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:90]} | | | | | | | | |")
            continue
        st = r.get("strategies", {})
        fast = st.get("fast", 0) + st.get("fast-split", 0)
        lines.append(
            f"| {r['model']} | {r.get('converted_sites', '—')} / {r.get('float_ops', '—')} | {num(r, 'int8_flops_%')} "
            f"| {num(r, 'fast_speedup_x', '{:.2f}×')} "
            f"| {fast} ({st.get('fast-split', 0)}) | {num(r, 'fast_max_layer_steps', '{:.2f}')} "
            f"| {num(r, 'fast_agree_%', '{:.1f}')} / {num(r, 'fast_sqnr_db')} | {num(r, 'fakequant32_vs_64_sqnr_db')} "
            f"| {num(r, 'fast_vs_fakequant64_sqnr_db')} | {num(r, 'reference_sqnr_db')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--executions", default="fast,reference,integer")
    p.add_argument("--size", type=int, default=224, help="input height/width (default 224; ViT/MaxViT need 224)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--drift-floor", action="store_true", help="add the float32 fake quant, the fast path and the integer execution, each vs the fake-quant "
                        "model run in float64")
    p.add_argument("--speed", action="store_true", help="add FP32 / converted forward time on one batch (median of 5)")
    p.add_argument("--table-from", default=None, help="only print the Markdown table of a --json file")
    args = p.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(saved["cpu"] + "\n")
        print(markdown_table(saved["rows"]))
        return saved["rows"]
    args.executions = [e for e in args.executions.split(",") if e]
    torch.set_num_threads(args.threads)
    print(cpu_report(), flush=True)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            row = run(name, args)
        except Exception as e:  # noqa: BLE001 - one table row per model, failures included
            row = {"model": name, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_report(), "rows": rows}, indent=1))
    print("\n" + markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()

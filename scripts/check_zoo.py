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

``--source timm`` runs the same check on timm's models (``timm.create_model(name, pretrained=False,
num_classes=10)``, an optional dependency: ``pip install qtoolkit[timm]``), by default one model of every timm family
(:data:`DEFAULT_TIMM_MODELS`), each at its default input size unless ``--size`` is given, and adds the columns of
issue 23's bars: float ops other than normalization / softmax / data movement (``float_ops_other``), the fake-quant
SQNR of the torchvision counterpart from ``--counterpart-json`` (the torchvision table, same settings) and ``meets``
(each bar: converts, nothing else float, ≥ 95% int8 FLOPs, within 3 dB of the counterpart, fast vs float64 fake
quant within 1 dB of float32 fake quant).  ``--discover`` prints the smallest model of every family instead
(parameter counts on the meta device, no weights allocated).

Random data and random weights make agreement a strict test: logits are close to each other, so any
per-layer deviation shows up as a flipped argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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


# ``family:model``, one model of every timm family (``timm.list_modules()``, timm 1.0.31): the smallest by parameter
# count (``--discover``) among families whose smallest model has at most 30M parameters and a default input of at
# most 256 pixels (the time budget on 2 cores); where the smallest is a ``test_*`` configuration, the family's
# best-known small model instead (efficientnet_b0, resnet18, vit_tiny, convnext_atto, repvgg_a0, ...)
DEFAULT_TIMM_MODELS = (
    "byoanet:halonet_h1,byobnet:repvgg_a0,cait:cait_xxs24_224,coat:coat_tiny,convit:convit_tiny,"
    "convmixer:convmixer_768_32,convnext:convnext_atto,cpubone:cpubone_nano,crossvit:crossvit_tiny_240,"
    "cspnet:cs3darknet_focus_s,cspnext:cspnext_tiny,davit:davit_tiny,deit:deit_tiny_patch16_224,"
    "densenet:densenet121,dla:dla46x_c,dpn:dpn48b,edgenext:edgenext_xx_small,efficientformer:efficientformer_l1,"
    "efficientformer_v2:efficientformerv2_s0,efficientnet:efficientnet_b0,efficientvim:efficientvim_m1,"
    "efficientvit_mit:efficientvit_b0,efficientvit_msra:efficientvit_m0,eva:vit_tiny_patch16_dinov3_qkvb,"
    "fasternet:fasternet_t0,fastvit:fastvit_t8,focalnet:focalnet_tiny_srf,gcvit:gcvit_xxtiny,ghostnet:ghostnet_050,"
    "hardcorenas:hardcorenas_b,hgnet:hgnetv2_b0,hiera:hiera_tiny_224,hrnet:hrnet_w18_small,iformer:iformer_t,"
    "inception_next:inception_next_atto,lcnetv2:lcnetv2_small,levit:levit_128s,lowformer:lowformer_b0,"
    "mambaout:mambaout_femto,maxxvit:coatnet_nano_rw_224,metaformer:poolformerv2_s12,mlp_mixer:gmlp_ti16_224,"
    "mobilenetv3:mobilenetv3_small_050,mobilevit:mobilevit_xxs,mvitv2:mvitv2_tiny,nest:nest_tiny,"
    "nfnet:nf_regnet_b0,pit:pit_ti_224,pvt_v2:pvt_v2_b0,rdnet:rdnet_tiny,regnet:regnetx_002,"
    "repghost:repghostnet_050,repvit:repvit_m1,res2net:res2next50,resnest:resnest14d,resnet:resnet18,"
    "resnetv2:resnetv2_18,rexnet:rexnet_100,senet:legacy_seresnet18,sequencer:sequencer2d_s,shvit:shvit_s1,"
    "sknet:skresnet18,starnet:starnet_s050,swiftformer:swiftformer_xs,"
    "swin_transformer:swin_tiny_patch4_window7_224,swin_transformer_v2:swinv2_tiny_window8_256,"
    "swin_transformer_v2_cr:swinv2_cr_tiny_224,tiny_vit:tiny_vit_5m_224,tnt:tnt_s_legacy_patch16_224,"
    "twins:twins_svt_small,visformer:visformer_tiny,vision_transformer:vit_tiny_patch16_224,"
    "vision_transformer_hybrid:vit_tiny_r_s16_p8_224,vision_transformer_relpos:vit_relpos_small_patch16_224,"
    "vitamin:vitamin_small_224,volo:volo_d1_224,vovnet:ese_vovnet19b_slim_dw,xcit:xcit_nano_12_p8_224"
)

#: timm family (``timm.list_modules()`` name) -> the torchvision classifier of the same design
TORCHVISION_COUNTERPART = {
    "efficientnet": "efficientnet_b0", "mobilenetv3": "mobilenet_v3_small", "regnet": "regnet_x_400mf",
    "resnet": "resnet18", "convnext": "convnext_tiny", "vision_transformer": "vit_b_32", "deit": "vit_b_32",
    "swin_transformer": "swin_t", "swin_transformer_v2": "swin_v2_t", "maxxvit": "maxvit_t", "densenet": "densenet121",
    "vgg": "vgg11_bn", "inception_v3": "inception_v3", "ghostnet": None,
}

#: float ops the bars allow: normalization (kept float by default), softmax, data movement
_ALLOWED_FLOAT = ("norm", "softmax", "getitem", "pad", "roll", "contiguous", "clone", "to")


def allowed_float(op: str) -> bool:
    """True for a float op the issue's bar allows (normalization, softmax, data movement)."""
    low = op.lower()
    return any(k in low for k in _ALLOWED_FLOAT[:2]) or low in _ALLOWED_FLOAT[2:]


def timm_family(name: str) -> str:
    """The timm module (family) that defines ``name``."""
    import timm

    for mod in timm.list_modules():
        if name in timm.list_models(module=mod):
            return mod
    return "?"


def discover_timm(max_params: float = 30e6, max_size: int = 256, per_family_s: float = 60.0) -> list[tuple[str, str, int, int]]:
    """``(family, smallest model, parameters, default input size)`` for every timm family within the budget."""
    import warnings

    import timm

    out = []
    for mod in sorted(timm.list_modules()):
        best = None
        t0 = time.perf_counter()
        for n in timm.list_models(module=mod):
            if time.perf_counter() - t0 > per_family_s:
                break
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    m = timm.create_model(n, pretrained=False)
            except Exception:  # noqa: BLE001 - a model that does not build at its default configuration
                continue
            p = sum(x.numel() for x in m.parameters())
            size = int((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
            if best is None or p < best[2]:
                best = (mod, n, p, size)
        if best is not None and best[2] <= max_params and best[3] <= max_size:
            out.append(best)
    return out


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (out - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * float(torch.log10(ref.pow(2).sum() / noise))


def default_size(name: str, source: str) -> int:
    """The model's default input size (timm: its ``pretrained_cfg``; torchvision: 224)."""
    if source != "timm":
        return 224
    import timm

    with torch.device("meta"):
        m = timm.create_model(name.split(":")[-1], pretrained=False)
    return int((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])


def build(name: str, size: int, gen: torch.Generator, source: str = "torchvision") -> torch.nn.Module:
    if source == "timm":
        import timm

        m = timm.create_model(name.split(":")[-1], pretrained=False, num_classes=10)
    else:
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
    def record(mod: torch.nn.Module, a: tuple) -> None:  # returns None: a module called twice keeps its inputs
        seen.setdefault(mod, a)

    hooks = [m.register_forward_pre_hook(record) for m in mods]
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
    size = args.size or default_size(name, args.source)
    model = build(name, size, gen, args.source)
    calib = [torch.randn(args.batch, 3, size, size, generator=gen) for _ in range(args.calib_batches)]
    evals = [torch.randn(args.batch, 3, size, size, generator=gen) for _ in range(args.eval_batches)]
    t0 = time.perf_counter()
    qm = qt.calibrate(qt.prepare(model, args.preset), calib, progress=False)
    row: dict = {"model": name.split(":")[-1], "preset": args.preset, "size": size}
    if args.source == "timm":
        row["family"] = name.split(":")[0] if ":" in name else timm_family(name)
    row["float_ops"] = len(qt.float_ops(qm))
    row["float_op_kinds"] = sorted({op.op for op in qt.float_ops(qm)})
    row["float_ops_other"] = sorted({f"{op.where}: {op.op}" for op in qt.float_ops(qm) if not allowed_float(op.op)})[:12]
    try:
        q = qt.convert(qm)
    except Exception as e:  # noqa: BLE001 - the row says convert failed, with what it knows
        row["error"] = f"convert: {type(e).__name__}: {e}"[:200]
        return row
    row["prepare+calibrate+convert_s"] = round(time.perf_counter() - t0, 1)
    status = dispatch.fast_status(q)
    strategies: dict[str, int] = {}
    for v in status.values():
        key = ("fast-split" if "split" in v else "fast") if v.startswith("fast") else v.split(" (")[0]
        strategies[key] = strategies.get(key, 0) + 1
    row["strategies"] = strategies
    row["int8_flops_%"], row["converted_sites"], _ = int8_flop_share(q, evals[0])
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
            row["fakequant32_vs_64_agree_%"] = round(100.0 * (fq.argmax(1) == fq64.argmax(1)).double().mean().item(), 2)
            if "fast" in args.executions:
                qt.set_execution(q, "fast")
                out = torch.cat([q(x) for x in evals])
                row["fast_vs_fakequant64_sqnr_db"] = round(sqnr(fq64, out), 1)
                row["fast_vs_fakequant64_agree_%"] = round(100.0 * (out.argmax(1) == fq64.argmax(1)).double().mean().item(), 2)
            if "integer" in args.executions and "integer_error" not in row:
                qt.set_execution(q, "integer")  # exact integer sums, fixed-point requantization
                out = torch.cat([q(x) for x in evals])
                row["integer_vs_fakequant64_sqnr_db"] = round(sqnr(fq64, out), 1)
                row["integer_vs_fakequant64_agree_%"] = round(
                    100.0 * (out.argmax(1) == fq64.argmax(1)).double().mean().item(), 2)
    return row


def add_bars(row: dict, counterparts: dict[str, float]) -> dict:
    """Issue 23's bars for a timm row: ``meets`` = {bar: True/False/None (no counterpart)}."""
    tv = TORCHVISION_COUNTERPART.get(row.get("family", ""))
    if tv is not None and tv in counterparts:
        row["torchvision_counterpart"], row["torchvision_fakequant_vs_fp32_sqnr_db"] = tv, counterparts[tv]
    ok = "error" not in row
    fq, tvs = row.get("fakequant_vs_fp32_sqnr_db"), row.get("torchvision_fakequant_vs_fp32_sqnr_db")
    f32, fast64 = row.get("fakequant32_vs_64_sqnr_db"), row.get("fast_vs_fakequant64_sqnr_db")
    row["meets"] = {
        "converts": ok,
        "only_norm_softmax_movement_float": ok and not row.get("float_ops_other"),
        "int8_flops_95": ok and row.get("int8_flops_%", 0) >= 95.0,
        "within_3db_of_torchvision": None if tvs is None or fq is None else fq >= tvs - 3.0,
        "converted_vs_fq64_within_1db_of_fq32": None if f32 is None or fast64 is None else fast64 >= min(f32, 200.0) - 1.0,
    }
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


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run (the oneDNN ISA cap, if set, in front)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"ONEDNN_MAX_CPU_ISA={cap} " if cap else "") + shlex.join([".venv/bin/python", "scripts/check_zoo.py", *argv])


def header(args: argparse.Namespace, command: str) -> dict:
    """The JSON file's header: the CPU, the source and the command that produced it."""
    return {"cpu": cpu_report(), "source": args.source, "command": command, "threads": args.threads}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("torchvision", "timm"), default="torchvision")
    p.add_argument("--models", default=None, help="comma-separated names (default: DEFAULT_MODELS / DEFAULT_TIMM_MODELS)")
    p.add_argument("--counterpart-json", default=None, help="--source timm: a torchvision --json file whose fake-quant "
                        "SQNR each timm family is held against (TORCHVISION_COUNTERPART)")
    p.add_argument("--discover", action="store_true", help="--source timm: print the smallest model of every family")
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--executions", default="fast,reference,integer")
    p.add_argument("--size", type=int, default=None, help="input height/width (default: 224; timm: each model's own)")
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
    command = command_line(sys.argv[1:] if argv is None else argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(saved["cpu"] + "\n")
        print(markdown_table(saved["rows"]))
        return saved["rows"]
    if args.discover:
        for fam, name, params, size in discover_timm():
            print(f"{fam:28s} {name:40s} {params / 1e6:7.2f}M {size}")
        return []
    if args.models is None:
        args.models = DEFAULT_TIMM_MODELS if args.source == "timm" else DEFAULT_MODELS
    counterparts: dict[str, float] = {}
    if args.counterpart_json:
        counterparts = {r["model"]: r["fakequant_vs_fp32_sqnr_db"] for r in json.loads(Path(args.counterpart_json).read_text())["rows"]
                        if "fakequant_vs_fp32_sqnr_db" in r}
    args.executions = [e for e in args.executions.split(",") if e]
    torch.set_num_threads(args.threads)
    print(cpu_report(), flush=True)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            row = run(name, args)
        except Exception as e:  # noqa: BLE001 - one table row per model, failures included
            row = {"model": name.split(":")[-1], "error": f"{type(e).__name__}: {e}"[:200]}
        if args.source == "timm":
            add_bars(row, counterparts)
        row["command"] = command  # rows of several runs may be merged into one file: each names its own
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps(header(args, command) | {"rows": rows}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(header(args, command) | {"rows": rows}, indent=1))
    print("\n" + markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()

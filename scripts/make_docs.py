#!/usr/bin/env python
"""Render the measured tables of the docs from the JSON files the benchmark scripts write.

Usage::

    .venv/bin/python scripts/make_docs.py           # rewrite the generated blocks of README.md and docs/*.md
    .venv/bin/python scripts/make_docs.py --check   # exit 1 if a page is not what the JSON gives (the test suite runs this)

Sources:

* ``docs/bench/int8_*.json`` (``scripts/bench_int8.py --json``) and ``docs/bench/deploy_*.json``
  (``scripts/bench_deploy.py --json``), one file per CPU / ISA cap;
* ``docs/main_job_report/results.json`` (``bash scripts/main.sh``: the main job's report);
* ``docs/zoo_*.json`` (``scripts/check_zoo.py --json``) and ``docs/deploy_zoo_*.json``
  (``scripts/check_deploy_zoo.py --json``), listed in :data:`ZOO` with the command that wrote each.

Blocks between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in ``README.md`` and ``docs/*.md`` are filled: ``speed`` with the first ``int8_*`` file run
without an ISA cap, ``speed-all`` with every ``int8_*`` file, ``deploy`` with every ``deploy_*`` file, ``results-headline`` / ``results`` / ``results-bars``
from the main job's JSON, and one block per :data:`ZOO` entry.  No number in those places is typed by hand: rerun
the script that writes the JSON, then this one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
_BLOCK = re.compile(r"<!-- ([\w-]+):begin -->\n.*?<!-- \1:end -->", re.S)


def _table(rows: list[dict]) -> str:
    from bench_int8 import markdown_table

    keys = ("model", "batch", "variant", "images_per_s", "x_fp32", "x_torch_ao", "state_dict_bytes")
    return markdown_table([tuple(r[k] for k in keys) for r in rows])


def section(path: Path, root: Path = ROOT) -> str:
    """One benchmark JSON as Markdown: the command, the header lines, the table."""
    data = json.loads(path.read_text())
    head = "\n".join(f"    {line}" for line in data["header"])
    words = data["command"].split()
    env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment settings go before the interpreter
    cmd = " ".join([*env, ".venv/bin/python", *[w for w in words if w not in env]])
    return f"`{cmd}` ({path.relative_to(root)}):\n\n{head}\n\n{_table(data['rows'])}\n"


# ---------------------------------------------------------------------------------------------- main job report

MAIN_JOB_JSON = Path("docs") / "main_job_report" / "results.json"
MAIN_JOB_CPU = "a 2-core AMD EPYC (Zen 3: AVX2, no AVX-512, no VNNI)"  # for reports that record no ``meta.cpu``


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _results_rows(rows: list[dict], headline: bool) -> str:
    out = ["| method | bits | top-1 (%) | drop vs FP32 (pt) | model size | time | notes |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if headline and not (
            r["method"] in ("FP32", "QAT", "int8 converted (fast)") or r["method"].startswith("QAT")
            or r["method"].startswith("PTQ mse + qdrop")
            or "best of preset" in r.get("notes", "")
        ):
            continue
        t = r.get("time_s")
        when = "" if t is None else (f"{t:.1f} s {r.get('time_kind', '')}" if t < 10 else f"{t:.0f} s {r.get('time_kind', '')}")
        out.append(f"| {r['method']} | {r['bits']} | {r['top1']:.2f} | {r['drop_pt']:+.2f} | {_size(r['size_bytes'])} "
                   f"| {when.strip()} | {r.get('notes', '')} |")  # fmt: skip
    return "\n".join(out)


def results_block(root: Path, kind: str) -> str:
    """The main job's table (``kind``: ``headline``, ``results`` or ``bars``) from its JSON, with its command."""
    data = json.loads((root / MAIN_JOB_JSON).read_text())
    meta = data["meta"]
    env = meta.get("env", {})
    cpu = ", ".join(p.strip() for p in meta["cpu"].split(";")[:2]) if meta.get("cpu") else MAIN_JOB_CPU
    recorded = (meta.get("commands") or [""])[0]  # "python -m recipes.main_job ARGS" as the job ran
    args = recorded.split("recipes.main_job", 1)[1].strip() if "recipes.main_job" in recorded else f"--no-progress --threads {meta['threads']}"
    head = (f"`bash scripts/main.sh {args}` ({MAIN_JOB_JSON.as_posix()}; "
            f"{meta['model']} on {meta['dataset'].split(' (')[0]}, {meta['started_utc']}, {cpu}, "
            f"{meta['threads']} threads, torch {env.get('torch', '?')}; wall time {meta['wall_time_s'] / 60:.1f} min after set-up)")  # fmt: skip
    if kind == "bars":
        lines = ["| bar | measured | status |", "|---|---|---|"]
        lines += [f"| {c['bar']} | {c['value']} | {'PASS' if c['pass'] else 'MISS'} |" for c in data["checks"]]
        return head + ":\n\n" + "\n".join(lines) + "\n"
    return head + ":\n\n" + _results_rows(data["rows"], headline=kind == "headline") + "\n"


# ------------------------------------------------------------------------------------------------ model zoo


def _num(r: dict, k: str, fmt: str = "{:.1f}") -> str:
    v = r.get(k)
    return "—" if v is None else ("∞" if v == float("inf") else fmt.format(v))


def _fast(r: dict) -> str:
    st = r.get("strategies", {})
    return f"{st.get('fast', 0) + st.get('fast-split', 0)} ({st.get('fast-split', 0)})"


def _drift_bar(r: dict) -> str:
    """Issue 21's fidelity bar: fast vs float64 fake quant >= the float32 fake-quant floor - 1 dB."""
    fast, floor = r.get("fast_vs_fakequant64_sqnr_db"), r.get("fakequant32_vs_64_sqnr_db")
    if fast is None or floor is None:
        return "—"
    return f"yes ({fast - floor:+.1f})" if fast >= floor - 1.0 else f"NO ({fast - floor:+.1f})"


def _pair(r: dict, agree: str, sqnr: str) -> str:
    return f"{_num(r, agree)} / {_num(r, sqnr)}"


#: columns of each kind of zoo table: (header, right-aligned, cell)
ZOO_COLUMNS: dict[str, list[tuple[str, bool, Callable[[dict], str]]]] = {
    "zoo": [
        ("int8 sites / float ops", True, lambda r: f"{r.get('converted_sites', '—')} / {r.get('float_ops', '—')}"),
        ("int8 share of conv+matmul FLOPs %", True, lambda r: _num(r, "int8_flops_%")),
        ("speed vs FP32", True, lambda r: _num(r, "fast_speedup_x", "{:.2f}×")),
        ("layers fast (exact split)", True, _fast),
        ("max per-layer diff, fast vs reference (steps)", True, lambda r: _num(r, "fast_max_layer_steps", "{:.2f}")),
        ("fast vs fake quant: top-1 agree % / SQNR dB", True, lambda r: _pair(r, "fast_agree_%", "fast_sqnr_db")),
        ("float32 vs float64 fake quant SQNR dB", True, lambda r: _num(r, "fakequant32_vs_64_sqnr_db")),
        ("fast vs float64 fake quant SQNR dB", True, lambda r: _num(r, "fast_vs_fakequant64_sqnr_db")),
        ("integer vs fake quant: agree % / SQNR dB", True, lambda r: _pair(r, "integer_agree_%", "integer_sqnr_db")),
    ],
    "drift": [
        ("layers fast (exact split)", True, _fast),
        ("fast vs fake quant", True, lambda r: _pair(r, "fast_agree_%", "fast_sqnr_db")),
        ("integer vs fake quant", True, lambda r: _pair(r, "integer_agree_%", "integer_sqnr_db")),
        ("float32 vs float64 fake quant", True, lambda r: _pair(r, "fakequant32_vs_64_agree_%", "fakequant32_vs_64_sqnr_db")),
        ("integer vs float64 fake quant", True, lambda r: _pair(r, "integer_vs_fakequant64_agree_%", "integer_vs_fakequant64_sqnr_db")),
        ("fast vs float64 fake quant", True, lambda r: (_pair(r, "fast_vs_fakequant64_agree_%", "fast_vs_fakequant64_sqnr_db")
                                                         if "fast_vs_fakequant64_agree_%" in r else _num(r, "fast_vs_fakequant64_sqnr_db"))),
        ("fast ≥ float32 floor − 1 dB", False, _drift_bar),
    ],
    "speed": [
        ("speed vs FP32", True, lambda r: _num(r, "fast_speedup_x", "{:.2f}×")),
        ("layers fast (exact split)", True, _fast),
        ("int8 share of conv+matmul FLOPs %", True, lambda r: _num(r, "int8_flops_%")),
        ("fast vs fake quant: top-1 agree % / SQNR dB", True, lambda r: _pair(r, "fast_agree_%", "fast_sqnr_db")),
    ],
    "timm": [
        ("family", False, lambda r: str(r.get("family", "—"))),
        ("input", True, lambda r: f"{r['size']}²" if r.get("size") else "—"),
        ("int8 sites / float ops", True, lambda r: f"{r.get('converted_sites', '—')} / {r.get('float_ops', '—')}"),
        ("float op kinds", False, lambda r: ", ".join(r.get("float_op_kinds", [])) or "—"),
        ("int8 share of conv+matmul FLOPs %", True, lambda r: _num(r, "int8_flops_%")),
        ("fake quant vs FP32 SQNR dB", True, lambda r: _num(r, "fakequant_vs_fp32_sqnr_db")),
        ("fast vs fake quant: top-1 agree % / SQNR dB", True, lambda r: _pair(r, "fast_agree_%", "fast_sqnr_db")),
        ("fast vs float64 fake quant SQNR dB", True, lambda r: _num(r, "fast_vs_fakequant64_sqnr_db")),
    ],
    "deploy": [
        ("engine", False, lambda r: r["engine"]),
        ("input", True, lambda r: f"{r['size']}²"),
        ("weights", False, lambda r: r.get("target", "—")),
        ("faithful (every site within its steps)", False,
         lambda r: ("error: " + r["error"].split(":")[0]) if "error" in r else ("yes" if r.get("faithful") else "NO")),
        ("rel. L2 vs fake quant", True, lambda r: _num(r, "rel_l2", "{:.4f}")),
        ("seconds", True, lambda r: _num(r, "seconds")),
    ],
}

_MALLOC = "MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 "
_ZOO_PY = _MALLOC + ".venv/bin/python scripts/check_zoo.py"

#: block name -> (JSON under docs/, table kind, the command that wrote it; None: only the script is known)
ZOO: dict[str, tuple[str, str, Optional[str]]] = {
    "zoo-avx2": ("zoo_w8a8_avx2.json", "zoo", f"{_ZOO_PY} --drift-floor --speed --json docs/zoo_w8a8_avx2.json"),
    "zoo-avx2-swin-v2": ("zoo_w8a8_avx2_swin_v2_t.json", "zoo",
                         f"{_ZOO_PY} --models swin_v2_t --speed --drift-floor --json docs/zoo_w8a8_avx2_swin_v2_t.json"),
    "zoo-drift-avx2": ("zoo_drift_w8a8_avx2.json", "drift",
                       f"{_ZOO_PY} --models maxvit_t,regnet_y_400mf,vit_b_32,wide_resnet50_2 --eval-batches 16 --drift-floor "
                       "--json docs/zoo_drift_w8a8_avx2.json"),
    "zoo-drift-avx2-swin-v2": ("zoo_drift_w8a8_avx2_swin_v2_t.json", "drift",
                               f"{_ZOO_PY} --models swin_v2_t --eval-batches 16 --drift-floor --json docs/zoo_drift_w8a8_avx2_swin_v2_t.json"),
    "zoo-drift-zen4": ("zoo_drift_w8a8_zen4.json", "drift", None),
    "zoo-drift-zen4-avx2cap": ("zoo_drift_w8a8_zen4_avx2cap.json", "drift", None),
    "zoo-speed-b8": ("zoo_speed_w8a8_b8_zen4.json", "speed",
                     ".venv/bin/python scripts/check_zoo.py --size 224 --batch 8 --calib-batches 1 --eval-batches 1 "
                     "--executions fast --speed --json docs/zoo_speed_w8a8_b8_zen4.json"),
    "zoo-speed-b1": ("zoo_speed_w8a8_b1_zen4.json", "speed",
                     ".venv/bin/python scripts/check_zoo.py --size 224 --batch 1 --calib-batches 2 --eval-batches 1 "
                     "--executions fast --speed --json docs/zoo_speed_w8a8_b1_zen4.json"),
    "zoo-speed-b1-avx2cap": ("zoo_speed_w8a8x86_b1_zen4_avx2cap.json", "speed", None),
    "zoo-timm": ("zoo_timm_w8a8.json", "timm", None),
    "deploy-zoo": ("deploy_zoo_zen4.json", "deploy", ".venv/bin/python scripts/check_deploy_zoo.py --json docs/deploy_zoo_zen4.json"),
}


def zoo_table(rows: list[dict], kind: str) -> str:
    """``rows`` of a ``check_zoo`` / ``check_deploy_zoo`` JSON as a Markdown table of ``kind`` (:data:`ZOO_COLUMNS`)."""
    cols = ZOO_COLUMNS[kind]
    out = ["| model | " + " | ".join(h for h, _, _ in cols) + " |",
           "|---|" + "".join("---:|" if right else "---|" for _, right, _ in cols)]  # fmt: skip
    for r in rows:
        if "error" in r and kind != "deploy":
            out.append(f"| {r['model']} | error: {r['error'][:90]} |" + " |" * (len(cols) - 1))
            continue
        out.append(f"| {r['model']} | " + " | ".join(cell(r) for _, _, cell in cols) + " |")
    return "\n".join(out)


def zoo_block(root: Path, name: str) -> str:
    """One :data:`ZOO` entry as Markdown: the command (or the script), the CPU line, the table."""
    file, kind, cmd = ZOO[name]
    path = root / "docs" / file
    data = json.loads(path.read_text())
    script = "scripts/check_deploy_zoo.py" if kind == "deploy" else "scripts/check_zoo.py"
    note = f"; models from {data['source']}" if data.get("source") else ""
    cmd = data.get("command") or cmd  # check_zoo records the command that wrote the file
    if not cmd:
        cmd, note = f"{script} ... --json docs/{file}", note + "; the run's other flags are not recorded in the file"
    return f"`{cmd}` (docs/{file}{note}):\n\n    {data.get('cpu', 'CPU: not recorded')}\n\n{zoo_table(data['rows'], kind)}\n"


def deploy_zoo_summary(root: Path, file: str = "deploy_zoo_zen4.json") -> str:
    """One line: per engine, on how many families ``qt.deploy`` was faithful (from the deploy-zoo JSON)."""
    data = json.loads((root / "docs" / file).read_text())
    counts = []
    for engine in dict.fromkeys(r["engine"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["engine"] == engine]
        bad = ", ".join(r["model"] for r in rows if not r.get("faithful"))
        counts.append(f"{engine} faithful on {sum(bool(r.get('faithful')) for r in rows)} of {len(rows)} (not: {bad or '—'})")
    cmd = ZOO["deploy-zoo"][2]
    cpu = ", ".join(part.strip() for part in data["cpu"].split(";")[:2])
    return f"`qt.deploy` on every torchvision family (`{cmd}`; {cpu}): " + "; ".join(counts) + ".\n"


def _blocks(root: Path) -> dict[str, str]:
    bench = root / "docs" / "bench"
    int8 = sorted(bench.glob("int8_*.json"))
    deploy = sorted(bench.glob("deploy_*.json"))
    uncapped = [f for f in int8 if "ONEDNN_MAX_CPU_ISA=" not in json.loads(f.read_text())["command"]]
    blocks = {
        "speed": section((uncapped or int8)[0], root) if int8 else "",
        "deploy": "\n".join(section(f, root) for f in deploy),
        "speed-all": "\n".join(section(f, root) for f in int8),
    }
    if (root / MAIN_JOB_JSON).exists():
        blocks.update({f"results-{k}" if k != "results" else k: results_block(root, k) for k in ("headline", "results", "bars")})
    blocks.update({name: zoo_block(root, name) for name, (file, _, _) in ZOO.items() if (root / "docs" / file).exists()})
    if (root / "docs" / ZOO["deploy-zoo"][0]).exists():
        blocks["deploy-zoo-summary"] = deploy_zoo_summary(root)
    return blocks


def fill(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every known ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` block filled."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in blocks:
            return m.group(0)
        return f"<!-- {name}:begin -->\n{blocks[name]}<!-- {name}:end -->"

    return _BLOCK.sub(sub, text)


def render(root: Path = ROOT) -> dict[Path, str]:
    """``{page: its text}`` for every generated page under ``root``."""
    out: dict[Path, str] = {}
    blocks = _blocks(root)
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if page.exists() and page not in out:
            text = page.read_text()
            new = fill(text, blocks)
            if new != text or _BLOCK.search(text):
                out[page] = new
    return out


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the pages are current")
    args = p.parse_args(argv)
    stale = []
    for path, text in render(root).items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(root)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    if stale:
        print("not current (run .venv/bin/python scripts/make_docs.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

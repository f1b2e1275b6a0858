"""The measured pages are what their JSON gives (scripts/make_docs.py --check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


def test_generated_pages_are_current() -> None:
    out = subprocess.run([sys.executable, "scripts/make_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_changed_number_makes_the_pages_stale(tmp_path: Path) -> None:
    import make_docs

    (tmp_path / "docs" / "bench").mkdir(parents=True)
    row = {"model": "M", "batch": 1, "variant": "fp32 eager", "images_per_s": 100.0, "x_fp32": 1.0, "x_torch_ao": 0.5,
           "state_dict_bytes": 10}  # fmt: skip
    data = {"command": "scripts/bench_int8.py", "header": ["CPU: test"], "rows": [row]}
    src = tmp_path / "docs" / "bench" / "int8_test.json"
    src.write_text(json.dumps(data))
    (tmp_path / "README.md").write_text(f"intro\n{make_docs.BEGIN}\nold\n{make_docs.END}\nend\n")
    assert make_docs.main(["--check"], tmp_path) == 1
    assert make_docs.main([], tmp_path) == 0 and make_docs.main(["--check"], tmp_path) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| M | 1 | fp32 eager | 100 | 1.00× | 0.50× | 10 |" in readme and readme.endswith("end\n")
    row["images_per_s"] = 101.0
    src.write_text(json.dumps(data))
    assert make_docs.main(["--check"], tmp_path) == 1


def test_zoo_and_results_blocks_follow_their_json(tmp_path: Path) -> None:
    import make_docs

    docs = tmp_path / "docs"
    (docs / "main_job_report").mkdir(parents=True)
    zoo = {"cpu": "CPU: test; flags: avx2", "rows": [
        {"model": "net", "converted_sites": 3, "float_ops": 1, "int8_flops_%": 99.5, "fast_speedup_x": 1.5,
         "strategies": {"fast": 2, "fast-split": 1}, "fast_agree_%": 100.0, "fast_sqnr_db": 40.04},
        {"model": "broken", "error": "RuntimeError: boom"}]}  # fmt: skip
    (docs / "zoo_speed_w8a8_b8_zen4.json").write_text(json.dumps(zoo))
    report = {"meta": {"threads": 2, "model": "resnet20", "dataset": "fashion-mnist (/x)", "started_utc": "t0",
                       "wall_time_s": 600.0, "env": {"torch": "2"}},
              "rows": [{"method": "FP32", "bits": "FP32", "top1": 94.18, "drop_pt": 0.0, "size_bytes": 2**20,
                        "time_s": 10.0, "time_kind": "training", "notes": "x"},
                       {"method": "PTQ minmax", "bits": "W8A8", "top1": 94.0, "drop_pt": 0.18, "size_bytes": 2048,
                        "time_s": 2.0, "time_kind": "calibration", "notes": ""}],
              "checks": [{"bar": "FP32 >= 93.5%", "value": "94.18%", "pass": True}]}  # fmt: skip
    (docs / "main_job_report" / "results.json").write_text(json.dumps(report))
    page = docs / "zoo.md"
    page.write_text("# zoo\n<!-- zoo-speed-b8:begin -->\n<!-- zoo-speed-b8:end -->\n"
                    "<!-- results-headline:begin -->\n<!-- results-headline:end -->\n"
                    "<!-- results-bars:begin -->\n<!-- results-bars:end -->\n")  # fmt: skip
    assert make_docs.main([], tmp_path) == 0 and make_docs.main(["--check"], tmp_path) == 0
    text = page.read_text()
    assert "| net | 1.50× | 3 (1) | 99.5 | 100.0 / 40.0 |" in text  # speed, fast (split), int8 share, agree / SQNR
    assert "| broken | error: RuntimeError: boom |" in text and "CPU: test; flags: avx2" in text
    assert "| FP32 | FP32 | 94.18 | +0.00 | 1.00 MiB |" in text  # the headline keeps FP32 ...
    assert "PTQ minmax" not in text  # ... and drops rows that are neither best, converted, reconstructed nor QAT
    assert "| FP32 >= 93.5% | 94.18% | PASS |" in text and "bash scripts/main.sh --no-progress --threads 2" in text
    zoo["rows"][0]["fast_sqnr_db"] = 41.0
    (docs / "zoo_speed_w8a8_b8_zen4.json").write_text(json.dumps(zoo))
    assert make_docs.main(["--check"], tmp_path) == 1
    report["checks"][0]["pass"] = False
    (docs / "main_job_report" / "results.json").write_text(json.dumps(report))
    assert make_docs.main([], tmp_path) == 0 and "| FP32 >= 93.5% | 94.18% | MISS |" in page.read_text()

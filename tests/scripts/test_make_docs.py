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

"""The kernel tests again with oneDNN's ISA capped, so one machine exercises the other CPUs' kernel paths.

oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, before its first kernel runs, so each cap runs in a fresh
subprocess: ``AVX2`` (the int8 kernels of x86 CPUs without VNNI, e.g. AMD Zen 2/3 — u8*s8 saturates in int16)
and ``AVX512_CORE`` (AVX-512 without VNNI, e.g. Skylake-SP).  A cap above what the CPU has changes nothing
(oneDNN then uses the CPU's own best ISA), so on an AVX2 machine the AVX-512 run repeats the native one.
The subprocess runs ``tests/kernels`` minus this file; it must pass on every cap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtoolkit.kernels import onednn

ROOT = Path(__file__).resolve().parents[2]
_GUARD = "QTOOLKIT_ISA_CAPPED_RUN"

pytestmark = [
    pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 ops unavailable on this CPU/build"),
    pytest.mark.skipif(bool(os.environ.get(_GUARD)), reason="already inside an ISA-capped run"),
]


def _env(isa: str) -> dict[str, str]:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, **{_GUARD: isa})
    env.pop("ONEDNN_VERBOSE", None)
    return env


def test_probe_follows_the_isa_cap():
    """Capped to AVX2 (no VNNI), the dense u8*s8 kernels saturate and the depthwise one does not — on any CPU."""
    code = (
        "from qtoolkit.kernels import onednn as o; "
        "print([o.saturates_u8s8(k) for k in o.KERNEL_CLASSES])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=dict(_env("AVX2"), ONEDNN_VERBOSE="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    isa_lines = [line for line in out.stdout.splitlines() if ",isa:" in line]
    assert isa_lines and "AVX2" in isa_lines[0] and "VNNI" not in isa_lines[0], isa_lines
    assert out.stdout.strip().splitlines()[-1] == "[True, True, False, True]"


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_kernel_suite_passes_with_isa_capped(isa):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header",
           "tests/kernels", "--deselect", "tests/kernels/test_isa_capped.py"]  # fmt: skip
    out = subprocess.run(cmd, env=_env(isa), cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, f"tests/kernels with ONEDNN_MAX_CPU_ISA={isa} failed:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail

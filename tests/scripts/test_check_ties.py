"""scripts/check_ties.py: the fast execution rounds like the float64 fake-quant model up to float32 ties."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qtoolkit.kernels import onednn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 kernels unavailable in this build/CPU")


def test_depthwise_se_hardswish_net_flips_only_at_ties() -> None:
    import check_ties

    rows = check_ties.flips("mobilenet_v3_small", 32)
    fast = sum(r[0] for r in rows.values())
    f32 = sum(r[1] for r in rows.values())
    assert sum(r[2] for r in rows.values()) > 100_000
    assert fast <= max(2 * f32, 5), rows  # no more rounding flips than float32 arithmetic makes
    assert max(r[3] for r in rows.values()) < 1e-4, rows  # and each one at a rounding tie

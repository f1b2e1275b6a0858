"""Weights packed per input shape (qtoolkit.kernels.dispatch.packed_for): no per-call weight reorder, same results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import dispatch, onednn
from qtoolkit.kernels.fast_state import _get_state

pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 kernels unavailable in this build/CPU")

ROOT = Path(__file__).resolve().parents[2]


def _one_by_one() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 64, 1)).eval()
    return qt.convert(qt.calibrate(qt.prepare(m, "w8a8"), [torch.randn(2, 64, 14, 14)], progress=False))


def test_results_do_not_depend_on_the_packed_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    q = _one_by_one()
    layer = q[0]
    shapes = [(1, 64, 56, 56), (3, 64, 7, 7), (1, 64, 56, 56), (2, 64, 9, 11), (1, 64, 5, 5), (4, 64, 3, 3)]
    xs = [torch.randn(s) for s in shapes]
    with torch.no_grad():
        ys = [layer(x).dequantize() for x in xs]
        assert len(_get_state(layer).by_shape) <= dispatch.MAX_PACKED_SHAPES
        monkeypatch.setattr(dispatch, "packed_for", lambda st, xq: st.packed)  # the weight packed without a hint
        for x, y in zip(xs, ys):
            assert torch.equal(layer(x).dequantize(), y)


def test_no_weight_reorder_per_call() -> None:
    code = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests/kernels")
        from test_packed_shapes import _one_by_one
        q = _one_by_one()
        x = torch.randn(1, 64, 56, 56)
        with torch.no_grad():
            q(x)
            print("=====", flush=True)
            q(x)
        """
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    after = out.stdout.split("=====", 1)[1]
    assert "exec,cpu,convolution" in after  # the verbose log is on
    assert "exec,cpu,reorder" not in after, [line for line in after.splitlines() if "reorder" in line][:3]

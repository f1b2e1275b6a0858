"""The converted model's fast forward as one generated program (qtoolkit/executor.py).

The oracle is the same converted model run module by module (``type(model).forward``), which the rest of the
suite checks against the fake-quant model and torch's reference ops: the program must give the same bytes.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import onednn
from qtoolkit.kernels.dispatch import FastPathWarning
from qtoolkit.kernels.qtensor import QuantizedActivation

pytestmark = pytest.mark.skipif(not onednn.is_available(), reason="oneDNN int8 kernels unavailable in this build/CPU")


class Block(nn.Module):
    """MBConv-style: expand 1x1 + SiLU, depthwise 3x3 + SiLU, squeeze-excitation, project 1x1, residual add."""

    def __init__(self, c: int = 8, e: int = 16) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.se_reduce = nn.Conv2d(e, 4, 1)
        self.se_expand = nn.Conv2d(4, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return x + self.drop(self.project(y * s))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(), Block())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.relu(x + self.res(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _converted(model: nn.Module | None = None, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = model if model is not None else Net()
    m.train()
    with torch.no_grad():  # BN statistics from data
        for _ in range(3):
            m(torch.randn(8, 3, 16, 16))
    m.eval()
    qm = qt.calibrate(qt.prepare(m, "w8a8"), [torch.randn(8, 3, 16, 16) for _ in range(3)], progress=False)
    return qt.convert(qm, **kw)


def _module_by_module(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = type(q).forward(q, x)
    return y.dequantize() if isinstance(y, QuantizedActivation) else y


@pytest.mark.parametrize("batch", [1, 3])
def test_program_is_bit_identical_to_module_by_module(batch: int) -> None:
    q = _converted()
    assert qt.program_status(q).startswith("program:"), qt.program_status(q)
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        y, ref = q(x), _module_by_module(q, x)
    assert type(y) is torch.Tensor and y.shape == (batch, 5)
    assert torch.equal(y, ref)
    # and the converted model is still the fake-quant model within the fast path's one-step contract
    qt.set_execution(q, "reference")
    with torch.no_grad():
        r = q(x)
    assert (y - r).abs().max() < 0.25 * r.abs().max()


def test_program_lowers_layers_adds_and_tables() -> None:
    q = _converted()
    prog = q.forward.program
    assert prog is not None
    src = prog.source
    assert "_lookup(" in src and "_add(" in src and "_codes_in(" in src  # SiLU tables, residual adds, the input
    assert prog.lowered >= 10


def test_state_changes_rebuild_or_fall_back() -> None:
    q = _converted()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = q(x)
        qt.set_execution(q, "reference")
        assert qt.program_status(q).startswith("module by module")
        r = q(x)
        qt.set_execution(q, "fast")
        assert qt.program_status(q).startswith("program:")
        assert torch.equal(q(x), y)
    assert not torch.equal(r, y)  # the reference execution really ran


def test_hooks_run_module_by_module() -> None:
    q = _converted()
    seen = []
    conv = next(m for m in q.modules() if isinstance(m, qt.nn.Int8Layer))
    h = conv.register_forward_hook(lambda mod, a, out: seen.append(out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = q(x)
    h.remove()
    assert len(seen) == 1  # the hook saw the layer's call
    with torch.no_grad():
        assert torch.equal(q(x), y)


def test_load_state_dict_and_copies() -> None:
    q = _converted()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = q(x)
    sd = q.state_dict()
    assert not any("program" in k for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    q.load_state_dict(torch.load(buf, weights_only=True))  # kernel states rebuilt: the program follows
    with torch.no_grad():
        assert torch.equal(q(x), y)
    assert qt.program_status(q).startswith("program:")
    q2 = copy.deepcopy(q)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    q3 = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(q2(x), y) and torch.equal(q3(x), y)


def test_grad_mode_output_is_inference_only() -> None:
    q = _converted()
    y = q(torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="backward through a converted"):
        y.sum().backward()


def test_wrong_shape_names_the_layer() -> None:
    q = _converted()
    with pytest.raises((RuntimeError, ValueError), match="stem"):
        q(torch.randn(2, 4, 16, 16))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if float(y.detach().float().mean()) > 1e9:  # data-dependent control flow: not traceable by torch.fx
            y = y * 2
        return self.b(y)


def test_untraceable_forward_warns_and_runs_module_by_module() -> None:
    with pytest.warns(FastPathWarning, match="module by module"):
        q = _converted(Branchy())
    assert qt.program_status(q).startswith("module by module: torch.fx cannot trace")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), _module_by_module(q, x))


def test_unsupported_input_falls_back_with_a_warning() -> None:
    q = _converted(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(3, 16, 16)  # unbatched
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = q(x)
    assert any(issubclass(i.category, FastPathWarning) for i in w)
    qt.set_execution(q, "reference")
    with torch.no_grad():
        assert torch.allclose(y, q(x), atol=1e-5)


def test_fused_adds_run_in_the_program() -> None:
    from qtoolkit.kernels.dispatch import fused_conv_add
    from recipes.models import resnet20

    q = _converted(resnet20(num_classes=10), fuse_adds=True)
    assert qt.program_status(q).startswith("program:")
    assert any(v is fused_conv_add for v in q.forward.program.fn.__globals__.values())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), _module_by_module(q, x))

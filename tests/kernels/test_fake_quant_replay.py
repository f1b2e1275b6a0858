"""The converted model's fast kernels round where the fake-quant model rounds, to the last float32 step.

The fake-quant model rounds ``fl(y) · fl(1/s)`` and adds the zero point after rounding.  A kernel that adds the
zero point before rounding (``round(y + z)`` in float32) or evaluates an add in another order rounds values
within a few float32 steps of a half-way point the other way; through a deep depthwise / squeeze-excitation
network those one-step differences compound to several dB more drift than float32 rounding explains.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.kernels import dispatch, dnnl_ext
from qtoolkit.kernels.qtensor import QuantizedActivation


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (out - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(ref.pow(2).sum() / noise).item()


def _fast(q: nn.Module) -> nn.Module:
    qt.set_execution(q, "fast")
    for m in q.modules():  # fast where the layer has a fast path, as convert() chose
        if hasattr(m, "execution") and not dispatch.supports_fast(m):
            m.execution = "reference"
    return q


def test_depthwise_se_net_drifts_no_more_than_float32_fake_quant():
    """torchvision's mobilenet_v3_large (depthwise, squeeze-excitation, hardswish tables, residual adds), random
    weights with BN statistics from data, 64x64: fast vs the float64 fake-quant model at least as close as the
    float32 fake-quant model is, within 1 dB (rounding the zero point in float32 or the add in another order:
    4-7 dB further on every input seed)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = torchvision.models.mobilenet_v3_large(weights=None, num_classes=10)
    model.train()
    with torch.no_grad():  # BN statistics from data
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64, generator=g))
    model.eval()
    calib = [torch.randn(8, 3, 64, 64, generator=g) for _ in range(4)]
    x = torch.randn(64, 3, 64, 64, generator=g)
    qm = qt.calibrate(qt.prepare(model, "w8a8"), calib, progress=False)
    q = _fast(qt.convert(qm))
    q64 = copy.deepcopy(qm).double()
    with torch.no_grad():
        ref = q64(x.double())
        floor = _sqnr(ref, qm(x))
        fast = _sqnr(ref, q(x))
    assert fast >= floor - 1.0, f"fast {fast:.1f} dB vs the float32 fake-quant floor {floor:.1f} dB"


@pytest.mark.skipif(dnnl_ext.load() is None, reason="qtoolkit's oneDNN extension is not built here")
@pytest.mark.parametrize("out_zp,relu", [(100, False), (3, False), (200, True)])
def test_extension_rounds_before_adding_the_output_zero_point(out_zp, relu):
    """A value a 2^-20 step above a half-way point (closer than float32 resolves next to the zero point):
    the code the fake-quant model gives (``round(y) + z``), not the tie ``round(y + z)`` makes."""
    k = torch.zeros(4, 8, 1, 1, dtype=torch.int8)  # zero weight: the output is the bias alone
    base = torch.tensor([0.5, 3.5, 10.5, 20.5], dtype=torch.float64) + 2.0**-20  # output steps
    os_ = torch.full((4,), 0.01, dtype=torch.float32)
    bias = base / 0.01  # accumulator units: y = os * (acc + b)
    conv = dnnl_ext.QConv(k, os_, bias, stride=1, padding=0, dilation=1, groups=1, x_zp=0, out_zp=out_zp,
                          out_dtype=torch.uint8, relu=relu)  # fmt: skip
    x = torch.randint(0, 255, (2, 8, 3, 3), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = conv.run(x)
    y_exact = os_.double() * bias.float().double()  # what oneDNN's float32 scale and bias represent
    want = (torch.floor(y_exact + 0.5) + out_zp).clamp(0, 255)  # y_exact is never a tie: round half up is exact
    assert torch.equal(y[0, :, 0, 0].double(), want), (y[0, :, 0, 0].tolist(), want.tolist())


# (lhs scale, zp, rhs scale, zp, out scale, zp): a calibrated grid, and mobilenet_v3_large's features.6 add
ADD_GRIDS = [None, (2.23099807e-4, 127, 2.90510943e-4, 129, 4.01234895e-4, 141)]


@pytest.mark.parametrize("grid", ADD_GRIDS)
@pytest.mark.parametrize("use_ext", [True, False])
def test_add_codes_replay_fake_quant_on_near_ties(use_ext, grid, monkeypatch):
    """Operands whose real sum lands on or next to half-way points of the output grid: equal codes."""
    from qtoolkit.config import get_qconfig
    from qtoolkit.nn import Int8Add
    from qtoolkit.nn.quant_add import QuantAdd

    if use_ext and dnnl_ext.load() is None:
        pytest.skip("qtoolkit's oneDNN extension is not built here")
    if not use_ext:
        monkeypatch.setattr(dnnl_ext, "load", lambda verbose=False: None)
    qa = QuantAdd(get_qconfig("w8a8"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, 32, 32, generator=g), torch.randn(2, 16, 32, 32, generator=g) * 0.7
    qa(a, b)
    for i, fq in enumerate((qa.lhs_quantizer, qa.rhs_quantizer, qa.output_quantizer)):
        fq.finalize()
        if grid is not None:
            fq.scale.fill_(grid[2 * i])
            fq.zero_point.fill_(grid[2 * i + 1])
    add = Int8Add.from_quant(qa)
    add.execution = "fast"
    st = dispatch._build_add(add)
    # every pair of codes: all sums the grid can produce, many of them within float32 steps of a tie
    ca = torch.arange(256, dtype=torch.uint8).repeat_interleave(256).reshape(1, 256, 16, 16)
    cb = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(1, 256, 16, 16)
    A = QuantizedActivation.wrap(ca, st.lhs_scale, st.lhs_zp)
    B = QuantizedActivation.wrap(cb, st.rhs_scale, st.rhs_zp)
    ref = qt.numerics.quantize(add.forward_reference(A.dequantize(), B.dequantize()), add.output_scale,
                               add.output_zero_point, 0, 255)  # fmt: skip
    with torch.no_grad():
        fast = add(A, B)
    assert isinstance(fast, QuantizedActivation)
    assert torch.equal(fast.codes, ref)


@pytest.mark.skipif(dnnl_ext.load() is None, reason="qtoolkit's oneDNN extension is not built here")
@pytest.mark.parametrize("cap,isa", [("AVX2", 1), ("SSE41", 0)])
def test_add_vector_paths_under_an_isa_cap(cap, isa):
    """The extension's add picks its vector width from the CPU, lowered by ONEDNN_MAX_CPU_ISA: the AVX2 and the
    scalar loops give the fake-quant model's codes too (a fresh process: the cap is read once)."""
    import os
    import subprocess
    import sys

    if dnnl_ext.load().add_isa() < isa:
        pytest.skip(f"this CPU has no {cap} path to cap to")
    code = (
        "import torch, qtoolkit as qt\n"
        "from qtoolkit.kernels import dnnl_ext\n"
        "e = dnnl_ext.load(); print(e.add_isa())\n"
        "ca = torch.arange(256, dtype=torch.uint8).repeat_interleave(256) \n"
        "cb = torch.arange(256, dtype=torch.uint8).repeat(256)\n"
        f"g = {ADD_GRIDS[1]!r}\n"
        "y = e.add_u8(ca, cb, g[1], g[0], g[3], g[2], g[4], g[5], 0, 255, None)\n"
        "sa, sb, so = (torch.tensor(v, dtype=torch.float32) for v in (g[0], g[2], g[4]))\n"
        "v = ((ca.float() - g[1]) * sa + (cb.float() - g[3]) * sb) * (1.0 / so)\n"
        "ref = (torch.round(v) + g[5]).clamp(0, 255).to(torch.uint8)\n"
        "print(int((y != ref).sum()))\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    used, mismatches = (int(v) for v in out.stdout.split()[-2:])
    assert used == isa and mismatches == 0

"""Residual adds on a transformer's float stream (``prepare(stream_add_bits=...)``).

A ViT's class token lives in the same residual stream as the patch tokens but can have a far smaller range
(timm's ``cls_token`` starts near 0, the patch embedding's outputs are O(1)): one per-tensor 8-bit grid over all
tokens at the residual adds leaves the class token a few steps, and the classifier reads only that token.  The
tiny model below reproduces it; the references are the float model and the same model prepared with
``stream_add_bits=None`` (every add on the preset's grid).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.config import get_qconfig
from qtoolkit.nn.fused import Add
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.prepare import stream_adds


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = float((out - ref).pow(2).sum())
    return math.inf if noise == 0.0 else 10.0 * math.log10(float(ref.pow(2).sum()) / noise)


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj, self.scale = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), dim**-0.5
        for lin in (self.qkv, self.proj):
            nn.init.normal_(lin.weight, std=0.02)  # timm's ViT init: small branch outputs
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1).matmul(v))


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

        # timm's Block: layer scale and drop path, identities at inference; torchvision's: dropout
        self.ls1, self.drop_path1, self.drop_path2 = nn.Identity(), nn.Identity(), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.fc2(self.act(self.fc1(self.norm2(x)))))


class TinyViT(nn.Module):
    """Patch embedding, a class token far smaller than the patch tokens, pre-norm blocks, a class-token head."""

    def __init__(self, dim: int = 32, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        g = torch.Generator().manual_seed(1)
        # as timm's ViT initializes them: the class token ~1e-6, the position embedding ~0.02
        self.cls_token = nn.Parameter(1e-6 * torch.randn(1, 1, dim, generator=g))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 17, dim, generator=g))
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [3.0 * torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def _model() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


def _fq_sqnr(model: nn.Module, **kw) -> tuple[nn.Module, float]:
    qm = qt.calibrate(qt.prepare(model, "w8a8", **kw), _data(3, 0), progress=False)
    evals = _data(2, 1)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in evals])
        out = torch.cat([qm(x) for x in evals])
    return qm, _sqnr(ref, out)


def test_class_token_is_crushed_by_one_8bit_grid_and_kept_by_the_stream_grid() -> None:
    model = _model()
    with torch.no_grad():  # the premise: the class token's range is far below the patch tokens' in the stream
        x = model.patch(_data(1, 0)[0]).flatten(2).transpose(1, 2)
        assert x.abs().max() > 20 * model.pos_embed[0, 0].abs().max()
    _, narrow = _fq_sqnr(model, stream_add_bits=None)
    qm, wide = _fq_sqnr(model, stream_add_bits=16)
    assert narrow < 20.0, narrow  # every residual add on one uint8 grid: the class token keeps a few steps
    assert wide > 30.0, wide
    assert wide > narrow + 15.0
    bits = {n: m.qconfig.activation.spec.bits for n, m in qm.named_modules() if isinstance(m, QuantAdd)}
    assert bits == {"add_0": 16, **{f"blocks.{i}.add_{j}": 16 for i in range(2) for j in range(2)}}, bits


def test_widened_adds_convert_and_agree_with_fake_quant() -> None:
    model = _model()
    qm, _ = _fq_sqnr(model, stream_add_bits=16)
    q = qt.convert(qm)
    evals = _data(1, 1)
    with torch.no_grad():
        fq = torch.cat([qm(x) for x in evals])
        fp = torch.cat([model(x) for x in evals])
        for execution in ("reference", "fast", "integer"):
            qt.set_execution(q, execution)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fast path runs a 16-bit add as its reference (and says so)
                out = torch.cat([q(x) for x in evals])
            assert _sqnr(fq, out) > 35.0, (execution, _sqnr(fq, out))  # converted ≈ its own fake-quant model
            assert _sqnr(fp, out) > 30.0, (execution, _sqnr(fp, out))


def test_adds_that_pass_int8_codes_keep_the_preset_grid() -> None:
    # ResNet-style: conv(x) + x feeding the next conv; the fast path passes codes in and out
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _ResBlock(8), _ResBlock(8), nn.Conv2d(8, 4, 1)).eval()
    qm = qt.prepare(model, "w8a8", stream_add_bits=16)
    bits = [m.qconfig.activation.spec.bits for m in qm.modules() if isinstance(m, QuantAdd)]
    assert bits == [8, 8]
    assert stream_adds(qm) == []


def test_overrides_and_opt_out_keep_their_grids() -> None:
    model = _model()
    w8 = get_qconfig("w8a8")
    for kw in ({}, {"stream_add_bits": None}, {"overrides": {Add: w8}, "stream_add_bits": 16},
               {"overrides": {"blocks.0.*": w8}, "stream_add_bits": 16}):
        qm = qt.prepare(model, "w8a8", **kw)
        bits = {n: m.qconfig.activation.spec.bits for n, m in qm.named_modules() if isinstance(m, QuantAdd)}
        if "overrides" in kw and "blocks.0.*" in kw["overrides"]:
            assert bits == {"add_0": 16, "blocks.0.add_0": 8, "blocks.0.add_1": 8, "blocks.1.add_0": 16, "blocks.1.add_1": 16}
        else:
            assert set(bits.values()) == {8}, (kw, bits)
    with pytest.raises(ValueError, match="stream_add_bits"):
        qt.prepare(model, "w8a8", stream_add_bits=1)

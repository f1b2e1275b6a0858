"""Model code reads more of its modules than their calls: attributes (``self.attn.resolution``), methods
(``self.rel_pos.get_bias()``), a layer's own settings (``self.proj.gain``). Rewritten containers (``torch.fx``),
prepared and converted twins keep them; checked against the float model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import qtoolkit as qt
from qtoolkit.nn import Int8Layer, Int8Norm, QuantLayer, QuantNorm
from qtoolkit.toggles import fake_quant_disabled


class RelBias(nn.Module):
    """A parameter-holding leaf whose forward adds what one of its methods builds (timm's ``RelPosBias``): traced and
    rewritten by ``prepare`` (its add becomes int8)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(n))
        self.bias_shape = (1, n)
        self.register_buffer("index", torch.arange(n).flip(0), persistent=False)

    def get_bias(self) -> torch.Tensor:
        return self.table[self.index].view(self.bias_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.get_bias()


class Block(nn.Module):
    """A container with a residual add (rewritten into a GraphModule) and plain attributes and methods."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.fc.gain = 0.5  # a layer's attribute of its own (like timm's weight-standardized convs' ``eps``)
        self.rel = RelBias(n)
        self.norm = nn.LayerNorm(n)
        self.resolution = 3
        self.cache: dict[str, torch.Tensor] = {}

    def scale(self) -> float:
        return self.fc.gain / self.resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.rel(self.fc(x)) + x)


class Net(nn.Module):
    """Its forward has data-dependent control flow (not traced, run as written): it reads the block's attribute,
    calls its method and a grandchild's method, and reads a converted layer's own attribute at run time."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.block = Block(n)
        self.head = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if bool(y.sum() > 1e9):  # data-dependent: torch.fx cannot trace this forward
            y = y * 2
        y = y * (self.block.scale() * self.block.resolution / self.block.fc.gain)  # = y
        y = y + 0.0 * self.block.rel.get_bias()
        assert self.block.norm.normalized_shape == (self.head.in_features,)
        self.block.cache["last"] = y.detach()
        return self.head(y)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((out - ref).pow(2).sum().item(), 1e-30))


@pytest.mark.parametrize("norm_int8", [False, True])
def test_model_code_reads_attributes_and_calls_methods_of_rewritten_and_swapped_modules(norm_int8: bool) -> None:
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(16, 8)
    qm = qt.prepare(m, overrides={nn.LayerNorm: "w8a8"} if norm_int8 else None)
    block = qm.block
    assert isinstance(block, torch.fx.GraphModule) and isinstance(block, Block)  # rewritten, still a Block
    assert isinstance(block.rel, torch.fx.GraphModule) and isinstance(block.rel, RelBias)
    assert isinstance(block.fc, QuantLayer) and block.fc.gain == 0.5
    assert isinstance(block.norm, QuantNorm) == norm_int8
    torch.testing.assert_close(block.rel.get_bias(), m.block.rel.get_bias(), rtol=0, atol=0)
    assert "block.rel.index" not in qm.state_dict()  # a non-persistent buffer stays out of the state_dict
    with fake_quant_disabled(qm), torch.no_grad():
        torch.testing.assert_close(qm(x), m(x), atol=1e-5, rtol=1e-5)
    qt.calibrate(qm, [x], progress=False)
    q = qt.convert(qm)  # a deep copy: the rewritten classes and attributes survive it
    assert type(q.block).__name__ == "Block" and isinstance(q.block, Block) and q.block.resolution == 3
    assert isinstance(q.block.fc, Int8Layer) and q.block.fc.gain == 0.5 and q.block.fc.in_features == 8
    assert isinstance(q.block.norm, Int8Norm) == norm_int8 and q.block.norm.normalized_shape == (8,)
    assert q.block.cache is not qm.block.cache
    with torch.no_grad():
        ref = m.double()(x.double())
        assert _sqnr(ref, qm(x)) > 25
        assert _sqnr(ref, q(x)) > 25
    assert "last" in q.block.cache
    q2 = copy.deepcopy(q)
    assert q2.block.rel.bias_shape == (1, 8) and isinstance(q2.block.rel, RelBias)


@pytest.fixture(scope="module")
def timm_mod():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("name,size,kw", [
    ("efficientvit_m0", 32, {"img_size": 32}),  # reads self.attn.resolution of a rewritten attention
    ("coatnet_nano_rw_224", 32, {"img_size": 32}),  # RelPosBias.forward calls self.get_bias()
    ("vit_relpos_small_patch16_224", 32, {"img_size": 32, "depth": 2}),  # RelPosBias.get_bias() from the attention
])
def test_timm_models_reading_rewritten_modules_convert(timm_mod, name: str, size: int, kw: dict) -> None:
    torch.manual_seed(0)
    m = timm_mod.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, size, size)
    qm = qt.calibrate(qt.prepare(m), [x], progress=False)
    q = qt.convert(qm)
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _sqnr(ref, out) > 10


class MaskedAttention(nn.Module):
    """timm's window attention shape: ``forward(x, mask=None)`` tests the mask (a trace follows one branch)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(n, 3 * n)
        self.proj = nn.Linear(n, n)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = q @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        return x + self.proj(attn.softmax(-1) @ v)


class TwoBlocks(nn.Module):
    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.a = MaskedAttention(n)
        self.b = MaskedAttention(n)
        self.register_buffer("mask", torch.triu(torch.full((5, 5), -1e4), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x), mask=self.mask)


def test_forward_specialized_on_a_none_default_is_rewritten_with_the_original_for_other_values() -> None:
    torch.manual_seed(0)
    m = TwoBlocks().eval()
    x = torch.randn(4, 5, 8)
    qm = qt.prepare(m)
    assert {op.op for op in qt.float_ops(qm)} <= {"softmax"}  # the matmuls and the residual add are lifted
    assert isinstance(qm.a, torch.fx.GraphModule) and isinstance(qm.a, MaskedAttention)
    with fake_quant_disabled(qm), torch.no_grad(), pytest.warns(UserWarning, match="mask=Tensor.*original forward"):
        torch.testing.assert_close(qm(x), m(x), atol=1e-6, rtol=1e-6)  # b called with a mask: the original forward
    with pytest.warns(UserWarning, match="never ran"):  # b's lifted ops never ran: they go back to float
        qt.calibrate(qm, [x], progress=False)
        q = qt.convert(qm)
    assert any(isinstance(mod, qt.nn.Int8MatMul) for mod in q.a.modules())
    with torch.no_grad():
        ref = m.double()(x.double())
        assert _sqnr(ref, q(x)) > 25
        y = torch.randn(4, 5, 8)
        torch.testing.assert_close(q.a(y, mask=None), q.a(y))  # the default given explicitly: the rewritten graph


def test_rewritten_root_stays_the_models_code_for_convert() -> None:
    """A model whose own forward is rewritten is still the user's model to ``convert``: its fast forward is built as
    one program (:mod:`qtoolkit.executor`), as for an unmodified root."""
    from qtoolkit import executor

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    q = qt.convert(qt.calibrate(qt.prepare(Block(8).eval()), [x], progress=False))
    assert isinstance(q, Block) and isinstance(q.__dict__.get("forward"), executor.ProgramForward)

"""Quantization-aware shifted-window attention (torchvision's Swin ``ShiftedWindowAttention`` and ``…V2``).

torchvision's Swin block calls a function with its ``qkv``/``proj`` weights (``F.linear`` on parameters) and
``matmul`` on the heads, so neither the layers nor the matmuls run as modules that ``prepare`` could swap.
:class:`QuantShiftedWindowAttention` computes the same thing — pad to whole windows, cyclic shift, window
partition, ``qkv`` projection, ``q·kᵀ`` plus the relative position bias and the shift mask, softmax,
``attn·v``, ``proj``, reverse — with :class:`~qtoolkit.nn.QuantLayer` projections and
:class:`~qtoolkit.nn.QuantMatMul` matmuls. Softmax, the bias and the mask stay float (as in TensorRT).

:class:`QuantShiftedWindowAttentionV2` is the twin of Swin V2's ``ShiftedWindowAttentionV2``: the same windows,
``qkv``/``proj`` and ``attn·v``, but cosine attention — ``normalize(q)·normalize(k)ᵀ`` (int8: both operands lie
in [-1, 1]) times the per-head ``exp(clamp(logit_scale, max=log 100))`` (float) — a ``qkv`` bias whose key part
is zero, and a relative position bias ``16·sigmoid(cpb_mlp(relative_coords_table))``. The ``cpb_mlp`` stays a
float ``nn.Sequential``: its input is a constant coordinate table (no activations to quantize) and it costs
``(2W-1)²·512·(2+heads)`` multiply-adds per block, nothing next to the window attention.

Example::

    >>> import torch
    >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
    >>> from qtoolkit.config import get_qconfig
    >>> from qtoolkit.toggles import fake_quant_disabled
    >>> f = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2).eval()
    >>> q = QuantShiftedWindowAttention(f, get_qconfig("w8a8"))
    >>> x = torch.randn(2, 7, 9, 16)                   # [B, H, W, C], not whole windows: padded
    >>> with fake_quant_disabled(q), torch.no_grad():
    ...     torch.allclose(q(x), f(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.nn.quant_attention import _linear
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantMatMul

__all__ = ["QuantShiftedWindowAttention", "QuantShiftedWindowAttentionV2", "window_attention_twin"]


def _shift_mask(ph: int, pw: int, win: list[int], shift: list[int], device: torch.device) -> Tensor:
    """``[windows, N, N]``: 0 between tokens of the same region before the cyclic shift, -100 across regions."""
    region = torch.zeros(ph, pw, device=device)
    count = 0
    for hs in (slice(0, -win[0]), slice(-win[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None)):
            region[hs, ws] = count
            count += 1
    region = region.view(ph // win[0], win[0], pw // win[1], win[1]).permute(0, 2, 1, 3).reshape(-1, win[0] * win[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _real_tokens(h: int, w: int, ph: int, pw: int, win: list[int], shift: list[int], b: int, device: torch.device) -> Tensor:
    """``[b·windows, 1, N, 1]``: 1 for the input's tokens, 0 for the padding, laid out as the shifted windows."""
    real = torch.zeros(ph, pw, device=device)
    real[:h, :w] = 1.0
    if sum(shift) > 0:
        real = torch.roll(real, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    real = real.view(ph // win[0], win[0], pw // win[1], win[1]).permute(0, 2, 1, 3).reshape(-1, win[0] * win[1])
    return real.repeat(b, 1)[:, None, :, None]


class QuantShiftedWindowAttention(nn.Module):
    """Swin's shifted-window attention with int8 ``qkv``/``proj`` layers and int8 attention matmuls."""

    #: multiply the padding tokens' keys by 0 (the V2 twin: see :class:`QuantShiftedWindowAttentionV2`)
    zero_padded_keys = False

    def __init__(self, attn: nn.Module, qconfig: QConfig, qat: bool = False) -> None:
        super().__init__()
        if qconfig.mode != "static" or qconfig.activation is None:
            raise ValueError(f"{type(self).__name__} needs a static QConfig (int8 attention matmuls)")
        self.window_size = list(attn.window_size)
        self.shift_size = list(attn.shift_size)
        self.num_heads = attn.num_heads
        self.attention_dropout, self.dropout = attn.attention_dropout, attn.dropout
        self.qconfig = qconfig
        self.qkv = QuantLayer(_linear(attn.qkv.weight, attn.qkv.bias), qconfig, qat=qat)
        self.proj = QuantLayer(_linear(attn.proj.weight, attn.proj.bias), qconfig, qat=qat)
        self.scores = QuantMatMul(qconfig)
        self.context = QuantMatMul(qconfig)
        self.register_buffer("relative_position_index", attn.relative_position_index.clone())
        self._copy_position_bias(attn)

    def _copy_position_bias(self, attn: nn.Module) -> None:
        self.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table.detach().clone())

    def _gather_bias(self, table: Tensor) -> Tensor:
        """``[1, heads, N, N]`` from a ``[(2Wh-1)(2Ww-1), heads]`` table (torchvision's ``_get_relative_position_bias``)."""
        n = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def relative_position_bias(self) -> Tensor:
        """``[1, heads, N, N]``: the learned table, gathered per token pair."""
        return self._gather_bias(self.relative_position_bias_table)

    def attention_logits(self, q: Tensor, k: Tensor) -> Tensor:
        """``[windows·B, heads, N, N]`` logits before the position bias: scaled ``q·kᵀ`` (int8 matmul)."""
        return self.scores(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        win = self.window_size
        x = F.pad(x, (0, 0, 0, (win[1] - w % win[1]) % win[1], 0, (win[0] - h % win[0]) % win[0]))
        ph, pw = x.shape[1], x.shape[2]
        shift = [0 if win[0] >= ph else self.shift_size[0], 0 if win[1] >= pw else self.shift_size[1]]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        n_win = (ph // win[0]) * (pw // win[1])
        n = win[0] * win[1]
        x = x.view(b, ph // win[0], win[0], pw // win[1], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, n, c)
        qkv = self.qkv(x).reshape(b * n_win, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.zero_padded_keys and (ph > h or pw > w):
            k = k * _real_tokens(h, w, ph, pw, win, shift, b, x.device)
        attn = self.attention_logits(q, k) + self.relative_position_bias()
        if shifted:
            mask = _shift_mask(ph, pw, win, shift, x.device)
            attn = attn.view(b, n_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = F.softmax(attn, dim=-1)
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)
        x = self.context(attn, v).transpose(1, 2).reshape(b * n_win, n, c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(b, ph // win[0], pw // win[1], win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"


class _ZeroKeyGrad:
    """Gradient hook on the ``qkv`` bias: no gradient reaches its key part (torchvision never uses it)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[self.length : 2 * self.length] = 0
        return grad


class QuantShiftedWindowAttentionV2(QuantShiftedWindowAttention):
    """Swin V2's cosine shifted-window attention with int8 ``qkv``/``proj`` layers and int8 attention matmuls.

    The ``qkv`` bias's key part is zeroed once here (torchvision zeroes it on a copy in every forward); under
    QAT a gradient hook keeps it zero. ``logit_scale``, the ``cpb_mlp`` position bias, the mask and softmax
    stay float.

    The keys of the padding tokens (input not a whole number of windows) are multiplied by 0: in torchvision
    they are ``W_k·0 + 0``, exactly 0, and ``normalize`` keeps them 0; an int8 kernel's output for a zero row
    can be 1e-8 instead, which ``normalize`` would blow up to a unit vector that every real query attends to.

    Example::

        >>> import torch
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttentionV2
        >>> from qtoolkit.config import get_qconfig
        >>> from qtoolkit.toggles import fake_quant_disabled
        >>> f = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2).eval()
        >>> q = QuantShiftedWindowAttentionV2(f, get_qconfig("w8a8"))
        >>> x = torch.randn(2, 7, 9, 16)               # [B, H, W, C], not whole windows: padded
        >>> with fake_quant_disabled(q), torch.no_grad():
        ...     torch.allclose(q(x), f(x), atol=1e-5)
        True
    """

    zero_padded_keys = True

    def __init__(self, attn: nn.Module, qconfig: QConfig, qat: bool = False) -> None:
        super().__init__(attn, qconfig, qat=qat)
        if self.qkv.bias is not None:
            with torch.no_grad():
                length = self.qkv.bias.numel() // 3
                self.qkv.bias[length : 2 * length] = 0

    def _copy_position_bias(self, attn: nn.Module) -> None:
        self.logit_scale = nn.Parameter(attn.logit_scale.detach().clone())
        self.cpb_mlp = copy.deepcopy(attn.cpb_mlp)
        self.register_buffer("relative_coords_table", attn.relative_coords_table.clone())

    def relative_position_bias(self) -> Tensor:
        """``[1, heads, N, N]``: ``16·sigmoid`` of the float ``cpb_mlp`` on the log-spaced coordinate table."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(self._gather_bias(table))

    def attention_logits(self, q: Tensor, k: Tensor) -> Tensor:
        """Cosine logits: ``normalize(q)·normalize(k)ᵀ`` (int8 matmul) times ``exp(min(logit_scale, log 100))``."""
        cos = self.scores(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        return cos * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def forward(self, x: Tensor) -> Tensor:
        bias = getattr(self.qkv, "bias", None) if self.training and torch.is_grad_enabled() else None
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            # (re-)registered lazily: deepcopy and pickling drop tensor hooks
            if not any(isinstance(h, _ZeroKeyGrad) for h in (bias._backward_hooks or {}).values()):
                bias.register_hook(_ZeroKeyGrad(bias.numel() // 3))
        return super().forward(x)


def window_attention_twin(module: nn.Module) -> type[QuantShiftedWindowAttention] | None:
    """The quantized twin's class for torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``
    (exact types; torchvision is not imported), else None."""
    t = type(module)
    if t.__module__ != "torchvision.models.swin_transformer":
        return None
    return {"ShiftedWindowAttention": QuantShiftedWindowAttention,
            "ShiftedWindowAttentionV2": QuantShiftedWindowAttentionV2}.get(t.__name__)

"""Quantization-aware ``nn.MultiheadAttention``: int8 projections and int8 attention matmuls.

:class:`QuantMultiheadAttention` replaces an ``nn.MultiheadAttention`` (torchvision's ViT encoder, any
transformer built on it) with the same computation, written out so that every GEMM gets quantizers:

* ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` — :class:`~qtoolkit.nn.QuantLayer` Linear layers (int8
  weights per output channel), built from ``in_proj_weight`` (or the separate ``q/k/v_proj_weight``);
* ``scores`` — :class:`~qtoolkit.nn.QuantMatMul` for ``q @ kᵀ`` (both operands fake-quantized), scaled by
  ``1/√head_dim`` in float; masks added; softmax in float;
* ``context`` — :class:`~qtoolkit.nn.QuantMatMul` for ``softmax(...) @ v``.

``convert`` turns the children into :class:`~qtoolkit.nn.Int8Layer` / :class:`~qtoolkit.nn.Int8MatMul`; the
container stays (its ``forward`` only reshapes). Softmax and the scaling stay float, as in TensorRT's
explicit-quantization attention. Not supported (the module is left float and reported by ``prepare``):
``add_bias_kv``, ``add_zero_attn``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit.config import get_qconfig
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> q = QuantMultiheadAttention(mha, get_qconfig("w8a8"))
    >>> x = torch.randn(2, 5, 16)
    >>> from qtoolkit.toggles import fake_quant_disabled
    >>> with fake_quant_disabled(q), torch.no_grad():   # without quantization: the float module
    ...     torch.allclose(q(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantMatMul

__all__ = ["QuantMultiheadAttention", "QuantScaledDotProductAttention", "unsupported_attention_reason"]


def unsupported_attention_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be quantized by :class:`QuantMultiheadAttention` (None if it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach())
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin


class QuantMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with quantized projections and attention matmuls (same call signature).

    Args:
        mha: the float module (its parameters are copied).
        qconfig: a static QConfig (weights of the four projections, activations of every GEMM input).
        qat: keep the projections trainable as in QAT (no BatchNorm is involved).
    """

    def __init__(self, mha: nn.MultiheadAttention, qconfig: QConfig, qat: bool = False) -> None:
        super().__init__()
        reason = unsupported_attention_reason(mha)
        if reason is not None:
            raise ValueError(f"QuantMultiheadAttention: {reason}")
        if qconfig.mode != "static" or qconfig.activation is None:
            raise ValueError("QuantMultiheadAttention needs a static QConfig (int8 attention matmuls)")
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.qconfig = qconfig
        b = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        self.q_proj = QuantLayer(_linear(wq, bq), qconfig, qat=qat)
        self.k_proj = QuantLayer(_linear(wk, bk), qconfig, qat=qat)
        self.v_proj = QuantLayer(_linear(wv, bv), qconfig, qat=qat)
        self.scores = QuantMatMul(qconfig)
        self.context = QuantMatMul(qconfig)
        self.out_proj = QuantLayer(_linear(mha.out_proj.weight, mha.out_proj.bias), qconfig, qat=qat)

    def _heads(self, t: Tensor, batch: int) -> Tensor:
        """``[B, L, E]`` -> ``[B, H, L, D]``."""
        return t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt = query.shape[0], query.shape[1]
        src = key.shape[1]
        q = self._heads(self.q_proj(query), bsz)
        k = self._heads(self.k_proj(key), bsz)
        v = self._heads(self.v_proj(value), bsz)
        scores = self.scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, L, S]
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # [B*H, L, S]
                attn_mask = attn_mask.reshape(bsz, self.num_heads, tgt, src)
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(bsz, 1, 1, src)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.context(attn, v).transpose(1, 2).reshape(bsz, tgt, self.embed_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class QuantScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` (lifted by ``prepare`` into :class:`~qtoolkit.nn.fused.ScaledDotProductAttention`)
    with int8 attention matmuls: ``scores`` (:class:`~qtoolkit.nn.QuantMatMul`, ``q @ kᵀ``), scaled by ``scale``
    (default ``1/√head_dim``) in float, mask added, softmax in float, ``context`` (``softmax(...) @ v``) — the same
    placement as :class:`QuantMultiheadAttention` and TensorRT's explicit-quantization attention. ``convert`` turns
    the two matmuls into :class:`~qtoolkit.nn.Int8MatMul`; this container stays.

    Args:
        sdpa: the float :class:`~qtoolkit.nn.fused.ScaledDotProductAttention` (its options are copied).
        qconfig: a static QConfig.

    Example::

        >>> from qtoolkit.config import get_qconfig
        >>> from qtoolkit.nn.fused import ScaledDotProductAttention
        >>> from qtoolkit.toggles import fake_quant_disabled
        >>> f = ScaledDotProductAttention(is_causal=True)
        >>> q = QuantScaledDotProductAttention(f, get_qconfig("w8a8"))
        >>> a, b, c = torch.randn(3, 2, 4, 5, 8).unbind(0)
        >>> with fake_quant_disabled(q):
        ...     torch.allclose(q(a, b, c), f(a, b, c), atol=1e-6)
        True
    """

    def __init__(self, sdpa: nn.Module, qconfig: QConfig) -> None:
        super().__init__()
        if qconfig.mode != "static" or qconfig.activation is None:
            raise ValueError("QuantScaledDotProductAttention needs a static QConfig (int8 attention matmuls)")
        self.qconfig = qconfig
        self.dropout_p, self.is_causal, self.scale = sdpa.dropout_p, sdpa.is_causal, sdpa.scale
        self.enable_gqa = getattr(sdpa, "enable_gqa", False)
        self.scores = QuantMatMul(qconfig)
        self.context = QuantMatMul(qconfig)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if self.enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        scores = self.scores(q, k.transpose(-2, -1)) * scale
        tgt, src = scores.shape[-2], scores.shape[-1]
        if self.is_causal or is_causal:
            causal = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout_p > 0:
            attn = F.dropout(attn, self.dropout_p)
        return self.context(attn, v)

    def extra_repr(self) -> str:
        return f"is_causal={self.is_causal}, scale={self.scale}"

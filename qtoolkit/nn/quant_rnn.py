"""Dynamically quantized ``nn.LSTM`` / ``nn.GRU`` (weights int8 per gate row, activations quantized per call).

:class:`QuantRNN` holds, for every layer and direction, two :class:`~qtoolkit.nn.QuantLayer` Linear layers —
``ih`` (input → gates, weight ``weight_ih``) and ``hh`` (hidden → gates, ``weight_hh``) — in ``"dynamic"``
(or ``"weight_only"``) mode, and runs the recurrence in float around them, exactly as ``nn.LSTM`` / ``nn.GRU``
define it (gate order ``i, f, g, o`` / ``r, z, n``). ``convert`` turns the layers into dynamic
:class:`~qtoolkit.nn.Int8Layer` s (int8 weights; each call quantizes its input with that call's range: the
whole input sequence of a layer at once for ``ih``, the hidden state at every step for ``hh``), which run on the
int8 kernels where available. Static quantization of the recurrent state is not offered: its range changes
with every step, which is why torch.ao and TensorRT quantize RNNs dynamically too.

Not supported (left float, reported by ``prepare``): ``proj_size > 0``; ``PackedSequence`` inputs raise.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit.config import get_qconfig
    >>> from qtoolkit.toggles import fake_quant_disabled
    >>> lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True).eval()
    >>> q = QuantRNN(lstm, get_qconfig("w8a8-dynamic"))
    >>> x = torch.randn(3, 5, 8)
    >>> with fake_quant_disabled(q), torch.no_grad():
    ...     torch.allclose(q(x)[0], lstm(x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.config import QConfig
from qtoolkit.nn.quant_attention import _linear
from qtoolkit.nn.quant_layer import QuantLayer

__all__ = ["QuantRNN", "unsupported_rnn_reason"]


def unsupported_rnn_reason(rnn: nn.Module) -> str | None:
    """Why ``rnn`` cannot be a :class:`QuantRNN` (None if it can)."""
    if type(rnn) not in (nn.LSTM, nn.GRU):
        return f"{type(rnn).__name__} is not an nn.LSTM / nn.GRU"
    if getattr(rnn, "proj_size", 0):
        return "LSTM with proj_size > 0 is not supported"
    return None


class QuantRNN(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` with int8 gate weights (dynamic or weight-only mode); same call signature."""

    def __init__(self, rnn: nn.Module, qconfig: QConfig) -> None:
        super().__init__()
        reason = unsupported_rnn_reason(rnn)
        if reason is not None:
            raise ValueError(f"QuantRNN: {reason}")
        if qconfig.mode not in ("dynamic", "weight_only"):
            raise ValueError(f"QuantRNN: quantize LSTM/GRU in 'dynamic' or 'weight_only' mode (e.g. preset "
                             f"'w8a8-dynamic'), got mode={qconfig.mode!r}: the recurrent state has no fixed range")
        self.kind = "lstm" if type(rnn) is nn.LSTM else "gru"
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.batch_first = rnn.num_layers, rnn.batch_first
        self.num_directions = 2 if rnn.bidirectional else 1
        self.dropout = float(rnn.dropout)
        self.qconfig = qconfig
        ih, hh = [], []
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                b_ih = getattr(rnn, "bias_ih" + sfx) if rnn.bias else None
                b_hh = getattr(rnn, "bias_hh" + sfx) if rnn.bias else None
                ih.append(QuantLayer(_linear(getattr(rnn, "weight_ih" + sfx), b_ih), qconfig))
                hh.append(QuantLayer(_linear(getattr(rnn, "weight_hh" + sfx), b_hh), qconfig))
        self.ih, self.hh = nn.ModuleList(ih), nn.ModuleList(hh)

    def _cell(self, gx: Tensor, h: Tensor, c: Tensor | None, hh: nn.Module) -> tuple[Tensor, Tensor | None]:
        gh = hh(h)
        if self.kind == "lstm":
            i, f, g, o = (gx + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None

    def forward(self, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):  # type: ignore[override]
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError("QuantRNN: PackedSequence inputs are not supported; pass a padded tensor")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)  # [T, B, F]
        steps, batch = x.shape[0], x.shape[1]
        n_states = self.num_layers * self.num_directions
        if hx is None:
            h0 = x.new_zeros(n_states, batch, self.hidden_size)
            c0 = x.new_zeros(n_states, batch, self.hidden_size) if self.kind == "lstm" else None
        else:
            h0, c0 = hx if self.kind == "lstm" else (hx, None)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
        h_n, c_n = [], []
        seq = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                gx = self.ih[k](seq)  # the whole sequence's input projection at once: [T, B, gates]
                h, c = h0[k], (None if c0 is None else c0[k])
                out = [None] * steps
                order = range(steps - 1, -1, -1) if d else range(steps)
                for t in order:
                    h, c = self._cell(gx[t], h, c, self.hh[k])
                    out[t] = h
                outs.append(torch.stack(out))  # type: ignore[arg-type]
                h_n.append(h)
                c_n.append(c)
            seq = torch.cat(outs, -1) if self.num_directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                seq = F.dropout(seq, self.dropout)
        out = seq.squeeze(1) if unbatched else (seq.transpose(0, 1) if self.batch_first else seq)
        hn = torch.stack(h_n)
        hn = hn.squeeze(1) if unbatched else hn
        if self.kind == "gru":
            return out, hn
        cn = torch.stack(c_n)  # type: ignore[arg-type]
        return out, (hn, cn.squeeze(1) if unbatched else cn)

    def extra_repr(self) -> str:
        return (f"{self.kind}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.num_directions == 2}, batch_first={self.batch_first}, mode={self.qconfig.mode}")

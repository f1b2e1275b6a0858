"""What the int8 kernels are told about a converted module: frozen parameter objects.

A converted module (:class:`qtoolkit.nn.Int8Layer`, :class:`qtoolkit.nn.Int8Add`) describes itself with
``kernel_params()``; :mod:`qtoolkit.kernels.dispatch` builds its prepacked state from that alone, so the
kernels never import the module classes (no import circle between ``kernels/`` and ``nn/``).

Example::

    >>> import torch
    >>> p = AddParams("add", None, 0, 255, 0.1, 0, 0.1, 0, 0.2, 0, float_output=False)
    >>> p.qmax - p.qmin
    255
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["LayerParams", "AddParams"]


@dataclass(frozen=True)
class LayerParams:
    """A converted weight layer, as the kernels need it (weights in the canonical out-channels-first layout)."""

    name: str
    kind: str  # a qtoolkit.layer_kinds name
    mode: str  # "static" | "dynamic" | "weight_only"
    act: Optional[str]  # fused activation: None | "relu" | "relu6"
    weight_codes: Tensor  # unpacked integer codes
    weight_scale: Tensor
    weight_zero_point: Tensor
    weight_qmin: int
    weight_qmax: int
    bias: Optional[Tensor]  # the float bias every execution adds (static: the int32 bias times s_x*s_w)
    geometry: dict[str, Any]  # stride / padding / dilation / groups (convolutions)
    act_qmin: int
    act_qmax: int
    act_symmetric: bool
    input_scale: float  # static mode
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    float_output: bool  # the output leaves the int8 graph: float from the accumulator, not requantized


@dataclass(frozen=True)
class AddParams:
    """A converted residual add."""

    name: str
    act: Optional[str]
    qmin: int
    qmax: int
    lhs_scale: float
    lhs_zero_point: int
    rhs_scale: float
    rhs_zero_point: int
    output_scale: float
    output_zero_point: int
    float_output: bool
    donate: Optional[int] = None  # operand (0 / 1) the graph proved dead after the add: reusable in place

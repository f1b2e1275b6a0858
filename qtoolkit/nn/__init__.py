"""Quantized layers: fused float forms, prepared (fake-quant) twins, converted int8 modules."""

from qtoolkit.nn.fused import Activation, Add, Cat, Einsum, FusedLayer, MatMul, Mul, PadSame, ScaledDotProductAttention
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.int8_ops import Int8Activation, Int8Cat, Int8Einsum, Int8MatMul, Int8Mul, Int8Norm
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_attention import QuantMultiheadAttention, QuantScaledDotProductAttention
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.nn.quant_ops import QuantActivation, QuantCat, QuantEinsum, QuantMatMul, QuantMul, QuantNorm
from qtoolkit.nn.quant_rnn import QuantRNN
from qtoolkit.nn.quant_window_attention import QuantShiftedWindowAttention, QuantShiftedWindowAttentionV2

__all__ = [
    "Activation", "Add", "Cat", "Einsum", "FusedLayer", "Int8Activation", "Int8Add", "Int8Cat", "Int8Einsum",
    "Int8Layer", "Int8MatMul", "Int8Mul", "Int8Norm", "MatMul", "Mul", "QuantActivation", "QuantAdd", "QuantCat",
    "QuantEinsum", "QuantLayer", "QuantMatMul", "QuantMul", "QuantMultiheadAttention", "QuantNorm", "QuantRNN",
    "QuantShiftedWindowAttention", "QuantShiftedWindowAttentionV2", "PadSame", "ScaledDotProductAttention",
    "QuantScaledDotProductAttention",
]

"""Quantized layers: fused float forms, prepared (fake-quant) twins, converted int8 modules."""

from qtoolkit.nn.fused import Add, FusedLayer
from qtoolkit.nn.int8_add import Int8Add
from qtoolkit.nn.int8_layer import Int8Layer
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer

__all__ = ["Add", "FusedLayer", "Int8Add", "Int8Layer", "QuantAdd", "QuantLayer"]

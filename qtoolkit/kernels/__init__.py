"""Integer CPU kernels on plain ``torch.int8``/``torch.uint8`` tensors.

* :mod:`qtoolkit.kernels.onednn` — oneDNN int8 Conv2d / Linear (``torch.ops.onednn.*``),
  with fused bias, ReLU, residual sum(+ReLU) and fp32 or requantized uint8/int8 output.
"""

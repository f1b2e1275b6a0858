"""Integer CPU kernels on plain ``torch.int8``/``torch.uint8`` tensors.

* :mod:`qtoolkit.kernels.onednn` — oneDNN int8 Conv2d / Linear (``torch.ops.onednn.*``),
  with fused bias, ReLU, residual sum(+ReLU) and fp32 or requantized uint8/int8 output.
* :mod:`qtoolkit.kernels.qtensor` — :class:`~qtoolkit.kernels.qtensor.QuantizedActivation`, the
  uint8 activation carrier passed between converted modules.
* :mod:`qtoolkit.kernels.dispatch` — the ``"fast"`` execution of converted modules (prepacking,
  the per-layer exact strategy — direct or split where u8×s8 saturates —, int8 activations between
  layers, residual adds, fallback).
* :mod:`qtoolkit.kernels.cpuinfo` — :func:`~qtoolkit.kernels.cpuinfo.cpu_report`, the CPU and the
  probes' findings in one line.
"""

"""One line describing the CPU for benchmark headers and bug reports (model, int8 ISA flags, oneDNN's
ISA cap and what :mod:`qtoolkit.kernels.onednn`'s probes found).

Example::

    >>> from qtoolkit.kernels.cpuinfo import cpu_report
    >>> cpu_report().startswith("CPU: ")
    True
"""

from __future__ import annotations

import os
import platform

import torch

from qtoolkit.kernels import dnnl_ext, onednn

__all__ = ["cpu_report"]


def cpu_report() -> str:
    """One line for benchmark headers and bug reports: the CPU (``/proc/cpuinfo`` model name and the ISA
    flags that matter for int8), oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``) and what the probes found.

    Example::

        >>> "u8s8 saturates" in cpu_report()
        True
    """
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = model or platform.processor() or "?"
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    sat = ", ".join(f"{k} {'yes' if onednn.saturates_u8s8(k) else 'no'}" for k in onednn.KERNEL_CLASSES) if onednn.is_available() else "n/a"
    return (
        f"CPU: {model}; flags: {' '.join(isa) or '(none of avx2/avx512f/vnni/amx)'}; "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}; oneDNN int8 ops: "
        f"{'yes' if onednn.is_available() else 'no'}; u8s8 saturates (probed): {sat}; conv kernel: {dnnl_ext.status()}; "
        f"torch {torch.__version__}"
    )

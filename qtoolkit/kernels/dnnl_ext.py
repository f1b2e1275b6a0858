"""qtoolkit's own int8 convolution kernel: oneDNN's C++ API with each layer's primitive built once per input shape.

torch's ``onednn::qconv_pointwise`` (what :func:`qtoolkit.kernels.onednn.qconv` calls) creates a oneDNN primitive
descriptor on every call: tens of microseconds per convolution, most of a small convolution's time at batch 1.
torch does not export oneDNN's API, so this module builds a small C++ extension (``csrc/dnnl_int8.cpp``) against
the system's oneDNN 2.x library (Debian/Ubuntu: ``apt-get install libdnnl-dev``; ``scripts/setup.sh`` does it where
it can) with :mod:`torch.utils.cpp_extension`.  One :class:`QConv` object per converted layer holds the int8
weights, per-channel output scales, bias, zero points and post-ops; per input shape it keeps the primitive, the
weights reordered for it and its argument map, so a call sets two pointers and runs.

Selection, by the environment variable ``QTOOLKIT_DNNL``:

* ``auto`` (default): used when it is built or can be built here (oneDNN 2.x headers and library, a C++
  compiler and ninja); the first build takes about a minute and is cached under ``$QTOOLKIT_CACHE``
  (default ``~/.cache/qtoolkit``) — ``python -m qtoolkit.kernels.dnnl_ext`` builds it ahead of time.
  Otherwise the torch ops run, and :func:`status` (printed by :func:`qtoolkit.kernels.cpuinfo.cpu_report`) says why.
* ``0``: never (the torch ops run).
* ``1``: required: an error if it cannot be built.

Exact like the torch ops: the same integer accumulation, the requantization in float32 and round-half-even; a layer
uses this kernel only where oneDNN has a JIT implementation for it and where its kernel class does not saturate
int16 on this CPU (probed: :func:`saturates`), otherwise the torch op runs it.  Both obey ``ONEDNN_MAX_CPU_ISA``.

Example::

    >>> import torch
    >>> from qtoolkit.kernels import dnnl_ext
    >>> ext = dnnl_ext.load()
    >>> if ext is not None:
    ...     conv = dnnl_ext.QConv(torch.ones(4, 8, 3, 3, dtype=torch.int8), torch.full((4,), 0.5), None,
    ...                           stride=1, padding=1, dilation=1, groups=1, x_zp=0, out_zp=0, out_dtype=torch.uint8)
    ...     x = torch.ones(1, 8, 5, 5, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    ...     int(conv.run(x)[0, 0, 2, 2])   # 8 channels * 9 taps * 1 * 1 * 0.5
    ... else:
    ...     36
    36
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = ["load", "status", "QConv", "QLinear", "saturates", "build_dir"]

_SRC = Path(__file__).with_name("csrc") / "dnnl_int8.cpp"
_OUT_KIND = {torch.float32: 0, torch.uint8: 1, torch.int8: 2}
_CL = torch.channels_last
_reason: Optional[str] = None


def _pair(v: Union[int, Sequence[int]]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _include_dir() -> Optional[Path]:
    """The directory holding ``oneapi/dnnl/dnnl.hpp`` of a oneDNN 2.x install, else None."""
    roots = [os.environ.get("QTOOLKIT_DNNL_ROOT"), os.environ.get("CONDA_PREFIX"), "/usr", "/usr/local"]
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            return inc
    return None


def _header_version(inc: Path) -> tuple[int, int, int]:
    text = (inc / "oneapi" / "dnnl" / "dnnl_version.h").read_text()
    v = [int(re.search(rf"#define DNNL_VERSION_{k}\s+(\d+)", text).group(1)) for k in ("MAJOR", "MINOR", "PATCH")]  # type: ignore[union-attr]
    return v[0], v[1], v[2]


def build_dir() -> Path:
    """Where the extension is built and cached: ``$QTOOLKIT_CACHE/dnnl-<hash of source, torch, python>``."""
    key = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:12]
    base = Path(os.environ.get("QTOOLKIT_CACHE", Path.home() / ".cache" / "qtoolkit"))
    return base / f"dnnl-{key}"


def _build(verbose: bool) -> Any:
    global _reason
    inc = _include_dir()
    if inc is None:
        _reason = "no oneDNN headers (oneapi/dnnl/dnnl.hpp) found: apt-get install libdnnl-dev, or set QTOOLKIT_DNNL_ROOT"
        return None
    major, minor, patch = _header_version(inc)
    if major != 2:
        _reason = f"the oneDNN found at {inc} is {major}.{minor}.{patch}; this kernel is written for oneDNN 2.x"
        return None
    out = build_dir()
    built = out / "qtoolkit_dnnl.so"
    if built.is_file():  # cached build of this exact source, torch and python: import it directly
        spec = importlib.util.spec_from_file_location("qtoolkit_dnnl", built)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    bindir = str(Path(sys.executable).parent)  # pip's ninja lives beside the interpreter (a venv need not be active)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        _reason = "no C++ compiler or ninja on PATH to build the oneDNN extension"
        return None
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" is not news here
    from torch.utils import cpp_extension

    out.mkdir(parents=True, exist_ok=True)
    # torch ships oneDNN 3.x headers in its own include directory; a directory holding only the system's
    # oneapi/ tree goes first on the include path so the 2.x headers win.
    shadow = out / "include"
    shadow.mkdir(exist_ok=True)
    link = shadow / "oneapi"
    if not link.exists():
        try:
            link.symlink_to(inc / "oneapi", target_is_directory=True)
        except FileExistsError:
            pass
    print(f"[qtoolkit] building the oneDNN {major}.{minor} int8 kernel extension in {out} (once, about a minute)",
          file=sys.stderr)  # fmt: skip
    lib_dir = inc.parent / "lib"
    ldflags = ["-ldnnl"] + ([f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"] if (lib_dir / "libdnnl.so").exists() else [])
    for stale in out.parent.glob("dnnl-*"):  # builds of other sources / torch versions
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    return cpp_extension.load(
        "qtoolkit_dnnl",
        [str(_SRC)],
        extra_cflags=["-O3", "-ffp-contract=off"],  # strict float32: the add replays the fake-quant arithmetic
        extra_include_paths=[str(shadow)],
        extra_ldflags=ldflags,
        build_directory=str(out),
        verbose=verbose,
    )


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False) -> Any:
    """The compiled extension module (built on first use and cached), or None with :func:`status` saying why.

    Raises ``RuntimeError`` when ``QTOOLKIT_DNNL=1`` and it cannot be built or loaded.
    """
    global _reason
    mode = os.environ.get("QTOOLKIT_DNNL", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        _reason = "disabled by QTOOLKIT_DNNL=0"
        return None
    if mode not in ("auto", "1", "on", "true", "yes"):
        raise ValueError(f"QTOOLKIT_DNNL must be 'auto', '1' or '0', got {mode!r}")
    try:
        ext = _build(verbose)
    except Exception as e:  # noqa: BLE001 - a failed build is reported, the torch ops run
        _reason = f"building the oneDNN extension failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        ext = None
    if ext is None and mode != "auto":
        raise RuntimeError(f"QTOOLKIT_DNNL={mode} but the oneDNN int8 extension is unavailable: {_reason}")
    if ext is not None:
        _reason = None
    return ext


def status() -> str:
    """One line: which int8 convolution kernel converted layers use here, and why.

    Example::

        >>> status().startswith(("qtoolkit oneDNN", "torch onednn ops"))
        True
    """
    ext = load()
    if ext is not None:
        return f"qtoolkit oneDNN {ext.version()} extension (primitives cached per layer and input shape)"
    return f"torch onednn ops ({_reason})"


def _operands(weight: Tensor, out_scales: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> tuple:
    """The loaded extension and a kernel's tensors as it takes them (int8 weight, float32 scales and bias)."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"the oneDNN int8 extension is unavailable: {status()}")
    if out_dtype not in _OUT_KIND:
        raise ValueError(f"out_dtype must be torch.uint8, torch.int8 or torch.float32, got {out_dtype}")
    b = None if bias is None else bias.detach().to(torch.float32).reshape(-1).contiguous()
    return ext, weight.detach().to(torch.int8).contiguous(), out_scales.detach().to(torch.float32).reshape(-1).contiguous(), b


class QConv:
    """One int8 Conv2d with fixed quantization parameters, on the extension's cached oneDNN primitives.

    ``run(x)`` computes, per output channel ``oc``: ``acc = Σ (x - x_zp)·w`` (int32, exact),
    ``y = out_scales[oc] · (acc + bias[oc])`` in float32 (``bias`` in accumulator units), then the post-ops
    (``sum``: ``y += sum_scale · (acc_codes - sum_zp)``; ``relu``), then ``round(y) + out_zp`` (rounded before the
    zero point is added, as the fake-quant model rounds; an ``eltwise_round`` post-op) saturated to
    ``out_dtype`` (``torch.uint8`` / ``torch.int8``), or ``y`` itself for ``torch.float32``.

    Args:
        weight: ``[OC, IC/groups, kH, kW]`` ``torch.int8`` codes.
        out_scales: ``[OC]`` (or ``[1]``) float scales from the int32 accumulator to the output's units.
        bias: ``[OC]`` float bias in accumulator units, or None.
        stride, padding, dilation, groups: the convolution's geometry (PyTorch's conventions).
        x_zp: the input codes' zero point (uint8 space); out_zp: the output's.
        out_dtype: ``torch.uint8``, ``torch.int8`` or ``torch.float32``.
        relu: ReLU before the output rounding (after the sum).
        sum_scale, sum_zp: a residual accumulator added in place (``run(x, acc)``), or ``sum_scale=None``.

    Raises ``RuntimeError`` if the extension is not available (:func:`load`).
    """

    def __init__(self, weight: Tensor, out_scales: Tensor, bias: Optional[Tensor], *, stride: Union[int, Sequence[int]],
                 padding: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]], groups: int, x_zp: int, out_zp: int,
                 out_dtype: torch.dtype, relu: bool = False, sum_scale: Optional[float] = None, sum_zp: int = 0) -> None:  # fmt: skip
        ext, w, os_, b = _operands(weight, out_scales, bias, out_dtype)
        self.out_dtype = out_dtype
        self._k = ext.QConv(w, os_, b, _pair(stride), _pair(padding), _pair(dilation), int(groups), int(x_zp), int(out_zp),
                            _OUT_KIND[out_dtype], bool(relu), sum_scale is not None, float(sum_scale or 0.0), int(sum_zp))  # fmt: skip
        self.run = self._k.run  # bound once: ``run(x, acc=None)`` straight into C++

    def impl(self, n: int, h: int, w: int) -> str:
        """oneDNN's implementation name for an input of ``[n, C, h, w]`` (builds that shape's primitive)."""
        return self._k.impl(int(n), int(h), int(w))


class QLinear:
    """One int8 Linear (``[M, IN]`` uint8 codes × ``[OUT, IN]`` int8 weight) on the extension's cached oneDNN matmul.

    The same numerics and arguments as :class:`QConv` without the geometry; ``run(x)`` takes a 2-D input.
    """

    def __init__(self, weight: Tensor, out_scales: Tensor, bias: Optional[Tensor], *, x_zp: int, out_zp: int,
                 out_dtype: torch.dtype, relu: bool = False, sum_scale: Optional[float] = None, sum_zp: int = 0) -> None:  # fmt: skip
        ext, w, os_, b = _operands(weight, out_scales, bias, out_dtype)
        self.out_dtype = out_dtype
        self._k = ext.QLinear(w, os_, b, int(x_zp), int(out_zp), _OUT_KIND[out_dtype], bool(relu), sum_scale is not None,
                              float(sum_scale or 0.0), int(sum_zp))  # fmt: skip
        self.run = self._k.run

    def impl(self, m: int) -> str:
        """oneDNN's implementation name for an input of ``[m, IN]`` (builds that shape's primitive)."""
        return self._k.impl(int(m))


@functools.lru_cache(maxsize=8)
def saturates(kind: str) -> bool:
    """True if the extension's u8×s8 kernel of ``kind`` adds pairs of products in int16 with saturation here.

    ``kind``: ``"conv"``, ``"grouped"``, ``"depthwise"`` or ``"linear"`` (as
    :func:`qtoolkit.kernels.onednn.saturates_u8s8`).
    Probed once with every input code 255 and every weight 127, whose exact result is known; True (assume the
    worst) if the extension is unavailable.
    """
    if load() is None:
        return True
    if kind == "linear":
        lin = QLinear(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8), None, x_zp=0, out_zp=0,
                      out_dtype=torch.float32)  # fmt: skip
        try:
            return bool((lin.run(torch.full((4, 64), 255, dtype=torch.uint8)) != 64 * 255 * 127).any())
        except RuntimeError:
            return True
    groups, cin, cout = {"conv": (1, 32, 16), "grouped": (4, 64, 16), "depthwise": (32, 32, 32)}[kind]
    x = torch.full((1, cin, 3, 3), 255, dtype=torch.uint8).contiguous(memory_format=_CL)
    w = torch.full((cout, cin // groups, 1, 1), 127, dtype=torch.int8)
    conv = QConv(w, torch.ones(cout), None, stride=1, padding=0, dilation=1, groups=groups, x_zp=0, out_zp=0,
                 out_dtype=torch.float32)  # fmt: skip
    try:
        y = conv.run(x)
    except RuntimeError:
        return True
    return bool((y != (cin // groups) * 255 * 127).any())


def main() -> None:
    """``python -m qtoolkit.kernels.dnnl_ext``: build the extension now and print what the converted layers use."""
    load(verbose="-v" in sys.argv)
    print(status())


if __name__ == "__main__":
    main()

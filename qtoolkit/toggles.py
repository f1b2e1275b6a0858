"""Model-wide switches for observers, fake quantization and BN statistics.

QAT schedules (and calibration) flip these; each function returns the model and
each context manager restores the previous per-quantizer state on exit.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare
    >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
    >>> with fake_quant_disabled(m):
    ...     y = m(torch.randn(2, 4))          # float forward, observers still record
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_layer import QuantLayer

__all__ = [
    "quantizers",
    "enable_observers",
    "disable_observers",
    "enable_fake_quant",
    "disable_fake_quant",
    "freeze_bn",
    "unfreeze_bn",
    "observers_disabled",
    "fake_quant_disabled",
]


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """``(qualified_name, FakeQuantize)`` for every quantizer in ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> [name for name, _ in quantizers(m)]
        ['0.weight_quantizer', '0.input_quantizer', '0.output_quantizer']
    """
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            yield name, m


def enable_observers(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn range recording on (or off) in every quantizer; returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> _ = enable_observers(m, False)
        >>> {bool(fq.observer_enabled) for _, fq in quantizers(m)}
        {False}
        >>> _ = enable_observers(m)
        >>> {bool(fq.observer_enabled) for _, fq in quantizers(m)}
        {True}
    """
    for _, fq in quantizers(model):
        fq.enable_observer(enabled)
    return model


def disable_observers(model: nn.Module) -> nn.Module:
    """Freeze every quantizer's range (QAT: after N epochs); returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> {bool(fq.observer_enabled) for _, fq in quantizers(disable_observers(m))}
        {False}
    """
    return enable_observers(model, False)


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn fake quantization on (or off: float forward) in every quantizer; returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> x = torch.randn(2, 4)
        >>> float_model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = float_model.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("0.weight", "0.bias")})
        >>> with torch.no_grad():
        ...     torch.equal(enable_fake_quant(m, False)(x), float_model(x))
        True
    """
    for _, fq in quantizers(model):
        fq.enable_fake_quant(enabled)
    return model


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Float forward in every quantizer (observers keep recording); returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> {bool(fq.fake_quant_enabled) for _, fq in quantizers(disable_fake_quant(m))}
        {False}
    """
    return enable_fake_quant(model, False)


def freeze_bn(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop updating BN running statistics in QAT layers with live BN (use running stats); returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), qat=True).train()
        >>> bn = next(mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
        >>> before = bn.running_mean.clone()
        >>> _ = freeze_bn(m)(torch.randn(2, 3, 8, 8))
        >>> torch.equal(bn.running_mean, before)
        True
    """
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze_bn(frozen)
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Update BN running statistics again in QAT layers with live BN; returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), qat=True).train()
        >>> bn = next(mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
        >>> before = bn.running_mean.clone()
        >>> _ = unfreeze_bn(freeze_bn(m))(torch.randn(2, 3, 8, 8))
        >>> torch.equal(bn.running_mean, before)
        False
    """
    return freeze_bn(model, False)


@contextmanager
def _saved_flags(model: nn.Module) -> Iterator[None]:
    saved = [(fq, int(fq.observer_enabled), int(fq.fake_quant_enabled)) for _, fq in quantizers(model)]
    try:
        yield
    finally:
        for fq, obs, fake in saved:
            fq.observer_enabled.fill_(obs)
            fq.fake_quant_enabled.fill_(fake)


@contextmanager
def observers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context: observers off (e.g. evaluation during QAT); restored on exit.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> flags = lambda: [bool(fq.observer_enabled) for _, fq in quantizers(m)]
        >>> before = flags()
        >>> with observers_disabled(m):
        ...     inside = flags()
        >>> set(inside), flags() == before
        ({False}, True)
    """
    with _saved_flags(model):
        disable_observers(model)
        yield model


@contextmanager
def fake_quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context: float forward (fake quantization off); restored on exit.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from qtoolkit import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 4)), qat=True)
        >>> flags = lambda: [bool(fq.fake_quant_enabled) for _, fq in quantizers(m)]
        >>> before = flags()
        >>> with fake_quant_disabled(m):
        ...     inside = flags()
        >>> set(inside), flags() == before
        ({False}, True)
    """
    with _saved_flags(model):
        disable_fake_quant(model)
        yield model

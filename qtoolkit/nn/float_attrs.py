"""What a twin keeps of the float module it replaces: the plain attributes model code reads.

A model's forward may read more of a layer than its call: ``self.proj.in_features``, ``self.conv.eps`` on a
weight-standardized conv, ``self.norm.normalized_shape``. The prepared and converted twins
(:class:`~qtoolkit.nn.QuantLayer` → :class:`~qtoolkit.nn.Int8Layer`, :class:`~qtoolkit.nn.QuantNorm` →
:class:`~qtoolkit.nn.Int8Norm`) carry the float module's plain instance attributes (numbers, strings, tuples,
...; not tensors, not submodules, not ``nn.Module``'s own bookkeeping) unless the twin defines the name itself.
``weight`` / ``bias`` are the twins' own (dequantized, read-only on converted layers).

Example::

    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> conv.eps = 1e-6                                  # a subclass's own attribute
    >>> attrs = float_attributes(conv)
    >>> attrs["eps"], attrs["padding_mode"], "weight" in attrs
    (1e-06, 'zeros', False)
    >>> twin = nn.Identity()
    >>> keep_float_attributes(twin, attrs)
    >>> twin.eps, twin.out_channels
    (1e-06, 8)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["FLOAT_ATTRS", "float_attributes", "keep_float_attributes"]

#: the instance attribute naming what a twin took over from its float module (a tuple of names)
FLOAT_ATTRS = "float_attribute_names"


def float_attributes(module: nn.Module) -> dict[str, Any]:
    """The plain instance attributes of ``module`` (not tensors, not modules, no ``_private`` names, not
    ``training``/``forward``), as a new dict.

    Example::

        >>> from torch import nn
        >>> sorted(float_attributes(nn.Linear(2, 3)))
        ['in_features', 'out_features']
    """
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in ("training", "forward", FLOAT_ATTRS)
            and not isinstance(v, (Tensor, nn.Module))}  # fmt: skip


def keep_float_attributes(twin: nn.Module, attrs: dict[str, Any]) -> None:
    """Set on ``twin`` each of ``attrs`` that it does not define itself (an instance attribute, parameter, buffer,
    submodule or class attribute of that name wins), and record their names in ``twin.float_attribute_names`` so a
    converted twin built from it takes them over too.

    Example::

        >>> from torch import nn
        >>> twin = nn.Linear(2, 2)
        >>> keep_float_attributes(twin, {"in_features": 99, "resolution": 7})
        >>> twin.in_features, twin.resolution, twin.float_attribute_names
        (2, 7, ('resolution',))
    """
    kept = []
    for k, v in attrs.items():
        if k in twin.__dict__ or k in twin._parameters or k in twin._buffers or k in twin._modules or hasattr(type(twin), k):
            continue
        twin.__dict__[k] = v
        kept.append(k)
    setattr(twin, FLOAT_ATTRS, tuple(kept))

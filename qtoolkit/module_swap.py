"""The one module-replacement walker ``prepare``, ``convert`` and the ONNX export use.

Example::

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    >>> swap_modules(m, lambda child, name: nn.Identity() if isinstance(child, nn.Linear) else None)
    ['0', '1.1']
    >>> m
    Sequential(
      (0): Identity()
      (1): Sequential(
        (0): ReLU()
        (1): Identity()
      )
    )
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["swap_modules"]


def swap_modules(module: nn.Module, replace: Callable[[nn.Module, str], nn.Module | None], prefix: str = "") -> list[str]:
    """Walk ``module``'s children depth-first; ``replace(child, qualified_name)`` returns a new module (put in the
    child's place, not descended into), the child itself (kept, not descended into) or None (descend into it).
    Returns the qualified names replaced, in order."""
    replaced: list[str] = []
    for cname, child in list(module.named_children()):
        name = f"{prefix}.{cname}" if prefix else cname
        new = replace(child, name)
        if new is None:
            replaced += swap_modules(child, replace, name)
        elif new is not child:
            setattr(module, cname, new)
            replaced.append(name)
    return replaced

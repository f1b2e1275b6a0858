"""The classes of containers whose forward :func:`qtoolkit.fuse_model` rewrites (``torch.fx`` graphs).

A rewritten container is an ``fx.GraphModule`` whose class also derives from the original class
(:func:`_rewritten_class`), so the model's code keeps working on it: methods, properties, class attributes and
``isinstance`` resolve through the original; its plain instance attributes survive deep copies; a forward rewritten
for arguments fixed to their defaults falls back to the original forward (warned once) when called with others.

Example::

    >>> import torch.fx as fx
    >>> from torch import nn
    >>> cls = _rewritten_class(nn.Sequential)
    >>> issubclass(cls, fx.GraphModule) and issubclass(cls, nn.Sequential)
    True
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn


def _keep_plain_attributes(source: dict, gm: nn.Module) -> None:
    """Give ``gm`` every instance attribute of ``source`` (a module's ``__dict__``) it lacks: the plain values model code
    reads from the module (``self.attn.resolution``, ``self.num_heads``, a cache dict) and its methods use."""
    for k, v in source.items():
        if k not in gm.__dict__ and k != "forward":
            gm.__dict__[k] = v


def _fixed_spec(root: nn.Module, fixed: dict[str, object]) -> tuple[tuple[str, int, object], ...]:
    """``(name, position among forward's arguments, default)`` of each argument the trace fixed."""
    import inspect

    if not fixed:
        return ()
    params = list(inspect.signature(type(root).forward).parameters.values())[1:]
    pos = {p.name: (i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else 1 << 30) for i, p in enumerate(params)}
    return tuple((k, pos[k], v) for k, v in fixed.items())


def _is_default(value: object, default: object) -> bool:
    return value is default or (type(value) is type(default) and isinstance(value, (bool, int, float, str)) and value == default)


class _RewrittenModule(fx.GraphModule):
    """Base of the class a container's rewritten forward gets (:func:`_rewritten_class`): a deep copy keeps the
    original's class name and plain attributes (``fx.GraphModule``'s own copy keeps only what its graph reads).

    A forward rewritten from a trace with arguments fixed to their defaults (``_qt_fixed``) runs the rewritten graph
    when they have them, and the original class's forward (on the same modules; functional ops float) otherwise,
    warning once per module."""

    _qt_fixed: tuple[tuple[str, int, object], ...] = ()
    _qt_original: type = nn.Module

    def recompile(self):  # type: ignore[no-untyped-def]
        out = super().recompile()
        fixed = self._qt_fixed
        if fixed:
            cls = type(self)
            graph_forward, original = cls.forward, self._qt_original.forward
            names = {name for name, _, _ in fixed}

            def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                for name, pos, default in fixed:
                    value = args[pos] if pos < len(args) else kwargs.get(name, default)
                    if not _is_default(value, default):
                        if not self.__dict__.get("_qt_warned"):
                            self.__dict__["_qt_warned"] = True
                            import warnings

                            warnings.warn(f"{type(self).__name__}.forward called with {name}={type(value).__name__}: prepare "
                                          f"rewrote it for {name}={default!r} (its adds / matmuls quantized); this call runs "
                                          "the original forward, its functional ops in float", stacklevel=2)
                        return original(self, *args, **kwargs)
                # the traced signature renames the fixed arguments (``mask_1``): at their defaults, they are left out
                return graph_forward(self, *args, **{k: v for k, v in kwargs.items() if k not in names})

            cls.forward = forward
        return out

    def _deepcopy_init(self):  # type: ignore[no-untyped-def]
        name = type(self).__name__

        def init(res: fx.GraphModule, fake: nn.Module, graph: fx.Graph) -> None:
            fx.GraphModule.__init__(res, fake, graph, class_name=name)
            _keep_plain_attributes(fake.__dict__, res)

        return init


class _ModuleInit(nn.Module):
    """Stands between ``fx.GraphModule`` and the original class in a rewritten container's MRO: ``GraphModule``'s
    ``super().__init__()`` initializes an ``nn.Module``, never calls the original constructor."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        nn.Module.__init__(self)


_REWRITTEN_CLASSES: dict[tuple[type, tuple], type] = {}


def _rewritten_class(orig: type, fixed: tuple[tuple[str, int, object], ...] = ()) -> type[fx.GraphModule]:
    """The ``fx.GraphModule`` class for a rewritten instance of ``orig``: a subclass of both, so the model's code
    keeps working on it: its methods (``self.rel_pos.get_bias()``), properties and class attributes resolve through
    the original class (``isinstance`` holds too), while ``forward`` is the rewritten graph's. Its ``__module__`` is
    ``fx.GraphModule``'s: duck typing by defining package (:mod:`qtoolkit.layer_kinds`) does not take it for the
    original, and ``convert`` treats it as the model's code (not one of qtoolkit's modules)."""
    if issubclass(orig, fx.GraphModule):
        if fixed:
            raise TypeError(f"{orig.__name__}: an fx.GraphModule traced with fixed arguments cannot be rewritten again")
        return fx.GraphModule
    cls = _REWRITTEN_CLASSES.get((orig, fixed))
    if cls is None:
        cls = type(orig.__name__, (_RewrittenModule, _ModuleInit, orig), {
            "__module__": fx.GraphModule.__module__, "__qualname__": orig.__name__, "_qt_fixed": fixed, "_qt_original": orig})
        _REWRITTEN_CLASSES[(orig, fixed)] = cls
    return cls


def _tests_none_default(root: nn.Module) -> bool:
    """True if ``forward`` tests ``arg is None`` for an argument that defaults to None (DLA's ``shortcut``): the trace
    sees a Proxy there and takes the not-None branch only, which calls without the argument would not run."""
    import inspect
    import re

    try:
        params = list(inspect.signature(type(root).forward).parameters.values())[1:]
        src = inspect.getsource(type(root).forward)
    except (TypeError, ValueError, OSError):
        return False
    return any(p.default is None and re.search(rf"\b{re.escape(p.name)}\s+is\s+(not\s+)?None\b", src) for p in params)


def _is_number_annotation(t: object) -> bool:
    """``int``, ``float``, ``bool``, ``str`` or a tuple / list of them (``shape: Tuple[int, int, int]``)."""
    import re
    import typing

    if isinstance(t, str):  # postponed annotation (``from __future__ import annotations``)
        inner = re.fullmatch(r"(?:typing\.)?(?:tuple|Tuple|list|List)\[(.*)\]", t.replace(" ", ""))
        names = inner.group(1).split(",") if inner else [t.strip()]
        return all(n in ("int", "float", "bool", "str", "...") for n in names)
    if t in (int, float, bool, str):
        return True
    origin = typing.get_origin(t)
    return origin in (tuple, list) and bool(typing.get_args(t)) and all(
        a is Ellipsis or _is_number_annotation(a) for a in typing.get_args(t))

"""Where reconstruction works: *units* (single layers or residual blocks) and *tied* activation quantizers.

Both are found by running the prepared model once on a probe batch (no model surgery, no tracing):

* a **unit** is a module called exactly once per forward with one tensor in and one tensor out — a
  :class:`~qtoolkit.nn.QuantLayer`, or (``granularity="block"``) the smallest container holding at most one
  residual :class:`~qtoolkit.nn.QuantAdd` and at most ``max_block_layers`` quantized layers (a ResNet
  ``BasicBlock`` / ``Bottleneck``, a MobileNet inverted residual); anything else is split into its children;
* **tied quantizers** observe the very same tensor object at the same in-place version (a conv's
  observe-only output quantizer, the next conv's input quantizer and a residual add's operand quantizer
  after it; not an in-place activation's input and output) with the same grid and
  the same calibrated qparams.  When reconstruction learns one of them they are all set together, so
  the converted model (which requantizes a layer's output to its output quantizer's grid) stays
  bit-faithful to the fake-quant model.

:func:`capture` collects a unit's input (and output) over calibration batches, stopping each forward as
soon as it has what it needs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model, model_device, tensor_version, to_device
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_add import QuantAdd
from qtoolkit.nn.quant_layer import QuantLayer

__all__ = ["Unit", "Probe", "probe", "find_units", "feeds", "capture", "FloatReference"]


_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten)


@dataclass
class Unit:
    """A module reconstructed as one piece."""

    name: str
    module: nn.Module
    layers: list[tuple[str, QuantLayer]] = field(default_factory=list)

    @property
    def activation_quantizers(self) -> list[tuple[str, FakeQuantize]]:
        """Static activation quantizers inside the unit (the ones that quantize, not observe-only)."""
        prefix = f"{self.name}." if self.name else ""
        return [
            (prefix + n, m) for n, m in self.module.named_modules()
            if isinstance(m, FakeQuantize) and m.role == "activation"
        ]


@dataclass
class Probe:
    """What one forward on a probe batch showed: calls per module and quantizers sharing a tensor."""

    calls: dict[int, int]
    simple: dict[int, bool]
    groups: list[list[FakeQuantize]]
    order: list[str] = field(default_factory=list)  # quantized layers in the order they first ran
    consumers: dict[int, list[nn.Module]] = field(default_factory=dict)  # id(tensor) -> modules it was passed to
    outputs: dict[int, int] = field(default_factory=dict)  # id(module) -> id(its output tensor)
    passthrough: set[int] = field(default_factory=set)  # ids of Identity-like modules that returned their input
    inputs: dict[int, int] = field(default_factory=dict)  # id(module) -> id(its first input tensor)
    first_call: dict[int, int] = field(default_factory=dict)  # id(module) -> index of its first call

    def group_of(self, fq: FakeQuantize) -> list[FakeQuantize]:
        for g in self.groups:
            if any(m is fq for m in g):
                return g
        return [fq]


def _same_grid(a: FakeQuantize, b: FakeQuantize) -> bool:
    return (
        a.spec == b.spec
        and a.is_calibrated and b.is_calibrated
        and a.scale.shape == b.scale.shape
        and bool(torch.equal(a.scale.detach(), b.scale.detach()))
        and bool(torch.equal(a.zero_point, b.zero_point))
    )


@torch.no_grad()
def probe(model: nn.Module, batch: Any) -> Probe:
    """Run ``model`` once on ``batch`` recording module calls and which quantizers see the same tensor."""
    calls: dict[int, int] = defaultdict(int)
    simple: dict[int, bool] = {}
    seen: list[tuple[FakeQuantize, Tensor, int | None]] = []
    alive: list[Any] = []  # every tensor seen is kept alive so that ids stay unique
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    consumers: dict[int, list[nn.Module]] = defaultdict(list)
    outputs: dict[int, int] = {}
    passthrough: set[int] = set()
    inputs: dict[int, int] = {}
    first_call: dict[int, int] = {}
    handles = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[id(mod)] += 1
        simple[id(mod)] = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
        first_call.setdefault(id(mod), len(first_call))
        if args and isinstance(args[0], Tensor):
            inputs.setdefault(id(mod), id(args[0]))
        alive.append(args)
        for a in args:
            if isinstance(a, Tensor):
                consumers[id(a)].append(mod)
        if isinstance(mod, FakeQuantize) and mod.role in ("activation", "output") and args:
            seen.append((mod, args[0], tensor_version(args[0])))
        if isinstance(mod, QuantLayer) and calls[id(mod)] == 1:
            order.append(names[id(mod)])

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        simple[id(mod)] = simple.get(id(mod), False) and isinstance(out, Tensor)
        alive.append(out)
        if isinstance(out, Tensor):
            outputs[id(mod)] = id(out)
            # Identity / eval-mode Dropout hand the very tensor on; an in-place activation (ReLU(inplace=True),
            # SiLU(inplace=True)) also returns its input object but changed it, so it is not a pass-through
            if args and out is args[0] and isinstance(mod, _PASSTHROUGH):
                passthrough.add(id(mod))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        call_model(model, to_device(batch_input(batch), model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # the same object at the same in-place version: an in-place activation's input and output are one object
    by_tensor: dict[tuple[int, int], list[FakeQuantize]] = defaultdict(list)
    for fq, t, version in seen:
        if version is None:  # inference-mode tensor: no version, not tied
            continue
        key = (id(t), version)
        if all(fq is not m for m in by_tensor[key]):
            by_tensor[key].append(fq)
    groups: list[list[FakeQuantize]] = []
    for members in by_tensor.values():
        while members:  # split by grid: only quantizers with identical qparams are tied
            head, rest = members[0], members[1:]
            same = [head] + [m for m in rest if _same_grid(head, m)]
            members = [m for m in rest if all(m is not s for s in same)]
            if len(same) > 1:
                groups.append(same)
    return Probe(dict(calls), simple, groups, order, dict(consumers), outputs, passthrough, inputs, first_call)


def _count(m: nn.Module, kind: type) -> int:
    return sum(1 for x in m.modules() if isinstance(x, kind))


def find_units(
    model: nn.Module, pr: Probe, granularity: str = "block", max_block_layers: int = 4
) -> tuple[list[Unit], list[str]]:
    """Units in the order they run and the quantized layers that fit in none
    (called more than once, or with several inputs): those keep round-to-nearest."""
    if granularity not in ("layer", "block"):
        raise ValueError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    units: list[Unit] = []
    left_out: list[str] = []

    def ok(m: nn.Module) -> bool:
        return pr.calls.get(id(m), 0) == 1 and pr.simple.get(id(m), False)

    def walk(module: nn.Module, prefix: str) -> None:
        for cname, child in module.named_children():
            name = f"{prefix}.{cname}" if prefix else cname
            n_layers = _count(child, QuantLayer)
            if n_layers == 0:
                continue
            if isinstance(child, QuantLayer):
                if ok(child):
                    units.append(Unit(name, child, [(name, child)]))
                else:
                    left_out.append(name)
                continue
            if (granularity == "block" and _count(child, QuantAdd) <= 1 and n_layers <= max_block_layers
                    and ok(child)):
                layers = [(f"{name}.{n}", m) for n, m in child.named_modules() if isinstance(m, QuantLayer)]
                units.append(Unit(name, child, layers))
                continue
            walk(child, name)

    walk(model, "")
    units.sort(key=lambda u: pr.first_call.get(id(u.module), 0))
    return units, left_out


def feeds(pr: Probe, first: Unit, second: Unit) -> bool:
    """Whether ``second``'s input is the very tensor ``first`` returned (a chain: ``second``'s inputs can be
    computed from ``first``'s without running the model from its input)."""
    out = pr.outputs.get(id(first.module))
    return out is not None and out == pr.inputs.get(id(second.module))


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def capture(
    model: nn.Module, unit: nn.Module, batches: Sequence[Any] | Iterable[Any], want_output: bool
) -> tuple[Tensor, Tensor | None]:
    """The unit's inputs (and outputs) over ``batches``, concatenated on the model's device."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        xs.append(args[0].detach().float())
        if not want_output:
            raise _Stop

    def post(mod: nn.Module, args: tuple, out: Tensor) -> None:
        ys.append(out.detach().float())
        raise _Stop

    h1 = unit.register_forward_pre_hook(pre)
    h2 = unit.register_forward_hook(post) if want_output else None
    device = model_device(model)
    try:
        for batch in batches:
            try:
                call_model(model, to_device(batch_input(batch), device))
            except _Stop:
                pass
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    return torch.cat(xs), (torch.cat(ys) if want_output else None)


class FloatReference:
    """The float model's weights and biases, kept aside while reconstruction rewrites them.

    ``with ref.active(model):`` runs the float model — the saved parameters swapped in and fake
    quantization off — and puts everything back on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params: dict[int, tuple[QuantLayer, Tensor, Tensor | None]] = {}
        for m in model.modules():
            if isinstance(m, QuantLayer):
                self.params[id(m)] = (m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        from qtoolkit.toggles import fake_quant_disabled

        current = []
        with torch.no_grad():
            for m, w, b in self.params.values():
                current.append((m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()))
                m.weight.copy_(w)
                if b is not None and m.bias is not None:
                    m.bias.copy_(b)
                elif m.bias is not None:  # a bias added by bias correction: the float layer had none
                    m.bias.zero_()
        try:
            with fake_quant_disabled(model):
                yield model
        finally:
            with torch.no_grad():
                for m, w, b in current:
                    m.weight.copy_(w)
                    if b is not None:
                        m.bias.copy_(b)

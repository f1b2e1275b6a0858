"""``calibrate``: PTQ range collection.

Runs the prepared model in eval mode under ``no_grad`` over representative batches
with fake quantization off (float forward, like torch.ao's PTQ) while activation
observers record; then every calibrator runs its range search once
(:meth:`FakeQuantize.finalize`), weight ranges are computed from the (folded)
weights, observers are frozen and fake quantization switched on.

Each tensor is observed once: quantizers that see the very same tensor with the same config (a layer's
observe-only output quantizer and the next layer's input quantizer, a residual add's operand) are found on the
first batch; all but one stop observing and copy its statistics and range at the end (identical results, about
half the histogram work).  This assumes the model runs the same graph on every batch.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate
    >>> qm = prepare(nn.Sequential(nn.Linear(8, 4)), "w8a8")
    >>> batches = [(torch.randn(16, 8), torch.zeros(16)) for _ in range(3)]   # (input, target) pairs
    >>> qm = calibrate(qm, batches, progress=False)
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qtoolkit.config import QuantizerConfig
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.numerics import SCALE_EPS
from qtoolkit.toggles import quantizers

__all__ = ["calibrate", "model_device", "batch_input", "call_model", "to_device"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def batch_input(batch: Any) -> Any:
    """The model input of a batch: a tensor, the first item of an (input, target)
    pair/list, or ``batch["input"]``/``batch["image"]`` of a dict.  The input may itself be a
    tuple/list of positional arguments (``((x,), y)``, ``((x, mask), y)``): see :func:`call_model`.

    Example::

        >>> x = torch.zeros(2, 3)
        >>> batch_input((x, torch.tensor([0, 1]))) is x, batch_input(((x,), None))[0] is x
        (True, True)
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "x"):
            if key in batch:
                return batch[key]
    raise TypeError(
        f"calibrate: cannot find the model input in a batch of type {type(batch).__name__}; "
        "pass tensors, (input, target) pairs or dicts with an 'input' key"
    )


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors in a (nested) tuple / list / dict moved to ``device``; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` when the batch's input is a tuple/list of positional arguments, else ``model(inputs)``.

    Example::

        >>> call_model(nn.Identity(), (torch.ones(1),))
        tensor([1.])
    """
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _observe_first_batch(model: nn.Module, fqs: list[tuple[str, FakeQuantize]], x: Any) -> dict[int, FakeQuantize]:
    """Run the first batch, finding quantizers that observe the very same tensor with the same config (a layer's
    observe-only output quantizer and the next layer's input quantizer, a residual add's operands): all but the
    first of each such group stop observing for the remaining batches and later copy the first's statistics.
    Returns ``{id(follower): leader}``."""
    seen: list[tuple[FakeQuantize, Any]] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        if args and mod.observer_enabled:
            seen.append((mod, args[0]))  # the tensor is kept alive until grouping: ids stay unique

    handles = [fq.register_forward_pre_hook(pre) for _, fq in fqs if fq.role in ("activation", "output")]
    try:
        call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    leaders: dict[tuple[int, QuantizerConfig], FakeQuantize] = {}
    followers: dict[int, FakeQuantize] = {}
    calls: dict[int, int] = {}
    for fq, _ in seen:
        calls[id(fq)] = calls.get(id(fq), 0) + 1
    for fq, t in seen:
        if calls[id(fq)] != 1 or not isinstance(t, torch.Tensor):  # called more than once: not a simple site
            continue
        key = (id(t), fq.config)
        leader = leaders.setdefault(key, fq)
        if leader is not fq and calls[id(leader)] == 1:
            followers[id(fq)] = leader
            fq.enable_observer(False)
    return followers


def _warn_scale_floor(fqs: list[tuple[str, FakeQuantize]]) -> None:
    """Warn, naming them, about quantizers whose data range is so small that the scale floor
    (:data:`qtoolkit.numerics.SCALE_EPS`) replaces the scale the data asks for and leaves it fewer than 16 codes:
    most of their values then round to code 0 and the layer's output is (nearly) zero."""
    hit = []
    for name, fq in fqs:
        if not fq.observer.has_data:
            continue
        lo, hi = fq.observer.observed_range()
        width = float((hi.clamp(min=0) - lo.clamp(max=0)).max())
        # the floor replaces the scale the data asks for AND leaves fewer than 16 codes (4 bits) for the data
        if 0.0 < width / (fq.qmax - fq.qmin) < SCALE_EPS and width < 16 * SCALE_EPS:
            hit.append(f"{name} (range {width:.3g}: {width / SCALE_EPS:.2g} steps of the floor {SCALE_EPS:.3g})")
    if hit:
        warnings.warn(
            "calibrate: the data range of these quantizers is below what the scale floor can resolve, so their "
            "values round to (almost) nothing and the layer output becomes ~0: " + "; ".join(hit[:10])
            + (" ..." if len(hit) > 10 else "") + ". Calibrate with realistic weights/BN statistics (a randomly "
            "initialized network can produce ~1e-9 activations) or keep these layers float (skip them in prepare).",
            stacklevel=3,
        )


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Collect activation ranges over ``data`` and finalize every calibrator.

    Args:
        model: a model returned by :func:`qtoolkit.prepare`.
        data: a DataLoader or any iterable of tensors, ``(input, target)`` pairs
            or dicts; inputs are moved to the model's device.
        num_batches: stop after this many batches (default: all).
        progress: show a tqdm progress bar.

    Returns:
        ``model`` (calibrated in place): observers frozen, fake quantization on,
        its train/eval mode restored.

    Raises:
        ValueError: ``data`` yielded no batch, or a batch holds NaN/Inf (the
            message names the layer). The quantizers' state is then restored to
            what it was before the call.

    Example::

        >>> import torch, qtoolkit as qt
        >>> _ = torch.manual_seed(0)
        >>> qm = qt.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), "w8a8")
        >>> qm = qt.calibrate(qm, [torch.randn(2, 3, 8, 8) for _ in range(4)], progress=False)
        >>> qt.uncalibrated_sites(qm)
        []
    """
    fqs = list(quantizers(model))
    if not fqs:
        raise ValueError("calibrate: the model has no quantizers; call qtoolkit.prepare(model, ...) first")
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"calibrate: num_batches must be positive, got {num_batches}")
    device = model_device(model)
    was_training = model.training
    snapshot = {name: {k: v.clone() for k, v in fq.state_dict().items()} for name, fq in fqs}
    flags = [(fq, int(fq.observer_enabled), int(fq.fake_quant_enabled)) for _, fq in fqs]
    for _, fq in fqs:
        weight = fq.role == "weight"
        fq.collect_only = True  # qparams once at the end, not after every batch
        fq.enable_observer(not weight)
        fq.fake_quant_enabled.fill_(0)
        if not weight:
            fq.observer.reset()
    model.eval()
    seen = 0
    try:
        iterator = iter(data)
        if num_batches is not None:
            iterator = itertools.islice(iterator, num_batches)
        if progress:
            from tqdm.auto import tqdm

            total = num_batches
            if total is None and hasattr(data, "__len__"):
                total = len(data)  # type: ignore[arg-type]
            iterator = tqdm(iterator, total=total, desc="calibrate", unit="batch", leave=False)
        followers: dict[int, FakeQuantize] = {}
        with torch.no_grad():
            for batch in iterator:
                x = to_device(batch_input(batch), device)
                if seen == 0:
                    followers = _observe_first_batch(model, fqs, x)
                else:
                    call_model(model, x)
                seen += 1
        if seen == 0:
            raise ValueError("calibrate: `data` yielded no batches; pass a non-empty DataLoader or iterable")
        unobserved = []
        for m in model.modules():
            if isinstance(m, QuantLayer):
                m.calibrate_weight()
        for name, fq in fqs:
            if fq.role in ("weight", "dynamic") or id(fq) in followers:
                continue
            if not fq.observer.has_data:
                unobserved.append(name)
                continue
            fq.finalize()
        for name, fq in fqs:
            leader = followers.get(id(fq))
            if leader is not None:  # saw the same tensors as its leader: same statistics, same range
                fq.observer.load_state_dict(leader.observer.state_dict())
                if leader.observer.has_data:
                    fq._load_qparams(leader.scale.detach(), leader.zero_point)
                else:
                    unobserved.append(name)
        _warn_scale_floor([(n, fq) for n, fq in fqs if fq.role not in ("weight", "dynamic")])
        if unobserved:
            warnings.warn(
                "calibrate: these quantizers saw no data (their layers never ran on the calibration "
                f"batches) and stay uncalibrated: {', '.join(unobserved[:10])}"
                + (" ..." if len(unobserved) > 10 else ""),
                stacklevel=2,
            )
    except BaseException:
        for name, fq in fqs:
            fq.collect_only = False
            fq.load_state_dict(snapshot[name])
        for fq, obs, fake in flags:
            fq.observer_enabled.fill_(obs)
            fq.fake_quant_enabled.fill_(fake)
        model.train(was_training)
        raise
    for _, fq in fqs:
        fq.collect_only = False
        fq.enable_observer(False)
        fq.enable_fake_quant(True)
    model.train(was_training)
    return model

"""``calibrate``: PTQ range collection.

Runs the prepared model in eval mode under ``no_grad`` over representative batches
with fake quantization off (float forward, like torch.ao's PTQ) while activation
observers record; then every calibrator runs its range search once
(:meth:`FakeQuantize.finalize`), weight ranges are computed from the (folded)
weights, observers are frozen and fake quantization switched on.

Each tensor is observed once: quantizers that see the very same tensor, unchanged, with the same config (a
layer's observe-only output quantizer and the next layer's input quantizer, a residual add's operand; not the
input and output of an in-place activation, one object with two contents) are found on the first batch; all
but one stop observing and copy its statistics and range at the end (identical results, about half the
histogram work).  This assumes the model runs the same graph on every batch.

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
from qtoolkit.table_grids import fit_table_input_grids
from qtoolkit.toggles import quantizers

__all__ = ["calibrate", "model_device", "batch_input", "call_model", "to_device", "tensor_version"]


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


def tensor_version(t: Any) -> int | None:
    """``t``'s in-place version counter (``None`` for a non-tensor or an inference-mode tensor, which has none).

    Two quantizers see the same data only if they see the same tensor object *at the same version*: an in-place
    activation (``nn.SiLU(inplace=True)``) returns the very object it was given, with other values.

    Example::

        >>> t = torch.zeros(3)
        >>> v0 = tensor_version(t); _ = t.add_(1.0); tensor_version(t) == v0 + 1
        True
    """
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors do not track versions
        return None


def _observe_first_batch(model: nn.Module, fqs: list[tuple[str, FakeQuantize]], x: Any) -> dict[int, FakeQuantize]:
    """Run the first batch, finding quantizers that observe the very same tensor with the same config (a layer's
    observe-only output quantizer and the next layer's input quantizer, a residual add's operands): all but the
    first of each such group stop observing for the remaining batches and later copy the first's statistics.
    Returns ``{id(follower): leader}``."""
    seen: list[tuple[FakeQuantize, Any, Any]] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        if args and mod.observer_enabled:
            # the tensor is kept alive until grouping (ids stay unique); its version is read now: an in-place
            # op (SiLU(inplace=True), ReLU6(inplace=True)) returns its input object with other data
            seen.append((mod, args[0], tensor_version(args[0])))

    handles = [fq.register_forward_pre_hook(pre) for _, fq in fqs if fq.role in ("activation", "output")]
    try:
        call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    leaders: dict[tuple[int, int, QuantizerConfig], FakeQuantize] = {}
    followers: dict[int, FakeQuantize] = {}
    calls: dict[int, int] = {}
    for fq, _, _ in seen:
        calls[id(fq)] = calls.get(id(fq), 0) + 1
    for fq, t, version in seen:
        # called more than once: not a simple site; no version (inference-mode tensor): cannot tell data apart
        if calls[id(fq)] != 1 or not isinstance(t, torch.Tensor) or version is None:
            continue
        key = (id(t), version, fq.config)
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
    fit_tables: bool = True,
) -> nn.Module:
    """Collect activation ranges over ``data`` and finalize every calibrator.

    Args:
        model: a model returned by :func:`qtoolkit.prepare`.
        data: a DataLoader or any iterable of tensors, ``(input, target)`` pairs
            or dicts; inputs are moved to the model's device.
        num_batches: stop after this many batches (default: all).
        progress: show a tqdm progress bar.
        fit_tables: give each lookup-table activation (SiLU, sigmoid, GELU, ...) an input grid only as wide as
            the inputs whose output codes differ
            (:func:`qtoolkit.table_grids.fit_table_input_grids`: a sigmoid gate calibrated on
            ``[-80, 84]`` gets ``[-6.2, 6.2]``); the tables' outputs are unchanged, their input rounding finer.

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
        if fit_tables:
            by_id = {id(fq): fq for _, fq in fqs}
            tied: dict[int, list[FakeQuantize]] = {}
            for fid, leader in followers.items():
                tied.setdefault(id(leader), [leader]).append(by_id[fid])
            fit_table_input_grids(model, list(tied.values()))
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

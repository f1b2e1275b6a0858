"""``reconstruct``: PTQ beyond range calibration — CLE, bias correction, AdaRound, BRECQ, QDrop.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(16, 3, 10, 10) for _ in range(4)]
    >>> qm = qt.calibrate(qt.prepare(m, "w4a8"), data, progress=False)
    >>> qm = qt.reconstruct(qm, data, method="adaround", iters=50, progress=False)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.ptq.engine import UnitOptions, chained_inputs, reconstruct_unit
from qtoolkit.ptq.sites import FloatReference, feeds, find_units, probe

__all__ = ["reconstruct", "METHODS", "ROUNDING_METHODS"]

#: method → (unit granularity, learn activation step sizes, QDrop probability)
ROUNDING_METHODS: dict[str, tuple[str, bool, float]] = {
    "adaround": ("layer", False, 0.0),
    "brecq": ("block", True, 0.0),
    "qdrop": ("block", True, 0.5),
}
METHODS: tuple[str, ...] = ("cle", "bias_correction", *ROUNDING_METHODS)


def parse_methods(method: str | Sequence[str]) -> list[str]:
    """``"cle+bias_correction+qdrop"`` or a list → validated steps (CLE first, one rounding method last)."""
    steps = [s.strip() for s in method.split("+")] if isinstance(method, str) else [str(s).strip() for s in method]
    steps = [s for s in steps if s]
    if not steps:
        raise ValueError(f"reconstruct: method must name at least one of {METHODS}")
    for s in steps:
        if s not in METHODS:
            raise ValueError(f"reconstruct: unknown method {s!r}; choose from {METHODS} (combine with '+')")
    if len(set(steps)) != len(steps):
        raise ValueError(f"reconstruct: method {method!r} names a step twice")
    rounding = [s for s in steps if s in ROUNDING_METHODS]
    if len(rounding) > 1:
        raise ValueError(f"reconstruct: choose one of {tuple(ROUNDING_METHODS)}, got {rounding}")
    if "cle" in steps and steps[0] != "cle":
        raise ValueError("reconstruct: 'cle' changes the weights and activation ranges; it must come first")
    if rounding and steps[-1] != rounding[0]:
        raise ValueError(f"reconstruct: the rounding method {rounding[0]!r} must be the last step")
    return steps


def _check_model(model: nn.Module) -> list[QuantLayer]:
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("reconstruct: the model has no quantized layers; call qtoolkit.prepare and calibrate first")
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer) and m.bn is not None:
            raise ValueError(
                f"reconstruct: {name} keeps a live BatchNorm (prepared with qat=True); reconstruction works on a "
                "PTQ-prepared model (qtoolkit.prepare(model, qconfig), BN folded)"
            )
        if isinstance(m, QuantLayer) and m.input_quantizer is not None and m.input_quantizer.role == "activation" \
                and not m.input_quantizer.is_calibrated:
            raise ValueError(f"reconstruct: {name} has no activation range; run qtoolkit.calibrate(model, data) first")
    return layers


def reconstruct(
    model: nn.Module,
    data: Iterable[Any],
    method: str | Sequence[str] = "qdrop",
    *,
    num_batches: int | None = None,
    iters: int = 300,
    batch_size: int = 32,
    weight_lr: float = 5e-2,
    act_lr: float = 1e-2,
    reg_weight: float = 1.0,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    drop_prob: float | None = None,
    max_block_layers: int = 4,
    time_budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    report: list[dict[str, Any]] | None = None,
) -> nn.Module:
    """Improve a calibrated PTQ model in place without labels.

    Methods (combine with ``+``, e.g. ``"cle+bias_correction+qdrop"``):

    * ``"cle"`` — cross-layer equalization of Conv/Linear → (ReLU) → Conv/Linear chains (Nagel et al. 2019),
      then the activation ranges are calibrated again on ``data``;
    * ``"bias_correction"`` — empirical bias correction: each layer's per-channel output mean is made equal
      to the float model's (Nagel et al. 2019), layer by layer in forward order;
    * ``"adaround"`` — learned weight rounding per layer on the layer's output (Nagel et al. 2020);
    * ``"brecq"`` — learned rounding per residual block with the activations' step sizes learned jointly
      (LSQ) (Li et al. 2021);
    * ``"qdrop"`` — BRECQ with QDrop's random dropping of activation quantization (Wei et al. 2022).

    Args:
        model: a prepared (``qat=False``) and calibrated model.
        data: calibration batches (tensors, ``(input, target)`` pairs or dicts; targets are never used).
            The first ``num_batches`` are kept in memory together with each unit's inputs and outputs.
        method: see above; default ``"qdrop"``.
        num_batches: batches of ``data`` to use (default: all).
        iters: Adam steps per unit (layer or block).
        batch_size: samples per step, drawn from the cached unit inputs.
        weight_lr / act_lr: learning rates of the rounding variables and of the log step sizes.
        reg_weight: weight of the rounding regularizer; ``warmup``: share of ``iters`` before it starts;
        beta: the regularizer's exponent, annealed from ``beta[0]`` to ``beta[1]``.
        drop_prob: QDrop's probability of passing an activation element unquantized (default: the method's,
            0.5 for ``qdrop``, 0 otherwise).
        max_block_layers: largest number of quantized layers in one block unit.
        time_budget_s: wall-clock budget of the rounding step: each unit gets an equal share of what is left
            when it starts and runs as many of its ``iters`` as fit (its schedule is fitted to that number).
        seed: seeds the sampling and drop masks.
        progress: tqdm progress bar over the units.
        report: if given, one record per unit (losses before / after, share of flipped roundings, seconds)
            and per step is appended to it.

    Returns:
        ``model``, changed in place: rounded weights (``code · scale``, so ``convert`` stores the learned
        codes), learned step sizes in the activation quantizers, corrected biases.  Its train/eval mode and
        the parameters' ``requires_grad`` are restored.  Calling :func:`qtoolkit.calibrate` afterwards would
        recompute the ranges and undo the learned step sizes.

    Raises:
        ValueError: not a prepared / calibrated PTQ model, no data, unknown method (checked before anything
            changes).  Any exception raised half-way (a unit's forward failing, KeyboardInterrupt) restores the
            model's state as it was before the call, then propagates.

    Example::

        >>> import torch, qtoolkit as qt
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        >>> data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
        >>> qm = qt.calibrate(qt.prepare(net, "w4a8"), data, progress=False)
        >>> qm = reconstruct(qm, data, "adaround", iters=20, progress=False)
        >>> w = qm[0].weight_quantizer
        >>> bool(torch.equal(w(qm[0].weight), qm[0].weight))   # weights now sit on their learned codes
        True
    """
    steps = parse_methods(method)
    _check_model(model)
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"reconstruct: num_batches must be positive, got {num_batches}")
    if iters <= 0 or batch_size <= 0:
        raise ValueError(f"reconstruct: iters and batch_size must be positive, got {iters} and {batch_size}")
    batches = list(itertools.islice(iter(data), num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("reconstruct: `data` yielded no batches")
    was_training = model.training
    # an exception half-way (a unit's forward failing, Ctrl-C) must not leave a half-reconstructed model
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    had_bias = {id(m): m.bias is not None for m in model.modules() if isinstance(m, QuantLayer)}
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    records = report if report is not None else []
    reference: FloatReference | None = None
    try:
        for step in steps:
            if step != "cle" and reference is None:  # CLE keeps the float function; later steps do not
                reference = FloatReference(model)
            if step == "cle":
                from qtoolkit.ptq.cle import cross_layer_equalization

                records.append({"step": "cle", **cross_layer_equalization(model, batches, progress=progress)})
            elif step == "bias_correction":
                from qtoolkit.ptq.bias_correction import bias_correction

                records.append({"step": "bias_correction", **bias_correction(model, batches, reference, progress=progress)})
            else:
                granularity, learn_act, default_drop = ROUNDING_METHODS[step]
                opts = UnitOptions(
                    iters=iters, batch_size=batch_size, weight_lr=weight_lr, act_lr=act_lr, reg_weight=reg_weight,
                    warmup=warmup, beta_start=beta[0], beta_end=beta[1], learn_activation_scale=learn_act,
                    drop_prob=default_drop if drop_prob is None else float(drop_prob),
                )
                if time_budget_s is not None and time_budget_s <= 0:
                    raise ValueError(f"reconstruct: time_budget_s must be positive, got {time_budget_s}")
                _run_rounding(model, batches, step, granularity, opts, max_block_layers, generator, progress, records,
                              reference, time_budget_s)
    except BaseException:
        _restore(model, snapshot, had_bias)
        raise
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor], had_bias: dict[int, bool]) -> None:
    """Put the model back as it was before :func:`reconstruct` (weights, biases, every quantizer buffer)."""
    for m in model.modules():
        if isinstance(m, QuantLayer) and not had_bias.get(id(m), True):
            m.bias = None  # added by bias correction
    model.load_state_dict(snapshot)


def _run_rounding(
    model: nn.Module, batches: list[Any], step: str, granularity: str, opts: UnitOptions, max_block_layers: int,
    generator: torch.Generator, progress: bool, records: list[dict[str, Any]], reference: FloatReference,
    time_budget_s: float | None,
) -> None:
    pr = probe(model, batches[0])
    units, left_out = find_units(model, pr, granularity, max_block_layers)
    if left_out:
        warnings.warn(
            f"reconstruct: {len(left_out)} quantized layer(s) are not called exactly once with one tensor and keep "
            f"round-to-nearest: {', '.join(left_out[:8])}" + (" ..." if len(left_out) > 8 else ""),
            stacklevel=3,
        )
    from tqdm.auto import tqdm

    bar = tqdm(units, desc=step, unit="unit", leave=False, disable=not progress)
    prev = None
    t0 = time.perf_counter()
    for i, unit in enumerate(bar):
        bar.set_postfix_str(unit.name)
        if time_budget_s is not None:
            share = max(time_budget_s - (time.perf_counter() - t0), 0.0) / (len(units) - i)
            opts = dataclasses.replace(opts, time_budget_s=share)
        inputs = None
        if prev is not None and feeds(pr, prev[0], unit):
            inputs = chained_inputs(model, prev[0], prev[1], prev[2], unit, batches[0], reference)
        rec, x_q, y_fp = reconstruct_unit(model, unit, batches, pr, reference, opts, generator, inputs)
        prev = (unit, x_q, y_fp)
        rec["step"] = step
        records.append(rec)
        bar.set_postfix_str(f"{unit.name}: loss {rec['loss_before']:.3g} -> {rec['loss_after']:.3g}")
    bar.close()

"""The reconstruction loop shared by AdaRound (per layer), BRECQ and QDrop (per block).

For each unit in forward order (see :mod:`qtoolkit.ptq.sites`):

1. its input is captured from the *quantized* model — every earlier unit already has its final
   rounding, so the unit learns to undo the error that reaches it — and its input and output from the
   *float* model (fake quantization off): the output is the target;
2. the weights' rounding (:class:`~qtoolkit.ptq.adaround.AdaRoundWeight`) and, for
   ``learn_activation_scale``, the step sizes of the unit's activation quantizers (LSQ, on a log scale)
   are optimized with Adam on ``‖unit(x) − y_fp‖²`` (summed over channels, averaged over the rest) plus
   the rounding regularizer;
3. with ``drop_prob > 0`` (QDrop, Wei et al. 2022) every activation quantizer in the unit passes each
   element through unquantized with that probability, and the unit's input mixes the quantized and the
   float model's input the same way;
4. the hard rounding is written into the weights as ``code · scale`` and the learned step sizes into the
   quantizers' buffers (and those of the quantizers tied to them).

Only the parameters of the reconstruction are trained; the model's own parameters are left untouched
apart from the rounded weights, and ``requires_grad`` flags are restored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.numerics import fake_quantize_lsq, quantize
from qtoolkit.ptq.adaround import AdaRoundWeight, BetaSchedule
from qtoolkit.ptq.sites import FloatReference, Probe, Unit, capture

__all__ = ["UnitOptions", "reconstruct_unit", "chained_inputs", "forward_chunks"]


@dataclass(frozen=True)
class UnitOptions:
    """Optimization settings of one unit (see :func:`qtoolkit.reconstruct`)."""

    iters: int = 300
    batch_size: int = 32
    weight_lr: float = 5e-2
    act_lr: float = 1e-2
    reg_weight: float = 1.0
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    learn_activation_scale: bool = False
    drop_prob: float = 0.0
    time_budget_s: float | None = None  # this unit's share, capture included: fewer iterations if needed


def _rand(shape: torch.Size, device: torch.device, generator: torch.Generator) -> Tensor:
    """Uniform noise from the reconstruction's own generator (seeded; the global RNG is not touched)."""
    if device.type == generator.device.type:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator).to(device)


def _rec_loss(out: Tensor, target: Tensor) -> Tensor:
    diff = (out - target).pow(2)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


class _ActScale:
    """One learned step size shared by a group of tied activation quantizers."""

    def __init__(self, members: list[FakeQuantize]) -> None:
        self.members = members
        head = members[0]
        self.log_scale = nn.Parameter(head.scale.detach().float().clamp_min(1e-12).log().clone())

    def scale(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def write_back(self) -> None:
        s = self.scale().detach()
        for fq in self.members:
            fq.scale.data.copy_(s.to(fq.scale.dtype).reshape(fq.scale.shape))


def reconstruct_unit(
    model: nn.Module,
    unit: Unit,
    batches: Sequence[Any],
    pr: Probe,
    reference: FloatReference,
    opts: UnitOptions,
    generator: torch.Generator,
    inputs: tuple[Tensor, Tensor] | None = None,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Reconstruct one unit in place.

    ``inputs``: the unit's quantized-model and float-model inputs when the caller has them (a chain, see
    :func:`chained_inputs`); otherwise they are captured by running the model on ``batches``.

    Returns a record (losses before / after, flipped share, seconds) and the unit's quantized-model input
    and float target, for the next unit of a chain.
    """
    t0 = time.perf_counter()
    if inputs is None:
        x_q, _ = capture(model, unit.module, batches, want_output=False)
        with reference.active(model):
            x_fp, y_fp = capture(model, unit.module, batches, want_output=True)
    else:
        x_q, x_fp = inputs
        with reference.active(model):
            y_fp = forward_chunks(unit.module, x_fp)
    assert y_fp is not None
    t_capture = time.perf_counter() - t0
    n = x_q.shape[0]
    # the reconstruction loss is taken relative to the target's energy and the regularizer is a mean over
    # the weights, so one reg_weight fits layers whose activations are 1e-2 or 1e3
    energy = float(_rec_loss(y_fp, torch.zeros_like(y_fp))) or 1.0

    record: dict[str, Any] = {"unit": unit.name, "layers": [n for n, _ in unit.layers], "samples": n}
    was_training = unit.module.training
    unit.module.eval()  # dropout / BN off: the rounding is learned for inference
    record["loss_before"] = _eval_loss(unit.module, x_q, y_fp, opts.batch_size) / energy
    rounders: dict[str, AdaRoundWeight] = {}
    handles = []
    silenced: list[FakeQuantize] = []  # the hook computes their output: their own Q/DQ is skipped meanwhile
    for name, layer in unit.layers:
        wq = layer.weight_quantizer
        if not bool(wq.fake_quant_enabled) or not wq.is_calibrated:
            continue
        ar = AdaRoundWeight(layer.weight, wq.scale, wq.zero_point, wq.qmin, wq.qmax).to(layer.weight.device)
        rounders[name] = ar
        handles.append(wq.register_forward_hook(lambda mod, args, out, ar=ar: ar().to(args[0].dtype)))
        silenced.append(wq)

    act_scales: list[_ActScale] = []
    drop = float(opts.drop_prob)
    by_fq: dict[int, _ActScale] = {}
    for _, fq in unit.activation_quantizers:
        if not bool(fq.fake_quant_enabled) or not fq.is_calibrated or fq.spec.axis is not None:
            continue
        if opts.learn_activation_scale and id(fq) not in by_fq:
            group = pr.group_of(fq)
            shared = _ActScale(group)
            act_scales.append(shared)
            for m in group:
                by_fq[id(m)] = shared
        shared = by_fq.get(id(fq))
        if shared is None and drop <= 0:
            continue

        def act_hook(mod: FakeQuantize, args: tuple, out: Tensor, shared: _ActScale | None = shared) -> Tensor:
            x = args[0]
            if shared is None:
                q = out
            else:
                q = fake_quantize_lsq(x, shared.scale().to(x.device), mod.zero_point, mod.qmin, mod.qmax)
            if drop > 0 and torch.is_grad_enabled():
                keep_fp = _rand(x.shape, x.device, generator) < drop
                q = torch.where(keep_fp, x, q)
            return q

        handles.append(fq.register_forward_hook(act_hook))
        if shared is not None:
            silenced.append(fq)

    n_round = max(sum(ar.v.numel() for ar in rounders.values()), 1)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    groups = []
    if rounders:
        groups.append({"params": [ar.v for ar in rounders.values()], "lr": opts.weight_lr})
    if act_scales:
        groups.append({"params": [a.log_scale for a in act_scales], "lr": opts.act_lr})
    beta = BetaSchedule(opts.iters, opts.warmup, opts.beta_start, opts.beta_end)
    try:
        for fq in silenced:
            fq.fake_quant_enabled.fill_(0)
        if groups:
            opt = torch.optim.Adam(groups)
            bs = min(opts.batch_size, n)
            iters, it, timed = opts.iters, 0, 5
            t_loop = time.perf_counter()
            while it < iters:
                if opts.time_budget_s is not None and it == timed:
                    # the schedule (warm-up, beta annealing) is fitted to the iterations the budget allows
                    per_step = (time.perf_counter() - t_loop) / timed
                    left = opts.time_budget_s - (time.perf_counter() - t0) - 10 * per_step  # the final evaluations
                    iters = max(timed + 1, min(opts.iters, timed + int(left / per_step)))
                    beta = BetaSchedule(iters, opts.warmup, opts.beta_start, opts.beta_end)
                idx = torch.randint(0, n, (bs,), generator=generator).to(x_q.device)  # generator: CPU
                xin = x_q[idx]
                if drop > 0:
                    mix = _rand(xin.shape, xin.device, generator) < drop
                    xin = torch.where(mix, x_fp[idx], xin)
                with torch.enable_grad():
                    loss = _rec_loss(unit.module(xin), y_fp[idx]) / energy
                    b = beta(it)
                    if b is not None and rounders:
                        loss = loss + opts.reg_weight * sum(ar.regularizer(b) for ar in rounders.values()) / n_round
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                for a in act_scales:  # the int32 bias of the fake-quant layer follows the live step size
                    a.write_back()
                it += 1
            record["iters"] = iters
        with torch.no_grad():
            record["loss_soft"] = _eval_loss(unit.module, x_q, y_fp, opts.batch_size) / energy
            h = [ar.h() for ar in rounders.values()]
            record["undecided"] = float(sum(((x > 0.01) & (x < 0.99)).sum() for x in h)) / n_round if h else 0.0
    finally:
        for h in handles:
            h.remove()
        for fq in silenced:
            fq.fake_quant_enabled.fill_(1)
        for p, flag in frozen:
            p.requires_grad_(flag)
        unit.module.train(was_training)
    with torch.no_grad():
        for name, layer in unit.layers:
            ar = rounders.get(name)
            if ar is None:
                continue
            layer.weight.data.copy_(ar(hard=True).to(layer.weight.dtype))
            _check_codes(name, layer, ar)
        for a in act_scales:
            a.write_back()
        record["loss_after"] = _eval_loss(unit.module, x_q, y_fp, opts.batch_size) / energy
    record["flipped"] = (
        sum(float(ar.flipped_fraction()) * ar.v.numel() for ar in rounders.values())
        / max(sum(ar.v.numel() for ar in rounders.values()), 1)
    )
    record["seconds"] = time.perf_counter() - t0
    record["capture_seconds"] = t_capture
    record["chained"] = inputs is not None
    return record, x_q, y_fp


@torch.no_grad()
def forward_chunks(module: nn.Module, x: Tensor, chunk: int = 256) -> Tensor:
    """``module(x)`` in chunks of ``chunk`` samples (eval mode, no grad)."""
    was_training = module.training
    module.eval()
    try:
        return torch.cat([module(x[i:i + chunk]).float() for i in range(0, x.shape[0], chunk)])
    finally:
        module.train(was_training)


@torch.no_grad()
def chained_inputs(
    model: nn.Module, prev: Unit, prev_x_q: Tensor, prev_y_fp: Tensor, unit: Unit, batch: Any,
    reference: FloatReference,
) -> tuple[Tensor, Tensor] | None:
    """``unit``'s inputs computed from the previous unit of a chain (its output with the final rounding, and
    its float target), or None when a check on ``batch`` shows the model computes something else between
    them (an in-place op, say): then the caller captures them from the model."""
    x_q = forward_chunks(prev.module, prev_x_q)
    got_q, _ = capture(model, unit.module, [batch], want_output=False)
    with reference.active(model):
        got_fp, _ = capture(model, unit.module, [batch], want_output=False)
    k = got_q.shape[0]
    if got_q.shape[1:] != x_q.shape[1:] or got_fp.shape[1:] != prev_y_fp.shape[1:]:
        return None
    tol = dict(rtol=1e-4, atol=1e-5 * float(got_fp.abs().max().clamp_min(1.0)))
    if not (torch.allclose(x_q[:k], got_q, **tol) and torch.allclose(prev_y_fp[:k], got_fp, **tol)):
        return None
    return x_q, prev_y_fp


@torch.no_grad()
def _eval_loss(module: nn.Module, x: Tensor, y: Tensor, batch_size: int, limit: int = 512) -> float:
    """The reconstruction loss on the first ``limit`` cached samples (a diagnostic for the report)."""
    x, y = x[:limit], y[:limit]
    total, count = 0.0, 0
    step = max(batch_size, 256)
    for i in range(0, x.shape[0], step):
        xb = x[i:i + step]
        total += float(_rec_loss(module(xb), y[i:i + step])) * xb.shape[0]
        count += xb.shape[0]
    return total / max(count, 1)


def _check_codes(name: str, layer: nn.Module, ar: AdaRoundWeight) -> None:
    """The weight quantization (as the fake-quant layer and ``convert`` compute it) must now give the
    learned codes exactly."""
    wq = layer.weight_quantizer
    axis = None if wq.spec.axis is None else 0
    got = quantize(layer.weight.detach().float(), wq.scale.detach().float(), wq.zero_point, wq.qmin, wq.qmax,
                   axis=axis, dtype=torch.float32)
    want = ar.codes().reshape(got.shape)
    if not torch.equal(got, want):
        raise RuntimeError(
            f"reconstruct: {name}: {int((got != want).sum())} rounded weight codes do not survive requantization"
        )
    if not math.isfinite(float(layer.weight.detach().abs().sum())):
        raise RuntimeError(f"reconstruct: {name}: non-finite weights after rounding")

"""Check a compiled engine model against the fake-quant model it came from: end to end, and per quantization
site within one step — the same for every engine (OpenVINO, ONNX Runtime).

**End to end**: the deployed (compiled) model and the fake-quant model on the same batches: top-1
agreement (2-D outputs), SQNR, relative L2 error, largest difference.

**Per site, teacher-forced, on the engine's own kernels**: the exported graph is cut at every activation
``QuantizeLinear`` (a *site*) except the operands of residual adds: the site's codes become an extra graph
output, and its consumers (the ``DequantizeLinear`` nodes feeding the next conv / add / gemm) read a new
graph input instead.  The graph then falls apart into one piece per layer (``codes → DQ → conv → Q``, or
``codes → DQ → conv → Q/DQ → add [→ relu] → Q`` for a residual block's last conv), each in the pattern the
engine fuses, so the engine compiles each layer as it does in the deployed model (add operands stay inside
their piece because engines fuse the add into the conv: cutting there would test a graph that is never
deployed).  The fake-quant model runs once on the batch and records every site's codes; those codes are fed
to the cut graph, and the codes each piece produces are compared with the fake-quant model's for that site.
Every layer thus sees exactly the fake-quant model's inputs: a difference comes from that piece alone, not
from earlier drift.  Two correct implementations differ by one code at rounding ties (float summation
order), plus one operand step (in the site's units) per add operand fused inside the piece; a wrong kernel by
more (an int16-saturating u8×s8 conv, bf16 arithmetic).  The **first site in graph order beyond its allowed
steps** is named.  Sites within bounds whose codes differ far more often than ties do (> 1 %) are listed
as notes: measured with OpenVINO 2026.4, its conv + residual-add fusion does not round the conv's output to
the add operand's grid (~14 % of a ResNet-20 block's output codes one step off at 8 bits, ~15 % at 4 bits).
(Fetching sites as extra outputs of the uncut graph instead would change the graph the engine compiles:
OpenVINO stops fusing the residual adds into the convs when their inputs are also model outputs.)

Example::

    >>> rep = EngineVerifyReport("openvino", {"INFERENCE_PRECISION_HINT": "f32"})
    >>> rep.faithful
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model
from qtoolkit.export.verify import SiteDiff, _site_of, add_site_diff, finish_totals
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.numerics import quantize

__all__ = ["EngineVerifyReport", "cut_at_sites", "verify_engine"]

_IN_SUFFIX = "__qtoolkit_in"
#: ops whose quantized operands stay inside one piece of the cut graph (the engines fuse them into the producing conv)
_FUSED_INTO = ("Add", "Sum")
#: largest relative L2 error of the float ops after the last site (teacher-forced) that counts as faithful
HEAD_TOLERANCE = 1e-3


@dataclass
class EngineVerifyReport:
    """What :func:`verify_engine` measured (``str(report)`` is a readable summary).

    Attributes:
        engine / settings: the engine and the settings it was compiled with.
        samples: number of inputs compared.
        top1_agreement: share of samples whose argmax agrees (None unless the output is ``[N, classes]``).
        sqnr_db / rel_l2 / max_abs_diff: the deployed model's output against the fake-quant model's.
        sites: per activation site in graph order (teacher-forced, see the module docstring).
        first_divergent: the first site whose codes differ by more than its allowed steps, or None.
        head_rel_l2: relative L2 error of the model output with the last site teacher-forced (the float ops after
            it: pooling, dequantized head); above ``HEAD_TOLERANCE`` (1e-3; float32 gives ~1e-7, bf16 ~4e-3) it is
            ``first_divergent``.
        allowed_steps: per site, 1 + one operand step (in the site's units) per add operand fused into its piece.
        sites_checked: False when the per-site check was skipped (``sites=False``, or no site found).
        unobserved: sites whose codes the compiled cut graph did not return under their name (checked end to end
            and through the next observed site only; listed in ``str(report)``).
    """

    engine: str
    settings: dict[str, Any]
    samples: int = 0
    top1_agreement: float | None = None
    sqnr_db: float = math.inf
    rel_l2: float = 0.0
    max_abs_diff: float = 0.0
    sites: list[SiteDiff] = field(default_factory=list)
    first_divergent: SiteDiff | None = None
    sites_checked: bool = False
    allowed_steps: dict[str, int] = field(default_factory=dict)
    head_rel_l2: float | None = None
    unobserved: list[str] = field(default_factory=list)

    @property
    def systematic(self) -> list[SiteDiff]:
        """Sites within their allowed steps but whose codes differ far more often than rounding ties do (> 1 %)."""
        return [s for s in self.sites if s.frac_differ > 0.01 and s.frac_differ * s.numel > 10]

    @property
    def faithful(self) -> bool:
        """No site beyond its allowed steps (one; more after fused add operands): the fake-quant model's codes up to rounding ties."""
        return self.first_divergent is None

    def __str__(self) -> str:
        agree = "-" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        lines = [
            f"{self.engine} ({', '.join(f'{k}={v}' for k, v in self.settings.items())}) vs the fake-quant model on "
            f"{self.samples} inputs: top-1 agreement {agree}, SQNR {self.sqnr_db:.1f} dB, relative L2 {self.rel_l2:.4f}, "
            f"max |diff| {self.max_abs_diff:.4g}"
        ]
        if self.sites:
            worst = max(self.sites, key=lambda s: (s.max_steps, s.frac_differ))
            lines.append(
                f"{len(self.sites)} activation sites compared code for code, each layer teacher-forced; worst: {worst.site} "
                f"(max {worst.max_steps} steps, {100 * worst.frac_differ:.3f}% of codes differ)"
            )
        for d in self.systematic:
            lines.append(
                f"note: {d.site} differs in {100 * d.frac_differ:.2f}% of its codes (max {d.max_steps} of "
                f"{self.allowed_steps.get(d.site, 1)} allowed steps): more than rounding ties; the engine computes "
                "that piece differently (e.g. OpenVINO fuses the residual add into the conv and does not round the add's operand)"
            )
        if self.unobserved:
            lines.append(f"{len(self.unobserved)} site(s) not returned by the compiled cut graph, checked only through the "
                         f"next site and end to end: {', '.join(self.unobserved[:5])}")
        if not self.sites_checked:
            lines.append("per-site check not run: end-to-end comparison only")
        elif self.first_divergent is None:
            lines.append("faithful: every site within its allowed steps (one step: rounding ties; plus one operand step per fused add operand)")
        else:
            d = self.first_divergent
            if d.numel == 0:
                lines.append(f"NOT faithful: {d.site} is {self.head_rel_l2:.2g} off in relative L2 with its inputs teacher-forced "
                             f"(float32 arithmetic: ~1e-7; tolerance {HEAD_TOLERANCE:g})")
                return "\n".join(lines)
            lines.append(
                f"NOT faithful: first site beyond its allowed {self.allowed_steps.get(d.site, 1)} step(s) is {d.site} (node {d.node}): max {d.max_steps} steps, "
                f"{100 * d.frac_differ:.3f}% of its codes differ"
            )
        return "\n".join(lines)


def _site_nodes(proto: Any, model: nn.Module) -> list[tuple[str, str, str, int]]:
    """``(node name, output tensor, site, zero-point ONNX dtype)`` of every activation QuantizeLinear whose
    site is a quantizer of ``model``, in graph order."""
    inits = {i.name: i for i in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    fqs = {fq.name for fq in model.modules() if isinstance(fq, FakeQuantize) and fq.role == "activation"}
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in proto.graph.node for o in n.output}
    consts = set(inits) | {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[1] not in inits or node.output[0] in outputs:
            continue
        src = producer.get(node.input[0])
        if node.input[0] in consts or (src is not None and src.op_type == "Clip" and src.input[0] in consts):
            continue  # a constant's codes (e.g. a position bias): computed once at export, nothing for the engine to compute
        dqs = consumers.get(node.output[0], [])
        users = [u for dq in dqs for u in consumers.get(dq.output[0], [])]
        if users and all(u.op_type in _FUSED_INTO for u in users):
            continue  # an operand of a residual add only: engines fuse conv + add, these codes never exist alone
        site = _site_of(node.input[1])
        if site is not None and site in fqs and node.input[2] in inits:
            found.append((node.name or node.output[0], node.output[0], site, inits[node.input[2]].data_type))
    return found


def _allowed_steps(proto: Any, sites: list[tuple[str, str, str, int]]) -> dict[str, int]:
    """Per cut site: 1 + Σ ceil(s_operand / s_site) over the add operands fused inside its piece (a rounding tie
    flipped in an operand moves the add's sum by one operand step)."""
    from onnx import numpy_helper

    cut = {out for _, out, _, _ in sites}
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    scale_of = {n.output[0]: float(numpy_helper.to_array(inits[n.input[1]]).max()) for n in proto.graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in inits}  # fmt: skip
    allowed = {}
    for _, out, site, _ in sites:
        total, seen, stack = 1, set(), list(producer[out].input[:1])
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if name in seen or node is None or name in cut:
                continue
            seen.add(name)
            if node.op_type == "QuantizeLinear" and name in scale_of:
                total += math.ceil(scale_of[name] / scale_of[out] - 1e-6)
            stack.extend(i for i in node.input if i not in inits)
        allowed[site] = total
    return allowed


def cut_at_sites(proto: Any, sites: list[tuple[str, str, str, int]], ranks: dict[str, int]) -> Any:
    """A copy of ``proto`` cut at ``sites`` (from :func:`_site_nodes`): each site's codes become a graph output
    and, under the name ``<tensor>__qtoolkit_in``, a graph input its consumers read (module docstring)."""
    import onnx

    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    g = cut.graph
    renames = {out: out + _IN_SUFFIX for _, out, _, _ in sites}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for _, out, site, dtype in sites:
        # every dimension unnamed: a site's leading dimension is not always the batch (attention windows: batch ×
        # windows), and ONNX Runtime's optimizer treats equally named dimensions as equal (a wrong Reshape otherwise)
        shape = [None] * ranks[site]
        g.input.append(onnx.helper.make_tensor_value_info(out + _IN_SUFFIX, dtype, shape))
        g.output.append(onnx.helper.make_tensor_value_info(out, dtype, shape))
    return cut


def _as_batches(data: Any) -> Iterable[Any]:
    return [data] if isinstance(data, Tensor) else data


def _arrays(x: Any, n_inputs: int) -> list[np.ndarray]:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    if len(xs) != n_inputs:
        raise ValueError(f"verify: the deployed model has {n_inputs} input(s) but a batch gave {len(xs)} tensor(s)")
    return [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in xs]


def verify_engine(
    engine: Any,
    settings: dict[str, Any],
    proto: Any,
    runner: Any,
    model: nn.Module,
    data: Any,
    *,
    num_batches: int | None = None,
    sites: bool = True,
) -> EngineVerifyReport:
    """Compare ``runner`` (``proto`` compiled by ``engine`` with ``settings``) with ``model`` on ``data``
    (a tensor or an iterable of batches), end to end and per site (see the module docstring).

    Returns:
        An :class:`EngineVerifyReport`; ``report.faithful`` is False when some site is more than one step
        off, and ``report.first_divergent`` names it.
    """
    site_nodes = _site_nodes(proto, model) if sites else []
    wanted = {s for _, _, s, _ in site_nodes}
    fqs = {fq.name: fq for fq in model.modules() if isinstance(fq, FakeQuantize) and fq.name in wanted}
    captured: dict[str, Tensor] = {}

    def pre_hook(fq: FakeQuantize, args: tuple) -> None:
        if fq.name not in captured:  # a quantizer called twice per forward: its first call is the graph's site
            x = args[0].detach().float()
            captured[fq.name] = quantize(x, fq.scale.float(), fq.zero_point, fq.qmin, fq.qmax).to(torch.int32)

    handles = [fq.register_forward_pre_hook(pre_hook) for fq in fqs.values()]
    report = EngineVerifyReport(engine.name, dict(settings))
    stats: dict[str, list[int]] = {s: [0, 0, 0] for s in wanted}  # max steps, n differ, numel
    cut_runner = None
    num = den = head_num = 0.0
    agree = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(_as_batches(data)):
                if num_batches is not None and i >= num_batches:
                    break
                x = batch_input(batch)
                captured.clear()
                ref = call_model(model, x)
                ref = ref[0] if isinstance(ref, (tuple, list)) else ref
                feed = _arrays(x, len(runner.input_names))
                got = torch.from_numpy(runner(feed)[0]).to(torch.float64)
                r = ref.detach().to("cpu", torch.float64)
                if got.shape != r.shape:
                    from qtoolkit.export.errors import ExportError

                    raise ExportError(
                        f"verify: {engine.name} returned an output of shape {tuple(got.shape)} where the model's is {tuple(r.shape)} "
                        f"(settings {settings}); seen with OpenVINO 2026.4 under ONEDNN_MAX_CPU_ISA=AVX2 for a Linear with uint8 "
                        "weights (target='portable') and a dynamic batch: deploy with target='vnni' and 7-bit weights instead"
                    )
                num += float((got - r).pow(2).sum())
                den += float(r.pow(2).sum())
                report.max_abs_diff = max(report.max_abs_diff, float((got - r).abs().max()) if r.numel() else 0.0)
                if r.dim() == 2:
                    agree += int((got.argmax(1) == r.argmax(1)).sum())
                    total += r.shape[0]
                report.samples += r.shape[0] if r.dim() else 1
                live = [s for s in site_nodes if s[2] in captured]
                if not live:
                    continue
                if cut_runner is None:
                    site_nodes = live
                    cut = cut_at_sites(proto, site_nodes, {s: captured[s].dim() for _, _, s, _ in site_nodes})
                    cut_runner = engine.compile(cut, settings)
                    report.sites_checked = True
                codes = {out + _IN_SUFFIX: captured[s] for _, out, s, _ in site_nodes}
                np_types = {2: np.uint8, 3: np.int8}
                cut_feed = list(feed) + [
                    codes[n].numpy().astype(np_types[d]) for n, d in
                    ((out + _IN_SUFFIX, dt) for _, out, _, dt in site_nodes)
                ]  # fmt: skip
                cut_outs = cut_runner(cut_feed)
                named = dict(zip(cut_runner.output_names, cut_outs))
                head = torch.from_numpy(cut_outs[0]).to(torch.float64)  # the float ops after the last site, teacher-forced
                head_num += float((head.reshape(r.shape) - r).pow(2).sum())
                for _, out, site, _ in site_nodes:
                    if out in named:
                        add_site_diff(stats[site], captured[site], named[out])
                    elif site not in report.unobserved:  # never expected (ports are matched by name): said, not a KeyError
                        report.unobserved.append(site)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    finish_totals(report, "verify", num, den, agree, total)
    for node, _, site, _ in site_nodes:
        if stats.get(site, [0, 0, 0])[2]:
            mx, nd, n = stats[site]
            report.sites.append(SiteDiff(node, site, int(mx), nd / n, int(n)))
    allowed = _allowed_steps(proto, site_nodes) if site_nodes else {}
    report.allowed_steps = {s.site: allowed.get(s.site, 1) for s in report.sites}
    report.first_divergent = next((s for s in report.sites if s.max_steps > report.allowed_steps[s.site]), None)
    if report.sites_checked:
        report.head_rel_l2 = math.sqrt(head_num / den) if den > 0 else 0.0
        if report.first_divergent is None and report.head_rel_l2 > HEAD_TOLERANCE:
            last = site_nodes[-1][2]
            report.first_divergent = SiteDiff(runner.output_names[0], f"the model output (float ops after {last})", 0, 1.0, 0)
    return report

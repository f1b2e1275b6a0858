"""Check an exported Q/DQ ONNX model in ONNX Runtime against the fake-quant model it came from.

:func:`verify_onnx` runs the ``.onnx`` file in ONNX Runtime (CPU, graph optimizations on by default, so
ORT's fused integer kernels — ``QLinearConv``, ``QLinearAdd``, ``QGemm`` — are what is checked) and the
prepared qtoolkit model on the same batches, and reports:

* end to end: top-1 agreement (2-D outputs), SQNR and relative L2 error of ORT's outputs against the
  fake-quant model's;
* per quantization site, **layer by layer**: every activation ``QuantizeLinear`` of the graph is also
  fetched from ORT (its output codes; ORT computes them inside the fused kernels all the same).  The
  fake-quant model then runs again *teacher-forced*: each of its activation quantizers outputs ORT's codes
  for that site instead of its own, so every layer sees exactly ORT's inputs, and the codes each quantizer
  would have produced are compared with ORT's.  A difference there comes from the ops between two sites
  alone, not from earlier drift: two correct implementations differ by one code at rounding ties (summation
  order), a wrong integer kernel by more (e.g. ORT's U8S8 kernels on an x86 CPU without VNNI, whose int16
  pair sums saturate).  The **first site in graph order beyond one step** is named.

Example::

    >>> import torch
    >>> from torch import nn
    >>> import qtoolkit as qt
    >>> qm = qt.calibrate(qt.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()),
    ...                   [torch.randn(4, 3, 16, 16)], progress=False)
    >>> _ = qt.export_onnx(qm, torch.randn(1, 3, 16, 16), "model.onnx")  # doctest: +SKIP
    >>> print(qt.verify_onnx("model.onnx", qm, [torch.randn(4, 3, 16, 16)]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.calibrate import batch_input, call_model
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.numerics import quantize

__all__ = ["OnnxVerifyReport", "SiteDiff", "verify_onnx"]

_LEVELS = ("none", "basic", "extended", "all")


@dataclass
class SiteDiff:
    """Codes of one activation quantization site: ORT vs the fake-quant model."""

    node: str  # the QuantizeLinear node of the exported graph
    site: str  # the qtoolkit quantizer (e.g. ``layer1.0.conv1.input_quantizer``)
    max_steps: int  # largest |ORT code - fake-quant code|
    frac_differ: float  # share of codes that differ at all
    numel: int


@dataclass
class OnnxVerifyReport:
    """What :func:`verify_onnx` measured (``str(report)`` is a readable summary).

    Attributes:
        path: the ONNX file.  optimization: ORT's graph optimization level used.
        samples: number of inputs compared.
        top1_agreement: share of samples whose argmax agrees (None unless the output is ``[N, classes]``).
        sqnr_db: ``10·log10(Σ ref² / Σ (ort − ref)²)`` over all outputs (inf when identical).
        rel_l2: ``‖ort − ref‖ / ‖ref‖``.
        max_abs_diff: the largest absolute output difference.
        sites: per activation site, in graph order.
        first_divergent: the first site whose codes differ by more than one step, or None.
    """

    path: str
    optimization: str
    samples: int = 0
    top1_agreement: float | None = None
    sqnr_db: float = math.inf
    rel_l2: float = 0.0
    max_abs_diff: float = 0.0
    sites: list[SiteDiff] = field(default_factory=list)
    first_divergent: SiteDiff | None = None

    @property
    def faithful(self) -> bool:
        """No site more than one step off: ORT computes what the fake-quant model does, up to rounding ties."""
        return self.first_divergent is None

    def __str__(self) -> str:
        agree = "-" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        lines = [
            f"ONNX Runtime ({self.optimization} optimizations) vs the fake-quant model on {self.samples} inputs: "
            f"top-1 agreement {agree}, SQNR {self.sqnr_db:.1f} dB, relative L2 {self.rel_l2:.4f}, "
            f"max |diff| {self.max_abs_diff:.4g}",
        ]
        if self.sites:
            worst = max(self.sites, key=lambda s: (s.max_steps, s.frac_differ))
            lines.append(
                f"{len(self.sites)} activation sites compared code for code; worst: {worst.site} "
                f"(max {worst.max_steps} steps, {100 * worst.frac_differ:.3f}% of codes differ)"
            )
        if self.first_divergent is None:
            lines.append("faithful: every site within one quantization step (rounding ties only)")
        else:
            d = self.first_divergent
            lines.append(
                f"NOT faithful: first site beyond one step is {d.site} (node {d.node}): max {d.max_steps} steps, "
                f"{100 * d.frac_differ:.3f}% of its codes differ"
            )
        return "\n".join(lines)


def add_site_diff(st: list, mine: Tensor, theirs: Any) -> None:
    """Add one batch's code differences at a site to ``st`` = ``[max steps, differing codes, codes]``."""
    d = (torch.from_numpy(theirs.astype("int32")).reshape(mine.shape) - mine).abs()  # theirs: a numpy array
    st[0] = max(st[0], int(d.max()) if d.numel() else 0)
    st[1] += int((d > 0).sum())
    st[2] += d.numel()


def finish_totals(report: Any, who: str, num: float, den: float, agree: int, total: int) -> None:
    """End-to-end SQNR, relative L2 and top-1 agreement from the accumulated sums (raises if no batch ran)."""
    if report.samples == 0:
        raise ValueError(f"{who}: `data` yielded no batches")
    report.sqnr_db = math.inf if num == 0 else 10.0 * math.log10(den / num) if den > 0 else -math.inf
    report.rel_l2 = math.sqrt(num / den) if den > 0 else math.inf
    report.top1_agreement = agree / total if total else None


def _site_of(scale_name: str) -> str | None:
    """``layer1.0.conv1.input_site.scale`` -> ``layer1.0.conv1.input_quantizer`` (export's naming)."""
    if not scale_name.endswith("_site.scale"):
        return None
    return scale_name[: -len("_site.scale")] + "_quantizer"


def _as_batches(data: Any) -> Iterable[Any]:
    return [data] if isinstance(data, Tensor) else data


def _numpy_feed(names: list[str], x: Any) -> dict[str, Any]:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    if len(xs) != len(names):
        raise ValueError(f"verify_onnx: the model has inputs {names} but a batch gave {len(xs)} input tensor(s)")
    return {n: t.detach().to("cpu", torch.float32).contiguous().numpy() for n, t in zip(names, xs)}


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    data: Any,
    *,
    optimization: str = "all",
    threads: int | None = None,
    num_batches: int | None = None,
    sites: bool = True,
) -> OnnxVerifyReport:
    """Run ``path`` in ONNX Runtime and ``model`` (the prepared fake-quant model it was exported from) on
    ``data``; compare outputs and every activation site's codes (see the module docstring).

    Args:
        path: an ``.onnx`` file written by :func:`qtoolkit.export_onnx`.
        model: the prepared + calibrated model that was exported (not the converted one).
        data: a tensor, or an iterable of batches as :func:`qtoolkit.calibrate` takes (tensors,
            ``(input, target)`` pairs, dicts).
        optimization: ORT graph optimization level: ``"all"`` (default: fused integer kernels, as
            deployed), ``"extended"``, ``"basic"`` or ``"none"`` (Q/DQ emulated in float).
        threads: ORT intra-op threads (default: torch's thread count).
        num_batches: stop after this many batches.
        sites: also compare the codes of every activation site (default True).

    Returns:
        An :class:`OnnxVerifyReport`; ``report.faithful`` is False when some site is more than one step off,
        and ``report.first_divergent`` names it.

    Example::

        >>> report = verify_onnx("model.onnx", qm, test_batches, num_batches=4)  # doctest: +SKIP
        >>> report.faithful, report.top1_agreement  # doctest: +SKIP
        (True, 1.0)
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("verify_onnx needs onnx and onnxruntime: pip install 'qtoolkit[export]'") from e
    if optimization not in _LEVELS:
        raise ValueError(f"verify_onnx: optimization must be one of {_LEVELS}, got {optimization!r}")
    if any(type(m).__name__ in ("Int8Layer", "Int8Add") for m in model.modules()):
        raise TypeError("verify_onnx: pass the prepared (fake-quant) model that was exported, not the converted one")
    path = os.fspath(path)
    proto = onnx.load(path)
    inits = {i.name for i in proto.graph.initializer}
    q_nodes: list[tuple[str, str, str]] = []  # (node name, output tensor, site)
    graph_outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 1 and node.input[1] in inits:
            site = _site_of(node.input[1])
            if site is not None:
                q_nodes.append((node.name or node.output[0], node.output[0], site))
    n_model_outputs = len(proto.graph.output)
    if sites:
        for _, out, _ in q_nodes:
            if out not in graph_outputs:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]

    fqs = {fq.name: fq for fq in model.modules() if isinstance(fq, FakeQuantize) and fq.role == "activation"}
    wanted = {site for _, _, site in q_nodes if site in fqs} if sites else set()
    captured: dict[str, Tensor] = {}  # site -> the codes the fake-quant model computes (teacher-forced run)
    forced: dict[str, Tensor] = {}  # site -> ORT's codes for it
    forcing = [False]

    def pre_hook(fq: FakeQuantize, args: tuple) -> None:
        if forcing[0]:
            x = args[0]
            captured[fq.name] = quantize(x.detach().float(), fq.scale, fq.zero_point, fq.qmin, fq.qmax).to(torch.int32)

    def post_hook(fq: FakeQuantize, args: tuple, out: Tensor) -> Tensor | None:
        codes = forced.get(fq.name) if forcing[0] else None
        if codes is None or codes.numel() != out.numel():
            return None
        y = (codes.reshape(out.shape).to(torch.float32) - fq.zero_point.float()) * fq.scale.float()
        return y.to(out.dtype)

    handles = [fqs[s].register_forward_pre_hook(pre_hook) for s in wanted]
    handles += [fqs[s].register_forward_hook(post_hook) for s in wanted]
    report = OnnxVerifyReport(path=path, optimization=optimization)
    stats: dict[str, list[float]] = {s: [0, 0, 0] for s in wanted}  # max steps, n differ, numel
    num = den = 0.0
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
                forced.clear()
                ref = call_model(model, x)
                ref = ref[0] if isinstance(ref, (tuple, list)) else ref
                outs = sess.run(out_names, _numpy_feed(in_names, x))
                got = torch.from_numpy(outs[0]).to(torch.float64)
                r = ref.detach().to("cpu", torch.float64)
                if got.shape != r.shape:
                    raise ValueError(f"verify_onnx: ORT output {tuple(got.shape)} vs model output {tuple(r.shape)}")
                num += float((got - r).pow(2).sum())
                den += float(r.pow(2).sum())
                report.max_abs_diff = max(report.max_abs_diff, float((got - r).abs().max()) if r.numel() else 0.0)
                if r.dim() == 2:
                    agree += int((got.argmax(1) == r.argmax(1)).sum())
                    total += r.shape[0]
                report.samples += r.shape[0] if r.dim() else 1
                if not wanted:
                    continue
                for (_, _, site), arr in zip(q_nodes, outs[n_model_outputs:]):
                    if site in stats:
                        forced[site] = torch.from_numpy(arr.astype("int32"))
                forcing[0] = True
                try:
                    call_model(model, x)  # teacher-forced: every quantizer outputs ORT's codes
                finally:
                    forcing[0] = False
                for (_, _, site), arr in zip(q_nodes, outs[n_model_outputs:]):
                    if site not in stats or site not in captured:
                        continue
                    add_site_diff(stats[site], captured[site], arr)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    finish_totals(report, "verify_onnx", num, den, agree, total)
    for name, _, site in q_nodes:
        if site in stats and stats[site][2]:
            mx, nd, n = stats[site]
            report.sites.append(SiteDiff(name, site, int(mx), nd / n, int(n)))
    report.first_divergent = next((s for s in report.sites if s.max_steps > 1), None)
    return report

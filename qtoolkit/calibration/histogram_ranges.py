"""Histogram calibrators: pick a clip range ``(lo, hi)`` from a histogram.

Pure functions (no ``nn.Module``, no state), used by
:class:`~qtoolkit.calibration.HistogramObserver` and re-exported by
:mod:`qtoolkit.calibration` (the module to import them from). Each returns two
0-d float32 tensors ``(lo, hi)``, ready for
:func:`qtoolkit.numerics.compute_qparams`.

``hist`` holds counts (any numeric dtype) and ``edges`` the ``len(hist) + 1``
increasing bin edges; mass is assumed uniform inside a bin (see
:mod:`qtoolkit.calibration` for the conventions and the methods).

Example::

    >>> import torch
    >>> h, e = torch.ones(100), torch.linspace(-1.0, 1.0, 101)
    >>> lo, hi = percentile_range(h, e, 99.0, symmetric=True)
    >>> round(float(hi), 4), bool(lo == -hi)
    (0.99, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qtoolkit.numerics import compute_qparams

__all__ = [
    "abs_histogram",
    "percentile_range",
    "entropy_range",
    "mse_range",
    "expected_quant_mse",
]

#: Q-smoothing for the KL divergence: a zero bin of Q where P > 0 gets this
#: probability instead of 0 (MXNet/TensorRT-style smoothing of zeros).
KL_EPS: float = 1e-10


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _check_hist(hist: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    hist = torch.as_tensor(hist)
    edges = torch.as_tensor(edges, device=hist.device)
    if hist.dim() != 1 or edges.dim() != 1 or edges.numel() != hist.numel() + 1:
        raise ValueError(
            f"need a 1-D histogram and len(hist) + 1 edges, got hist {tuple(hist.shape)} and edges {tuple(edges.shape)}"
        )
    if hist.numel() < 1:
        raise ValueError("empty histogram")
    h = hist.to(torch.float64)
    e = edges.to(torch.float64)
    if not bool(torch.isfinite(e).all()) or not bool((e[1:] > e[:-1]).all()):
        raise ValueError("histogram edges must be finite and strictly increasing")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("histogram counts must be finite and >= 0")
    if not bool(h.sum() > 0):
        raise ValueError("histogram is empty (total count 0); observe some data first")
    return h, e


def _f32(v: Tensor | float, device: torch.device) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=device).to(torch.float32)


def _occupied(h: Tensor) -> tuple[int, int]:
    """Indices of the first and last non-empty bins."""
    nz = torch.nonzero(h > 0).flatten()
    return int(nz[0]), int(nz[-1])


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` for increasing ``xp`` (clamped at both ends)."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[i - 1], xp[i]
    f0, f1 = fp[i - 1], fp[i]
    t = (x - x0) / (x1 - x0)
    return f0 + t * (f1 - f0)


def abs_histogram(hist: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Histogram of ``|x|`` (float64 counts, edges from 0) from a histogram of ``x``.

    The result keeps the input's bin width and ends at the last occupied edge.
    When 0 is an edge of a uniform input grid (as in
    :class:`~qtoolkit.calibration.HistogramObserver`), the fold is exact: bin
    ``[-(k+1)w, -kw)`` lands in ``[kw, (k+1)w)``. Otherwise mass is redistributed
    linearly within bins.

    Example::

        >>> h, e = abs_histogram(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
        >>> h.tolist(), e.tolist()
        ([5.0, 5.0], [0.0, 1.0, 2.0])
    """
    h, e = _check_hist(hist, edges)
    first, last = _occupied(h)
    lo_occ, hi_occ = float(e[first]), float(e[last + 1])
    amax = max(-lo_occ, hi_occ, 0.0)
    width = float((e[-1] - e[0]) / h.numel())
    n = max(1, math.ceil(amax / width - 1e-6))
    new_edges = torch.arange(n + 1, dtype=torch.float64, device=h.device) * width
    new_edges[-1] = max(float(new_edges[-1]), amax)
    k0 = float(e[0]) / width
    if _uniform(e) and abs(k0 - round(k0)) < 1e-6:
        # 0 lies on the bin lattice: fold exactly, bin k >= 0 -> k, bin k < 0 -> -k - 1
        k = torch.arange(h.numel(), device=h.device) + round(k0)
        idx = torch.where(k >= 0, k, -k - 1).clamp(max=n - 1)
        out = torch.zeros(n, dtype=torch.float64, device=h.device)
        out.index_add_(0, idx, h)
        return out, new_edges
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=h.device), torch.cumsum(h, 0)])
    mass_within = _interp(new_edges, e, cdf) - _interp(-new_edges, e, cdf)  # mass in [-t, t]
    out = torch.diff(mass_within).clamp(min=0.0)
    # Put any rounding residue in the last bin so that the total is preserved.
    out[-1] += cdf[-1] - out.sum()
    return out.clamp(min=0.0), new_edges


def _uniform(e: Tensor) -> bool:
    d = torch.diff(e)
    return bool((d - d.mean()).abs().max() <= 1e-9 * d.mean().abs())


def _hist_quantile(h: Tensor, e: Tensor, q: float) -> float:
    """Value below which a fraction ``q`` of the mass lies (linear within a bin)."""
    cdf = torch.cumsum(h, 0)
    total = float(cdf[-1])
    if q >= 1.0:
        return float(e[_occupied(h)[1] + 1])
    target = max(q * total, 1e-12 * total)
    b = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype, device=cdf.device), right=False)[0])
    b = min(b, h.numel() - 1)
    before = float(cdf[b - 1]) if b > 0 else 0.0
    frac = (target - before) / max(float(h[b]), 1e-300)
    frac = min(max(frac, 0.0), 1.0)
    return float(e[b] + frac * (e[b + 1] - e[b]))


def _check_percentile(percentile: float) -> float:
    p = float(percentile)
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return p


# --------------------------------------------------------------------------------------
# histogram calibrators
# --------------------------------------------------------------------------------------


def percentile_range(hist: Tensor, edges: Tensor, percentile: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Clip range at a percentile of a histogram.

    * ``symmetric=True``: ``t`` = the ``percentile``-th percentile of ``|x|``;
      returns ``(-t, t)``.
    * ``symmetric=False``: ``lo`` = the ``(100 - percentile)``-th and ``hi`` = the
      ``percentile``-th percentile of ``x`` (both tails clip ``100 - percentile``
      percent of the mass; ``percentile=99.99`` drops 0.01 % at each end).

    Mass is taken as uniform inside a bin, so the result is within one bin
    width of the exact sample percentile. ``percentile=100`` gives the occupied
    extent of the histogram.

    Example::

        >>> h = torch.ones(100); e = torch.linspace(0.0, 1.0, 101)
        >>> lo, hi = percentile_range(h, e, 90.0, symmetric=False)
        >>> round(float(lo), 4), round(float(hi), 4)
        (0.1, 0.9)
    """
    p = _check_percentile(percentile) / 100.0
    if symmetric:
        ha, ea = abs_histogram(hist, edges)
        t = _hist_quantile(ha, ea, p)
        return _f32(-t, ha.device), _f32(t, ha.device)
    h, e = _check_hist(hist, edges)
    lo = _hist_quantile(h, e, 1.0 - p) if p < 1.0 else float(e[_occupied(h)[0]])
    hi = _hist_quantile(h, e, p)
    return _f32(lo, h.device), _f32(hi, h.device)


def _xlogx(a: Tensor) -> Tensor:
    return torch.where(a > 0, a * torch.log(a.clamp(min=1e-300)), torch.zeros_like(a))


#: elements per temporary in the vectorized searches: below ATen's parallel grain
#: size (32768), so each op runs on one thread — no OpenMP barrier per op, which
#: costs milliseconds on a loaded machine, for tensors this small.
_SERIAL_ELEMS = 32767


def _kl_divergences(h: Tensor, num_levels: int, candidates: Tensor, chunk: int | None = None) -> Tensor:
    """KL(P || Q) for every candidate threshold bin count ``i`` in ``candidates``.

    ``P`` = ``h[:i]`` with the outliers' mass (``h[i:]``) added to its last bin;
    ``Q`` = ``h[:i]`` (without outliers, as in TensorRT) merged into
    ``num_levels`` groups of consecutive bins (bin ``j`` belongs to group
    ``floor(j · L / i)``), each group's mass spread uniformly over the bins where
    ``P`` is non-zero. Both are normalized; zeros of ``Q`` where ``P > 0`` get
    :data:`KL_EPS`.

    Evaluated per *group* rather than per bin: ``Q`` is constant on a group's
    non-zero bins, so ``Σ p log q = Σ_g P_g log q_g`` and ``Σ p log p`` comes
    from a prefix sum of ``h log h``. Every term is a difference of prefix sums
    at group boundaries: ``O(candidates × levels)`` work, vectorized over
    ``chunk`` candidates at a time.
    """
    dev = h.device
    L = num_levels
    f64 = torch.float64
    zero = torch.zeros(1, dtype=f64, device=dev)
    cs = torch.cat([zero, torch.cumsum(h, 0)])  # cs[k] = sum(h[:k])
    cnz = torch.cat([zero, torch.cumsum((h > 0).to(f64), 0)])  # non-zero bins in h[:k]
    chl = torch.cat([zero, torch.cumsum(_xlogx(h), 0)])  # sum(h log h) over h[:k]
    total = cs[-1]
    log_total = torch.log(total)
    all_bounds = _group_bounds(L, h.numel(), dev)
    log_eps = math.log(KL_EPS)
    chunk = chunk or max(1, _SERIAL_ELEMS // (L + 1))
    out = []
    for start in range(0, candidates.numel(), chunk):
        i = candidates[start : start + chunk].to(torch.int64)  # [c]
        c = i.numel()
        q_sum = cs[i]  # Q's unnormalized mass (no outliers)
        outliers = total - q_sum
        h_last = h[i - 1]
        # sum p log p, p = a / total with a = h[:i] and the outliers added to the last bin
        s1 = (chl[i - 1] + _xlogx(h_last + outliers)) / total - log_total
        bounds = all_bounds.index_select(0, i).view(-1)  # [c·(L+1)]
        cb = cs.index_select(0, bounds).view(c, L + 1)
        mass = cb[:, 1:] - cb[:, :-1]  # [c, L] group masses
        nb = cnz.index_select(0, bounds).view(c, L + 1)
        n_nz = nb[:, 1:] - nb[:, :-1]  # bins where P > 0 ...
        n_nz[:, -1] += ((outliers > 0) & (h_last == 0)).to(f64)  # ... the last one also via the outliers
        # sum p log q with q = mass / (n_nz · q_sum) on P's non-zero bins: groups of zero mass hold no P except
        # the last (outliers), where q = KL_EPS
        log_m = torch.div(mass, n_nz.clamp_(min=1.0)).clamp_(min=1e-300).log_()
        p_eps = (mass[:, -1] == 0).to(f64) * outliers / total  # P's mass where Q is 0
        s2 = ((torch.linalg.vecdot(mass, log_m) + (mass[:, -1] > 0) * outliers * log_m[:, -1]) / total
              - torch.log(q_sum.clamp(min=1e-300)) * (1.0 - p_eps) + p_eps * log_eps)
        out.append(s1 - s2)
    return torch.cat(out)


_GROUP_BOUNDS: dict[tuple[int, torch.device], Tensor] = {}


def _group_bounds(num_levels: int, n: int, device: torch.device) -> Tensor:
    """At least ``n + 1`` rows of int64: row ``i`` holds the first bins ``ceil(g·i / L)`` of candidate ``i``'s
    groups ``g = 0..L``. A row depends only on ``i`` and ``L``, not on the histogram: one table per ``(L, device)``
    (2,049 rows, ~4 MB for L = 256), doubled when a longer histogram comes. Exact: the floor of a float64 quotient
    of integers < 2^53."""
    table = _GROUP_BOUNDS.get((num_levels, device))
    if table is None or table.shape[0] <= n:
        L, rows = num_levels, max(n + 1, 2049 if table is None else 2 * table.shape[0])
        i = torch.arange(rows, dtype=torch.float64, device=device)
        g = torch.arange(L + 1, dtype=torch.float64, device=device)
        table = _GROUP_BOUNDS[(num_levels, device)] = torch.outer(i, g).add_(L - 1).div_(L).floor_().to(torch.int64)
    return table


def entropy_range(
    hist: Tensor,
    edges: Tensor,
    bits: int,
    symmetric: bool,
    *,
    num_levels: int | None = None,
    start_bin: int | None = None,
    stride: int = 1,
    max_clip_fraction: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """TensorRT's entropy (KL-divergence) calibration on a histogram.

    The search runs on the histogram of ``|x|`` (:func:`abs_histogram`; for
    non-negative data that is ``x`` itself). For every candidate threshold bin
    ``i`` from ``start_bin`` (default: the number of levels) to the last occupied
    bin, the reference ``P`` (first ``i`` bins, outliers added to the last) is
    compared with ``Q`` (the first ``i`` bins merged into ``num_levels`` levels and
    expanded back); the threshold with the least ``KL(P || Q)`` wins (the largest
    one on ties). As in NVIDIA's pytorch-quantization, the first bin's count is
    replaced by the second's before the search so that a spike of exact zeros
    (ReLU outputs, padding; 0 is exactly representable anyway) does not drag the
    threshold down.

    **Clipping guard** (``max_clip_fraction``, default 0.05): only thresholds that keep at least
    95% of the (half-)histogram's mass are candidates.  KL(P‖Q) does not measure how far clipped
    values move: their mass only enters P's last bin.  With few levels (4-bit: 8 or 16) the first
    candidates hold one histogram bin per level, so Q equals P on everything kept, while spreading
    a broad or spiky distribution over coarse levels costs more KL than clipping most of the mass:
    on the shipped ResNet-20 (Fashion-MNIST), W4A4 put the input's range at [-0.011, 0.012] of
    [-0.81, 2.02] (99.6% of the pixels clipped) and the model at 7.8% top-1.  At 8 bits the chosen
    thresholds clip well under the guard (≤ 1.5% on that model) and are unchanged by it.  Values
    close to 1 give TensorRT's unguarded search.

    Levels and the returned range:

    * ``symmetric=True``: ``num_levels = 2^(bits-1)`` (128 for int8, as TensorRT);
      returns ``(-t, t)``.
    * ``symmetric=False`` and non-negative data (no mass below 0):
      ``num_levels = 2^bits``; returns ``(0, t)`` (mirrored for non-positive data).
    * ``symmetric=False`` and two-sided data: each tail is searched separately on
      its own one-sided histogram with ``2^(bits-1)`` levels (a spike in one tail,
      such as the background value of normalized images, cannot clip the other);
      returns ``(max(min_x, -t_neg), min(max_x, t_pos))`` with ``min_x``/``max_x``
      the histogram's occupied extent.

    Fully vectorized; 2048 bins take well under 0.5 s on two CPU cores.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(200_000, generator=g), torch.tensor([40.0, -40.0])])
        >>> h = torch.histc(x, 2048, -40.0, 40.0); e = torch.linspace(-40.0, 40.0, 2049)
        >>> lo, hi = entropy_range(h, e, bits=8, symmetric=True)
        >>> bool(2.0 < hi < 20.0)
        True
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive int, got {bits!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0.0 <= float(max_clip_fraction) < 1.0:
        raise ValueError(f"max_clip_fraction must be in [0, 1), got {max_clip_fraction}")
    h, e = _check_hist(hist, edges)
    first, last = _occupied(h)
    lo_occ, hi_occ = float(e[first]), float(e[last + 1])
    # by bin centres: a bin straddling 0 belongs to the side of its centre (by edges, the one-sided
    # halves below would look two-sided again and recurse forever)
    two_sided = float(e[first] + e[first + 1]) < 0.0 < float(e[last] + e[last + 1])
    one_sided = not symmetric and not two_sided
    levels = num_levels if num_levels is not None else (2**bits if one_sided else 2 ** (bits - 1))
    if levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {levels}")
    if two_sided and not symmetric:
        # Asymmetric grid, two-sided data: search each tail on its own one-sided
        # histogram. Folding |x| would let one side's spike (e.g. the background
        # pixel value of normalized images) pick the threshold for the other tail.
        centers = (e[:-1] + e[1:]) / 2
        kw = {"num_levels": levels, "start_bin": start_bin, "stride": stride, "max_clip_fraction": max_clip_fraction}
        _, t_pos = entropy_range(torch.where(centers > 0, h, torch.zeros_like(h)), e, bits, False, **kw)
        t_neg, _ = entropy_range(torch.where(centers < 0, h, torch.zeros_like(h)), e, bits, False, **kw)
        return _f32(max(lo_occ, float(t_neg)), h.device), _f32(min(hi_occ, float(t_pos)), h.device)
    ha, ea = abs_histogram(h, e)
    n = _occupied(ha)[1] + 1  # search up to the last occupied bin
    ha = ha[:n].clone()
    if n >= 2:
        ha[0] = ha[1]
    start = levels if start_bin is None else max(int(start_bin), 1)
    if n <= start or ha.sum() <= 0:
        t = float(ea[n])
    else:
        cands = torch.arange(start, n + 1, stride, device=ha.device)
        # the clipping guard (docstring): thresholds that clip more than max_clip_fraction of the mass are out
        kept = torch.cumsum(ha, 0)
        ok = kept[cands - 1] >= (1.0 - float(max_clip_fraction)) * kept[-1]
        ok[-1] = True  # the last candidate clips nothing (or only the stride's remainder)
        cands = cands[ok]
        kl = _kl_divergences(ha, levels, cands)
        kl = torch.nan_to_num(kl, nan=float("inf"))
        best = int(kl.numel() - 1 - torch.argmin(torch.flip(kl, [0])))
        t = float(ea[int(cands[best])])
    dev = h.device
    if symmetric:
        return _f32(-t, dev), _f32(t, dev)
    if not two_sided:
        return (_f32(0.0, dev), _f32(t, dev)) if hi_occ > 0.0 else (_f32(-t, dev), _f32(0.0, dev))
    return _f32(max(lo_occ, -t), dev), _f32(min(hi_occ, t), dev)


def expected_quant_mse(
    hist: Tensor, edges: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool
) -> Tensor:
    """Expected squared fake-quantization error under a histogram, per candidate range.

    ``lo``/``hi`` are 1-D tensors of candidate ranges; their qparams come from
    :func:`qtoolkit.numerics.compute_qparams`, so the grid (scale, rounded zero
    point, clamp limits) is exactly the one that will be used. Mass is uniform
    inside each bin and the error integral is evaluated in closed form: clipping
    error ``(x - A)²`` below ``A = s·(qmin - z)``, ``(x - B)²`` above
    ``B = s·(qmax - z)``, rounding error ``s³ · (G(v/s) - G(u/s))`` in between,
    with ``G`` the integral of ``(v - round v)²``. Returns the mean squared error
    per candidate (float64). Each bin's integral is a difference of one function at
    its two edges, so the sum over bins telescopes: one evaluation per edge.

    Example::

        >>> h = torch.ones(1000); e = torch.linspace(-1.0, 1.0, 1001)
        >>> err = expected_quant_mse(h, e, torch.tensor([-1.0]), torch.tensor([1.0]), -127, 127, True)
        >>> bool(abs(float(err[0]) - (1 / 127) ** 2 / 12) < 1e-9)
        True
    """
    h, e = _check_hist(hist, edges)
    lo = torch.as_tensor(lo, device=h.device).reshape(-1)
    hi = torch.as_tensor(hi, device=h.device).reshape(-1)
    scale, zp = compute_qparams(lo, hi, qmin, qmax, symmetric)
    first, last = _occupied(h)
    hh, ee = h[first : last + 1], e[first : last + 2]  # empty bins outside contribute nothing
    density = hh / (ee[1:] - ee[:-1])  # counts per unit length
    # Every term is an integral of a per-candidate function over each bin, F(e_{b+1}) - F(e_b) weighted by
    # the bin's density d_b: telescoped, sum_b d_b (F(e_{b+1}) - F(e_b)) = sum_k F(e_k) (d_{k-1} - d_k),
    # so F is evaluated once per edge and the sum over edges is one matrix-vector product.
    zero = density.new_zeros(1)
    dd = torch.cat([zero, density]) - torch.cat([density, zero])
    keep = dd != 0  # edges between bins of equal density (runs of empty bins in a sparse tail) add nothing
    ee, dd = ee[keep], dd[keep]
    step = max(1, _SERIAL_ELEMS // ee.numel())
    out = []
    for k0 in range(0, scale.numel(), step):
        s = scale[k0 : k0 + step].to(torch.float64).unsqueeze(1)  # [k, 1]
        z = zp[k0 : k0 + step].to(torch.float64).unsqueeze(1)
        a_clip = s * (qmin - z)
        b_clip = s * (qmax - z)
        c = torch.clamp(ee, a_clip, b_clip)  # the edges clipped to [A, B]
        over = ee - c  # x - A below A, x - B above B, 0 inside
        # rounding error inside [A, B]: s³ · G(c / s), G(u) = n/12 + r³/3 + 1/24 with n = round(u), r = u - n
        # (continuous at the ties, so round's half-to-even is fine); the constant telescopes away (dd sums to 0)
        u = c / s
        n = torch.round(u)
        f = u.sub_(n).pow_(3).mul_(1.0 / 3.0).add_(n, alpha=1.0 / 12.0).mul_(s**3)
        f.addcmul_(over * over, over, value=1.0 / 3.0)  # clipped: (x - A)² integrates to (x - A)³ / 3
        out.append(f @ dd)
    return torch.cat(out) / hh.sum()


def mse_range(
    hist: Tensor,
    edges: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    *,
    num_candidates: int = 200,
) -> tuple[Tensor, Tensor]:
    """Clip range minimizing the expected squared quantization error (clip + round).

    Candidates shrink the histogram's occupied range ``[lo_x, hi_x]`` (widened to
    include 0) by factors ``k / num_candidates``, ``k = 1..num_candidates``:
    ``(α·lo_x, α·hi_x)`` (for ``symmetric`` only ``α·max(|lo_x|, |hi_x|)``
    matters). Each candidate's error is :func:`expected_quant_mse` — exact for
    piecewise-uniform data, vectorized over candidates and bins.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
        >>> h = torch.histc(x, 2048, float(x.min()), float(x.max()))
        >>> e = torch.linspace(float(x.min()), float(x.max()), 2049)
        >>> lo, hi = mse_range(h, e, -8, 7, symmetric=True)
        >>> bool(hi < 0.6 * x.abs().max())
        True
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    h, e = _check_hist(hist, edges)
    first, last = _occupied(h)
    lo_x, hi_x = min(float(e[first]), 0.0), max(float(e[last + 1]), 0.0)
    if symmetric:
        amax = max(-lo_x, hi_x)
        lo_x, hi_x = -amax, amax
    alphas = torch.arange(1, num_candidates + 1, dtype=torch.float64, device=h.device) / num_candidates
    lo_c, hi_c = alphas * lo_x, alphas * hi_x
    err = expected_quant_mse(h, e, lo_c, hi_c, qmin, qmax, symmetric)
    best = int(torch.argmin(err))
    return lo_c[best].to(torch.float32), hi_c[best].to(torch.float32)

"""Quantization ranges from observed statistics: min-max, percentile, entropy (KL) and MSE.

Every method but ``minmax`` reads a streamed ``HistogramObserver`` (2048 bins, re-binned as the
range grows), so memory does not depend on the number of samples.

- ``minmax``: the observed extremes.
- ``percentile``: the (100 - p) and p percentiles of the histogram (``p`` default 99.99).
- ``entropy``: the clip threshold whose 128-level (255 for a non-negative tensor) quantized
  distribution is closest to the observed one in KL divergence (TensorRT's method, run on the
  magnitude histogram; candidate thresholds start at the number of levels, so a few outliers can
  never collapse the range to a handful of bins; a candidate whose clipped mass would fall in an
  empty bin has infinite divergence and is skipped).
- ``mse``: the clip range, shrunk from the observed one, that minimizes the expected squared error
  of quantize-dequantize over the histogram: clipping error of the values outside, plus uniform
  rounding noise (scale^2 / 12) for those inside.
"""

from __future__ import annotations

__all__ = ["METHODS", "DEFAULT_PERCENTILE", "calibrate", "channel_absmax", "gram_matrices", "range_of", "percentile_range", "entropy_range", "mse_range"]

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OptionError
from onnxopt.observe import ChannelAbsMaxObserver, ChannelMeanObserver, HistogramObserver, MinMaxObserver, observe

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99
ENTROPY_FLOOR = 99.99  # percentile of |x| below which the entropy threshold never goes


def calibrate(
    model: ir.Model,
    tensors: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    activations: str = "uint8",
    bins: int = 2048,
    providers: str | Sequence[str] = "cpu",
    total: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    channel_means: dict[str, ChannelMeanObserver] | None = None,
) -> dict[str, tuple[float, float]]:
    """Run ``model`` over ``batches`` once and return ``{tensor: (lo, hi)}`` by ``method``.

    ``channel_means`` (tensor → observer) are fed in the same pass: bias correction reads them.
    """
    if method not in METHODS:
        raise OptionError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    if not 50.0 < percentile <= 100.0:
        raise OptionError(f"percentile {percentile}: must be in (50, 100]")
    make = MinMaxObserver if method == "minmax" else (lambda: HistogramObserver(bins))
    observers = {name: make() for name in tensors}
    means = channel_means or {}

    def update(name: str, array: np.ndarray) -> None:
        if name in observers:
            observers[name].update(array)
        if name in means:
            means[name].update(array)

    start = time.perf_counter()
    count = observe(
        model, list(dict.fromkeys([*tensors, *means])), batches, update,
        providers=providers, total=total, progress=progress, where="calibration batch",
    )
    logger.info("calibrate: %d tensors over %d batches in %.2fs", len(observers), count, time.perf_counter() - start)
    ranges = {}
    for name, obs in observers.items():
        r = range_of(obs, method, percentile=percentile, activations=activations)
        if r is not None:
            ranges[name] = r
    return ranges


def channel_absmax(
    model: ir.Model,
    tensors: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    providers: str | Sequence[str] = "cpu",
    total: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max|x| of each of ``tensors`` over ``batches``, streamed: what
    SmoothQuant needs. A run of its own, before ranges are calibrated: smoothing changes the very
    tensors whose ranges calibration then measures (padding included: it is quantized too)."""
    observers = {name: ChannelAbsMaxObserver(-1) for name in tensors}
    observe(model, list(observers), batches, lambda name, array: observers[name].update(array),
            providers=providers, total=total, progress=progress, where="calibration batch")
    return {name: obs.absmax for name, obs in observers.items() if obs.absmax is not None}


def gram_matrices(
    model: ir.Model,
    tensors: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    providers: str | Sequence[str] = "cpu",
    total: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    mask: str | None = None,
) -> dict[str, np.ndarray]:
    """``X^T X`` (float64, K x K) of each of ``tensors`` over ``batches``, streamed: what GPTQ needs.

    ``X`` is the tensor with every leading position flattened into rows (``[..., K] -> [rows, K]``).
    With ``mask`` (an attention-mask graph input, ``[batch, sequence]``, 0 at padding), the rows of a
    ``[batch, sequence, K]`` (or ``[batch * sequence, K]``) tensor at padding positions are left out;
    a tensor of another layout keeps every row. One run over the data for all tensors; memory is
    ``8 K^2`` bytes per tensor (a 1536-wide input: 18 MiB), plus one run's exposed tensors
    (``onnxopt.observe``)."""
    grams: dict[str, np.ndarray] = {}
    names = list(dict.fromkeys(tensors))
    keep: list[np.ndarray | None] = [None]  # the current part's mask: observe gives inputs first

    def update(name: str, array: np.ndarray) -> None:
        if name == mask:
            keep[0] = np.asarray(array) != 0
            if name not in names:
                return
        x = np.asarray(array)
        if x.ndim == 0 or x.size == 0:
            return
        rows = keep[0]
        x = x.reshape(-1, x.shape[-1])
        if rows is not None and (array.shape[:-1] == rows.shape or (array.ndim == 2 and len(x) == rows.size)):
            x = x[rows.reshape(-1)]
        x = x.astype(np.float64)
        gram = x.T @ x
        if name in grams:
            grams[name] += gram
        else:
            grams[name] = gram

    observe(model, ([mask] if mask else []) + [n for n in names if n != mask], batches, update, providers=providers,
            total=total, progress=progress, where="calibration batch")
    return grams


def range_of(observer: MinMaxObserver, method: str, *, percentile: float = DEFAULT_PERCENTILE,
             activations: str = "uint8") -> tuple[float, float] | None:
    if observer.count == 0:
        return None
    if method == "minmax" or not isinstance(observer, HistogramObserver) or observer.counts is None:
        return (observer.min, observer.max)
    if method == "percentile":
        return percentile_range(observer, percentile)
    if method == "entropy":
        return entropy_range(observer)
    return mse_range(observer, activations)


def _cdf_at(observer: HistogramObserver, q: float, *, lower: bool) -> float:
    """The value below which a fraction ``q`` of the observed values lie (linear within a bin).

    A lower quantile that falls in the first occupied bin is the observed minimum, an upper one in
    the last occupied bin the maximum: the values there are known to start and end at those extremes
    (a ReLU output's lower bound is its 0, not a point inside the bin of zeros)."""
    cumulative = np.concatenate([[0.0], np.cumsum(observer.counts)])
    cumulative /= cumulative[-1]
    occupied = np.flatnonzero(observer.counts)
    if lower and q <= cumulative[occupied[0] + 1]:
        return observer.min
    if not lower and q >= cumulative[occupied[-1]]:
        return observer.max
    return float(np.interp(q, cumulative, observer.edges))


def percentile_range(observer: HistogramObserver, p: float) -> tuple[float, float]:
    hi = min(_cdf_at(observer, p / 100.0, lower=False), observer.max)
    lo = min(max(_cdf_at(observer, (100.0 - p) / 100.0, lower=True), observer.min), hi)
    return (lo, hi)


def _magnitude_histogram(observer: HistogramObserver, bins: int) -> tuple[np.ndarray, float]:
    """Counts of |x| over [0, max|x|] in ``bins`` bins, from the signed histogram.

    The signed cumulative count (linear within each bin) is folded at 0: the mass with
    ``|x| <= t`` is ``F(t) - F(-t)``, read at the ``bins + 1`` edges of the magnitude grid.
    """
    top = max(abs(observer.min), abs(observer.max))
    cumulative = np.concatenate([[0.0], np.cumsum(observer.counts)])
    t = np.linspace(0.0, top, bins + 1)
    inside = np.interp(t, observer.edges, cumulative) - np.interp(-t, observer.edges, cumulative)
    inside[-1] = cumulative[-1]  # every value lies within max|x|
    return np.maximum(np.diff(inside), 0.0), top


def entropy_range(observer: HistogramObserver, bins: int = 2048) -> tuple[float, float]:
    non_negative = observer.min >= 0
    levels = 255 if non_negative else 128
    hist, top = _magnitude_histogram(observer, bins)
    if top <= 0 or hist.sum() == 0:
        return (observer.min, observer.max)
    best, best_i = np.inf, bins
    for i in sorted({*range(levels, bins + 1, 8), bins}):  # the full range is always a candidate
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        # Merge i bins into `levels` groups, spread each group's mass over its non-empty bins.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        nonzero = (hist[:i] > 0).astype(np.float64)
        mass = np.bincount(groups, weights=hist[:i], minlength=levels)
        support = np.bincount(groups, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, (mass / np.maximum(support, 1))[groups], 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p /= ps
        q /= qs
        mask = p > 0
        if not (q[mask] > 0).all():
            # The clipped mass lands in an empty last bin that the quantized distribution gives no
            # probability: the divergence is infinite (TensorRT skips it). A 1e-12 floor here
            # made it nearly free and picked thresholds inside gaps of the tail.
            continue
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best:
            best, best_i = kl, i
    threshold = top * best_i / bins
    # Pure KL clips sparse tails that later layers need (mobilenet_dw: output cosine 0.83, top-1 6%):
    # the threshold never drops below the ENTROPY_FLOOR percentile of |x|.
    cumulative = np.cumsum(hist) / hist.sum()
    floor = top * (np.searchsorted(cumulative, ENTROPY_FLOOR / 100.0) + 1) / bins
    threshold = max(threshold, min(floor, top))
    return (max(observer.min, -threshold), min(observer.max, threshold))


def mse_range(observer: HistogramObserver, activations: str = "uint8", steps: int = 100) -> tuple[float, float]:
    edges = observer.edges
    centers = (edges[:-1] + edges[1:]) / 2
    weights = observer.counts
    lo0, hi0 = min(observer.min, 0.0), max(observer.max, 0.0)
    best, best_range = np.inf, (observer.min, observer.max)
    for alpha in np.linspace(1.0 / steps, 1.0, steps):
        lo, hi = lo0 * alpha, hi0 * alpha
        if activations == "int8":
            top = max(-lo, hi)
            lo, hi = -top, top
            scale = top / 127.0
        else:
            scale = (hi - lo) / 255.0
        if scale <= 0:
            continue
        # Rounding inside the range is uniform noise (scale^2 / 12); values outside are clipped.
        clipped = np.clip(centers, lo, hi)
        err = float(np.sum(weights * (centers - clipped) ** 2) + np.sum(weights[centers == clipped]) * scale**2 / 12)
        if err < best:
            best, best_range = err, (max(lo, observer.min), min(hi, observer.max))
    return best_range

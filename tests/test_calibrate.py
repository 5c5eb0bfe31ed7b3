"""calibrate: each method on known distributions, and end to end over a model's tensors."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import build
from onnxopt.calibrate import calibrate, entropy_range, mse_range, percentile_range, range_of
from onnxopt.errors import OptionError
from onnxopt.observe import HistogramObserver, MinMaxObserver

rng = np.random.default_rng(0)


def histogram(data: np.ndarray, batches: int = 10) -> HistogramObserver:
    obs = HistogramObserver()
    for chunk in np.array_split(data.astype(np.float32), batches):
        obs.update(chunk)
    return obs


def quant_mse(data: np.ndarray, lo: float, hi: float) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zp = np.rint(-lo / scale)
    dq = (np.clip(np.rint(data / scale) + zp, 0, 255) - zp) * scale
    return float(np.mean((data - dq) ** 2))


def test_minmax_is_the_observed_range():
    data = rng.uniform(-2, 3, 10000)
    obs = MinMaxObserver()
    obs.update(data)
    assert range_of(obs, "minmax") == (data.min(), data.max())


def test_percentile_matches_numpy_on_a_gaussian():
    data = rng.standard_normal(200_000)
    lo, hi = percentile_range(histogram(data), 99.0)
    assert hi == pytest.approx(np.percentile(data, 99.0), abs=0.02)
    assert lo == pytest.approx(np.percentile(data, 1.0), abs=0.02)


def test_entropy_clips_outliers_but_keeps_the_bulk():
    data = np.concatenate([rng.standard_normal(100_000), [40.0, -40.0]])
    lo, hi = entropy_range(histogram(data))
    assert 2.5 < hi < 40.0 and -40.0 < lo < -2.5


def test_entropy_on_a_non_negative_tensor_keeps_zero_as_the_floor():
    data = np.abs(rng.standard_normal(100_000))
    lo, hi = entropy_range(histogram(data))
    assert lo >= 0 and 2.0 < hi <= data.max()


def test_mse_range_is_the_best_clip_on_a_heavy_tail():
    data = rng.laplace(0, 1, 100_000)
    lo, hi = mse_range(histogram(data))
    assert hi < data.max() and lo > data.min()
    grid = [quant_mse(data, -c, c) for c in np.linspace(1.0, np.abs(data).max(), 60)]
    assert quant_mse(data, lo, hi) <= 1.05 * min(grid)
    assert quant_mse(data, lo, hi) < 0.9 * quant_mse(data, data.min(), data.max())


def test_mse_keeps_a_uniform_range():
    data = rng.uniform(-1, 1, 100_000)
    lo, hi = mse_range(histogram(data))
    assert hi > 0.95 and lo < -0.95


def test_calibrate_end_to_end_with_every_method():
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 16] y) { y = Relu(x) }"""
    )
    batches = [{"x": rng.standard_normal((64, 16)).astype(np.float32)} for _ in range(8)]
    for method in ("minmax", "percentile", "entropy", "mse"):
        ranges = calibrate(model, ["x", "y"], batches, method=method)
        lo, hi = ranges["y"]
        assert lo >= 0 and 1.0 < hi <= max(b["x"].max() for b in batches), method
        assert ranges["x"][0] < -1.5


def test_unknown_method_and_bad_percentile_are_option_errors():
    model = build('<ir_version: 8, opset_import: ["" : 17]> g (float[1] x) => (float[1] y) { y = Relu(x) }')
    with pytest.raises(OptionError, match="calibration method"):
        calibrate(model, ["y"], [], method="kl")
    with pytest.raises(OptionError, match="percentile"):
        calibrate(model, ["y"], [], method="percentile", percentile=20)


def test_entropy_never_clips_below_the_floor_percentile():
    # ReLU6-like: half the mass at zero, a sparse tail up to 6 that later layers need.
    data = np.clip(np.maximum(rng.standard_normal(200_000), 0) * 1.5, 0, 6)
    lo, hi = entropy_range(histogram(data))
    assert hi >= 0.98 * np.percentile(np.abs(data), 99.99)


def test_the_magnitude_histogram_keeps_every_value_where_it_lies():
    """|x| counts come from folding the signed cumulative count at 0: none lost past the top bin,
    no empty bins from aliasing two signed bins onto one magnitude bin."""
    from onnxopt.calibrate import _magnitude_histogram

    data = np.concatenate([rng.standard_normal(100_000), [9.0]]).astype(np.float32)
    obs = histogram(data)
    counts, top = _magnitude_histogram(obs, 2048)
    assert counts.sum() == pytest.approx(data.size) and top == pytest.approx(9.0)
    reference, _ = np.histogram(np.abs(data), bins=2048, range=(0, top))
    bulk = slice(0, 512)  # |x| < 2.25: the bins are well filled
    assert np.count_nonzero(counts[bulk] == 0) == 0
    assert np.abs(np.cumsum(counts) - np.cumsum(reference)).max() < 0.002 * data.size


def test_percentile_keeps_lo_below_hi_and_a_relu_floor_at_zero():
    for value in (5.0, 0.0, -2.0):
        lo, hi = percentile_range(histogram(np.full(1000, value)), 99.99)
        assert lo <= hi and lo == pytest.approx(value, abs=1e-6) and hi == pytest.approx(value, abs=1e-6)
    relu = np.maximum(rng.standard_normal(100_000), 0)
    lo, hi = percentile_range(histogram(relu), 99.99)
    assert lo == 0.0 and hi == pytest.approx(np.percentile(relu, 99.99), rel=0.02)


def test_percentile_with_an_outlier_that_puts_the_bulk_in_one_bin():
    """One huge value widens the histogram until every ordinary value shares bin 0: the upper
    quantile must still come from inside that bin, not collapse to the minimum."""
    data = np.concatenate([rng.uniform(-1, 1, 100_000), [5000.0]])
    lo, hi = percentile_range(histogram(data), 99.99)
    assert lo == pytest.approx(-1.0, abs=1e-3) and 0.5 < hi < 5000
    single = histogram(np.linspace(5.0, 5.002, 1000))
    assert percentile_range(single, 100.0) == pytest.approx((5.0, 5.002))


def _skewed(name: str) -> np.ndarray:
    r = np.random.default_rng(1)
    if name == "lognormal":  # all positive, the long tail upward: the lower bound sits near 0
        data = r.lognormal(0.0, 1.0, 200_000)
    elif name == "exponential+negative-tail":  # bulk on [0, 8], 2% spread far below 0
        data = np.concatenate([r.exponential(1.0, 196_000), -r.exponential(3.0, 4_000)])
    else:  # mirrored lognormal: the long tail downward
        data = 3.0 - r.lognormal(0.0, 0.75, 200_000)
    r.shuffle(data)
    return data.astype(np.float32)


@pytest.mark.parametrize("batches", [1, 10])
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("name", ["lognormal", "exponential+negative-tail", "mirrored-lognormal"])
def test_percentile_lower_bound_on_a_skewed_distribution_matches_numpy(name, p, batches):
    """On skewed data the lower bound is not the upper one mirrored: each is numpy's percentile.

    Tolerance, derived: the histogram's cumulative count is exact at every bin edge, so its
    quantile lies in the same bin as the sample quantile, up to the spacing of the samples around
    that rank (numpy interpolates between neighbouring order statistics): one bin width plus that
    spacing. Each re-binning (``batches > 1``) spreads old counts linearly over an old bin, no
    wider than the final one: one more bin width.
    """
    data = _skewed(name)
    obs = histogram(data, batches)
    width = (obs.hi - obs.lo) / obs.bins
    ordered = np.sort(data)
    tol_bins = 1 if batches == 1 else 2

    def tolerance(q: float) -> float:
        k = q * (data.size - 1)
        spacing = ordered[min(int(np.ceil(k)) + 1, data.size - 1)] - ordered[max(int(np.floor(k)) - 1, 0)]
        return tol_bins * width + float(spacing)

    lo, hi = percentile_range(obs, p)
    ref_lo, ref_hi = np.percentile(data, [100.0 - p, p])
    assert lo == pytest.approx(ref_lo, abs=tolerance(1.0 - p / 100.0))
    assert hi == pytest.approx(ref_hi, abs=tolerance(p / 100.0))
    assert data.min() <= lo < hi <= data.max()


# -- the entropy (KL) threshold against an independent TensorRT-style reference -----------------

def tensorrt_kl_threshold(hist: np.ndarray, levels: int, step: int = 8) -> int:
    """Bin index ``i`` (threshold = ``i`` bin widths) minimizing KL(P || Q) over a |x| histogram.

    TensorRT's entropy calibration, written from its description: for each candidate ``i``, P is
    the first ``i`` bins with every count beyond folded into bin ``i - 1``; Q merges those ``i``
    bins into ``levels`` equal runs and spreads each run's count evenly over its non-empty bins.
    A candidate where Q is 0 and P is not has infinite divergence and is skipped. Candidates run
    from ``levels`` up in ``step``s, plus the full range (the project's grid, calibrate.py).
    """
    bins = hist.size
    best, best_i = np.inf, bins
    for i in sorted({*range(levels, bins + 1, step), bins}):
        h = hist[:i].astype(np.float64)
        p = h.copy()
        p[-1] += hist[i:].sum()
        run = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)[1:-1])  # run of each bin
        starts = np.searchsorted(run, np.arange(levels))
        sizes = np.diff(np.append(starts, i))
        mass = np.add.reduceat(h, starts)
        filled = np.add.reduceat((h > 0).astype(np.float64), starts)
        q = np.repeat(mass / np.maximum(filled, 1), sizes) * (h > 0)
        p, q = p / p.sum(), q / q.sum()
        nz = p > 0
        if np.any(q[nz] == 0):
            continue
        kl = float(np.sum(p[nz] * np.log(p[nz] / q[nz])))
        if kl < best:
            best, best_i = kl, i
    return best_i


def _pure_kl(monkeypatch, obs: HistogramObserver) -> float:
    """The entropy threshold without the percentile floor: the KL search alone."""
    import onnxopt.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "ENTROPY_FLOOR", 0.0)
    lo, hi = entropy_range(obs)
    return max(-lo, hi)


@pytest.mark.parametrize("batches", [1, 10])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_entropy_threshold_on_a_gaussian_matches_a_tensorrt_reference(monkeypatch, seed, batches):
    """Same |x| histogram, same candidate grid: the same threshold, to a bin. (A Gaussian's KL
    curve is flat near its minimum, so only an identical histogram makes thresholds comparable; the
    folding of the signed histogram into |x| is checked on its own above.)"""
    from onnxopt.calibrate import _magnitude_histogram

    data = np.random.default_rng(seed).standard_normal(200_000).astype(np.float32)
    obs = histogram(data, batches)
    hist, top = _magnitude_histogram(obs, 2048)
    width = top / 2048
    reference = top * tensorrt_kl_threshold(hist, levels=128) / 2048
    threshold = _pure_kl(monkeypatch, obs)
    assert threshold == pytest.approx(reference, abs=width)
    assert 3.5 < threshold <= top
    if seed == 1:
        # A review's figure for this sample; it is max|x|: on 200,000 Gaussian samples the
        # divergence is least without clipping.
        assert threshold == pytest.approx(4.406, abs=width)


@pytest.mark.parametrize("batches", [1, 10])
@pytest.mark.parametrize("shift", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_threshold_on_relu_like_data_matches_a_reference_from_the_samples(monkeypatch, seed, shift, batches):
    """ReLU outputs (255 levels, a spike at 0): the reference bins the samples itself, and the
    threshold agrees to a bin width; with the floor, it is the larger of that and the 99.99th
    percentile of |x| (the floor is the upper edge of that percentile's bin: two bin widths)."""
    data = np.maximum(np.random.default_rng(seed).standard_normal(200_000) + shift, 0).astype(np.float32)
    top = float(data.max())
    width = top / 2048
    hist, _ = np.histogram(data, bins=2048, range=(0.0, top))
    reference = top * tensorrt_kl_threshold(hist, levels=255) / 2048
    obs = histogram(data, batches)
    assert _pure_kl(monkeypatch, obs) == pytest.approx(reference, abs=width)
    monkeypatch.undo()
    lo, hi = entropy_range(obs)
    assert lo == 0.0
    floor = float(np.percentile(data, 99.99))
    assert hi == pytest.approx(max(reference, floor), abs=2 * width)

"""Side-by-side latency of two models: warm-up, interleaved A/B pairs, medians, a bootstrap interval.

Timing A and B in ABBA blocks makes drift on a shared machine hit both alike, and gives each
model one run right after a switch and one right after itself (a run that follows the other
session is slower: caches); the per-block ratio B/A then cancels most of both. Repetitions continue until the
confidence interval of the median ratio is narrow enough or the time budget runs out.
"""

from __future__ import annotations

__all__ = ["PairedTimes", "measure_pair", "compare_latency", "summarize", "machine_description"]

import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxopt.report import LatencyComparison
from onnxopt.runtime import ModelSnapshot, resolve_providers

# A single timed sample should last at least this long, so that the timer's resolution and the
# per-call overhead do not dominate: tiny models are run several times per sample.
_MIN_SAMPLE_SECONDS = 0.002
_BOOTSTRAP_RESAMPLES = 2000


@dataclass
class PairedTimes:
    """Per-run seconds of A and B, block by block (the mean of A's two runs and B's two in ABBA)."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.a)

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.b) / np.asarray(self.a)


def _runner(session, feed: Mapping[str, np.ndarray]) -> Callable[[], None]:
    names = [o.name for o in session.get_outputs()]
    feed = dict(feed)
    return lambda: session.run(names, feed)


def _time(fn: Callable[[], None], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def median_ratio_interval(ratios: np.ndarray, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of per-pair ratios."""
    if len(ratios) < 3:
        return (0.0, math.inf)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratios), size=(_BOOTSTRAP_RESAMPLES, len(ratios)))
    medians = np.median(ratios[idx], axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(medians, [alpha, 1 - alpha])
    return float(low), float(high)


def measure_pair(
    run_a: Callable[[], None],
    run_b: Callable[[], None],
    *,
    budget_seconds: float = 5.0,
    min_pairs: int = 10,
    max_pairs: int = 2000,
    target_halfwidth: float = 0.02,
    confidence: float = 0.95,
    warmup_seconds: float = 0.2,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[PairedTimes, int]:
    """Time two callables in interleaved pairs; returns the times and the inner repetition count.

    Stops once ``min_pairs`` are done and the interval's half-width relative to the median ratio
    is below ``target_halfwidth``, or when ``budget_seconds`` (after warm-up) are spent.
    """
    # Warm-up: first runs allocate memory and pick kernels; they say nothing about steady state.
    warm_end = time.perf_counter() + warmup_seconds
    costs = []
    while True:
        costs.append(_time(run_a, 1) + _time(run_b, 1))
        if time.perf_counter() >= warm_end and len(costs) >= 2:
            break
    per_call = max(min(costs) / 2, 1e-7)
    inner = max(1, math.ceil(_MIN_SAMPLE_SECONDS / per_call))
    times = PairedTimes()
    start = time.perf_counter()
    next_check = min_pairs
    while len(times) < max_pairs:
        a1 = _time(run_a, inner)
        b1 = _time(run_b, inner)
        b2 = _time(run_b, inner)
        a2 = _time(run_a, inner)
        times.a.append((a1 + a2) / 2)
        times.b.append((b1 + b2) / 2)
        elapsed = time.perf_counter() - start
        if progress:
            progress(len(times), elapsed)
        if elapsed >= budget_seconds and len(times) >= 3:
            break
        if len(times) >= next_check:
            next_check = len(times) + max(5, len(times) // 4)
            ratios = times.ratios
            low, high = median_ratio_interval(ratios, confidence, seed)
            if (high - low) / 2 <= target_halfwidth * float(np.median(ratios)):
                break
    return times, inner


def summarize(
    times: PairedTimes,
    *,
    threshold: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Medians, p90, the median ratio B/A with its interval, and the verdict at ``threshold``.

    ``slower``: the ratio exceeds 1 + threshold and its interval lies above 1; ``faster``: the
    ratio is below 1 - threshold and its interval lies below 1; otherwise ``no difference``.
    """
    a = np.asarray(times.a)
    b = np.asarray(times.b)
    ratios = times.ratios
    ratio = float(np.median(ratios))
    low, high = median_ratio_interval(ratios, confidence, seed)
    if ratio > 1 + threshold and low > 1:
        verdict = "slower"
    elif ratio < 1 - threshold and high < 1:
        verdict = "faster"
    else:
        verdict = "no difference"
    return dict(
        median_a_ms=float(np.median(a)) * 1e3,
        median_b_ms=float(np.median(b)) * 1e3,
        p90_a_ms=float(np.quantile(a, 0.9)) * 1e3,
        p90_b_ms=float(np.quantile(b, 0.9)) * 1e3,
        ratio=ratio,
        ratio_low=low,
        ratio_high=high,
        confidence=confidence,
        repetitions=len(times),
        verdict=verdict,
    )


def machine_description(threads: int | None = None) -> str:
    """CPU model and thread count: absolute latencies compare only on the same machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, threads={threads or 'default'}"


def compare_latency(
    model_a: ModelSnapshot,
    model_b: ModelSnapshot,
    feed: Mapping[str, np.ndarray],
    *,
    providers="cpu",
    threads: int | None = None,
    budget_seconds: float = 5.0,
    threshold: float = 0.05,
    confidence: float = 0.95,
    progress: Callable[[int, float], None] | None = None,
) -> LatencyComparison:
    """Latency of ``model_b`` against ``model_a`` on one feed, interleaved, under the same settings."""
    resolved = resolve_providers(providers)
    options = dict(providers=resolved, optimization="all", intra_op_threads=threads, inter_op_threads=1)
    session_a = model_a.session(**options)
    session_b = model_b.session(**options)
    start = time.perf_counter()
    times, _ = measure_pair(
        _runner(session_a, feed), _runner(session_b, feed), budget_seconds=budget_seconds,
        confidence=confidence, progress=progress,
    )
    figures = summarize(times, threshold=threshold, confidence=confidence)
    return LatencyComparison(
        **figures, providers=resolved, threads=threads, machine=machine_description(threads),
        seconds=time.perf_counter() - start,
    )

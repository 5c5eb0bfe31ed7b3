"""onnxopt.latency: the interval, the verdict rules, the stopping rule, and the 19-of-20 goals measured.

The statistical tests time real models on this machine: identical models must be judged 'no
difference' and a model with 25% more work 'slower' in at least 19 of 20 comparisons each.
On failure they print every comparison's figures.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.bench import bench
from onnxopt.errors import OptionError
from onnxopt.latency import (
    PairedTimes,
    compare_latency,
    decisive,
    make_runner,
    measure_pair,
    measure_single,
    median_interval,
    parse_fraction,
    summarize,
    timing_session,
    timing_settings,
    verdict,
)
from onnxopt.report import LatencyComparison
from onnxopt.runtime import ModelSnapshot
from onnxopt.testing import matmul_chain, summary

RUNS = 20
# Per comparison: the default budget is 20 s; these models settle in about 1.5 s, and a run
# that needs longer on a loaded machine still counts, up to this.
BUDGET = 10.0


def spin(seconds: float):
    """A callable that keeps the CPU busy for ``seconds``: a model of exactly known cost."""

    def run():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return run


# --- the interval ------------------------------------------------------------------------------


def test_median_interval_is_a_pair_of_order_statistics():
    values = np.arange(1.0, 21.0)  # n = 20 at 95%: P(Bin(20, 1/2) <= 5) = 0.0207, <= 6 = 0.0577
    assert median_interval(values[::-1], 0.95) == (6.0, 15.0)
    assert median_interval(values[:5], 0.95) == (0.0, math.inf)  # too few values for 95%
    assert median_interval(values[:6], 0.95) == (1.0, 6.0)  # 2 / 64 = 0.031 outside


def test_median_interval_covers_the_true_median_at_least_as_often_as_promised():
    rng = np.random.default_rng(0)
    trials, n = 2000, 40
    samples = rng.lognormal(0.0, 0.3, size=(trials, n))  # skewed, like latencies; median exp(0) = 1
    hits = sum(low <= 1.0 <= high for low, high in (median_interval(s, 0.95) for s in samples))
    assert hits / trials >= 0.94, f"coverage {hits / trials:.3f}"


# --- the verdict -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, low, high, expected",
    [
        (1.25, 1.20, 1.30, "slower"),
        (1.06, 1.01, 1.10, "slower"),
        (1.04, 1.02, 1.06, "no difference"),  # real but under the threshold
        (1.08, 0.99, 1.20, "no difference"),  # large but not shown
        (1.00, 0.98, 1.02, "no difference"),
        (0.80, 0.75, 0.85, "faster"),
        (0.96, 0.94, 0.98, "no difference"),  # within 1 / 1.05
        (0.94, 0.90, 0.99, "faster"),
    ],
)
def test_verdict_needs_both_size_and_evidence(ratio, low, high, expected):
    assert verdict(ratio, low, high, 0.05) == expected


def test_decisive_intervals():
    assert decisive(1.06, 1.2, 0.05)  # wholly above 1.05
    assert decisive(0.97, 1.03, 0.05)  # wholly inside the band
    assert decisive(0.80, 0.90, 0.05)  # wholly below 1 / 1.05
    assert not decisive(1.02, 1.07, 0.05)  # straddles 1.05
    assert not decisive(0.0, math.inf, 0.05)


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), (0.1, 0.1), ("12.5%", 0.125), ("150%", 1.5)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "abc", "0", "-5%", "nan"])
def test_parse_fraction_refuses(text):
    with pytest.raises(OptionError, match="--max-slowdown"):
        parse_fraction(text)


def test_summarize_reports_medians_of_every_call_and_the_ratio_of_blocks():
    times = PairedTimes(a=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], b=[2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                        runs_a=[1.0] * 6 + [9.0], runs_b=[2.0] * 7)
    figures = summarize(times, threshold=0.05)
    assert figures["ratio"] == 2.0 and figures["verdict"] == "slower"
    assert figures["median_a_ms"] == 1000.0 and figures["p90_a_ms"] > 1000.0
    assert figures["repetitions"] == 6


# --- measuring: callables of known cost -----------------------------------------------------------


def test_measure_pair_settles_a_clear_difference_early():
    times, k = measure_pair(spin(0.0002), spin(0.0003), budget_seconds=10)
    figures = summarize(times)
    assert times.stopped == "decided", times.stopped
    assert times.seconds < 5
    assert figures["verdict"] == "slower"
    assert 1.3 < figures["ratio"] < 1.7, figures
    assert k >= 10  # 3 ms of 0.2 ms calls
    assert len(times.runs_a) == len(times.runs_b) == 2 * k * len(times)


def test_measure_pair_keeps_to_its_budget():
    # Never checking the interval: timing only stops when the budget runs out.
    start = time.perf_counter()
    times, _ = measure_pair(spin(0.001), spin(0.001), budget_seconds=1.5, min_pairs=10**9)
    elapsed = time.perf_counter() - start
    assert times.stopped == "budget"
    assert 1.3 < elapsed <= 1.6, elapsed


def test_measure_single_stops_once_the_median_is_known():
    times = measure_single(spin(0.0005), budget_seconds=10)
    assert times.stopped == "precise" and times.seconds < 5
    assert float(np.median(times.runs)) == pytest.approx(0.0005, rel=0.2)


def test_progress_is_called_per_block():
    calls = []
    measure_pair(spin(0.0005), spin(0.0005), budget_seconds=0.5, progress=lambda n, t: calls.append((n, t)))
    assert calls and [n for n, _ in calls] == list(range(1, len(calls) + 1))
    assert all(t <= 0.6 for _, t in calls)


# --- sessions ----------------------------------------------------------------------------------


def test_timing_settings_are_checked():
    with pytest.raises(OptionError, match="--threads"):
        timing_settings(threads=-1)
    with pytest.raises(OptionError, match="--optimization"):
        timing_settings(optimization="max")
    with pytest.raises(OptionError, match="unknown provider"):
        timing_settings(providers="tpu")
    settings = timing_settings()
    assert settings.as_dict() == dict(providers=["CPUExecutionProvider"], threads=1, inter_threads=1,
                                      optimization="all", spinning=False, io_binding=False)


def test_io_binding_runner_runs_on_cpu():
    # The CUDA path binds inputs and outputs to the device once; the same code runs with the CPU as device.
    snapshot = ModelSnapshot(ir.serde.deserialize_model(matmul_chain(2, rows=8, size=8)))
    session = timing_session(snapshot, timing_settings(), "m")
    run = make_runner(session, {"x": np.ones((8, 8), np.float32)}, device="cpu")
    run()
    times = measure_single(run, budget_seconds=0.5)
    assert len(times.runs) > 10


def test_compare_latency_keeps_the_pipeline_signature():
    original = ModelSnapshot(ir.serde.deserialize_model(matmul_chain(4)))
    candidate = ModelSnapshot(ir.serde.deserialize_model(matmul_chain(2)))
    feed = {"x": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
    result = compare_latency(original, candidate, feed, providers="cpu", threads=None, budget_seconds=5,
                             progress=lambda i, t: None)
    assert isinstance(result, LatencyComparison)
    assert result.verdict == "faster" and result.ratio < 0.7, result
    assert result.threads == 1 and result.providers == ["CPUExecutionProvider"]
    assert result.seconds <= 5.5


@pytest.mark.cuda
def test_cuda_with_io_binding():
    result = bench(matmul_chain(5, rows=1024, size=1024), matmul_chain(4, rows=1024, size=1024),
                   providers="cuda", budget_seconds=BUDGET)
    assert result.settings["io_binding"] is True
    assert result.verdict == "slower", summary(result)


# --- the goals: 19 of 20 ----------------------------------------------------------------------------


def _run_twenty(candidate_matmuls: int) -> tuple[list, float]:
    baseline = matmul_chain(4)
    start = time.perf_counter()
    results = [bench(matmul_chain(candidate_matmuls), baseline, budget_seconds=BUDGET) for _ in range(RUNS)]
    return results, time.perf_counter() - start


def _figures(results, elapsed: float) -> str:
    lines = [f"{r.verdict:>13}  ratio {r.ratio:.3f} [{r.ratio_low:.3f}, {r.ratio_high:.3f}]  "
             f"{r.blocks} blocks, {r.seconds:.1f} s, stopped: {r.stopped}" for r in results]
    return f"{len(results)} comparisons in {elapsed:.0f} s:\n" + "\n".join(lines)


def test_identical_models_are_no_difference_19_of_20():
    results, elapsed = _run_twenty(4)
    alike = sum(r.verdict == "no difference" for r in results)
    assert alike >= RUNS - 1, _figures(results, elapsed)
    assert all(r.seconds <= BUDGET + 1 for r in results), _figures(results, elapsed)


def test_25_percent_more_work_is_slower_19_of_20():
    results, elapsed = _run_twenty(5)
    flagged = sum(r.verdict == "slower" for r in results)
    assert flagged >= RUNS - 1, _figures(results, elapsed)
    assert all(r.seconds <= BUDGET + 1 for r in results), _figures(results, elapsed)

"""onnxopt.testing: ``assert_not_slower`` and the pytest plugin (fixture, marker, options, summary)."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest

from onnxopt import testing
from onnxopt.bench import bench
from onnxopt.testing import LatencyRegression, assert_not_slower, matmul_chain

pytest_plugins = ["pytester"]

BUDGET = 5.0


def test_a_slower_candidate_fails_with_the_figures():
    with pytest.raises(AssertionError) as caught:
        assert_not_slower(matmul_chain(5), matmul_chain(4), max_slowdown=0.05, budget_seconds=BUDGET)
    assert isinstance(caught.value, LatencyRegression)
    result = caught.value.result
    assert result.verdict == "slower" and result.ratio > 1.05
    message = str(caught.value)
    first = message.splitlines()[0]
    assert first.startswith("candidate (ModelProto) is ") and "slower than baseline (ModelProto)" in first
    for words in (f"ratio {result.ratio:.3f}", "95% interval", "allowed +5.0%", "median", "verdict: SLOWER", "p90"):
        assert words in message, message


def test_a_like_candidate_passes_and_returns_the_result(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_chain(4), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = assert_not_slower(path, matmul_chain(4), budget_seconds=BUDGET)
    assert result.verdict == "no difference" and result.candidate.model == str(path)
    # A generous threshold lets a real slowdown pass.
    assert assert_not_slower(matmul_chain(5), matmul_chain(4), "50%", budget_seconds=BUDGET).verdict == "no difference"


def test_an_inconclusive_check_warns(monkeypatch):
    # The budget ran out with the interval across the threshold: the check passes, and says it may not mean much.
    result = bench(matmul_chain(4), matmul_chain(4), budget_seconds=1)
    result.verdict, result.ratio, result.ratio_low, result.ratio_high = "no difference", 1.03, 0.98, 1.09
    assert not result.conclusive
    monkeypatch.setattr(testing, "bench", lambda *args, **options: result)
    with pytest.warns(UserWarning, match="inconclusive, raise the budget: .*ratio 1.030"):
        assert assert_not_slower("new.onnx", "old.onnx") is result


PLUGIN_TESTS = """
from onnxopt.testing import matmul_chain

def test_same(latency_check):
    latency_check(matmul_chain(4), matmul_chain(4))

def test_slow(latency_check):
    latency_check(matmul_chain(5), matmul_chain(4), max_slowdown="5%")

def test_unrelated():
    pass
"""


def test_plugin_fixture_marker_summary_and_json(pytester):
    pytester.makeconftest('pytest_plugins = ["onnxopt.testing"]')
    pytester.makepyfile(test_models=PLUGIN_TESTS)
    result = pytester.runpytest("--latency-budget", str(BUDGET), "--latency-json", "latency.json")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*LatencyRegression: candidate (ModelProto) is *% slower than baseline (ModelProto)*",
        "*onnxopt latency*",
        "*no difference*test_models.py::test_same*",
        "*slower*test_models.py::test_slow*",
    ])
    data = json.loads((pytester.path / "latency.json").read_text())
    assert [d["test"] for d in data] == ["test_models.py::test_same", "test_models.py::test_slow"]
    assert [d["verdict"] for d in data] == ["no difference", "slower"]
    assert all(d["budget_seconds"] == BUDGET for d in data)


def test_plugin_marks_latency_tests_for_deselection(pytester):
    pytester.makeconftest('pytest_plugins = ["onnxopt.testing"]')
    pytester.makepyfile(test_models=PLUGIN_TESTS)
    result = pytester.runpytest("-m", "not latency")
    result.assert_outcomes(passed=1, deselected=2)


def test_plugin_option_overrides_the_threshold(pytester):
    pytester.makeconftest('pytest_plugins = ["onnxopt.testing"]')
    pytester.makepyfile(test_models=PLUGIN_TESTS)
    result = pytester.runpytest("--latency-budget", str(BUDGET), "--latency-max-slowdown", "50%", "-k", "slow")
    result.assert_outcomes(passed=1, deselected=2)

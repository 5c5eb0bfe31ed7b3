"""Latency regression checks in a project's own tests: ``assert_not_slower`` and a pytest plugin.

    from onnxopt.testing import assert_not_slower

    def test_export_is_not_slower(tmp_path):
        export(tmp_path / "model.onnx")
        assert_not_slower(tmp_path / "model.onnx", "baselines/model.onnx", max_slowdown=0.05)

As a plugin (``pytest_plugins = ["onnxopt.testing"]`` in the root ``conftest.py``, or
``pytest -p onnxopt.testing``) it adds the ``latency_check`` fixture, which applies the
command-line defaults ``--latency-budget``, ``--latency-max-slowdown`` and ``--latency-json``,
marks the tests that use it ``latency`` (``-m "not latency"`` leaves them out) and prints one
line per comparison at the end of the run.
"""

from __future__ import annotations

__all__ = ["LatencyRegression", "assert_not_slower", "summary", "matmul_chain"]

import json
import math
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.bench import BenchResult, bench, render
from onnxopt.latency import DEFAULT_MAX_SLOWDOWN

try:
    import pytest
except ImportError:  # the plain assertion works without pytest
    pytest = None


class LatencyRegression(AssertionError):
    """The candidate is slower than the baseline beyond the slowdown allowed; ``result`` holds the figures."""

    def __init__(self, result: BenchResult):
        self.result = result
        super().__init__(f"{summary(result)}\n\n{render(result)}")


def summary(result: BenchResult) -> str:
    """One line: which model, the ratio with its interval, the verdict."""
    c, b = result.candidate, result.baseline
    if b is None:
        return f"{c.model}: median {c.median_ms:.3f} ms, p90 {c.p90_ms:.3f} ms"
    head = {
        "slower": f"{c.model} is {(result.ratio - 1) * 100:.1f}% slower than {b.model}",
        "faster": f"{c.model} is {(1 - result.ratio) * 100:.1f}% faster than {b.model}",
    }.get(result.verdict, f"{c.model} is not slower than {b.model}")
    high = f"{result.ratio_high:.3f}" if math.isfinite(result.ratio_high) else "inf"
    return (
        f"{head} (ratio {result.ratio:.3f}, {result.confidence:.0%} interval [{result.ratio_low:.3f}, {high}], "
        f"allowed +{result.max_slowdown:.1%}; median {b.median_ms:.3f} -> {c.median_ms:.3f} ms, "
        f"{result.blocks} blocks in {result.seconds:.1f} s)"
    )


def assert_not_slower(candidate, baseline, max_slowdown: float | str = DEFAULT_MAX_SLOWDOWN, **options) -> BenchResult:
    """Raise ``LatencyRegression`` (an ``AssertionError``) when ``candidate`` is slower than ``baseline``.

    Both models are timed interleaved on the same inputs (``onnxopt.bench.bench``; ``options``
    are its keywords: ``data``, ``dims``, ``batch``, ``providers``, ``threads``, ``budget_seconds``,
    ...). Slower means the median ratio exceeds ``1 + max_slowdown`` and its interval lies above
    1. Returns the result otherwise; when the interval was still too wide to tell within the
    budget, a warning says so.
    """
    return _judge(bench(candidate, baseline, max_slowdown=max_slowdown, **options))


def _judge(result: BenchResult) -> BenchResult:
    if result.regression:
        raise LatencyRegression(result)
    if not result.conclusive:
        warnings.warn(f"latency check inconclusive, raise the budget: {summary(result)}", stacklevel=3)
    return result


def matmul_chain(matmuls: int = 4, *, rows: int = 256, size: int = 256, seed: int = 0) -> onnx.ModelProto:
    """A model of known cost: ``matmuls`` times (MatMul by a ``size``x``size`` weight, Tanh) on ``rows``x``size``.

    Its cost grows linearly with ``matmuls`` (5 does 25% more work than 4): the planted slowdown
    of onnxopt's own tests, and a quick way to see how well a CI machine tells models apart
    (``bench(matmul_chain(5), matmul_chain(4))`` should say ``slower``, ratio about 1.25).
    """
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "x"
    for i in range(matmuls):
        weight = (rng.standard_normal((size, size)) / size**0.5).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        out = "y" if i == matmuls - 1 else f"t{i}"
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]), helper.make_node("Tanh", [f"h{i}"], [out])]
        previous = out
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, size])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# --- the pytest plugin --------------------------------------------------------------------------

if pytest is not None:
    _RESULTS = pytest.StashKey[list]()

    def pytest_addoption(parser):
        group = parser.getgroup("onnxopt latency")
        group.addoption("--latency-budget", type=float, metavar="S", help="seconds per latency comparison (default 20)")
        group.addoption("--latency-max-slowdown", metavar="PCT", help="slowdown allowed by latency_check, e.g. 5%% (default: each test's)")
        group.addoption("--latency-json", metavar="PATH", help="write every latency comparison of the run as JSON")

    def pytest_configure(config):
        config.addinivalue_line("markers", "latency: a latency regression check (leave out with -m 'not latency')")
        config.stash[_RESULTS] = []

    def pytest_collection_modifyitems(config, items):
        for item in items:
            if "latency_check" in getattr(item, "fixturenames", ()):
                item.add_marker("latency")

    @pytest.fixture
    def latency_check(request):
        """``latency_check(candidate, baseline, max_slowdown=0.05, **options)``: ``assert_not_slower`` with the run's defaults."""
        config = request.config
        budget = config.getoption("latency_budget", default=None)
        forced = config.getoption("latency_max_slowdown", default=None)
        results = config.stash.get(_RESULTS, None)

        def check(candidate, baseline, max_slowdown: float | str = DEFAULT_MAX_SLOWDOWN, **options) -> BenchResult:
            if budget is not None:
                options.setdefault("budget_seconds", budget)
            result = bench(candidate, baseline, max_slowdown=forced or max_slowdown, **options)
            if results is not None:
                results.append((request.node.nodeid, result))
            return _judge(result)

        return check

    def pytest_terminal_summary(terminalreporter, config):
        results = config.stash.get(_RESULTS, None)
        if not results:
            return
        terminalreporter.section("onnxopt latency")
        for nodeid, result in results:
            terminalreporter.write_line(f"{result.verdict:>13}  {nodeid}: {summary(result)}")
        path = config.getoption("latency_json", default=None)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump([{"test": n, **r.to_dict()} for n, r in results], f, indent=2)
                f.write("\n")
            terminalreporter.write_line(f"latency results written to {path}")

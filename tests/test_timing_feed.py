"""What the speed fallback and the latency comparison time (``onnxopt.data.timing_feed``): the data's
first batch, or its first rows when onnxopt chose the batch and a call would take long."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import onnxopt
from onnxopt.data import TIMING_MACS, timing_feed


def _model(batch_dim) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([batch_dim, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape([batch_dim, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x], outputs=[y])
    graph = ir.Graph([x], [y], nodes=[node], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def test_a_long_call_is_timed_on_the_largest_power_of_two_of_rows_under_the_limit():
    feed = {"x": np.zeros((32, 4), np.float32)}
    macs = TIMING_MACS // 3 + 1  # 2 samples fit, 3 do not
    cut, note = timing_feed(_model("N"), feed, macs, batch_given=False)
    assert cut["x"].shape == (2, 4)
    assert note is not None and "timed at batch 2" in note and "batch of 32" in note and "--batch-size" in note
    cut, _ = timing_feed(_model("N"), feed, TIMING_MACS * 10, batch_given=False)
    assert cut["x"].shape == (1, 4)  # never fewer than one sample


def test_the_batch_stays_whole_when_the_user_chose_it_or_it_is_cheap_or_fixed():
    feed = {"x": np.zeros((32, 4), np.float32)}
    assert timing_feed(_model("N"), feed, TIMING_MACS, batch_given=True) == (feed, None)
    small = TIMING_MACS // 32
    assert timing_feed(_model("N"), feed, small, batch_given=False)[0]["x"].shape == (32, 4)
    assert timing_feed(_model("N"), feed, None, batch_given=False)[1] is None  # MACs unknown
    fixed, note = timing_feed(_model(32), feed, TIMING_MACS, batch_given=False)
    assert fixed["x"].shape == (32, 4) and note is None  # a fixed batch dim is never cut


def test_the_report_says_what_was_timed(monkeypatch):
    import onnxopt.data

    monkeypatch.setattr(onnxopt.data, "TIMING_MACS", 2_000)  # digits: about 1 M MACs a sample: 1 row
    seen = []  # the batch each latency comparison was given
    monkeypatch.setattr(onnxopt.pipeline, "compare_latency", lambda a, b, feed, **kw: seen.append(
        next(iter(feed.values())).shape[0]))
    result = onnxopt.optimize("models/digits/digits_cnn.onnx", data="models/digits/digits_test.npz")
    assert seen == [1]
    assert any(n.startswith("latency: timed at batch 1, the first rows of the data's batch of 32") for n in result.report.notes)
    seen.clear()
    result = onnxopt.optimize("models/digits/digits_cnn.onnx", data="models/digits/digits_test.npz", batch_size=16)
    assert seen == [16] and not any(n.startswith("latency: timed at") for n in result.report.notes)


def test_a_batch_dim_that_fix_dim_fixes_is_never_cut(monkeypatch):
    import onnxopt.data

    monkeypatch.setattr(onnxopt.data, "TIMING_MACS", 2_000)
    seen = []
    monkeypatch.setattr(onnxopt.pipeline, "compare_latency", lambda a, b, feed, **kw: seen.append(
        next(iter(feed.values())).shape[0]))
    result = onnxopt.optimize("models/digits/digits_cnn.onnx", data="models/digits/digits_test.npz",
                              fix_dims={"batch": 20})
    assert seen == [20]  # the optimized model takes batch 20 only: 1 row failed in onnxruntime
    assert not any(n.startswith("latency: timed at") for n in result.report.notes)


def test_auto_times_its_candidates_at_the_batch_fix_dim_gives(monkeypatch):
    import onnxopt.data
    from onnxopt import io
    from onnxopt.auto_quantize import _first_batch
    from onnxopt.recipe import Recipe

    model = io.load_model("models/digits/digits_cnn.onnx")
    recipe = Recipe(fix_dims={"batch": 20})
    feed, labelled = _first_batch(model, "models/digits/digits_test.npz", recipe)
    assert next(iter(feed.values())).shape[0] == 20 and labelled  # the default cut of 32 failed in onnxruntime
    monkeypatch.setattr(onnxopt.data, "TIMING_MACS", 2_000)
    feed, _ = _first_batch(model, "models/digits/digits_test.npz", recipe)
    assert next(iter(feed.values())).shape[0] == 20  # a fixed batch is never cut
    assert str(model.graph.inputs[0].shape[0]) == "batch"  # the caller's model is left as it was


def test_no_timing_note_when_nothing_is_timed(monkeypatch):
    import onnxopt.data

    monkeypatch.setattr(onnxopt.data, "TIMING_MACS", 2_000)
    result = onnxopt.optimize("models/digits/digits_cnn.onnx", "simplify,fold-bn,quantize",
                              calibration="models/digits/digits_calib.npz", data="models/digits/digits_test.npz",
                              latency=False, speed_fallback=False)
    assert not any(n.startswith("latency: timed at") for n in result.report.notes)  # no latency, no speed fallback


def test_a_dim_given_for_the_batch_does_not_count_the_whole_batch_as_one_sample(monkeypatch):
    """--dim N=32 on the batch dim makes the report's MACs those of 32 samples; the timing cut divides
    by the rows again, so that the batch is cut as it is without --dim."""
    import onnxopt.data

    from onnxopt.stats import count_macs, macs_per_sample

    model = onnxopt.io.load_model("models/digits/digits_cnn.onnx")
    feed = {model.graph.inputs[0].name: np.zeros((32, 1, 8, 8), np.float32)}
    one = count_macs(model)
    batch = model.graph.inputs[0].shape[0].value
    assert macs_per_sample(model, feed, {}, one) == one
    assert macs_per_sample(model, feed, {batch: 32}, count_macs(model, dims={batch: 32})) == one
    assert macs_per_sample(model, feed, {}) == macs_per_sample(model, feed, {batch: 32}) == one  # counted here
    monkeypatch.setattr(onnxopt.data, "TIMING_MACS", one * 4)  # 4 samples a call
    seen = []
    monkeypatch.setattr(onnxopt.pipeline, "compare_latency", lambda a, b, feed, **kw: seen.append(
        next(iter(feed.values())).shape[0]))
    onnxopt.optimize("models/digits/digits_cnn.onnx", data="models/digits/digits_test.npz", dims={batch: 32})
    assert seen == [4]

"""observe: streaming statistics batch by batch — counts, re-binning, ragged inputs, flat memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from graphs import build
from onnxopt.observe import BatchSplitter, ErrorObserver, HistogramObserver, MinMaxObserver, expose, observe

RELU_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S] x) => (float[N, S] y) {
    m = Mul(x, two)
    y = Relu(m)
}"""


def relu_model():
    return build(RELU_MODEL, {"two": np.array(2.0, dtype=np.float32)})


def test_minmax_observer_ignores_nonfinite_and_empty():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -3.0, np.inf, np.nan], dtype=np.float32))
    obs.update(np.zeros((0, 4), dtype=np.float32))
    obs.update(np.array([5.0], dtype=np.float32))
    assert (obs.min, obs.max, obs.count) == (-3.0, 5.0, 3)


def test_histogram_rebins_as_the_range_grows_and_keeps_every_count():
    rng = np.random.default_rng(0)
    obs = HistogramObserver(bins=512)
    chunks = [rng.normal(0, scale, 5000).astype(np.float32) for scale in (0.1, 1.0, 10.0)]
    for chunk in chunks:
        obs.update(chunk)
    data = np.concatenate(chunks)
    assert obs.counts.sum() == pytest.approx(data.size)
    assert obs.lo <= data.min() and obs.hi >= data.max()
    # The re-binned histogram still describes the data: its median and quartiles within a bin or two.
    cumulative = np.cumsum(obs.counts) / obs.counts.sum()
    width = (obs.hi - obs.lo) / obs.bins
    for q in (0.25, 0.5, 0.75):
        estimate = obs.edges[1:][np.searchsorted(cumulative, q)]
        assert abs(estimate - np.quantile(data, q)) < 3 * width


def test_histogram_of_a_constant_tensor():
    obs = HistogramObserver(bins=64)
    obs.update(np.full(10, 3.0, dtype=np.float32))
    assert obs.counts.sum() == 10 and obs.lo < 3.0 < obs.hi


def test_error_observer_sqnr():
    obs = ErrorObserver()
    ref = np.ones(100)
    obs.update(ref, ref + 0.1)
    assert obs.sqnr_db == pytest.approx(20.0)
    exact = ErrorObserver()
    exact.update(ref, ref)
    assert exact.sqnr_db == float("inf")


def test_expose_adds_outputs_on_a_copy_only():
    model = relu_model()
    copy, exposed = expose(model, ["m", "y"])
    assert exposed == ["m", "y"]
    assert [v.name for v in copy.graph.outputs] == ["y", "m"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_observe_streams_each_batch_with_ragged_shapes():
    seen = {}
    batches = [{"x": np.full((2, n), float(n), dtype=np.float32)} for n in (3, 7, 5)]
    count = observe(relu_model(), ["x", "m"], batches, lambda name, a: seen.setdefault(name, []).append(a.shape))
    assert count == 3
    # Batches that fit run whole (one sample is probed first to measure the cost, and dropped).
    assert seen["m"] == [(2, 3), (2, 7), (2, 5)]
    assert seen["x"] == seen["m"]


def test_a_batch_is_cut_so_that_one_run_stays_within_the_byte_budget():
    rows = []
    batch = {"x": np.ones((64, 256), np.float32)}  # m and y: 2 KiB a sample together
    observe(relu_model(), ["m", "y"], [batch, batch], lambda name, a: rows.append(a.shape[0]) if name == "m" else None,
            max_bytes=16 * 1024)
    # A probe of one sample measures the cost (its outputs dropped), then slices of 16 KiB / 2 KiB.
    assert sum(rows) == 128 and set(rows) == {8}, rows
    whole = []
    observe(relu_model(), ["m"], [batch, batch], lambda name, a: whole.append(a.shape[0]))
    assert whole == [64, 64]


def test_a_fixed_batch_dim_is_never_cut():
    model = relu_model()
    model.graph.inputs[0].shape = ir.Shape([4, 256])
    splitter = BatchSplitter(model, max_bytes=1)
    assert [p["x"].shape for p in splitter.parts({"x": np.ones((4, 256), np.float32)})] == [(4, 256)]


def _peak_bytes(samples: int) -> int:
    rng = np.random.default_rng(0)
    obs = {"m": HistogramObserver(), "y": HistogramObserver()}

    def batches():  # a generator: only one batch exists at a time
        for _ in range(samples // 50):
            yield {"x": rng.standard_normal((50, 256)).astype(np.float32)}

    model = relu_model()
    tracemalloc.start()
    try:
        observe(model, ["m", "y"], batches(), lambda name, a: obs[name].update(a))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_samples():
    small, large = _peak_bytes(100), _peak_bytes(2000)
    # 2,000 samples are 20 times the data of 100; the peak stays that of one batch (+ noise).
    assert large < 1.5 * small + 256 * 1024, (small, large)


def test_a_small_feed_runs_whole_so_that_axis_0_may_be_anything():
    """A sequence-first model ([S, N, D], Softmax over axis 0) fed one feed: observing it row by row
    would make every Softmax 1.0; the first row is only a probe of the cost, and a feed that fits
    runs whole."""
    model = build("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[S, N, D] x) => (float[S, N, D] y) {
        y = Softmax <axis=0> (x)
    }""")
    x = np.random.default_rng(0).standard_normal((10, 2, 4)).astype(np.float32)
    seen = []
    observe(model, ["y"], [{"x": x}], lambda name, a: seen.append(a))
    assert len(seen) == 1 and seen[0].shape == x.shape
    e = np.exp(x - x.max(axis=0))
    np.testing.assert_allclose(seen[0], e / e.sum(axis=0), rtol=1e-5)


def test_a_batch_that_onnxruntime_refuses_is_one_data_error_naming_the_dims():
    from onnxopt.errors import DataError

    model = build("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S] a, float[N, S] b) => (float[N, S] y) {
        y = Mul(a, b)
    }""")
    feed = {"a": np.ones((2, 5), np.float32), "b": np.ones((2, 6), np.float32)}
    with pytest.raises(DataError) as exc:
        observe(model, ["y"], [feed], lambda name, a: None, where="calibration batch")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("calibration batch 0: onnxruntime cannot run the model")
    assert "dim 'S' is 5 in a[1], 6 in b[1]" in message


def test_an_initializer_listed_as_an_input_need_not_be_fed():
    model = build("""<ir_version: 4, opset_import: ["" : 17]>
    g (float[N, 4] x, float[4] w) => (float[N, 4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
        y = Mul(x, w)
    }""")
    seen = {}
    observe(model, ["y", "w"], [{"x": np.ones((2, 4), np.float32)}], lambda name, a: seen.setdefault(name, a))
    np.testing.assert_array_equal(seen["y"], np.tile(np.arange(1, 5, dtype=np.float32), (2, 1)))
    assert "w" not in seen


def test_channel_means_skip_nonfinite_values():
    from onnxopt.observe import ChannelMeanObserver

    obs = ChannelMeanObserver(axis=1)
    x = np.array([[[1.0, np.nan], [2.0, 4.0]], [[3.0, np.inf], [6.0, 8.0]]], np.float32)  # [2, 2, 2]
    obs.update(x)
    np.testing.assert_allclose(obs.mean, [2.0, 5.0])
    empty = ChannelMeanObserver(axis=0)
    empty.update(np.array([[np.nan], [1.0]], np.float32))
    assert empty.mean is None  # channel 0 had no finite value


def test_histogram_of_values_past_the_float32_range_of_differences():
    obs = HistogramObserver()
    obs.update(np.array([-3e38, 0.0, 3e38], np.float32))
    obs.update(np.full(4, 3.4e38, np.float32))
    assert obs.counts.sum() == 7 and obs.min == pytest.approx(-3e38, rel=1e-6)


def test_histogram_of_a_nearly_constant_tensor():
    """Bins narrower than float32 resolves at that magnitude: numpy refused them ("too many bins")."""
    obs = HistogramObserver()
    obs.update(np.linspace(5.0, 5.0002, 100).astype(np.float32))
    obs.update(np.linspace(5.0, 5.002, 100).astype(np.float32))
    assert obs.counts.sum() == 200


def test_channel_entropy_is_finite_per_channel_and_lowest_for_a_constant_channel():
    from onnxopt.observe import ChannelEntropyObserver

    rng = np.random.default_rng(0)
    observer = ChannelEntropyObserver(axis=1, bins=32)
    for scale in (1.0, 3.0):  # the second batch widens every range: counts are re-binned
        x = rng.standard_normal((8, 4, 5, 5)) * scale
        x[:, 0] = 2.5  # constant: one bin
        x[:, 1] = rng.choice([0.0, 1.0], size=(8, 5, 5))  # two values: about one bit
        x[:, 3] = rng.uniform(-1, 1, size=(8, 5, 5)) * scale
        observer.update(x)
    h = observer.entropy
    assert h.shape == (4,) and np.isfinite(h).all() and (h >= 0).all() and (h <= np.log2(32) + 1e-9).all()
    assert h[0] == 0 and np.argmin(h) == 0
    assert abs(h[1] - 1.0) < 0.05
    assert h[2] > 2 and h[3] > 2


def test_entropy_statistics_cover_every_channel_probe_of_the_digits_cnn():
    from pathlib import Path

    from onnxopt.pipeline import activation_statistics
    from onnxopt.passes.channel_groups import analyze

    model = ir.load(Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx")
    stats = activation_statistics(model, Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_calib.npz",
                                  {}, 64, "cpu", entropy=True)
    assert stats and all(np.isfinite(v).all() and (v >= 0).all() for v in stats.values())
    probes = {p.value for g in analyze(model).groups for p in g.probes}
    assert set(stats) == probes

"""What a lossy verdict judges: cosine per sample (mean and worst), padding left out by an attention
mask, and only the outputs the user names (``judged_outputs``, ``--outputs``)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import build
from onnxopt.data import Dataset
from onnxopt.errors import OptionError
from onnxopt.runtime import ModelSnapshot
from onnxopt.validate import OutputAccumulator, compare_models

# y = x + (1 - mask) * G: garbage where the mask says padding; G = 0 gives the reference.
PADDED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B,S,4] x, int64[B,S] {mask}) => (float[B,S,4] y, float[B,4] pooled) {{
    m = Cast <to = 1> ({mask})
    axes = Constant <value = int64[1] {{2}}> ()
    u = Unsqueeze(m, axes)
    one = Constant <value = float {{1.0}}> ()
    inv = Sub(one, u)
    g = Mul(inv, G)
    y = Add(x, g)
    pooled = ReduceMean <axes = [1], keepdims = 0> (x)
}}"""


def _padded(garbage: float, mask: str = "attention_mask"):
    return build(PADDED.format(mask=mask), {"G": np.array(garbage, np.float32)})


def _compare(reference, candidate, feeds, **options):
    ref, cand = ModelSnapshot(reference), ModelSnapshot(candidate)
    try:
        return compare_models(ref, cand, Dataset(feeds, None, "test"), candidate_optimization="disabled",
                              runtime_floor=False, **options)
    finally:
        ref.close()
        cand.close()


def _feeds(mask_name: str = "attention_mask"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.ones((3, 5), np.int64)
    mask[0, 3:] = 0  # two sequences padded
    mask[2, 1:] = 0
    return [{"x": x, mask_name: mask}]


def test_one_bad_sample_lowers_the_worst_cosine_that_the_flattened_batch_hides():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((8, 4, 16))
    ref[3] *= 0.01  # a short, quiet sample
    cand = ref.copy()
    cand[3] = -ref[3]  # wholly wrong
    acc = OutputAccumulator("y")
    acc.update(ref, cand)
    out = acc.result(None, 0.0)
    flattened = float((ref * cand).sum() / np.linalg.norm(ref) / np.linalg.norm(cand))
    assert flattened > 0.99  # what the old metric judged
    assert out.cosine == out.cosine_worst == pytest.approx(-1.0)
    assert out.cosine_mean == pytest.approx((7 - 1) / 8)
    assert out.samples == 8


def test_per_sample_cosine_is_the_same_whatever_the_batches():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((6, 10))
    cand = ref + rng.normal(0, 0.3, ref.shape)
    whole, split = OutputAccumulator("y"), OutputAccumulator("y")
    whole.update(ref, cand)
    for i in range(0, 6, 2):
        split.update(ref[i:i + 2], cand[i:i + 2])
    a, b = whole.result(None, 0.0), split.result(None, 0.0)
    assert a.cosine_worst == pytest.approx(b.cosine_worst) and a.cosine_mean == pytest.approx(b.cosine_mean)
    per = [ref[i] @ cand[i] / np.linalg.norm(ref[i]) / np.linalg.norm(cand[i]) for i in range(6)]
    assert a.cosine_worst == pytest.approx(min(per)) and a.cosine_mean == pytest.approx(np.mean(per))


def test_the_worst_samples_are_named_by_their_index_over_all_batches(monkeypatch):
    """``worst_samples``: the samples of least cosine, worst first, as indices over the whole data,
    whatever the batches and the chunks an output is read in; none where the output's first axis is
    not the data's samples."""
    import onnxopt.validate

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((20, 64))
    noise = np.linspace(0.01, 0.5, 20)[rng.permutation(20)]  # each sample its own error
    cand = ref + rng.standard_normal(ref.shape) * noise[:, None]
    per = [ref[i] @ cand[i] / np.linalg.norm(ref[i]) / np.linalg.norm(cand[i]) for i in range(20)]
    expected = list(np.argsort(per, kind="stable")[: onnxopt.validate.WORST_ROWS])
    monkeypatch.setattr(onnxopt.validate, "_CHUNK_VALUES", 64 * 3)  # 3 rows a chunk
    acc = OutputAccumulator("y")
    for i in (0, 7, 13):
        acc.update(ref[i:i + {0: 7, 7: 6, 13: 7}[i]], cand[i:i + {0: 7, 7: 6, 13: 7}[i]])
    assert acc.result(None, 0.0, samples=20).worst_samples == expected
    assert acc.result(None, 0.0, samples=21).worst_samples == []  # rows are not the data's samples
    assert acc.result(None, 0.0).worst_samples == []


def test_no_worst_samples_where_an_outputs_first_axis_only_adds_up_to_the_samples():
    """A [4, B] output (features first) on batches of 5 and 3 ran over as many rows as the data has
    samples (8): its worst rows, features, were named as samples, and the int8 fallback judged
    rounds on a subset of the wrong samples. The rows must be each batch's samples."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[4,N] t, float[N,4] y) { t = Transpose <perm = [1, 0]> (x)  y = Mul(x, w) }"""
    reference = build(text, {"w": np.ones(4, np.float32)})
    candidate = build(text, {"w": np.array([1.0, 1.0, 1.0, -1.0], np.float32)})
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    v = _compare(reference, candidate, [{"x": x[:5]}, {"x": x[5:]}])
    transposed, direct = v.outputs
    assert transposed.worst_samples == []
    assert direct.worst_samples  # [N, 4]: its rows are the samples


def test_take_rows_gathers_samples_across_batches_in_the_order_asked():
    from graphs import build as build_model
    from onnxopt.data import take_rows

    model = build_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) { y = Relu(x) }""", {})
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    data = Dataset([{"x": x[:4]}, {"x": x[4:9]}, {"x": x[9:]}], None, "test")
    np.testing.assert_array_equal(take_rows(model, data, [9, 0, 5, 5])["x"], x[[9, 0, 5]])
    assert take_rows(model, data, [10]) is None  # out of range
    assert take_rows(model, data, []) is None
    fixed = build_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[4,3] x) => (float[4,3] y) { y = Relu(x) }""", {})
    assert take_rows(fixed, Dataset([{"x": x[:4]}], None, "test"), [1]) is None  # a fixed first dim


def test_garbage_at_padding_positions_does_not_change_the_metrics():
    feeds = _feeds()
    clean = _compare(_padded(0.0), _padded(0.0), feeds)
    dirty = _compare(_padded(0.0), _padded(1000.0), feeds)
    y_clean, y_dirty = clean.outputs[0], dirty.outputs[0]
    assert dirty.ok and y_dirty.max_abs == 0.0
    assert y_dirty.cosine == y_clean.cosine == pytest.approx(1.0)
    assert y_dirty.masked == 2 * 4 + 4 * 4  # padded positions x hidden
    assert any("padding positions excluded: mask input 'attention_mask'" in n for n in dirty.notes)
    assert dirty.outputs[1].masked == 0  # [B, 4]: its leading dims are not [B, S]


def test_without_a_mask_input_the_padding_counts():
    feeds = _feeds("keep")
    v = _compare(_padded(0.0, "keep"), _padded(1000.0, "keep"), feeds)
    assert not v.ok and v.outputs[0].max_abs == pytest.approx(1000.0, rel=1e-3)
    assert not any("padding" in n for n in v.notes)


def test_an_unjudged_output_that_fails_is_reported_not_judged():
    from onnxopt.int8_fallback import Int8Budget

    feeds = _feeds()
    v = _compare(_padded(0.0), _padded(0.0), feeds)
    assert v.ok
    # The candidate's pooled output is wrong; only y is judged.
    text = PADDED.format(mask="attention_mask").replace("pooled = ReduceMean <axes = [1], keepdims = 0> (x)",
                                                        "pooled = ReduceMax <axes = [1], keepdims = 0> (x)")
    wrong = build(text, {"G": np.array(0.0, np.float32)})
    judged = _compare(_padded(0.0), wrong, feeds, judged_outputs=["y"])
    y, pooled = judged.outputs
    assert judged.ok and y.judged and not pooled.judged and not pooled.ok
    assert any("judged outputs: y" in n for n in judged.notes)
    every = _compare(_padded(0.0), wrong, feeds)
    assert not every.ok
    budget = Int8Budget(None, 0.99)  # the int8 step's verdict alone: no calibration needed
    ok, figure = budget.judge(judged)
    assert ok and "of y" in figure
    assert not budget.judge(every)[0]


def test_an_unknown_judged_output_is_refused():
    with pytest.raises(OptionError, match="no such output nope"):
        _compare(_padded(0.0), _padded(0.0), _feeds(), judged_outputs=["nope"])

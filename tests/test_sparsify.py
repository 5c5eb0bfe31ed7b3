"""SparsifyWeights: magnitude / 2:4 pruning stored as values + indices; equal to the dense masked model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs import assert_equivalent, build, op_types, random_feeds, run, snapshot, value_names
from onnxopt.passes import SparsifyWeights

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def keep_largest(w: np.ndarray, sparsity: float) -> np.ndarray:
    """The test's own mask: zero the round(sparsity * size) smallest |w| (values are distinct)."""
    count = int(round(sparsity * w.size))
    threshold = np.sort(np.abs(w).reshape(-1))[count - 1] if count else -1.0
    return np.where(np.abs(w) > threshold, w, 0).astype(w.dtype)


def matmul_model(w: np.ndarray, extra: str = "", weights: dict | None = None) -> ir.Model:
    return build(
        f"""{OPSET}
        g (float[N,{w.shape[0]}] x) => (float[N,{w.shape[1]}] y) {{
            y = MatMul(x, W)
            {extra}
        }}""",
        {"W": w, **(weights or {})},
    )


def optimized_ops(model: ir.Model, tmp_path) -> list[str]:
    """Op types of onnxruntime's basic-level optimized model (constant folding, no layout changes)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_sparsity_zero_changes_nothing():
    model = matmul_model(randn(32, 16))
    before = snapshot(model)
    p = SparsifyWeights(sparsity=0.0)
    assert p(model).modified is False
    assert snapshot(model) == before


def test_sparse_form_equals_dense_masked_model_and_shrinks_the_file(tmp_path):
    w = randn(64, 32)
    model = matmul_model(w)
    size_before = len(snapshot(model))
    p = SparsifyWeights(sparsity=0.75)
    assert p(model).modified
    record = p.details["layers"]["W"]
    assert record["form"] == "sparse" and record["density"] == pytest.approx(0.25, abs=1e-3)
    assert record["bytes_after"] < record["bytes_before"] / 2
    assert len(snapshot(model)) < size_before / 2
    assert "ScatterElements" in op_types(model)
    assert_equivalent(snapshot(matmul_model(keep_largest(w, 0.75))), model, random_feeds(model, {"N": 4}), rtol=0.0)
    assert "ScatterElements" not in optimized_ops(model, tmp_path)  # decoded once, at session creation
    names = value_names(model)
    assert len(names) == len(set(names))


def test_dense_where_the_sparse_form_would_not_be_smaller():
    w = randn(32, 32)
    model = matmul_model(w)
    p = SparsifyWeights(sparsity=0.2)  # density 0.8: 6 bytes a non-zero > 4 bytes an element
    p(model)
    assert p.details["layers"]["W"]["form"] == "dense"
    assert "ScatterElements" not in op_types(model)
    assert_equivalent(snapshot(matmul_model(keep_largest(w, 0.2))), model, random_feeds(model), rtol=0.0)


def test_two_of_four_along_the_conv_input_channels():
    w = randn(8, 8, 3, 3)
    model = build(
        f"""{OPSET}
        g (float[N,8,6,6] x) => (float[N,8,4,4] y) {{ y = Conv(x, W) }}""",
        {"W": w},
    )
    p = SparsifyWeights(pattern="2:4")
    p(model)
    groups = np.abs(np.moveaxis(w, 1, -1)).reshape(8, 3, 3, 2, 4)
    keep = groups >= np.sort(groups, axis=-1)[..., 2:3]  # the 2 largest of every 4 (distinct values)
    expected = np.moveaxis(np.where(keep, np.moveaxis(w, 1, -1).reshape(keep.shape), 0).reshape(8, 3, 3, 8), -1, 1)
    reference = build(
        f"""{OPSET}
        g (float[N,8,6,6] x) => (float[N,8,4,4] y) {{ y = Conv(x, W) }}""",
        {"W": expected.astype(np.float32)},
    )
    assert p.details["layers"]["W"]["density"] == 0.5
    assert_equivalent(snapshot(reference), model, random_feeds(model), rtol=0.0)


def test_two_of_four_skips_an_input_dimension_not_a_multiple_of_four():
    model = matmul_model(randn(30, 16))
    p = SparsifyWeights(pattern="2:4")
    assert p(model).modified is False
    assert "multiple of 4" in p.details["skipped"]["W"]


def test_shared_weight_stays_shared_and_a_weight_read_otherwise_is_left_alone():
    w = randn(32, 32)
    a = randn(32, 32)
    model = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,32] y) {{
            h = MatMul(x, W)
            k = MatMul(h, W)
            s = Add(k, A)
            y = MatMul(s, A)
        }}""",
        {"W": w, "A": a},
    )
    p = SparsifyWeights(sparsity=0.75)
    p(model)
    assert list(p.details["layers"]) == ["W"]
    assert "A" in p.details["skipped"]
    assert sum(name.startswith("W_values") for name in model.graph.initializers) == 1
    reference = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,32] y) {{
            h = MatMul(x, W)
            k = MatMul(h, W)
            s = Add(k, A)
            y = MatMul(s, A)
        }}""",
        {"W": keep_largest(w, 0.75), "A": a},
    )
    assert_equivalent(snapshot(reference), model, random_feeds(model, {"N": 32}), rtol=0.0)


def test_global_threshold_prunes_the_total_fraction():
    small, large = randn(32, 32) * 0.01, randn(32, 32)
    model = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,32] y) {{
            h = MatMul(x, S)
            y = MatMul(h, L)
        }}""",
        {"S": small, "L": large},
    )
    p = SparsifyWeights(sparsity=0.5, scope="global")
    p(model)
    layers = p.details["layers"]
    assert layers["S"]["density"] < 0.05 and layers["L"]["density"] > 0.9  # one threshold for both
    kept = layers["S"]["density"] * small.size + layers["L"]["density"] * large.size
    assert kept == pytest.approx(0.5 * (small.size + large.size), abs=1)


def test_weight_read_in_a_subgraph():
    w = randn(32, 16)
    text = f"""{OPSET}
        g (float[N,32] x, bool c) => (float[N,16] y) {{
            y = If(c) <
                then_branch = t () => (float[N,16] a) {{ a = MatMul(x, W) }},
                else_branch = e () => (float[N,16] b) {{ b = MatMul(x, W) }}
            >
        }}"""
    model = build(text, {"W": w})
    SparsifyWeights(sparsity=0.8)(model)
    reference = build(text, {"W": keep_largest(w, 0.8)})
    for c in (True, False):
        feeds = {"x": randn(3, 32), "c": np.array(c)}
        assert_equivalent(snapshot(reference), model, feeds, rtol=0.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        SparsifyWeights(sparsity=1.0)
    with pytest.raises(ValueError):
        SparsifyWeights(pattern="1:3")

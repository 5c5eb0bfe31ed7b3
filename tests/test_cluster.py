"""ClusterWeights: codebook + uint8 codes decoded by Gather; exact where the values fit, bounded error elsewhere."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphs import assert_equivalent, build, op_types, random_feeds, run, snapshot, value_names
from onnxopt.passes import ClusterWeights, SparsifyWeights
from onnxopt.passes.cluster import kmeans_1d

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def matmul_model(w: np.ndarray) -> ir.Model:
    return build(
        f"""{OPSET}
        g (float[N,{w.shape[0]}] x) => (float[N,{w.shape[1]}] y) {{ y = MatMul(x, W) }}""",
        {"W": w},
    )


def decoded(model: ir.Model, n_in: int) -> np.ndarray:
    """The weight the model now multiplies by: its output on the identity matrix."""
    return run(model, {"x": np.eye(n_in, dtype=np.float32)})[0]


def test_at_most_two_to_the_bits_distinct_values_are_exact_and_folded_at_load(tmp_path):
    w = rng.choice(randn(16), size=(32, 24)).astype(np.float32)  # 16 distinct values
    model = matmul_model(w)
    before = snapshot(model)
    p = ClusterWeights(bits=4)
    assert p(model).modified
    assert p.details["layers"]["W"]["mode"] == "exact"
    assert model.graph.initializers[next(n for n in model.graph.initializers if "codes" in n)].dtype == ir.DataType.UINT8
    assert_equivalent(before, model, random_feeds(model, {"N": 3}), rtol=0.0)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMul"]


def test_eight_bits_on_256_distinct_values_is_exact():
    w = rng.permutation(np.linspace(-1, 1, 256, dtype=np.float32)).reshape(16, 16)
    model = matmul_model(w)
    before = snapshot(model)
    ClusterWeights(bits=8)(model)
    assert_equivalent(before, model, random_feeds(model), rtol=0.0)


def test_per_channel_exact_where_each_channel_fits():
    w = np.stack([rng.choice(randn(4), size=32) for _ in range(24)], axis=1).astype(np.float32)  # 4 values a column
    model = matmul_model(w)
    before = snapshot(model)
    p = ClusterWeights(bits=3, per_channel=True)
    p(model)
    assert p.details["layers"]["W"]["per_channel"] and p.details["layers"]["W"]["mode"] == "exact"
    assert_equivalent(before, model, random_feeds(model), rtol=0.0)


def test_kmeans_error_is_at_most_the_uniform_grid_of_its_linear_start():
    # Lloyd's iterations never raise the squared error of the starting assignment, here a uniform grid.
    w = randn(64, 32)
    for bits in (2, 3, 4, 5):
        k = 2 ** bits
        centroids, labels = kmeans_1d(w, k, init="linear")
        step = (w.max() - w.min()) / (k - 1)
        assert centroids.size <= k
        assert np.mean((centroids[labels] - w) ** 2) <= (step / 2) ** 2
    model = matmul_model(w)
    p = ClusterWeights(bits=4)
    p(model)
    got = decoded(model, 64)
    assert len(np.unique(got)) <= 16
    assert np.abs(got - w).max() <= p.details["layers"]["W"]["max_abs_error"] * (1 + 1e-6)


def test_binary_is_sign_times_mean_abs_per_output_channel():
    w = randn(32, 8)
    model = matmul_model(w)
    ClusterWeights(bits=1)(model)
    alpha = np.abs(w).mean(axis=0)  # MatMul: output channels along axis 1
    np.testing.assert_allclose(decoded(model, 32), np.where(w >= 0, 1, -1) * alpha, rtol=1e-6)


def test_ternary_thresholds_at_seven_tenths_of_mean_abs():
    w = randn(8, 32)  # Gemm transB=1: output channels along axis 0
    model = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,8] y) {{ y = Gemm <transB=1> (x, W) }}""",
        {"W": w},
    )
    ClusterWeights(bits=2)(model)
    a = np.abs(w)
    delta = 0.7 * a.mean(axis=1, keepdims=True)
    alpha = np.array([a[i][a[i] > delta[i]].mean() for i in range(8)])[:, None]
    expected = np.where(w > delta, alpha, np.where(w < -delta, -alpha, 0)).T
    np.testing.assert_allclose(decoded(model, 32), expected, rtol=1e-6)


def test_deterministic():
    w = randn(64, 32)
    a, b = matmul_model(w), matmul_model(w)
    ClusterWeights(bits=3)(a)
    ClusterWeights(bits=3)(b)
    assert snapshot(a) == snapshot(b)


def test_shared_weight_one_codebook_and_a_weight_read_otherwise_left_alone():
    w, a = randn(32, 32), randn(32, 32)
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
    p = ClusterWeights(bits=4)
    p(model)
    assert list(p.details["layers"]) == ["W"] and "A" in p.details["skipped"]
    assert op_types(model).count("Gather") == 1
    names = value_names(model)
    assert len(names) == len(set(names))


def test_sparse_values_are_clustered_and_zeros_stay_zero():
    w = randn(64, 32)
    model = matmul_model(w)
    SparsifyWeights(sparsity=0.8)(model)
    mask = decoded(model, 64) != 0
    p = ClusterWeights(bits=3)
    p(model)
    got = decoded(model, 64)
    assert np.array_equal(got != 0, mask)
    assert len(np.unique(got[mask])) <= 8
    assert not p.details["layers"][next(iter(p.details["layers"]))]["per_channel"]


def test_weight_in_a_subgraph_is_clustered_exactly_where_it_fits():
    w = rng.choice(randn(4), size=(16, 8)).astype(np.float32)
    model = build(
        f"""{OPSET}
        g (float[N,16] x, bool c) => (float[N,8] y) {{
            y = If(c) <
                then_branch = t () => (float[N,8] a) {{ a = MatMul(x, W) }},
                else_branch = e () => (float[N,8] b) {{ b = MatMul(x, W) }}
            >
        }}""",
        {"W": w},
    )
    before = snapshot(model)
    ClusterWeights(bits=2)(model)
    for c in (True, False):
        assert_equivalent(before, model, {"x": randn(3, 16), "c": np.array(c)}, rtol=0.0)

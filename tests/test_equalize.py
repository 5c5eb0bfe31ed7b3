"""EqualizeCrossLayer: lossless rescaling between layers, ranges equalized, and the chains it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import assert_equivalent, build, op_types, random_feeds, snapshot
from onnxopt.passes import REGISTRY, EqualizeCrossLayer

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)
RTOL = 1e-5  # rescaling by s and 1/s re-rounds float32 products: a few ulps


def imbalanced(*shape, axis=0):
    """Random weights whose channels along ``axis`` span three orders of magnitude, as folded BN leaves them."""
    w = rng.standard_normal(shape).astype(np.float32)
    scale = np.logspace(-1.5, 1.5, shape[axis]).astype(np.float32)
    view = [1] * len(shape)
    view[axis] = -1
    return w * rng.permutation(scale).reshape(view)


def equalize(model, **dims):
    before = snapshot(model)
    p = EqualizeCrossLayer()
    result = p(model)
    assert_equivalent(before, model, random_feeds(model, dims or None), rtol=RTOL)
    return p, result.modified


def weight(model, op_index):
    return [n for n in model.graph if n.op_type in ("Conv", "Gemm")][op_index].inputs[1].const_value.numpy()


def channel_range(w, axis):
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def test_conv_relu_conv_ranges_become_equal_and_outputs_do_not_change():
    model = build(
        f"""{OPSET}
        g (float[N,4,8,8] x) => (float[N,6,8,8] y) {{
            a = Conv <pads=[1,1,1,1]> (x, W1, B1) \n r = Relu(a) \n p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
            q = Pad <mode="constant"> (p, pads) \n y = Conv <pads=[0,0,0,0]> (q, W2, B2)
        }}""",
        {"W1": imbalanced(8, 4, 3, 3), "B1": rng.standard_normal(8).astype(np.float32),
         "W2": imbalanced(6, 8, 1, 1, axis=1), "B2": rng.standard_normal(6).astype(np.float32),
         "pads": np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64)},
    )
    spread_before = channel_range(weight(model, 0), 0).max() / channel_range(weight(model, 0), 0).min()
    p, modified = equalize(model)
    assert modified and p.details["pairs"] == 1 and p.details["layers"] == 2
    r1, r2 = channel_range(weight(model, 0), 0), channel_range(weight(model, 1), 1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert r1.max() / r1.min() < spread_before / 10
    assert REGISTRY["equalize"] is EqualizeCrossLayer


def test_a_depthwise_chain_equalizes_as_a_whole():
    model = build(
        f"""{OPSET}
        g (float[N,4,8,8] x) => (float[N,4,8,8] y) {{
            a = Conv (x, W1, B1) \n r1 = Relu(a)
            d = Conv <group=16, pads=[1,1,1,1]> (r1, W2, B2) \n r2 = LeakyRelu <alpha=0.1> (d)
            y = Conv (r2, W3, B3)
        }}""",
        {"W1": imbalanced(16, 4, 1, 1), "B1": rng.standard_normal(16).astype(np.float32),
         "W2": imbalanced(16, 1, 3, 3), "B2": rng.standard_normal(16).astype(np.float32),
         "W3": imbalanced(4, 16, 1, 1, axis=1), "B3": rng.standard_normal(4).astype(np.float32)},
    )
    p, modified = equalize(model)
    assert modified and p.details["pairs"] == 2 and p.details["sweeps"] > 1
    # At the fixed point each pair's ranges meet: the depthwise kernel's range sits between its neighbours'.
    r1, r2, r3 = channel_range(weight(model, 0), 0), channel_range(weight(model, 1), 0), channel_range(weight(model, 2), 1)
    np.testing.assert_allclose(r1, r2, rtol=1e-2)
    np.testing.assert_allclose(r2, r3, rtol=1e-2)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pairs_in_either_layout(trans_b):
    # transB=0: W [K, N], output channels on axis 1; transB=1: W [N, K], on axis 0.
    w1 = imbalanced(16, 8, axis=0) if trans_b else imbalanced(8, 16, axis=1)
    w2 = imbalanced(4, 16, axis=1) if trans_b else imbalanced(16, 4, axis=0)
    model = build(
        f"""{OPSET}
        g (float[N,8] x) => (float[N,4] y) {{
            a = Gemm <transB={trans_b}> (x, W1, B1) \n r = Relu(a) \n y = Gemm <transB={trans_b}> (r, W2, B2)
        }}""",
        {"W1": w1, "B1": rng.standard_normal(16).astype(np.float32), "W2": w2, "B2": rng.standard_normal(4).astype(np.float32)},
    )
    p, modified = equalize(model, N=3)
    assert modified and p.details["pairs"] == 1
    np.testing.assert_allclose(channel_range(weight(model, 0), 0 if trans_b else 1),
                               channel_range(weight(model, 1), 1 if trans_b else 0), rtol=1e-5)


def test_relu6_a_branch_and_a_graph_output_are_left_alone():
    weights = {"W1": imbalanced(8, 4, 1, 1), "W2": imbalanced(8, 8, 1, 1, axis=1)}
    clip = build(
        f"""{OPSET}
        g (float[N,4,8,8] x) => (float[N,8,8,8] y) {{
            a = Conv (x, W1) \n r = Clip(a, lo, hi) \n y = Conv (r, W2)
        }}""",
        weights | {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
    )
    p, modified = equalize(clip)
    assert not modified and "Clip" in next(iter(p.details["left"].values()))
    branch = build(
        f"""{OPSET}
        g (float[N,4,8,8] x) => (float[N,8,8,8] y, float[N,8,8,8] r) {{
            a = Conv (x, W1) \n r = Relu(a) \n y = Conv (r, W2)
        }}""",
        weights,
    )
    _, modified = equalize(branch)
    assert not modified and op_types(branch) == ["Conv", "Relu", "Conv"]


def test_a_weight_shared_with_another_layer_is_copied_not_changed():
    w1 = imbalanced(8, 4, 1, 1)
    model = build(
        f"""{OPSET}
        g (float[N,4,8,8] x) => (float[N,8,8,8] y, float[N,8,8,8] z) {{
            a = Conv (x, W1) \n r = Relu(a) \n y = Conv (r, W2) \n z = Conv (x, W1)
        }}""",
        {"W1": w1, "W2": imbalanced(8, 8, 1, 1, axis=1)},
    )
    equalize(model)
    third = [n for n in model.graph if n.op_type == "Conv"][2]
    np.testing.assert_array_equal(third.inputs[1].const_value.numpy(), w1)

"""QuantizeQDQ: placement that onnxruntime fuses (checked in its optimized graph), weights, biases, edge cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import COMPUTED_RESIZE, build, random_feeds, run, snapshot
from u8s8 import int8_weights
from onnxopt.calibrate import calibrate
from onnxopt.observe import optimized_ops
from onnxopt.passes import REGISTRY, QuantizeQDQ
from onnxopt.target import resolve as resolve_target

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def quantize(model: ir.Model, dims=None, batches: int = 4, **options) -> QuantizeQDQ:
    """Calibrate on random feeds (min-max) and run the pass; returns the pass for its details."""
    feeds = [random_feeds(model, dims, seed=i) for i in range(batches)]
    p = QuantizeQDQ(**options)
    p.ranges = calibrate(model, p.plan(model).tensors, feeds)
    p(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return p


def float_initializers(model: ir.Model, min_size: int = 16) -> list[str]:
    return [
        name for name, v in model.graph.initializers.items()
        if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= min_size
    ]


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def steps_off(ref: np.ndarray, got: np.ndarray) -> float:
    """max |got - ref| in quantization steps of ``ref``'s range ((max - min) / 255, one uint8 step):
    an absolute error, which correlation and cosine are blind to (an offset, a wrong scale)."""
    step = (float(ref.max()) - float(ref.min())) / 255
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) / max(step, 1e-30)


def assert_within_steps(ref: np.ndarray, got: np.ndarray, steps: float) -> None:
    """|int8 - float| within ``steps`` uint8 steps of the output's range: each bound is about twice
    what 8-bit and 7-bit weights measured (reference kernels, or fused ones with ``target=HERE``:
    both compute exact int32 sums, so the figure is the same on every CPU)."""
    assert ref.shape == got.shape, (ref.shape, got.shape)
    off = steps_off(ref, got)
    assert off <= steps, f"{off:.2f} quantization steps off (bound {steps})"


RESIDUAL_CNN = f"""{OPSET}
g (float[N,4,8,8] x) => (float[N,10] y) {{
    c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
    r1 = Relu(c1)
    c2 = Conv <pads=[1,1,1,1]> (r1, W2, B2)
    a = Add(c2, r1)
    r2 = Relu(a)
    p = GlobalAveragePool(r2)
    f = Flatten(p)
    y = Gemm <transB=1> (f, FW, FB)
}}"""


def residual_cnn(seed: int = 0) -> ir.Model:
    """The same weights whatever ran before (the fallback test needs a model its budget bites on)."""
    r = np.random.default_rng(seed)
    shapes = {"W1": (8, 4, 3, 3), "B1": (8,), "W2": (8, 8, 3, 3), "B2": (8,), "FW": (10, 8), "FB": (10,)}
    return build(RESIDUAL_CNN, {k: r.standard_normal(v).astype(np.float32) for k, v in shapes.items()})


def test_registered_and_needs_ranges():
    assert REGISTRY["quantize"] is QuantizeQDQ
    with pytest.raises(ValueError, match="ranges"):
        QuantizeQDQ()(residual_cnn())
    with pytest.raises(ValueError, match="activations"):
        QuantizeQDQ({}, activations="int4")


def test_residual_cnn_fuses_into_integer_kernels_and_keeps_no_float_weights():
    model = residual_cnn()
    before = snapshot(model)
    p = quantize(model)
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 2 and ops.get("QLinearAdd") == 1, ops
    assert ops.get("QLinearGlobalAveragePool") == 1 and ops.get("QGemm") == 1, ops
    assert "Conv" not in ops and "Relu" not in ops and "Gemm" not in ops, ops
    assert float_initializers(model) == []
    assert p.details["folded"] == {"Relu(r1)": "Conv(c1)", "Relu(r2)": "Add(a)"}
    assert p.details["left"] == {}
    # Quality: the int8 model tracks the float one.
    feed = random_feeds(model, seed=9)
    ref, got = run(before, feed)[0], run(model, feed)[0]
    assert_within_steps(ref, got, 4)


def test_weights_per_channel_int8_and_bias_int32_with_product_scale():
    model = residual_cnn()
    w1 = model.graph.initializers["W1"].const_value.numpy().copy()
    b1 = model.graph.initializers["B1"].const_value.numpy().copy()
    quantize(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    w_dq, b_dq, x_dq = conv.inputs[1].producer(), conv.inputs[2].producer(), conv.inputs[0].producer()
    q, w_scale = w_dq.inputs[0].const_value.numpy(), w_dq.inputs[1].const_value.numpy()
    assert q.dtype == np.int8 and w_dq.attributes["axis"].value == 0 and w_scale.shape == (8,)
    np.testing.assert_allclose(w_scale, np.abs(w1).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    bias, b_scale = b_dq.inputs[0].const_value.numpy(), b_dq.inputs[1].const_value.numpy()
    x_scale = x_dq.inputs[1].const_value.numpy()
    assert bias.dtype == np.int32
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)
    np.testing.assert_allclose(bias * b_scale, b1, atol=float(b_scale.max()))


def test_gemm_axis_follows_transB_and_per_tensor_option():
    text = f"""{OPSET}
    g (float[N,8] x) => (float[N,6] y) {{ h = Gemm (x, W, B) \n y = Gemm <transB=1> (h, V, C) }}"""
    model = build(text, {"W": randn(8, 5), "B": randn(5), "V": randn(6, 5), "C": randn(6)})
    quantize(model)
    axes = [n.attributes["axis"].value for n in model.graph if n.op_type == "DequantizeLinear"
            and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert sorted(axes) == [0, 1]
    model = build(text, {"W": randn(8, 5), "B": randn(5), "V": randn(6, 5), "C": randn(6)})
    quantize(model, per_channel=False)
    scales = [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "DequantizeLinear"
              and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert all(s.ndim == 0 for s in scales) and len(scales) == 2


def test_concat_inputs_share_one_scale_and_fuse():
    text = f"""{OPSET}
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {{
        a = Conv (x, Wa) \n b = Conv (x, Wb) \n c = Concat <axis=1> (a, b) \n y = Conv (c, Wc)
    }}"""
    model = build(text, {"Wa": randn(4, 3, 1, 1), "Wb": 5 * randn(4, 3, 1, 1), "Wc": randn(4, 8, 1, 1)})
    quantize(model)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    scales = {float(v.producer().inputs[1].const_value.numpy()) for v in concat.inputs}
    out_q = concat.outputs[0].uses()[0].node
    assert out_q.op_type == "QuantizeLinear"
    assert scales == {float(out_q.inputs[1].const_value.numpy())}
    ops = optimized_ops(model)
    assert "Concat" not in ops or ops.get("QLinearConcat"), ops
    assert ops.get("QLinearConv") == 3, ops


def test_a_relu_chain_joining_a_signed_concat_keeps_its_own_scale_so_its_conv_fuses():
    # DenseNet-121's stem: Conv → Relu → MaxPool → Concat with raw conv outputs. One scale for the
    # whole Concat would put the Relu's zero point above 0: onnxruntime then kept the stem Conv float.
    text = f"""{OPSET}
    g (float[N,3,8,8] x) => (float[N,4,4,4] y) {{
        a = Conv <pads=[1,1,1,1]> (x, Wa) \n r = Relu (a) \n m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
        b = Conv (m, Wb) \n c = Concat <axis=1> (m, b) \n y = Conv (c, Wc)
    }}"""
    model = build(text, {"Wa": randn(4, 3, 3, 3), "Wb": randn(4, 4, 1, 1), "Wc": randn(4, 8, 1, 1)})
    before = snapshot(model)
    p = quantize(model)
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearConcat") == 1, ops
    assert not {"Conv", "FusedConv", "Relu"} & set(ops), ops
    relu_zp = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "r").inputs[2]
    assert int(relu_zp.const_value.numpy()) == 0
    assert "m" in p.details["tensor_map"]
    feed = random_feeds(model, seed=3)
    ref, got = run(before, feed)[0], run(model, feed)[0]
    assert_within_steps(ref, got, 4)


def test_a_batchnorm_left_standing_runs_as_an_integer_depthwise_conv():
    # DenseNet-121: BN after a Concat that is read again, before a padded Conv: no fold exists.
    text = f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,8,6,6] cat) {{
        a = Conv <pads=[1,1,1,1]> (x, Wa) \n cat = Concat <axis=1> (a, x)
        n = BatchNormalization <epsilon=1e-3> (cat, g, b, mu, var) \n r = Relu (n)
        y = Conv <pads=[1,1,1,1]> (r, Wy)
    }}"""
    weights = {"Wa": randn(4, 4, 3, 3), "Wy": randn(4, 8, 3, 3), "g": 1 + 0.3 * randn(8), "b": randn(8),
               "mu": randn(8), "var": np.abs(randn(8)) + 0.5}
    model = build(text, weights)
    before = snapshot(model)
    p = quantize(model)
    assert p.details["batchnorm_as_conv"] == ["BatchNormalization(n)"]
    assert "BatchNormalization" not in {n.op_type for n in model.graph}
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 3 and "BatchNormalization" not in ops, ops
    # Per-tensor weights would round the per-channel BN scales onto one grid: the BN stays float.
    per_tensor = build(text, weights)
    p = quantize(per_tensor, per_channel=False)
    assert "batchnorm_as_conv" not in p.details and "BatchNormalization" in {n.op_type for n in per_tensor.graph}
    float_bn = build(text, weights)
    p = quantize(float_bn, exclude=["BatchNormalization"])
    assert "batchnorm_as_conv" not in p.details and "BatchNormalization" in {n.op_type for n in float_bn.graph}
    # One int8 weight per channel costs nothing measurable against the float BN (the rest is 8-bit
    # activations on random data).
    feed = random_feeds(model, seed=5)
    for ref, got, island in zip(run(before, feed), run(model, feed), run(float_bn, feed)):
        assert steps_off(ref, got) <= steps_off(ref, island) + 0.5
        assert_within_steps(ref, got, 16)


def test_shape_ops_pass_the_scale_through():
    text = f"""{OPSET}
    g (float[N,4,4,4] x) => (float[N,6] y) {{
        c = Conv (x, W) \n t = Transpose <perm=[0,2,3,1]> (c) \n r = Reshape (t, shape) \n y = MatMul (r, M)
    }}"""
    model = build(text, {"W": randn(4, 4, 1, 1), "shape": np.array([-1, 64], np.int64), "M": randn(64, 6)})
    quantize(model)
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    by_input = {n.inputs[0].name: float(n.inputs[1].const_value.numpy()) for n in qs}
    assert by_input["c"] == by_input["t"] == by_input["r"]
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 1 and ("MatMulIntegerToFloat" in ops or "QLinearMatMul" in ops), ops
    assert "MatMul" not in ops and "Conv" not in ops, ops


def test_a_gather_of_channels_passes_the_scale_through():
    # ShuffleNet's channel shuffle, as simplify writes it.
    text = f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        a = Conv <pads=[1,1,1,1]> (x, Wa) \n s = Gather <axis=1> (a, order) \n y = Conv <pads=[1,1,1,1]> (s, Wb)
    }}"""
    model = build(text, {"Wa": randn(4, 4, 3, 3), "Wb": randn(4, 4, 3, 3), "order": np.array([0, 2, 1, 3], np.int64)})
    p = quantize(model)
    assert p.plan(build(text, {"Wa": randn(4, 4, 3, 3), "Wb": randn(4, 4, 3, 3),
                               "order": np.array([0, 2, 1, 3], np.int64)})).nodes["Gather(s)"] == "pass-through"
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 2 and ops.get("Gather") == 1 and ops.get("DequantizeLinear", 0) <= 1, ops


def test_shape_readers_read_the_integer_tensor():
    # Exporters compute reshapes from an activation's Shape: it must not keep a DequantizeLinear alive.
    text = f"""{OPSET}
    g (float[N,4,4,4] x) => (float[N,8,4,4] y) {{
        c = Conv (x, W) \n s = Shape (c) \n z = Conv (c, W2) \n y = Reshape (z, s8)
    }}"""
    r = np.random.default_rng(7)  # its own weights: what other tests draw first does not matter
    weights = {"W": r.standard_normal((8, 4, 1, 1)), "W2": r.standard_normal((8, 8, 1, 1))}
    model = build(text, {**{k: v.astype(np.float32) for k, v in weights.items()}, "s8": np.array([-1, 8, 4, 4], np.int64)})
    before = snapshot(model)
    quantize(model)
    shape = next(n for n in model.graph if n.op_type == "Shape")
    assert shape.inputs[0].producer().op_type == "QuantizeLinear"
    ops = optimized_ops(model)
    assert ops.get("QLinearConv") == 2 and "DequantizeLinear" in ops and ops["DequantizeLinear"] == 1, ops
    feed = random_feeds(model, {"N": 2}, seed=11)
    ref, got = run(before, feed)[0], run(snapshot(model), feed)[0]
    assert_within_steps(ref, got, 4)


def test_activation_matmul_inside_an_integer_chain_and_softmax_layernorm_stay_float():
    text = f"""{OPSET}
    g (float[N,5,8] x) => (float[N,5,8] y) {{
        q = MatMul (x, Wq) \n k = MatMul (x, Wk) \n kt = Transpose <perm=[0,2,1]> (k)
        s = MatMul (q, kt) \n p = Softmax <axis=-1> (s) \n v = MatMul (p, x) \n o = MatMul (v, Wo)
        y = LayerNormalization <axis=-1> (o, G, Bt)
    }}"""
    model = build(text, {"Wq": randn(8, 8), "Wk": randn(8, 8), "Wo": randn(8, 8),
                         "G": np.ones(8, np.float32), "Bt": np.zeros(8, np.float32)})
    p = quantize(model, dims={"N": 2})
    left = p.details["left"]
    assert "sensitive" in left["Softmax(p)"] and "sensitive" in left["LayerNormalization(y)"]
    # Q·K^T feeds Softmax: Q/DQ on both inputs would buy no integer kernel. P·V feeds a quantized MatMul.
    assert "feeds no integer op" in left["MatMul(s)"]
    assert {"MatMul(v)", "MatMul(o)", "MatMul(q)", "MatMul(k)"} <= set(p.details["quantized_nodes"])
    ops = optimized_ops(model)
    assert "Softmax" in ops and "LayerNormalization" in ops
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 4, ops


def test_silu_and_leaky_relu_compute_on_integer_tables():
    # YOLO's SiLU (x * Sigmoid(x)) and LeakyRelu between convs; the detection output's Sigmoid after a
    # Concat stays float without pulling the Concat back to float.
    text = f"""{OPSET}
    g (float[N,4,8,8] x) => (float[N,16,8,8] y) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1) \n s = Sigmoid (c1) \n m = Mul (c1, s)
        c2 = Conv <pads=[1,1,1,1]> (m, W2) \n l = LeakyRelu <alpha=0.1> (c2)
        c3 = Conv (l, W3) \n c4 = Conv (l, W4) \n cat = Concat <axis=1> (c3, c4) \n y = Sigmoid (cat)
    }}"""
    model = build(text, {"W1": randn(8, 4, 3, 3), "W2": randn(8, 8, 3, 3), "W3": randn(8, 8, 1, 1), "W4": randn(8, 8, 1, 1)})
    before = snapshot(model)
    p = quantize(model)
    roles = p.plan(build(text, {"W1": randn(8, 4, 3, 3), "W2": randn(8, 8, 3, 3), "W3": randn(8, 8, 1, 1),
                                "W4": randn(8, 8, 1, 1)})).nodes
    assert roles["Sigmoid(s)"] == roles["LeakyRelu(l)"] == "lookup" and roles["Mul(m)"] == "elementwise"
    assert list(p.details["left"]) == ["Sigmoid(y)"]
    ops = optimized_ops(model)
    assert ops.get("QLinearSigmoid") == 1 and ops.get("QLinearLeakyRelu") == 1 and ops.get("QLinearMul") == 1, ops
    assert ops.get("QLinearConcat") == 1 and ops.get("Sigmoid") == 1 and "Concat" not in ops, ops
    x = randn(2, 4, 8, 8)
    ref, got = (run(m, {"x": x})[0].ravel().astype(np.float64) for m in (before, snapshot(model)))
    assert ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)) > 0.99


def test_bias_correction_removes_the_mean_error_of_weight_rounding():
    # An input far from zero on average turns each weight's rounding error into an output offset.
    text = f"""{OPSET}
    g (float[N,16,6,6] x) => (float[N,8,6,6] y) {{ y = Conv <pads=[1,1,1,1]> (x, W, B) }}"""
    weights = {"W": randn(8, 16, 3, 3) * np.logspace(-2, 0, 16, dtype=np.float32)[None, :, None, None], "B": randn(8)}
    feeds = [{"x": (4.0 + randn(8, 16, 6, 6)).astype(np.float32)} for _ in range(4)]
    x = (4.0 + randn(16, 16, 6, 6)).astype(np.float32)
    reference = run(snapshot(build(text, weights)), {"x": x})[0]
    offsets = {}
    for correct in (False, True):
        model = build(text, weights)
        means = {"x": np.concatenate([f["x"] for f in feeds]).mean(axis=(0, 2, 3))} if correct else None
        p = QuantizeQDQ(per_channel=False, bias_correction=correct, input_means=means)
        p.ranges = calibrate(model, p.plan(model).tensors, feeds)
        p(model)
        got = run(snapshot(model), {"x": x})[0]
        # Mean error per output channel, away from the zero-padded border.
        offsets[correct] = np.abs((got - reference)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3))).mean()
        assert p.details.get("bias_corrected", []) == (["Conv(y)"] if correct else [])
    assert offsets[True] < offsets[False] / 3, offsets


def test_without_channel_means_there_is_no_bias_correction_and_no_error():
    model = residual_cnn()
    p = quantize(model)  # the pass alone, given ranges only
    assert p.bias_correction and "bias_corrected" not in p.details
    assert "biases corrected" not in p.summary


def test_residual_add_before_a_float_op_stays_float():
    text = f"""{OPSET}
    g (float[N,8] x) => (float[N,8] y) {{ h = MatMul (x, W) \n a = Add (h, x) \n y = LayerNormalization <axis=-1> (a, G, Bt) }}"""
    model = build(text, {"W": randn(8, 8), "G": np.ones(8, np.float32), "Bt": np.zeros(8, np.float32)})
    p = quantize(model)
    assert "feeds no integer op" in p.details["left"]["Add(a)"]
    assert "MatMul(h)" in p.details["quantized_nodes"]


def test_exclude_by_name_op_type_and_pattern():
    for exclude, float_convs in ((["c2"], 1), (["Conv"], 2), (["c*"], 2)):
        model = residual_cnn()
        for node in model.graph:
            if node.op_type == "Conv":
                node.name = node.outputs[0].name
        p = quantize(model, exclude=exclude)
        assert sum(1 for name, why in p.details["left"].items() if why == "excluded" and name.startswith("c")) == float_convs
        ops = optimized_ops(model)
        # An excluded Conv reads the float tensor, so onnxruntime cannot quantize it on its own.
        assert ops.get("Conv", 0) + ops.get("FusedConv", 0) >= float_convs, ops


def test_gather_table_stored_as_integers():
    text = f"""{OPSET}
    g (int64[N,5] ids) => (float[N,5,6] y) {{ e = Gather (table, ids) \n y = MatMul (e, W) }}"""
    model = build(text, {"table": randn(50, 8), "W": randn(8, 6)})
    feeds = [{"ids": rng.integers(0, 50, (2, 5)).astype(np.int64)} for _ in range(3)]
    before = snapshot(model)
    p = QuantizeQDQ()
    p.ranges = calibrate(model, p.plan(model).tensors, feeds)
    p(model)
    assert float_initializers(model) == []
    assert any(v.const_value.dtype == ir.DataType.UINT8 and v.const_value.size == 400 for v in model.graph.initializers.values())
    ref, got = run(before, feeds[0])[0], run(model, feeds[0])[0]
    assert_within_steps(ref, got, 3)


def test_a_table_read_by_a_float_op_is_still_gathered_on_integers():
    # The embedding plus a constant position table (an Add with a constant stays float): the Add reads
    # the DequantizeLinear of the gathered rows, so that onnxruntime gathers from the integer table;
    # reading the Gather's float output made it dequantize the whole table on every run.
    text = f"""{OPSET}
    g (int64[1,5] ids) => (float[1,5,6] y) {{ e = Gather (table, ids) \n p = Add (e, pos) \n y = MatMul (p, W) }}"""
    model = build(text, {"table": randn(50, 8), "pos": randn(1, 5, 8), "W": randn(8, 6)})
    feeds = [{"ids": rng.integers(0, 50, (1, 5)).astype(np.int64)} for _ in range(3)]
    before = snapshot(model)
    p = QuantizeQDQ()
    p.ranges = calibrate(model, p.plan(model).tensors, feeds)
    p(model)
    add = next(n for n in model.graph if n.op_type == "Add")
    assert add.inputs[0].producer().op_type == "DequantizeLinear"
    ops = optimized_ops(model)
    # One DequantizeLinear: the gathered rows' (before the float Add), none on the table.
    assert ops.get("Gather") == 1 and ops.get("DequantizeLinear") == 1, ops
    ref, got = run(before, feeds[0])[0], run(model, feeds[0])[0]
    assert_within_steps(ref, got, 2)


def test_conv_transpose_axis_one_and_grouped_per_tensor():
    text = f"""{OPSET}
    g (float[N,4,4,4] x) => (float[N,6,8,8] y) {{
        a = ConvTranspose <strides=[2,2], kernel_shape=[2,2]> (x, W, B)
        y = ConvTranspose <group=2, kernel_shape=[1,1]> (a, V)
    }}"""
    model = build(text, {"W": randn(4, 6, 2, 2), "B": randn(6), "V": randn(6, 3, 1, 1)})
    quantize(model)
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
           and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    by_shape = {n.inputs[0].const_value.shape.dims: n for n in dqs}
    assert by_shape[(4, 6, 2, 2)].attributes["axis"].value == 1
    assert by_shape[(6, 3, 1, 1)].inputs[1].const_value.numpy().ndim == 0


def test_zero_and_constant_channels():
    w = randn(4, 2, 1, 1)
    w[1] = 0.0
    w[2] = 0.5
    model = build(f"""{OPSET} g (float[N,2,4,4] x) => (float[N,4,4,4] y) {{ y = Conv (x, W) }}""", {"W": w})
    before = snapshot(model)
    quantize(model)
    feed = random_feeds(model, seed=3)
    ref, got = run(before, feed)[0], run(model, feed)[0]
    assert np.all(ref[:, 1] == 0) and np.all(got[:, 1] == 0)  # a zero channel stays exactly zero (was compared with itself)
    assert np.isfinite(got).all()
    scale = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
                 and n.inputs[0].const_value.dtype == ir.DataType.INT8).inputs[1].const_value.numpy()
    assert scale[1] == 1.0 and scale[2] == pytest.approx(0.5 / 127)
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_int8_symmetric_activations():
    model = residual_cnn()
    quantize(model, activations="int8")
    zps = [n.inputs[2].const_value for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == ir.DataType.INT8 and int(z.numpy()) == 0 for z in zps)


def test_already_quantized_and_old_opset_are_left_alone():
    model = residual_cnn()
    quantize(model)
    again = QuantizeQDQ({})
    assert not again(model).modified and "already quantized" in again.summary
    old = build(RESIDUAL_CNN.replace('"" : 17', '"" : 12'), {"W1": randn(8, 4, 3, 3), "B1": randn(8),
                "W2": randn(8, 8, 3, 3), "B2": randn(8), "FW": randn(10, 8), "FB": randn(10)})
    p = QuantizeQDQ({})
    assert not p(old).modified and "opset 12" in p.summary


def test_a_node_without_a_range_stays_float_and_says_so():
    model = residual_cnn()
    p = QuantizeQDQ({})
    p(model)
    assert all("no calibrated range" in why for why in p.details["left"].values())
    assert len(p.details["left"]) == 5


# ---------------------------------------------------------------------- the pipeline and the command line
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.cli import main  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


@pytest.fixture
def digits(tmp_path) -> Path:
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    return tmp_path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refused(capsys, folder: Path, *args, words=()) -> str:
    before = files(folder)
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert files(folder) == before
    return lines[0]


def test_digits_end_to_end_within_half_a_point_of_float(digits, capsys):
    out = digits / "int8.onnx"
    code = main([str(digits / "digits_cnn.onnx"), "--quantize", "int8", "--calibration", str(digits / "digits_calib.npz"),
                 "--eval", str(digits / "digits_test.npz"), "-o", str(out), "--no-latency", "--report", str(digits / "r.json")])
    assert code == 0, capsys.readouterr()
    report = json.loads((digits / "r.json").read_text())
    v = report["validation"]
    assert v["ok"] and v["accuracy_before"] - v["accuracy_after"] <= 0.005
    details = next(p for p in report["passes"] if p["name"] == "quantize")["details"]
    # Placement, not a count of fused kernels: every Conv and the Gemm is int8, with weights the
    # detected target's kernels sum exactly.
    assert details["weighted"]["float"] == 0 and details["calibration"]["method"] == "minmax"
    lo, hi = details["weight_range"]
    int8 = [w for _, w, _, _ in int8_weights(onnx.load(out)).values()]
    assert len(int8) == 7 and all(lo <= w.min() and w.max() <= hi for w in int8)
    assert (lo, hi) == ((-63, 63) if resolve_target("auto").weight_bits == 7 else (-127, 127))
    assert details["file_bytes"]["ratio"] < 0.6
    assert min(details["sqnr_db"].values()) > 20
    assert len(details["bias_corrected"]) == 7  # every Conv and the Gemm: channel means came with calibration
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}
    plain = digits / "plain.json"
    code = main([str(digits / "digits_cnn.onnx"), "--quantize", "int8", "--calibration", str(digits / "digits_calib.npz"),
                 "--no-bias-correction", "-o", str(digits / "plain.onnx"), "--no-validate", "--no-latency", "--report", str(plain)])
    assert code == 0, capsys.readouterr()
    assert "bias_corrected" not in next(p for p in json.loads(plain.read_text())["passes"] if p["name"] == "quantize")["details"]


def test_without_data_the_quantized_model_is_judged_on_calibration_samples_not_random_inputs(digits, capsys):
    # Random inputs fall outside every calibrated range: on them the fallback had kept all 7 layers float.
    code = main([str(digits / "digits_cnn.onnx"), "--quantize", "int8", "--calibration", str(digits / "digits_calib.npz"),
                 "-o", str(digits / "int8.onnx"), "--no-latency", "--report", str(digits / "r.json")])
    assert code == 0, capsys.readouterr()
    report = json.loads((digits / "r.json").read_text())
    samples = len(np.load(digits / "digits_calib.npz")["input"])
    assert report["validation"]["samples"] == min(samples, 512) and not report["validation"]["synthetic"]
    assert any("--calibration samples" in n for n in report["validation"]["notes"])
    details = next(p for p in report["passes"] if p["name"] == "quantize")["details"]
    assert details["fallback"] == [] and details["weighted"]["float"] == 0


def test_an_int8_model_measured_slower_than_float_says_so(digits, monkeypatch):
    # The pipeline's own side-by-side timing decides; here it is stubbed so the test does not time.
    import onnxopt.pipeline
    from onnxopt.report import LatencyComparison

    def slower(*args, **kwargs):
        return LatencyComparison(median_a_ms=0.047, median_b_ms=0.058, p90_a_ms=0.05, p90_b_ms=0.06, ratio=1.24,
                                 ratio_low=1.22, ratio_high=1.26, confidence=0.95, repetitions=65,
                                 providers=["CPUExecutionProvider"], threads=1, verdict="slower")

    monkeypatch.setattr(onnxopt.pipeline, "compare_latency", slower)
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              speed_fallback=False)
    assert result.report.passes[-1].details["int8_slower"] == 1.24
    assert any("int8 model takes 1.24x the float model's time" in n and "--batch-size" in n for n in result.report.notes)


def test_no_calibration_is_a_clear_error(digits, capsys):
    refused(capsys, digits, digits / "digits_cnn.onnx", "--quantize", "int8", words=("--calibration",))


def test_calibration_that_does_not_fit_the_inputs(digits, capsys):
    np.savez(digits / "bad.npz", input=np.zeros((4, 1, 8, 8), np.float64))
    refused(capsys, digits, digits / "digits_cnn.onnx", "--quantize", "int8", "--calibration", digits / "bad.npz",
            words=("bad.npz", "float64", "float32"))
    np.savez(digits / "bad.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    refused(capsys, digits, digits / "digits_cnn.onnx", "--quantize", "int8", "--calibration", digits / "bad.npz",
            words=("missing input(s) input", "pixels"))


def test_already_quantized_model_is_refused(digits, capsys):
    result = onnxopt.optimize(digits / "digits_cnn.onnx", passes="simplify,quantize", calibration=digits / "digits_calib.npz",
                              validate=False, latency=False)
    result.save(digits / "q.onnx")
    refused(capsys, digits, digits / "q.onnx", "--quantize", "int8", "--calibration", digits / "digits_calib.npz",
            "-o", digits / "qq.onnx", words=("already quantized",))


def test_bad_quantize_options(digits, capsys):
    model = digits / "digits_cnn.onnx"
    refused(capsys, digits, model, "--max-drop", "1", words=("--quantize",))
    refused(capsys, digits, model, "--no-bias-correction", words=("--quantize",))
    refused(capsys, digits, model, "--quantize", "int8", "--calibration", "synthetic", "--max-drop", "-1", words=("--max-drop",))
    refused(capsys, digits, model, "--quantize", "int2", words=("--quantize",))


def test_synthetic_calibration_is_flagged(digits):
    result = onnxopt.optimize(digits / "digits_cnn.onnx", passes="simplify,fold-bn,quantize", calibration="synthetic",
                              data=digits / "digits_test.npz", latency=False)
    assert any("SYNTHETIC" in note for note in result.report.notes)
    assert result.report.passes[-1].details["calibration"]["synthetic"]


def test_opset_12_is_upgraded():
    model = build(RESIDUAL_CNN.replace('"" : 17', '"" : 12'), {"W1": randn(8, 4, 3, 3), "B1": randn(8),
                  "W2": randn(8, 8, 3, 3), "B2": randn(8), "FW": randn(10, 8), "FB": randn(10)})
    feeds = [random_feeds(model, {"N": 4}, seed=i) for i in range(3)]
    result = onnxopt.optimize(model, passes=["quantize"], calibration=feeds, data=feeds, latency=False)
    assert result.model.opset_imports[""] == 13
    assert any("upgraded to 13" in note for note in result.report.notes)
    assert result.report.passes[0].details["quantized_nodes"]


def test_ragged_calibration_batches_on_the_transformer():
    path = Path(__file__).resolve().parents[1] / "models" / "zoo" / "transformer_encoder.onnx"
    feeds = [{"input": rng.integers(0, 100, (2, n)).astype(np.int64)} for n in (5, 16, 9)]
    result = onnxopt.optimize(path, passes="simplify,quantize", calibration=feeds, data=feeds, latency=False)
    assert result.ok
    assert result.report.validation.outputs[0].cosine > 0.99
    details = result.report.passes[-1].details
    # Only Q·K^T (one per layer) stays float: it feeds Softmax, not an integer op.
    assert details["weighted"]["float"] == 2
    assert sum("feeds no integer op" in why for node, why in details["left"].items() if "MatMul" in node) == 2


def test_fallback_keeps_the_most_harmful_layers_in_float_until_the_budget_is_met():
    model = residual_cnn()
    feeds = [random_feeds(model, {"N": 8}, seed=i) for i in range(3)]
    strict = onnxopt.optimize(model, passes=["quantize"], calibration=feeds, data=feeds, latency=False, min_cosine=0.99997)  # per-sample worst: all-int8 0.99995
    details = strict.report.passes[0].details
    assert details["fallback"], details
    assert all("dB SQNR" in item["reason"] for item in details["fallback"])
    assert details["budget"]["met"]
    loose = onnxopt.optimize(model, passes=["quantize"], calibration=feeds, data=feeds, latency=False, min_cosine=0.9)
    assert loose.report.passes[0].details["fallback"] == [] and loose.ok


def test_the_default_budget_drives_the_fallback_too():
    # No --min-cosine given: the verdict's default (0.99) is what the fallback works towards.
    model = residual_cnn()
    feeds = [random_feeds(model, {"N": 8}, seed=i) for i in range(3)]
    result = onnxopt.optimize(model, passes=["quantize"], calibration=feeds[:1], data=feeds, latency=False)
    details = result.report.passes[0].details
    assert details["budget"]["figure"].endswith("(budget 0.99)"), details["budget"]
    assert details["budget"]["met"] == result.ok


def test_nothing_quantized_fails_loudly():
    model = build(f"""{OPSET} g (float[N,8] x) => (float[N,8] y) {{ y = Softmax (x) }}""")
    feeds = [random_feeds(model, {"N": 2})]
    result = onnxopt.optimize(model, passes=["quantize"], calibration=feeds, data=feeds, latency=False)
    assert not result.ok
    assert any("nothing was quantized" in note for note in result.report.notes)
    assert any("Softmax" in note and "sensitive" in note for note in result.report.notes)


@pytest.mark.cuda
def test_cuda_validation(digits):
    result = onnxopt.optimize(digits / "digits_cnn.onnx", passes="simplify,fold-bn,quantize", providers="cuda",
                              calibration=digits / "digits_calib.npz", data=digits / "digits_test.npz", latency=False)
    assert result.ok and "CUDAExecutionProvider" in result.report.validation.providers


ZOO = sorted((Path(__file__).resolve().parents[1] / "models" / "zoo").glob("*.onnx"))


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_quantizes_validly_and_closely(path):
    result = onnxopt.optimize(path, "simplify,fold-bn,share-init,quantize", calibration="synthetic", data="synthetic",
                              latency=False, check=True)
    details = result.report.passes[-1].details
    assert result.ok, result.report.notes
    assert details["weighted"]["float"] <= 2
    # Absolute error in uint8 steps of each output's range (max_rel is max|diff| / max|ref|): the
    # detector measured 10.6 steps, the others 0.4-3 (8-bit and 7-bit weights alike, AMD EPYC).
    assert all(o.max_rel <= 24 * 2 / 255 for o in result.report.validation.outputs)


def test_a_shared_weight_is_quantized_once_and_the_float_copy_goes():
    text = f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{ a = Conv <pads=[1,1,1,1]> (x, W) \n y = Conv <pads=[1,1,1,1]> (a, W) }}"""
    model = build(text, {"W": randn(4, 4, 3, 3)})
    before = snapshot(model)
    quantize(model)
    int8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8 and v.const_value.size == 144]
    assert len(int8) == 1 and "W" not in model.graph.initializers
    assert optimized_ops(model).get("QLinearConv") == 2
    feed = random_feeds(model, seed=4)
    ref, got = run(before, feed)[0], run(model, feed)[0]
    assert_within_steps(ref, got, 4)


def test_a_graph_input_weight_is_not_a_constant():
    text = f"""{OPSET}
    g (float[N,4,6,6] x, float[4,4,3,3] W) => (float[N,4,4,4] y) {{ y = Conv (x, W) }}"""
    model = build(text, {"W": randn(4, 4, 3, 3)})
    p = QuantizeQDQ({"x": (-3.0, 3.0)})
    p(model)
    assert p.details["left"]["Conv(y)"] == "weight is not a constant"


# The onnx package's real architectures (random weights, opset 17: models/light.py). AlexNet and
# ZFNet add nothing that VGG does not have, at a minute each.
LIGHT = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_real_architectures_quantize_every_weighted_layer_closely(name):
    from models.light import load_light

    result = onnxopt.optimize(load_light(name), "simplify,fold-bn,share-init,quantize", calibration="synthetic",
                              data="synthetic", latency=False)
    details = result.report.passes[-1].details
    assert result.ok, result.report.notes
    assert details["weighted"]["float"] == 0 and details["float_mac_share"] == 0.0
    ops = details["onnxruntime_ops"]  # every weighted layer is an integer kernel in onnxruntime's graph
    assert ops.get("QLinearConv", 0) + ops.get("QGemm", 0) == details["weighted"]["total"], ops
    if name == "resnet50":  # its residual Sums, as Adds, run on integers too
        assert ops.get("QLinearAdd") == 16 and "Sum" not in ops, ops
    # Absolute error in uint8 steps of each output's range, as for the zoo (not a cosine that one
    # instruction set's rounding gives): the target's weights cannot saturate on any CPU.
    assert all(o.max_rel <= 24 * 2 / 255 for o in result.report.validation.outputs)
    assert details["file_bytes"]["ratio"] < 0.3  # weights dominate: int8 and no float copy


def two_linear_layers(a_shape: str) -> ir.Model:
    """MatMul + Add(bias) → Relu → MatMul + Add(bias) on an input of ``a_shape``, as TensorFlow and
    torch (on 3-D inputs) export a Linear layer."""
    return build(
        f"""{OPSET}
        g (float[{a_shape}] x) => (float[{a_shape.rsplit(",", 1)[0]},32] y) {{
            m1 = MatMul(x, W1)
            a1 = Add(m1, B1)
            r1 = Relu(a1)
            m2 = MatMul(r1, W2)
            y = Add(B2, m2)
        }}""",
        {"W1": randn(64, 128) * 0.1, "B1": randn(128), "W2": randn(128, 32) * 0.1, "B2": randn(1, 32)},
    )


@pytest.mark.parametrize("a_shape, dims", [("N,64", {"N": 8}), ("4,64", None), ("1,16,64", None)])
def test_a_matmul_bias_that_onnxruntime_fuses_into_a_gemm_is_int32(a_shape, dims):
    # A of rank 2, or of a known shape: onnxruntime fuses MatMul + Add into a Gemm. With the bias in
    # float that Gemm stayed float and dequantized its weights on every run; as int32 it is a QGemm.
    model = two_linear_layers(a_shape)
    reference = snapshot(model)
    feeds = random_feeds(model, dims, seed=9)
    p = quantize(model, dims)
    assert p.details["matmul_biases"] == ["Add(a1)", "Add(y)"] and not p.details["left"]
    for name in ("B1", "B2"):
        assert name not in model.graph.initializers  # the float bias is gone
    biases = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
              and n.inputs[0].const_value.dtype == ir.DataType.INT32]
    assert len(biases) == 2
    ops = optimized_ops(model)
    assert ops.get("QGemm") == 2 and "Gemm" not in ops and "DequantizeLinear" not in ops, ops
    want, got = run(reference, feeds)[0], run(model, feeds)[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_a_matmul_bias_stays_float_where_onnxruntime_does_not_fuse_it():
    # A of rank 3 with dynamic dims: a MatMulIntegerToFloat and a float Add; an int32 bias there
    # would be one more DequantizeLinear on every run.
    model = two_linear_layers("N,S,64")
    p = quantize(model, {"N": 2, "S": 5})
    assert "matmul_biases" not in p.details
    assert set(p.details["left"]) == {"Add(a1)", "Add(y)"} and "B1" in model.graph.initializers
    ops = optimized_ops(model)
    assert ops.get("MatMulIntegerToFloat") == 2 and "DequantizeLinear" not in ops, ops


def test_an_excluded_bias_add_keeps_its_float_bias():
    model = two_linear_layers("N,64")
    p = quantize(model, {"N": 8}, exclude=["Add(y)"])
    assert p.details["matmul_biases"] == ["Add(a1)"] and "B2" in model.graph.initializers


# --- edge cases found in review: each produced a wrong or invalid model, or a crash ---------------


# Fused integer kernels compute exactly only with weights made for this CPU (x86 without VNNI
# saturates 8-bit ones): tests that run them quantize for the target detected here.
HERE = resolve_target("auto").name


def _run_optimized(model: ir.Model, feed) -> list[np.ndarray]:
    """Outputs under onnxruntime with every graph optimization on (its QDQ fusions and layout); the
    model must be quantized with ``target=HERE``."""
    import onnxruntime as ort

    return ort.InferenceSession(snapshot(model), providers=["CPUExecutionProvider"]).run(None, dict(feed))


CONV_CONV = f"""{OPSET}
g (float[N,3,8,8] x) => (float[N,4,8,8] y) {{
    c = Conv <pads=[1,1,1,1]> (x, W1, B1)
    r = Relu(c)
    y = Conv <pads=[1,1,1,1]> (r, W2, B2)
}}"""


def test_a_nan_in_the_calibration_data_leaves_the_corrected_biases_sane():
    weights = {"W1": randn(8, 3, 3, 3), "B1": randn(8), "W2": randn(4, 8, 3, 3), "B2": randn(4)}
    feeds = [{"x": randn(8, 3, 8, 8)} for _ in range(3)]
    feeds[1]["x"][0, 0, 0, 0] = np.nan
    result = onnxopt.optimize(build(CONV_CONV, weights), ["quantize"], calibration=feeds, latency=False, validate=False)
    clean = {"x": randn(8, 3, 8, 8)}
    assert result.report.passes[-1].details.get("bias_corrected")
    assert_within_steps(run(build(CONV_CONV, weights), clean)[0], _run_optimized(result.model, clean)[0], 6)


def test_a_bias_far_larger_than_its_products_widens_the_weight_scale_instead_of_saturating():
    text = f"""{OPSET}
    g (float[N,16] x) => (float[N,8] y) {{ y = Gemm <transB=1> (x, W, B) }}"""
    weights = {"W": randn(8, 16) * 1e-2, "B": np.full(8, 40.0, np.float32)}
    model = build(text, weights)
    feed = {"x": randn(64, 16) * 1e-3}
    p = QuantizeQDQ(bias_correction=False, target=HERE)
    p.ranges = calibrate(model, p.plan(model).tensors, [feed])
    p(model)
    bias = [initializer(model, n) for n in model.graph.initializers if initializer(model, n).dtype == np.int32]
    assert bias and np.abs(bias[0]).max() <= 2**30
    ref = run(build(text, weights), feed)[0]
    for got in (run(model, feed)[0], _run_optimized(model, feed)[0]):
        assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max()


def test_gemm_alpha_or_beta_turns_bias_correction_off():
    """Without C a Gemm with alpha or beta is quantized; a correction C would be scaled by beta while
    the weight's error is scaled by alpha."""
    for attrs, corrected in (("<transB=1>", True), ("<transB=1, alpha=2.0>", False), ("<transB=1, beta=0.5>", False)):
        text = f"""{OPSET}
        g (float[N,16] x) => (float[N,8] y) {{ y = Gemm {attrs} (x, W) }}"""
        model = build(text, {"W": randn(8, 16)})
        p = QuantizeQDQ({"x": (-3.0, 3.0)}, input_means={"x": np.ones(16)})
        p(model)
        assert p.details["quantized_nodes"] == ["Gemm(y)"], attrs
        assert bool(p.details.get("bias_corrected")) == corrected, attrs


def test_a_graph_input_that_is_also_an_output_keeps_its_name_and_duplicate_outputs_both_change():
    text = f"""{OPSET}
    g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,3,8,8] x, float[N,8,8,8] r, float[N,8,8,8] r2) {{
        c = Conv <pads=[1,1,1,1]> (x, W1, B1)
        r = Relu(c)
        r2 = Identity(r)
        y = Conv <pads=[1,1,1,1]> (r, W2, B2)
    }}"""
    weights = {"W1": randn(8, 3, 3, 3), "B1": randn(8), "W2": randn(4, 8, 3, 3), "B2": randn(4)}
    model = build(text, weights)
    model.graph.outputs[3] = model.graph.outputs[2]  # r listed twice
    quantize(model, target=HERE)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y", "x", "r", "r"]
    assert model.graph.outputs[2] is model.graph.outputs[3]
    feed = {"x": randn(2, 3, 8, 8)}
    y, x, r, r_again = _run_optimized(model, feed)
    np.testing.assert_array_equal(x, feed["x"])
    np.testing.assert_array_equal(r, r_again)


@pytest.mark.parametrize("dtype, opset", [("float16", 21), ("double", 17)])
def test_fp16_and_double_stay_float_with_their_reason(dtype, opset):
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g ({dtype}[N,16] x) => ({dtype}[N,8] y) {{ h = MatMul(x, W) \n y = Relu(h) }}"""
    model = build(text, {"W": randn(16, 8).astype(np.float16 if dtype == "float16" else np.float64)})
    p = QuantizeQDQ({"x": (-3.0, 3.0)})
    p(model)
    assert p.details["left"]["MatMul(h)"] == f"input A is {dtype}: only float32 tensors are quantized"
    assert not p.details.get("quantized_nodes")
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_resize_scales_computed_by_a_concat_stay_float():
    """onnxruntime.quantization's failure on the detector: the scales 1.0 quantized came back 0.996
    and the upsampled map lost a channel. Here the scales are computed (Cast of Shape, a Concat)."""
    text = COMPUTED_RESIZE
    weights = {"W1": randn(8, 3, 3, 3), "W2": randn(4, 8, 1, 1)}
    model = build(text, weights)
    p = quantize(model, target=HERE)
    assert p.details["left"]["Concat(scales)"].startswith("computes a parameter")
    assert sorted(p.details["quantized_nodes"]) == ["Conv(c)", "Conv(y)"]
    feed = {"x": randn(2, 3, 8, 8)}
    ref = run(build(text, weights), feed)[0]
    got = _run_optimized(model, feed)[0]
    assert got.shape == (2, 4, 16, 16)
    assert_within_steps(ref, got, 10)


def test_an_overridable_initializer_is_not_calibrated_as_an_activation():
    text = """<ir_version: 4, opset_import: ["" : 17]>
    g (float[N,3,8,8] x, float[1,8,1,1] shift) => (float[N,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, W1)
        a = Add(c, shift)
        y = Conv <pads=[1,1,1,1]> (a, W2)
    }"""
    model = build(text, {"W1": randn(8, 3, 3, 3), "W2": randn(4, 8, 3, 3), "shift": randn(1, 8, 1, 1)})
    assert "shift" not in QuantizeQDQ().plan(model).tensors
    result = onnxopt.optimize(model, ["quantize"], calibration=[{"x": randn(4, 3, 8, 8)}], latency=False)
    assert result.report.ok and "Add(a)" in result.report.passes[-1].details["left"]


@pytest.mark.parametrize("resize, extra", [
    ('u = Resize <mode="nearest", axes=[2, 3]> (c, , , sizes)', {"sizes": np.array([16, 16], np.int64)}),
    ('u = Resize <mode="linear", axes=[3, 2]> (c, , scales)', {"scales": np.array([2.0, 2.0], np.float32)}),
    ('u = Resize <mode="nearest", axes=[-2, -1]> (c, roi, scales)',
     {"roi": np.array([0, 0, 1, 1], np.float32), "scales": np.array([2.0, 2.0], np.float32)}),
])
def test_a_resize_with_axes_is_written_at_full_rank_so_that_onnxruntime_can_run_it(resize, extra):
    """onnxruntime 1.32's layout transform of a QDQ Resize with opset 18's axes fails (sizes: the
    session cannot load; scales: a Gather out of bounds at run time)."""
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x) => (float[N,4,16,16] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W1)
        {resize}
        y = Conv (u, W2)
    }}"""
    weights = {"W1": randn(8, 3, 3, 3), "W2": randn(4, 8, 1, 1), **extra}
    model = build(text, weights)
    p = quantize(model, target=HERE)
    assert p.details["resize_axes_expanded"] == ["Resize(u)"]
    assert sorted(p.details["quantized_nodes"]) == ["Conv(c)", "Conv(y)"]  # the Resize's output shape is known
    resize_node = next(n for n in model.graph if n.op_type == "Resize")
    assert "axes" not in resize_node.attributes
    feed = {"x": randn(2, 3, 8, 8)}
    ref = run(build(text, weights), feed)[0]
    got = _run_optimized(model, feed)[0]
    assert_within_steps(ref, got, 20)


def test_a_resize_with_axes_and_an_aspect_ratio_policy_is_left_as_it_is():
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x) => (float[N,3,16,16] y) {
        y = Resize <mode="nearest", axes=[2, 3], keep_aspect_ratio_policy="not_larger"> (x, , , sizes)
    }"""
    model = build(text, {"sizes": np.array([16, 20], np.int64)})
    p = QuantizeQDQ({"x": (-3.0, 3.0)})
    p(model)
    assert "resize_axes_expanded" not in p.details
    assert "axes" in next(iter(model.graph)).attributes


def test_a_resize_with_axes_and_a_stale_recorded_shape_is_not_written_from_it():
    """With a dynamic batch a recorded shape may be the export's trace size: sizes become exact
    scales of the resized axes only, never sizes copied from the other (stale) dims."""
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x) => (float[N,4,16,16] y) {
        c = Conv <pads=[1,1,1,1]> (x, W1)
        u = Resize <mode="nearest", axes=[2, 3]> (c, , , sizes)
        y = Conv (u, W2)
    }"""
    weights = {"W1": randn(8, 3, 3, 3), "W2": randn(4, 8, 1, 1), "sizes": np.array([16, 16], np.int64)}
    model = build(text, weights)
    next(n for n in model.graph if n.op_type == "Conv").outputs[0].shape = ir.Shape([1, 8, 8, 8])  # traced at 1
    quantize(model, target=HERE)
    resize_node = next(n for n in model.graph if n.op_type == "Resize")
    assert len(resize_node.inputs) < 4 or resize_node.inputs[3] is None  # written as scales
    feed = {"x": randn(3, 3, 8, 8)}
    assert _run_optimized(model, feed)[0].shape == run(build(text, weights), feed)[0].shape == (3, 4, 16, 16)


def test_resize_scales_reached_through_a_pass_through_op_stay_float():
    """A float constant sliced into the scales is not made an integer table; a quantized activation
    (a MatMul's input) that also reaches the scales through an Identity is read float there."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x, float[1,1,6,6] z) => (float[N,4,48,48] y, float[3] h, float[N,4,16,16] y2) {
        c = Conv <pads=[1,1,1,1]> (x, W1)
        s = Shape (z)
        f = Cast <to=1> (s)
        h = MatMul (f, W3)
        scales = Identity (f)
        u = Resize <mode="nearest"> (c, , scales)
        y = Conv (u, W2)
        st = Constant <value_ints=[0]> ()
        en = Constant <value_ints=[4]> ()
        scales2 = Slice (S, st, en)
        u2 = Resize <mode="nearest"> (c, , scales2)
        y2 = Conv (u2, W2)
    }"""
    weights = {"W1": randn(8, 3, 3, 3), "W2": randn(4, 8, 1, 1), "W3": randn(4, 3),
               "S": np.array([1.0, 1.0, 2.0, 2.0, 3.3], np.float32)}
    model = build(text, weights)
    feeds = [{"x": randn(2, 3, 8, 8), "z": np.zeros((1, 1, 6, 6), np.float32)} for _ in range(2)]
    p = QuantizeQDQ()
    p.ranges = calibrate(model, p.plan(model).tensors, feeds)
    p(model)
    assert "MatMul(h)" in p.details["quantized_nodes"]  # f is quantized for the MatMul
    for resize_node in (n for n in model.graph if n.op_type == "Resize"):
        source = resize_node.inputs[2].producer()
        assert "DequantizeLinear" not in {source.op_type, *(i.producer().op_type for i in source.inputs
                                                           if i is not None and i.producer() is not None)}
    # (onnxruntime's own optimizer fails on the float model here: its Cast of a folded Shape)
    for ref, got in zip(run(build(text, weights), feeds[0]), run(model, feeds[0])):
        assert got.shape == ref.shape


def test_a_shared_weight_gets_a_wider_copy_for_the_node_whose_bias_needs_it():
    text = f"""{OPSET}
    g (float[N,16] x) => (float[N,8] y1, float[N,8] y2) {{
        y1 = Gemm <transB=1> (x, W, B1)
        y2 = Gemm <transB=1> (x, W, B2)
    }}"""
    weights = {"W": randn(8, 16) * 1e-2, "B1": np.full(8, 0.01, np.float32), "B2": np.full(8, 40.0, np.float32)}
    model = build(text, weights)
    feed = {"x": randn(64, 16) * 1e-3}
    p = QuantizeQDQ(bias_correction=False, target=HERE)
    p.ranges = calibrate(model, p.plan(model).tensors, [feed])
    p(model)
    for ref, got in zip(run(build(text, weights), feed), _run_optimized(model, feed)):
        assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max() + 1e-4


def test_the_pipeline_reuses_the_validation_of_the_model_the_step_settled_on(digits, monkeypatch):
    """The accuracy budget validated the final int8 model on the same data: the pipeline does not run
    it again, and the original's outputs are computed once for every validation."""
    import onnxopt.pipeline
    import onnxopt.validate

    pipeline_calls, reference_runs = [], []
    monkeypatch.setattr(onnxopt.pipeline, "compare_models",
                        lambda *a, **k: pipeline_calls.append(1) or onnxopt.validate.compare_models(*a, **k))
    real_run = onnxopt.validate.run_session
    for module in (onnxopt.validate, onnxopt.pipeline):  # the pipeline runs the first batch to check the data
        monkeypatch.setattr(module, "run_session", lambda s, f: reference_runs.append(
            s.get_session_options().graph_optimization_level) or real_run(s, f))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize",
                              calibration=digits / "digits_calib.npz", data=digits / "digits_test.npz",
                              latency=False)
    v = result.report.validation
    assert pipeline_calls == [] and v is not None and v.ok and v.accuracy_after is not None
    batches = -(-len(np.load(digits / "digits_test.npz")["labels"]) // 32)
    disabled = [level for level in reference_runs if str(level).endswith("DISABLE_ALL")]
    assert len(disabled) == batches  # the original, once per batch (the first, checking the data, too)


def test_sqnr_reads_the_first_samples_only_where_axis_0_is_surely_a_batch():
    from onnxopt.data import first_rows as _first_rows

    dynamic = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, float[N,2] m) => (float[N,4] y) { y = Relu(x) }""")
    fixed = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[16,4] x) => (float[16,4] y) { y = Relu(x) }""")
    state = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, float[2,N,3] h) => (float[N,4] y) { y = Relu(x) }""")
    feed = {"x": np.ones((16, 4), np.float32), "m": np.ones((16, 2), np.float32)}
    cut = _first_rows(dynamic, feed, 8)
    assert cut["x"].shape == (8, 4) and cut["m"].shape == (8, 2)
    assert _first_rows(dynamic, feed, 32)["x"].shape == (16, 4)
    assert _first_rows(fixed, {"x": feed["x"]}, 8)["x"].shape == (16, 4)  # a fixed dim is never cut
    mixed = {"x": np.ones((16, 4), np.float32), "h": np.ones((2, 16, 3), np.float32)}
    assert _first_rows(state, mixed, 8)["x"].shape == (16, 4)  # leading sizes differ: not surely a batch

"""quantize-dynamic: onnxruntime's dynamic int8 layouts (per tensor, per row), errors bounded by the
scales, the fused kernels, smoothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import run, snapshot
from transformer_graphs import single_matmul, tiny_transformer, token_feeds

from onnxopt.passes import Simplify
from onnxopt.passes.quantize_dynamic import QuantizeDynamic

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "transformer_encoder.onnx"


def _optimized_ops(model: ir.Model, tmp_path: Path) -> list[str]:
    """The op types of onnxruntime's fully optimized graph of ``model``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _float_initializers(model: ir.Model) -> dict[str, int]:
    return {v.name: v.const_value.size for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT}


def test_layout_matches_onnxruntime_quantize_dynamic():
    model = tiny_transformer()
    p = QuantizeDynamic(activations="tensor")
    assert p(model).modified
    ops = [n.op_type for n in model.graph]
    # Q/K/V share one DynamicQuantizeLinear: 3 inputs quantized (n, c, r2, act → 4) for 6 weights.
    assert ops.count("MatMulInteger") == 6 and ops.count("DynamicQuantizeLinear") == 4
    assert ops.count("MatMul") == 2  # the two attention MatMuls of activations stay float
    for node in model.graph:
        if node.op_type == "MatMulInteger":
            a_q, w_q, a_zp, w_zp = node.inputs
            assert a_q.dtype == ir.DataType.UINT8 and a_zp.dtype == ir.DataType.UINT8
            assert w_q.dtype == ir.DataType.INT8 and w_zp.dtype == ir.DataType.INT8
            assert not w_zp.const_value.numpy().any()  # symmetric: zero point 0 per column
            assert w_zp.const_value.shape[0] == w_q.const_value.shape[1]  # per column
            cast = node.outputs[0].uses()[0].node
            assert cast.op_type == "Cast" and cast.outputs[0].uses()[0].node.op_type == "Mul"
    assert set(p.details["left"].values()) == {"weight B is not a constant (both operands are activations)"}
    assert "Gemm" not in ops and "Add" in ops  # the Gemm's bias added in float after the scale Mul


def test_fused_by_onnxruntime_and_no_float_weight_left(tmp_path):
    model = tiny_transformer()
    QuantizeDynamic(activations="tensor")(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ops = _optimized_ops(model, tmp_path)
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & set(ops)
    assert "MatMulInteger" not in ops
    big = {name: size for name, size in _float_initializers(model).items() if size >= 64 * 64}
    assert set(big) == set()  # the embedding table too is stored int8 (per row)
    kept = tiny_transformer()
    QuantizeDynamic(embeddings=False)(kept)
    assert set(n for n, size in _float_initializers(kept).items() if size >= 64 * 64) == {"E"}


def test_error_bounded_by_the_scales():
    rng = np.random.default_rng(1)
    k, n = 96, 40
    w = (rng.standard_t(3, (k, n)) * 0.1).astype(np.float32)
    x = (rng.standard_normal((7, k)) * 2).astype(np.float32)
    x[0, 0] = 25.0  # an outlier: the per-tensor activation scale grows, the bound with it
    model = single_matmul(w)
    p = QuantizeDynamic(weight_bits=7, activations="tensor")  # exact on every x86 kernel (no int16 saturation)
    p(model)
    y = run(model, {"x": x})[0]
    ref = x.astype(np.float64) @ w
    a_scale = (max(x.max(), 0) - min(x.min(), 0)) / 255
    w_scale = np.abs(w).max(axis=0) / 63
    bound = (a_scale / 2 * np.abs(w).sum(axis=0)                                    # activation rounding
             + np.abs(x) @ np.ones((k, n)) * w_scale / 2                             # weight rounding
             + k * a_scale / 2 * w_scale / 2) * (1 + 1e-3) + 1e-5                     # both
    assert np.all(np.abs(y - ref) <= bound)
    assert np.abs(y - ref).max() > 0  # it did quantize


@pytest.mark.parametrize("bits, top", [(8, 127), (7, 63)])
def test_weight_range(bits, top):
    model = single_matmul(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    p = QuantizeDynamic(weight_bits=bits)
    p(model)
    q = next(v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT8 and v.const_value.size > 16)
    assert np.abs(q.const_value.numpy()).max() == top
    assert p.details["weight_range"] == [-top, top]
    assert model.metadata_props["onnxopt.quantization.weight_range"] == f"[{-top}, {top}]"
    assert QuantizeDynamic().for_target("avx2").weight_bits == 7
    assert QuantizeDynamic().for_target("vnni").weight_bits == 8


def _integer_matmuls(model: ir.Model) -> int:
    return sum(n.op_type in ("MatMulInteger", "MatMulIntegerToFloat") for n in model.graph)


@pytest.mark.parametrize("rows", [True, False])
def test_gemm_alpha_beta_and_transb(rows):
    model = tiny_transformer(alpha=0.5, beta=2.0)
    feeds = token_feeds()
    ref = run(model, feeds)[0]
    QuantizeDynamic(op_types=("Gemm",), activations="row" if rows else "tensor")(model)
    y = run(model, feeds)[0]
    assert _integer_matmuls(model) == 1
    cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99  # a misread alpha, beta or transB gives a different result altogether


def test_excluded_and_already_quantized():
    model = tiny_transformer()
    p = QuantizeDynamic(exclude=["MatMul"])
    p(model)
    assert _integer_matmuls(model) == 1  # only the Gemm
    again = QuantizeDynamic()
    assert not again(model).modified
    assert again.summary.startswith("already quantized")
    assert "model" in again.details["left"]


def test_bad_options():
    with pytest.raises(ValueError):
        QuantizeDynamic(weight_bits=4)
    with pytest.raises(ValueError):
        QuantizeDynamic(op_types=("Conv",))
    assert QuantizeDynamic().lossy


def test_zoo_transformer(tmp_path):
    model = ir.load(ZOO)
    Simplify()(model)
    feeds = {"input": np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64)}
    ref = run(model, feeds)[0]
    for rows in (False, True):
        model = ir.load(ZOO)
        Simplify()(model)
        p = QuantizeDynamic(activations="row" if rows else "tensor")
        p(model)
        assert len(p.details["quantized"]) == 13
        y = run(model, feeds)[0]
        cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.95  # a loose sanity bound: a wrong layout gives noise
        assert ({"MatMulIntegerToFloat"} if rows else {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}) & set(
            _optimized_ops(model, tmp_path))


EMBEDDING = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[B,S] ids) => (float[B,S,8] y, float[B,S,8] t) {
    e = Gather <axis=0> (table, ids)
    y = Relu(e)
    t = Gather <axis=0> (tied, ids)
}"""


def _embedding_model(tied_matmul: bool) -> ir.Model:
    from graphs import build

    rng = np.random.default_rng(0)
    text = EMBEDDING
    if tied_matmul:  # the second table is also an output projection: tied weights stay float
        text = text.replace("float[B,S,8] t)", "float[B,S,8] t, float[B,S,40] logits)").replace(
            "t = Gather <axis=0> (tied, ids)", "t = Gather <axis=0> (tied, ids)\n    tt = Transpose(tied)\n    logits = MatMul(t, tt)")
    table = rng.standard_normal((40, 8)).astype(np.float32) * rng.uniform(0.1, 10, (40, 1)).astype(np.float32)
    return build(text, {"table": table, "tied": rng.standard_normal((40, 8)).astype(np.float32)})


def test_embedding_tables_are_stored_int8_per_row_within_half_a_step():
    model = _embedding_model(tied_matmul=True)
    table = model.graph.initializers["table"].const_value.numpy()
    before = snapshot(model)
    p = QuantizeDynamic()
    p(model)
    assert p.details["embeddings"] and "table" not in model.graph.initializers  # no float copy left
    assert "tied" in model.graph.initializers  # also read by a Transpose for the output projection
    ids = np.random.default_rng(1).integers(0, 40, (3, 5)).astype(np.int64)
    (y_ref, _t, _l), (y, _t2, _l2) = run(before, {"ids": ids}), run(snapshot(model), {"ids": ids})
    step = np.abs(table).max(axis=1) / 127  # each row's scale
    assert np.all(np.abs(y - y_ref) <= step[ids][..., None] / 2 + 1e-6)
    assert QuantizeDynamic(embeddings=False)(_embedding_model(False)).modified is False


def test_an_embedding_table_with_other_readers_stays_float():
    model = _embedding_model(tied_matmul=True)
    p = QuantizeDynamic()
    p(model)
    assert "tied" in model.graph.initializers
    assert any("tied weights" in why for why in p.details["left"].values())


# -- activations per row ---------------------------------------------------------------------------------

def _session_outputs(model: ir.Model, feeds: dict, level) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rows_layout_is_fused_and_keeps_each_row_scale(tmp_path):
    """Per row: one unit-scale MatMulIntegerToFloat per weight, the row's scale multiplied after it. The
    optimized graph gives the outputs of the unoptimized one: the pattern Mul(Cast(acc), Mul(a_scale,
    w_scale)) would be fused by onnxruntime into a MatMulIntegerToFloat that reads a_scale as a scalar
    (measured on all-MiniLM-L6-v2: embedding cosine 0.74 instead of 0.997)."""
    model = tiny_transformer()
    feeds = token_feeds(batch=3, seq=8)
    p = QuantizeDynamic()
    assert p.rows and p(model).modified
    onnx.checker.check_model(ir.to_proto(model))
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulIntegerToFloat") == 6 and "DynamicQuantizeLinear" not in ops
    assert ops.count("QuantizeLinear") == 4  # Q/K/V share one quantized input
    assert model.opset_imports.get("com.microsoft") == 1
    for node in model.graph:
        if node.op_type == "MatMulIntegerToFloat":
            assert node.inputs[2].const_value.numpy() == 1.0  # the row scales come after, per row
            assert node.inputs[4].const_value.numpy() == 128 and node.inputs[4].dtype == ir.DataType.UINT8
    fused = _session_outputs(model, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    plain = _session_outputs(model, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert not set(_float_initializers(model)) & {"E", "Wq", "Wk", "Wv", "Wo", "W1", "W2"}


def test_rows_error_bounded_by_each_rows_scale():
    """Each row's error is bounded by its own step: an outlier in row 0 does not coarsen the others."""
    rng = np.random.default_rng(1)
    k, n = 96, 40
    w = (rng.standard_t(3, (k, n)) * 0.1).astype(np.float32)
    x = (rng.standard_normal((7, k)) * 2).astype(np.float32)
    x[0, 0] = 400.0  # one outlier token: per tensor, its range sets every row's step
    y = {}
    for rows in (True, False):
        model = single_matmul(w)
        QuantizeDynamic(weight_bits=7, activations="row" if rows else "tensor")(model)
        y[rows] = run(model, {"x": x})[0]
    ref = x.astype(np.float64) @ w
    a_scale = np.abs(x).max(axis=1, keepdims=True) / 127  # per row, symmetric
    w_scale = np.abs(w).max(axis=0) / 63
    bound = (a_scale / 2 * np.abs(w).sum(axis=0) + np.abs(x) @ np.ones((k, n)) * w_scale / 2
             + k * a_scale / 2 * w_scale / 2) * (1 + 1e-3) + 1e-5
    assert np.all(np.abs(y[True] - ref) <= bound)
    err_rows, err_tensor = np.abs(y[True] - ref)[1:].max(), np.abs(y[False] - ref)[1:].max()
    assert 0 < err_rows < err_tensor / 2  # the other rows keep their own, finer step


def test_smoothing_is_exact_in_float_and_wins_on_outlier_channels():
    """Smoothing (X / s, s W, ``act_absmax`` from calibration): the outlier transformer's error falls."""
    from outlier_transformer import outlier_feeds, outlier_transformer

    from onnxopt.calibrate import channel_absmax

    calib, feeds = outlier_feeds(8, 16, seed=1), outlier_feeds(8, 16, seed=3)
    ref = run(outlier_transformer(), feeds)[0]

    def cosine(y):
        y, r = y.reshape(-1, y.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1])
        return ((y * r).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(r, axis=-1)).min()

    worst = {}
    for alpha in (None, 0.5, "auto"):
        model = outlier_transformer()
        p = QuantizeDynamic(weight_bits=7)
        absmax = channel_absmax(model, p.smoothing_inputs(model), [calib])
        p = QuantizeDynamic(weight_bits=7, smooth_alpha=alpha, act_absmax=absmax)
        p(model)
        worst[alpha] = cosine(run(model, feeds)[0])
        if alpha is not None:
            assert p.details["smoothed"] and all(r["range_after"] < r["range_before"]
                                                 for r in p.details["smoothed"].values())
            assert "smoothed" in p.summary
    assert worst[0.5] > worst[None] and worst["auto"] > worst[None]
    assert 1 - worst[0.5] < (1 - worst[None]) / 2


def test_smoothing_options():
    with pytest.raises(ValueError, match="per row"):
        QuantizeDynamic(activations="tensor", smooth_alpha=0.5)
    with pytest.raises(ValueError):
        QuantizeDynamic(activations="rows")
    with pytest.raises(ValueError):
        QuantizeDynamic(smooth_alpha=1.5)
    # alpha 0 with both ranges equal: s = 1 / max|W|, the float function unchanged
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    model = single_matmul(w)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    p = QuantizeDynamic(smooth_alpha=0.0, act_absmax={"x": np.abs(x).max(axis=0)})
    p(model)
    assert [n.op_type for n in model.graph].count("Mul") == 4  # smoothing, row scale, A * 127 / peak, output
    y = run(model, {"x": x})[0]
    ref = x @ w
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_auto_layout_steps_a_layer_to_per_row_before_float():
    """activations="auto": per tensor; the budget's way back takes a layer's input per row, then float."""
    model = tiny_transformer()
    feeds = token_feeds(batch=3, seq=8)
    p = QuantizeDynamic(activations="auto")
    p(model)
    assert "DynamicQuantizeLinear" in [n.op_type for n in model.graph] and "row_units" in p.details
    unit = next(u for u in p.units if "MatMul" in u)
    assert p.undo_step(unit) == "per row"
    stepped = p.excluding([unit])
    assert stepped.row_units == (unit,) and unit not in stepped.exclude and stepped.undo_step(unit) == "float"
    model = tiny_transformer()
    ref = run(model, feeds)[0]
    stepped(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulIntegerToFloat") >= 1 and "DynamicQuantizeLinear" in ops  # mixed layouts
    assert "(1 of 4 per row, read by 3 layers; the budget stepped 1)" in stepped.summary  # Q, K, V share it
    siblings = [u for u in stepped.details["per_row"] if u != unit]
    assert len(siblings) == 2 and all(stepped.undo_step(u) == "float" for u in siblings)  # per row already
    alone = stepped.isolating([siblings[0]])
    alone(tiny_transformer())
    assert alone.details["per_row"] == [siblings[0]]  # measured alone as it runs: per row
    assert stepped.final_steps().undo_step(next(u for u in p.units if u not in stepped.details["per_row"] and
                                                "MatMul" in u)) == "float"
    y = run(model, feeds)[0]
    assert np.abs(y - ref).max() < 0.2 * np.abs(ref).max()
    gone = stepped.excluding([unit])
    assert unit in gone.exclude
    alone = p.isolating([unit])
    model = tiny_transformer()
    alone(model)
    assert alone.details["quantized"] == [unit]
    assert QuantizeDynamic().undo_step(unit) == "float"  # "row": straight to float


def test_the_budget_steps_a_layer_to_per_row_where_per_tensor_misses(tmp_path):
    """Rows of very different scales: one scale per tensor leaves the small rows a level or two, so the
    per-sample cosine misses; with a budget the default layout starts per tensor and the fallback steps
    the layer to per row, which meets it (and the report says so). Without a budget: per tensor."""
    import onnxopt

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    x = rng.standard_normal((64, 32)).astype(np.float32) * np.logspace(0, 3, 64, dtype=np.float32)[:, None]
    np.savez(tmp_path / "x.npz", x=x)
    model = single_matmul(w)
    budgeted = onnxopt.optimize(model, quantize="int8-dynamic", data=str(tmp_path / "x.npz"), min_cosine=0.999,
                                latency=False, target="avx2")
    record = next(p for p in budgeted.report.passes if p.name == "quantize-dynamic")
    assert record.details["activations"] == "auto" and record.details["row_units"]
    assert budgeted.report.validation.ok
    assert any("stepped 1 layer to activations quantized per row" in n for n in budgeted.report.notes)
    plain = onnxopt.optimize(model, quantize="int8-dynamic", dynamic_activations="row", data=str(tmp_path / "x.npz"),
                             latency=False, target="avx2")
    record = next(p for p in plain.report.passes if p.name == "quantize-dynamic")
    assert record.details["activations"] == "row"
    tensor = onnxopt.optimize(model, quantize="int8-dynamic", data=str(tmp_path / "x.npz"), latency=False, target="avx2")
    assert next(p for p in tensor.report.passes if p.name == "quantize-dynamic").details["activations"] == "tensor"
    cos = {name: min(o.cosine_worst for o in r.report.validation.outputs) for name, r in
           (("row", plain), ("tensor", tensor))}
    assert cos["tensor"] < 0.999 <= cos["row"]


def test_the_budget_goes_on_to_float_when_steps_to_per_row_stall(tmp_path):
    """The zoo transformer at a budget per row alone cannot meet: the rounds step layers per row, stall,
    then take layers back to float until it holds (they used to stop at the stall, writing nothing)."""
    import onnxopt

    np.savez(tmp_path / "t.npz", input=np.random.default_rng(0).integers(0, 100, (16, 12)).astype(np.int64))
    result = onnxopt.optimize(str(ZOO), quantize="int8-dynamic", min_cosine=0.9999, data=str(tmp_path / "t.npz"),
                              latency=False)
    assert result.ok and result.report.validation.ok
    notes = " ".join(result.report.notes)
    assert "layers as they were" in notes
    record = next(p for p in result.report.passes if p.name == "quantize-dynamic")
    floats = {u for u, why in record.details["left"].items() if why == "excluded"}
    assert floats and not floats & set(record.details["per_row"])  # a unit ends in one place, said once
    # the steps to float start again at one layer: no more float layers than per row from the start needs
    rows = onnxopt.optimize(str(ZOO), quantize="int8-dynamic", dynamic_activations="row", min_cosine=0.9999,
                            data=str(tmp_path / "t.npz"), latency=False)
    row_floats = {u for u, why in next(p for p in rows.report.passes if p.name == "quantize-dynamic").details[
        "left"].items() if why == "excluded"}
    assert len(floats) <= len(row_floats) + 1


def _attention_model(extra_attributes: dict | None = None) -> tuple[ir.Model, dict]:
    """A com.microsoft Attention as onnxruntime's transformer optimizer writes it (packed Q/K/V weight,
    bias, mask_index of lengths), then a MatMul reading its output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    h, b, s = 32, 2, 8
    w = (rng.standard_normal((h, 3 * h)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(3 * h) * 0.1).astype(np.float32)
    proj = (rng.standard_normal((h, h)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Attention", ["x", "W", "bias", "mask"], ["att"], domain="com.microsoft", name="attn",
                              num_heads=4, **(extra_attributes or {})),
             helper.make_node("MatMul", ["att", "P"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", h]),
                                           helper.make_tensor_value_info("mask", TensorProto.INT32, ["B"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", h])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "bias"),
                               numpy_helper.from_array(proj, "P")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": rng.standard_normal((b, s, h)).astype(np.float32), "mask": np.array([8, 5], np.int32)}
    return ir.serde.deserialize_model(proto), feeds


def test_fused_attention_becomes_qattention():
    """onnxruntime's fused Attention (its projections packed in one weight) runs as QAttention: int8
    weight per column, the input quantized per tensor (QAttention reads one scale), output close."""
    model, feeds = _attention_model()
    ref = run(model, feeds)[0]
    p = QuantizeDynamic()
    assert p(model).modified
    ops = [n.op_type for n in model.graph]
    assert "QAttention" in ops and "Attention" not in ops and "DynamicQuantizeLinear" in ops
    assert "attn" in p.details["quantized"] and "1 Attention as QAttention" in p.summary
    assert "W" not in model.graph.initializers  # no float copy of the packed weight left
    y = run(model, feeds)[0]
    cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99 and np.abs(y - ref).max() > 0
    assert p.undo_step("attn") == "float"
    kept = p.excluding(["attn"])
    model, _ = _attention_model()
    kept(model)
    assert "Attention" in [n.op_type for n in model.graph] and "attn" not in kept.details["quantized"]


def test_attention_scale_and_mask_filter_value_carry_over():
    """onnxruntime's optimizer writes mask_filter_value; QAttention honours it and scale."""
    model, feeds = _attention_model({"mask_filter_value": -10000.0, "scale": 0.3})
    ref = run(model, feeds)[0]
    QuantizeDynamic()(model)
    q = next(n for n in model.graph if n.op_type == "QAttention")
    assert q.attributes["scale"].value == pytest.approx(0.3) and q.attributes["mask_filter_value"].value == -10000.0
    y = run(model, feeds)[0]
    assert ((y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)).min() > 0.99


def test_attention_with_attributes_qattention_lacks_stays_float():
    model, _ = _attention_model({"qkv_hidden_sizes": [32, 32, 32]})
    p = QuantizeDynamic()
    p(model)
    assert "Attention" in [n.op_type for n in model.graph]
    assert "qkv_hidden_sizes" in p.details["left"]["attn"]

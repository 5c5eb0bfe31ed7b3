"""quantize-int4: onnxruntime's MatMulNBits layout byte for byte, errors bounded by the block scales,
HQQ and GPTQ no worse than round-to-nearest, the file a fifth of fp32."""

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
from onnxopt.passes.quantize_int4 import QuantizeWeightsInt4, dequantize_blocks, gptq_blocks, hqq_blocks, rtn_blocks

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "transformer_encoder.onnx"


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_bytes_identical_to_onnxruntime(symmetric, bits):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, (80, 48)) * 0.05).astype(np.float32)  # K = 80: a padded last block
    w[:32, 0] = np.linspace(-8, 7, 32) / 8 * 0.05 + 0.0  # one block on a regular grid
    theirs = MatMulNBitsQuantizer(ir.to_proto(single_matmul(w)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, bits=bits))
    theirs.process()
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.model.model.graph.initializer}
    model = single_matmul(w)
    QuantizeWeightsInt4(block_size=32, symmetric=symmetric, wide=["MatMul"] if bits == 8 else ())(model)
    mine = _initializers(model)
    for suffix in (f"_Q{bits}", "_scales", *(() if symmetric else ("_zero_points",))):
        assert mine["W" + suffix].dtype == ref["W" + suffix].dtype
        assert mine["W" + suffix].shape == ref["W" + suffix].shape
        assert mine["W" + suffix].tobytes() == ref["W" + suffix].tobytes(), suffix
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    ref_node = next(n for n in theirs.model.model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in ref_node.attribute} == {
        k: v.value for k, v in node.attributes.items()}


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bounded_by_block_scales(symmetric):
    rng = np.random.default_rng(0)
    k, n, block = 96, 24, 32
    w = (rng.standard_t(3, (k, n)) * 0.1).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    model = single_matmul(w)
    QuantizeWeightsInt4(block_size=block, symmetric=symmetric)(model)
    y = run(model, {"x": x})[0]
    ref = x.astype(np.float64) @ w
    _, scale, _ = rtn_blocks(w, block, symmetric)                  # [N, n_blocks]
    step = np.abs(scale).T.repeat(block, axis=0)[:k]                 # [K, N]: |s| of each weight's block
    # |s| / 2 per weight; symmetric codes reach -8|s| on the extreme's side but only 7|s| on the
    # other, where a value past 7.5|s| is clipped (as onnxruntime's quantizer does).
    per_weight = np.maximum(step / 2, np.abs(w) - 7 * step) if symmetric else step / 2
    bound = np.abs(x) @ per_weight
    assert np.all(np.abs(y - ref) <= bound * (1 + 1e-4) + 1e-4)
    assert np.abs(y - ref).max() > 1e-4


def test_fused_graph_and_no_float_weight_left(tmp_path):
    model = tiny_transformer()
    p = QuantizeWeightsInt4(op_types=("MatMul", "Gemm"), accuracy_level=4)
    p(model)
    assert len(p.details["quantized"]) == 6 and len(p.details["embeddings"]) == 1
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    floats = {v.name: v.const_value.size for v in model.graph.initializers.values()
              if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 64 * 64}
    assert not floats  # embedding table and every projection re-encoded; nothing big left in float
    assert all(n.attributes["accuracy_level"].value == 4 for n in model.graph if n.op_type == "MatMulNBits")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("MatMulNBits") == 6 and "GatherBlockQuantized" in ops
    feeds = token_feeds()
    y = session.run(None, feeds)[0]
    ref = run(tiny_transformer(), feeds)[0]
    cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9  # loose: a wrong layout gives noise


def test_embedding_table_within_scales():
    model = tiny_transformer()
    table = _initializers(model)["E"]
    feeds = token_feeds()
    # Read the embedding alone: the Gather's output becomes the graph output.
    for symmetric in (True, False):
        m = tiny_transformer()
        gather = next(n for n in m.graph if n.op_type == "Gather")
        m.graph.outputs[0] = gather.outputs[0]
        gather.outputs[0].shape = None
        QuantizeWeightsInt4(symmetric=symmetric)(m)
        got = run(m, feeds)[0]
        ref = table[feeds["ids"]]
        blocks = table.reshape(table.shape[0], -1, 32)
        if symmetric:
            hi, lo = blocks.max(-1), blocks.min(-1)
            s = np.maximum(np.abs(hi), np.abs(lo)) / 8
        else:
            s = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 15
        step = s.repeat(32, axis=1)[feeds["ids"]]
        bound = np.maximum(step / 2, np.abs(ref) - 7 * step) if symmetric else step / 2
        assert np.all(np.abs(got - ref) <= bound * (1 + 1e-5) + 1e-7)


def test_hqq_no_worse_than_rtn_on_heavy_tails():
    rng = np.random.default_rng(5)
    w = (rng.standard_t(2, (256, 64)) * 0.02).astype(np.float32)
    k = w.shape[0]
    err = {}
    for name, (codes, scale, zero) in {"rtn_asym": rtn_blocks(w, 32, False), "rtn_sym": rtn_blocks(w, 32, True),
                                       "hqq": hqq_blocks(w, 32)}.items():
        err[name] = np.linalg.norm(dequantize_blocks(codes, scale, zero, k) - w)
    assert err["hqq"] <= err["rtn_asym"]
    assert err["hqq"] <= err["rtn_sym"]
    model = single_matmul(w)
    QuantizeWeightsInt4(method="hqq")(model)
    zp = _initializers(model)["W_zero_points"]
    assert zp.dtype == np.float32 and zp.shape == (64 * 8,)  # float zero points, as onnxruntime's HQQ writes
    x = rng.standard_normal((4, k)).astype(np.float32)
    codes, scale, zero = hqq_blocks(w, 32)
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ dequantize_blocks(codes, scale, zero, k), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_no_worse_than_rtn(symmetric):
    rng = np.random.default_rng(7)
    k, n = 128, 48
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((512, k)) @ mix).astype(np.float32)  # correlated features, as activations are
    x[:, 3] *= 8  # and one outlier channel
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    gram = x.T.astype(np.float64) @ x
    ref = x @ w
    out_err = {}
    for name, (codes, scale, zero) in {"rtn": rtn_blocks(w, 32, symmetric),
                                       "gptq": gptq_blocks(w, gram, 32, symmetric)}.items():
        out_err[name] = np.linalg.norm(x @ dequantize_blocks(codes, scale, zero, k) - ref)
    assert out_err["gptq"] <= out_err["rtn"]
    model = single_matmul(w)
    p = QuantizeWeightsInt4(method="gptq", symmetric=symmetric, calibration_gram={"W": gram})
    p(model)
    assert "gptq_without_gram" not in p.details
    y = run(model, {"x": x[:16]})[0]
    codes, scale, zero = gptq_blocks(w, gram, 32, symmetric)
    np.testing.assert_allclose(y, x[:16] @ dequantize_blocks(codes, scale, zero, k), atol=1e-3, rtol=1e-3)
    assert p.gram_needs(single_matmul(w)) == {"W": "x"}


def test_file_size_a_fifth_of_fp32(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    model = single_matmul(w)
    ir.save(model, tmp_path / "fp32.onnx")
    for symmetric in (True, False):
        m = single_matmul(w)
        QuantizeWeightsInt4(symmetric=symmetric)(m)
        ir.save(m, tmp_path / "int4.onnx")
        assert (tmp_path / "int4.onnx").stat().st_size <= 0.2 * (tmp_path / "fp32.onnx").stat().st_size


def test_left_alone_with_reasons():
    model = tiny_transformer()
    p = QuantizeWeightsInt4(block_size=256)  # K <= 128 < 256 for every weight; the table's width too
    assert not p(model).modified
    assert all(r.startswith(("K = 64", "K = 128", "width 64", "weight B is not", "op type Gemm")) for r in p.details["left"].values())
    QuantizeWeightsInt4()(model)
    again = QuantizeWeightsInt4()
    assert not again(model).modified and again.summary.startswith("already quantized")
    with pytest.raises(ValueError):
        QuantizeWeightsInt4(block_size=24)
    with pytest.raises(ValueError):
        QuantizeWeightsInt4(method="awq")
    assert QuantizeWeightsInt4().lossy


def test_zoo_transformer_runs():
    model = ir.load(ZOO)
    Simplify()(model)
    feeds = {"input": np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64)}
    ref = run(model, feeds)[0]
    p = QuantizeWeightsInt4(method="hqq")
    p(model)
    assert len(p.details["quantized"]) == 13  # 11 MatMuls and the two Gemms (attention output, head)
    assert any(n.endswith("Gemm") for n in p.details["quantized"])
    y = run(model, feeds)[0]
    cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9


# -- GPTQ wired through onnxopt.optimize: the Gram matrices gathered in one streamed run ------------

def _shared_input_model(k: int = 128, n: int = 48, seed: int = 3) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """y = (x @ W1) + (x @ W2) @ W3: x read by two MatMuls, the third reads an activation."""
    from graphs import build

    rng = np.random.default_rng(seed)
    weights = {"W1": rng.standard_normal((k, n)) / np.sqrt(k), "W2": rng.standard_normal((k, k)) / np.sqrt(k),
               "W3": rng.standard_normal((k, n)) / np.sqrt(k)}
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, {k}] x) => (float[B, S, {n}] y) {{
            a = MatMul(x, W1)
            h = MatMul(x, W2)
            b = MatMul(h, W3)
            y = Add(a, b)
        }}""",
        {name: w.astype(np.float32) for name, w in weights.items()},
    )
    return model, weights


def _correlated(rng, shape: tuple[int, ...], k: int) -> np.ndarray:
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((*shape, k)) @ mix
    x[..., 3] *= 8  # an outlier channel
    return x.astype(np.float32)


def test_gptq_grams_one_per_input_shared_by_its_matmuls():
    from onnxopt.pipeline import gptq_grams

    model, weights = _shared_input_model()
    x = _correlated(np.random.default_rng(0), (6, 5), 128)
    calls = []
    grams = gptq_grams(model, QuantizeWeightsInt4(method="gptq"), {"x": x}, {}, 2, "cpu",
                       progress=lambda stage, i, n: calls.append((stage, i, n)))
    assert set(grams) == {"W1", "W2", "W3"} and grams["W1"] is grams["W2"]  # x's matrix, shared
    flat = x.reshape(-1, 128).astype(np.float64)
    np.testing.assert_allclose(grams["W1"], flat.T @ flat, rtol=1e-6)
    h = flat @ weights["W2"].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(grams["W3"], h.T @ h, atol=1e-5 * np.abs(h.T @ h).max())  # h in float32 there
    assert grams["W3"].dtype == np.float64 and calls and calls[-1] == ("gptq statistics", 3, 3)


def test_gptq_through_optimize_no_worse_than_rtn_on_the_calibration_data():
    import onnxopt

    model, _ = _shared_input_model()
    x = _correlated(np.random.default_rng(1), (16, 8), 128)
    feeds = {"x": x}
    reference = run(model, feeds)[0]
    err = {}
    for method in ("rtn", "gptq"):
        result = onnxopt.optimize(model, quantize="int4", int4_method=method, calibration=feeds, data=feeds,
                                  latency=False)
        record = result.report.passes[-1]
        assert record.name == "quantize-int4" and f"int4 {method}" in record.summary
        assert "gptq_without_gram" not in record.details
        assert sum(n.op_type == "MatMulNBits" for n in result.model.graph) == 3
        err[method] = np.linalg.norm(run(result.model, feeds)[0] - reference)
    assert err["gptq"] <= err["rtn"], err


def test_gptq_without_calibration_is_refused_in_one_line(tmp_path, capsys):
    import onnxopt
    from onnxopt.cli import main
    from onnxopt.errors import OptionError

    model, _ = _shared_input_model()
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    assert main([str(path), "--quantize", "int4", "--int4-method", "gptq", "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--int4-method gptq needs --calibration" in err, err
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(OptionError, match="needs --calibration"):
        onnxopt.optimize(model, quantize="int4", int4_method="gptq")
    with pytest.raises(OptionError, match="needs --calibration"):  # the pass object alone, without data
        onnxopt.optimize(model, [QuantizeWeightsInt4(method="gptq")], latency=False, validate=False)


def test_gptq_grams_can_leave_out_padding_where_an_attention_mask_says():
    from graphs import build

    from onnxopt.pipeline import gptq_grams

    k, n = 32, 8
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, {k}] x, int64[B, S] attention_mask) => (float[B, S, {n}] y) {{
            h = MatMul(x, W)
            m = Cast<to = 1>(attention_mask)
            axes = Constant<value = int64[1] {{-1}}>()
            mu = Unsqueeze(m, axes)
            y = Mul(h, mu)
        }}""",
        {"W": w},
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, k)).astype(np.float32)
    mask = np.ones((4, 6), np.int64)
    mask[:, 3:] = 0
    mask[0, 3] = 1
    x[mask == 0] *= 100  # padding rows that would swamp the matrix
    feeds = {"x": x, "attention_mask": mask}
    grams = gptq_grams(model, QuantizeWeightsInt4(method="gptq"), feeds, {}, 3, "cpu", exclude_padding=True)
    kept = x[mask == 1].astype(np.float64)
    np.testing.assert_allclose(grams["W"], kept.T @ kept, rtol=1e-9)
    every = x.reshape(-1, k).astype(np.float64)  # the default keeps every row
    np.testing.assert_allclose(gptq_grams(model, QuantizeWeightsInt4(method="gptq"), feeds, {}, 3, "cpu")["W"],
                               every.T @ every, rtol=1e-9)

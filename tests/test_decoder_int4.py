"""--quantize int4 on a decoder-only graph (GPT-style: token and position tables, causal self-attention,
pre-LN, MLP, an untied LM head): every MatMul weight becomes MatMulNBits, the model runs in onnxruntime,
and the next-token logits stay within what the quantization steps allow.

The bound is derived from the quantization steps read from the quantized model itself: a weight
rounded to the nearest of a block's levels is off by at most half that block's scale, uniformly so for
weights that are not on the grid, which is an RMS error of scale / sqrt(12). Each quantized tensor's
relative error is then rho_l = sqrt(sum over blocks of size * scale^2 / 12) / ||W||_F, and that is, to
first order, the relative error it adds to the logits; independent errors add in quadrature, so the
logits' relative error is about rho = sqrt(sum of rho_l^2). The test asks for twice that as a margin:
every position's cosine >= sqrt(1 - (2 rho)^2) and the mean >= sqrt(1 - rho^2); a position whose fp32
top-1 leads the runner-up by more than 2 * 4 * rho * rms(logits) (four standard deviations of the error
on each of the two logits) keeps its top-1, and overall agreement is at least the share of such
positions. Nothing here depends on the machine."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from graphs import run
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.recipe import Recipe

VOCAB, D, FF, LAYERS, POS, BLOCK = 512, 64, 128, 2, 32, 32


def _decoder(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A 2-layer single-head GPT-style decoder: input_ids [batch, seq] -> logits [batch, seq, vocab]."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}

    def weight(name, shape, std):
        w[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        return name

    nodes, n = [], [0]

    def node(op, inputs, **attrs):
        n[0] += 1
        out = f"t{n[0]}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    weight("wte", (VOCAB, D), 1.0)
    weight("wpe", (POS, D), 0.3)
    w["ones"], w["zeros"] = np.ones(D, np.float32), np.zeros(D, np.float32)
    w["inv_sqrt_d"] = np.array(1 / np.sqrt(D), np.float32)
    w["mask"] = np.triu(np.full((POS, POS), -1e4, np.float32), 1)
    w["zero"], w["one"], w["axis0"] = np.array(0, np.int64), np.array(1, np.int64), np.array([0], np.int64)
    seq = node("Gather", [node("Shape", ["input_ids"]), "one"], axis=0)
    positions = node("Range", ["zero", seq, "one"])
    x = node("Add", [node("Gather", ["wte", "input_ids"]), node("Gather", ["wpe", positions])])
    seq1 = node("Unsqueeze", [seq, "axis0"])
    mask = node("Slice", [node("Slice", ["mask", "axis0", seq1, "axis0"]), "axis0", seq1, "one_axis"])
    w["one_axis"] = np.array([1], np.int64)
    for layer in range(LAYERS):
        h = node("LayerNormalization", [x, "ones", "zeros"], axis=-1)
        q, k, v = (node("MatMul", [h, weight(f"l{layer}.{p}", (D, D), D ** -0.5)]) for p in "qkv")
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 2, 1])]), "inv_sqrt_d"])
        attn = node("MatMul", [node("Softmax", [node("Add", [scores, mask])], axis=-1), v])
        x = node("Add", [x, node("MatMul", [attn, weight(f"l{layer}.o", (D, D), D ** -0.5)])])
        h = node("LayerNormalization", [x, "ones", "zeros"], axis=-1)
        up = node("Relu", [node("MatMul", [h, weight(f"l{layer}.up", (D, FF), D ** -0.5)])])
        x = node("Add", [x, node("MatMul", [up, weight(f"l{layer}.down", (FF, D), FF ** -0.5)])])
    h = node("LayerNormalization", [x, "ones", "zeros"], axis=-1)
    # An untied head near the token table (a trained LM head is): each position's top logit stands out
    # of the rest by about sqrt(D) standard deviations, as a trained model's peaked distributions do.
    w["lm_head"] = (w["wte"].T + rng.standard_normal((D, VOCAB)) * 0.3).astype(np.float32)
    logits = node("MatMul", [h, "lm_head"])
    nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(a, name) for name, a in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, w


def _relative_error_bound(quantized: ir.Model, weights: dict[str, np.ndarray]) -> float:
    """sqrt(sum over the quantized tensors of rho_l^2), rho_l = sqrt(sum size * scale^2 / 12) / ||W||_F."""
    rho2 = 0.0
    for node in quantized.graph:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        scales = node.inputs[2].const_value.numpy().astype(np.float64)
        size = node.attributes.get_int("block_size") if node.op_type == "MatMulNBits" else BLOCK
        source = next(name for name, a in weights.items() if a.ndim == 2 and a.size == scales.size * size)
        rho2 += size * (scales ** 2).sum() / 12 / np.linalg.norm(weights[source]) ** 2
    return float(np.sqrt(rho2))


def test_decoder_int4_every_matmul_weight_quantized_and_within_step_bound():
    proto, weights = _decoder()
    weight_matmuls = sum(1 for nd in proto.graph.node if nd.op_type == "MatMul" and nd.input[1] in weights)
    assert weight_matmuls == 6 * LAYERS + 1
    result = optimize(proto, Recipe(quantize="int4", int4_block_size=BLOCK, validate=False, latency=False))
    model = result.model
    ops = [nd.op_type for nd in model.graph]
    assert ops.count("MatMulNBits") == weight_matmuls
    constants = {v.name for v in model.graph.initializers.values()}
    assert not [nd for nd in model.graph if nd.op_type in ("MatMul", "Gemm") and nd.inputs[1].name in constants]
    assert ops.count("MatMul") == 2 * LAYERS  # Q.K^T and attention.V: two activations, stay float

    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 24)).astype(np.int64)
    ref = run(proto, {"input_ids": ids})[0].reshape(-1, VOCAB).astype(np.float64)
    y = run(model, {"input_ids": ids})[0].reshape(-1, VOCAB).astype(np.float64)
    assert np.isfinite(y).all()
    cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
    rho = _relative_error_bound(model, weights)
    assert 0 < rho < 0.4, rho
    assert cos.min() >= np.sqrt(1 - (2 * rho) ** 2), (cos.min(), rho)
    assert cos.mean() >= np.sqrt(1 - rho ** 2), (cos.mean(), rho)

    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]
    rms = np.sqrt((ref ** 2).mean(1))
    safe = margin > 8 * rho * rms
    agree = ref.argmax(1) == y.argmax(1)
    assert safe.any()
    assert agree[safe].all()
    assert agree.mean() >= safe.mean()

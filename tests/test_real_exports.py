"""Shapes that real exports take: Constant-node weights at opset 11, odd dynamic dim names, control
flow with weights inside, LSTMs, models that are already quantized. The default passes must not
crash on any of them, and the result must validate under onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_v"))


def paddle_style() -> onnx.ModelProto:
    """Paddle2ONNX: every weight a Constant node, opset 11, dims 'p2o.DynamicDimension.0' and '?'."""
    nodes = [
        const("w", f32(8, 3, 3, 3)), const("b", f32(8)),
        const("g", rng.uniform(0.5, 1.5, 8).astype(np.float32)), const("be", f32(8)),
        const("m", f32(8) * 0.1), const("v", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 8, "?", "?"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def control_flow() -> onnx.ModelProto:
    """An If whose branches hold a Conv+BN with weights inside, and a Loop that adds a weight."""
    def branch(name, scale):
        inits = [
            numpy_helper.from_array(f32(4, 4, 1, 1) * scale, f"{name}_w"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{name}_g"),
            numpy_helper.from_array(f32(4), f"{name}_b"),
            numpy_helper.from_array(f32(4) * 0.1, f"{name}_m"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{name}_v"),
        ]
        nodes = [
            helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"]),
            helper.make_node("BatchNormalization", [f"{name}_c", f"{name}_g", f"{name}_b", f"{name}_m", f"{name}_v"], [f"{name}_y"]),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4, 5, 5])], inits)

    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["N", 4, 5, 5]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [numpy_helper.from_array(f32(1, 4, 1, 1), "step")],
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["mean", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch_out"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
        helper.make_node("Loop", ["trips", "true"], ["y"], body=loop_body),
    ]
    nodes[-1].input.append("branch_out")
    graph = helper.make_graph(
        nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lstm() -> onnx.ModelProto:
    hidden, feat = 8, 5
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden),
        helper.make_node("Squeeze", ["Y_h", "axes"], ["h"]),
        helper.make_node("MatMul", ["h", "P"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", feat])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(f32(1, 4 * hidden, feat), "W"),
            numpy_helper.from_array(f32(1, 4 * hidden, hidden), "R"),
            numpy_helper.from_array(f32(1, 8 * hidden), "B"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(f32(hidden, 3), "P"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def already_quantized() -> onnx.ModelProto:
    """ConvInteger with int8 weights, then a dequantizing Mul, and a QDQ pair on a weight."""
    w = rng.integers(-100, 100, size=(4, 3, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "w", "xz"], ["ci"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["scale"]),
        helper.make_node("Mul", ["cf", "scale"], ["deq"]),
        helper.make_node("DequantizeLinear", ["w2q", "w2s"], ["w2"]),
        helper.make_node("Conv", ["deq", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
            numpy_helper.from_array(rng.integers(-100, 100, size=(2, 4, 1, 1)).astype(np.int8), "w2q"),
            numpy_helper.from_array(np.array(0.02, np.float32), "w2s"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "build,folded",
    [(paddle_style, 1), (control_flow, 2), (lstm, 0), (already_quantized, 0)],
    ids=["paddle-constants-opset11", "if-loop-subgraphs", "lstm", "already-quantized"],
)
def test_default_passes_survive_and_validate(build, folded):
    proto = build()
    onnx.checker.check_model(proto)
    result = onnxopt.optimize(proto, check=True, latency=False, dims={"seq": 4, "batch": 2} if build is lstm else None)
    v = result.report.validation
    assert v.error is None and v.ok, [(o.name, o.max_rel) for o in v.outputs]
    fold = next(p for p in result.report.passes if p.name == "fold-bn")
    assert fold.details["folded"] == folded, fold.details
    assert result.report.after.op_counts.get("BatchNormalization", 0) == 0


def test_quantized_ops_and_qdq_are_kept():
    result = onnxopt.optimize(already_quantized(), latency=False)
    ops = result.report.after.op_counts
    assert ops.get("ConvInteger") == 1 and ops.get("DequantizeLinear") == 1 and ops.get("DynamicQuantizeLinear") == 1


QUANTIZE = "simplify,fold-bn,share-init,quantize"


def quantized(proto, **kw):
    return onnxopt.optimize(proto, QUANTIZE, calibration="synthetic", data="synthetic", latency=False, check=True, **kw)


def test_quantize_reads_constant_node_weights_of_an_opset_11_export():
    result = quantized(paddle_style())
    details = result.report.passes[-1].details
    assert result.ok and details["weighted"] == {"total": 1, "float": 0, "in_subgraphs": 0}
    assert details["integer_nodes"] >= 1 and result.report.validation.outputs[0].max_rel <= 24 * 2 / 255


def test_quantize_names_the_subgraph_convs_it_cannot_reach_and_fails_loudly():
    proto = control_flow()
    proto.graph.node.append(helper.make_node("Conv", ["y", "head_w"], ["z"]))  # one Conv it can reach
    proto.graph.initializer.append(numpy_helper.from_array(f32(4, 4, 1, 1), "head_w"))
    proto.graph.output[0].name = "z"
    result = quantized(proto)
    details = result.report.passes[-1].details
    assert details["weighted"] == {"total": 3, "float": 2, "in_subgraphs": 2}
    reasons = [why for node, why in details["left"].items() if node in ("Conv(then_y)", "Conv(else_y)")]
    assert len(reasons) == 2 and all("subgraph" in why and "If" in why for why in reasons)
    # The main graph's MACs are all quantized; the subgraphs' still make the run fail, by count.
    assert not result.ok and any("quantize FAILED: 2 of 3" in note for note in result.report.notes)


def test_quantize_leaves_an_lstm_float_with_its_reason():
    result = quantized(lstm(), dims={"seq": 4, "batch": 2})
    details = result.report.passes[-1].details
    assert result.ok, result.report.notes
    assert any(node.startswith("LSTM(") and "recurrent" in why for node, why in details["left"].items())

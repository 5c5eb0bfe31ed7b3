"""benchmarks.int8_floor: its exact step (layout Transposes as Reshapes) keeps onnxruntime's outputs
bit for bit, and its timing-only step removes exactly the QLinearAdds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxopt
from benchmarks.int8_floor import optimized_graph, without_layout_transposes, without_qlinear_adds
from benchmarks.quantize import model_data


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_floor_steps_on_the_digits_int8_graph(tmp_path):
    model, calib, test, _ = model_data("digits", tmp_path)
    with np.load(test) as npz:
        feed = {"input": npz["input"][:1]}
    result = onnxopt.optimize(model, ["simplify", "fold-bn", "share-init", "quantize"], calibration=calib,
                              validate=False, latency=False)
    result.save(tmp_path / "int8.onnx")
    graph = onnx.load(optimized_graph(tmp_path / "int8.onnx", tmp_path / "int8.ort.onnx", 1))
    # Which layout Transposes and QLinearAdds onnxruntime's graph holds is its choice per CPU (on an
    # AMD EPYC with VNNI: 2 and 2); the steps must be exact about whatever it holds.
    ops = [n.op_type for n in graph.graph.node]

    exact, replaced = without_layout_transposes(graph, feed)
    # NCHW -> NHWC of the one-channel 8x8 input and NHWC -> NCHW of the pooled 1x1 map move no data.
    assert replaced <= ops.count("Transpose")
    exact_ops = [n.op_type for n in exact.graph.node]
    assert exact_ops.count("Transpose") == ops.count("Transpose") - replaced
    assert exact_ops.count("Reshape") == ops.count("Reshape") + replaced
    np.testing.assert_array_equal(_run(exact, feed)[0], _run(graph, feed)[0])

    # At batch 2 the same ones still move only size-1 axes (the batch stays ahead of the channels).
    _, replaced_b2 = without_layout_transposes(graph, {"input": np.concatenate([feed["input"]] * 2)})
    assert replaced_b2 == replaced

    cut, removed = without_qlinear_adds(exact)
    assert removed == ops.count("QLinearAdd") and "QLinearAdd" not in [n.op_type for n in cut.graph.node]
    assert _run(cut, feed)[0].shape == _run(graph, feed)[0].shape


def test_a_transpose_that_moves_data_stays():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    cut, replaced = without_layout_transposes(model, feed)
    # [1,2,3] -> [1,3,2] swaps two real axes; [1,3,2] -> [3,1,2] only moves the size-1 axis.
    assert replaced == 1
    assert [n.op_type for n in cut.graph.node] == ["Transpose", "Reshape"]
    np.testing.assert_array_equal(_run(cut, feed)[0], _run(model, feed)[0])

"""optimize() end to end: inputs of every kind, the report, validation that can fail, providers, the verdict's exit code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import cli
from onnxopt.passes import REGISTRY, OnnxoptPass
from tests.conftest import HAS_CUDA


def conv_bn_model(batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((4, 3, 3, 3)),
        "g": rng.uniform(0.5, 1.5, 4),
        "be": rng.uniform(-0.1, 0.1, 4),
        "m": rng.uniform(-0.1, 0.1, 4),
        "v": rng.uniform(0.5, 1.5, 4),
        "W2": rng.standard_normal((4, 3, 3, 3)),
    }
    arrays["W3"] = arrays["W2"].copy()  # a duplicate: share-init merges it
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Conv", ["x", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["x", "W3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Sum", ["bn", "c2", "c3"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class BreakWeights(OnnxoptPass):
    """A deliberately wrong pass: doubles the first Conv weight (validation must catch it)."""

    name = "break"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Conv")
        w = node.inputs[1]
        value = ir.Value(name="broken", const_value=ir.tensor(w.const_value.numpy() * 2, name="broken"))
        model.graph.register_initializer(value)
        node.replace_input_with(1, value)
        return ir.passes.PassResult(model, True)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def test_every_input_kind_gives_the_same_result(model_path):
    proto = conv_bn_model()
    model = ir.serde.deserialize_model(proto)
    nodes_before = len(model.graph)
    results = [
        onnxopt.optimize(src, latency=False) for src in (model_path, str(model_path), proto, model)
    ]
    assert len(model.graph) == nodes_before, "the caller's ir.Model was modified"
    for r in results:
        assert r.ok
        assert r.report.after.op_counts.get("BatchNormalization", 0) == 0
        assert r.report.after.params == r.report.before.params - 4 * 4 + 4 - 4 * 3 * 3 * 3  # BN gone, bias in, W3 shared
    assert len({r.report.after.nodes for r in results}) == 1


def test_report_figures_and_json(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    report_path = tmp_path / "r.json"
    code = cli.main([str(model_path), "-o", str(out), "--report", str(report_path), "--latency-budget", "0.3", "-q"])
    assert code == 0 and out.exists()
    data = json.loads(report_path.read_text())
    assert [p["name"] for p in data["passes"]] == ["simplify", "fold-bn", "prune", "share-init"]
    fold = data["passes"][1]
    assert fold["modified"] is True and fold["summary"].startswith("folded 1 of 1")
    assert data["passes"][2]["modified"] is False  # no all-zero channel to remove
    share = data["passes"][3]
    assert share["modified"] is True and share["details"]["bytes_saved"] == 4 * 3 * 3 * 3 * 4
    for key in ("nodes", "params", "bytes", "macs", "op_counts"):
        assert key in data["before"] and key in data["after"]
    assert data["before"]["op_counts"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in data["after"]["op_counts"]
    # MACs: three 3x3 convs, 4 output channels over 8x8, 3 input channels, batch 1.
    assert data["before"]["macs"] == data["after"]["macs"] == 3 * 4 * 8 * 8 * 3 * 3 * 3
    assert data["validation"]["ok"] is True and data["validation"]["synthetic"] is True
    assert data["validation"]["outputs"][0]["max_rel"] < 1e-5
    assert data["latency"]["ratio"] > 0 and data["latency"]["median_a_ms"] > 0
    assert data["ok"] is True


def test_failed_validation_exits_1_and_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "break", BreakWeights)
    out = tmp_path / "o.onnx"
    code = cli.main([str(model_path), "-o", str(out), "--passes", "break", "--no-latency"])
    assert code == 1
    assert not out.exists()
    text = " ".join(capsys.readouterr().out.split())  # the report wraps long paths
    assert "validation FAIL" in text and "not written" in text


def test_api_reports_failure(model_path):
    result = onnxopt.optimize(model_path, [BreakWeights()], latency=False)
    assert not result.ok
    (out,) = result.report.validation.outputs
    assert not out.ok and out.max_rel > 0.01


def test_data_with_labels_gives_accuracy(model_path, tmp_path):
    x = np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32)
    reference = onnxopt.optimize(model_path, [], latency=False, data={"x": x}).report.validation
    assert reference.ok and reference.samples == 10
    labels = np.arange(10) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, labels=labels)
    v = onnxopt.optimize(model_path, latency=False, data=path, batch_size=3).report.validation
    assert v.batches == 4 and v.samples == 10
    assert v.accuracy_before == v.accuracy_after
    assert 0 <= v.accuracy_before <= 1


def test_check_after_every_pass(model_path):
    result = onnxopt.optimize(model_path, check=True, validate=False, latency=False)
    assert [p.name for p in result.report.passes] == ["simplify", "fold-bn", "prune", "share-init"]
    assert all(p.after is not None for p in result.report.passes)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where CUDA is absent")
def test_cuda_absent_is_a_clear_error(model_path, capsys):
    code = cli.main([str(model_path), "--providers", "cuda", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxopt: error: provider 'cuda'") and "\n" not in err


@pytest.mark.cuda
def test_cuda_validation(model_path):
    result = onnxopt.optimize(model_path, providers="cuda", latency=False)
    assert result.ok
    assert result.report.validation.providers[0] == "CUDAExecutionProvider"


class GrowWeights(OnnxoptPass):
    """A pass that adds a float64 copy of a weight (the float32 one stays): the report must say so."""

    name = "grow"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Conv")
        wide = ir.Value(name="wide", const_value=ir.tensor(node.inputs[1].const_value.numpy().astype(np.float64), name="wide"))
        model.graph.register_initializer(wide)
        cast = ir.node("Cast", [wide], attributes={"to": ir.DataType.FLOAT})
        model.graph.insert_before(node, cast)
        node.replace_input_with(1, cast.outputs[0])
        return ir.passes.PassResult(model, True)


def test_a_pass_that_grows_the_model_is_named_in_a_note():
    w = np.random.default_rng(1).standard_normal((64, 3, 3, 3)).astype(np.float32)  # 6.9 kB: past the slack
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 6, 6])], [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(proto, ["simplify", GrowWeights()], latency=False)
    grown = [n for n in result.report.notes if "grew" in n]
    assert grown == ["grow: the model grew from 6,912 to 20,736 bytes of weights (+200.0%): please report it"]
    assert result.ok  # a warning: the output is still valid and validated
    plain = onnxopt.optimize(conv_bn_model(), ["simplify", "fold-bn", "share-init"], latency=False)
    assert not [n for n in plain.report.notes if "grew" in n]


def test_a_pass_that_breaks_the_model_is_left_out_and_the_others_kept(model_path, tmp_path):
    """A lossless run whose result fails validation is written without the pass that breaks it
    (found by validating each pass in turn), never with it; the report names it and says why."""
    result = onnxopt.optimize(model_path, ["simplify", BreakWeights(), "fold-bn"], latency=False)
    assert result.ok
    assert [r.name for r in result.report.passes] == ["simplify", "fold-bn"]
    assert any("left out" in n and "differs from the original" in n for n in result.report.notes)
    ops = [n.op_type for n in result.model.graph]
    assert "BatchNormalization" not in ops  # fold-bn still ran
    reference = onnxopt.optimize(model_path, ["simplify", "fold-bn"], latency=False)
    x = {"x": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    from onnxopt.runtime import create_session, run_session
    got = run_session(create_session(result.model, optimization="disabled"), x)
    want = run_session(create_session(reference.model, optimization="disabled"), x)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

"""fix-shapes: named dynamic dims fixed, so that simplify folds the shape arithmetic; lossless on the zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from graphs import build, random_feeds, run, snapshot
from onnxopt.cli import main
from onnxopt.errors import DataError, OptionError
from onnxopt.observe import optimized_ops
from onnxopt.passes import FixInputShapes

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "models" / "zoo").glob("*.onnx"))
TRANSFORMER = ROOT / "models" / "zoo" / "transformer_encoder.onnx"

# A head split as exporters write it: the target shape is computed from Shape at run time.
SPLIT_HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S, 8] x) => (float[N, S, 2, 4] y) {
    shape = Shape(x)
    n = Gather <axis=0> (shape, zero)
    s = Gather <axis=0> (shape, one)
    n1 = Unsqueeze(n, axes)
    s1 = Unsqueeze(s, axes)
    target = Concat <axis=0> (n1, s1, heads)
    y = Reshape(x, target)
}
"""


def split_heads() -> ir.Model:
    return build(SPLIT_HEADS, {"zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                               "axes": np.array([0], np.int64), "heads": np.array([2, 4], np.int64)})


def test_named_dims_become_sizes_everywhere_and_stale_shapes_go():
    model = split_heads()
    model.graph.node(0).outputs[0].shape = ir.Shape([3])  # a recorded static shape stays
    model.graph.node(1).outputs[0].shape = ir.Shape([])
    target = next(n for n in model.graph if n.op_type == "Concat").outputs[0]
    target.shape = ir.Shape(["unk__0"])  # a stale symbol: dropped, inferred again later
    p = FixInputShapes({"N": 2, "S": 5})
    assert p(model).modified
    assert list(model.graph.inputs[0].shape) == [2, 5, 8] and list(model.graph.outputs[0].shape) == [2, 5, 2, 4]
    assert target.shape is None and list(model.graph.node(0).outputs[0].shape) == [3]
    assert p.details == {"dims": {"N": 2, "S": 5}, "inputs": 1, "shapes_dropped": 1, "unnamed": 0}
    assert not FixInputShapes({"N": 2, "S": 5})(model).modified  # exact: nothing left to change


def test_then_simplify_folds_the_shape_arithmetic_and_outputs_match():
    model = split_heads()
    reference = snapshot(model)
    FixInputShapes({"N": 2, "S": 5})(model)
    onnxopt.passes.Simplify()(model)
    assert [n.op_type for n in model.graph] == ["Reshape"]
    feeds = random_feeds(model, seed=1)
    np.testing.assert_array_equal(run(model, feeds)[0], run(reference, feeds)[0])


def test_a_subgraph_shape_that_holds_a_fixed_name_is_inferred_again():
    model = build(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c) => (float[N, 4] y) {
            y = If(c) <then_branch = t () => (float[N, 4] a) { a = Relu(x) },
                       else_branch = e () => (float[N, 4] b) { b = Neg(x) }>
        }
        """
    )
    reference = snapshot(model)
    p = FixInputShapes({"N": 3})
    p(model)
    branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert branch.outputs[0].shape is None and p.details["shapes_dropped"] == 2  # a Loop body's N may vary
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4) - 6, "c": np.array(True)}
    np.testing.assert_array_equal(run(model, feeds)[0], run(reference, feeds)[0])


def test_unknown_names_bad_sizes_and_unnamed_dims():
    p = FixInputShapes({"T": 1})
    assert not p(split_heads()).modified and "no input dim named T" in p.summary
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            FixInputShapes({"N": bad})
    model = build('<ir_version: 8, opset_import: ["" : 17]> g (float[N, ?] x) => (float[N, ?] y) { y = Relu(x) }')
    p = FixInputShapes({"N": 1})
    p(model)
    assert p.details["unnamed"] == 1 and "1 unnamed dynamic dim(s) left dynamic" in p.summary


@pytest.mark.parametrize("path", [p for p in ZOO if "detector" not in p.stem], ids=lambda p: p.stem)
def test_zoo_models_fixed_stay_equal_to_the_original(path):
    named = {d.dim_param for i in onnx.load(str(path)).graph.input for d in i.type.tensor_type.shape.dim}
    fix = {k: v for k, v in {"batch": 2, "seq": 16}.items() if k in named}
    result = onnxopt.optimize(path, list(onnxopt.DEFAULT_PASSES), fix_dims=fix, check=True, latency=False)
    v = result.report.validation
    assert result.ok and v.error is None and all(o.ok for o in v.outputs)
    assert result.report.passes[0].name == "fix-shapes"
    shape = list(result.model.graph.inputs[0].shape)
    assert all(isinstance(d, int) for d in shape) and shape[0] == 2 and shape[1:2] == ([16] if "seq" in fix else shape[1:2])


def test_the_transformer_fixed_loses_its_shape_arithmetic(tmp_path):
    data = tmp_path / "tokens.npz"
    np.savez(data, input=np.random.default_rng(0).integers(0, 100, (8, 16)).astype(np.int64))
    dynamic = onnxopt.optimize(TRANSFORMER, "simplify", data=data, latency=False)
    fixed = onnxopt.optimize(TRANSFORMER, "simplify", data=data, fix_dims={"batch": 1, "seq": 16}, latency=False)
    assert fixed.ok and fixed.report.validation.batches == 8  # the fixed batch 1 cuts the data
    # Dynamic, the reshapes that move two dynamic dims ([N*4, S, 16] → [N, 4, S, 16]) keep a computed
    # target (104 nodes); fixed, every target is constant (76).
    assert "Shape" in optimized_ops(dynamic.model) and fixed.report.after.nodes < 0.8 * dynamic.report.after.nodes
    ops = optimized_ops(fixed.model)
    assert ops.get("Gather") == 1  # the embedding: the shape arithmetic's Gathers are gone
    for op in ("Shape", "Unsqueeze", "Concat", "Sqrt", "Div"):
        assert op not in ops, op
    assert fixed.report.after.macs == dynamic.report.after.macs  # counted at the same 16 tokens


def test_quantizing_at_fixed_shapes_calibrates_at_them_and_every_linear_layer_is_a_qgemm(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).integers(0, 100, (16, 16)).astype(np.int64))
    result = onnxopt.optimize(TRANSFORMER, "simplify,quantize", calibration=calib, fix_dims={"batch": 1, "seq": 16},
                              latency=False)
    assert result.ok and result.report.passes[-1].details["calibration"]["batches"] == 16
    ops = optimized_ops(result.model)
    # 2 packed q/k/v projections, 6 per-head projections, 2 x 2 feed-forward and the head.
    assert ops.get("QGemm") == 13 and "Gemm" not in ops and ops.get("DequantizeLinear", 0) <= 2, ops


def test_a_dim_both_given_and_fixed_with_synthetic_data():
    result = onnxopt.optimize(TRANSFORMER, "simplify", dims={"seq": 16, "batch": 2}, fix_dims={"seq": 16}, latency=False)
    assert result.ok and result.report.validation.synthetic
    assert list(result.model.graph.inputs[0].shape)[1] == 16


def test_data_that_does_not_fit_the_fixed_dims_is_refused_before_any_pass(tmp_path):
    data = tmp_path / "tokens.npz"
    np.savez(data, input=np.zeros((4, 20), np.int64))
    with pytest.raises(DataError, match=r"axis 1: 20 != 16"):
        onnxopt.optimize(TRANSFORMER, "simplify", data=data, fix_dims={"seq": 16}, latency=False)


def test_option_errors(tmp_path, capsys):
    with pytest.raises(OptionError, match=r"--fix-dim sq: .* has no input dim of that name \(named dims: batch, seq\)"):
        onnxopt.optimize(TRANSFORMER, "simplify", fix_dims=["sq=16"], validate=False, latency=False)
    with pytest.raises(OptionError, match="pass fix-shapes needs sizes"):
        onnxopt.optimize(TRANSFORMER, "fix-shapes,simplify", validate=False, latency=False)
    with pytest.raises(OptionError, match="--fix-dim seq=16 contradicts --dim seq=8"):
        onnxopt.optimize(TRANSFORMER, "simplify", fix_dims={"seq": 16}, dims={"seq": 8}, validate=False, latency=False)
    out = tmp_path / "t.onnx"
    assert main([str(TRANSFORMER), "--fix-dim", "seq=0", "-o", str(out), "-q"]) == 2
    assert "--fix-dim 'seq=0': expected NAME=POSITIVE_INT" in capsys.readouterr().err and not out.exists()


def test_the_command_line_fixes_and_writes(tmp_path):
    out = tmp_path / "fixed.onnx"
    assert main([str(TRANSFORMER), "--fix-dim", "batch=1", "--fix-dim", "seq=16", "--no-latency", "-o", str(out), "-q"]) == 0
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 16]


def test_an_exporters_odd_dim_name_is_fixed_from_the_command_line(tmp_path):
    # Paddle names its dynamic dims p2o.DynamicDimension.N.
    model = build('<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }')
    odd = ir.Shape(["p2o.DynamicDimension.0", 4])
    model.graph.inputs[0].shape = odd
    model.graph.outputs[0].shape = odd
    path, out = tmp_path / "paddle.onnx", tmp_path / "fixed.onnx"
    ir.save(model, path)
    assert main([str(path), "--fix-dim", "p2o.DynamicDimension.0=3", "--no-latency", "-o", str(out), "-q"]) == 0
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [3, 4]


def test_sizes_the_model_cannot_run_are_explained(tmp_path):
    # The zoo transformer's position table holds 64 positions: at 128 tokens neither model runs.
    data = tmp_path / "tokens.npz"
    np.savez(data, input=np.zeros((2, 128), np.int64))
    # The input model is run on the first batch before any pass: bad input, in one line.
    with pytest.raises(DataError) as exc:
        onnxopt.optimize(TRANSFORMER, "simplify", data=data, fix_dims={"batch": 1, "seq": 128}, latency=False)
    assert "cannot run the input model on it (at the sizes --fix-dim gives: batch=1, seq=128)" in str(exc.value)

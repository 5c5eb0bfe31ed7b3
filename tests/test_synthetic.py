"""onnxopt.synthetic: without --data, inputs the model can run, read from the graph and tried on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphs import build
from onnxopt.cli import main
from onnxopt.data import synthetic_data
from onnxopt.errors import DataError, OptionError
from onnxopt.runtime import create_session, run_session
from onnxopt.synthetic import analyze, dim_vars, runnable_synthetic_data
from onnxopt.data import input_specs

rng = np.random.default_rng(0)
CORPUS = Path(os.environ.get("ONNXOPT_MODELS_DIR", "/work/corpus-cache/models"))


def runs(model: ir.Model, feed) -> dict:
    return run_session(create_session(model, optimization="disabled"), feed)


def call(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


# -- values: tables, masks, scalars ---------------------------------------------------------------

ENCODER = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[B,S] input_ids, int64[B,S] token_type_ids, int64[B,S] attention_mask) => (float[B,S,4] y) {
    ids32 = Cast<to=6>(input_ids)
    words = Gather(vocab, ids32)
    types = Gather(type_table, token_type_ids)
    emb = Add(words, types)
    m = Cast<to=1>(attention_mask)
    one = Constant<value=float {1.0}>()
    inv = Sub(one, m)
    big = Constant<value=float {-10000.0}>()
    bias = Mul(inv, big)
    b3 = Unsqueeze(bias, axes)
    y = Add(emb, b3)
}"""


def encoder() -> ir.Model:
    return build(ENCODER, {"vocab": rng.standard_normal((50, 4)).astype(np.float32),
                           "type_table": rng.standard_normal((2, 4)).astype(np.float32),
                           "axes": np.array([-1], np.int64)})


def test_analyze_reads_tables_through_cast_and_masks_used_like_masks():
    hints = analyze(encoder())
    assert hints["input_ids"].rows == 50  # through Cast
    assert hints["token_type_ids"].rows == 2
    assert hints["attention_mask"].mask and hints["attention_mask"].rows is None


def test_token_types_stay_inside_a_two_row_table():
    model = encoder()
    with pytest.raises(Exception, match="Gather"):  # what the old synthetic inputs did: ids up to 9
        runs(model, synthetic_data(model, dims={"B": 2, "S": 16}).batches[0])
    data = runnable_synthetic_data(model)
    (feed,) = data.batches
    assert feed["token_type_ids"].max() < 2 and feed["input_ids"].max() < 50 and feed["input_ids"].min() >= 0
    assert set(np.unique(feed["attention_mask"])) <= {0, 1} and feed["attention_mask"][0].all()
    assert feed["input_ids"].shape == (2, 16)  # batch 2, sequence 16: not 1
    assert np.isfinite(runs(model, feed)["y"]).all()
    text = "\n".join(data.notes)
    assert "token_type_ids in [0, 2)" in text and "attention_mask 0/1" in text and "S=16" in text


def test_mask_used_as_a_where_condition():
    model = build("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, int64[N,8] keep) => (float[N,8] y) {
        c = Cast<to=9>(keep)
        zero = Constant<value=float {0.0}>()
        y = Where(c, x, zero)
    }""")
    assert analyze(model)["keep"].mask
    assert set(np.unique(runnable_synthetic_data(model).batches[0]["keep"])) == {0, 1}


SR_IN_IF = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,L] x, int64 sr) => (float[N,L] y) {
    c16 = Constant<value=int64 {16000}>()
    is16 = Equal(sr, c16)
    y = If(is16) <then_branch = t () => (float[N,L] a) { a = Identity(x) },
                  else_branch = e () => (float[N,L] b) {
                      c8 = Constant<value=int64 {8000}>()
                      is8 = Equal(sr, c8)
                      shape = Constant<value=int64[2] {-1, 1000003}>()
                      bad = Reshape(x, shape)
                      b = If(is8) <then_branch = t2 () => (float[N,L] a2) { a2 = Identity(x) },
                                   else_branch = e2 () => (float[N,L] b2) { b2 = Identity(bad) }>
                  }>
}"""


def test_a_scalar_is_tried_with_the_constants_the_graph_compares_it_with():
    model = build(SR_IN_IF)
    assert analyze(model)["sr"].constants == [16000, 8000]  # the second one inside an If branch
    with pytest.raises(Exception):  # the old inputs: sr drawn in [0, 10)
        runs(model, synthetic_data(model, dims={"N": 2, "L": 512}).batches[0])
    data = runnable_synthetic_data(model)
    (feed,) = data.batches
    assert feed["sr"].shape == () and int(feed["sr"]) == 16000
    assert "sr=16000 (a constant the graph compares it with)" in "\n".join(data.notes)


def test_float_values_are_deterministic_and_images_lie_in_0_1():
    model = build("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,H,W] image) => (float[N,3,H,W] y) { y = Relu(image) }""")
    a = runnable_synthetic_data(model).batches[0]["image"]
    b = runnable_synthetic_data(model).batches[0]["image"]
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 1 and a.shape == (2, 3, 32, 32)


# -- sizes: ladders, constraints, --dim ----------------------------------------------------------


def detector() -> ir.Model:
    """Five stride-2 convs, an upsample of the last and an Add with the one before: a YOLO-like neck
    that runs only where H and W are multiples of 32 (at 1x1 the upsampled 2x2 meets 1x1)."""
    lines, prev, weights = [], "x", {}
    for i in range(5):
        weights[f"w{i}"] = rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.1
        lines.append(f"f{i} = Conv<strides=[2,2], pads=[1,1,1,1]>({prev}, w{i})")
        prev = f"f{i}"
    weights["scales"] = np.array([1, 1, 2, 2], np.float32)
    lines += ["up = Resize<mode=\"nearest\">(f4, , scales)", "y = Concat<axis=1>(up, f3)"]
    text = ("<ir_version: 8, opset_import: [\"\" : 17]>\n"
            "g (float[batch,3,height,width] x) => (float[batch,3,h2,w2] y) {\n" + "\n".join(lines) + "\n}")
    return build(text, weights)


def test_a_strided_detector_runs_at_32_not_1():
    model = detector()
    with pytest.raises(Exception):  # the old default: every dynamic dim 1
        runs(model, synthetic_data(model).batches[0])
    data = runnable_synthetic_data(model)
    assert data.batches[0]["x"].shape == (2, 3, 32, 32)
    assert "height=32, width=32 (spatial: first of 32/64/224/256/320/640 that runs)" in "\n".join(data.notes)


def test_dim_given_by_the_user_wins():
    data = runnable_synthetic_data(detector(), dims={"height": 64, "width": 96})
    assert data.batches[0]["x"].shape == (2, 3, 64, 96)
    assert "height=64, width=96 (--dim)" in "\n".join(data.notes)
    with pytest.raises(OptionError, match="--dim heigth"):
        runnable_synthetic_data(detector(), dims={"heigth": 64})


def test_audio_reflect_pad_needs_more_than_one_sample():
    model = build("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[batch,samples] audio) => (float[batch,1,outlen] y) {
        x3 = Unsqueeze(audio, axes)
        y = Pad<mode="reflect">(x3, pads)
    }""", {"axes": np.array([1], np.int64), "pads": np.array([0, 0, 64, 0, 0, 64], np.int64)})
    with pytest.raises(Exception, match="reflect"):
        runs(model, synthetic_data(model).batches[0])
    feed = runnable_synthetic_data(model).batches[0]
    assert feed["audio"].shape == (2, 512) and np.abs(feed["audio"]).max() <= 1


def test_an_unnamed_state_dim_is_the_batch():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("ReduceMean", ["input", "ax1"], ["m"], keepdims=0),
             helper.make_node("Reshape", ["m", "shape"], ["m3"]),
             helper.make_node("Add", ["state", "m3"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             onnx.numpy_helper.from_array(np.array([1, -1, 1], np.int64), "shape")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x, state], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    assert {v.key: v.kind for v in dim_vars(input_specs(model))} == {"input[0]": "batch", "input[1]": "audio",
                                                                     "state[1]": "batch"}
    feed = runnable_synthetic_data(model).batches[0]
    assert feed["input"].shape == (2, 512) and feed["state"].shape == (2, 2, 128)


NOTHING_RUNS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,L] x) => (float[a,b,c,d] y) {
    y = Reshape(x, shape)
}"""


def test_nothing_runs_is_one_line_naming_the_input_and_the_dim():
    model = build(NOTHING_RUNS, {"shape": np.array([-1, 7, 11, 13], np.int64)})
    with pytest.raises(DataError) as exc:
        runnable_synthetic_data(model)
    message = str(exc.value)
    assert "\n" not in message and "input 'x'" in message and "--dim L=N" in message and "--data" in message


def test_nothing_runs_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(build(NOTHING_RUNS, {"shape": np.array([-1, 7, 11, 13], np.int64)})), path)
    assert call(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxopt: error: synthetic inputs:") and "--dim L=N" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # the size that runs, given with --dim, wins
    assert call(path, "--dim", "L=1001", "--no-latency") == 0


# -- real exports --------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["silero_vad/silero_vad.onnx", "nudenet/320n.onnx"])
def test_the_default_command_runs_real_exports(tmp_path, capsys, relative):
    path = CORPUS / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert call(path, "-o", tmp_path / "out.onnx", "--no-latency") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "validation PASS" in out and "synthetic inputs:" in out

"""Shape arithmetic resolved with symbolic dims (``passes/shape_arithmetic.py``, run by ``simplify``).

Every rewrite is exact: each test compares against the original at several sizes of the dynamic dims,
bit for bit, because a rewrite that holds at one size only is the failure this pass could introduce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import assert_equivalent, build, op_types, run, snapshot
from onnxopt.passes import Simplify
from onnxopt.passes.shape_arithmetic import ResolveShapeArithmetic

ROOT = Path(__file__).resolve().parents[1]
OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
SIZES = [(1, 1), (2, 5), (3, 16)]  # (N, S)


def feeds(model: ir.Model, sizes=SIZES, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for n, s in sizes:
        dims = {"N": n, "S": s}
        out.append({
            v.name: rng.standard_normal([d if isinstance(d, int) else dims[d.value] for d in v.shape]).astype(dtype)
            for v in model.graph.inputs
        })
    return out


def simplified(model: ir.Model, sizes=SIZES, inputs=None) -> ir.Model:
    """``model`` after simplify, checked bit for bit against the original at each of ``sizes``."""
    before, inputs = snapshot(model), inputs or feeds(model, sizes)
    Simplify()(model)
    assert_equivalent(before, model, inputs, rtol=0.0)
    return model


def reshape_targets(model: ir.Model) -> list[list[int] | None]:
    """Each Reshape's target: its entries when constant, else None (computed at runtime)."""
    targets = []
    for node in model.graph:
        if node.op_type == "Reshape":
            value = node.inputs[1].const_value
            targets.append(None if value is None else value.numpy().tolist())
    return targets


SPLIT_HEADS = f"""{OPSET}
g (float[N,S,64] x) => (float[N,S,4,16] y) {{
    s = Shape (x) \n n = Gather <axis=0> (s, i0) \n t = Gather <axis=0> (s, i1) \n e = Gather <axis=0> (s, i2)
    h = Div (e, four)
    un = Unsqueeze (n, ax) \n ut = Unsqueeze (t, ax) \n uh = Unsqueeze (h, ax)
    target = Concat <axis=0> (un, ut, four_1d, uh)
    r = Reshape (x, target) \n y = Relu (r)
}}"""
CONSTS = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
          "four": np.array(4, np.int64), "four_1d": np.array([4], np.int64), "ax": np.array([0], np.int64)}


def test_a_computed_reshape_target_becomes_constant_copies_and_sizes():
    # An exporter's head split, [N, S, 64] → [N, S, 4, 64 / 4]: N and S are the input's own dims at
    # the same index (0 copies them), the head size is static once the 64 is known.
    model = simplified(build(SPLIT_HEADS, CONSTS))
    assert reshape_targets(model) == [[0, 0, 4, 16]]
    assert op_types(model) == ["Reshape", "Relu"]


def test_a_merged_dynamic_dim_becomes_minus_one():
    # [N, S, 4, 16] → [N * S, 64]: N * S is no input dim at its index; the element count decides it.
    model = simplified(build(f"""{OPSET}
    g (float[N,S,4,16] x) => (float[M,64] y) {{
        s = Shape (x) \n n = Gather <axis=0> (s, i0) \n t = Gather <axis=0> (s, i1) \n m = Mul (n, t)
        um = Unsqueeze (m, ax) \n target = Concat <axis=0> (um, c64)
        r = Reshape (x, target) \n y = Relu (r)
    }}""", {**CONSTS, "c64": np.array([64], np.int64)}))
    assert reshape_targets(model) == [[-1, 64]]


def test_dims_survive_a_slice_with_a_computed_end():
    # The position table sliced to the sequence length: onnx's inference loses every dim of the Slice
    # and of the Add after it; the sliced axis is min(64, S) and the others stay, so the model width
    # (64) is known again downstream and the head split is static.
    model = simplified(build(f"""{OPSET}
    g (float[N,S,64] x) => (float[N,S,4,16] y) {{
        s0 = Shape (x) \n len = Gather <axis=0> (s0, i1) \n end = Unsqueeze (len, ax)
        pos = Slice (table, zero_1d, end, one_1d)
        a = Add (x, pos)
        s = Shape (a) \n n = Gather <axis=0> (s, i0) \n t = Gather <axis=0> (s, i1) \n e = Gather <axis=0> (s, i2)
        h = Div (e, four)
        un = Unsqueeze (n, ax) \n ut = Unsqueeze (t, ax) \n uh = Unsqueeze (h, ax)
        target = Concat <axis=0> (un, ut, four_1d, uh)
        r = Reshape (a, target) \n y = Relu (r)
    }}""", {**CONSTS, "table": np.random.default_rng(1).standard_normal((1, 64, 64)).astype(np.float32),
            "zero_1d": np.array([0], np.int64), "one_1d": np.array([1], np.int64)}),
        sizes=[(1, 1), (2, 5), (3, 64)])
    assert reshape_targets(model) == [[0, 0, 4, 16]]
    assert op_types(model).count("Shape") == 1  # the Slice's end: the sequence length, needed at runtime


def test_a_reshape_to_its_own_shape_goes():
    model = simplified(build(f"""{OPSET}
    g (float[N,S] x) => (float[N,S] y) {{
        s = Shape (x) \n r = Reshape (x, s) \n y = Relu (r)
    }}"""))
    assert op_types(model) == ["Relu"]


def test_two_dynamic_dims_that_are_not_copies_stay_computed():
    # [N * 4, S, 16] → [N, 4, S, 16]: N and S are both at new positions, and Reshape infers one dim at
    # most; the target stays a runtime computation (its values still fold where static).
    model = simplified(build(f"""{OPSET}
    g (float[M,S,16] x, float[N,1] like) => (float[N,4,S,16] y) {{
        s = Shape (x) \n t = Gather <axis=0> (s, i1) \n sl = Shape (like) \n n = Gather <axis=0> (sl, i0)
        un = Unsqueeze (n, ax) \n ut = Unsqueeze (t, ax) \n e = Gather <axis=0> (s, i2) \n ue = Unsqueeze (e, ax)
        target = Concat <axis=0> (un, four_1d, ut, ue)
        r = Reshape (x, target) \n y = Relu (r)
    }}""", CONSTS), inputs=[{"x": np.arange(8 * 3 * 16, dtype=np.float32).reshape(8, 3, 16),
                             "like": np.zeros((2, 1), np.float32)}])
    assert reshape_targets(model) == [None]


def test_allowzero_without_a_literal_zero_still_gets_copies():
    # PyTorch's dynamo exporter writes allowzero=1 on every Reshape; it only means something for a
    # literal 0 in the target, so the constant target copies dims and runs with allowzero=0.
    model = simplified(build(SPLIT_HEADS.replace("Reshape (x, target)", "Reshape <allowzero=1> (x, target)"),
                             CONSTS))
    assert reshape_targets(model) == [[0, 0, 4, 16]]
    assert next(n for n in model.graph if n.op_type == "Reshape").attributes["allowzero"].as_int() == 0


def test_allowzero_with_a_literal_zero_gets_no_copies():
    # [N, S, 0] → [N, S, 0] with allowzero=1: the 0 is a size; a 0 meaning "copy" cannot join it.
    model = build(f"""{OPSET}
    g (float[N,S,0] x) => (float[N,S,0] y) {{
        s = Shape (x) \n n = Gather <axis=0> (s, i0) \n t = Gather <axis=0> (s, i1)
        un = Unsqueeze (n, ax) \n ut = Unsqueeze (t, ax) \n target = Concat <axis=0> (un, ut, zero_1d)
        r = Reshape <allowzero=1> (x, target) \n y = Relu (r)
    }}""", {**CONSTS, "zero_1d": np.array([0], np.int64)})
    before = snapshot(model)
    Simplify()(model)
    assert reshape_targets(model) in ([None], [])  # computed, or gone as a no-op: never [0, 0, 0]
    for n, s in SIZES:  # empty outputs: compare shapes (values have none)
        x = {"x": np.zeros((n, s, 0), np.float32)}
        assert run(model, x)[0].shape == run(before, x)[0].shape == (n, s, 0)


def test_scalars_reshaped_to_one_element_as_dynamo_writes_them():
    # torch.onnx.export(dynamo=True): Shape <start, end> slices and Reshape(scalar, [1]) instead of
    # Gather and Unsqueeze; the head split [S, N, 32] → [S, N*4, 8] becomes [0, -1, 8].
    model = simplified(build(f"""{OPSET}
    g (float[S,N,32] x) => (float[S,M,8] y) {{
        s0 = Shape <start=0, end=1> (x) \n s1 = Shape <start=1, end=2> (x)
        n = Squeeze (s1, ax) \n n4 = Mul (n, four) \n n4_1d = Reshape (n4, one_1d)
        target = Concat <axis=0> (s0, n4_1d, eight_1d)
        r = Reshape <allowzero=1> (x, target) \n y = Relu (r)
    }}""", {**CONSTS, "one_1d": np.array([1], np.int64), "eight_1d": np.array([8], np.int64)}),
        inputs=[{"x": np.ones((s, n, 32), np.float32)} for n, s in SIZES])
    assert reshape_targets(model) == [[0, -1, 8]]


def test_a_dim_without_a_name_is_unknown():
    # "?" dims (no name) are not equal to each other: nothing is copied, one may still be -1.
    model = simplified(build(SPLIT_HEADS.replace("float[N,S,64] x", "float[?,S,64] x"), CONSTS),
                       inputs=[{"x": np.ones((n, s, 64), np.float32)} for n, s in SIZES])
    assert reshape_targets(model) == [[-1, 0, 4, 16]]


def test_the_pass_alone_reports_no_change_when_nothing_is_computed():
    model = build(f"""{OPSET}
    g (float[N,64] x) => (float[N,4,16] y) {{ r = Reshape (x, t) \n y = Relu (r) }}""",
                  {"t": np.array([0, 4, 16], np.int64)})
    assert ResolveShapeArithmetic()(model).modified is False


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (3, 16), (1, 64)])
def test_the_zoo_transformer_loses_its_shape_arithmetic_and_nothing_else(batch, seq):
    # 374 exported nodes; simplify left 164 before this pass (every Reshape target computed), 104 now.
    proto = onnx.load(ROOT / "models" / "zoo" / "transformer_encoder.onnx")
    model = ir.serde.deserialize_model(proto)
    Simplify()(model)
    assert len(list(model.graph)) <= 110
    targets = reshape_targets(model)
    # Constant: the q/k/v head splits [S, N, 64] → [S, N*4, 16] ([0, -1, 16]) and the head merges
    # [S*N, 64] ([-1, 64]), 4 a layer. Computed: [N*4, S, 16] → [N, 4, S, 16] and [S*N, 64] → [S, N, 64],
    # where two dynamic dims move and Reshape infers one at most.
    assert sum(t is not None for t in targets) == 8 and len(targets) == 16
    x = {proto.graph.input[0].name: np.random.default_rng(seq).integers(0, 100, (batch, seq)).astype(np.int64)}
    # Folding the packed attention weight lets onnxruntime prepack it: at one token its MatMul takes
    # another summation order (a few ulps), as in the corpus tests.
    assert_equivalent(proto.SerializeToString(), model, x, rtol=1e-5)


def test_a_dynamo_export_with_a_padding_mask_stays_exact_at_every_size(tmp_path):
    # torch.onnx.export(dynamo=True) of a 2-layer encoder with a key padding mask and a sliced position
    # table: allowzero=1 Reshapes, Shape <start, end>, scalar Reshapes, Expand and Where on the mask.
    torch = pytest.importorskip("torch")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            self.position = torch.nn.Parameter(torch.randn(1, 64, 32))
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, ids, mask):
            x = self.embed(ids) + self.position[:, : ids.shape[1]]
            return self.encoder(x, src_key_padding_mask=mask == 0).mean(1)

    torch.manual_seed(0)
    path = tmp_path / "encoder.onnx"
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    torch.onnx.export(Encoder().eval(), (ids, mask), path, dynamo=True, input_names=["ids", "mask"],
                      dynamic_shapes={"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}})
    proto = onnx.load(path)
    model = ir.serde.deserialize_model(proto)
    Simplify()(model)
    # 12 of 26 targets constant (6 before: the q/k/v splits [S, N, 32] → [S, N*4, 8] were computed);
    # the other 14 move two dynamic dims ([N*4, S, 8] → [N, 4, S, 8]).
    targets = reshape_targets(model)
    assert sum(t is not None for t in targets) == 12 and len(targets) == 26, targets
    assert [0, -1, 8] in targets
    inputs = []
    for n, s in [(1, 1), (2, 8), (3, 17), (1, 64)]:
        r = np.random.default_rng(s)
        pad = (r.random((n, s)) > 0.3).astype(np.int64)
        pad[:, 0] = 1
        inputs.append({"ids": r.integers(0, 100, (n, s)).astype(np.int64), "mask": pad})
    assert_equivalent(proto.SerializeToString(), model, inputs, rtol=1e-5)


# Cases a review found wrong in the first version: each must now match the original exactly.
REVIEWED = {
    # Flatten's negative axis counts from the rank, not rank + 1.
    "flatten-negative-axis": ("""
    g (float[N,S,4] x) => (float[A,B] y) { f = Flatten <axis=-1> (x) \n s = Shape (f) \n y = Reshape (f, s) }""",
        {}, [{"x": (2, 3, 4)}, {"x": (1, 5, 4)}]),
    # Squeeze axes computed at runtime: which size-1 dims go is unknown.
    "squeeze-runtime-axes": ("""
    g (float[1,3,1] x, int64[1] ax) => (float[A,B] y) { q = Squeeze (x, ax) \n s = Shape (q) \n y = Reshape (q, s) }""",
        {}, [{"x": (1, 3, 1), "ax": [0]}, {"x": (1, 3, 1), "ax": [2]}]),
    # Slice steps computed at runtime: no length is certain.
    "slice-runtime-steps": ("""
    g (float[6,N] x, int64[1] st) => (float[A,B] y) {
        t = Slice (x, zero, big, zero, st) \n s = Shape (t) \n y = Reshape (t, s) }""",
        {"zero": [0], "big": [1000]}, [{"x": (6, 3), "st": [2]}, {"x": (6, 3), "st": [1]}]),
    # An initializer that is also a graph input is a default the caller may override.
    "overridable-initializer": ("""
    g (float[N,6] x, int64[1] k) => (float[A,B,C] y) {
        s = Shape (x) \n n = Slice (s, zero, one) \n t = Concat <axis=0> (n, k, m1) \n y = Reshape (x, t) }""",
        {"k": [6], "zero": [0], "one": [1], "m1": [-1]}, [{"x": (2, 6)}, {"x": (2, 6), "k": [3]}]),
    # A Cast to int32 wraps values past its range, as the original does.
    "cast-int32-wraps": ("""
    g (float[N] x) => (int32[1] y) {
        s = Shape (x) \n c = Concat <axis=0> (s, big) \n ci = Cast <to=6> (c) \n h = Div (ci, three)
        e = Slice (h, one, two) \n y = Add (e, e) }""",
        {"big": [3000000000], "three": np.array([3], np.int32), "one": [1], "two": [2]}, [{"x": (3,)}]),
    "cast-int32-overflow-no-crash": ("""
    g (float[N] x) => (int32[1] y) {
        s = Shape (x) \n c = Concat <axis=0> (s, big) \n ci = Cast <to=6> (c) \n e = Slice (ci, one, two)
        y = Add (e, e) }""", {"big": [3000000000], "one": [1], "two": [2]}, [{"x": (3,)}]),
}


@pytest.mark.parametrize("case", sorted(REVIEWED))
def test_reviewed_cases_stay_exact(case):
    text, weights, sizes = REVIEWED[case]
    proto = onnx.parser.parse_model(OPSET + text)
    for name, value in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=getattr(
            value, "dtype", np.int64)), name=name))
    if case == "overridable-initializer":
        proto.ir_version = 8  # ir >= 4: an initializer listed among the inputs is overridable
    before = proto.SerializeToString()
    model = ir.serde.deserialize_model(proto)
    Simplify()(model)
    for spec in sizes:
        feed = {k: np.ones(v, np.float32) if k == "x" else np.asarray(v, np.int64) for k, v in spec.items()}
        ref, got = run(before, feed), run(model, feed)
        assert [r.shape for r in ref] == [g.shape for g in got] and all(np.array_equal(r, g) for r, g in zip(ref, got))


def test_a_new_constant_never_takes_a_subgraph_inputs_name():
    # The constant for a static value is named after it ("q_static"); a Loop body input of that name
    # would shadow it inside the body.
    h, tp = onnx.helper, onnx.TensorProto
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["q", "q_static"], ["v"]),
         h.make_node("Add", ["acc_in", "v"], ["acc_out"])], "body",
        [h.make_tensor_value_info("q_static", tp.INT64, []), h.make_tensor_value_info("cond_in", tp.BOOL, []),
         h.make_tensor_value_info("acc_in", tp.INT64, [1])],
        [h.make_tensor_value_info("cond_out", tp.BOOL, []), h.make_tensor_value_info("acc_out", tp.INT64, [1])])
    graph = h.make_graph(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Mul", ["s", "four"], ["m"]), h.make_node("Div", ["m", "s"], ["q"]),
         h.make_node("Loop", ["trip", "", "acc0"], ["acc"], body=body)],
        "g", [h.make_tensor_value_info("x", tp.FLOAT, ["N"])], [h.make_tensor_value_info("acc", tp.INT64, [1])],
        [onnx.numpy_helper.from_array(np.array([4]), "four"), onnx.numpy_helper.from_array(np.array(3), "trip"),
         onnx.numpy_helper.from_array(np.array([0]), "acc0")])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    Simplify()(model)
    feed = {"x": np.ones(2, np.float32)}
    assert run(model, feed)[0].tolist() == run(proto.SerializeToString(), feed)[0].tolist() == [15]

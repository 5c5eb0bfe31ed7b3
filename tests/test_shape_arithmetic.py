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

from graphs import assert_equivalent, build, op_types, snapshot
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


def test_allowzero_targets_get_no_copies():
    # With allowzero=1 a 0 in the target is a real 0, never a copy: only -1 may stand for N.
    model = simplified(build(SPLIT_HEADS.replace("Reshape (x, target)", "Reshape <allowzero=1> (x, target)"),
                             CONSTS))
    assert reshape_targets(model) == [None]


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

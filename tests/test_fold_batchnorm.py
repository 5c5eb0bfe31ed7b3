"""FoldBatchNorm: what folds (after and before linear ops), what must not, and the edge cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import (assert_equivalent, bn_params, build, build_proto, int8_storage_cnn, op_types, random_feeds, snapshot,
                    value_names)
from onnxopt.passes import FoldBatchNorm

# Folding re-associates float32 products: outputs move by a few ulps of their range.
RTOL = 1e-5
# fp16 weights are rounded once more after folding, and onnxruntime computes in fp16: two fp16
# ulps (eps 9.8e-4) of max|ref|; measured up to 8.4e-4 over 20 seeds.
RTOL_FP16 = 2e-3

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
BN = "BatchNormalization <epsilon=1e-3>"
BN_INPUTS = "bn_scale, bn_bias, bn_mean, bn_var"

rng = np.random.default_rng(0)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def fold(model: ir.Model, feeds, *, rtol=RTOL, expect_folded: int | None = None) -> FoldBatchNorm:
    """Run the pass, check the result against the original, return the pass (for its details)."""
    before = snapshot(model)
    p = FoldBatchNorm()
    result = p(model)
    assert_equivalent(before, result.model, feeds, rtol=rtol)
    # Folded parameters and replaced weights do not linger.
    unused = [
        name for g in (model.graph, *model.graph.subgraphs())
        for name, value in g.initializers.items() if not value.uses()
    ]
    assert not unused, unused
    if expect_folded is not None:
        assert p.details["folded"] == expect_folded, p.details
        assert result.modified is (expect_folded > 0 or p.details["affine_folded"] > 0)
    return p


def assert_left(model: ir.Model, feeds, *words: str) -> str:
    """The pass folds nothing, says why (the reason names each of ``words``) and leaves the model alone."""
    before = snapshot(model)
    p = FoldBatchNorm()
    result = p(model)
    assert result.modified is False
    assert p.details["folded"] == 0
    assert "BatchNormalization" in op_types(result.model)
    assert snapshot(result.model) == before
    assert len(p.details["left"]) == 1
    reason = next(iter(p.details["left"].values()))
    for word in words:
        assert word in reason, reason
    assert p.summary.startswith("folded 0 of 1 BatchNormalization"), p.summary
    assert_equivalent(before, result.model, feeds, rtol=0.0)
    return reason


# -- after a linear producer -----------------------------------------------------------------


def conv_bn_model(*, cin=4, cout=8, group=1, bias=True, op="Conv", pads=(1, 1, 1, 1)) -> ir.Model:
    if op == "Conv":
        w = randn(cout, cin // group, 3, 3)
    else:  # ConvTranspose: [C_in, C_out / group, kH, kW]
        w = randn(cin, cout // group, 3, 3)
    weights = {"W": w, **bn_params("bn", cout)}
    inputs = "x, W, B" if bias else "x, W"
    if bias:
        weights["B"] = randn(cout)
    text = f"""{OPSET}
    g (float[N,{cin},6,6] x) => (float[N,{cout},?,?] y) {{
        c = {op} <group={group}, pads={list(pads)}> ({inputs})
        y = {BN} (c, {BN_INPUTS})
    }}"""
    return build(text, weights)


@pytest.mark.parametrize(
    "cin,cout,group",
    [(4, 8, 1), (4, 8, 2), (8, 8, 8)],
    ids=["dense", "grouped", "depthwise"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_folds_after_conv(cin, cout, group, bias):
    model = conv_bn_model(cin=cin, cout=cout, group=group, bias=bias)
    p = fold(model, random_feeds(model), expect_folded=1)
    assert op_types(model) == ["Conv"]
    assert p.details["into"] == {"Conv": 1}
    assert p.summary.startswith("folded 1 of 1 BatchNormalization"), p.summary
    # The BN parameters and the old weights are gone; one weight and one bias remain.
    assert len(model.graph.initializers) == 2


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_folds_after_conv_transpose_with_groups(bias):
    model = conv_bn_model(cin=4, cout=6, group=2, bias=bias, op="ConvTranspose", pads=(0, 0, 0, 0))
    fold(model, random_feeds(model), expect_folded=1)
    assert op_types(model) == ["ConvTranspose"]


def gemm_bn_model(*, trans_b: int, alpha=1.0, beta=1.0, bias_shape=(5,)) -> ir.Model:
    k, n = 3, 5
    w = randn(n, k) if trans_b else randn(k, n)
    weights = {"W": w, **bn_params("bn", n)}
    inputs = "x, W"
    if bias_shape is not None:
        weights["C"] = randn(*bias_shape)
        inputs += ", C"
    text = f"""{OPSET}
    g (float[M,{k}] x) => (float[M,{n}] y) {{
        h = Gemm <transB={trans_b}, alpha={alpha}, beta={beta}> ({inputs})
        y = {BN} (h, {BN_INPUTS})
    }}"""
    return build(text, weights)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    "alpha,beta,bias_shape",
    [(1.0, 1.0, (5,)), (0.7, 1.9, (5,)), (1.3, 0.4, (1, 5)), (2.0, 1.0, None)],
    ids=["plain", "alpha-beta", "bias-1xN", "no-bias"],
)
def test_folds_after_gemm(trans_b, alpha, beta, bias_shape):
    model = gemm_bn_model(trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape)
    fold(model, random_feeds(model, {"M": 4}), expect_folded=1)
    assert op_types(model) == ["Gemm"]


@pytest.mark.parametrize(
    "bias_line",
    [None, "a = Add(h, B)", "a = Add(B, h)"],
    ids=["no-add", "add-after", "add-before"],
)
def test_folds_after_matmul_on_2d_input(bias_line):
    weights = {"W": randn(3, 5), **bn_params("bn", 5)}
    if bias_line:
        weights["B"] = randn(5)
    body = f"{bias_line}\n            y = {BN} (a, {BN_INPUTS})" if bias_line else f"y = {BN} (h, {BN_INPUTS})"
    model = build(
        f"""{OPSET}
        g (float[M,3] x) => (float[M,5] y) {{
            h = MatMul(x, W)
            {body}
        }}""",
        weights,
    )
    p = fold(model, random_feeds(model, {"M": 4}), expect_folded=1)
    # Without a bias the BatchNormalization becomes an Add of its shift.
    assert op_types(model) == ["MatMul", "Add"]
    assert p.details["into"] == {"MatMul+Add" if bias_line else "MatMul": 1}


# -- before a linear consumer ----------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_folds_before_unpadded_conv(group, bias):
    weights = {"W": randn(6, 4 // group, 3, 3), **bn_params("bn", 4)}
    inputs = "b, W"
    if bias:
        weights["B"] = randn(6)
        inputs += ", B"
    model = build(
        f"""{OPSET}
        g (float[N,4,7,7] x) => (float[N,6,3,3] y) {{
            b = {BN} (x, {BN_INPUTS})
            y = Conv <group={group}, strides=[2, 2], pads=[0, 0, 0, 0]> ({inputs})
        }}""",
        weights,
    )
    p = fold(model, random_feeds(model), expect_folded=1)
    assert op_types(model) == ["Conv"]
    assert p.details["into"] == {"following Conv": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_folds_before_gemm(trans_b):
    w = randn(5, 3) if trans_b else randn(3, 5)
    model = build(
        f"""{OPSET}
        g (float[M,3] x) => (float[M,5] y) {{
            b = {BN} (x, {BN_INPUTS})
            y = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (b, W, C)
        }}""",
        {"W": w, "C": randn(5), **bn_params("bn", 3)},
    )
    fold(model, random_feeds(model, {"M": 4}), expect_folded=1)
    assert op_types(model) == ["Gemm"]


# -- refusals: each leaves the model alone and says why ---------------------------------------


def test_refuses_before_zero_padded_conv():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,6,6,6] y) {{
            b = {BN} (x, {BN_INPUTS})
            y = Conv <pads=[1, 1, 1, 1]> (b, W)
        }}""",
        {"W": randn(6, 4, 3, 3), **bn_params("bn", 4)},
    )
    assert_left(model, random_feeds(model), "pads with zeros")


def test_refuses_before_same_padded_grouped_conv():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
            b = {BN} (x, {BN_INPUTS})
            y = Conv <auto_pad="SAME_UPPER", group=2> (b, W)
        }}""",
        {"W": randn(4, 2, 3, 3), **bn_params("bn", 4)},
    )
    assert_left(model, random_feeds(model), "pads with zeros")


def test_refuses_training_mode():
    model = build(
        f"""{OPSET}
        g (float[2,4,6,6] x) => (float[2,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y, run_mean, run_var = BatchNormalization <training_mode=1> (c, {BN_INPUTS})
        }}""",
        {"W": randn(8, 4, 3, 3), **bn_params("bn", 8)},
    )
    assert_left(model, random_feeds(model), "training_mode=1")


def test_refuses_bn_params_that_are_graph_inputs():
    # bn_mean is an initializer and also a graph input: the caller may feed another mean.
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x, float[8] bn_mean) => (float[N,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        {"W": randn(8, 4, 3, 3), **bn_params("bn", 8)},
    )
    feeds = random_feeds(model)
    assert set(feeds) == {"x"}
    reason = assert_left(model, feeds, "bn_mean", "graph input")
    assert "mean" in reason
    # Feeding another mean still changes the output: it was not baked in.
    assert_left(model, {**feeds, "bn_mean": randn(8)}, "bn_mean")


@pytest.mark.parametrize("with_initializer", [False, True], ids=["input", "input-and-initializer"])
def test_refuses_conv_weight_that_is_a_graph_input(with_initializer):
    weights = bn_params("bn", 8)
    if with_initializer:
        weights["W"] = randn(8, 4, 3, 3)
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x, float[8,4,3,3] W) => (float[N,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        weights,
    )
    feeds = random_feeds(model)
    assert ("W" in feeds) is not with_initializer
    assert_left(model, {**feeds, "W": randn(8, 4, 3, 3)}, "weight 'W' is a graph input")


def test_refuses_conv_whose_output_has_a_second_consumer():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y, float[N,8,6,6] z) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y = {BN} (c, {BN_INPUTS})
            z = Relu(c)
        }}""",
        {"W": randn(8, 4, 3, 3), **bn_params("bn", 8)},
    )
    assert_left(model, random_feeds(model), "Conv output is also read by another node")


def test_refuses_matmul_on_3d_input():
    # On [B, S, K] input BatchNormalization normalizes axis 1 (S), not the weight's columns.
    model = build(
        f"""{OPSET}
        g (float[2,5,3] x) => (float[2,5,5] y) {{
            h = MatMul(x, W)
            y = {BN} (h, {BN_INPUTS})
        }}""",
        {"W": randn(3, 5), **bn_params("bn", 5)},
    )
    assert_left(model, random_feeds(model), "MatMul input is not known to be 2-D")


def test_refuses_matmul_add_whose_bias_makes_the_output_3d():
    # [4,4] @ [4,4] + [2,1,4] is [2,4,4]: BatchNormalization's axis 1 is then the MatMul's rows.
    model = build(
        f"""{OPSET}
        g (float[4,4] x) => (float[2,4,4] y) {{
            h = MatMul(x, W)
            a = Add(h, B)
            y = {BN} (a, {BN_INPUTS})
        }}""",
        {"W": randn(4, 4), "B": randn(2, 1, 4), **bn_params("bn", 4)},
    )
    assert_left(model, random_feeds(model), "Add bias has rank 3")


def test_refuses_subgraph_bn_after_an_outer_conv():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x, bool cond) => (float[N,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y = If (cond) <
                then_branch = then_g () => (float[N,8,6,6] t) {{
                    t = {BN} (c, {BN_INPUTS})
                }},
                else_branch = else_g () => (float[N,8,6,6] e) {{
                    e = Conv <pads=[1, 1, 1, 1]> (x, W)
                }}
            >
        }}""",
        {"W": randn(8, 4, 3, 3), **bn_params("bn", 8)},
    )
    x = randn(2, 4, 6, 6)
    assert_left(model, [{"x": x, "cond": np.array(c)} for c in (True, False)], "Conv is in an outer graph")


# -- edge cases ----------------------------------------------------------------------------------


def test_weight_shared_with_another_conv_is_left_for_it():
    weights = {"W": randn(8, 4, 3, 3), **bn_params("bn", 8)}
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y, float[N,8,6,6] z) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            y = {BN} (c, {BN_INPUTS})
            z = Conv <pads=[1, 1, 1, 1]> (x, W)
        }}""",
        weights,
    )
    fold(model, random_feeds(model), expect_folded=1)
    other = [n for n in model.graph if n.outputs[0].name == "z"][0]
    np.testing.assert_array_equal(other.inputs[1].const_value.numpy(), weights["W"])
    folded = [n for n in model.graph if n.op_type == "Conv" and n is not other][0]
    assert folded.inputs[1] is not other.inputs[1]


PADDLE_TEXT = """<ir_version: 7, opset_import: ["" : {opset}]>
g (float[PADDLE_BATCH,4,6,6] x) => (float[PADDLE_BATCH,8,6,6] y) {{
    W = Constant <value = float[8,4,3,3] {{{w}}}> ()
    s = Constant <value = float[8] {{{s}}}> ()
    b = Constant <value = float[8] {{{b}}}> ()
    m = Constant <value = float[8] {{{m}}}> ()
    v = Constant <value = float[8] {{{v}}}> ()
    c = Conv <pads=[1, 1, 1, 1]> (x, W)
    y = BatchNormalization <epsilon=1e-5, momentum=0.9> (c, s, b, m, v)
}}"""


@pytest.mark.parametrize("opset", [11, 12])
def test_folds_constant_node_weights_paddle_style(opset):
    p = bn_params("bn", 8)
    values = {
        "w": randn(8, 4, 3, 3), "s": p["bn_scale"], "b": p["bn_bias"], "m": p["bn_mean"], "v": p["bn_var"],
    }
    text = PADDLE_TEXT.format(opset=opset, **{k: ", ".join(map(repr, a.ravel().tolist())) for k, a in values.items()})
    proto = build_proto(text)
    for value in (*proto.graph.input, *proto.graph.output):  # the parser takes no dots in a dim name
        value.type.tensor_type.shape.dim[0].dim_param = "p2o.DynamicDimension.0"
    model = ir.serde.deserialize_model(proto)
    fold(model, random_feeds(model, {"p2o.DynamicDimension.0": 3}), expect_folded=1)
    # The BatchNormalization's Constant nodes and the old weight are gone.
    assert op_types(model) == ["Conv"]


def test_bn_output_that_is_a_graph_output_keeps_its_name():
    model = conv_bn_model()
    fold(model, random_feeds(model), expect_folded=1)
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "Conv"


def test_bn_output_that_is_a_graph_output_after_matmul_keeps_its_name():
    model = build(
        f"""{OPSET}
        g (float[M,3] x) => (float[M,5] y) {{
            h = MatMul(x, W)
            y = {BN} (h, {BN_INPUTS})
        }}""",
        {"W": randn(3, 5), **bn_params("bn", 5)},
    )
    fold(model, random_feeds(model, {"M": 2}), expect_folded=1)
    assert [o.name for o in model.graph.outputs] == ["y"]


def if_model(*, main_bn: bool) -> tuple[ir.Model, list[dict]]:
    """An If whose then-branch folds a Conv on the outer weight 'W' into a BatchNormalization, and
    whose else-branch reads 'W' as it is; with ``main_bn`` the main graph does the same fold on 'W'."""
    weights = {"W": randn(8, 4, 3, 3), **bn_params("bn", 8), **(bn_params("bn2", 8, seed=1) if main_bn else {})}
    main = f"""c0 = Conv <pads=[1, 1, 1, 1]> (x, W)
            z = {BN} (c0, bn2_scale, bn2_bias, bn2_mean, bn2_var)""" if main_bn else "z = Relu(x)"
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x, bool cond) => (float[N,8,6,6] y, float[N,?,6,6] z) {{
            {main}
            y = If (cond) <
                then_branch = then_g () => (float[N,8,6,6] t) {{
                    c = Conv <pads=[1, 1, 1, 1]> (x, W)
                    t = {BN} (c, {BN_INPUTS})
                }},
                else_branch = else_g () => (float[N,8,6,6] e) {{
                    e = Conv <pads=[1, 1, 1, 1]> (x, W)
                }}
            >
        }}""",
        weights,
    )
    x = randn(2, 4, 6, 6)
    return model, [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]


def test_folds_inside_an_if_subgraph():
    model, feeds = if_model(main_bn=False)
    fold(model, feeds, expect_folded=1)
    assert "BatchNormalization" not in op_types(model)
    # The subgraph's BatchNormalization parameters lived in the main graph: they are gone too.
    assert not [n for n in model.graph.initializers if n.startswith("bn_")]


def test_folds_in_main_graph_and_subgraph_sharing_one_weight():
    # Both folds derive a new weight from 'W': their names must not clash across scopes.
    model, feeds = if_model(main_bn=True)
    fold(model, feeds, expect_folded=2)
    assert "BatchNormalization" not in op_types(model)
    names = value_names(model)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not [n for n in names if n.startswith("bn")], names


def test_fp16_model_folds_with_fp16_weights():
    weights = {"W": randn(8, 4, 3, 3, dtype=np.float16), "B": randn(8, dtype=np.float16)}
    weights.update(bn_params("bn", 8, dtype=np.float16))
    model = build(
        f"""{OPSET}
        g (float16[N,4,6,6] x) => (float16[N,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W, B)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        weights,
    )
    fold(model, random_feeds(model), rtol=RTOL_FP16, expect_folded=1)
    conv = next(iter(model.graph))
    assert conv.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    assert conv.inputs[2].const_value.dtype == ir.DataType.FLOAT16


def test_dynamic_batch_runs_with_batch_1_and_3():
    model = conv_bn_model(group=2)
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    feeds = [random_feeds(model, {"N": 1}, seed=1), random_feeds(model, {"N": 3}, seed=2)]
    fold(model, feeds, expect_folded=1)


def test_counts_and_modified_over_several_batchnorms():
    # One folds after a Conv, one is stuck after a Relu into a padded Conv.
    weights = {"W": randn(8, 4, 3, 3), "W2": randn(8, 8, 3, 3), **bn_params("bn", 8), **bn_params("bn2", 8, 1)}
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W)
            b = {BN} (c, {BN_INPUTS})
            r = Relu(b)
            b2 = {BN} (r, bn2_scale, bn2_bias, bn2_mean, bn2_var)
            y = Conv <pads=[1, 1, 1, 1]> (b2, W2)
        }}""",
        weights,
    )
    p = fold(model, random_feeds(model), expect_folded=1)
    assert p.details["total"] == 2
    assert p.summary.startswith("folded 1 of 2 BatchNormalization"), p.summary
    assert "1 left" in p.summary
    (reason,) = p.details["left"].values()
    assert "Relu" in reason and "pads with zeros" in reason


def test_nothing_to_fold_is_not_modified():
    model = build(
        f"""{OPSET}
        g (float[N,4] x) => (float[N,4] y) {{
            y = Relu(x)
        }}""",
    )
    before = snapshot(model)
    p = FoldBatchNorm()
    result = p(model)
    assert result.modified is False
    assert snapshot(model) == before
    assert p.details == {"folded": 0, "total": 0, "into": {}, "left": {}, "affine_folded": 0, "affine_into": {}}
    assert p.summary == "folded 0 of 0 BatchNormalization"


def test_second_run_finds_nothing_more():
    model = conv_bn_model()
    assert FoldBatchNorm()(model).modified is True
    assert FoldBatchNorm()(model).modified is False
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


# -- after a channel Concat of convolutions ----------------------------------------------------


@pytest.mark.parametrize("axis", [1, -3])
def test_folds_after_concat_of_convs(axis):
    weights = {
        "W1": randn(3, 4, 3, 3), "B1": randn(3),
        "W2": randn(5, 4, 1, 1),
        "WT": randn(4, 2, 3, 3),  # ConvTranspose, group 2: 4 output channels
        **bn_params("bn", 12),
    }
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,12,6,6] y) {{
            a = Conv <pads=[1, 1, 1, 1]> (x, W1, B1)
            b = Conv (x, W2)
            t = ConvTranspose <group=2, pads=[1, 1, 1, 1]> (x, WT)
            c = Concat <axis={axis}> (a, b, t)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        weights,
    )
    p = fold(model, random_feeds(model), expect_folded=1)
    assert p.details["into"] == {"Concat of Convs": 1}
    assert "BatchNormalization" not in op_types(model)


def test_refuses_after_concat_with_a_non_conv_input():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
            a = Conv <pads=[1, 1, 1, 1]> (x, W1)
            c = Concat <axis=1> (a, x)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        {"W1": randn(4, 4, 3, 3), **bn_params("bn", 8)},
    )
    assert_left(model, random_feeds(model), "Concat input 'x'")


def test_refuses_after_concat_on_a_spatial_axis():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,4,12,6] y) {{
            a = Conv <pads=[1, 1, 1, 1]> (x, W1)
            b = Conv <pads=[1, 1, 1, 1]> (x, W2)
            c = Concat <axis=2> (a, b)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        {"W1": randn(4, 4, 3, 3), "W2": randn(4, 4, 3, 3), **bn_params("bn", 4)},
    )
    assert_left(model, random_feeds(model), "not the channel axis")


# -- constant per-channel Mul/Add/Sub/Div (Caffe2 exports: BatchNormalization then Mul and Add) ------


def test_conv_bn_mul_add_folds_into_one_conv():
    # inception_v2 / densenet121 from the onnx package: BN, then Mul and Add of Unsqueezed [C] constants.
    weights = {"W": randn(8, 4, 3, 3), **bn_params("bn", 8), "S": randn(8, 1, 1), "T": randn(1, 8, 1, 1)}
    model = build(f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
        c = Conv <pads=[1, 1, 1, 1]> (x, W)
        n = {BN} (c, {BN_INPUTS})
        m = Mul (S, n)
        a = Add (m, T)
        y = Relu (a)
    }}""", weights)
    p = fold(model, random_feeds(model), expect_folded=1)
    assert op_types(model) == ["Conv", "Relu"]
    assert p.details["affine_folded"] == 2 and p.details["affine_into"] == {"Conv": 2}
    assert p.summary.endswith("2 constant Mul/Add/Sub/Div folded too"), p.summary


def test_mul_add_after_a_batchnorm_that_stays_merge_into_it():
    # densenet121: Concat (read again later) → BN → Mul → Add → Relu → padded Conv: nothing folds the
    # BN, but the Mul and Add become its scale and bias.
    weights = {**bn_params("bn", 8), "S": randn(8, 1, 1), "T": randn(8, 1, 1), "W": randn(4, 8, 3, 3)}
    model = build(f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,8,6,6] cat) {{
        cat = Concat <axis=1> (x, x)
        n = {BN} (cat, {BN_INPUTS})
        m = Mul (n, S)
        a = Add (m, T)
        r = Relu (a)
        y = Conv <pads=[1, 1, 1, 1]> (r, W)
    }}""", weights)
    p = fold(model, random_feeds(model), expect_folded=0)
    assert op_types(model) == ["Concat", "BatchNormalization", "Relu", "Conv"]
    assert p.details["affine_into"] == {"BatchNormalization": 2} and len(p.details["left"]) == 1


@pytest.mark.parametrize("op,const", [("Div", 2.5), ("Sub", 0.75), ("Mul", -1.5), ("Add", 3.0)])
def test_scalar_affine_after_gemm_and_before_an_unpadded_conv(op, const):
    weights = {"G": randn(6, 5), "GB": randn(5), "K": np.array(const, np.float32), "W": randn(8, 4, 1, 1),
               "K2": np.array(const, np.float32)}
    model = build(f"""{OPSET}
    g (float[N,6] x, float[N,4,5,5] z) => (float[N,5] y, float[N,8,5,5] w) {{
        h = Gemm <transB=0> (x, G, GB)
        y = {op} (h, K)
        e = {op} (z, K2)
        w = Conv (e, W)
    }}""", weights)
    p = fold(model, random_feeds(model), expect_folded=0)
    assert op_types(model) == ["Gemm", "Conv"]
    assert p.details["affine_into"] == {"Gemm": 1, "following Conv": 1}


def test_mul_along_the_last_axis_of_a_3d_matmul():
    model = build(f"""{OPSET}
    g (float[N,7,6] x) => (float[N,7,5] y) {{
        h = MatMul (x, W)
        y = Mul (h, S)
    }}""", {"W": randn(6, 5), "S": randn(5)})
    fold(model, random_feeds(model), expect_folded=0)
    assert op_types(model) == ["MatMul"]


def test_elementwise_ops_that_are_not_a_per_channel_map_stay():
    weights = {"W": randn(8, 4, 3, 3), "SP": randn(1, 1, 6, 6), "C": randn(8, 1, 1), "M": randn(6, 5),
               "MB": randn(5)}
    model = build(f"""{OPSET}
    g (float[N,4,6,6] x, float[N,6] v) => (float[N,8,6,6] a, float[N,8,6,6] b, float[N,8,6,6] r,
                                          float[N,5] mb) {{
        c = Conv <pads=[1, 1, 1, 1]> (x, W)
        d = Conv <pads=[1, 1, 1, 1]> (x, W)
        a = Mul (c, SP)
        b = Sub (C, d)
        r = Add (c, d)
        m = MatMul (v, M)
        mb = Add (m, MB)
    }}""", weights)
    before = snapshot(model)
    p = FoldBatchNorm()
    assert p(model).modified is False and snapshot(model) == before
    assert p.details["affine_folded"] == 0 and p.details["left"] == {}


def test_a_pure_scale_folds_into_a_padded_conv_after_it_but_a_shift_does_not():
    weights = {"S": randn(4, 1, 1), "T": randn(4, 1, 1), "W": randn(8, 4, 3, 3), "V": randn(8, 4, 3, 3)}
    model = build(f"""{OPSET}
    g (float[N,4,6,6] x) => (float[N,8,6,6] y, float[N,8,6,6] z) {{
        s = Mul (x, S) \n y = Conv <pads=[1, 1, 1, 1]> (s, W)
        t = Add (x, T) \n z = Conv <pads=[1, 1, 1, 1]> (t, V)
    }}""", weights)
    p = fold(model, random_feeds(model), expect_folded=0)
    assert sorted(op_types(model)) == ["Add", "Conv", "Conv"] and p.details["affine_into"] == {"following Conv": 1}


# -- weights stored as int8 and dequantized in the graph --------------------------------------


def _dequantizing_conv_bn(weight: str, extra: dict) -> ir.Model:
    """Conv whose weight ``w`` the text ``weight`` computes from int8 ``Wq``, then a BatchNormalization."""
    return build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
            {weight}
            c = Conv <pads=[1, 1, 1, 1]> (x, w, B)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        {"Wq": rng.integers(-127, 128, size=(8, 4, 3, 3)).astype(np.int8), "B": randn(8), **bn_params("bn", 8), **extra},
    )


def _stored_int8(model: ir.Model) -> list[str]:
    """Names of the int8 weights (not a per-channel zero point) in ``model``."""
    return sorted(n for n, v in model.graph.initializers.items()
                  if v.const_value.dtype == ir.DataType.INT8 and v.const_value.size > 8)


@pytest.mark.parametrize("weight, extra", [
    ("wf = Cast <to=1> (Wq)\n w = Mul(wf, Ws)", {"Ws": np.full((8, 1, 1, 1), 0.01, np.float32)}),
    ("wf = Cast <to=1> (Wq)\n w = Mul(Ws, wf)", {"Ws": np.float32(0.01)}),
    ("w = DequantizeLinear(Wq, Ws)", {"Ws": np.float32(0.01)}),
    ("w = DequantizeLinear(Wq, Ws, Wz)", {"Ws": np.float32(0.01), "Wz": np.int8(3)}),
    ("w = DequantizeLinear <axis=0> (Wq, Ws)", {"Ws": np.full(8, 0.01, np.float32)}),
], ids=["cast-mul-per-channel", "cast-mul-scalar-first", "dq-per-tensor", "dq-zero-point", "dq-per-axis"])
def test_folds_into_the_dequantizing_scale_of_an_int8_weight(weight, extra):
    """The BatchNormalization's scale goes into the dequantizing scale: the weight stays int8 and the
    model does not grow (folding into a float32 copy made a compact export larger)."""
    model = _dequantizing_conv_bn(weight, extra)
    if "DequantizeLinear" in weight:  # a DequantizeLinear scale must stay positive
        model.graph.initializers["bn_scale"].const_value = ir.tensor(np.abs(randn(8)) + 0.5, name="bn_scale")
    before = snapshot(model)
    fold(model, random_feeds(model), expect_folded=1)
    assert "BatchNormalization" not in op_types(model)
    assert _stored_int8(model) == ["Wq"]
    assert len(snapshot(model)) <= len(before)


def test_the_whole_compact_model_shrinks_under_simplify_and_fold_bn():
    from onnxopt.passes import Simplify

    model = ir.serde.deserialize_model(int8_storage_cnn())
    before, feeds = snapshot(model), random_feeds(model)
    Simplify()(model)
    FoldBatchNorm()(model)
    assert_equivalent(before, model, feeds, rtol=RTOL)
    assert "BatchNormalization" not in op_types(model)
    assert _stored_int8(model) == ["Dq", "Mq", "Wq"]
    assert len(snapshot(model)) <= len(before)


def test_a_negative_scale_is_not_folded_into_a_dequantize_linear():
    model = _dequantizing_conv_bn("w = DequantizeLinear(Wq, Ws)", {"Ws": np.float32(0.01)})
    model.graph.initializers["bn_scale"].const_value = ir.tensor(-np.ones(8, np.float32), name="bn_scale")
    assert_left(model, random_feeds(model), "DequantizeLinear scale must stay positive")


def test_a_dequantized_weight_read_elsewhere_is_not_rescaled():
    model = build(
        f"""{OPSET}
        g (float[N,4,6,6] x) => (float[N,8,6,6] y, float[8,4,3,3] w) {{
            wf = Cast <to=1> (Wq)
            w = Mul(wf, Ws)
            c = Conv <pads=[1, 1, 1, 1]> (x, w)
            y = {BN} (c, {BN_INPUTS})
        }}""",
        {"Wq": rng.integers(-127, 128, size=(8, 4, 3, 3)).astype(np.int8), "Ws": np.float32(0.01), **bn_params("bn", 8)},
    )
    assert_left(model, random_feeds(model), "read elsewhere")

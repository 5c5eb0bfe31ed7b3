"""Channel groups: coupling at Add, Concat offsets, Split ranges, Flatten strides, depthwise Convs,
and every refusal with its reason; ``--explain`` prints the plan."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import build
from onnxopt.cli import main
from onnxopt.passes.channel_groups import explain, find_channel_groups

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def by_producer(groups):
    return {m.node.name: g for g in groups for m in g.producers}


def test_residual_add_couples_branches_and_follows_bn_relu_to_consumers():
    model = build(
        f"""{OPSET}
        g (float[1,3,8,8] x) => (float[1,4] y) {{
            a = Conv <pads=[1,1,1,1]> (x, W1, B1)
            ab = BatchNormalization (a, s, b, m, v)
            ar = Relu (ab)
            c = Conv (ar, W2)
            d = Add (ar, c)
            p = GlobalAveragePool (d)
            f = Flatten (p)
            y = Gemm <transB=1> (f, FW, FB)
        }}""",
        {"W1": randn(6, 3, 3, 3), "B1": randn(6), "s": randn(6), "b": randn(6), "m": randn(6),
         "v": np.ones(6, np.float32), "W2": randn(6, 6, 1, 1), "FW": randn(4, 6), "FB": randn(4)},
    )
    for node, name in zip(model.graph, ["conv1", "bn", "relu", "conv2", "add", "gap", "flat", "fc"]):
        node.name = name
    groups = find_channel_groups(model)
    producers = by_producer(groups)
    assert producers["conv1"] is producers["conv2"], "Add couples both branches"
    g = producers["conv1"]
    assert g.prunable and g.size == 6 and g.first
    roles = sorted((m.node.name, m.role, m.index, m.axis) for m in g.members)
    assert ("bn", "param", 1, 0) in roles and ("bn", "param", 4, 0) in roles
    assert ("conv2", "in", 1, 1) in roles and ("fc", "in", 1, 1) in roles
    assert ("conv1", "out", 2, 0) in roles
    fc = by_producer(groups)["fc"]
    assert not fc.prunable and "graph output" in fc.reason


def test_concat_offsets_and_flatten_stride():
    model = build(
        f"""{OPSET}
        g (float[1,3,4,4] x) => (float[1,5] y) {{
            a = Conv (x, WA)
            b = Conv (x, WB)
            c = Concat <axis=1> (a, b)
            f = Flatten (c)
            y = Gemm (f, FW)
        }}""",
        {"WA": randn(2, 3, 1, 1), "WB": randn(3, 3, 1, 1), "FW": randn(5 * 16, 5)},
    )
    for node, name in zip(model.graph, ["a", "b", "cat", "flat", "fc"]):
        node.name = name
    producers = by_producer(find_channel_groups(model))
    ga, gb = producers["a"], producers["b"]
    assert ga is not gb
    fc_b = next(m for m in gb.members if m.node.name == "fc")
    assert (fc_b.offset, fc_b.stride, fc_b.axis) == (2 * 16, 16, 0)
    assert list(fc_b.positions([1])) == list(range(2 * 16 + 16, 2 * 16 + 32))


def test_depthwise_conv_keeps_channels_and_split_takes_ranges():
    model = build(
        f"""{OPSET}
        g (float[1,3,6,6] x) => (float[1,8,6,6] y) {{
            a = Conv (x, W)
            d = Conv <group=4, pads=[1,1,1,1]> (a, DW, DB)
            s1, s2 = Split <axis=1> (d, sizes)
            e = Conv (s1, W1)
            f = Conv (s2, W2)
            y = Concat <axis=1> (e, f)
        }}""",
        {"W": randn(4, 3, 1, 1), "DW": randn(4, 1, 3, 3), "DB": randn(4), "sizes": np.array([1, 3], np.int64),
         "W1": randn(4, 1, 1, 1), "W2": randn(4, 3, 1, 1)},
    )
    for node, name in zip(model.graph, ["a", "dw", "split", "e", "f", "cat"]):
        node.name = name
    g = by_producer(find_channel_groups(model))["a"]
    assert g.prunable
    roles = {(m.node.name, m.role, m.index) for m in g.members}
    assert {("dw", "dw", 1), ("dw", "dw", 2), ("split", "split", None)} <= roles
    f = next(m for m in g.members if m.node.name == "f")
    assert (f.start, f.length, f.offset) == (1, 3, 0)


@pytest.mark.parametrize(
    "body, weights, reason",
    [
        ("a = Conv (x, W)\n r = Reshape (a, shp)\n t = Transpose <perm=[0,2,1,3,4]> (r)\n y0 = Reshape (t, shp2)\n y = Relu (y0)",
         {"shp": np.array([1, 2, 2, 4, 4], np.int64), "shp2": np.array([1, 4, 4, 4], np.int64)}, "mixes channels"),
        ("a = Conv (x, W)\n y = LRN <size=3> (a)", {}, "LRN"),
        ("a = Conv (x, W)\n y = Relu (a)", {}, "graph output"),
        ("a = Conv (x, W)\n y = Conv <group=2> (a, G)", {"G": randn(4, 2, 1, 1)}, "grouped Conv"),
        ("a = Conv (x, W)\n y = Softmax <axis=1> (a)", {}, "Softmax"),
    ],
    ids=["channel-shuffle", "lrn", "output", "grouped", "softmax"],
)
def test_unprunable_with_reason(body, weights, reason):
    model = build(
        f"""{OPSET}
        g (float[1,3,4,4] x) => (float[1,4,4,4] y) {{
            {body}
        }}""",
        {"W": randn(4, 3, 1, 1), **weights},
    )
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
    g = by_producer(find_channel_groups(model))["n0"]
    assert not g.prunable
    assert reason in g.reason
    assert reason in explain([g])


def test_explain_on_the_command_line(capsys):
    assert main(["models/zoo/resnet_bn.onnx", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "prunable" in out and "UNPRUNABLE" in out

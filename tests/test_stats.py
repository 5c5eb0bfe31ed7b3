"""Model figures: MACs where shapes come from computed Reshape targets, and at the data's dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

import onnxopt
from graphs import COMPUTED_RESIZE, build
from onnxopt.stats import count_macs, node_macs

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER = ROOT / "models" / "zoo" / "transformer_encoder.onnx"


def transformer_macs(seq: int, d: int = 64, heads: int = 4, layers: int = 2, vocab: int = 100) -> int:
    """MACs of the zoo transformer for one sequence of ``seq`` tokens."""
    per_layer = (
        seq * d * 3 * d  # packed q, k, v projection
        + 2 * heads * seq * seq * (d // heads)  # scores and weighted values
        + seq * d * d  # output projection
        + 2 * seq * d * 4 * d  # feed-forward
    )
    return layers * per_layer + seq * d * vocab


def test_macs_behind_an_exporters_shape_arithmetic_are_counted():
    # Every attention Reshape takes a target computed by Shape → Gather → Concat: shape inference
    # alone leaves the MatMuls after them unknown; the dims fixed, folding makes them known.
    model = ir.load(TRANSFORMER)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert count_macs(model, dims={"seq": 16}) == transformer_macs(16) == 1_740_800
    assert count_macs(model) == transformer_macs(1)
    macs = node_macs(model, dims={"seq": 16})
    assert len(macs) == 17 and None not in macs.values()
    assert ir.serde.serialize_model(model).SerializeToString() == before  # the caller's model is untouched


def test_macs_unknown_where_a_shape_is_only_known_at_run_time():
    model = build(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x, int64[2] shape) => (float[M, 8] y) {
            r = Reshape(x, shape)
            y = MatMul(r, w)
        }
        """,
        {"w": np.ones((8, 8), np.float32)},
    )
    assert count_macs(model) is None
    assert list(node_macs(model).values()) == [None]


def test_the_report_counts_macs_at_the_datas_sequence_length(tmp_path):
    data = tmp_path / "tokens.npz"
    np.savez(data, input=np.random.default_rng(0).integers(0, 100, (4, 16)).astype(np.int64))
    result = onnxopt.optimize(TRANSFORMER, "simplify", data=data, latency=False)
    assert result.report.before.macs == result.report.after.macs == transformer_macs(16)
    # --dim decides over the data.
    result = onnxopt.optimize(TRANSFORMER, "simplify", data=data, dims=["seq=8"], latency=False)
    assert result.report.before.macs == transformer_macs(8)


def test_a_static_model_with_recorded_shapes_is_counted_without_reinference(monkeypatch):
    # Batch 2 of an 8x3x3x3 conv on 8x8 and a 10x8 Gemm; the shapes are recorded, the inputs static: no copy
    # and no folding (0.35 s on DenseNet-121 each time a report counts). With a dynamic batch the
    # recorded shapes may be the trace's, so the copy at the fixed dims is still made.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[{b},3,8,8] x) => (float[{b},10] y) {{
        c = Conv <pads=[1,1,1,1]> (x, w) \n p = GlobalAveragePool (c) \n f = Flatten (p) \n y = Gemm <transB=1> (f, fw) }}"""
    weights = {"w": np.zeros((8, 3, 3, 3), np.float32), "fw": np.zeros((10, 8), np.float32)}
    copies = []
    original = onnxopt.stats._with_fixed_shapes
    monkeypatch.setattr(onnxopt.stats, "_with_fixed_shapes", lambda m, d, **kw: copies.append(1) or original(m, d, **kw))
    static = build(text.format(b=2), weights)
    onnxopt.passes.Simplify()(static)  # records every shape
    assert count_macs(static) == 2 * (8 * 8 * 8 * 3 * 9 + 10 * 8) and not copies
    dynamic = build(text.format(b="N"), weights)
    onnxopt.passes.Simplify()(dynamic)
    assert count_macs(dynamic, dims={"N": 2}) == 2 * (8 * 8 * 8 * 3 * 9 + 10 * 8) and copies


def test_macs_of_unnamed_nodes_are_keyed_as_the_callers_nodes():
    """Counting re-infers shapes on a copy whose folder names unnamed nodes: the counts still come back
    under the caller's own nodes (the quantize report's MAC share matched none of them: 100% float)."""
    from onnxopt.passes.quantize import node_label
    from onnxopt.stats import node_macs

    model = build(COMPUTED_RESIZE, {"W1": np.zeros((8, 3, 3, 3), np.float32), "W2": np.zeros((8, 8, 1, 1), np.float32)})
    assert all(not node.name for node in model.graph)
    macs = node_macs(model, dims={"N": 2}, key=node_label)  # the folder evaluates the computed scales
    assert macs == {"Conv(c)": 2 * 8 * 8 * 8 * 3 * 9, "Conv(y)": 2 * 16 * 16 * 8 * 8}
    assert all(not node.name for node in model.graph)  # the caller's model is not touched

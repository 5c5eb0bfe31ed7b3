"""Model figures: MACs where shapes come from computed Reshape targets, and at the data's dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

import onnxopt
from graphs import build
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

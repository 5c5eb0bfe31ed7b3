"""compressed_sizes: Huffman and relative-index coding by hand, and the figures of small models."""

from __future__ import annotations

import gzip
import math

import numpy as np
import onnx_ir as ir

from graphs import build
from onnxopt.compressed_size import compressed_sizes, huffman_bits, relative_index_entries
from onnxopt.passes import ClusterWeights, SparsifyWeights

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def test_huffman_of_a_known_distribution():
    # codes a:0, b:10, c:110, d:111 -> 5*1 + 2*2 + 1*3 + 1*3
    assert huffman_bits([5, 2, 1, 1]) == 15
    assert huffman_bits([4, 4, 4, 4]) == 32  # uniform: 2 bits each
    assert huffman_bits([7]) == 7  # one symbol still takes a bit
    assert huffman_bits([0, 3, 0]) == 3
    assert huffman_bits([]) == 0


def test_relative_coding_of_known_gaps():
    # gaps from -1: 1, 3, 17; with 4-bit gaps (up to 16) the 17 needs one filler
    fillers, per = relative_index_entries(np.array([0, 3, 20]), 4)
    assert fillers == 1 and list(per) == [0, 0, 1]
    assert relative_index_entries(np.array([0, 3, 20]), 8)[0] == 0
    assert relative_index_entries(np.array([40]), 4)[0] == 2  # gap 41: fillers at 16 and 32
    assert relative_index_entries(np.array([15, 31]), 4)[0] == 0  # gaps of exactly 16


def model_of(w: np.ndarray) -> ir.Model:
    return build(
        f"""{OPSET}
        g (float[N,{w.shape[0]}] x) => (float[N,{w.shape[1]}] y) {{ y = MatMul(x, W) }}""",
        {"W": w},
    )


def test_dense_model_sizes():
    w = np.zeros((64, 32), dtype=np.float32)
    model = model_of(w)
    sizes = compressed_sizes(model)
    proto = ir.to_proto(model)
    assert sizes["file_bytes"] == proto.ByteSize()
    assert sizes["file_gzip9"] == len(gzip.compress(proto.SerializeToString(), compresslevel=9, mtime=0))
    assert sizes["weight_bytes"] == proto.graph.initializer[0].ByteSize()
    assert sizes["weight_gzip9"] < 200  # zeros compress
    assert sizes["deep_compression_bytes"] == w.nbytes  # a dense tensor counts at its raw size


def test_path_counts_the_file_on_disk(tmp_path):
    model = model_of(np.ones((8, 8), dtype=np.float32))
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    assert compressed_sizes(path)["file_bytes"] == path.stat().st_size


def test_clustered_weight_is_huffman_codes_plus_codebook():
    values = np.array([-1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    counts = np.array([512, 256, 128, 128])  # of 1024 weights
    w = np.repeat(values, counts).reshape(64, 16)
    model = model_of(np.random.default_rng(0).permutation(w.reshape(-1)).reshape(64, 16).astype(np.float32))
    ClusterWeights(bits=2)(model)  # 4 distinct values: exact, one codebook
    sizes = compressed_sizes(model)
    huffman = 512 * 1 + 256 * 2 + 128 * 3 + 128 * 3
    assert sizes["deep_compression_bytes"] == math.ceil((huffman + 4 * 32) / 8)
    (record,) = sizes["deep_compression"].values()
    assert record["kind"] == "clustered" and record["bits_per_weight"] == (huffman + 128) / 1024


def test_sparse_weight_is_relative_coded():
    w = np.zeros(1024, dtype=np.float32)
    positions = np.arange(0, 1024, 20)  # 52 non-zeros, gaps 1 then 20: one filler each at 4 bits
    w[positions] = np.arange(1, positions.size + 1)
    model = model_of(w.reshape(64, 16))
    SparsifyWeights(sparsity=0.5)(model)  # keeps every non-zero
    sizes = compressed_sizes(model)
    (record,) = sizes["deep_compression"].values()
    nnz = positions.size
    four = (nnz + (nnz - 1)) * (4 + 32)
    eight = nnz * (8 + 32)
    assert record["nnz"] == nnz and record["kind"] == "sparse"
    assert record["bits"] == min(four, eight) and record["index_bits"] == (4 if four < eight else 8)
    assert sizes["deep_compression_bytes"] == math.ceil(min(four, eight) / 8)  # element count and shape implied


def test_sparse_and_clustered_huffman_codes_the_entries():
    rng = np.random.default_rng(1)
    w = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=1024)
    w[rng.random(1024) < 0.75] = 0  # about 256 non-zeros, gaps mostly below 16
    model = model_of(w.reshape(64, 16))
    SparsifyWeights(sparsity=0.5)(model)
    ClusterWeights(bits=1)(model)  # two distinct values: exact
    sizes = compressed_sizes(model)
    (record,) = sizes["deep_compression"].values()
    assert record["kind"] == "sparse + clustered"
    nnz = int(np.count_nonzero(w))
    assert record["nnz"] == nnz
    assert sizes["deep_compression_bytes"] < nnz * (4 + 2) / 8 + 64  # ~1 bit a value + 4-bit gaps


def test_every_run_reports_sizes_before_and_after_in_its_json(tmp_path):
    import json

    import onnxopt
    from onnxopt.report import render_table, write_json

    rng = np.random.default_rng(0)
    model = model_of(rng.standard_normal((64, 32)).astype(np.float32))
    result = onnxopt.optimize(model, ["simplify"], data="synthetic", latency=False, cluster_bits=2)
    write_json(result.report, tmp_path / "r.json")
    sizes = json.loads((tmp_path / "r.json").read_text())["sizes"]
    for side in ("before", "after"):
        s = sizes[side]
        assert s["gzip_level"] == 9 and 0 < s["file_gzip"] <= s["file_bytes"]
        assert s["deep_compression_bytes"] > 0 and 0 < s["weight_gzip9"] <= s["weight_bytes"]
    assert sizes["before"]["deep_compression_bytes"] == 64 * 32 * 4  # dense: its raw size
    assert sizes["after"]["deep_compression_bytes"] < sizes["before"]["deep_compression_bytes"] / 8  # 2-bit codes
    text = " ".join(line.strip() for line in render_table(result.report).splitlines())
    assert "size: file " in text and "gzip -9 " in text and "Deep Compression 8.19kB -> " in text


def test_run_sizes_fall_back_to_gzip_6_and_skip_the_estimate_on_large_models(monkeypatch):
    from onnxopt import compressed_size

    model = model_of(np.ones((64, 32), dtype=np.float32))
    monkeypatch.setattr(compressed_size, "GZIP9_LIMIT", 100)
    monkeypatch.setattr(compressed_size, "DEEP_COMPRESSION_LIMIT", 100)
    sizes = compressed_size.run_sizes(model)
    assert sizes["gzip_level"] == 6 and sizes["file_gzip"] <= sizes["file_bytes"]
    assert sizes["deep_compression_bytes"] is None and len(sizes["notes"]) == 2

"""The compact stored forms: sparse positions as uint8 relative gaps (CumSum), cluster codes packed
below a byte (BitShift); exact round trips, onnxruntime equal to the unpacked forms, smaller files."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs import assert_equivalent, build, random_feeds, run, snapshot
from onnxopt.compressed_size import compressed_sizes
from onnxopt.passes import ClusterWeights, SparsifyWeights
from onnxopt.passes import _weights, cluster, sparsify
from onnxopt.passes._weights import pack_codes, packed_bits, positions_of_gaps, relative_gaps, unpack_codes

rng = np.random.default_rng(0)


def matmul_model(w: np.ndarray, opset: int = 17) -> ir.Model:
    return build(
        f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,{w.shape[0]}] x) => (float[N,{w.shape[1]}] y) {{
            y = MatMul(x, W)
        }}""",
        {"W": w},
    )


def optimized_ops(model: ir.Model, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(snapshot(model), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("positions", [
    [0, 1, 2, 3],                      # dense: every gap 1 (the first 0)
    [300, 301, 1000, 1255, 1256],      # first entry past 255, gaps of 699 and 255
    [255, 510, 765],                   # gaps of exactly 255: no filler
    [5, 5 + 256, 5 + 256 + 511],       # 256 and 511: one filler each
    [],                                # all zero
])
def test_relative_gaps_round_trip_with_fillers(positions):
    positions = np.array(positions, dtype=np.int64)
    values = np.arange(1, positions.size + 1, dtype=np.float32)
    gaps, stored = relative_gaps(positions, values)
    assert gaps.dtype == np.uint8 and stored.shape == gaps.shape
    rebuilt = positions_of_gaps(gaps)
    dense = np.zeros(2000, np.float32)
    dense[rebuilt] = stored  # fillers write 0 where the dense tensor holds 0
    expected = np.zeros(2000, np.float32)
    expected[positions] = values
    np.testing.assert_array_equal(dense, expected)
    assert np.all(gaps[1:] >= 1) and len(set(rebuilt.tolist())) == rebuilt.size
    fillers = int(np.maximum(0, (np.diff(np.concatenate([[0], positions])) - 1) // 255).sum())
    assert gaps.size == positions.size + fillers


@pytest.mark.parametrize("bits,count", [(1, 13), (2, 7), (4, 9), (4, 1), (2, 8)])
def test_pack_codes_round_trip_with_odd_counts(bits, count):
    codes = rng.integers(0, 2 ** bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_packed_bits():
    assert [packed_bits(n) for n in (1, 2, 3, 4, 5, 8, 16, 17, 256)] == [1, 1, 2, 2, 4, 4, 4, 8, 8]


def long_gap_weight() -> np.ndarray:
    """A 64x64 weight whose kept entries are far apart in places (gaps > 255 and > 510)."""
    w = np.zeros((64, 64), np.float32)
    flat = w.reshape(-1)
    keep = np.concatenate([[700], rng.choice(np.arange(800, 1600), 300, replace=False), [2200, 4095]])
    flat[keep] = rng.standard_normal(keep.size).astype(np.float32) + np.sign(rng.standard_normal(keep.size)) * 2
    return w


def test_gaps_form_with_fillers_equals_the_dense_masked_model_and_folds(tmp_path):
    w = long_gap_weight()
    model = matmul_model(w)
    p = SparsifyWeights(sparsity=0.5)  # the zeros are the smallest: what is kept is w's non-zeros and a few zeros
    p(model)
    record = p.details["layers"]["W"]
    assert record["form"] == "sparse" and record["index_form"] == "gaps" and record["fillers"] >= 3
    masked = np.where(np.abs(w) > 0, w, 0).astype(np.float32)
    assert_equivalent(snapshot(matmul_model(masked)), model, random_feeds(model, {"N": 3}), rtol=0.0)
    ops = optimized_ops(model, tmp_path)
    assert not {"CumSum", "ScatterElements", "Cast"} & set(ops), ops


def test_all_zero_tensor_in_the_gaps_form(monkeypatch):
    model = matmul_model(np.zeros((32, 16), np.float32))
    # empty either way; the indices form is 8 bytes smaller (no CumSum axis): force the gaps form
    monkeypatch.setattr(sparsify, "sparse_bytes", lambda *args: 10**9)
    p = SparsifyWeights(sparsity=0.5)
    p(model)
    assert p.details["layers"]["W"]["index_form"] == "gaps"
    feeds = random_feeds(model, {"N": 2})
    np.testing.assert_array_equal(run(model, feeds)[0], np.zeros((2, 16), np.float32))


def test_below_opset_11_the_indices_form_and_byte_codes_stay():
    w = rng.standard_normal((64, 32)).astype(np.float32)
    model = matmul_model(w, opset=10)
    c = ClusterWeights(bits=4)
    c(model)
    assert c.details["layers"]["W"]["code_bits"] == 8
    assert "BitShift" not in [n.op_type for n in model.graph]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_packed_codes_equal_the_byte_codes(bits, tmp_path):
    w = rng.standard_normal((129, 17)).astype(np.float32)  # 2193 codes: odd, padding sliced off
    packed, plain = matmul_model(w), matmul_model(w)
    c = ClusterWeights(bits=bits, per_channel=bits == 4)
    c(packed)
    assert c.details["layers"]["W"]["code_bits"] == {1: 1, 2: 2, 3: 4, 4: 4}[bits]
    # the same pass storing one code a byte (as below opset 11) is the reference
    monkey = pytest.MonkeyPatch()
    monkey.setattr(cluster, "COMPACT_OPSET", 99)
    ClusterWeights(bits=bits, per_channel=bits == 4)(plain)
    monkey.undo()
    assert_equivalent(snapshot(plain), packed, random_feeds(packed, {"N": 3}), rtol=0.0, atol=0.0)
    assert compressed_sizes(packed)["weight_bytes"] < compressed_sizes(plain)["weight_bytes"]
    assert not {"BitShift", "Gather", "Concat"} & set(optimized_ops(packed, tmp_path))


def sparse_clustered(w: np.ndarray, compact: bool) -> ir.Model:
    model = matmul_model(w)
    with pytest.MonkeyPatch.context() as monkey:
        if not compact:
            monkey.setattr(sparsify, "COMPACT_OPSET", 99)
            monkey.setattr(cluster, "COMPACT_OPSET", 99)
        SparsifyWeights(sparsity=0.7)(model)
        ClusterWeights(bits=4)(model)
    return model


def unpacked_reference(model: ir.Model, shape) -> np.ndarray:
    """The dense weight decoded in numpy from the stored gaps, packed codes and codebook."""
    inits = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    positions = positions_of_gaps(inits["W_gaps"])
    book = inits["W_values_codebook"]
    if "W_values_codes" in inits:  # too few codes for packing to pay for its nodes
        codes = inits["W_values_codes"]
    else:
        codes = unpack_codes(inits["W_values_codes_packed"], packed_bits(book.size), positions.size)
    dense = np.zeros(int(np.prod(shape)), np.float32)
    dense[positions] = book[codes]
    return dense.reshape(shape)


def test_sparse_and_clustered_weight_is_smaller_and_equal(tmp_path):
    w = rng.standard_normal((256, 128)).astype(np.float32)
    old, new = sparse_clustered(w, compact=False), sparse_clustered(w, compact=True)
    assert {"CumSum", "BitShift"} <= {n.op_type for n in new.graph}
    assert_equivalent(snapshot(old), new, random_feeds(new, {"N": 3}), rtol=0.0, atol=0.0)
    np.testing.assert_array_equal(run_decoded(new), unpacked_reference(new, w.shape))
    assert len(snapshot(new)) < 0.6 * len(snapshot(old))
    before, after = compressed_sizes(old), compressed_sizes(new)
    assert after["weight_bytes"] < 0.6 * before["weight_bytes"]
    assert after["weight_gzip9"] < before["weight_gzip9"]
    # the Deep Compression estimate reads the decoded positions and codes whichever form stored them
    (detail,) = after["deep_compression"].values()
    assert detail["kind"] == "sparse + clustered"
    assert after["deep_compression_bytes"] == before["deep_compression_bytes"]
    assert not {"CumSum", "BitShift", "ScatterElements", "Gather"} & set(optimized_ops(new, tmp_path))


@pytest.mark.parametrize("tile", [1, 3])
def test_sparse_and_clustered_with_fillers_equals_its_unpacked_reference(tile):
    w = np.tile(long_gap_weight(), (tile, 1))  # 3: enough codes to pack
    new = sparse_clustered(w, compact=True)
    assert ("W_values_codes_packed" in new.graph.initializers) == (tile == 3)
    decoded = run_decoded(new)
    np.testing.assert_array_equal(decoded, unpacked_reference(new, w.shape))
    assert np.all(decoded[w == 0] == 0)


def test_fillers_decode_to_exact_zero_when_clustered():
    w = long_gap_weight()
    model = matmul_model(w)
    SparsifyWeights(sparsity=0.5)(model)
    c = ClusterWeights(bits=2)
    c(model)
    (name,) = [n for n in c.details["layers"]]
    assert "zero" in c.details["layers"][name]["mode"]
    decoded = run_decoded(model)
    assert np.count_nonzero(decoded) <= np.count_nonzero(w)
    assert np.all(decoded[w == 0] == 0)


def run_decoded(model: ir.Model) -> np.ndarray:
    """The dense weight the graph decodes (identity input through the MatMul)."""
    n = model.graph.inputs[0].shape[1]
    return run(model, {"x": np.eye(n, dtype=np.float32)})[0]


def test_student_runs_the_compact_forms():
    torch = pytest.importorskip("torch")
    from onnxopt.student import build_student, check_matches

    w = long_gap_weight()
    model = matmul_model(w)
    SparsifyWeights(sparsity=0.5)(model)
    ClusterWeights(bits=4)(model)
    feed = random_feeds(model, {"N": 4})
    check_matches(build_student(model), model, feed)
    assert torch.bitwise_left_shift(torch.tensor([0xF3], dtype=torch.uint8), 4).item() == 0x30

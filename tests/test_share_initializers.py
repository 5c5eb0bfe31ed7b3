"""ShareInitializers: repeated tensors become one, transposed copies included; what must stay apart."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphs import assert_equivalent, build, op_types, random_feeds, snapshot, value_names
from onnxopt.passes import ShareInitializers

# Sharing moves no arithmetic: outputs must be bit-identical.
RTOL = 0.0

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'

rng = np.random.default_rng(0)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def share(model: ir.Model, feeds, **kwargs) -> tuple[ShareInitializers, bool]:
    """Run the pass, check the result against the original; return the pass and ``modified``."""
    before = snapshot(model)
    p = ShareInitializers(**kwargs)
    result = p(model)
    assert_equivalent(before, result.model, feeds, rtol=RTOL)
    names = value_names(result.model)
    assert len(names) == len(set(names)), names
    return p, result.modified


def assert_unchanged(model: ir.Model, feeds) -> ShareInitializers:
    before = snapshot(model)
    p, modified = share(model, feeds)
    assert modified is False
    assert snapshot(model) == before
    assert p.details == {"duplicates": 0, "transposed": 0, "bytes_saved": 0}
    return p


def two_matmuls(a: np.ndarray, b: np.ndarray) -> ir.Model:
    """y = (x @ A) @ B."""
    return build(
        f"""{OPSET}
        g (float[N,{a.shape[0]}] x) => (float[N,{b.shape[1]}] y) {{
            h = MatMul(x, A)
            y = MatMul(h, B)
        }}""",
        {"A": a, "B": b},
    )


def test_duplicates_of_several_sizes_become_one_each():
    a = randn(16, 16)
    b = randn(16)
    shape = np.array([-1, 16], dtype=np.int64)
    weights = {
        "A1": a, "A2": a.copy(), "A3": a.copy(),  # 1024 bytes, three copies
        "B1": b, "B2": b.copy(),  # 64 bytes, two copies
        "S1": shape, "S2": shape.copy(),  # int64, 16 bytes, two copies
        "D": randn(16, 16),  # unique
    }
    model = build(
        f"""{OPSET}
        g (float[N,16] x) => (float[N,16] y) {{
            h1 = MatMul(x, A1)
            h2 = MatMul(h1, A2)
            h3 = MatMul(h2, A3)
            h4 = Add(h3, B1)
            h5 = Add(h4, B2)
            r1 = Reshape(h5, S1)
            h6 = MatMul(r1, D)
            y = Reshape(h6, S2)
        }}""",
        weights,
    )
    p, modified = share(model, random_feeds(model, {"N": 3}))
    assert modified is True
    assert p.details["duplicates"] == 4
    assert p.details["transposed"] == 0
    assert p.details["bytes_saved"] == 2 * 1024 + 64 + 16
    assert sorted(model.graph.initializers) == ["A1", "B1", "D", "S1"]
    assert "saved 2,128 bytes" in p.summary


def test_duplicate_constant_node_reads_the_initializer():
    w = randn(4, 4)
    model = build(
        f"""{OPSET}
        g (float[N,4] x) => (float[N,4] y) {{
            k = Constant <value = float[4,4] {{{", ".join(map(repr, w.ravel().tolist()))}}}> ()
            h = MatMul(x, W)
            y = MatMul(h, k)
        }}""",
        {"W": w},
    )
    p, modified = share(model, random_feeds(model))
    assert modified is True
    assert "Constant" not in op_types(model)
    assert p.details == {"duplicates": 1, "transposed": 0, "bytes_saved": 64}
    assert [n.inputs[1].name for n in model.graph] == ["W", "W"]


def _floats(a: np.ndarray) -> str:
    return ", ".join(map(repr, a.ravel().tolist()))


def test_duplicates_in_main_graph_and_if_subgraphs():
    w = randn(3, 3)
    model = build(
        f"""{OPSET}
        g (float[N,3] x, bool cond) => (float[N,3] y) {{
            h = MatMul(x, W)
            y = If (cond) <
                then_branch = then_g () => (float[N,3] t) {{
                    k = Constant <value = float[3,3] {{{_floats(w)}}}> ()
                    t = MatMul(h, k)
                }},
                else_branch = else_g () => (float[N,3] e) <float[3,3] W_else = {{{_floats(w)}}}> {{
                    e = MatMul(h, W_else)
                }}
            >
        }}""",
        {"W": w},
    )
    x = randn(2, 3)
    feeds = [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]
    p, modified = share(model, feeds)
    assert modified is True
    assert p.details["duplicates"] == 2
    assert p.details["bytes_saved"] == 2 * 36
    assert "Constant" not in op_types(model)
    assert list(model.graph.initializers) == ["W"]
    for sub in model.graph.subgraphs():
        assert not sub.initializers
        assert [n.inputs[1].name for n in sub] == ["W"]


def test_copies_only_in_two_subgraphs_share_one_main_graph_initializer():
    w = randn(2, 2)
    model = build(
        f"""{OPSET}
        g (float[N,2] x, bool cond) => (float[N,2] y) {{
            y = If (cond) <
                then_branch = then_g () => (float[N,2] t) {{
                    k = Constant <value = float[2,2] {{{_floats(w)}}}> ()
                    t = MatMul(x, k)
                }},
                else_branch = else_g () => (float[N,2] e) {{
                    k2 = Constant <value = float[2,2] {{{_floats(w)}}}> ()
                    e = MatMul(x, k2)
                }}
            >
        }}""",
    )
    x = randn(2, 2)
    feeds = [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]
    p, modified = share(model, feeds)
    assert modified is True
    assert p.details == {"duplicates": 1, "transposed": 0, "bytes_saved": 16}
    assert len(model.graph.initializers) == 1
    assert "Constant" not in op_types(model)


def test_constants_in_one_subgraph_get_a_name_free_in_every_scope():
    # The shared initializer would be named 'k_1' (its first copy 'k' still exists while merging);
    # the main graph already has a 'k_1'.
    model = build(
        f"""{OPSET}
        g (float[N,2] x, bool cond) => (float[N,2] y, float[N,2] k_1) {{
            k_1 = Relu(x)
            y = If (cond) <
                then_branch = then_g () => (float[N,2] t) {{
                    k = Constant <value = float[2] {{1.0, 2.0}}> ()
                    k2 = Constant <value = float[2] {{1.0, 2.0}}> ()
                    a = Add(x, k)
                    t = Mul(a, k2)
                }},
                else_branch = else_g () => (float[N,2] e) {{
                    e = Neg(x)
                }}
            >
        }}""",
    )
    x = randn(2, 2)
    p, modified = share(model, [{"x": x, "cond": np.array(c)} for c in (True, False)])  # names unique
    assert modified is True
    assert p.details == {"duplicates": 1, "transposed": 0, "bytes_saved": 8}


def test_equal_shape_different_bytes_not_merged():
    a = randn(4, 4)
    b = a.copy()
    b[3, 3] = np.nextafter(b[3, 3], np.float32(np.inf))  # one ulp apart
    model = two_matmuls(a, b)
    assert_unchanged(model, random_feeds(model))


def test_different_dtype_same_bytes_not_merged():
    # float32 and int32 zeros have the same bytes.
    model = build(
        f"""{OPSET}
        g (float[4] x, int32[4] i) => (float[4] y, int32[4] j) {{
            y = Add(x, F)
            j = Add(i, I)
        }}""",
        {"F": np.zeros(4, np.float32), "I": np.zeros(4, np.int32)},
    )
    feeds = {"x": randn(4), "i": np.arange(4, dtype=np.int32)}
    assert_unchanged(model, feeds)


def test_graph_input_initializer_is_never_merged():
    w = randn(4)
    text = f"""{OPSET}
        g (float[4] x, float[4] W_in) => (float[4] y) {{
            h = Add(x, W_in)
            h2 = Add(h, W1)
            y = Add(h2, W2)
        }}"""
    weights = {"W_in": w, "W1": w.copy(), "W2": w.copy()}
    model = build(text, weights)
    feeds = random_feeds(model)
    assert set(feeds) == {"x"}
    p, modified = share(model, feeds)
    assert modified is True
    assert p.details["duplicates"] == 1  # W1 and W2 only
    assert sorted(model.graph.initializers) == ["W1", "W_in"]
    assert [v.name for v in model.graph.inputs] == ["x", "W_in"]
    # The caller may still feed W_in: it is not tied to W1.
    assert_equivalent(snapshot(build(text, weights)), model, {**feeds, "W_in": randn(4)}, rtol=RTOL)


def test_graph_output_is_never_merged():
    w = randn(4)
    model = build(
        f"""{OPSET}
        g (float[4] x) => (float[4] y, float[4] K) {{
            y = Add(x, W)
        }}""",
        {"W": w, "K": w.copy()},
    )
    assert_unchanged(model, random_feeds(model))


def tied_embedding_model(vocab=11, dim=4):
    """A tied embedding exported as two tensors: the table [V, D] and its transpose [D, V]."""
    table = randn(vocab, dim)
    model = build(
        f"""{OPSET}
        g (int64[N] ids) => (float[N,{vocab}] logits) {{
            h = Gather <axis=0> (T, ids)
            logits = MatMul(h, P)
        }}""",
        {"T": table, "P": table.T.copy()},
    )
    return model, table


def test_tied_embedding_transposed_projection_becomes_one_tensor():
    model, table = tied_embedding_model()
    feeds = {"ids": np.array([0, 3, 10, 7], dtype=np.int64)}
    p, modified = share(model, feeds)
    assert modified is True
    assert p.details == {"duplicates": 0, "transposed": 1, "bytes_saved": table.nbytes}
    assert list(model.graph.initializers) == ["T"]
    assert sorted(op_types(model)) == ["Gather", "MatMul", "Transpose"]
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1].producer().op_type == "Transpose"
    assert matmul.inputs[1].producer().inputs[0].name == "T"


def test_transposes_false_leaves_the_copy():
    model, _ = tied_embedding_model()
    assert ShareInitializers(transposes=False)(model).modified is False
    assert sorted(model.graph.initializers) == ["P", "T"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_reading_the_transposed_copy_flips_trans_b(trans_b):
    vocab, dim = 9, 4
    table = randn(vocab, dim)
    # P = T^T. With transB=0 the Gemm computes h @ P (h has D columns); with transB=1, h @ P^T = h @ T.
    proj = table.T.copy()
    cols, out = (dim, vocab) if trans_b == 0 else (vocab, dim)
    model = build(
        f"""{OPSET}
        g (int64[N] ids, float[N,{cols}] h) => (float[N,{dim}] e, float[N,{out}] y) {{
            e = Gather <axis=0> (T, ids)
            y = Gemm <transB={trans_b}, alpha=0.5> (h, P, C)
        }}""",
        {"T": table, "P": proj, "C": randn(out)},
    )
    feeds = {"ids": np.array([1, 8, 0], dtype=np.int64), "h": randn(3, cols)}
    p, modified = share(model, feeds)
    assert modified is True
    assert p.details == {"duplicates": 0, "transposed": 1, "bytes_saved": table.nbytes}
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].name == "T"
    assert gemm.attributes["transB"].as_int() == 1 - trans_b
    assert "Transpose" not in op_types(model)


def test_nothing_to_share_is_not_modified():
    model = two_matmuls(randn(4, 4), randn(4, 4))
    p = assert_unchanged(model, random_feeds(model))
    assert p.summary == "shared 0 duplicate tensors; saved 0 bytes"


def test_second_run_finds_nothing_more():
    w = randn(4, 4)
    model = two_matmuls(w, w.copy())
    assert ShareInitializers()(model).modified is True
    assert ShareInitializers()(model).modified is False


# The pass groups candidates by a probe of up to 256 evenly spaced elements (plus the last) before
# hashing. Tensors far larger than the probe, equal at every probed position, must still be told
# apart by their full bytes.
BIG = (64, 64)  # 4096 elements: the probe reads one element in 16


def _probed(size: int) -> np.ndarray:
    """Flat indices the probe reads: every ``size // 256``-th element and the last."""
    mask = np.zeros(size, dtype=bool)
    mask[:: max(1, size // 256)] = True
    mask[-1] = True
    return mask


def test_big_tensors_equal_on_the_probe_but_not_elsewhere_stay_apart():
    a = randn(*BIG)
    b = a.copy().reshape(-1)
    off_probe = ~_probed(b.size)
    assert off_probe.sum() > 3000  # most elements lie outside the probe
    b[off_probe] = randn(int(off_probe.sum()))  # differs everywhere the probe does not look
    b = b.reshape(BIG)
    assert np.array_equal(a.reshape(-1)[_probed(a.size)], b.reshape(-1)[_probed(b.size)])
    model = two_matmuls(a, b)
    assert_unchanged(model, random_feeds(model))


def test_big_tensors_one_element_apart_off_the_probe_stay_apart():
    a = randn(*BIG)
    b = a.copy()
    assert not _probed(a.size)[1]
    b.reshape(-1)[1] = np.nextafter(b.reshape(-1)[1], np.float32(np.inf))  # one ulp, unprobed
    model = two_matmuls(a, b)
    assert_unchanged(model, random_feeds(model))


def test_big_identical_tensors_are_shared_beside_a_probe_twin():
    a = randn(*BIG)
    twin = a.copy()
    twin.reshape(-1)[17] += 1.0  # equal to ``a`` at every probed position, not elsewhere
    assert not _probed(a.size)[17]
    model = build(
        f"""{OPSET}
        g (float[N,64] x) => (float[N,64] y) {{
            h1 = MatMul(x, A1)
            h2 = MatMul(h1, T)
            y = MatMul(h2, A2)
        }}""",
        {"A1": a, "T": twin, "A2": a.copy()},
    )
    p, modified = share(model, random_feeds(model))
    assert modified is True
    assert p.details == {"duplicates": 1, "transposed": 0, "bytes_saved": a.nbytes}
    assert sorted(model.graph.initializers) == ["A1", "T"]
    assert [n.inputs[1].name for n in model.graph] == ["A1", "T", "A1"]

"""A small transformer block in ONNX text, for the dynamic and int4 quantization tests.

Embedding Gather, LayerNormalization, Q/K/V projections that share their input, attention
(two activation MatMuls and a Softmax), an output projection with a residual Add, then a
Gemm (``transB``) and a MatMul feed-forward on the flattened tokens: every kind of reader the
quantizers meet in an encoder.
"""

from __future__ import annotations

__all__ = ["tiny_transformer", "tiny_sentence_encoder", "single_matmul", "token_feeds"]

import numpy as np
import onnx_ir as ir

from graphs import build

HIDDEN, FF, VOCAB = 64, 128, 96
# One attention block on the normalized tokens ``n``, with its residual onto ``x``: r = x + attention(n).
ATTENTION = """q = MatMul(n, Wq)
            k = MatMul(n, Wk)
            v = MatMul(n, Wv)
            kt = Transpose <perm = [0, 2, 1]> (k)
            s = MatMul(q, kt)
            a = Softmax <axis = -1> (s)
            c = MatMul(a, v)
            o = MatMul(c, Wo)
            r = Add(x, o)"""


def tiny_transformer(seed: int = 0, *, alpha: float = 1.0, beta: float = 1.0) -> ir.Model:
    """ids int64 [B, S] -> y float [B*S, HIDDEN]."""
    rng = np.random.default_rng(seed)
    h, f = HIDDEN, FF

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32)

    weights = {
        "E": w(VOCAB, h, scale=1.0), "G": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        "Bt": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "Wq": w(h, h), "Wk": w(h, h), "Wv": w(h, h), "Wo": w(h, h),
        "Wf": w(f, h, scale=1 / np.sqrt(h)), "bf": w(f, scale=0.1), "W2": w(f, h), "shape": np.array([-1, h], np.int64),
    }
    return build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        tiny (int64[B, S] ids) => (float[M, {h}] y) {{
            x = Gather(E, ids)
            n = LayerNormalization <axis = -1> (x, G, Bt)
            {ATTENTION}
            r2 = Reshape(r, shape)
            g = Gemm <transB = 1, alpha = {alpha}, beta = {beta}> (r2, Wf, bf)
            act = Relu(g)
            y = MatMul(act, W2)
        }}""",
        weights,
    )


def tiny_sentence_encoder(seed: int = 0, hidden: int = 32, ff: int = 64) -> ir.Model:
    """ids int64 [B, S] -> emb float [B, hidden] of unit norm: a sentence encoder's shape in small.

    Position ids by ``Range`` over the sequence length, an attention block and a feed-forward with
    residuals, mean pooling over the sequence and ``ReduceL2`` normalization (as all-MiniLM-L6-v2):
    the ops the student needs for a real encoder, and an output distilled by cosine."""
    rng = np.random.default_rng(seed)
    h, f = hidden, ff

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32)

    weights = {
        "E": w(VOCAB, h, scale=1.0), "P": w(16, h, scale=0.5), "G": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        "Bt": (0.1 * rng.standard_normal(h)).astype(np.float32), "Wq": w(h, h), "Wk": w(h, h), "Wv": w(h, h),
        "Wo": w(h, h), "W1": w(h, f), "b1": w(f, scale=0.1), "W2": w(f, h), "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64), "last": np.array([1], np.int64),
    }
    return build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        encoder (int64[B, S] ids) => (float[B, {h}] emb) {{
            shape = Shape(ids)
            seq = Gather <axis = 0> (shape, one)
            positions = Range(zero, seq, one)
            x0 = Gather(E, ids)
            p = Gather(P, positions)
            x = Add(x0, p)
            n = LayerNormalization <axis = -1> (x, G, Bt)
            {ATTENTION}
            u = MatMul(r, W1)
            ub = Add(u, b1)
            act = Relu(ub)
            d = MatMul(act, W2)
            t = Add(r, d)
            pooled = ReduceMean <axes = [1], keepdims = 0> (t)
            norm = ReduceL2 <axes = [1], keepdims = 1> (pooled)
            emb = Div(pooled, norm)
        }}""",
        weights,
    )


def single_matmul(w: np.ndarray) -> ir.Model:
    """x float [M, K] -> y = x @ w."""
    k, n = w.shape
    return build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        mm (float[M, {k}] x) => (float[M, {n}] y) {{
            y = MatMul(x, W)
        }}""",
        {"W": w.astype(np.float32)},
    )


def token_feeds(batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)}

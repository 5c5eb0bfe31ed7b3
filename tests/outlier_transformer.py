"""A pre-LN transformer encoder whose residual stream carries a few outlier channels, in ONNX text.

Real BERT-style encoders carry a handful of residual channels 50-100x larger than the rest, and
their LayerNorms' gamma keep them large; the weight rows that read those channels are small in
turn, so that every channel matters to the projections. One per-tensor int8 scale on such an
LN output rounds the ordinary channels to a level or two: SmoothQuant's case.

Two pre-LN layers (LN → Q/K/V → attention → output projection → residual Add; LN → FFN up →
Relu → FFN down → residual Add), a final LN and a head MatMul: every LN output is read only by
projections, so every LN can be smoothed.
"""

from __future__ import annotations

__all__ = ["outlier_transformer", "outlier_feeds", "HIDDEN", "OUTLIERS"]

import numpy as np
import onnx_ir as ir

from graphs import build

HIDDEN, FF, HEAD = 64, 128, 32
OUTLIERS = (3, 17, 42)  # residual channels 60-90x larger than the others


def outlier_transformer(seed: int = 0, *, scale: float = 80.0, layers: int = 2) -> ir.Model:
    """x float [B, S, HIDDEN] -> y float [B, S, HEAD]."""
    rng = np.random.default_rng(seed)
    h, f = HIDDEN, FF
    big = np.ones(h, np.float32)
    big[list(OUTLIERS)] = scale * np.linspace(0.75, 1.1, len(OUTLIERS))

    def w(rows, cols):
        m = rng.standard_normal((rows, cols)) / np.sqrt(rows)
        if rows == h:  # rows that read an outlier channel are small: every channel matters
            m /= big[:, None]
        return m.astype(np.float32)

    def ln(name):
        return {f"G{name}": (big * (1 + 0.1 * rng.standard_normal(h))).astype(np.float32),
                f"B{name}": (0.1 * big * rng.standard_normal(h)).astype(np.float32)}

    weights = {"scale": np.array(1 / np.sqrt(h), np.float32), "perm": np.array([0, 2, 1], np.int64)}
    body, r = [], "x"
    for i in range(layers):
        weights |= ln(f"a{i}") | ln(f"f{i}")
        weights |= {f"Wq{i}": w(h, h), f"Wk{i}": w(h, h), f"Wv{i}": w(h, h), f"Wo{i}": w(h, h),
                    f"W1{i}": w(h, f), f"b1{i}": (0.1 * rng.standard_normal(f)).astype(np.float32), f"W2{i}": w(f, h)}
        body += [
            f"n{i} = LayerNormalization <axis = -1> ({r}, Ga{i}, Ba{i})",
            f"q{i} = MatMul(n{i}, Wq{i})", f"k{i} = MatMul(n{i}, Wk{i})", f"v{i} = MatMul(n{i}, Wv{i})",
            f"kt{i} = Transpose <perm = [0, 2, 1]> (k{i})", f"s{i} = MatMul(q{i}, kt{i})", f"ss{i} = Mul(s{i}, scale)",
            f"a{i} = Softmax <axis = -1> (ss{i})", f"c{i} = MatMul(a{i}, v{i})", f"o{i} = MatMul(c{i}, Wo{i})",
            f"r{i} = Add({r}, o{i})",
            f"m{i} = LayerNormalization <axis = -1> (r{i}, Gf{i}, Bf{i})",
            f"u{i} = MatMul(m{i}, W1{i})", f"ub{i} = Add(u{i}, b1{i})", f"g{i} = Relu(ub{i})",
            f"d{i} = MatMul(g{i}, W2{i})", f"t{i} = Add(r{i}, d{i})",
        ]
        r = f"t{i}"
    weights |= ln("out") | {"Wh": w(h, HEAD)}
    body += [f"e = LayerNormalization <axis = -1> ({r}, Gout, Bout)", "y = MatMul(e, Wh)"]
    lines = "\n            ".join(body)
    return build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        enc (float[B, S, {h}] x) => (float[B, S, {HEAD}] y) {{
            {lines}
        }}""",
        weights,
    )


def outlier_feeds(batch: int = 8, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Embeddings with the outlier channels large, as an encoder's residual stream starts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 20.0
    return {"x": x}

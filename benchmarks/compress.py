"""Benchmark: weight compression on the digits CNN, without fine-tuning (issue 17).

    .venv/bin/python -m benchmarks.compress [--json out.json]
    (onnxsim rows need ``pip install onnxsim==0.8.1``; without it they are left out)

Every row starts from the trained digits CNN after ``simplify`` and ``fold-bn`` (what a recipe
runs first) and applies one compression recipe; accuracy is top-1 on the 540 held-out images of
``models/digits/digits_test.npz`` under onnxruntime (default session options: the decoders are
constant-folded at load). Sizes from ``onnxopt.compressed_size``: the weights (initializers,
codebooks, codes, sparse values and indices) serialized, raw and gzip -9, and the Deep Compression
storage figure; ``x`` is the fp32 weights' gzip -9 size over the row's. The anchor is onnxsim
0.8.1: ``quantize_weight_only_kmeans`` (per-layer k-means codebook read by Gather; MatMul/Gemm
layers only) and ``apply_magnitude_pruning`` (zeros stored dense).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.compressed_size import compressed_sizes
from onnxopt.passes import ClusterWeights, FoldBatchNorm, LowRankFactorize, Simplify, SparsifyWeights

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def _base() -> ir.Model:
    model = ir.load(DIGITS / "digits_cnn.onnx")
    Simplify()(model)
    FoldBatchNorm()(model)
    return model


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def _recipes():
    yield "fp32 (simplify, fold-bn)", []
    for bits in (4, 3, 2, 1):
        yield f"cluster {bits} bits", [ClusterWeights(bits=bits)]
    yield "cluster 4 bits per channel", [ClusterWeights(bits=4, per_channel=True)]
    yield "sparsify 0.5", [SparsifyWeights(0.5)]
    yield "sparsify 0.8", [SparsifyWeights(0.8)]
    yield "sparsify 0.5 global", [SparsifyWeights(0.5, scope="global")]
    yield "sparsify 0.8 global", [SparsifyWeights(0.8, scope="global")]
    yield "sparsify 0.8 + cluster 4", [SparsifyWeights(0.8), ClusterWeights(bits=4)]
    yield "sparsify 0.5 global + cluster 4", [SparsifyWeights(0.5, scope="global"), ClusterWeights(bits=4)]
    yield "lowrank energy 0.9", [LowRankFactorize(energy=0.9, min_params=100)]


def _anchor_recipes():
    try:
        import onnxsim
    except ImportError:
        print("onnxsim not importable: anchor rows left out")
        return
    yield "onnxsim kmeans 4 bits", lambda p: onnxsim.quantize_weight_only_kmeans(p, bits=4)
    yield "onnxsim magnitude 0.5", lambda p: onnxsim.apply_magnitude_pruning(p, sparsity=0.5)
    yield "onnxsim magnitude 0.8", lambda p: onnxsim.apply_magnitude_pruning(p, sparsity=0.8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    data = np.load(DIGITS / "digits_test.npz")
    x, y = data["input"], data["labels"]
    rows = []

    def record(name: str, proto: onnx.ModelProto) -> None:
        sizes = compressed_sizes(proto)
        rows.append({"recipe": name, "accuracy": _accuracy(proto, x, y),
                     **{k: v for k, v in sizes.items() if k != "deep_compression"}})

    for name, passes in _recipes():
        model = _base()
        for p in passes:
            p(model)
        record(name, ir.to_proto(model))
    for name, anchor in _anchor_recipes():
        record(name, anchor(ir.to_proto(_base())))

    ref = rows[0]["weight_gzip9"]
    print(f"{'recipe':34} {'acc %':>6} {'weights B':>10} {'gzip -9':>8} {'x':>6} {'DeepComp B':>10} {'file B':>8}")
    for r in rows:
        print(f"{r['recipe']:34} {100 * r['accuracy']:6.2f} {r['weight_bytes']:10,} {r['weight_gzip9']:8,} "
              f"{ref / r['weight_gzip9']:6.1f} {r['deep_compression_bytes']:10,} {r['file_bytes']:8,}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: ``--fix-dim`` (fix-shapes, then simplify) against onnxslim's ``input_shapes`` on the zoo transformer.

    pip install -e '.[bench]'
    python -m benchmarks.fix_shapes [--batch 1] [--seq 16] [--budget 4]

Both tools get the exported transformer (dynamic batch and sequence length) and the same sizes to
fix; each also runs without fixing, for reference. Printed per result: nodes in the file and in
onnxruntime's optimized graph, output error against the original (graph optimizations disabled,
one token batch of the fixed sizes), and latency against the original at 1 and 2 threads, paired
with ``onnxopt.bench`` (interleaved blocks, median of per-block ratios; lower is faster); then
onnxopt's fixed model against onnxslim's, paired the same way.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "transformer_encoder.onnx"


def _variants(folder: Path, batch: int, seq: int) -> dict[str, Path]:
    import onnxslim

    import onnxopt

    paths = {"original": MODEL}
    for label, fix in (("onnxopt", None), ("onnxopt fixed", {"batch": batch, "seq": seq})):
        result = onnxopt.optimize(MODEL, ["simplify", "fold-bn", "share-init"], fix_dims=fix, validate=False, latency=False)
        paths[label] = result.save(folder / f"{label.replace(' ', '_')}.onnx")
    for label, shapes in (("onnxslim", None), ("onnxslim fixed", [f"input:{batch},{seq}"])):
        path = folder / f"{label.replace(' ', '_')}.onnx"
        onnx.save(onnxslim.slim(str(MODEL), input_shapes=shapes) if shapes else onnxslim.slim(str(MODEL)), path)
        paths[label] = path
    return paths


def _runtime_nodes(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath).graph.node)


def _max_error(path: Path, feed: dict) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    ref = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per paired timing")
    args = parser.parse_args(argv)
    from onnxopt.bench import bench

    feed = {"input": np.random.default_rng(0).integers(0, 100, (args.batch, args.seq)).astype(np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _variants(Path(tmp), args.batch, args.seq)
        print(f"transformer_encoder at batch {args.batch}, {args.seq} tokens; onnxruntime {ort.__version__}")
        header = f"{'model':<16} {'nodes':>6} {'ort nodes':>9} {'max rel err':>11} {'x orig 1t':>9} {'x orig 2t':>9}"
        print(header)
        print("-" * len(header))
        for label, path in paths.items():
            nodes = len(onnx.load(str(path)).graph.node)
            ratios = ["1.00", "1.00"] if label == "original" else [
                f"{bench(str(path), str(MODEL), data=feed, threads=t, budget_seconds=args.budget).ratio:.2f}" for t in (1, 2)]
            print(f"{label:<16} {nodes:>6} {_runtime_nodes(path):>9} {_max_error(path, feed):>11.1e} {ratios[0]:>9} {ratios[1]:>9}")
        paired = [bench(str(paths["onnxopt fixed"]), str(paths["onnxslim fixed"]), data=feed, threads=t,
                        budget_seconds=args.budget).ratio for t in (1, 2)]
        print(f"onnxopt fixed / onnxslim fixed (paired): {paired[0]:.2f} (1 thread), {paired[1]:.2f} (2 threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

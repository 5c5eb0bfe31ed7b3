"""How fast can onnxruntime run a model's int8 version at best? A lower bound, against fp32.

    python -m benchmarks.int8_floor [--models digits] [--batch 1] [--threads 1,2]

For each model, onnxruntime's own optimized graphs of the fp32 model and of onnxopt's int8 model
(as its speed fallback chose it at this batch and thread count) are saved and timed with graph
optimizations off, each paired with the fp32 graph (``onnxopt.bench``: interleaved blocks, median
of per-block ratios; below 1 is faster). Then the int8 graph is cut down step by step:

- ``no layout Transposes``: each Transpose that moves only size-1 axes (the NCHW ↔ NHWC
  conversions onnxruntime puts around a one-channel input or a 1×1 map) becomes a Reshape; the
  outputs stay exact;
- ``no QLinearAdd``: every QLinearAdd is skipped too (its first input passed on). The outputs are
  wrong; it times what residual Adds fused into the convolutions could at best give.

When even the cut-down graph is slower than fp32, no placement of Q/DQ nodes makes the int8 model
faster at that setting: onnxruntime's integer kernels themselves are slower there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from benchmarks.quantize import model_data

STEPS = ("onnxruntime's graph", "no layout Transposes", "no QLinearAdd")


def optimized_graph(model: Path, out: Path, threads: int) -> Path:
    """onnxruntime's optimized graph of ``model`` (all optimizations, CPU), saved to ``out``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return out


def value_shapes(model: onnx.ModelProto, feed: dict, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes ``names`` take on ``feed``, read by running the graph with them exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in names]
    return {n: a.shape for n, a in zip(wanted, session.run(wanted, feed))}


def without_layout_transposes(model: onnx.ModelProto, feed: dict) -> tuple[onnx.ModelProto, int]:
    """``model`` with each Transpose that moves only size-1 axes replaced by a Reshape (exact)."""
    model = _copy(model)
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"]
    shapes = value_shapes(model, feed, [n.input[0] for n in transposes])
    replaced = 0
    for node in transposes:
        shape = shapes[node.input[0]]
        perm = next(a.ints for a in node.attribute if a.name == "perm")
        if [a for a in perm if shape[a] != 1] != [a for a in range(len(shape)) if shape[a] != 1]:
            continue  # it moves data
        target = f"{node.output[0]}_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array([shape[a] for a in perm], np.int64), target))
        reshape = helper.make_node("Reshape", [node.input[0], target], list(node.output), name=f"{node.name}_as_reshape")
        node.CopyFrom(reshape)
        replaced += 1
    return model, replaced


def without_qlinear_adds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every QLinearAdd skipped (its first input read instead): timing only."""
    model = _copy(model)
    adds = [n for n in model.graph.node if n.op_type == "QLinearAdd"]
    for add in adds:
        for node in model.graph.node:
            node.input[:] = [add.input[0] if i == add.output[0] else i for i in node.input]
        for output in model.graph.output:
            if output.name == add.output[0]:
                raise SystemExit(f"a QLinearAdd writes the graph output {output.name}: cannot skip it")
        model.graph.node.remove(add)
    return model, len(adds)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def floor(name: str, batch: int, threads: int, folder: Path, budget: float) -> list[tuple[str, int, float, float]]:
    """(step, nodes, int8 ms, int8 / fp32) for each step of cutting down ``name``'s int8 graph."""
    import onnxopt
    from onnxopt.bench import bench

    model, calib, test, _ = model_data(name, folder)
    with np.load(test) as npz:
        feed = {k: npz[k][:batch] for k in npz.files if k != "labels"}
    int8 = folder / f"{name}_b{batch}t{threads}.int8.onnx"
    result = onnxopt.optimize(model, ["simplify", "fold-bn", "share-init", "quantize"], calibration=calib,
                              data=feed, validate=False, latency=True, threads=threads, latency_budget=0.5)
    result.save(int8)
    fp32_graph = optimized_graph(model, folder / f"{name}_t{threads}.fp32.ort.onnx", threads)
    graph = onnx.load(optimized_graph(int8, folder / f"{int8.stem}.ort.onnx", threads))
    no_transposes, _ = without_layout_transposes(graph, feed)
    no_adds, _ = without_qlinear_adds(no_transposes)
    rows = []
    for step, proto in zip(STEPS, (graph, no_transposes, no_adds)):
        path = folder / f"{int8.stem}.{STEPS.index(step)}.onnx"
        onnx.save(proto, path)
        timed = bench(str(path), str(fp32_graph), data=feed, threads=threads, optimization="disabled",
                      budget_seconds=budget)
        rows.append((step, len(proto.graph.node), timed.candidate.median_ms, timed.ratio))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits", help="comma-separated: digits or zoo models (default digits)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts (default 1,2)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per paired timing (default 6)")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    print(f"onnxruntime {ort.__version__}, CPU, batch {args.batch}; int8 time / fp32 time (both onnxruntime's "
          "optimized graphs, run with optimizations off)")
    print("| model | threads | int8 graph | nodes | int8 ms | × fp32 |")
    print("|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="onnxopt-floor-") as tmp:
        for name in args.models.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                for step, nodes, ms, ratio in floor(name, args.batch, threads, Path(tmp), args.budget):
                    print(f"| {name} | {threads} | {step} | {nodes} | {ms:.4f} | {ratio:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: weight compression on the digits CNN, without fine-tuning (issue 17).

    .venv/bin/python -m benchmarks.compress [--json out.json] [--sensitivity]
    (onnxsim rows need ``pip install onnxsim==0.8.1``; without it they are left out)

Every row starts from the trained digits CNN after ``simplify`` and ``fold-bn`` (what a recipe
runs first) and applies one compression recipe; accuracy is top-1 on the 540 held-out images of
``models/digits/digits_test.npz`` under onnxruntime (default session options: the decoders are
constant-folded at load). Sizes from ``onnxopt.compressed_size``: the weights (initializers,
codebooks, codes, sparse values and indices) serialized, raw and gzip -9, and the Deep Compression
storage figure; ``x`` is the fp32 weights' gzip -9 size over the row's. The anchor is onnxsim
0.8.1: ``quantize_weight_only_kmeans`` (per-layer k-means codebook read by Gather; MatMul/Gemm
layers only) and ``apply_magnitude_pruning`` (zeros stored dense).

``--sensitivity``: each uniform setting against levels per layer chosen by measured sensitivity
(``onnxopt.sensitivity``) at the same bytes of the layers' weights, sensitivity measured on the 180
calibration images (no labels: 1 - the worst cosine per sample), accuracy on the 540 test images.
"""

from __future__ import annotations

import argparse
import json
import time
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


def _sensitivity_rows(x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Uniform settings against levels per layer by measured sensitivity at the same stored size:
    sensitivity measured on the calibration split (no labels: 1 - worst cosine per sample), accuracy
    on the held-out test split, which selects nothing."""
    from onnxopt.data import load_data
    from onnxopt.runtime import ModelSnapshot
    from onnxopt.sensitivity import choose_levels, keep_faster

    rows = []
    start = _base()
    calibration = load_data(DIGITS / "digits_calib.npz", start)
    original = ModelSnapshot(start)
    try:
        for uniform in (SparsifyWeights(0.5), SparsifyWeights(0.7), SparsifyWeights(0.8), ClusterWeights(bits=3),
                        ClusterWeights(bits=2), LowRankFactorize(energy=0.9, min_params=100)):
            template = type(uniform)(min_params=100) if isinstance(uniform, LowRankFactorize) else type(uniform)()
            model = uniform(_base()).model
            level = getattr(uniform, uniform.LEVEL_FIELD)
            started = time.perf_counter()
            search = choose_levels(start, template, original, calibration, like=uniform)
            rows.append(_row(f"{uniform.name} {level:g} uniform", model, x, y,
                             {"layer_bytes": search.details["target_bytes"]}))
            if isinstance(uniform, LowRankFactorize):
                search = keep_faster(start, template, search, {"input": x[:32]})
            seconds = time.perf_counter() - started
            chosen = template.at_levels(search.per_layer)
            model = chosen(_base()).model
            rows.append(_row(f"{uniform.name} auto at that size", model, x, y, {
                "layer_bytes": search.details["bytes_after"],
                "levels": {u: r["level"] for u, r in search.details["layers"].items()},
                "latency_us": {u: r.get("latency_us") for u, r in search.details["layers"].items() if r.get("latency_us")},
                "sessions": search.details["sessions"], "seconds": round(seconds, 1)}))
    finally:
        original.close()
    return rows


def _row(name: str, model: ir.Model | onnx.ModelProto, x: np.ndarray, y: np.ndarray, extra: dict) -> dict:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    sizes = compressed_sizes(proto)
    return {"recipe": name, "accuracy": _accuracy(proto, x, y), **{k: v for k, v in sizes.items() if k != "deep_compression"},
            **extra}


def _print_sensitivity(rows: list[dict]) -> None:
    print(f"{'recipe':28} {'acc %':>6} {'layers B':>9} {'gzip -9':>8} {'DeepComp B':>10}  levels")
    for r in rows:
        print(f"{r['recipe']:28} {100 * r['accuracy']:6.2f} {r['layer_bytes']:9,} {r['weight_gzip9']:8,} "
              f"{r['deep_compression_bytes']:10,}  {r.get('levels', '')} {r.get('latency_us', '')}")


def _print_recipes(rows: list[dict]) -> None:
    ref = rows[0]["weight_gzip9"]
    print(f"{'recipe':34} {'acc %':>6} {'weights B':>10} {'gzip -9':>8} {'x':>6} {'DeepComp B':>10} {'file B':>8}")
    for r in rows:
        print(f"{r['recipe']:34} {100 * r['accuracy']:6.2f} {r['weight_bytes']:10,} {r['weight_gzip9']:8,} "
              f"{ref / r['weight_gzip9']:6.1f} {r['deep_compression_bytes']:10,} {r['file_bytes']:8,}")


def resnet50(seed: int = 0) -> ir.Model:
    """ResNet-50 of the onnx package's light test data with random weights, BatchNorm folded.

    The light model builds every parameter by a ``ConstantOfShape`` of one value (its weights rank 1,
    which any factorization reproduces exactly): each Conv and Gemm weight here is a He-normal random
    tensor under ``seed``, every other parameter keeps its one value, all as initializers."""
    import os

    from onnxopt.passes import FoldBatchNorm, Simplify

    path = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    model = ir.load(path)
    rng = np.random.default_rng(seed)
    weights = {n.inputs[1].name for n in model.graph if n.op_type in ("Conv", "Gemm")}
    for node in list(model.graph):
        if node.op_type != "ConstantOfShape":
            continue
        shape = tuple(int(d) for d in node.inputs[0].const_value.numpy())
        out = node.outputs[0]
        if out.name in weights:
            fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[-1]
            array = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        else:
            array = np.full(shape, node.attributes["value"].value.numpy().reshape(-1)[0], np.float32)
        value = ir.Value(name=out.name + "_init", const_value=ir.tensor(array, name=out.name + "_init"),
                         shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
        model.graph.register_initializer(value)
        out.replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
    model.graph.inputs[:] = [v for v in model.graph.inputs if v.uses() and v.const_value is None]
    Simplify()(model)
    FoldBatchNorm()(model)
    return model


def resnet_rows(ratios=(0.8, 0.5), threads: int = 1, budget: float = 3.0) -> list[dict]:
    """ResNet-50 (random weights: MACs, parameters and latency only) factorized at each ratio: the
    layers whose two kernels ran slower than their one (``onnxopt.sensitivity.measure_latency``, batch
    1, one thread), the model with only the faster ones kept (what ``keep_faster`` keeps), those
    layers timed again in a second profiled run (none should be slower), and the whole model's latency
    against fp32 (``compare_latency``)."""
    from onnxopt.latency import compare_latency
    from onnxopt.profiling import named_nodes
    from onnxopt.runtime import ModelSnapshot
    from onnxopt.sensitivity import measure_latency
    from onnxopt.stats import model_stats

    base = named_nodes(resnet50())
    feed = {base.graph.inputs[0].name: np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    before = model_stats(base)
    base_snapshot = ModelSnapshot(base)
    rows = []
    for ratio in ratios:
        all_layers = LowRankFactorize(ratio=ratio)
        model = all_layers(base.clone()).model
        times = measure_latency(base, model, all_layers.details["layers"], feed, threads=threads)
        faster = [u for u, (one, two) in times.items() if two < one]
        kept = LowRankFactorize(ratio=ratio, layers=faster)
        kept_model = kept(base.clone()).model
        again = measure_latency(base, kept_model, kept.details["layers"], feed, threads=threads)
        row = {"ratio": ratio, "factorized": len(all_layers.details["layers"]), "timed": len(times),
               "slower_all": sorted(u for u, (one, two) in times.items() if two >= one), "kept_layers": len(faster),
               "slower_again": sorted(u for u, (one, two) in again.items() if two >= one)}
        for label, m in (("all", model), ("kept", kept_model)):
            stats = model_stats(m)
            snapshot = ModelSnapshot(m)
            lat = compare_latency(base_snapshot, snapshot, feed, threads=threads, budget_seconds=budget)
            snapshot.close()
            row[label] = {"params_ratio": stats.params / before.params, "macs_ratio": stats.macs / before.macs,
                          "latency": [lat.ratio, lat.ratio_low, lat.ratio_high]}
        rows.append(row)
        print(f"ratio {ratio}: factorized {row['factorized']} (timed {row['timed']}), slower {len(row['slower_all'])}; "
              f"kept {row['kept_layers']}, slower when timed again {len(row['slower_again'])} {row['slower_again'][:4]}; "
              + "; ".join(f"{k}: params {row[k]['params_ratio']:.3f} MACs {row[k]['macs_ratio']:.3f} "
                          f"latency {row[k]['latency'][0]:.2f} [{row[k]['latency'][1]:.2f}, {row[k]['latency'][2]:.2f}]"
                          for k in ("all", "kept")), flush=True)
    base_snapshot.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--sensitivity", action="store_true",
                        help="uniform settings against levels per layer by measured sensitivity at the same size")
    parser.add_argument("--resnet", action="store_true",
                        help="lowrank on ResNet-50 (random weights): per-layer kernel times, the faster layers kept")
    args = parser.parse_args()
    if args.resnet:
        rows = resnet_rows()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    data = np.load(DIGITS / "digits_test.npz")
    x, y = data["input"], data["labels"]
    if args.sensitivity:
        rows = _sensitivity_rows(x, y)
        _print_sensitivity(rows)
    else:
        rows = []
        for name, passes in _recipes():
            model = _base()
            for p in passes:
                p(model)
            rows.append(_row(name, model, x, y, {}))
        for name, anchor in _anchor_recipes():
            rows.append(_row(name, anchor(ir.to_proto(_base())), x, y, {}))
        _print_recipes(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

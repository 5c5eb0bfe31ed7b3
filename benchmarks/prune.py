"""Benchmark: onnxopt's structured pruning against Torch-Pruning (digits CNN) and onnxsim's
``apply_structured_pruning`` (ResNet-50, DenseNet-121).

    python -m venv --system-site-packages .bench && .bench/bin/pip install torch-pruning 'onnxsim==0.8.1'
    .bench/bin/python -m benchmarks.prune [--ratio 0.5] [--budget 20] [--json out.json]

1. Digits residual CNN (trained): ``--prune 0.5 --importance l1`` against Torch-Pruning's
   ``BasePruner`` with ``GroupMagnitudeImportance(p=1)`` on the same torch model with the same
   weights, per-group ratio 0.5, the first conv and the classifier ignored (onnxopt protects the
   first layer by default; the classifier's outputs are the graph's). Both results are exported /
   BN-folded the same way and counted by ``onnxopt.stats``; the kept weights are compared tensor by
   tensor (same channels kept), and accuracy is measured on the held-out test split.
2. ResNet-50 and DenseNet-121 (the onnx package's, random weights): onnxopt ``prune`` (l1, ratio)
   then ``fold-bn``, and onnxsim's ``apply_structured_pruning(model, ratio, "l1")`` on the BN-folded
   original, each against that BN-folded original: parameters, MACs, onnxruntime CPU latency ratio
   (interleaved, one thread, ``onnxopt.latency``), and validity (onnx.checker + an onnxruntime run).

Torch-Pruning and onnxsim are needed only here; onnxopt itself never imports them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.latency import compare_latency
from onnxopt.passes import FoldBatchNorm, PruneChannels, Simplify
from onnxopt.passes._base import constant_array
from onnxopt.runtime import ModelSnapshot, create_session
from onnxopt.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def _fold(model: ir.Model) -> ir.Model:
    Simplify()(model)
    FoldBatchNorm()(model)
    return model


def _accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    session = create_session(model, optimization="disabled")
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def _valid(model: ir.Model, feed) -> str:
    try:
        onnx.checker.check_model(ir.to_proto(model))
        out = create_session(model).run(None, feed)
        return "valid" if all(np.isfinite(o).all() for o in out) else "non-finite output"
    except Exception as exc:  # the anchor's result may be broken: say how
        return f"INVALID: {' '.join(str(exc).split())[:120]}"


# --- 1. digits: onnxopt against Torch-Pruning

def digits(ratio: float) -> dict:
    import torch
    import torch_pruning as tp

    from models.digits.train import DigitsCNN
    from models.zoo import export_module

    proto = onnx.load(str(DIGITS / "digits_cnn.onnx"))
    test = np.load(DIGITS / "digits_test.npz")
    x, y = test["input"], test["labels"]

    # onnxopt: prune with BN present (its |scale| is part of the group L1, as in Torch-Pruning), then fold.
    ours = ir.from_proto(proto)
    Simplify()(ours)
    pruner = PruneChannels(ratio=ratio, importance="l1")
    t = time.perf_counter()
    pruner(ours)
    ours_seconds = time.perf_counter() - t
    ours_unfolded = ours.clone()
    FoldBatchNorm()(ours)

    # Torch-Pruning on the same weights.
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    simplified = ir.from_proto(proto)
    Simplify()(simplified)
    for node in simplified.graph:  # BN inputs by role: the exporter shares some (through Identity)
        if node.op_type == "BatchNormalization":
            prefix = node.inputs[1].name.rsplit(".", 1)[0]
            for role, value in zip(("weight", "bias", "running_mean", "running_var"), node.inputs[1:5]):
                arrays.setdefault(f"{prefix}.{role}", constant_array(value))
    net = DigitsCNN().eval()
    state = net.state_dict()
    net.load_state_dict({k: torch.from_numpy(arrays[k].copy()) if k in arrays else v for k, v in state.items()})
    example = torch.from_numpy(x[:1])
    tp_pruner = tp.pruner.BasePruner(
        net, example, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[net.features[0][0], net.head[2]],
    )
    t = time.perf_counter()
    tp_pruner.step()
    tp_seconds = time.perf_counter() - t
    theirs_unfolded = ir.from_proto(onnx.load_from_string(export_module(net.eval(), example)))
    Simplify()(theirs_unfolded)
    theirs = _fold(theirs_unfolded.clone())

    # Same channels kept: every pruned weight equal, tensor by tensor (ours are named '<name>_pruned').
    def weights(model: ir.Model, strip: str) -> dict[str, np.ndarray]:
        return {k.removesuffix(strip): v.const_value.numpy() for k, v in model.graph.initializers.items()}

    a, b = weights(ours_unfolded, "_pruned"), weights(theirs_unfolded, "")
    compared = [k for k in b if k in a and k.endswith("weight")]
    same = [k for k in compared if a[k].shape == b[k].shape and np.array_equal(a[k], b[k])]
    original = _fold(ir.from_proto(proto))
    s0, s1, s2 = model_stats(original), model_stats(ours), model_stats(theirs)
    return {
        "ratio": ratio,
        "original": {"params": s0.params, "macs": s0.macs, "accuracy": _accuracy(original, x, y)},
        "onnxopt": {"params": s1.params, "macs": s1.macs, "accuracy": _accuracy(ours, x, y), "seconds": ours_seconds,
                    "removed": pruner.details["removed"]},
        "torch_pruning": {"params": s2.params, "macs": s2.macs, "accuracy": _accuracy(theirs, x, y), "seconds": tp_seconds},
        "weights_compared": len(compared),
        "weights_identical": len(same),
        "differing": sorted(set(compared) - set(same)),
    }


# --- 2. ResNet-50 / DenseNet-121: onnxopt against onnxsim

def imagenet(name: str, ratio: float, budget: float) -> dict:
    from onnxsim.pruning import apply_structured_pruning

    from models.light import load_light, random_input

    proto = load_light(name)
    feed = random_input(proto)
    base = _fold(ir.from_proto(proto))
    base_stats = model_stats(base)
    rows = {"original (BN folded)": {"params": base_stats.params, "macs": base_stats.macs, "valid": _valid(base, feed)}}

    ours = ir.from_proto(proto)
    Simplify()(ours)
    t = time.perf_counter()
    PruneChannels(ratio=ratio, importance="l1")(ours)
    FoldBatchNorm()(ours)
    rows["onnxopt"] = {"model": ours, "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    try:
        pruned = apply_structured_pruning(ir.to_proto(base), ratio, "l1")
        pruned.graph.ClearField("value_info")  # its recorded shapes are stale: they would stop MAC counting
        sim = ir.from_proto(pruned)
        rows["onnxsim"] = {"model": sim, "seconds": time.perf_counter() - t}
    except Exception as exc:
        rows["onnxsim"] = {"error": " ".join(str(exc).split())[:200]}

    snap_base = ModelSnapshot(base)
    for tool in ("onnxopt", "onnxsim"):
        row = rows[tool]
        model = row.pop("model", None)
        if model is None:
            continue
        stats = model_stats(model)
        row.update(params=stats.params, macs=stats.macs, valid=_valid(model, feed),
                   params_ratio=stats.params / base_stats.params,
                   macs_ratio=(stats.macs / base_stats.macs) if stats.macs and base_stats.macs else None)
        if row["valid"] == "valid":
            snap = ModelSnapshot(model)
            lat = compare_latency(snap_base, snap, feed, budget_seconds=budget)
            row.update(latency_ratio=lat.ratio, latency_interval=[lat.ratio_low, lat.ratio_high],
                       median_ms=[lat.median_a_ms, lat.median_b_ms])
            snap.close()
    snap_base.close()
    return rows


def _print_digits(d: dict) -> None:
    print(f"digits residual CNN, --prune {d['ratio']} --importance l1 (per group, first conv and classifier kept)")
    print(f"{'':16s}{'params':>10s}{'MACs':>10s}{'accuracy':>10s}{'seconds':>9s}")
    for key in ("original", "onnxopt", "torch_pruning"):
        r = d[key]
        print(f"{key:16s}{r['params']:>10d}{r['macs']:>10d}{r['accuracy'] * 100:>9.2f}%"
              + (f"{r['seconds']:>9.3f}" if "seconds" in r else ""))
    print(f"kept weights identical to Torch-Pruning's: {d['weights_identical']} of {d['weights_compared']} tensors"
          + (f" (differ: {', '.join(d['differing'])})" if d["differing"] else ""))


def _print_imagenet(name: str, rows: dict, ratio: float) -> None:
    print(f"\n{name}, ratio {ratio}, l1, against the BN-folded original (onnxruntime CPU, 1 thread)")
    print(f"{'':22s}{'params':>12s}{'x':>7s}{'MACs x':>8s}{'latency x':>11s}{'95% interval':>18s}{'s':>7s}  validity")
    for tool, r in rows.items():
        if "error" in r:
            print(f"{tool:22s}  failed: {r['error']}")
            continue
        interval = r.get("latency_interval")
        print(
            f"{tool:22s}{r['params']:>12d}{r.get('params_ratio', 1.0):>7.3f}"
            f"{(r.get('macs_ratio') or 1.0):>8.3f}{r.get('latency_ratio', 1.0):>11.3f}"
            f"{(f'[{interval[0]:.3f}, {interval[1]:.3f}]' if interval else ''):>18s}"
            f"{r.get('seconds', 0.0):>7.2f}  {r['valid']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of latency timing per model")
    parser.add_argument("--models", default="resnet50,densenet121")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)
    results: dict = {"digits": digits(args.ratio)}
    _print_digits(results["digits"])
    for name in [m for m in args.models.split(",") if m]:
        results[name] = imagenet(name, args.ratio, args.budget)
        _print_imagenet(name, results[name], args.ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: dynamic int8 and weight-only int4 on the zoo transformer, against onnxruntime's quantizers (issue 15).

    .venv/bin/python -m benchmarks.transformers [--budget 2] [--json out.json]
    .venv/bin/python -m benchmarks.transformers --encoder [--budget 1.5] [--json out.json]

``--encoder`` runs the real sentence encoder with real sentences instead (``benchmarks.sentence_encoder``).

Every row starts from ``models/zoo/transformer_encoder.onnx`` after ``simplify`` (which folds the
exporter's weight Transposes, so that every projection reads a constant weight) and quantizes it one
way: onnxopt's ``quantize-dynamic`` (per-channel int8, 8-bit weights; activations per row, the default, and per tensor) and ``quantize-int4`` (block 32:
RTN symmetric, HQQ, GPTQ calibrated on 16 other random sequences of 64), onnxruntime's ``quantize_dynamic`` (per-channel QInt8) and
``MatMulNBitsQuantizer`` (RTN symmetric with the Gather table, HQQ on MatMuls only: its HQQ refuses
Gather). Figures per input shape (batch x sequence of random token ids): cosine per sample of the
``[seq, vocab]`` logits against fp32 (mean and worst), the file size over fp32's, and the latency
over fp32's (``onnxopt.latency.compare_latency``: interleaved, one thread, median ratio).
Name the CPU beside any figure copied from here.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.latency import compare_latency
from onnxopt.passes import QuantizeDynamic, QuantizeWeightsInt4, Simplify
from onnxopt.runtime import ModelSnapshot

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo" / "transformer_encoder.onnx"
SHAPES = ((1, 16), (1, 64), (8, 64))  # the position table holds 64 positions: no longer sequence


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ours(base: Path, pass_) -> ir.Model:
    model = ir.load(base)
    pass_(model)
    return model


def _ours_gptq(base: Path, block_size: int = 32) -> ir.Model:
    """GPTQ with X^T X from 16 calibration samples of random ids (seed 1: not the evaluation feeds)."""
    from onnxopt.pipeline import gptq_grams

    model = ir.load(base)
    pass_ = QuantizeWeightsInt4(block_size=block_size, method="gptq")
    calibration = {"input": np.random.default_rng(1).integers(0, 100, (16, 64)).astype(np.int64)}
    pass_.calibration_gram = gptq_grams(model, pass_, calibration, {}, 8, "cpu")
    pass_(model)
    return model


def _ort_dynamic(base: Path, tmp: Path) -> ir.Model:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(base), str(tmp / "ort_dynamic.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    return ir.load(tmp / "ort_dynamic.onnx")


def _ort_nbits(base: Path, algorithm: str) -> ir.Model:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"))
    else:
        config = HQQWeightOnlyQuantConfig(block_size=32, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(base), algo_config=config)
    quantizer.process()
    return ir.from_proto(quantizer.model.model)


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per row and shape")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--encoder", action="store_true", help="all-MiniLM-L6-v2 with real sentences (benchmarks.sentence_encoder)")
    parser.add_argument("--only", action="append", help="--encoder: only this row (repeatable)")
    args = parser.parse_args(argv)
    if args.encoder:
        from benchmarks.sentence_encoder import run

        return run(budget=args.budget, json_path=args.json, only=args.only)
    tmp = Path(tempfile.mkdtemp(prefix="onnxopt-bench-"))
    fp32 = ir.load(ZOO)
    Simplify()(fp32)
    base = tmp / "fp32.onnx"
    ir.save(fp32, base)
    rows = {
        "onnxopt int8-dynamic (per row)": lambda: _ours(base, QuantizeDynamic()),
        "onnxopt int8-dynamic per tensor": lambda: _ours(base, QuantizeDynamic(activations="tensor")),
        "onnxruntime quantize_dynamic": lambda: _ort_dynamic(base, tmp),
        "onnxopt int4 RTN b32": lambda: _ours(base, QuantizeWeightsInt4(block_size=32, method="rtn")),
        "onnxopt int4 HQQ b32": lambda: _ours(base, QuantizeWeightsInt4(block_size=32, method="hqq")),
        "onnxopt int4 GPTQ b32": lambda: _ours_gptq(base),
        "onnxruntime MatMulNBits RTN b32": lambda: _ort_nbits(base, "rtn"),
        "onnxruntime MatMulNBits HQQ b32": lambda: _ort_nbits(base, "hqq"),
    }
    fp32_size = len(ir.to_proto(fp32).SerializeToString())
    fp32_session, fp32_snapshot = _session(fp32), ModelSnapshot(fp32)
    rng = np.random.default_rng(0)
    feeds = {shape: {"input": rng.integers(0, 100, shape).astype(np.int64)} for shape in SHAPES}
    refs = {shape: fp32_session.run(None, feed)[0] for shape, feed in feeds.items()}
    results = []
    print(f"zoo transformer_encoder (simplified), CPU: {_cpu()}, onnxruntime {ort.__version__}, 1 thread")
    print(f"{'row':34s} {'shape':>7s} {'cos mean':>9s} {'cos worst':>9s} {'file':>6s} {'latency':>14s}")
    for name, make in rows.items():
        model = make()
        size = len(ir.to_proto(model).SerializeToString()) / fp32_size
        session, snapshot = _session(model), ModelSnapshot(model)
        for shape, feed in feeds.items():
            y, ref = session.run(None, feed)[0], refs[shape]
            a, b = y.reshape(len(y), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            lat = compare_latency(fp32_snapshot, snapshot, feed, threads=1, budget_seconds=args.budget)
            row = {"row": name, "batch": shape[0], "seq": shape[1], "cosine_mean": float(cos.mean()),
                   "cosine_worst": float(cos.min()), "file_ratio": size, "latency_ratio": lat.ratio,
                   "latency_ci": [lat.ratio_low, lat.ratio_high]}
            results.append(row)
            print(f"{name:34s} {shape[0]:>2d}x{shape[1]:<4d} {cos.mean():9.5f} {cos.min():9.5f} {size:6.3f} "
                  f"{lat.ratio:5.2f} [{lat.ratio_low:.2f},{lat.ratio_high:.2f}]", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": _cpu(), "rows": results}, indent=1))
    return results


if __name__ == "__main__":
    main()

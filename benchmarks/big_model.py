"""Benchmark: peak memory of onnxopt on a model whose weights (external data) are larger than 2 GB.

    python -m benchmarks.big_model [--gb 2.3] [--folder /tmp/bigmodel-bench] [--passes simplify,fold-bn,share-init]
                                   [--keep] [--stages]

``build_model`` writes an MLP of alternating ``rows x cols`` / ``cols x rows`` MatMul weights to an
ONNX file with one external-data file, tensor by tensor (never the whole model in memory): a
BatchNormalization after some layers and a per-channel Mul after others (work for ``fold-bn``),
and some weights equal byte for byte to an earlier one (work for ``share-init``).

The benchmark runs the command line (``python -m onnxopt MODEL --passes ...``, validation on
synthetic inputs, latency on) in a fresh subprocess under ``/usr/bin/time``-like accounting
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and prints peak RSS / weight bytes and seconds.
With ``--stages`` a second run calls ``optimize()`` with a progress callback and prints the peak
RSS of each stage (load, each pass, validation, latency, save), resetting the kernel's high-water
mark between stages (``/proc/self/clear_refs``).

Memory-mapped weights count in RSS once their pages are read: the figure is what the process
holds, not what it could give back under pressure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]


def build_model(path: str | os.PathLike, *, layers: int = 18, rows: int = 4096, cols: int = 8192,
                bn_every: int = 3, mul_every: int = 5, dup_every: int = 4, seed: int = 0) -> int:
    """Write the model to ``path`` (data beside it in ``<name>.data``) and return its weight bytes.

    Layer ``i`` multiplies by a weight of ``rows x cols`` (even ``i``) or ``cols x rows`` (odd);
    every ``bn_every``-th layer is followed by a BatchNormalization, every ``mul_every``-th by a
    per-channel Mul; every ``dup_every``-th weight (from the third) repeats the one two layers
    earlier (same shape). Each tensor is generated, written and dropped in turn.
    """
    path = Path(path)
    data_name = f"{path.name}.data"
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []
    offset = 0
    total = 0
    written: dict[int, tuple[int, int]] = {}  # layer -> (offset, length) of its weight in the file

    def external(name: str, shape, at: int, length: int) -> TensorProto:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(at)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    with open(path.parent / data_name, "wb") as f:
        def put(name: str, array: np.ndarray) -> TensorProto:
            nonlocal offset, total
            array = np.ascontiguousarray(array, dtype=np.float32)
            at = offset
            f.write(array.tobytes())
            offset += array.nbytes
            total += array.nbytes
            return external(name, array.shape, at, array.nbytes)

        x = "x"
        width = rows
        for i in range(layers):
            k, n = (rows, cols) if i % 2 == 0 else (cols, rows)
            name = f"w{i}"
            if i >= 2 and dup_every and i % dup_every == 0:
                at, length = written[i - 2]
                initializers.append(external(name, (k, n), at, length))  # the same bytes, a second tensor
                total += length
            else:
                w = rng.standard_normal((k, n), dtype=np.float32)
                w *= np.float32(1.0 / np.sqrt(k))
                initializers.append(put(name, w))
                written[i] = (offset - k * n * 4, k * n * 4)
                del w
            y = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, name], [y], name=f"matmul{i}"))
            x = y
            if bn_every and i % bn_every == 0:
                params = [rng.uniform(0.5, 1.5, n), rng.uniform(-0.1, 0.1, n), rng.uniform(-0.1, 0.1, n),
                          rng.uniform(0.5, 1.5, n)]
                names = [f"bn{i}_{p}" for p in ("scale", "bias", "mean", "var")]
                initializers += [put(nm, p) for nm, p in zip(names, params)]
                nodes.append(helper.make_node("BatchNormalization", [x, *names], [f"bn{i}"], name=f"bn{i}", epsilon=1e-5))
                x = f"bn{i}"
            if mul_every and i % mul_every == 1:
                initializers.append(put(f"mul{i}_c", rng.uniform(0.5, 1.5, n)))
                nodes.append(helper.make_node("Mul", [x, f"mul{i}_c"], [f"mul{i}"], name=f"mul{i}"))
                x = f"mul{i}"
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
            width = n
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    graph.node[0].input[0] = "input"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return total


def layers_for(gigabytes: float, rows: int, cols: int) -> int:
    """The layer count whose weights come closest to ``gigabytes`` (10^9 bytes)."""
    return max(2, round(gigabytes * 1e9 / (rows * cols * 4)))


# Run in a subprocess: optimize() with a progress callback; the peak RSS of each stage, the
# high-water mark reset between stages (Linux: writing 5 to clear_refs resets VmHWM).
_STAGES = r"""
import json, sys, time
import onnxopt

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

stages, current, t = [], ["load"], [time.perf_counter()]
def close(next_stage):
    now = time.perf_counter()
    stages.append((current[0], hwm(), now - t[0]))
    reset()
    current[0], t[0] = next_stage, now
def progress(stage, done, total):
    name = stage if not stage.startswith(("validate", "latency")) else stage.split()[0]
    if name != current[0]:
        close(name)
reset()
result = onnxopt.optimize(sys.argv[1], sys.argv[3].split(","), progress=progress)
close("save")
result.save(sys.argv[2])
close("end")
print(json.dumps({"stages": stages, "ok": result.ok}))
"""


def run_cli(model: Path, output: Path, passes: str | None) -> dict:
    """``python -m onnxopt`` in a subprocess: its peak RSS and wall seconds."""
    command = [sys.executable, "-m", "onnxopt", str(model), "-o", str(output), "-q"]
    if passes:
        command += ["--passes", passes]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if peak < before * 1024:
        raise RuntimeError("ru_maxrss of children did not grow: run one benchmark per process")
    return {"rc": done.returncode, "seconds": seconds, "peak_rss": peak, "stderr": done.stderr[-2000:]}


def run_stages(model: Path, output: Path, passes: str) -> list:
    done = subprocess.run([sys.executable, "-c", _STAGES, str(model), str(output), passes], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["stages"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.3, help="weight gigabytes (10^9 bytes) to generate")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--folder", default="/tmp/bigmodel-bench")
    parser.add_argument("--passes", default="simplify,fold-bn,share-init",
                        help="passes of the measured run; 'default' for the command line's default")
    parser.add_argument("--stages", action="store_true", help="also print the peak RSS of each stage")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and output")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "big.onnx"
    try:
        layers = layers_for(args.gb, args.rows, args.cols)
        start = time.perf_counter()
        weights = build_model(model, layers=layers, rows=args.rows, cols=args.cols)
        print(f"generated {layers} layers, {weights / 1e9:.2f} GB of weights in {time.perf_counter() - start:.0f} s")
        passes = None if args.passes == "default" else args.passes
        result = run_cli(model, folder / "big.opt.onnx", passes)
        shown = args.passes if passes else "default passes"
        print(f"{shown}: exit {result['rc']}, {result['seconds']:.1f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB "
              f"= {result['peak_rss'] / weights:.2f} x weight bytes")
        if result["rc"] != 0:
            print(result["stderr"])
        if args.stages:
            for f in folder.glob("big.opt.onnx*"):
                f.unlink()
            stage_passes = passes or "simplify,fold-bn,prune,share-init"
            for name, peak, seconds in run_stages(model, folder / "big.opt.onnx", stage_passes):
                print(f"  {name:<24} peak RSS {peak / 1e9:6.2f} GB = {peak / weights:4.2f} x   {seconds:6.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

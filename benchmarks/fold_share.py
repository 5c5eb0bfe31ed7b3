"""Benchmark: ``simplify,fold-bn,share-init`` against onnxoptimizer and onnxslim on ResNet-50 and DenseNet-121.

    pip install -e '.[bench]'
    python -m benchmarks.fold_share [--reps 5] [--models resnet50,densenet121]

Each tool runs in a fresh subprocess (load the file, optimize, save), in interleaved rounds whose
order is shuffled, so that drift on a shared machine hits every tool alike; the table shows
medians. Wall time covers load + optimize + save, not Python's imports; peak memory is the
subprocess's maximum RSS. Output error is measured under onnxruntime against the original with
graph optimizations disabled, on one random input. Ratios are onnxopt / anchor.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]

# The code each tool runs in its subprocess: argv = input, output; prints the seconds it took.
TOOLS = {
    "onnxopt": """
import sys, time
import onnxopt
t = time.perf_counter()
result = onnxopt.optimize(sys.argv[1], ["simplify", "fold-bn", "share-init"], validate=False, latency=False)
result.save(sys.argv[2])
print(time.perf_counter() - t)
""",
    "onnxoptimizer": """
import sys, time
import onnx, onnxoptimizer
t = time.perf_counter()
model = onnxoptimizer.optimize(onnx.load(sys.argv[1]), ["fuse_bn_into_conv", "eliminate_duplicate_initializer"])
onnx.save(model, sys.argv[2])
print(time.perf_counter() - t)
""",
    "onnxslim": """
import sys, time
import onnxslim
t = time.perf_counter()
onnxslim.slim(sys.argv[1], sys.argv[2])
print(time.perf_counter() - t)
""",
}
ANCHOR = "onnxslim"


def _run_tool(tool: str, src: Path, dst: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one run of ``tool`` in a fresh interpreter."""
    wrapper = (
        "import sys\n"
        f"exec(compile({TOOLS[tool]!r}, '<{tool}>', 'exec'))\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, str(src), str(dst)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    return float(lines[-2]), float(lines[-1])


def _max_error(reference: Path, candidate: Path) -> float:
    """Max |candidate - reference| relative to max|reference| over all outputs, one random input."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(reference), opts, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
        for i in ref.get_inputs()
    }
    worst = 0.0
    for r, c in zip(ref.run(None, feed), cand.run(None, feed)):
        worst = max(worst, float(np.abs(r - c).max() / max(np.abs(r).max(), 1e-30)))
    return worst


def _batchnorms(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def benchmark(names: list[str], reps: int, workdir: Path) -> list[dict]:
    from models.light import save_light

    rows = []
    for name in names:
        src = workdir / f"{name}.onnx"
        save_light(name, src)
        times: dict[str, list[float]] = {t: [] for t in TOOLS}
        peaks: dict[str, list[float]] = {t: [] for t in TOOLS}
        order = list(TOOLS)
        for rep in range(reps):
            random.Random(rep).shuffle(order)
            for tool in order:
                seconds, peak = _run_tool(tool, src, workdir / f"{name}.{tool}.onnx")
                times[tool].append(seconds)
                peaks[tool].append(peak)
                print(f"  {name} rep {rep + 1}/{reps} {tool}: {seconds:.2f} s, {peak:.0f} MB", file=sys.stderr)
        for tool in TOOLS:
            out = workdir / f"{name}.{tool}.onnx"
            rows.append(
                dict(
                    model=name,
                    tool=tool,
                    seconds=float(np.median(times[tool])),
                    peak_mb=float(np.median(peaks[tool])),
                    bn_before=_batchnorms(src),
                    bn_left=_batchnorms(out),
                    bytes=out.stat().st_size,
                    input_bytes=src.stat().st_size,
                    max_rel_error=_max_error(src, out),
                )
            )
    return rows


def render(rows: list[dict]) -> str:
    header = ["model", "tool", "time s", "vs anchor", "peak MB", "vs anchor", "BN left", "bytes", "max rel err"]
    table = []
    for row in rows:
        anchor = next(r for r in rows if r["model"] == row["model"] and r["tool"] == ANCHOR)
        table.append(
            [
                row["model"], row["tool"], f"{row['seconds']:.2f}", f"{row['seconds'] / anchor['seconds']:.2f}x",
                f"{row['peak_mb']:.0f}", f"{row['peak_mb'] / anchor['peak_mb']:.2f}x",
                f"{row['bn_left']}/{row['bn_before']}", f"{row['bytes'] / 1e6:.2f}M", f"{row['max_rel_error']:.1e}",
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n(ratios: tool / {ANCHOR}, medians of interleaved runs)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default="resnet50,densenet121")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = benchmark(args.models.split(","), args.reps, Path(tmp))
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: onnxopt's ``--quantize int8`` against onnxruntime.quantization and onnxsim's ``quantize_static``.

    python -m benchmarks.quantize [--method minmax] [--models digits,mobilenet_dw,transformer_encoder,transformer_fixed]
    python -m benchmarks.quantize --memory --method entropy   # calibration peak RSS, detector, 128 vs 2,048 samples
    python -m benchmarks.quantize --cost        # time and peak RSS of the whole step on real OCR models

Every tool gets the same float model file, the same calibration samples (batches of 32) and the
same calibration method, and runs in a fresh subprocess (its wall time covers calibration and
quantization, its peak memory is the subprocess's maximum RSS). Anchors: onnxruntime's
``quantize_static`` (QDQ, per-channel int8 weights) with its default int8 activations (S8S8) and
with uint8 activations (U8S8), and ``onnxsim.quantize_static`` (0.8) when it can be imported
(``PYTHONPATH`` may point at a separate install). Quality on held-out inputs: accuracy on the
digits test split, top-1 agreement and cosine to the float model otherwise. Latency: each int8
model against the fp32 one, and onnxopt's int8 against each anchor's, paired with ``onnxopt.bench``
(interleaved blocks, median of per-block ratios; onnxruntime CPU, all graph optimizations, 1 and 2
intra-op threads without spin-waiting); ratios below 1 are faster. onnxopt's model timed at each
batch and thread count is the one its speed fallback chose there (``tuned_for``: as a user who
deploys at that setting gets it from ``--data`` at that batch and ``--threads``); its quality,
size and calibration figures are those of the run without timing (every layer int8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32

_ORT = """
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
t = time.perf_counter()
class Reader(CalibrationDataReader):
    def __init__(self): self.it = batches()
    def get_next(self): return next(self.it, None)
methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.%s,
                weight_type=QuantType.QInt8, calibrate_method=methods[method])
"""
# Each tool's quantization, run in a subprocess: argv = model, calibration .npz, method, output.
# The clock starts after the tool's imports.
TOOLS = {
    "onnxopt": """
import onnxopt
t = time.perf_counter()
result = onnxopt.optimize(model, ["simplify", "fold-bn", "share-init", "quantize"], calibration=batches(),
                          calibrate=method, validate=False, latency=False)
result.save(out)
""",
    # The command line's default (``python -m onnxopt MODEL --quantize int8 --calibration FILE``):
    # validation, latency and the speed fallback included (the cost a user pays).
    "onnxopt-cli": """
import onnxopt
t = time.perf_counter()
result = onnxopt.optimize(model, ["simplify", "fold-bn", "share-init", "quantize"], calibration=calib, calibrate=method,
                          **options)
result.save(out)
""",
    "ort-s8s8": _ORT % "QInt8",
    "ort-u8s8": _ORT % "QUInt8",
    "onnxsim": """
import onnx, onnxsim
t = time.perf_counter()
onnx.save(onnxsim.quantize_static(model, calibration_data=list(batches()), method=method), out)
""",
}
PRELUDE = """
import json, resource, sys, time
import numpy as np
model, calib, method, out, batch = sys.argv[1:6]
batch = int(batch)
limit = int(sys.argv[6]) if len(sys.argv) > 6 else 0
options = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}  # onnxopt's keyword options (--min-cosine)
if limit:  # address-space cap: a tool that needs more fails fast instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def batches():
    if calib.startswith("random:"):  # random:NAME:SAMPLES:DIMS, made batch by batch (nothing held)
        _, name, n, dims = calib.split(":")
        shape, rng = [int(d) for d in dims.split(",")], np.random.default_rng(0)
        for i in range(0, int(n), batch):
            yield {name: rng.standard_normal((min(batch, int(n) - i), *shape)).astype(np.float32)}
        return
    with np.load(calib) as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = len(next(iter(arrays.values())))
    for i in range(0, n, batch):
        yield {k: v[i:i + batch] for k, v in arrays.items()}
"""
EPILOGUE = """
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
LIGHT = ("resnet50", "squeezenet", "shufflenet", "densenet121", "inception_v1", "inception_v2")
# The anchor the goals compare against on each figure: the best of them.
ANCHORS = ("ort-s8s8", "ort-u8s8", "onnxsim")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def model_data(name: str, folder: Path, samples: int | None = None) -> tuple[Path, Path, Path, str]:
    """The float model, a calibration .npz, a test .npz and the quality measure for ``name``."""
    if name == "digits":
        d = ROOT / "models" / "digits"
        return d / "digits_cnn.onnx", d / "digits_calib.npz", d / "digits_test.npz", "accuracy"
    path = ROOT / "models" / "zoo" / f"{name}.onnx"
    calib, test = folder / f"{name}_calib.npz", folder / f"{name}_test.npz"
    n = samples or 256
    if name in LIGHT:  # the onnx package's real architectures with random weights (models/light.py)
        from models.light import load_light

        path = folder / f"{name}.onnx"
        if not path.exists():
            onnx.save(load_light(name), path)
        proto = onnx.load(path, load_external_data=False)
        spec = proto.graph.input[0]
        shape = [d.dim_value or 1 for d in spec.type.tensor_type.shape.dim[1:]]
        np.savez(calib, **{spec.name: _rng(0).standard_normal((samples or 64, *shape)).astype(np.float32)})
        np.savez(test, **{spec.name: _rng(1).standard_normal((32, *shape)).astype(np.float32)})
        return path, calib, test, "top1"
    if name == "transformer_fixed":  # the same export at static shapes (batch 1, 16 tokens), as many are shipped
        import onnx_ir as ir

        from onnxopt.passes import FixInputShapes

        path = folder / f"{name}.onnx"
        fixed = ir.load(ROOT / "models" / "zoo" / "transformer_encoder.onnx")
        FixInputShapes({"batch": 1, "seq": 16})(fixed)
        ir.save(fixed, path)
        name = "transformer_encoder"
    if name == "transformer_encoder":
        np.savez(calib, input=_rng(0).integers(0, 100, (n, 16)).astype(np.int64))
        np.savez(test, input=_rng(1).integers(0, 100, (256, 16)).astype(np.int64))
        return path, calib, test, "cosine"
    shape = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim[1:]]
    tests = 2048  # top-1 agreement on untrained logits moves by 0.4 point per sample in 256: too coarse
    if name == "detector":  # 320x320 images: 64 to calibrate, 32 to test keep each run within a minute
        n, tests = samples or 64, 32
    np.savez(calib, input=_rng(0).standard_normal((n, *shape)).astype(np.float32))
    np.savez(test, input=_rng(1).standard_normal((tests, *shape)).astype(np.float32))
    return path, calib, test, "cosine" if name == "detector" else "top1"


def fixed_batch(model: Path) -> int | None:
    """The model's batch size when its first input fixes it (the onnx architectures: 1)."""
    dim = onnx.load(model, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or None


def quantize_with(tool: str, model: Path, calib: Path | str, method: str, out: Path, limit: int = 0,
                  options: dict | None = None) -> dict:
    code = PRELUDE + TOOLS[tool] + EPILOGUE
    batch = fixed_batch(model) or BATCH
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(calib), method, str(out), str(batch), str(limit),
                           json.dumps(options or {})],
                          capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no output"])[-1]
        return {"error": tail[:90]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _session(path: Path | str, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def integer_nodes(path: Path) -> int:
    """Nodes that compute on integers in onnxruntime's optimized graph of ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return sum(n.op_type.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger")) for n in graph.node)


def quality(float_path: Path, int8_path: Path, test: Path, measure: str) -> dict:
    with np.load(test) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays.pop("labels", None)
    ref_s, q_s = _session(float_path), _session(int8_path)
    ref, got = [], []
    n = len(next(iter(arrays.values())))
    batch = fixed_batch(float_path) or BATCH
    for i in range(0, n, batch):
        feed = {k: v[i:i + batch] for k, v in arrays.items()}
        ref.append(ref_s.run(None, feed)[0])
        got.append(q_s.run(None, feed)[0])
    r, g = np.concatenate(ref), np.concatenate(got)
    r2, g2 = r.reshape(-1, r.shape[-1]).astype(np.float64), g.reshape(-1, g.shape[-1]).astype(np.float64)
    cos = float((r2 * g2).sum() / (np.linalg.norm(r2) * np.linalg.norm(g2)))
    result = {"cosine": cos, "top1": float((r2.argmax(1) == g2.argmax(1)).mean())}
    if labels is not None:
        result["accuracy"] = float((g2.argmax(1) == labels).mean())
        result["accuracy_float"] = float((r2.argmax(1) == labels).mean())
    return result


def latency(paths: dict[str, Path], feed: dict, threads: int, budget: float = 4.0) -> dict[str, dict]:
    """Each int8 model against the fp32 one, and onnxopt's against each anchor's, paired and interleaved
    (``onnxopt.bench``: median of per-block ratios with its interval; one process, quiet threads)."""
    from onnxopt.bench import bench

    figures: dict[str, dict] = {}
    for tool, path in paths.items():
        if tool == "fp32":
            continue
        r = bench(str(path), str(paths["fp32"]), data=feed, threads=threads, budget_seconds=budget)
        figures[tool] = {"ms": r.candidate.median_ms, "x_fp32": r.ratio, "fp32_ms": r.baseline.median_ms}
    if "onnxopt" in figures:
        for tool in figures:
            if tool != "onnxopt":
                r = bench(str(paths["onnxopt"]), str(paths[tool]), data=feed, threads=threads, budget_seconds=budget)
                figures[tool]["onnxopt_x"] = r.ratio  # onnxopt's int8 time / this tool's int8 time
    return figures


def bench_model(name: str, method: str, tools: list[str], folder: Path, batches: tuple[int, ...]) -> list[dict]:
    model, calib, test, measure = model_data(name, folder)
    rows = []
    outputs = {"fp32": model}
    for tool in tools:
        out = folder / f"{name}.{tool}.onnx"
        run = quantize_with(tool, model, calib, method, out)
        row = {"model": name, "tool": tool, **run}
        if "error" not in run:
            try:
                row.update(quality(model, out, test, measure))
            except Exception as exc:  # a tool wrote a model onnxruntime cannot run: that is its result
                rows.append({**row, "error": "invalid model: " + " ".join(str(exc).split())[-80:]})
                continue
            row["file_kb"] = out.stat().st_size / 1e3
            row["qdq_nodes"] = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(out).graph.node)
            row["integer_nodes"] = integer_nodes(out)
            row["file_ratio"] = out.stat().st_size / model.stat().st_size
            outputs[tool] = out
        rows.append(row)
    with np.load(test) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    ours = next((r for r in rows if r["tool"] == "onnxopt" and "error" not in r), None)
    for batch in batches:
        if fixed_batch(model) not in (None, batch):
            continue
        feed = {k: v[:batch] for k, v in arrays.items()}
        for threads in (1, 2):
            timed = dict(outputs)
            if ours is not None:  # onnxopt as a user deploying at this batch and thread count runs it
                timed["onnxopt"] = tuned_for(model, calib, method, feed, threads, folder / f"{name}.onnxopt.b{batch}t{threads}.onnx", ours)
            figures = latency(timed, feed, threads)
            for row in rows:
                if row["tool"] in figures:
                    f = figures[row["tool"]]
                    row[f"ms_b{batch}_t{threads}"] = f["ms"]
                    row[f"x_b{batch}_t{threads}"] = f["x_fp32"]
                    if "onnxopt_x" in f:
                        row[f"onnxopt_x_b{batch}_t{threads}"] = f["onnxopt_x"]
    return rows


def tuned_for(model: Path, calib: Path, method: str, feed: dict, threads: int, out: Path, row: dict) -> Path:
    """onnxopt's int8 model with its speed fallback measured at this feed's batch and ``threads``
    (what ``--threads T`` with ``--data`` at that batch size gives); what it kept float goes in ``row``."""
    import onnxopt

    result = onnxopt.optimize(model, ["simplify", "fold-bn", "share-init", "quantize"], calibration=calib,
                              calibrate=method, data=feed, validate=False, latency=True, threads=threads,
                              latency_budget=0.5)
    result.save(out)
    speed = result.report.passes[-1].details.get("speed", {})
    key = f"b{len(next(iter(feed.values())))}t{threads}"
    row.setdefault("tuned", {})[key] = {"float": len(speed.get("kept_float", [])), "file_ratio": out.stat().st_size / model.stat().st_size}
    return out


def render(rows: list[dict], measure_of: dict[str, str], batches: tuple[int, ...]) -> str:
    lat_cols = [f"b{b}t{t}" for b in batches for t in (1, 2)]
    header = ["model", "tool", "quality", "cosine", "int nodes", "calib s", "peak MB", "file kB", *[f"x fp32 {c}" for c in lat_cols]]
    lines = []
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["model"], row["tool"], f"FAILED: {row['error']}"] + [""] * (len(header) - 3))
            continue
        m = measure_of[row["model"]]
        q = f"acc {row['accuracy'] * 100:.2f}% (fp32 {row['accuracy_float'] * 100:.2f}%)" if m == "accuracy" else (
            f"top-1 {row['top1'] * 100:.1f}%" if m == "top1" else f"cos {row['cosine']:.5f}")
        table.append([row["model"], row["tool"], q, f"{row['cosine']:.5f}",
                      f"{row['integer_nodes']}" + (" (no-op)" if row["qdq_nodes"] == 0 else ""), f"{row['seconds']:.2f}", f"{row['peak_mb']:.0f}",
                      f"{row['file_kb']:.0f} ({row['file_ratio']:.2f}x)",
                      *[f"{row['x_' + c.replace('t', '_t')]:.2f}" if 'x_' + c.replace('t', '_t') in row else "-" for c in lat_cols]])
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in table]
    # onnxopt / best anchor, per model and figure.
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = next((r for r in rows if r["model"] == model and r["tool"] == "onnxopt" and "error" not in r), None)
        # An anchor that left the model float (no integer node) is no quantization to compare with.
        noops = [r["tool"] for r in rows if r["model"] == model and r["tool"] in ANCHORS and r.get("integer_nodes") == 0]
        anchors = [r for r in rows if r["model"] == model and r["tool"] in ANCHORS and "error" not in r
                   and r["tool"] not in noops]
        if noops:
            lines.append(f"{model}: {', '.join(noops)} left the model float (no integer node in onnxruntime's graph): not compared")
        failed = [r["tool"] for r in rows if r["model"] == model and r["tool"] in ANCHORS and "error" in r]
        if failed:
            lines.append(f"{model}: {', '.join(failed)} failed (see the table)")
        if ours and not anchors:
            lines.append(f"{model}: no anchor produced a working integer model; onnxopt: {ours['cosine']:.5f} cosine, "
                         f"int8 {ours.get(f'x_b{batches[0]}_t1', float('nan')):.2f}x fp32 (b{batches[0]}t1)")
        if not ours or not anchors:
            continue
        key = "accuracy" if measure_of[model] == "accuracy" else "cosine"
        best_q = max(anchors, key=lambda r: r[key])
        b = batches[0]
        fastest = min(anchors, key=lambda r: r.get(f"x_b{b}_t1", float("inf")))
        vs = "; ".join(
            f"b{bb}t{t} {fastest[f'onnxopt_x_b{bb}_t{t}']:.2f}" for bb in batches for t in (1, 2)
            if f"onnxopt_x_b{bb}_t{t}" in fastest
        )
        if ours.get("tuned"):
            lines.append(f"{model}: onnxopt's speed fallback at each setting kept float " + ", ".join(
                f"{k}: {v['float']} layers (file {v['file_ratio']:.2f}x)" for k, v in ours["tuned"].items()))
        lines.append(
            f"{model}: {key} {ours[key]:.5f} vs best anchor {best_q[key]:.5f} ({best_q['tool']}); "
            f"onnxopt int8 / fastest anchor's int8 ({fastest['tool']}, paired): {vs or '-'}; "
            f"file {ours['file_kb']:.0f} kB vs smallest {min(a['file_kb'] for a in anchors):.0f} kB; "
            f"calibration {ours['seconds']:.2f} s / {min(a['seconds'] for a in anchors):.2f} s; "
            f"peak {ours['peak_mb']:.0f} MB / {min(a['peak_mb'] for a in anchors):.0f} MB"
        )
    return "\n".join(lines)


MEMORY_LIMIT = 16 * 2**30  # address space a tool may take in the memory runs


def memory(method: str, tools: list[str], folder: Path, sizes: tuple[int, ...] = (128, 2048)) -> str:
    """Peak RSS of calibration + quantization of the zoo's 5.5 MB detector (320x320) on ``sizes`` samples,
    made batch by batch from a seed so that no tool holds the data set. Each run is capped at 16 GiB
    of address space: a calibrator that keeps every activation fails instead of swapping."""
    model = ROOT / "models" / "zoo" / "detector.onnx"
    lines = [f"calibration memory, detector (5.5 MB, 1x3x320x320), method {method}, batches of {BATCH} "
             f"(peak RSS of the whole subprocess; cap {MEMORY_LIMIT / 2**30:.0f} GiB)"]
    for tool in tools:
        figures = []
        for n in sizes:
            run = quantize_with(tool, model, f"random:input:{n}:3,320,320", method, folder / f"mem.{tool}.{n}.onnx",
                                limit=MEMORY_LIMIT)
            figures.append(f"failed ({run['error'][:40]})" if "error" in run else f"{run['peak_mb']:.0f} MB ({run['seconds']:.0f} s)")
            print(f"[{tool} {n} samples: {figures[-1]}]", file=sys.stderr)
        lines.append(f"  {tool:9s} " + "   ".join(f"{n} samples: {f:>18s}" for n, f in zip(sizes, figures)))
    return "\n".join(lines)


# Real exports for ``--cost``: (file under the corpus folder, calibration input shape). The text
# detector and recognizer of PaddleOCR v4 (rapidocr_onnxruntime's wheel), 4.7 and 10.9 MB.
CORPUS = {
    "ocr_det": ("rapidocr_onnxruntime/ch_PP-OCRv4_det_infer.onnx", (16, 3, 320, 320)),
    "ocr_rec": ("rapidocr_onnxruntime/ch_PP-OCRv4_rec_infer.onnx", (32, 3, 48, 320)),
}


def corpus_dir() -> Path:
    return Path(os.environ.get("ONNXOPT_CORPUS_DIR", "/work/corpus-cache/models"))


def text_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Synthetic document crops of ``shape`` (N, 3, H, W): light shaded paper with dark glyph-like
    strokes in lines, normalized as PaddleOCR does ((x / 255 - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty(shape, np.float32)
    for i in range(n):
        img = rng.uniform(150, 255) + 30 * np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(4 * yy * rng.uniform(0.5, 2))
        for _ in range(rng.integers(1, max(1, h // 48) + 1)):
            y0, lh, x = rng.integers(0, max(1, h - 32)), rng.integers(12, 32), rng.integers(0, w // 4)
            while x < w - 8 and rng.random() > 0.05:
                cw = rng.integers(4, 16)
                box = img[y0:y0 + lh, x:x + cw]
                box[rng.random(box.shape) < 0.35] = rng.uniform(0, 80)
                x += cw + rng.integers(1, 6)
        img = img + rng.normal(0, 6, img.shape)
        out[i] = np.clip(img[None] * rng.uniform(0.85, 1.0, 3)[:, None, None], 0, 255)
    return (out / 255 - 0.5) / 0.5


def cost(method: str, folder: Path, names: list[str], repeats: int = 1, min_cosine: float | None = None) -> str:
    """Wall time and peak RSS of the command line's default ``--quantize int8`` (validation, latency
    and speed fallback included) against onnxruntime's ``quantize_static`` on the same file and
    samples, each in a fresh process, run back to back (ratios from the same run). The default budget
    (cosine 0.99) is missed on the synthetic crops, so that run ends without a timing; ``min_cosine``
    (0.9 meets it after a few fallback rounds) measures the run that is written, timings included."""
    budget = {} if min_cosine is None else {"min_cosine": min_cosine}
    lines = [f"quantization cost, method {method}, batches of {BATCH}: onnxopt's default command"
             f"{f' with --min-cosine {min_cosine:g}' if budget else ''} against "
             f"onnxruntime.quantization.quantize_static (QDQ, per-channel, u8s8); wall s and peak RSS MB"]
    for name in names:
        relative, shape = CORPUS[name]
        model = corpus_dir() / relative
        if not model.exists():
            lines.append(f"  {name}: {model} not found (set ONNXOPT_CORPUS_DIR): skipped")
            continue
        spec = onnx.load(model, load_external_data=False).graph.input[0]
        calib = folder / f"{name}_calib.npz"
        np.savez(calib, **{spec.name: text_images(shape)})
        for r in range(repeats):
            runs = {tool: quantize_with(tool, model, calib, method, folder / f"{name}.{tool}.onnx",
                                        options=budget if tool == "onnxopt-cli" else None)
                    for tool in ("onnxopt-cli", "onnxopt", "ort-u8s8")}
            ours, proper, theirs = runs["onnxopt-cli"], runs["onnxopt"], runs["ort-u8s8"]
            if "error" in ours or "error" in theirs or "error" in proper:
                lines.append(f"  {name}: failed: {ours.get('error') or proper.get('error') or theirs.get('error')}")
                continue
            # ``onnxopt``: the quantization proper (no validation, latency or speed fallback).
            lines.append(
                f"  {name} ({model.stat().st_size / 1e6:.1f} MB, {shape[0]} samples of {'x'.join(map(str, shape[1:]))}): "
                f"onnxopt {ours['seconds']:.1f} s, {ours['peak_mb']:.0f} MB; quantization proper "
                f"{proper['seconds']:.1f} s, {proper['peak_mb']:.0f} MB; onnxruntime {theirs['seconds']:.1f} s, "
                f"{theirs['peak_mb']:.0f} MB; ratio {ours['seconds'] / theirs['seconds']:.2f}x time "
                f"(proper {proper['seconds'] / theirs['seconds']:.2f}x), {ours['peak_mb'] / theirs['peak_mb']:.2f}x memory "
                f"(proper {proper['peak_mb'] / theirs['peak_mb']:.2f}x)")
            print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def _onnxsim_available() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import onnxsim; onnxsim.quantize_static"], capture_output=True)
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,mobilenet_dw,transformer_encoder,transformer_fixed",
                        help=f"comma-separated: digits, zoo names, transformer_fixed (the zoo transformer at batch 1 "
                             f"and 16 tokens), or onnx architectures ({', '.join(LIGHT)})")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--batches", default="1,32", help="batch sizes for latency (default 1,32)")
    parser.add_argument("--memory", action="store_true",
                        help="measure calibration memory on the detector at --samples instead (default 128,2048)")
    parser.add_argument("--samples", default="128,2048",
                        help="sample counts for --memory (whole batches: onnxruntime's entropy calibrator crashes on a short last one)")
    parser.add_argument("--cost", action="store_true",
                        help="time and peak RSS of the default --quantize int8 command against onnxruntime's "
                             f"quantize_static on real models ({', '.join(CORPUS)}) from $ONNXOPT_CORPUS_DIR")
    parser.add_argument("--repeats", type=int, default=1, help="runs per model for --cost (default 1)")
    parser.add_argument("--min-cosine", type=float,
                        help="--cost: onnxopt's budget (0.9: met after a few rounds on the synthetic crops, so the "
                             "speed fallback and the latency run too; default: the command's own, 0.99)")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args(argv)
    tools = ["onnxopt", "ort-s8s8", "ort-u8s8"] + (["onnxsim"] if _onnxsim_available() else [])
    if "onnxsim" not in tools:
        print("note: onnxsim.quantize_static is not importable here: compared with onnxruntime.quantization only")
    batches = tuple(int(b) for b in args.batches.split(","))
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        folder = Path(tmp)
        if args.cost:
            names = [n for n in args.models.split(",") if n in CORPUS] or list(CORPUS)
            print(cost(args.method, folder, names, args.repeats, args.min_cosine))
            return 0
        if args.memory:
            tools = [t for t in tools if t != "ort-s8s8"]  # the same calibrator as ort-u8s8
            print(memory(args.method, tools, folder, tuple(int(n) for n in args.samples.split(","))))
            return 0
        rows, measure_of = [], {}
        for name in args.models.split(","):
            measure_of[name] = model_data(name, folder)[3]
            rows += bench_model(name, args.method, tools, folder, batches)
            print(f"[{name} done]", file=sys.stderr)
    print(f"method {args.method}; onnxruntime {ort.__version__}; {os.cpu_count()} cores; latency ratios int8/fp32 at batch b, t threads")
    print(render(rows, measure_of, batches))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

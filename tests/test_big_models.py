"""Models larger than memory: weights stay lazy where a pass only reads them, new weights go to disk,
onnxruntime reads the input file itself, and no two sessions hold the weights at once.

The unit tests use a small model with external data and monkeypatched limits; the real > 2 GB run
(``ONNXOPT_BIG_TESTS=1``, marked ``slow``) asserts peak RSS <= 1.5x the weight bytes.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxopt
from benchmarks.big_model import build_model, layers_for
from onnxopt import io, pipeline, runtime
from onnxopt.passes import ShareInitializers
from onnxopt.passes import share_initializers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def big(tmp_path) -> Path:
    """An MLP of 9 MatMul layers (64x128 / 128x64) with external data: 3 BatchNorms, 2 Muls, 2 duplicates."""
    path = tmp_path / "model" / "big.onnx"
    path.parent.mkdir()
    build_model(path, layers=9, rows=64, cols=128)
    return path


def test_share_init_reads_external_weights_without_mapping_them(big):
    model = io.load_model(big)
    result = ShareInitializers()(model)
    assert result.modified and result.model.graph.initializers.get("w4") is None  # w4 repeats w2
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    # Read through the file: no tensor was memory-mapped (numpy() maps the whole file per tensor).
    assert all(t.raw is None for t in tensors)


def test_share_init_compares_chunk_by_chunk(big, monkeypatch):
    """Two tensors equal but for one element that the probe skips are told apart when compared in
    small chunks, even when their hashes collide (every digest made equal here)."""
    monkeypatch.setattr(share_initializers, "_CHUNK_BYTES", 1000)
    monkeypatch.setattr(share_initializers, "_digest", lambda tensor: b"")
    model = io.load_model(big)
    a = model.graph.initializers["w1"].const_value.numpy().copy()
    b = a.copy()
    b.reshape(-1)[4001] += 1.0  # not one of the probed elements (every 32nd)
    model.graph.initializers["w1"].const_value = ir.tensor(a, name="w1")
    model.graph.initializers["w3"].const_value = ir.tensor(b, name="w3")
    result = ShareInitializers()(model)
    assert "w3" in model.graph.initializers and "w1" in model.graph.initializers
    assert "w4" not in model.graph.initializers and result.modified  # the real duplicate still goes


def test_spill_tensors_moves_new_weights_to_disk(tmp_path):
    model = io.load_model(build_small_inline(tmp_path))
    weights = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    written = io.spill_tensors(model, min_bytes=1024)
    spilled = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert written > 0 and spilled
    assert all(v.const_value.nbytes >= 1024 for v in spilled)
    for value in model.graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), weights[value.name])
    folder = Path(spilled[0].const_value.base_dir)
    out = io.save_model(model, tmp_path / "out.onnx", external_data=True)
    del spilled, value
    gc.collect()
    assert folder.is_dir()
    session = ort.InferenceSession(str(out))
    assert session.get_inputs()[0].name == "input"
    del model
    gc.collect()
    assert not folder.exists()  # the spill folder lives as long as its model


def build_small_inline(tmp_path: Path) -> Path:
    path = tmp_path / "inline" / "m.onnx"
    path.parent.mkdir()
    build_model(path, layers=3, rows=32, cols=64)
    model = io.load_model(path)
    return io.save_model(model, tmp_path / "inline.onnx", external_data=False)


def test_snapshot_over_the_inline_limit_is_a_folder(big, monkeypatch):
    model = io.load_model(big)
    ir.external_data.load_to_model(model)
    monkeypatch.setattr(runtime, "INLINE_WEIGHT_LIMIT", 1024)
    snapshot = runtime.ModelSnapshot(model)
    assert snapshot.data is None and snapshot.path is not None
    snapshot.session(optimization="disabled")
    snapshot.close()


def test_snapshot_from_file_copies_nothing(big):
    snapshot = runtime.ModelSnapshot.from_file(big)
    assert snapshot.path == str(big) and snapshot.nbytes == os.path.getsize(big)
    x = np.ones((2, 64), np.float32)
    out = snapshot.session(optimization="disabled").run(None, {"input": x})[0]
    assert out.shape == (2, 128)
    snapshot.close()
    assert big.exists() and (big.parent / "big.onnx.data").exists()


def test_large_model_run_holds_one_session_and_one_copy(big, tmp_path, monkeypatch):
    """Above LARGE_MODEL_BYTES: no in-memory copy of the original (sessions read the input file),
    at most one onnxruntime session alive at any time, the folded weights on disk, and the output
    equal to the original."""
    monkeypatch.setattr(pipeline, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(io, "SPILL_MIN_BYTES", 1024)
    copies, alive, most = [], set(), [0]
    real_init, real_create = runtime.ModelSnapshot.__init__, runtime.create_session

    def init(self, model):
        if model is not None:
            copies.append(model)
        real_init(self, model)

    def create(*args, **kwargs):
        session = real_create(*args, **kwargs)
        alive.add(id(session))
        weakref.finalize(session, alive.discard, id(session))
        most[0] = max(most[0], len(alive))
        return session

    monkeypatch.setattr(runtime.ModelSnapshot, "__init__", init)
    monkeypatch.setattr(runtime, "create_session", create)
    result = onnxopt.optimize(str(big), ["simplify", "fold-bn", "share-init"])
    assert result.ok, result.report.validation
    assert len(copies) == 1  # the candidate alone; the original is the input file
    assert most[0] == 1
    assert result.report.latency is None and any("onnxopt bench" in n for n in result.report.notes)
    folded = [v for v in result.model.graph.initializers.values() if v.name.startswith("w") and "_" in v.name]
    assert folded and all(isinstance(v.const_value, ir.ExternalTensor) for v in folded)
    out = result.save(tmp_path / "out.onnx")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    want = ort.InferenceSession(str(big)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ONNXOPT_BIG_TESTS") != "1", reason="set ONNXOPT_BIG_TESTS=1 (writes 2.3 GB, minutes)")
def test_two_gigabyte_model_peaks_below_one_and_a_half_weights(tmp_path):
    path = tmp_path / "big.onnx"
    weights = build_model(path, layers=layers_for(2.3, 4096, 8192))
    assert weights > 2**31
    code = ("import resource, subprocess, sys\n"
            "subprocess.run([sys.executable, '-m', 'onnxopt', sys.argv[1], '-o', sys.argv[2], '-q',"
            " '--passes', 'simplify,fold-bn,share-init'], check=True)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out.onnx")], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    peak = int(done.stdout.split()[-1])
    assert peak <= 1.5 * weights, f"peak RSS {peak / 1e9:.2f} GB for {weights / 1e9:.2f} GB of weights"


def test_snapshot_by_reference_serializes_the_graph_only_and_runs_from_the_weights_folder(big):
    """Calibration and SQNR sessions of a model whose weights are still in their files (one folder):
    the exposed copy is serialized without its weights and onnxruntime reads them from that folder."""
    from onnxopt.observe import expose

    model = io.load_model(big)
    names = [n.outputs[0].name for n in model.graph if n.op_type == "MatMul"][:3]
    exposed, _ = expose(model, names)
    snapshot = runtime.ModelSnapshot(exposed, by_reference=True)
    try:
        assert snapshot.external_folder == os.path.realpath(big.parent)
        assert len(snapshot.data) < 20_000 < io.weight_bytes(model)  # the graph, not the weights
        assert snapshot.nbytes >= io.weight_bytes(model)
        x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        feed = {model.graph.inputs[0].name: x}
        ours = runtime.run_session(snapshot.session(optimization="disabled"), feed)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        theirs = ort.InferenceSession(str(big), options, providers=["CPUExecutionProvider"])
        expected = dict(zip([o.name for o in theirs.get_outputs()], theirs.run(None, feed)))
        for name, value in expected.items():
            np.testing.assert_array_equal(ours[name], value)
        assert set(names) <= set(ours)
    finally:
        snapshot.close()
    # A weight held in memory beside the files is serialized with the graph, still by reference;
    # without by_reference (or with weights in two folders) the snapshot is a folder of its own.
    changed = io.load_model(big)
    first = next(v for v in changed.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor))
    first.const_value = ir.tensor(first.const_value.numpy() * 2)
    mixed = runtime.ModelSnapshot(changed, by_reference=True)
    assert mixed.external_folder is not None and len(mixed.data) > first.const_value.nbytes
    mixed.close()
    plain = runtime.ModelSnapshot(io.load_model(big))
    assert plain.external_folder is None and plain.path is not None
    plain.close()

"""The command line: every bad input exits 2 with one line on stderr, writes nothing and leaves the
input alone; a good run writes ``X.opt.onnx`` and a JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import convert_model_to_external_data

from graphs import run, small_cnn
from onnxopt.cli import main

X = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def call(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits on a bad option
        return exc.code


def assert_refused(capsys, folder: Path, args, *words: str) -> str:
    before = files(folder)
    code = call(*args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert files(folder) == before  # no output, no temporary files, the input unchanged
    return lines[0]


@pytest.fixture
def folder(tmp_path) -> Path:
    onnx.save(small_cnn(), tmp_path / "m.onnx")
    return tmp_path


@pytest.fixture
def model(folder) -> Path:
    return folder / "m.onnx"


def external_model(folder: Path) -> Path:
    sub = folder / "ext"
    sub.mkdir()
    proto = small_cnn()
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    onnx.save(proto, sub / "m.onnx")
    return sub / "m.onnx"


def set_external(path: Path, key: str, value: str | None) -> None:
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data if e.key != key}
        if value is not None:
            entries[key] = value
        del tensor.external_data[:]
        for k, v in entries.items():
            tensor.external_data.add(key=k, value=v)
    onnx.save(proto, path)


# -- bad model files -----------------------------------------------------------------------------


def test_truncated_model(capsys, model):
    model.write_bytes(model.read_bytes()[:300])
    assert_refused(capsys, model.parent, [model], "m.onnx", "not a valid ONNX model")


def test_empty_file(capsys, folder):
    (folder / "e.onnx").write_bytes(b"")
    assert_refused(capsys, folder, [folder / "e.onnx"], "e.onnx", "empty file")


def test_missing_file(capsys, folder):
    assert_refused(capsys, folder, [folder / "gone.onnx"], "gone.onnx", "no such file")


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("location", "../x.bin", ["'../x.bin'", "escapes the model's folder"]),
        ("location", "/tmp/w.bin", ["'/tmp/w.bin'", "absolute"]),
        ("location", "other.bin", ["'other.bin'", "not found"]),
        ("length", "100000", ["'w.bin'", "truncated"]),
    ],
    ids=["escapes", "absolute", "missing", "short"],
)
def test_bad_external_data(capsys, folder, key, value, words):
    path = external_model(folder)
    (folder / "x.bin").write_bytes((path.parent / "w.bin").read_bytes())  # what '../x.bin' would read
    set_external(path, key, value)
    assert_refused(capsys, folder, [path, "--no-latency"], *words)


def test_external_data_shorter_than_its_tensors(capsys, folder):
    path = external_model(folder)
    set_external(path, "length", None)
    data = path.parent / "w.bin"
    data.write_bytes(data.read_bytes()[:-8])
    assert_refused(capsys, folder, [path, "--no-validate", "--no-latency"], "'FB'", "truncated")


# -- bad options ---------------------------------------------------------------------------------


def test_unknown_pass(capsys, model):
    assert_refused(capsys, model.parent, [model, "--passes", "fold-bn,nope"], "unknown pass 'nope'", "fold-bn")


def test_unknown_option(capsys, model):
    assert_refused(capsys, model.parent, [model, "--fast"], "unrecognized arguments: --fast")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--dim", "N"], ["--dim 'N'", "NAME=POSITIVE_INT"]),
        (["--dim", "N=0"], ["--dim 'N=0'"]),
        (["--dim", "seq=4"], ["--dim seq", "named dims: N"]),
        (["--batch-size", "0"], ["--batch-size 0"]),
        (["--providers", "warp"], ["unknown provider 'warp'"]),
    ],
    ids=["dim-no-value", "dim-zero", "dim-unknown-name", "batch-size", "provider"],
)
def test_bad_option_values(capsys, model, args, words):
    assert_refused(capsys, model.parent, [model, "--no-latency", *args], *words)


def test_output_equal_to_input_is_refused(capsys, model):
    assert_refused(capsys, model.parent, [model, "-o", model], "refusing to overwrite the input model")
    same = model.parent / "." / model.name
    assert_refused(capsys, model.parent, [model, "-o", same, "--no-validate", "--no-latency"], "refusing to overwrite")


def test_output_folder_missing(capsys, model):
    out = model.parent / "no" / "out.onnx"
    assert_refused(capsys, model.parent, [model, "-o", out, "--no-latency"], "does not exist")


# -- bad data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrays,words",
    [
        ({"image": X}, ["missing input(s) x", "unknown name(s) image"]),
        ({"x": X[:, :, :, :7]}, ["input 'x'", "[2, 3, 8, 7]", "axis 3: 7 != 8"]),
        ({"x": X.astype(np.float16)}, ["input 'x'", "float16", "float32"]),
        ({"labels": np.arange(2)}, ["missing input(s) x"]),
    ],
    ids=["wrong-name", "wrong-shape", "wrong-dtype", "missing-input"],
)
def test_data_that_does_not_fit(capsys, model, arrays, words):
    np.savez(model.parent / "d.npz", **arrays)
    assert_refused(capsys, model.parent, [model, "--data", model.parent / "d.npz"], "d.npz", *words)


@pytest.mark.parametrize(
    "labels,words",
    [
        (np.array(["a", "b"]), ["labels 'labels'", "dtype <U1", "integers"]),
        (np.eye(2, dtype=np.int64), ["labels 'labels'", "shape [2, 2]", "argmax"]),
    ],
    ids=["string-labels", "one-hot-labels"],
)
def test_labels_that_are_not_class_indices(capsys, model, labels, words):
    np.savez(model.parent / "d.npz", x=X, labels=labels)
    assert_refused(capsys, model.parent, [model, "--data", model.parent / "d.npz"], *words)


def test_data_with_no_finite_value(capsys, model):
    np.savez(model.parent / "d.npz", x=np.full_like(X, np.nan))
    assert_refused(capsys, model.parent, [model, "--data", model.parent / "d.npz"], "input 'x'", "no finite value")


def test_data_the_input_model_cannot_run_on(capsys, folder):
    """Names, dtypes and shapes fit; the model still fails on it (an index past a table): one line."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[N] ids) => (float[N, 4] y) { y = Gather (table, ids) }"""
    from graphs import build_proto

    onnx.save(build_proto(text, {"table": np.ones((10, 4), np.float32)}), folder / "t.onnx")
    np.savez(folder / "ids.npz", ids=np.array([1, 99], np.int64))
    assert_refused(capsys, folder, [folder / "t.onnx", "--data", folder / "ids.npz"],
                   "batch 0: onnxruntime cannot run the input model on it")


def test_synthetic_data_too_large_to_make(capsys, model):
    assert_refused(capsys, model.parent, [model, "--dim", "N=100000000"], "synthetic input 'x'", "GiB", "--dim")


@pytest.mark.parametrize("target", ["model", "external", "data", "report-as-input", "report-as-output"])
def test_output_or_report_over_an_input_is_refused(capsys, folder, target):
    ext = external_model(folder)
    np.savez(folder / "d.npz", x=X)
    model_path = ext if target == "external" else folder / "m.onnx"
    args = [model_path, "--data", folder / "d.npz"]
    if target == "model":
        args += ["--report", folder / "m.onnx", "-o", folder / "out.onnx"]
        words = ["--report", "the input model"]
    elif target == "external":
        args += ["-o", ext.parent / "w.bin"]
        words = ["the input model's external data"]
    elif target == "data":
        args += ["-o", folder / "d.npz"]
        words = ["the --eval/--data file"]
    elif target == "report-as-input":
        args += ["--report", folder / "d.npz"]
        words = ["--report", "the --eval/--data file"]
    else:
        args += ["-o", folder / "out.onnx", "--report", folder / "out.onnx"]
        words = ["--report", "output model's path"]
    assert_refused(capsys, folder, args, *words)


@pytest.mark.parametrize("flags", [["-o", "{x}"], ["--report", "{x}", "-o", "{out}"],
                                   ["--prune", "0.5", "--distill", "--train-data", "{data}", "-o", "{x}"]])
def test_output_or_report_over_a_file_of_a_data_folder_is_refused(capsys, model, flags):
    """A file that a --data or --train-data folder's reader reads was overwritten by the model or a
    report: only a data file given itself was protected."""
    if "--distill" in flags:
        pytest.importorskip("torch")
    data = model.parent / "data"
    data.mkdir()
    np.save(data / "x.npy", X)
    names = {"x": data / "x.npy", "out": model.parent / "out.onnx", "data": data}
    args = [model, "--no-latency", *(f.format(**names) for f in flags)]
    if "--train-data" not in flags:
        args += ["--data", data]
    which = "--train-data" if "--train-data" in flags else "--eval/--data"
    assert_refused(capsys, model.parent, args, f"refusing to overwrite a file of the {which} folder")


def test_a_failed_run_says_why_on_stderr_even_when_quiet(capsys, model):
    np.savez(model.parent / "c.npz", x=X)
    code = call(model, "--quantize", "int8", "--calibration", model.parent / "c.npz", "--exclude", "Conv,Gemm", "-q")
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: failed: ") and "not written" in lines[0], err


def test_quantize_listed_twice_and_max_drop_without_labels(capsys, model):
    np.savez(model.parent / "c.npz", x=X)
    calib = model.parent / "c.npz"
    assert_refused(capsys, model.parent, [model, "--passes", "quantize,quantize", "--calibration", calib],
                   "quantize is listed more than once")
    assert_refused(capsys, model.parent, [model, "--quantize", "int8", "--calibration", calib, "--eval", calib,
                                          "--max-drop", "1"], "--max-drop needs labels", "--min-cosine")


def test_an_exclude_that_matches_nothing_is_noted(capsys, model):
    np.savez(model.parent / "c.npz", x=X)
    report = model.parent / "r.json"
    call(model, "--quantize", "int8", "--calibration", model.parent / "c.npz", "--exclude", "nosuchnode",
         "--report", report, "-q")
    notes = json.loads(report.read_text())["notes"]
    assert any("--exclude 'nosuchnode' matches no node" in n for n in notes), notes


def test_progress_is_cleared_before_an_error():
    from io import StringIO

    from onnxopt.cli import Progress

    stream = StringIO()
    stream.isatty = lambda: True
    progress = Progress(enabled=True, stream=stream)
    progress("pass fold-bn", 1, 4)
    progress.clear()
    stream.write("onnxopt: error: x\n")
    assert stream.getvalue().split("\r")[-1] == "onnxopt: error: x\n"


def test_data_file_missing(capsys, model):
    assert_refused(capsys, model.parent, [model, "--data", model.parent / "none.npz"], "none.npz", "no such file")


# -- runs that work ------------------------------------------------------------------------------


def test_default_run_writes_opt_onnx_and_report(capsys, model):
    original = model.read_bytes()
    np.savez(model.parent / "d.npz", x=np.concatenate([X, X, X]), labels=np.arange(6) % 10)
    report_path = model.parent / "r.json"
    code = call(model, "--data", model.parent / "d.npz", "--batch-size", "4", "--latency-budget", "0.5",
                "--report", report_path)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation PASS" in out
    assert model.read_bytes() == original
    optimized = model.parent / "m.opt.onnx"
    assert sorted(files(model.parent)) == ["d.npz", "m.onnx", "m.opt.onnx", "r.json"]
    proto = onnx.load(optimized)
    onnx.checker.check_model(proto, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    ref, got = run(onnx.load(model), {"x": X})[0], run(proto, {"x": X})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # rtol 1e-5 of max|ref|

    report = json.loads(report_path.read_text())
    assert [p["name"] for p in report["passes"]] == ["simplify", "fold-bn", "prune", "share-init"]
    for record in report["passes"]:
        assert {"name", "modified", "seconds", "summary"} <= set(record)
        assert isinstance(record["modified"], bool) and record["seconds"] >= 0
    fold = report["passes"][1]
    assert fold["modified"] is True and fold["summary"].startswith("folded 1 of 1 BatchNormalization")
    for side in ("before", "after"):
        assert {"nodes", "params", "bytes", "macs", "op_counts"} <= set(report[side])
    assert report["before"]["op_counts"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in report["after"]["op_counts"]
    assert report["after"]["nodes"] == report["before"]["nodes"] - 1
    assert report["after"]["bytes"] < report["before"]["bytes"]
    assert report["validation"]["ok"] is True
    assert report["validation"]["samples"] == 6 and report["validation"]["batches"] == 2
    assert [o["name"] for o in report["validation"]["outputs"]] == ["y"]
    assert report["validation"]["outputs"][0]["ok"] is True
    latency = report["latency"]
    assert latency["ratio"] > 0 and latency["median_a_ms"] > 0 and latency["median_b_ms"] > 0
    assert report["output"] == str(optimized)


def test_in_place_overwrites_the_input(capsys, model):
    reference = onnx.load(model)
    assert call(model, "-o", model, "--in-place", "--no-latency", "-q") == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert sorted(files(model.parent)) == ["m.onnx"]
    rewritten = onnx.load(model)
    assert "BatchNormalization" not in [n.op_type for n in rewritten.graph.node]
    ref = run(reference, {"x": X})[0]
    np.testing.assert_allclose(run(rewritten, {"x": X})[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_external_data_model_without_validation_writes_a_standalone_output(capsys, folder):
    path = external_model(folder)
    out = folder / "out.onnx"
    assert call(path, "-o", out, "--no-validate", "--no-latency", "-q") == 0
    proto = onnx.load(out, load_external_data=False)
    assert not any(t.external_data for t in proto.graph.initializer)
    ref = run(small_cnn(), {"x": X})[0]
    np.testing.assert_allclose(run(proto, {"x": X})[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_external_data_model_validates(capsys, folder):
    path = external_model(folder)
    assert call(path, "--no-latency", "-q") == 0, capsys.readouterr().err


# -- the real command line -----------------------------------------------------------------------


def python_m(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxopt", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_subprocess_not_onnx_and_unknown_option(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model\n" * 50)
    before = files(tmp_path)
    for args, words in [
        (["notes.onnx"], "notes.onnx: not a valid ONNX model"),
        (["notes.onnx", "--turbo"], "unrecognized arguments: --turbo"),
    ]:
        done = python_m(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], done.stderr
    assert files(tmp_path) == before


def test_subprocess_default_run(folder):
    done = python_m("m.onnx", "--latency-budget", "0.5", "--report", "r.json", "-q", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert sorted(files(folder)) == ["m.onnx", "m.opt.onnx", "r.json"]
    report = json.loads((folder / "r.json").read_text())
    assert report["validation"]["ok"] is True and report["validation"]["synthetic"] is True
    assert report["output"] == "m.opt.onnx"
    assert os.path.getsize(folder / "m.opt.onnx") < os.path.getsize(folder / "m.onnx")


# -- destinations and what exit codes promise (issue 14, part 4) -------------------------------------


@pytest.mark.parametrize("kind", ["devnull", "folder", "fifo"])
def test_output_that_is_not_a_regular_file_is_refused(capsys, model, kind):
    """'-o /dev/null' was replaced by a regular file when run as root."""
    if kind == "devnull":  # a link to it: old code replaced the link, never the real device
        target = model.parent / "null.onnx"
        target.symlink_to(os.devnull)
    elif kind == "folder":
        target = model.parent / "dir.onnx"
        target.mkdir()
    else:
        target = model.parent / "pipe.onnx"
        os.mkfifo(target)
    assert_refused(capsys, model.parent, [model, "-o", target, "--no-latency"], str(target), "give the path of a file")
    assert os.path.exists(target) and not os.path.isfile(target)
    if kind != "devnull":
        assert_refused(capsys, model.parent, [model, "--report", target, "--no-latency"], "--report")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder nobody can create files in)")
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_unwritable_destination_is_refused_before_any_work(capsys, model, flag, monkeypatch):
    """An unwritable folder failed with a traceback after the whole run; now one line, first."""
    import onnxopt.cli as cli

    monkeypatch.setattr(cli, "optimize", lambda *a, **k: pytest.fail("optimize ran"))
    assert_refused(capsys, model.parent, [model, flag, "/proc/self/out.x"], "/proc/self", "cannot write")


def test_a_report_that_cannot_be_written_leaves_no_model(capsys, model, monkeypatch):
    """The report failed after the model was written, exit 1 with the model on disk; now the
    model and the report are written both or neither."""
    import onnxopt.cli as cli

    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("r.json"):
            raise PermissionError(13, "Permission denied")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(cli.os, "replace", failing)
    before = files(model.parent)
    code = call(model, "-o", model.parent / "out.onnx", "--report", model.parent / "r.json", "--no-latency", "-q")
    err = capsys.readouterr().err
    assert code == 2 and "--report" in err and "not written" in err and len(err.strip().splitlines()) == 1
    assert files(model.parent) == before


def test_report_goes_through_a_unique_temporary_file(capsys, model):
    """The report went through '<report>.tmp', destroying a file of that name."""
    (model.parent / "r.json.tmp").write_text("keep me")
    assert call(model, "--report", model.parent / "r.json", "--no-latency", "-q") == 0
    assert (model.parent / "r.json.tmp").read_text() == "keep me"
    assert json.loads((model.parent / "r.json").read_text())["ok"] is True
    assert sorted(files(model.parent)) == ["m.onnx", "m.opt.onnx", "r.json", "r.json.tmp"]


def test_no_validate_still_refuses_an_invalid_result(capsys, model, monkeypatch):
    """With --no-validate a model that onnx.checker rejects was written with exit 0."""
    import onnx_ir as ir

    import onnxopt.pipeline as pipeline

    class Break(ir.passes.InPlacePass):
        name = "break"

        def call(self, m):
            next(iter(m.graph)).outputs[0].name = ""  # an output with no name: onnx.checker refuses
            return ir.passes.PassResult(m, True)

    monkeypatch.setitem(pipeline.REGISTRY, "break", Break)
    before = files(model.parent)
    code = call(model, "--passes", "break", "--no-validate", "--no-latency", "-q")
    err = capsys.readouterr().err
    assert code == 1 and "not written" in err and "--no-validate" in err
    assert files(model.parent) == before


def test_max_samples(capsys, model):
    np.savez(model.parent / "d.npz", x=np.concatenate([X] * 10))
    report = model.parent / "r.json"
    assert call(model, "--data", model.parent / "d.npz", "--max-samples", "5", "--report", report, "--no-latency", "-q") == 0
    assert json.loads(report.read_text())["validation"]["samples"] == 5
    assert_refused(capsys, model.parent, [model, "--max-samples", "0"], "--max-samples 0: must be positive")


def test_gemm_with_a_zero_row_weight_runs(capsys, tmp_path):
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.zeros((0, 4), np.float32), "w")
    graph = h.make_graph([h.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 0])], initializer=[w])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "g.onnx")
    assert call(tmp_path / "g.onnx", "--no-latency", "-q") == 0


# -- the Python API refuses what the command line refuses, in the same words ---------------------------


@pytest.mark.parametrize(
    "kwargs,flags,words",
    [
        ({"passes": None}, None, ["--passes", "NoneType"]),
        ({"passes": [3]}, None, ["--passes", "3"]),
        ({"dims": 123}, None, ["--dim", "int"]),
        ({"fix_dims": "batch=1"}, None, ["--fix-dim"]),
        ({"batch_size": 0}, ["--batch-size", "0"], ["--batch-size 0: must be positive"]),
        ({"batch_size": 2.5}, None, ["--batch-size 2.5"]),
        ({"threads": 0}, ["--threads", "0"], ["--threads 0: must be positive"]),
        ({"rtol": -1.0}, ["--rtol", "-1"], ["--rtol -1: must be zero or positive"]),
        ({"atol": float("nan")}, ["--atol", "nan"], ["--atol nan"]),
        ({"latency_budget": -1.0}, ["--latency-budget", "-1"], ["--latency-budget -1: must be zero or positive"]),
        ({"max_drop": 1.0}, ["--max-drop", "1"], ["--max-drop applies to a lossy run"]),
        ({"min_cosine": 0.9}, ["--min-cosine", "0.9"], ["--min-cosine applies to a lossy run"]),
        ({"prune": 1.5}, ["--prune", "1.5"], ["--prune 1.5: must be in [0, 1)"]),
        ({"round_to": 0}, ["--round-to", "0"], ["--round-to 0: must be positive"]),
        ({"max_samples": 0}, ["--max-samples", "0"], ["--max-samples 0: must be positive"]),
        ({"importance": "l3"}, None, ["--importance 'l3'"]),
        ({"validate": "no"}, None, ["--no-validate"]),
        ({"providers": 7}, None, ["--providers"]),
    ],
    ids=lambda v: str(v)[:30],
)
def test_api_bad_arguments_raise_option_error_with_the_cli_message(capsys, model, kwargs, flags, words):
    import onnxopt

    with pytest.raises(onnxopt.OptionError) as exc:
        onnxopt.optimize(model, **{"latency": False, **kwargs})
    message = str(exc.value)
    assert "\n" not in message and all(w in message for w in words), message
    if flags:
        line = assert_refused(capsys, model.parent, [model, "--no-latency", *flags])
        assert line == f"onnxopt: error: {message}"


# -- inputs that are not regular files (adversarial review) ------------------------------------------


def _not_a_file(folder: Path, kind: str) -> Path:
    """A path that names no regular file: a link to /dev/zero (read forever), a FIFO (blocks), a folder."""
    target = folder / f"{kind}.npz"
    if kind == "zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    return target


@pytest.mark.parametrize("kind", ["zero", "fifo"])
@pytest.mark.parametrize("flags", [["--data"], ["--eval"], ["--quantize", "int8", "--calibration"],
                                   ["--prune", "0.5", "--distill", "--train-data"]],
                         ids=["data", "eval", "calibration", "train-data"])
def test_data_that_is_a_device_or_a_pipe_is_refused(capsys, model, kind, flags):
    target = _not_a_file(model.parent, kind)
    assert_refused(capsys, model.parent, [model, "--no-latency", *flags, target], str(target), "not a regular file")


def test_a_data_folder_holding_a_pipe_is_refused(capsys, model):
    (model.parent / "d").mkdir()
    os.mkfifo(model.parent / "d" / "x.npy")
    assert_refused(capsys, model.parent, [model, "--no-latency", "--data", model.parent / "d"], "x.npy", "not a regular file")
    assert_refused(capsys, model.parent, [model, "--no-latency", "--quantize", "int8", "--calibration", model.parent / "d"],
                   "x.npy", "not a regular file")


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_a_model_that_is_a_device_or_a_pipe_is_refused(capsys, folder, kind):
    target = _not_a_file(folder, kind)
    assert_refused(capsys, folder, [target, "--no-latency"], str(target), "not a regular file")


def test_bf16_on_the_cpu_provider_is_refused_before_any_work(capsys, model, monkeypatch):
    """bf16 on CPU converted the whole model, then failed validation (exit 1): onnxruntime's CPU
    provider has no bfloat16 kernels. Now one line, exit 2, from the API too."""
    import onnxopt
    import onnxopt.io as oio

    monkeypatch.setattr(oio, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_refused(capsys, model.parent, [model, "--precision", "bf16", "--no-latency"], "--precision bf16",
                   "CPU provider has no bfloat16 kernels")
    with pytest.raises(onnxopt.errors.OnnxoptError, match="no bfloat16 kernels"):
        onnxopt.optimize(str(model), precision="bf16")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_a_plain_open_not_mkstemps_0600(capsys, model, mask):
    """Every output went through tempfile.mkstemp (mode 0600) and os.replace: a model, report,
    page or recipe unreadable to the group. Now 0666 less the umask, as ``open`` gives."""
    folder = model.parent
    old = os.umask(mask)
    try:
        code = call(model, "--no-latency", "-q", "-o", folder / "o.onnx", "--report", folder / "r.json",
                    "--html", folder / "r.html", "--save-recipe", folder / "r.toml")
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr()
    for name in ("o.onnx", "r.json", "r.html", "r.toml"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_external_data_outputs_get_the_plain_mode_too(tmp_path):
    import onnx_ir as ir

    from onnxopt import io as oio

    old = os.umask(0o022)
    try:
        oio.save_model(ir.serde.deserialize_model(small_cnn()), tmp_path / "o.onnx", external_data=True)
    finally:
        os.umask(old)
    written = sorted(tmp_path.iterdir())
    assert len(written) == 2 and all(p.stat().st_mode & 0o777 == 0o644 for p in written), written


@pytest.mark.parametrize("flags", [
    ["--prune", "0.5"], ["--sparsity", "0.5"], ["--cluster-bits", "4"], ["--lowrank-energy", "0.9"],
    ["--precision", "fp16"], ["--quantize", "int8-dynamic"], ["--quantize", "int8", "--calibration", "DATA"],
    ["--quantize", "auto", "--calibration", "DATA"],
], ids=["prune", "sparsity", "cluster", "lowrank", "fp16", "int8-dynamic", "int8", "auto"])
def test_max_drop_without_labels_is_refused_for_every_lossy_run_before_any_pass(capsys, model, flags, monkeypatch):
    """Only static int8 refused --max-drop on unlabelled data; prune, sparsify, cluster, lowrank,
    fp16 and dynamic int8 ran, then judged a budget they could not measure."""
    import onnxopt.pipeline as pipeline

    data = model.parent / "x.npz"
    np.savez(data, x=X)
    monkeypatch.setattr(pipeline, "model_stats", lambda *a, **k: pytest.fail("the run went past its data checks"))
    args = [model, "--no-latency", "--data", data, "--max-drop", "1", *[data if f == "DATA" else f for f in flags]]
    assert_refused(capsys, model.parent, args, "--max-drop needs labels", "--min-cosine")


DISTILL = ["--prune", "0.5", "--distill", "--train-data", "DATA"]


@pytest.mark.parametrize("flags,words,kwargs", [
    (["--max-drop", "inf", "--prune", "0.5"], "--max-drop inf", dict(max_drop=float("inf"), prune=0.5)),
    (["--max-drop", "nan", "--prune", "0.5"], "--max-drop nan", dict(max_drop=float("nan"), prune=0.5)),
    (["--max-drop", "101", "--prune", "0.5"], "--max-drop 101", dict(max_drop=101.0, prune=0.5)),
    (["--min-cosine", "nan", "--prune", "0.5"], "--min-cosine nan", dict(min_cosine=float("nan"), prune=0.5)),
    (["--latency-budget", "inf"], "--latency-budget inf", dict(latency_budget=float("inf"))),
    (["--atol", "inf"], "--atol inf", dict(atol=float("inf"))),
    (["--rtol", "nan"], "--rtol nan", dict(rtol=float("nan"))),
    (["--threads", "100000"], "--threads 100000", dict(threads=100000)),
    (["--lowrank-ratio", "0"], "--lowrank-ratio 0", dict(lowrank_ratio=0.0)),
    (["--lowrank-ratio", "1"], "--lowrank-ratio 1", dict(lowrank_ratio=1.0)),
    (["--lowrank-energy", "0", "--lowrank-ratio", "0.5"], "--lowrank-energy 0", dict(lowrank_energy=0.0, lowrank_ratio=0.5)),
    ([*DISTILL, "--lr", "inf"], "--lr inf", dict(lr=float("inf"))),
    ([*DISTILL, "--lr", "nan"], "--lr nan", dict(lr=float("nan"))),
    ([*DISTILL, "--lr", "-1"], "--lr -1", dict(lr=-1.0)),
    ([*DISTILL, "--temperature", "inf"], "--temperature inf", dict(temperature=float("inf"))),
    ([*DISTILL, "--alpha", "nan"], "--alpha nan", dict(alpha=float("nan"))),
    ([*DISTILL, "--alpha", "1.5"], "--alpha 1.5", dict(alpha=1.5)),
    ([*DISTILL, "--epochs", "0"], "--epochs 0", dict(epochs=0)),
    ([*DISTILL, "--steps", "-1"], "--steps -1", dict(steps=-1)),
    ([*DISTILL, "--seed", "-1"], "--seed -1", dict(seed=-1)),
    ([*DISTILL, "--seed", str(2**70)], "--seed", dict(seed=2**70)),
])
def test_non_finite_negative_and_out_of_range_numbers_are_one_line(capsys, model, monkeypatch, flags, words, kwargs):
    """inf passed every check (--lr inf diverged after the passes, --latency-budget inf and --atol inf
    were taken), a negative or huge --seed was numpy's or torch's traceback, --lowrank-ratio 0 the
    pass's ValueError: each is now refused before any work, the same way from the API."""
    import onnxopt
    import onnxopt.io as oio

    data = model.parent / "x.npz"
    np.savez(data, x=X, labels=np.zeros(len(X), np.int64))
    monkeypatch.setattr(oio, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = [model, "--no-latency", *[data if f == "DATA" else f for f in flags]]
    assert_refused(capsys, model.parent, args, words)
    if "--train-data" in flags:
        kwargs = dict(prune=0.5, distill=True, train_data=str(data), **kwargs)
    with pytest.raises(onnxopt.errors.OptionError, match=words.split()[0]):
        onnxopt.optimize(str(model), **kwargs)


@pytest.mark.parametrize("args,words", [
    (["bench", "MODEL", "--budget", "inf"], "--budget inf"),
    (["sweep", "MODEL", "--grid", "GRID", "--latency-budget", "inf"], "--latency-budget inf"),
])
def test_bench_and_sweep_refuse_an_infinite_time_budget(capsys, model, args, words):
    grid = model.parent / "g.toml"
    grid.write_text("prune = [0.5]\n")
    before = files(model.parent)
    code = call(*[{"MODEL": model, "GRID": grid}.get(a, a) for a in args], "--out" if "sweep" in args else "-q",
                *([model.parent / "sw"] if "sweep" in args else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert files(model.parent) == before


_NO_TORCH = """
import contextlib, io, json, sys
sys.modules["torch"] = None  # as if torch were not installed
from onnxopt.cli import main
import onnxopt
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    results.append([code, err.getvalue()])
try:
    onnxopt.optimize(sys.argv[2], prune=0.5, distill=True, train_data=sys.argv[3], latency=False)
except onnxopt.errors.OnnxoptError as exc:
    results.append([2, "onnxopt: error: " + str(exc) + "\\n"])
print(json.dumps(results))
"""


def test_without_torch_every_training_feature_is_one_line_naming_the_extra(folder, model):
    """--distill and --preset deep-compression ran every pass, then died in 'import torch' with a
    traceback; now each training feature says, before any work, what to install."""
    data = folder / "x.npz"
    np.savez(data, x=X, labels=np.zeros(len(X), np.int64))
    base = [str(model), "--no-latency", "-q", "-o", str(folder / "o.onnx")]
    cases = [
        (["--prune", "0.5", "--distill", "--train-data", str(data)], "--distill"),
        (["--preset", "deep-compression", "--eval", str(data), "--train-data", str(data)], "--preset deep-compression"),
        (["--prune", "0.5", "--importance", "taylor", "--calibration", str(data)], "--importance taylor"),
        (["--prune", "0.5", "--importance", "fisher", "--calibration", str(data)], "--importance fisher"),
    ]
    before = files(folder)
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps([base + args for args, _ in cases]), str(model),
                          str(data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    for (code, err), what in zip(results, [w for _, w in cases] + ["--distill"]):
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"onnxopt: error: {what} needs torch") and "pip install 'onnxopt[train]'" in err, err
    assert files(folder) == before


@pytest.mark.parametrize("kind,words", [
    ("folder", "is a folder"), ("empty", "empty file"), ("truncated", "not a valid ONNX model"),
    ("fifo", "not a regular file"), ("data-missing", "not found next to the model"),
    ("data-fifo", "is not a regular file"),
])
@pytest.mark.parametrize("command", ["optimize", "bench", "sweep"])
def test_a_bad_model_path_is_one_line_exit_2_in_every_command(capsys, folder, kind, words, command):
    """The sweep said 'no such model file' of a folder or a FIFO, an external-data FIFO was 'not
    found': each command now gives the loader's own line."""
    if kind.startswith("data"):
        path = external_model(folder)
        (path.parent / "w.bin").unlink()
        if kind == "data-fifo":
            os.mkfifo(path.parent / "w.bin")
    else:
        path = folder / "bad.onnx"
        if kind == "folder":
            path.mkdir()
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes((folder / "m.onnx").read_bytes()[:300])
        else:
            os.mkfifo(path)
    grid = folder / "g.toml"
    grid.write_text("prune = [0.5]\n")
    args = {"optimize": [path, "--no-latency"], "bench": ["bench", path, "-q"],
            "sweep": ["sweep", path, "--grid", grid, "--out", folder / "sw"]}[command]
    assert_refused(capsys, folder, args, words)

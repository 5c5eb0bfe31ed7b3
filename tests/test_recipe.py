"""onnxopt.recipe: one value for a run's whole configuration, read from and written to TOML."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import Recipe
from onnxopt.cli import main
from onnxopt.errors import OptionError
from onnxopt.passes import QuantizeQDQ

DIGITS = "models/digits/digits_cnn.onnx"
TEST = "models/digits/digits_test.npz"


def test_toml_round_trip_keeps_every_field_that_differs_from_the_defaults():
    recipe = Recipe(passes=["simplify", "fold-bn", "share-init"], data="d.npz", dims={"batch": 2}, fix_dims=["seq=16"],
                    quantize="int8", calibration="c.npz", calibrate="percentile", percentile=99.9, activations="int8",
                    per_tensor=True, bias_correction=False, exclude=["Softmax", "head*"], max_drop=0.5, latency=False,
                    speed_fallback=False, target="avx2", protect_first=False, rtol=1e-4, threads=2)
    text = recipe.to_toml()
    back = Recipe.from_toml_text(text)
    assert back.fix_dims == {"seq": 16} and back.dims == {"batch": 2}
    for name in ("passes", "data", "quantize", "calibration", "calibrate", "percentile", "activations", "per_tensor",
                 "bias_correction", "exclude", "max_drop", "latency", "speed_fallback", "target", "protect_first",
                 "rtol", "threads"):
        assert list(getattr(back, name)) == list(getattr(recipe, name)) if isinstance(getattr(recipe, name), list) \
            else getattr(back, name) == getattr(recipe, name), name
    assert Recipe().to_toml().strip().splitlines()[1:] == []  # the defaults write nothing


def test_the_quantize_preset_and_its_options_go_into_the_pass_object():
    passes = Recipe(quantize="int8", activations="int8", exclude=["Softmax"], per_tensor=True).pass_list()
    assert passes[:3] == ["simplify", "fold-bn", "share-init"]
    q = passes[3]
    assert isinstance(q, QuantizeQDQ) and q.activations == "int8" and not q.per_channel and list(q.exclude) == ["Softmax"]
    assert Recipe(passes=["simplify"], quantize="int8").pass_list()[0] == "simplify"
    assert isinstance(Recipe(passes=["simplify"], quantize="int8").pass_list()[1], QuantizeQDQ)


@pytest.mark.parametrize("text,words", [
    ("passes = [\"simplify\"]\nbatchsize = 3\n", ["unknown option", "'batchsize'"]),
    ("batch_size = 0\n", ["--batch-size 0", "must be positive"]),
    ("batch_size = \"3\"\n", ["--batch-size", "whole number"]),
    ("percentile = 20.0\n", ["--percentile"]),
    ("activations = \"int8\"\n", ["apply to --quantize int8"]),
    ("quantize = \"int2\"\n", ["--quantize 'int2'"]),
    ("passes = [\"simplify\", \"nope\"]\n", []),
    ("this is = not toml [\n", ["not valid TOML"]),
    # a path field of another TOML type reached os.path.realpath/isfile: TypeError
    ("data = 5\n", ["data = 5: give a file path as a string"]),
    ("calibration = [\"c.npz\"]\nquantize = \"int8\"\n", ["calibration = ['c.npz']"]),
    ("distill = true\nprune = 0.3\ntrain_data = {input = \"x\"}\n", ["train_data = {'input': 'x'}"]),
    ("data = 1979-05-27\n", ["data = datetime.date"]),
])
def test_a_bad_recipe_file_is_one_line_and_exit_2(tmp_path, capsys, text, words):
    path = tmp_path / "r.toml"
    path.write_text(text)
    code = main([DIGITS, "--recipe", str(path), "-o", str(tmp_path / "o.onnx"), "--no-latency"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("onnxopt: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o.onnx").exists()


def test_save_recipe_then_replay_gives_the_same_run_and_flags_win(tmp_path):
    out, saved = tmp_path / "a.onnx", tmp_path / "run.toml"
    assert main([DIGITS, "--passes", "simplify,fold-bn", "--data", TEST, "--no-latency", "-o", str(out),
                 "--save-recipe", str(saved), "-q"]) == 0
    text = saved.read_text()
    assert 'passes = ["simplify", "fold-bn"]' in text and "latency = false" in text and TEST in text
    report = tmp_path / "r.json"
    assert main([DIGITS, "--recipe", str(saved), "-o", str(tmp_path / "b.onnx"), "--report", str(report), "-q"]) == 0
    first, second = onnx.load(out), onnx.load(tmp_path / "b.onnx")
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in second.graph.node]
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["simplify", "fold-bn"] and data["latency"] is None
    # a flag given on the command line takes the place of the file's value
    assert main([DIGITS, "--recipe", str(saved), "--passes", "simplify", "-o", str(tmp_path / "c.onnx"),
                 "--report", str(report), "-q"]) == 0
    assert [p["name"] for p in json.loads(report.read_text())["passes"]] == ["simplify"]


def test_a_failed_run_writes_no_recipe_and_no_input_is_overwritten(tmp_path, monkeypatch):
    from onnxopt.passes import REGISTRY
    from tests.test_pipeline import BreakWeights

    monkeypatch.setitem(REGISTRY, "break", BreakWeights)
    saved = tmp_path / "run.toml"
    assert main([DIGITS, "--passes", "break", "--no-latency", "-o", str(tmp_path / "o.onnx"),
                 "--save-recipe", str(saved), "-q"]) == 1
    assert not saved.exists()
    recipe = tmp_path / "in.toml"
    recipe.write_text("latency = false\n")
    assert main([DIGITS, "--recipe", str(recipe), "--save-recipe", str(recipe), "-o", str(tmp_path / "o.onnx")]) == 2
    assert recipe.read_text() == "latency = false\n"


def test_optimize_takes_a_recipe_and_keywords_override_it():
    recipe = Recipe(passes=["simplify"], latency=False, data=TEST)
    result = onnxopt.optimize(DIGITS, recipe, passes=["simplify", "fold-bn"])
    assert [p.name for p in result.report.passes] == ["simplify", "fold-bn"] and result.ok
    with pytest.raises(OptionError, match="unknown option"):
        onnxopt.optimize(DIGITS, recipe, batchsize=3)
    with pytest.raises(OptionError, match="passes given twice"):
        onnxopt.optimize(DIGITS, ["simplify"], passes=["fold-bn"])


def test_a_recipe_with_arrays_or_pass_objects_cannot_be_saved():
    with pytest.raises(OptionError, match="cannot hold"):
        Recipe(data={"x": np.zeros((1, 1, 8, 8), np.float32)}).to_toml()
    from tests.test_pipeline import BreakWeights

    with pytest.raises(OptionError, match="REGISTRY"):
        Recipe(passes=[BreakWeights()]).to_toml()


@pytest.mark.parametrize("flags,pass_name", [(["--cluster-bits", "3"], "cluster"), (["--sparsity", "0.5"], "sparsify"),
                                             (["--lowrank-energy", "0.95"], "lowrank")])
def test_a_compression_flag_adds_its_lossy_pass_reported_as_changed(tmp_path, flags, pass_name):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([DIGITS, *flags, "--data", TEST, "--no-latency", "-o", str(out), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    last = data["passes"][-1]
    assert last["name"] == pass_name
    if pass_name == "lowrank" and not last["modified"]:  # on 8x8 images every pair timed slower than its one conv
        timed = last["details"]["latency_us"]
        assert timed and all(t["after"] >= t["before"] for t in timed.values())
        assert any("left alone as not faster" in n for n in data["notes"])
        return
    assert last["modified"]
    assert data["validation"]["outputs"][0]["max_abs"] > 0  # lossy: the outputs moved, and the run still succeeds
    assert data["ok"] is True and "accuracy" in json.dumps(data["validation"])
    from pathlib import Path

    assert out.stat().st_size <= Path(DIGITS).stat().st_size


@pytest.mark.parametrize("flags,words", [(["--cluster-bits", "9"], "--cluster-bits 9"), (["--sparsity", "1"], "--sparsity 1"),
                                         (["--lowrank-energy", "0"], "--lowrank-energy 0"),
                                         (["--lowrank-ratio", "2"], "--lowrank-ratio 2")])
def test_bad_compression_values_are_one_line(tmp_path, capsys, flags, words):
    assert main([DIGITS, *flags, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


# -- the modes wired through the recipe: distillation, dynamic int8, int4 --------------------------

CALIB = "models/digits/digits_calib.npz"


def test_distill_wins_back_accuracy_that_pruning_cost_and_keeps_the_graph(tmp_path):
    pytest.importorskip("torch")
    pruned = onnxopt.optimize(DIGITS, prune=0.5, data=TEST, latency=False)
    result = onnxopt.optimize(DIGITS, prune=0.5, data=TEST, latency=False, distill=True, train_data=CALIB, epochs=20)
    record = result.report.passes[-1]
    assert record.name == "distill" and record.details["steps"] > 0
    before, after = pruned.report.validation.accuracy_after, result.report.validation.accuracy_after
    assert after > before + 0.1, (before, after)  # 27% pruned; distilled on 180 unlabeled images
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in pruned.model.graph]
    assert {k: v.shape for k, v in result.model.graph.initializers.items()} == \
        {k: v.shape for k, v in pruned.model.graph.initializers.items()}


def test_distill_options_are_checked_before_work(tmp_path, capsys):
    for flags, words in ((["--distill"], "needs --train-data"), (["--epochs", "3"], "apply to --distill"),
                         (["--distill", "--train-data", CALIB, "--epochs", "2", "--steps", "3"], "not both")):
        assert main([DIGITS, *flags, "-o", str(tmp_path / "o.onnx")]) == 2
        assert words in capsys.readouterr().err


def test_intermediate_matching_flags_round_trip_and_are_checked(tmp_path, capsys):
    pytest.importorskip("torch")
    for features in ("auto", ["a", "b"]):
        recipe = Recipe(prune=0.5, distill=True, train_data=CALIB, distill_features=features, feature_weight=0.5)
        assert Recipe.from_toml_text(recipe.to_toml()) == recipe
    out = str(tmp_path / "o.onnx")
    assert main([DIGITS, "--prune", "0.5", "--distill", "--train-data", CALIB, "--distill-features", "a, b",
                 "--save-recipe", str(tmp_path / "r.toml"), "--no-validate", "--no-latency", "-q", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--distill-features: 'a' is computed by no node of the input model" in err
    for flags, words in ((["--distill-features", "auto"], "apply to --distill"),
                         (["--distill", "--train-data", CALIB, "--feature-weight", "2"], "applies to --distill-features"),
                         (["--distill", "--train-data", CALIB, "--distill-features", "auto", "--feature-weight", "0"],
                          "must be a finite number above 0")):
        assert main([DIGITS, *flags, "-o", out]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("mode,op", [("int8-dynamic", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_transformer_modes_from_the_command_line(tmp_path, mode, op):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    model = "models/zoo/transformer_encoder.onnx"
    assert main([model, "--quantize", mode, "--no-latency", "-o", str(out), "--report", str(report), "--dim", "seq=16", "-q"]) == 0
    saved = onnx.load(out)
    assert any(n.op_type == op for n in saved.graph.node)
    data = json.loads(report.read_text())
    assert data["ok"] and data["validation"]["outputs"][0]["cosine"] > 0.9  # lossy: reported, with its cost
    fused = next(n for n in data["notes"] if n.startswith("fused kernels"))  # what onnxruntime runs it on
    assert ("MatMulNBits" if mode == "int4" else "MatMulIntegerToFloat") in fused
    assert "float weights still read by MatMul/Gemm/Attention: 0 " in fused
    assert out.stat().st_size < 0.6 * __import__("os").path.getsize(model)


def test_dynamic_int8_smoothing_and_activation_scales_from_the_command_line(tmp_path, capsys):
    """--smooth-quant with int8-dynamic: statistics from --calibration, one smoothing Mul per activation
    in the saved model, the report's pass record says how many; per tensor on request; bad pairs refused."""
    model = "models/zoo/transformer_encoder.onnx"
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.integers(0, 100, (8, 16)).astype(np.int64))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([model, "--quantize", "int8-dynamic", "--smooth-quant", "0.5", "--calibration", str(calib),
                 "--no-latency", "-o", str(out), "--report", str(report), "--dim", "seq=16", "-q"]) == 0
    record = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "quantize-dynamic")
    assert record["details"]["smoothed"] and "smoothed (alpha 0.5)" in record["summary"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulIntegerToFloat") > 0 and "DynamicQuantizeLinear" not in ops
    assert main([model, "--quantize", "int8-dynamic", "--dynamic-activations", "tensor", "--no-latency", "-o",
                 str(out), "--dim", "seq=16", "-q"]) == 0
    assert "DynamicQuantizeLinear" in [n.op_type for n in onnx.load(out).graph.node]
    assert main([model, "--passes", "simplify,quantize-dynamic", "--smooth-quant", "0.5", "--calibration", str(calib),
                 "--no-latency", "-o", str(out), "--dim", "seq=16", "-q"]) == 0  # a listed pass takes the options
    assert "MatMulIntegerToFloat" in [n.op_type for n in onnx.load(out).graph.node]
    assert main([model, "--quantize", "auto", "--dynamic-activations", "row", "--calibration", str(calib),
                 "--no-latency", "-o", str(out), "--dim", "seq=16", "-q"]) == 0  # static's candidate ignores it
    capsys.readouterr()
    for flags, words in ((["--quantize", "int8-dynamic", "--smooth-quant", "0.5"], "needs --calibration"),
                         (["--quantize", "int8-dynamic", "--smooth-quant", "0.5", "--dynamic-activations", "tensor",
                           "--calibration", str(calib)], "needs --dynamic-activations row"),
                         (["--quantize", "int4", "--dynamic-activations", "row"], "applies to --quantize int8-dynamic")):
        assert main([model, *flags, "-o", str(tmp_path / "x.onnx"), "--dim", "seq=16", "-q"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
        assert not (tmp_path / "x.onnx").exists()


def test_precision_fp16_from_the_command_line_halves_the_file_and_times_without_crashing(tmp_path):
    """The zoo transformer in float16 with latency timed: onnxruntime 1.32 crashed the process
    (SIGSEGV) on its fully optimized CPU session unless MatmulTransposeFusion is left out."""
    import subprocess
    import sys

    model = "models/zoo/transformer_encoder.onnx"
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", model, "--precision", "fp16", "--latency-budget", "0.3",
                           "-o", str(out), "--report", str(report), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    data = json.loads(report.read_text())
    record = data["passes"][-1]
    assert record["name"] == "precision" and data["latency"] is not None
    assert out.stat().st_size < 0.6 * __import__("os").path.getsize(model)
    saved = onnx.load(out)
    assert saved.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert saved.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


@pytest.mark.parametrize("kind,words", [
    ("zero", ["not a regular file"]),
    ("fifo", ["not a regular file"]),
    ("folder", ["is a folder"]),
    ("big", ["more than 1 MiB"]),
    ("latin1", ["not UTF-8"]),
    ("toml", ["not valid TOML"]),
])
@pytest.mark.parametrize("command", ["recipe", "grid"])
def test_recipe_and_grid_files_are_read_through_one_guarded_helper(tmp_path, capsys, kind, words, command):
    """--recipe /dev/zero ran out of memory, a FIFO blocked forever, a 2 MiB file was read whole:
    ``read_toml`` reads both kinds of file, and refuses each in one line naming the file."""
    import os

    from onnxopt.sweep_cli import main as sweep_main

    path = tmp_path / "f.toml"
    if kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "big":
        path.write_text("# " + "x" * 2**20 + "\nprune = [0.1]\n")
    elif kind == "latin1":
        path.write_bytes("exclude = [\"caf\xe9\"]\n".encode("latin-1"))
    else:
        path.write_text("prune = [\n")
    out = tmp_path / "o.onnx"
    if command == "recipe":
        code = main([DIGITS, "--recipe", str(path), "-o", str(out), "--no-latency"])
        flag = "--recipe"
    else:
        code = sweep_main([DIGITS, "--grid", str(path), "--out", str(tmp_path / "sweep")])
        flag = "--grid"
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"onnxopt: error: {flag} {path}"), err
    assert all(w in err for w in words), err
    assert not out.exists() and not (tmp_path / "sweep").exists()


NASTY = ['say "hi"', "back\\slash", "new\nline", "café ✓", "tab\tcr\rnul\x00esc\x1b del\x7f", "\u2028sep", "'single'",
         "trailing\\"]


def test_any_string_round_trips_through_the_toml_file():
    """A CR, NUL, ESC or DEL was written raw (TOML refuses them), and a non-ASCII dims name as a bare
    key (TOML's bare keys are ASCII): the file did not read back."""
    recipe = Recipe(quantize="int8", calibration=NASTY[2], exclude=NASTY, outputs=NASTY, data=NASTY[4],
                    dims={name: i + 1 for i, name in enumerate(NASTY)})
    back = Recipe.from_toml_text(recipe.to_toml())
    assert list(back.exclude) == NASTY and list(back.outputs) == NASTY
    assert back.calibration == NASTY[2] and back.data == NASTY[4]
    assert back.dims == {name: i + 1 for i, name in enumerate(NASTY)}
    assert back.to_toml() == recipe.to_toml()
    with pytest.raises(OptionError, match="not valid Unicode"):
        Recipe(data="bad\udcff.npz").to_toml()


def test_save_recipe_round_trips_a_data_path_with_quotes_backslashes_newlines_and_accents(tmp_path):
    folder = tmp_path / 'd "q" \\ é\nx'
    folder.mkdir()
    data = folder / "t\r.npz"
    data.write_bytes(open(TEST, "rb").read())
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    assert main([DIGITS, "--data", str(data), "--no-latency", "-q", "-o", str(tmp_path / "o.onnx"),
                 "--save-recipe", str(first)]) == 0
    assert Recipe.from_toml(first).data == str(data)
    assert main([DIGITS, "--recipe", str(first), "--no-latency", "-q", "-o", str(tmp_path / "o2.onnx"),
                 "--save-recipe", str(second)]) == 0
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")


def test_int4_gptq_round_trips_through_toml(tmp_path):
    recipe = Recipe(quantize="int4", int4_method="gptq", int4_block_size=128, calibration=CALIB)
    back = Recipe.from_toml_text(recipe.to_toml())
    assert (back.quantize, back.int4_method, back.int4_block_size, back.calibration) == ("int4", "gptq", 128, CALIB)
    assert back.pass_list()[-1].method == "gptq"
    with pytest.raises(OptionError, match="gptq needs --calibration"):
        Recipe.from_toml_text('quantize = "int4"\nint4_method = "gptq"\n')
    # and from the command line: --save-recipe writes it, --recipe replays it
    model, saved = "models/zoo/transformer_encoder.onnx", tmp_path / "run.toml"
    calib = tmp_path / "ids.npz"
    np.savez(calib, input=np.random.default_rng(0).integers(0, 50, (4, 16)).astype(np.int64))
    report = tmp_path / "r.json"
    assert main([model, "--quantize", "int4", "--int4-method", "gptq", "--calibration", str(calib), "--no-latency",
                 "--dim", "seq=16", "-o", str(tmp_path / "a.onnx"), "--save-recipe", str(saved), "-q"]) == 0
    assert 'int4_method = "gptq"' in saved.read_text()
    assert main([model, "--recipe", str(saved), "-o", str(tmp_path / "b.onnx"), "--report", str(report), "-q"]) == 0
    summary = json.loads(report.read_text())["passes"][-1]["summary"]
    assert summary.startswith("int4 gptq"), summary

"""The deep-compression preset: the search's choice (stubbed runs) and one real run on the digits CNN."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onnxopt import presets
from onnxopt.cli import main as cli_main
from onnxopt.errors import OptionError
from onnxopt.recipe import Recipe
from onnxopt.report import Report, Validation, render_table

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


def _report(size=None, accuracy=None) -> Report:
    stats = SimpleNamespace(nodes=1, params=1, bytes=1, macs=1, op_counts={})
    report = Report(model="m", output=None, before=stats, after=stats)
    report.sizes = {"before": {"deep_compression_bytes": 1000}, "after": {"deep_compression_bytes": size, "weight_gzip9": size}}
    if accuracy is not None:
        report.validation = Validation(ok=True, providers=["cpu"], samples=10, batches=1, rtol=None, atol=0.0, data="d",
                                       synthetic=False, outputs=[], accuracy_before=0.99, accuracy_after=accuracy)
    return report


@pytest.fixture
def stubbed(monkeypatch):
    """Sizes: more pruning, sparsity and fewer bits are smaller; accuracy by a table; calls recorded."""
    calls = []
    accuracy = {}

    def size(s):
        return int(1000 * (1 - s["prune"]) * (1 - s["sparsity"]) * s["cluster_bits"])

    def optimize(model, recipe, progress=None):
        s = {"prune": recipe.prune, "sparsity": recipe.sparsity, "cluster_bits": recipe.cluster_bits}
        calls.append(("optimize", s, recipe.max_drop))
        acc = None if not recipe.validate else accuracy.get(tuple(s.values()), 0.5)
        return SimpleNamespace(report=_report(size(s), acc), model=None)

    def run_setting(model, base, settings, cache, progress, tail=None):
        calls.append(("run", dict(settings)))
        return SimpleNamespace(report=_report(size(settings), accuracy.get(tuple(settings.values()), 0.5)), model=None)

    monkeypatch.setattr(presets, "optimize", optimize)
    monkeypatch.setattr(presets, "_run_setting", run_setting)
    monkeypatch.setattr(presets, "_require_labels", lambda model, recipe: None)
    return calls, accuracy


RECIPE = Recipe(data="eval.npz", train_data="train.npz", distill=True)
GRID = {"prune": (0.25, 0.5), "sparsity": (0.5,), "cluster_bits": (4, 5)}


def test_the_smallest_setting_within_the_budget_wins_and_larger_ones_never_run(stubbed):
    calls, accuracy = stubbed
    accuracy.update({(0.5, 0.5, 4): 0.95, (0.5, 0.5, 5): 0.985, (0.25, 0.5, 4): 0.99, (0.25, 0.5, 5): 0.99})
    result = presets.deep_compression("m.onnx", RECIPE, grid=GRID, stages=False)
    runs = [c[1] for c in calls if c[0] == "run"]
    # sized 4 ways; distilled smallest first: (0.5, 4) misses by 4 points, (0.5, 5) meets within 1
    assert len([c for c in calls if c[0] == "optimize"]) == 4
    assert runs == [{"prune": 0.5, "sparsity": 0.5, "cluster_bits": 4}, {"prune": 0.5, "sparsity": 0.5, "cluster_bits": 5}]
    search = result.report.search
    assert search["chosen"] == {"prune": 0.5, "sparsity": 0.5, "cluster_bits": 5}
    assert [t["met"] for t in search["trials"]] == [False, True, None, None]
    assert [t["deep_compression_bytes"] for t in search["trials"]] == sorted(t["deep_compression_bytes"] for t in search["trials"])
    assert result.report.validation.ok and "budget" in result.report.validation.criterion
    assert "deep-compression: settings by size" in render_table(result.report)


def test_when_no_setting_meets_the_budget_the_mildest_runs_again_under_the_per_layer_budget(stubbed):
    calls, accuracy = stubbed
    accuracy.update({(0.25, 0.5, 5): 0.9})  # the best of a bad lot; all others 0.5
    result = presets.deep_compression("m.onnx", RECIPE, grid=GRID, stages=False)
    assert len([c for c in calls if c[0] == "run"]) == 4
    last = calls[-1]
    assert last[0] == "optimize" and last[1] == {"prune": 0.25, "sparsity": 0.5, "cluster_bits": 5} and last[2] == 1.0
    assert result.report.search["chosen"] == {"prune": 0.25, "sparsity": 0.5, "cluster_bits": 5}


def test_the_preset_needs_eval_and_train_data():
    with pytest.raises(OptionError, match="--eval"):
        presets.deep_compression("m.onnx", Recipe(), grid=GRID)


def test_cli_preset_on_digits_writes_sizes_and_the_search(tmp_path):
    from models.digits.train import load_splits
    from onnxopt.cli import main

    x, y = load_splits()["train"]
    np.savez(tmp_path / "train.npz", input=x[:128], labels=y[:128])
    code = main([str(DIGITS / "digits_cnn.onnx"), "--preset", "deep-compression", "--train-data", str(tmp_path / "train.npz"),
                 "--eval", str(DIGITS / "digits_test.npz"), "--steps", "2", "--max-drop", "100", "--no-latency", "-q",
                 "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    search = report["search"]
    assert search["trials"][0]["met"] is True and all(t["met"] is None for t in search["trials"][1:])
    assert [s["stage"] for s in search["stages"]][-3:] == ["distill", "cluster", "distill"]
    smallest = min(t["deep_compression_bytes"] for t in search["trials"])
    after = report["sizes"]["after"]["deep_compression_bytes"]
    assert abs(after - smallest) <= 0.05 * smallest  # sized before distillation; clusters of distilled weights
    assert after < report["sizes"]["before"]["deep_compression_bytes"] / 10


@pytest.mark.parametrize("flags,words", [
    (["--eval", str(DIGITS / "digits_test.npz")], ["--preset deep-compression needs --train-data"]),
    (["--train-data", str(DIGITS / "digits_test.npz")], ["--preset deep-compression needs --eval"]),
    ([], ["--preset deep-compression needs --train-data", "and --eval"]),
])
def test_the_cli_preset_without_its_data_says_what_it_needs(tmp_path, capsys, flags, words):
    """Without --train-data the preset said '--distill needs --train-data', a flag the user never gave."""
    out = tmp_path / "o.onnx"
    code = cli_main([str(DIGITS / "digits_cnn.onnx"), "--preset", "deep-compression", "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("onnxopt: error: "), err
    assert all(w in err for w in words) and "--distill" not in err, err
    assert not out.exists()


def test_the_preset_refuses_unlabelled_eval_data_before_building_any_setting(tmp_path, capsys, monkeypatch):
    """Unlabelled --eval was found out after every setting was sized and one was distilled."""
    monkeypatch.setattr(presets, "optimize", lambda *a, **k: pytest.fail("a setting was built"))
    out = tmp_path / "o.onnx"
    code = cli_main([str(DIGITS / "digits_cnn.onnx"), "--preset", "deep-compression", "-o", str(out),
                     "--eval", str(DIGITS / "digits_calib.npz"), "--train-data", str(DIGITS / "digits_calib.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs labels in the --eval data" in err, err
    assert not out.exists()

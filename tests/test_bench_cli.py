"""``onnxopt bench``: exit codes, the table, JSON for CI, inputs and settings, progress, errors in one line."""

from __future__ import annotations

import io as text_io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxopt import cli
from onnxopt.bench import bench
from onnxopt.testing import matmul_chain

BUDGET = "5"

DYNAMIC = """
<ir_version: 8, opset_import: ["" : 17]>
dynamic (float[N, 64] x, float[N, 64] z) => (float[N, 64] y) {
    s = Add(x, z)
    y = Tanh(s)
}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    onnx.save(matmul_chain(4), folder / "base.onnx")
    onnx.save(matmul_chain(4), folder / "same.onnx")
    onnx.save(matmul_chain(5), folder / "slow.onnx")
    onnx.save(matmul_chain(2), folder / "fast.onnx")
    onnx.save(onnx.parser.parse_model(DYNAMIC), folder / "dynamic.onnx")
    onnx.save(matmul_chain(2, rows=8, size=32), folder / "other.onnx")
    return folder


def call(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["bench", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_slower_candidate_exits_1_with_figures_and_json(capsys, models, tmp_path):
    out_json = tmp_path / "r.json"
    code, out, err = call(capsys, models / "slow.onnx", "--vs", models / "base.onnx", "--budget", BUDGET, "--json", out_json)
    assert code == 1, out + err
    assert "verdict: SLOWER" in out and "ratio candidate/baseline" in out
    assert "median" in out and "p90" in out and "baseline" in out and "candidate" in out
    assert err == ""  # no progress line when stderr is not a terminal
    data = json.loads(out_json.read_text())
    assert data["verdict"] == "slower" and data["regression"] is True and data["conclusive"] is True
    assert data["ratio_low"] > 1.05 and data["ratio_low"] <= data["ratio"] <= data["ratio_high"]
    assert data["baseline"]["median_ms"] > 0 and data["candidate"]["median_ms"] > data["baseline"]["median_ms"]
    assert data["settings"] == dict(providers=["CPUExecutionProvider"], threads=1, inter_threads=1, optimization="all",
                                    spinning=False, io_binding=False, batch=256, data="synthetic")
    assert data["machine"]["cores"] == os.cpu_count() and data["machine"]["cpu"]
    assert data["max_slowdown"] == 0.05 and data["confidence"] == 0.95


def test_identical_and_faster_candidates_exit_0(capsys, models):
    code, out, _ = call(capsys, models / "same.onnx", "--vs", models / "base.onnx", "--budget", BUDGET)
    assert code == 0 and "verdict: no difference at 5%" in out, out
    code, out, _ = call(capsys, models / "fast.onnx", "--vs", models / "base.onnx", "--budget", BUDGET)
    assert code == 0 and "verdict: faster" in out, out


def test_a_generous_threshold_lets_a_slowdown_pass(capsys, models):
    code, out, _ = call(capsys, models / "slow.onnx", "--vs", models / "base.onnx", "--budget", BUDGET, "--max-slowdown", "50%")
    assert code == 0 and "no difference at 50%" in out, out


def test_single_model_gives_absolute_figures_and_names_the_machine(capsys, models, tmp_path):
    out_json = tmp_path / "one.json"
    code, out, _ = call(capsys, models / "base.onnx", "--budget", "3", "--json", out_json)
    assert code == 0
    for words in ("median", "p90", "throughput", "samples/s", "machine:", "threads 1 intra-op", "same machine"):
        assert words in out, out
    data = json.loads(out_json.read_text())
    assert data["verdict"] is None and data["baseline"] is None and data["regression"] is False
    assert data["candidate"]["throughput"] == pytest.approx(256 / (data["candidate"]["median_ms"] / 1e3))
    assert any("same machine" in n for n in data["notes"])
    assert data["seconds"] <= 3.5


def test_quiet_prints_nothing_and_the_exit_code_still_tells(capsys, models):
    code, out, err = call(capsys, models / "slow.onnx", "--vs", models / "base.onnx", "--budget", BUDGET, "-q")
    assert (code, out, err) == (1, "", "")


class _Terminal(text_io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal(monkeypatch, models):
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cli.main(["bench", str(models / "base.onnx"), "--budget", "1.5", "-q"]) == 0
    assert stderr.getvalue() == ""  # --quiet wins over a terminal
    assert cli.main(["bench", str(models / "base.onnx"), "--budget", "1.5"]) == 0
    assert "onnxopt: timing:" in stderr.getvalue() and "blocks" in stderr.getvalue()
    assert stderr.getvalue().endswith("\r")  # the line is cleared at the end


def test_settings_reach_the_sessions(capsys, models, tmp_path):
    out_json = tmp_path / "s.json"
    code, out, _ = call(capsys, models / "base.onnx", "--budget", "1", "--threads", "2", "--inter-threads", "0",
                        "--optimization", "basic", "--spin", "--json", out_json)
    assert code == 0, out
    settings = json.loads(out_json.read_text())["settings"]
    assert settings == dict(providers=["CPUExecutionProvider"], threads=2, inter_threads=0, optimization="basic",
                                 spinning=True, io_binding=False, batch=256, data="synthetic")
    assert "threads 2 intra-op / default inter-op, spinning, optimization basic" in out


def test_batch_and_dims_shape_synthetic_inputs(models):
    result = bench(models / "dynamic.onnx", batch=8, budget_seconds=1)
    assert result.settings["batch"] == 8 and result.settings["data"] == "synthetic"
    result = bench(models / "dynamic.onnx", dims=["N=3"], budget_seconds=1)
    assert result.settings["batch"] == 3


def test_data_file_feeds_both_models(capsys, models, tmp_path):
    data = tmp_path / "inputs.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((10, 64)).astype(np.float32), z=rng.standard_normal((10, 64)).astype(np.float32))
    out_json = tmp_path / "d.json"
    code, out, _ = call(capsys, models / "dynamic.onnx", "--vs", models / "dynamic.onnx", "--data", data,
                        "--batch", "4", "--budget", "3", "--json", out_json)
    assert code == 0, out
    result = json.loads(out_json.read_text())
    assert result["settings"]["batch"] == 4 and result["settings"]["data"] == str(data)
    assert any("first of 3 batches" in n for n in result["notes"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.onnx"], ["missing.onnx", "no such file"]),
        (["base.onnx", "--vs", "missing.onnx"], ["missing.onnx"]),
        (["base.onnx", "--max-slowdown", "5"], ["--max-slowdown", "5%"]),
        (["base.onnx", "--max-slowdown", "lots"], ["--max-slowdown"]),
        (["base.onnx", "--threads", "-1"], ["--threads"]),
        (["base.onnx", "--providers", "tpu"], ["unknown provider"]),
        (["base.onnx", "--batch", "8"], ["--batch 8", "fixed first dimension of 256"]),
        (["base.onnx", "--batch", "0"], ["--batch"]),
        (["dynamic.onnx", "--dim", "M=4"], ["--dim", "M"]),
        (["dynamic.onnx", "--dim", "N=x"], ["--dim"]),
        (["base.onnx", "--data", "missing.npz"], ["missing.npz"]),
        (["base.onnx", "--vs", "other.onnx"], ["other.onnx", "takes other inputs"]),
        (["base.onnx", "--confidence", "2"], ["--confidence"]),
        (["base.onnx", "--budget", "0"], ["--budget"]),
        (["base.onnx", "--optimization", "max"], ["--optimization"]),
        (["base.onnx", "--json", "nowhere/r.json"], ["--json", "does not exist"]),
        (["base.onnx", "--bogus"], ["unrecognized arguments: --bogus"]),
        ([], ["model"]),
    ],
)
def test_errors_exit_2_in_one_line(capsys, models, monkeypatch, args, words):
    monkeypatch.chdir(models)
    code, out, err = call(capsys, *args)
    assert code == 2, (out, err)
    assert out == "" and err.startswith("onnxopt: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def test_unreadable_model_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    code, _, err = call(capsys, bad)
    assert code == 2 and err.startswith("onnxopt: error: ") and err.count("\n") == 1, err


def test_python_m_onnxopt_bench(models, tmp_path):
    out_json = tmp_path / "m.json"
    done = subprocess.run(
        [sys.executable, "-m", "onnxopt", "bench", "slow.onnx", "--vs", "base.onnx", "--budget", BUDGET, "--json", str(out_json)],
        cwd=models, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(out_json.read_text())["verdict"] == "slower"
    assert done.stderr == ""

"""--quantize auto: static and dynamic int8 judged by one budget, the faster that meets it kept (timings stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxopt import auto_quantize, optimize
from onnxopt.cli import main
from onnxopt.report import LatencyComparison

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "transformer_encoder.onnx"


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    """Random token ids (the zoo transformer reads ``input`` int64 [batch, seq], ids below 100)."""
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(0).integers(0, 100, (16, 16)).astype(np.int64))
    return path


def _timing(verdict: str, ratio: float):
    """A ``compare_latency`` stand-in that returns a fixed verdict (B = dynamic over A = static)."""
    calls = []

    def compare(a, b, feed, **kwargs):
        calls.append(feed)
        return LatencyComparison(median_a_ms=1.0, median_b_ms=ratio, p90_a_ms=1.0, p90_b_ms=ratio, ratio=ratio,
                                 ratio_low=ratio * 0.99, ratio_high=ratio * 1.01, confidence=0.95, repetitions=10,
                                 providers=["CPUExecutionProvider"], threads=1, verdict=verdict)
    compare.calls = calls
    return compare


def _auto(result) -> dict:
    (record,) = [r for r in result.report.passes if "auto" in r.details]
    return record.details["auto"]


def test_cli_auto_keeps_a_candidate_that_meets_the_budget(tmp_path, calibration, monkeypatch):
    monkeypatch.setattr(auto_quantize, "compare_latency", _timing("no difference", 1.0))
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main([str(ZOO), "--quantize", "auto", "--calibration", str(calibration), "--no-latency",
                 "-o", str(out), "--report", str(report)])
    assert code == 0
    assert out.exists()
    passes = json.loads(report.read_text())["passes"]
    (auto,) = [p["details"]["auto"] for p in passes if "auto" in p["details"]]
    assert set(auto["candidates"]) == {"int8", "int8-dynamic"}
    for figures in auto["candidates"].values():
        assert 0 < figures["file_ratio"] < 1 and figures["cosine_worst"] <= 1.0 + 1e-6
    kept = auto["candidates"][auto["chosen"]]
    assert kept["kept"] and kept["met"] and kept["cosine_worst"] >= auto["budget"]["min_cosine"]
    # no difference in time: the more accurate is kept
    others = [c for m, c in auto["candidates"].items() if m != auto["chosen"]]
    assert all(not c["met"] or c["cosine_worst"] <= kept["cosine_worst"] for c in others)


@pytest.mark.parametrize("verdict, kept", [("faster", "int8-dynamic"), ("slower", "int8")])
def test_the_faster_candidate_is_kept(calibration, monkeypatch, verdict, kept):
    stub = _timing(verdict, 0.5 if verdict == "faster" else 2.0)
    monkeypatch.setattr(auto_quantize, "compare_latency", stub)
    result = optimize(ZOO, quantize="auto", calibration=calibration, min_cosine=0.9, latency=False)
    auto = _auto(result)
    assert len(stub.calls) == 1
    assert all(c["met"] for c in auto["candidates"].values())  # a loose budget: both meet it
    assert auto["chosen"] == kept and auto["candidates"][kept]["kept"]
    assert "faster" in auto["why"]
    record = next(r for r in result.report.passes if "auto" in r.details)
    assert record.name == {"int8": "quantize", "int8-dynamic": "quantize-dynamic"}[kept]
    assert result.report.notes[0].startswith(f"quantize auto: kept {kept}")


def test_without_calibration_static_is_skipped_with_the_reason(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("one candidate: nothing to time against")

    monkeypatch.setattr(auto_quantize, "compare_latency", no_timing)
    result = optimize(ZOO, quantize="auto", latency=False)
    auto = _auto(result)
    assert auto["chosen"] == "int8-dynamic"
    assert "--calibration" in auto["candidates"]["int8"]["skipped"]
    assert "only candidate" in auto["why"] and "--calibration" in auto["why"]
    assert any("int8: not built" in n for n in result.report.notes)


def test_auto_refuses_no_validate():
    from onnxopt.errors import OptionError

    with pytest.raises(OptionError, match="needs validation"):
        optimize(ZOO, quantize="auto", validate=False)


def _c(met: bool, cosine: float) -> dict:
    return {"met": met, "figure": f"min cosine {cosine}", "score": cosine}


@pytest.mark.parametrize("static, dynamic, verdict, kept, words", [
    (_c(True, 0.995), _c(False, 0.98), "faster", "int8", "only one that meets"),  # the budget first, then speed
    (_c(False, 0.98), _c(True, 0.995), "slower", "int8-dynamic", "only one that meets"),
    (_c(False, 0.95), _c(False, 0.97), "slower", "int8-dynamic", "neither meets"),
    (_c(True, 0.999), _c(True, 0.995), "no difference", "int8", "no difference"),
    (_c(True, 0.995), _c(True, 0.999), "no difference", "int8-dynamic", "no difference"),
])
def test_choose(static, dynamic, verdict, kept, words):
    timing = {"verdict": verdict, "ratio": 1.0, "ratio_low": 0.9, "ratio_high": 1.1}
    chosen, why = auto_quantize.choose({"int8": static, "int8-dynamic": dynamic}, timing)
    assert chosen == kept and words in why


def test_a_listed_quantize_pass_becomes_dynamic_in_the_dynamic_candidate():
    assert auto_quantize._dynamic_passes("simplify, quantize") == ["simplify", "quantize-dynamic"]
    assert auto_quantize._dynamic_passes(["fold-bn", "quantize"]) == ["fold-bn", "quantize-dynamic"]


def test_an_unbounded_timing_says_so():
    timing = {"verdict": "no difference", "ratio": 1.09, "ratio_low": 0.0, "ratio_high": float("inf")}
    chosen, why = auto_quantize.choose({"int8": _c(True, 0.99), "int8-dynamic": _c(True, 0.995)}, timing)
    assert chosen == "int8-dynamic" and "too few repetitions" in why

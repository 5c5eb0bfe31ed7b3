"""What the quantization step does to cost less must not change what it finds: the float model's
exposed session reused across SQNR rounds gives the figures a fresh one gives, and a run creates a
bounded number of onnxruntime sessions (measured figures: ``python -m benchmarks.quantize --cost``)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

import onnxopt
import onnxopt.sqnr
from onnxopt.data import load_data
from onnxopt.io import load_model
from onnxopt.passes import QuantizeQDQ
from onnxopt.quantization import QuantizationStep
from onnxopt.sqnr import QuantizedSqnr

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


@pytest.fixture(scope="module")
def quantized_digits():
    model = load_model(DIGITS / "digits_cnn.onnx")
    step = QuantizationStep(model, "digits", calibration=DIGITS / "digits_calib.npz", speed_fallback=False)
    float_model = model.clone()
    p = QuantizeQDQ()
    result = step.run(p, model, None, None)
    evaluation = load_data(DIGITS / "digits_test.npz", float_model, batch_size=32)
    return float_model, result.model, step.pass_, evaluation


def test_sqnr_rounds_reuse_the_float_session_and_give_a_fresh_sessions_figures(quantized_digits, monkeypatch):
    float_model, model, p, evaluation = quantized_digits
    exposed = []
    real_expose = onnxopt.sqnr.expose
    monkeypatch.setattr(onnxopt.sqnr, "expose", lambda m, names: exposed.append(m) or real_expose(m, names))
    tensor_map = p.details["tensor_map"]
    tensors = sorted({t for ins, out in p.details["io"].values() for t in (*ins, out)})
    sqnr = QuantizedSqnr("cpu")
    first = sqnr.errors(float_model, model, tensor_map, evaluation, tensors)
    again = sqnr.errors(float_model, model, tensor_map, evaluation, tensors)
    fewer = sqnr.errors(float_model, model, tensor_map, evaluation, tensors[::2])  # a later round: fewer layers
    assert sum(m is float_model for m in exposed) == 1 and len(exposed) == 4  # float once, candidate each time
    fresh = QuantizedSqnr("cpu")
    assert first and again == first
    assert fewer == fresh.errors(float_model, model, tensor_map, evaluation, tensors[::2])
    assert fewer == {t: first[t] for t in tensors[::2] if t in first}


def test_a_fallback_run_creates_a_bounded_number_of_sessions(monkeypatch):
    # A budget no int8 model of the digits CNN meets at first (cosine 0.99999): rounds of the
    # accuracy fallback, each one validation and one SQNR comparison; the float model is exposed
    # and loaded once for all of them (before: once per round, 22 sessions for 3 rounds).
    created = []
    real_init = ort.InferenceSession.__init__

    def counting(self, *args, **kwargs):
        created.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting)
    result = onnxopt.optimize(DIGITS / "digits_cnn.onnx", ["simplify", "fold-bn", "quantize"],
                              calibration=DIGITS / "digits_calib.npz", data=DIGITS / "digits_test.npz",
                              min_cosine=0.99999, latency=False)
    details = result.report.passes[-1].details
    rounds = len({item["round"] for item in details["fallback"]})
    assert rounds >= 1 and details["sqnr_db"]
    assert len(created) <= 2 * rounds + 12, (len(created), rounds)

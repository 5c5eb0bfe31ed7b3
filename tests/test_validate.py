"""compare_models: the lossless tolerance, and onnxruntime's own noise on the original as its floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphs import build
from onnxopt.data import synthetic_data
from onnxopt.runtime import ModelSnapshot
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_RTOL, RUNTIME_FLOOR_FACTOR, compare_models

SATURATING = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,16,16] x) => (float[N,16,16,16] y) {
    c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
    b1 = BatchNormalization (c1, s1, o1, m1, v1)
    r1 = Relu(b1)
    c2 = Conv <pads=[1,1,1,1]> (r1, W2, B2)
    b2 = BatchNormalization (c2, s2, o2, m2, v2)
    r2 = Relu(b2)
    c3 = Conv <pads=[1,1,1,1]> (r2, W3, B3)
    y = Sigmoid(c3)
}"""


def saturating_model() -> ir.Model:
    """Three convolutions whose logits reach the hundreds before a Sigmoid: onnxruntime's own fusions
    (Conv+BN, NCHWc) move the outputs that sit on the sigmoid's slope by about 1e-4."""
    rng = np.random.default_rng(0)
    weights = {}
    for i, cin in ((1, 8), (2, 16), (3, 16)):
        weights[f"W{i}"] = rng.standard_normal((16, cin, 3, 3)).astype(np.float32)
        weights[f"B{i}"] = rng.standard_normal(16).astype(np.float32)
    for i in (1, 2):
        weights |= {f"s{i}": rng.uniform(0.5, 1.5, 16).astype(np.float32), f"o{i}": rng.standard_normal(16).astype(np.float32),
                    f"m{i}": rng.standard_normal(16).astype(np.float32), f"v{i}": rng.uniform(0.5, 1.5, 16).astype(np.float32)}
    return build(SATURATING, weights)


def _compare(reference: ir.Model, candidate: ir.Model, dims=None, **options):
    data = synthetic_data(reference, dims=dims or {"N": 2})
    ref, cand = ModelSnapshot(reference), ModelSnapshot(candidate)
    try:
        return compare_models(ref, cand, data, **options)
    finally:
        ref.close()
        cand.close()


def test_onnxruntime_noise_on_the_original_is_not_blamed_on_the_pass():
    model = saturating_model()
    strict = _compare(model, model, runtime_floor=False)
    assert not strict.ok and strict.outputs[0].max_abs > DEFAULT_ATOL + DEFAULT_RTOL
    v = _compare(model, model)
    out = v.outputs[0]
    assert v.ok and out.runtime_floor is not None and out.runtime_floor > DEFAULT_ATOL + DEFAULT_RTOL
    assert out.max_abs <= DEFAULT_ATOL + DEFAULT_RTOL + RUNTIME_FLOOR_FACTOR * out.runtime_floor
    assert any("onnxruntime's own optimizations" in note for note in v.notes)


def test_a_real_difference_still_fails_above_the_floor():
    model = saturating_model()
    wrong = model.clone()
    last = [n for n in wrong.graph if n.op_type == "Conv"][-1]
    shifted = ir.Value(name="shifted_bias", const_value=ir.tensor(last.inputs[2].const_value.numpy() + np.float32(0.01)))
    wrong.graph.register_initializer(shifted)
    last.replace_input_with(2, shifted)
    v = _compare(model, wrong)
    out = v.outputs[0]
    assert not v.ok and out.runtime_floor is not None and out.max_abs > 5 * out.runtime_floor


def test_an_exact_candidate_needs_no_floor():
    model = ir.load(Path(__file__).resolve().parents[1] / "models" / "zoo" / "mlp_bn.onnx")
    v = _compare(model, model, dims={"batch": 2}, candidate_optimization="disabled")
    assert v.ok and v.outputs[0].max_abs == 0 and v.outputs[0].runtime_floor is None


# -- non-finite outputs and labels (issue 14, part 4) ------------------------------------------------

LOG = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
    y = Log(x)
}"""
NAN_FOR_ALL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
    z = Mul(x, nan)
    y = Add(z, x)
}"""


def _log_model(text: str = LOG) -> ir.Model:
    return build(text, {"nan": np.array(np.nan, np.float32)} if "nan" in text else None)


def _on(reference: ir.Model, candidate: ir.Model, x: np.ndarray, labels=None):
    from onnxopt.data import Dataset

    ref, cand = ModelSnapshot(reference), ModelSnapshot(candidate)
    try:
        return compare_models(ref, cand, Dataset([{"x": x}], labels, "test"), candidate_optimization="disabled")
    finally:
        ref.close()
        cand.close()


def test_candidate_nan_where_the_reference_is_finite_fails():
    reference = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }""")
    x = np.abs(np.random.default_rng(0).standard_normal((3, 4))).astype(np.float32) + 0.5
    v = _on(reference, _log_model(), x - 1.0)  # Log of the negatives is NaN, Relu is finite everywhere
    assert not v.ok and not v.outputs[0].ok
    assert any("NaN/inf where the original does not" in n for n in v.notes)


def test_both_all_nan_is_not_a_pass():
    """Both models NaN everywhere gave 'cosine 1.000000, top-1 100%' and passed."""
    model = _log_model(NAN_FOR_ALL)
    v = _on(model, model, np.ones((3, 4), np.float32))
    out = v.outputs[0]
    assert not v.ok and not out.ok and np.isnan(out.cosine) and out.top1_agreement is None
    assert any("no finite value" in n for n in v.notes)


def test_nan_at_the_same_places_passes_on_the_finite_values_and_says_so():
    model = _log_model()
    x = np.array([[1, 2, -1, 3], [4, 5, 6, 7]], np.float32)  # one NaN, in row 0
    v = _on(model, model, x)
    out = v.outputs[0]
    assert v.ok and out.cosine == pytest.approx(1.0) and out.top1_agreement == 1.0
    assert any("NaN/inf at 1 of 8 values" in n for n in v.notes)


def test_nan_where_the_reference_is_infinite_fails():
    """At the reference's non-finite places the candidate must be the same (-inf is not NaN)."""
    model = _log_model()
    other = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) { a = Abs(x)
 l = Log(a)
 z = Sub(x, x)
 d = Div(z, x)
 y = Add(l, d) }""")
    x = np.array([[1, 2, 0, 3]], np.float32)  # Log(0) = -inf in the reference; 0/0 = NaN in the candidate
    v = _on(model, other, x)
    assert not v.ok


@pytest.mark.parametrize("labels,words", [(np.array([0, 4]), ["label 4", "4 classes"]), (np.array([0, -1]), ["-1"])])
def test_labels_outside_the_classes_are_refused(labels, words):
    from onnxopt.errors import DataError

    model = _log_model()
    with pytest.raises(DataError) as exc:
        _on(model, model, np.ones((2, 4), np.float32), labels=labels)
    assert "\n" not in str(exc.value) and all(w in str(exc.value) for w in words)


def test_reference_outputs_run_the_reference_once():
    """A lossy search validates many candidates against one reference: its outputs are kept, not rerun."""
    from onnxopt.validate import ReferenceOutputs

    model = saturating_model()
    data = synthetic_data(model, dims={"N": 2})
    ref, cand = ModelSnapshot(model), ModelSnapshot(model)
    kept = ReferenceOutputs()
    try:
        first = compare_models(ref, cand, data, runtime_floor=False, reference_outputs=kept)
        assert set(kept.outputs) == set(range(len(data)))
        calls = []
        session = ref.session(providers=["CPUExecutionProvider"], optimization="disabled")
        original_run = session.run
        session.run = lambda *a, **k: calls.append(1) or original_run(*a, **k)
        second = compare_models(ref, cand, data, runtime_floor=False, reference_outputs=kept)
    finally:
        ref.close()
        cand.close()
    assert calls == []
    assert second.outputs[0].max_abs == first.outputs[0].max_abs and second.outputs[0].cosine == first.outputs[0].cosine


def test_reference_outputs_past_the_cap_are_not_kept():
    from onnxopt.validate import ReferenceOutputs

    kept = ReferenceOutputs(max_bytes=100)
    kept.keep(0, {"y": np.zeros(10, np.float32)})
    assert kept.get(0) is not None
    kept.keep(1, {"y": np.zeros(20, np.float32)})
    assert kept.full and kept.get(0) is None and kept.get(1) is None


def test_a_large_output_is_compared_in_slices_with_the_same_figures(monkeypatch):
    import onnxopt.validate as validate

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((7, 5, 3)).astype(np.float32)
    cand = ref + rng.normal(0, 0.01, ref.shape).astype(np.float32)
    cand[3, 1, 2] = np.inf
    whole = validate.OutputAccumulator("y")
    whole.update(ref, cand)
    monkeypatch.setattr(validate, "_CHUNK_VALUES", 16)  # one row of 15 values a slice
    sliced = validate.OutputAccumulator("y")
    sliced.update(ref, cand)
    for field in ("max_abs", "ref_max", "dot", "ref_sq", "cand_sq"):
        assert np.isclose(getattr(sliced, field), getattr(whole, field), rtol=1e-12), field
    assert sliced.nonfinite and whole.nonfinite
    logits = rng.standard_normal((9, 4)).astype(np.float32)
    a, b = validate.OutputAccumulator("l"), validate.OutputAccumulator("l")
    a.update(logits, logits[:, ::-1].copy())
    monkeypatch.setattr(validate, "_CHUNK_VALUES", 2**20)
    b.update(logits, logits[:, ::-1].copy())
    assert (a.agree, a.rows) == (b.agree, b.rows)

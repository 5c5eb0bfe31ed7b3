"""Validation: a candidate with NaN or inf where the reference is finite fails, however good the
finite values look (max error over the finite entries 0, cosine 1)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import build
from onnxopt.data import synthetic_data
from onnxopt.runtime import ModelSnapshot
from onnxopt.validate import OutputAccumulator, compare_models

BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("where", ["one", "all"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nonfinite_candidate_against_a_finite_reference_fails(bad, where, dtype):
    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(dtype)
    candidate = reference.copy()
    if where == "one":
        candidate[2, 3] = BAD[bad]
    else:
        candidate[:] = BAD[bad]
    acc = OutputAccumulator("y")
    acc.update(reference, candidate)
    result = acc.result(rtol=None, atol=1e-6)
    assert result.ok is False, result


def test_a_later_batch_with_nan_still_fails():
    reference = np.ones((2, 5), np.float32)
    acc = OutputAccumulator("y")
    acc.update(reference, reference.copy())  # a clean first batch
    bad = reference.copy()
    bad[1, 1] = np.nan
    acc.update(reference, bad)
    acc.update(reference, reference.copy())  # and a clean one after it
    assert acc.result(rtol=None, atol=1e-6).ok is False


def test_finite_candidate_equal_to_a_finite_reference_passes():
    # The control: the same arrays without the bad entry pass, so the failures above are the NaN's.
    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    acc = OutputAccumulator("y")
    acc.update(reference, reference.copy())
    assert acc.result(rtol=None, atol=1e-6).ok is True


@pytest.mark.parametrize("bad", list(BAD))
def test_compare_models_fails_a_candidate_that_outputs_nonfinite_values(bad):
    """End to end under onnxruntime: the candidate adds a constant with one non-finite entry."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,8] x) => (float[N,8] y) { y = Add(x, C) }"""
    ref_model = build(text, {"C": np.zeros(8, np.float32)})
    c = np.zeros(8, np.float32)
    c[5] = BAD[bad]
    cand_model = build(text, {"C": c})
    data = synthetic_data(ref_model, dims={"N": 3})
    ref, cand = ModelSnapshot(ref_model), ModelSnapshot(cand_model)
    try:
        v = compare_models(ref, cand, data)
    finally:
        ref.close()
        cand.close()
    assert v.ok is False and v.outputs[0].ok is False, v

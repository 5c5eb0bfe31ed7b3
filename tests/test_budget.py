"""onnxopt.budget: one accuracy budget and one way back (undo the most harmful layers) for the
lossy passes that rewrite layers one by one."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.budget import judge
from onnxopt.sqnr import tensor_sqnr, unit_tensors
from onnxopt.passes import ClusterWeights, FoldBatchNorm, LowRankFactorize, QuantizeDynamic, Simplify, SparsifyWeights
from onnxopt.report import OutputComparison, Validation

DIGITS = "models/digits/digits_cnn.onnx"
TEST = "models/digits/digits_test.npz"


def _folded() -> ir.Model:
    model = onnxopt.load_model(DIGITS)
    Simplify()(model)
    FoldBatchNorm()(model)
    return model


@pytest.mark.parametrize("make", [lambda: ClusterWeights(bits=2), lambda: SparsifyWeights(sparsity=0.8),
                                  lambda: LowRankFactorize(energy=0.5, min_params=16)])
def test_excluding_leaves_exactly_those_layers_alone(make):
    model = _folded()
    p = make()
    p(model.clone())
    units = p.units
    assert len(units) >= 2
    q = p.excluding(units[:1])
    q(model.clone())
    assert units[0] not in q.units and set(q.units) == set(units[1:])
    assert units[0] in (q.details.get("skipped") or {})


def test_dynamic_int8_units_are_node_labels_that_exclude_understands():
    model = onnxopt.load_model("models/zoo/transformer_encoder.onnx")
    Simplify()(model)
    p = QuantizeDynamic()
    p(model.clone())
    q = p.excluding(p.units[:2])
    q(model.clone())
    assert set(q.units) == set(p.units[2:])


def test_unit_tensors_finds_a_weight_reader_and_a_named_node():
    model = _folded()
    conv = next(n for n in model.graph if n.op_type == "Conv")
    by_weight = unit_tensors(model, conv.inputs[1].name)
    assert by_weight == ([conv.inputs[0].name], conv.outputs[0].name)
    assert unit_tensors(model, "no such thing") is None


def test_tensor_sqnr_is_infinite_for_equal_models_and_finite_for_a_changed_one():
    from onnxopt.data import load_data

    model = _folded()
    data = load_data(TEST, model, batch_size=16)
    out = model.graph.outputs[0].name
    assert tensor_sqnr(model, model.clone(), [out], data)[out] == float("inf")
    changed = model.clone()
    ClusterWeights(bits=2)(changed)
    sqnr = tensor_sqnr(model, changed, [out], data)[out]
    assert 0 < sqnr < 60


def _validation(before, after, cosines):
    outputs = [OutputComparison(name=f"y{i}", max_abs=0.1, max_rel=0.1, cosine=c, top1_agreement=None, ok=False)
               for i, c in enumerate(cosines)]
    return Validation(ok=False, providers=["CPU"], samples=10, batches=1, rtol=None, atol=0.0, data="t", synthetic=False,
                      outputs=outputs, accuracy_before=before, accuracy_after=after)


def test_judge_uses_accuracy_with_labels_and_cosine_without():
    assert judge(_validation(0.99, 0.985, [0.5]), None, None)[0]  # 0.5 points: within the default 1
    assert not judge(_validation(0.99, 0.97, [1.0]), None, None)[0]
    assert not judge(_validation(None, None, [0.98, 0.999]), None, None)[0]  # worst output under 0.99
    assert judge(_validation(None, None, [0.98, 0.999]), None, 0.97)[0]
    ok, figure = judge(_validation(0.99, 0.98, [0.9]), 2.0, 0.95)
    assert not ok and "accuracy drop 1.00" in figure and "min cosine per sample 0.90000" in figure


def test_a_budget_undoes_the_most_harmful_layers_until_it_holds():
    """3-bit clustering of the digits CNN loses about 1 point unbudgeted (98.52%, AMD EPYC); with a
    0.5-point budget the run keeps the layers whose outputs lose most, and still saves bytes."""
    free = onnxopt.optimize(DIGITS, cluster_bits=3, data=TEST, latency=False)
    budgeted = onnxopt.optimize(DIGITS, cluster_bits=3, data=TEST, latency=False, max_drop=0.5)
    v = budgeted.report.validation
    assert budgeted.ok and v.ok and (v.accuracy_before - v.accuracy_after) * 100 <= 0.5
    assert "budget" in v.criterion
    kept = [n for n in budgeted.report.notes if n.startswith("budget: kept")]
    drop_free = (free.report.validation.accuracy_before - free.report.validation.accuracy_after) * 100
    if drop_free > 0.5:
        assert kept  # something had to be undone
    clustered = budgeted.report.passes[-1].details["layers"]
    assert budgeted.report.after.bytes < budgeted.report.before.bytes or not clustered


def test_a_budget_on_a_lossy_pass_that_cannot_be_undone_judges_the_run():
    result = onnxopt.optimize(DIGITS, prune=0.5, data=TEST, latency=False, max_drop=1.0)
    assert not result.ok  # 27% after pruning by half, no fine-tuning: the budget fails the run
    assert "budget" in result.report.validation.criterion


def test_a_budget_without_a_lossy_pass_is_refused():
    with pytest.raises(onnxopt.OptionError, match="lossy"):
        onnxopt.optimize(DIGITS, passes=["simplify"], max_drop=1.0)

"""The accuracy fallbacks stop when keeping more layers as they were no longer moves the metric, and
say why from what the measure shows (``onnxopt.budget``: ``shortfall``; ``onnxopt.fallback``: ``Convergence``, ``why_stuck``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import onnxopt
import onnxopt.validate
from onnxopt.budget import shortfall
from onnxopt.fallback import STALL_GAIN, Convergence, why_stuck
from onnxopt.report import OutputComparison, Validation


def _v(cosines, means=None, before=None, after=None, samples=32, synthetic=False, judged=None):
    means = means or [None] * len(cosines)
    outputs = [OutputComparison(name=f"y{i}", max_abs=0.1, max_rel=0.1, cosine=c, top1_agreement=None, ok=False,
                                cosine_mean=m, judged=judged is None or i in judged)
               for i, (c, m) in enumerate(zip(cosines, means))]
    return Validation(ok=False, providers=["CPU"], samples=samples, batches=1, rtol=None, atol=0.0, data="t",
                      synthetic=synthetic, outputs=outputs, accuracy_before=before, accuracy_after=after)


def test_shortfall_is_the_distance_to_the_budget_in_its_own_units():
    assert shortfall(_v([0.95, 0.999]), None, 0.99) == pytest.approx(0.04)
    assert shortfall(_v([0.995]), None, 0.99) == 0.0
    assert shortfall(_v([0.5, 0.999], judged={1}), None, 0.99) == 0.0  # an output not judged does not count
    assert shortfall(_v([1.0], before=0.99, after=0.96), 1.0, None) == pytest.approx(2.0)  # 3 points, 1 allowed
    assert shortfall(_v([1.0], before=0.99, after=0.96), None, None) == pytest.approx(2.0)  # the default: 1 point
    assert shortfall(dataclasses.replace(_v([1.0]), error="boom"), None, 0.99) == float("inf")


def test_an_output_whose_shape_changed_misses_the_budget():
    from onnxopt.budget import judge

    v = _v([0.999, 0.999])
    v.outputs[0] = dataclasses.replace(v.outputs[0], max_abs=float("inf"), cosine=float("nan"))  # shape differs
    met, figure = judge(v, None, 0.99)
    assert not met and "y0 differs in shape or value" in figure  # it passed on y1's cosine alone
    assert shortfall(v, None, 0.99) == float("inf")
    not_judged = _v([0.999, 0.999], judged={1})
    not_judged.outputs[0] = dataclasses.replace(not_judged.outputs[0], max_abs=float("inf"), cosine=float("nan"))
    assert judge(not_judged, None, 0.99)[0] and shortfall(not_judged, None, 0.99) == 0.0  # --outputs leaves it out
    nothing = _v([0.999, 0.999])
    nothing.outputs[0] = dataclasses.replace(nothing.outputs[0], max_abs=0.0, cosine=float("nan"))
    assert judge(nothing, None, 0.99)[0]  # the original gave no finite value there: nothing to judge


def test_convergence_stalls_only_after_rounds_that_close_little_of_the_gap():
    def stalled(gaps):
        c = Convergence()
        for g in gaps:
            c.add(g)
        return c.stalled()

    assert not stalled([0.1])
    assert not stalled([0.1, 0.1])  # one round proves nothing
    assert stalled([0.1, 0.099, 0.098])
    assert stalled([0.1, 0.2, 0.3])  # worse and worse
    assert not stalled([0.1, 0.099, 0.05])  # the last round closed half the gap
    assert not stalled([0.1, 0.05, 0.049])
    closes_just_enough = 1 - STALL_GAIN - 0.01
    assert not stalled([0.1, 0.1 * closes_just_enough, 0.1 * closes_just_enough ** 2])


def test_convergence_waits_for_doubling_rounds_when_the_error_is_spread_over_many_layers():
    # 40 layers each adding one unit of error, the budget met once 25 are kept: rounds keep 1, 2, 4, 8,
    # 16 layers, so rounds 1 and 2 close 1/25 and 2/24 of the gap (under 10% each) and rounds 3-5 meet it.
    c = Convergence()
    for kept in (0, 1, 3):
        c.add(25.0 - kept, kept)
    assert not c.stalled(available=min(37, 4 + 8 + 16 + 32 + 64 + 128))
    assert c.stalled(available=10)  # at 1 a layer, 10 layers left cannot close 22
    assert c.stalled()  # no count of the layers left: the gain alone decides
    flat = Convergence()
    for kept in (0, 1, 3):
        flat.add(0.09, kept)
    assert flat.stalled(available=1000)  # nothing closed at all: no rate to extrapolate
    worse = Convergence()
    for kept, gap in ((0, 0.1), (1, 0.2), (3, 0.3)):
        worse.add(gap, kept)
    assert worse.stalled(available=1000)


def test_why_stuck_names_one_sample_that_rules_the_verdict():
    why = why_stuck(_v([0.90, 0.999], means=[0.995, 0.9995]), None, 0.99, kept=3,
                    first_figure="min cosine 0.85", figure="min cosine 0.90", top_harm_db=4.0)
    assert why.startswith("keeping 3 layers as they were moved min cosine 0.85 to min cosine 0.90, short of the budget:")
    assert "y0: the mean cosine per sample (0.99500) meets the budget and the worst sample (0.90000) does not" in why
    assert "--outputs" in why  # y1 meets, y0 does not


def test_why_stuck_names_too_few_labelled_samples_spread_error_and_synthetic_inputs():
    few = why_stuck(_v([1.0], before=1.0, after=0.9, samples=20), 1.0, None, kept=1, first_figure="a", figure="b")
    assert "the drop is 2 of 20 samples" in few and "--eval" in few
    spread = why_stuck(_v([0.9], means=[0.9], synthetic=True), None, 0.99, kept=7, first_figure="a", figure="b",
                       top_harm_db=0.3)
    assert "spread over many layers" in spread and "synthetic" in spread
    plain = why_stuck(_v([0.9], means=[0.9]), None, 0.99, kept=1, first_figure="a", figure="b", top_harm_db=5.0)
    assert "beyond what this setting allows" in plain


def test_why_stuck_blames_too_few_samples_only_when_the_accuracy_misses():
    # Labelled data with --min-cosine: the accuracy meets its budget, the cosine does not.
    why = why_stuck(_v([0.95], means=[0.95], before=0.99, after=0.99, samples=540), 1.0, 0.99, kept=2,
                    first_figure="a", figure="b", top_harm_db=5.0)
    assert "the drop is" not in why and "--eval" not in why
    better = why_stuck(_v([0.95], means=[0.95], before=0.98, after=0.99, samples=100), 1.0, 0.99, kept=2,
                       first_figure="a", figure="b", top_harm_db=5.0)
    assert "the drop is" not in better  # accuracy went up: not 'the drop is -1 of 100 samples'


def _fake_compare(cosines):
    """compare_models returning a validation whose only output has the given worst cosines in turn
    (mean 0.995) and no accuracy change; counts its calls."""
    calls = []

    def fake(reference, candidate, data, **kwargs):
        c = cosines[min(len(calls), len(cosines) - 1)]
        calls.append(c)
        out = OutputComparison(name="logits", max_abs=0.1, max_rel=0.1, cosine=c, cosine_mean=0.995,
                               top1_agreement=1.0, ok=False)
        return Validation(ok=False, providers=["CPU"], samples=data.num_samples, batches=len(data), rtol=None,
                          atol=0.0, data="fake", synthetic=False, outputs=[out], accuracy_before=0.99,
                          accuracy_after=0.99)

    return fake, calls


DIGITS = Path("models/digits")


def _quantize(digits, **kwargs):
    return onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                            data=digits / "digits_test.npz", latency=False, speed_fallback=False, min_cosine=0.99, **kwargs)


def test_int8_fallback_stops_when_the_metric_does_not_move_and_says_why(monkeypatch):
    fake, calls = _fake_compare([0.90, 0.901, 0.9015, 0.902, 0.9025, 0.903, 0.9035, 0.904, 0.9045, 0.905])
    monkeypatch.setattr(onnxopt.validate, "compare_models", fake)
    result = _quantize(DIGITS)
    details = result.report.passes[-1].details
    assert not details["budget"]["met"]
    # Round 1 keeps 1 layer, round 2 keeps 2, then two rounds that closed < 10% of the gap end it:
    # 3 judgements of the fallback (not the 9 that MAX_FALLBACK_ROUNDS allows).
    assert len(details["fallback"]) == 3
    stuck = details["budget"]["stuck"]
    assert "one sample rules the verdict" in stuck and "keeping 3 layers as they were" in stuck
    assert any(n.startswith("quantize: accuracy fallback: keeping 3 layers") for n in result.report.notes)


def test_int8_fallback_goes_on_while_each_round_closes_the_gap(monkeypatch):
    fake, calls = _fake_compare([0.90, 0.95, 0.975, 0.995])
    monkeypatch.setattr(onnxopt.validate, "compare_models", fake)
    result = _quantize(DIGITS)
    details = result.report.passes[-1].details
    assert "stuck" not in details["budget"]
    assert details["budget"]["met"]  # the fourth judgement meets 0.99
    assert {item["round"] for item in details["fallback"]} == {1, 2, 3}  # three rounds, then met


def test_layer_fallback_of_other_lossy_passes_stops_the_same_way(monkeypatch):
    import onnxopt.fallback

    fake, calls = _fake_compare([0.90, 0.901, 0.9015, 0.902, 0.9025, 0.903, 0.9035, 0.904, 0.9045])
    monkeypatch.setattr(onnxopt.fallback, "compare_models", fake)
    result = onnxopt.optimize(DIGITS / "digits_cnn.onnx", cluster_bits=3, data=DIGITS / "digits_test.npz",
                              latency=False, min_cosine=0.99)
    stuck = [n for n in result.report.notes if n.startswith("budget: keeping")]
    assert len(stuck) == 1 and "one sample rules the verdict" in stuck[0]
    assert len(calls) == 3  # the first judgement and two rounds that did not move it (of MAX_ROUNDS 8)


def test_rounds_judged_on_a_few_samples_where_a_miss_there_is_a_miss_on_all(monkeypatch, tmp_path):
    """Without labels the budget is the worst sample's cosine: over fewer samples it is never lower,
    so the fallback judges a round on the JUDGE_SAMPLES samples that were worst in the last validation
    on all the data, and confirms on all the data only when those meet; a subset that meets while the
    whole data misses does not end the fallback."""
    import numpy as np

    from onnxopt.int8_fallback import JUDGE_SAMPLES

    images = np.load(DIGITS / "digits_test.npz")["input"][:64]
    unlabelled = tmp_path / "inputs.npz"
    np.savez(unlabelled, input=images)
    sizes, answers, subsets = [], iter([0.90, 0.95, 0.995, 0.98, 0.995, 0.995]), []
    worst = [[40, 3, 63, 17, 8, 9], [5, 40, 6, 7, 11, 12], [20, 21, 22, 23, 24, 25]]  # per validation on all

    def fake(reference, candidate, data, **kwargs):
        sizes.append(data.num_samples)
        if data.num_samples < 64:
            subsets.append(np.concatenate([b["input"] for b in data.batches]))
        rows = worst[min(sizes.count(64), len(worst)) - 1] if data.num_samples == 64 else []
        out = OutputComparison(name="logits", max_abs=0.1, max_rel=0.1, cosine=next(answers), cosine_mean=0.995,
                               top1_agreement=1.0, ok=False, samples=data.num_samples, worst_samples=rows)
        return Validation(ok=False, providers=["CPU"], samples=data.num_samples, batches=len(data), rtol=None,
                          atol=0.0, data="fake", synthetic=False, outputs=[out])

    monkeypatch.setattr(onnxopt.validate, "compare_models", fake)
    result = onnxopt.optimize(DIGITS / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=DIGITS / "digits_calib.npz",
                              data=unlabelled, latency=False, speed_fallback=False, min_cosine=0.99)
    details = result.report.passes[-1].details
    # round 1 on all 64 samples; round 2 misses on the subset; round 3 meets on the subset
    # but not on all (0.98): on; round 4 meets on both.
    assert sizes[:6] == [64, JUDGE_SAMPLES, JUDGE_SAMPLES, 64, JUDGE_SAMPLES, 64]
    assert details["budget"]["met"]
    # rounds 2 and 3 on the first validation's worst samples, in that order; round 4 on the second's
    for got, rows in zip(subsets, [worst[0], worst[0], worst[1]]):
        np.testing.assert_array_equal(got, images[rows[:JUDGE_SAMPLES]])
    assert {item["round"] for item in details["fallback"]} == {1, 2, 3}


def test_fallback_ranks_small_models_on_8_samples_whatever_the_batch_size(monkeypatch):
    """One observation run's worth of tensors: with --batch-size 1 (or a model fixed at batch 1) each
    batch is a part of one sample, and ranking on the first part alone judged one sample, not 8."""
    import onnxopt.observe
    import onnxopt.sqnr

    fake, calls = _fake_compare([0.90, 0.995])
    monkeypatch.setattr(onnxopt.validate, "compare_models", fake)
    ranked = []  # samples seen by each ranking (_harm) of the fallback
    harm = onnxopt.sqnr.QuantizedSqnr.harm

    def counting(self, *args, **kwargs):
        rows = []
        update = onnxopt.observe.ErrorObserver.update
        monkeypatch.setattr(onnxopt.observe.ErrorObserver, "update",
                            lambda obs, r, c: (rows.append((id(obs), len(r))), update(obs, r, c))[1])
        try:
            return harm(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(onnxopt.observe.ErrorObserver, "update", update)
            first = rows[0][0] if rows else None
            ranked.append(sum(n for obs, n in rows if obs == first))

    monkeypatch.setattr(onnxopt.sqnr.QuantizedSqnr, "harm", counting)
    _quantize(DIGITS, batch_size=1)
    assert ranked == [8]
    ranked.clear()
    monkeypatch.setattr(onnxopt.validate, "compare_models", _fake_compare([0.90, 0.995])[0])
    _quantize(DIGITS)
    assert ranked == [8]
    ranked.clear()  # tensors that fill a run's budget with one sample (a 320x320 detector): one sample
    monkeypatch.setattr(onnxopt.sqnr, "DEFAULT_MAX_BYTES", 2_000)
    monkeypatch.setattr(onnxopt.validate, "compare_models", _fake_compare([0.90, 0.995])[0])
    _quantize(DIGITS)
    assert ranked == [1]


def test_a_fallback_that_ends_on_a_subset_miss_reports_the_whole_datas_figure(monkeypatch, tmp_path):
    """The reasons and the budget's figure come from all the data, not from the first samples that
    judged the last round (the pipeline's own validation then reuses that judgement)."""
    import numpy as np

    unlabelled = tmp_path / "inputs.npz"
    np.savez(unlabelled, input=np.load(DIGITS / "digits_test.npz")["input"][:64])
    sizes = []

    def fake(reference, candidate, data, **kwargs):
        sizes.append(data.num_samples)
        whole = data.num_samples == 64
        out = OutputComparison(name="logits", max_abs=0.1, max_rel=0.1, cosine=0.90 if whole else 0.95,
                               cosine_mean=0.995 if whole else 0.97, top1_agreement=1.0, ok=False,
                               samples=data.num_samples, worst_samples=[7, 1, 2, 3] if whole else [])
        return Validation(ok=False, providers=["CPU"], samples=data.num_samples, batches=len(data), rtol=None,
                          atol=0.0, data="fake", synthetic=False, outputs=[out])

    monkeypatch.setattr(onnxopt.validate, "compare_models", fake)
    result = onnxopt.optimize(DIGITS / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=DIGITS / "digits_calib.npz",
                              data=unlabelled, latency=False, speed_fallback=False, min_cosine=0.99)
    budget = result.report.passes[-1].details["budget"]
    assert not budget["met"] and sizes[0] == 64 and sizes[-1] == 64 and 4 in sizes
    assert "0.90000" in budget["figure"]  # the whole data's worst sample, not the subset's 0.95
    assert "mean cosine per sample (0.99500)" in budget["stuck"]  # the whole data's mean

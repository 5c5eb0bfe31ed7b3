"""onnxopt.sensitivity: levels per layer (sparsity, cluster bits, low-rank energy) by measured
sensitivity; the sensitive layer gets the milder setting, the budget holds, the endpoints stay lossless."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnxopt
from graphs import assert_equivalent, build, random_feeds, run, snapshot
from onnxopt.cli import main
from onnxopt.data import load_data
from onnxopt.errors import OptionError
from onnxopt.passes import ClusterWeights, LowRankFactorize, SparsifyWeights
from onnxopt.recipe import Recipe
from onnxopt.runtime import ModelSnapshot
from onnxopt.sensitivity import choose_levels

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
DIGITS = "models/digits/digits_cnn.onnx"
TEST = "models/digits/digits_test.npz"
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def two_layers(a: np.ndarray, b: np.ndarray):
    """y = x·A + x·B: two layers read side by side, each one's error alone in the output."""
    return build(
        f"""{OPSET}
        g (float[N,48] x) => (float[N,48] y) {{
            ya = MatMul(x, A)
            yb = MatMul(x, B)
            y = Add(ya, yb)
        }}""",
        {"A": a, "B": b},
    )


def spiky(n: int, keep: float) -> np.ndarray:
    """A weight whose mass sits in ``keep`` of its entries: sparsity up to 1 - keep hardly changes it."""
    w = randn(n, n) * 1e-3
    big = rng.random((n, n)) < keep
    w[big] = randn(int(big.sum())) * 3
    return w


@pytest.fixture
def feeds(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=randn(64, 48))
    return str(path)


def test_the_sensitive_layer_gets_the_milder_sparsity_and_the_budget_holds(feeds):
    dense, sparse = randn(48, 48), spiky(48, 0.1)  # zeroing half of A costs much; 0.9 of B costs little
    result = onnxopt.optimize(two_layers(dense, sparse), passes=[], sparsity="auto", data=feeds, min_cosine=0.995,
                              latency=False)
    record = result.report.passes[-1]
    levels = record.details["sensitivity"]["layers"]
    assert (levels["B"]["level"] or 0) >= 0.8
    assert (levels["A"]["level"] or 0) < levels["B"]["level"]
    assert levels["A"]["sensitivity"]["0.5"] > levels["B"]["sensitivity"]["0.5"]
    v = result.report.validation
    assert v.ok and min(o.cosine for o in v.outputs) >= 0.995  # the budget holds on the result
    assert any(n.startswith("sparsify auto:") for n in result.report.notes)


def test_the_sensitive_layer_gets_more_bits(feeds):
    # B: 8 values and a little noise, nearly exact at 3 bits; A: normal, 3 bits alone miss the budget
    few = (rng.choice(randn(8), size=(48, 48)) + 1e-3 * randn(48, 48)).astype(np.float32)
    result = onnxopt.optimize(two_layers(randn(48, 48), few), passes=[], cluster_bits="auto", data=feeds,
                              min_cosine=0.998, latency=False)
    levels = result.report.passes[-1].details["sensitivity"]["layers"]
    assert levels["B"]["level"] == 3 and "3" in levels["A"]["alone_misses"]
    assert levels["A"]["level"] is None or levels["A"]["level"] > levels["B"]["level"]
    v = result.report.validation
    assert v.ok and min(o.cosine for o in v.outputs) >= 0.998


def test_a_target_size_is_met_with_the_sensitive_layer_kept_milder(feeds):
    model = two_layers(randn(48, 48), spiky(48, 0.1))
    data = load_data(feeds, model)
    original = ModelSnapshot(model)
    try:
        target = int(2 * 48 * 48 * 4 * 0.5 * 1.5)  # what uniform 50% takes, about (values and 2-byte positions)
        search = choose_levels(model, SparsifyWeights(), original, data, min_cosine=0.99, target_bytes=target)
    finally:
        original.close()
    assert search.details["bytes_after"] <= target
    assert (search.per_layer.get("A") or 0) < search.per_layer["B"]


def test_a_model_that_misses_the_budget_already_is_left_alone(feeds):
    model = two_layers(randn(48, 48), randn(48, 48))
    data = load_data(feeds, model)
    original = ModelSnapshot(two_layers(randn(48, 48), randn(48, 48)))  # another model: cosine near 0
    try:
        search = choose_levels(model, SparsifyWeights(), original, data, min_cosine=0.99)
    finally:
        original.close()
    assert search.per_layer == {} and "misses the budget already" in search.note


def test_lowrank_auto_times_the_layers_it_keeps(feeds):
    low = (randn(48, 4) @ randn(4, 48)).astype(np.float32)  # rank 4: factorized at any energy
    result = onnxopt.optimize(two_layers(randn(48, 48), low), passes=[], lowrank_energy="auto", data=feeds,
                              min_cosine=0.999, latency=False)
    layers = result.report.passes[-1].details["sensitivity"]["layers"]
    timed = [u for u, r in layers.items() if r["level"] is not None or r.get("not_faster")]
    assert "B" in timed
    for unit in timed:  # before / after kernel microseconds, whichever won (no timing is asserted)
        assert set(layers[unit]["latency_us"]) == {"before", "after"}
    assert layers["B"].get("rank", 4) <= 4
    assert result.report.validation.ok


def test_lowrank_at_a_fixed_ratio_times_its_layers_too(feeds):
    """Not only ``auto``: a lowrank run at a ratio records each factorized layer's kernel times."""
    low = (randn(48, 4) @ randn(4, 48)).astype(np.float32)
    result = onnxopt.optimize(two_layers(randn(48, 48), low), passes=[], lowrank_ratio=0.2, data=feeds, latency=False)
    record = result.report.passes[-1]
    assert record.name == "lowrank"
    timed = record.details["latency_us"]
    assert timed and all(set(t) == {"before", "after"} for t in timed.values())
    slower = [u for u, t in timed.items() if t["after"] >= t["before"]]
    assert set(record.details["layers"]) == set(timed) - set(slower)  # whichever won here; no timing asserted
    assert bool(slower) == any("left alone as not faster" in n for n in result.report.notes)


def test_lowrank_leaves_a_layer_whose_pair_is_slower_alone(feeds, monkeypatch):
    """The rule itself, with the timing decided: a layer measured slower as a pair stays one layer."""
    from onnxopt import sensitivity

    def timing(start, model, records, feed, providers="cpu", threads=1):
        return {u: ((1.0, 5.0) if u == "B" else (5.0, 1.0)) for u in records}

    monkeypatch.setattr(sensitivity, "measure_latency", timing)
    low = (randn(48, 4) @ randn(4, 48)).astype(np.float32)
    result = onnxopt.optimize(two_layers(low, low.copy()), passes=[], lowrank_ratio=0.2, data=feeds, latency=False)
    record = result.report.passes[-1]
    assert set(record.details["layers"]) == {"A"} and record.details["latency_us"]["B"] == {"before": 1.0, "after": 5.0}
    assert any("left alone as not faster" in n and "B" in n for n in result.report.notes)
    assert [n.op_type for n in result.model.graph].count("MatMul") == 3  # A's pair and B as it was


# -- the lossless endpoints of per-layer levels ------------------------------------------------------

def test_per_layer_endpoints_are_lossless():
    a, b = randn(48, 48), rng.choice(randn(200), size=(48, 48)).astype(np.float32)
    low = (randn(48, 3) @ randn(3, 48)).astype(np.float32)
    model = two_layers(a, b)
    before = snapshot(model)
    p = SparsifyWeights(per_layer={"A": 0.0, "B": 0.0})
    assert p(model).modified is False and snapshot(model) == before
    clustered = two_layers(a, b)
    ClusterWeights(per_layer={"B": 8})(clustered)  # 200 distinct values: 8 bits hold them exactly
    assert_equivalent(before, clustered, random_feeds(clustered, {"N": 3}), rtol=0.0)
    lowrank = two_layers(a, low)
    reference = snapshot(lowrank)
    q = LowRankFactorize(per_layer={"B": 1.0}, min_params=16)
    q(lowrank)
    assert set(q.details["layers"]) == {"B"}  # A is not named: left alone
    assert_equivalent(reference, lowrank, random_feeds(lowrank, {"N": 3}), rtol=1e-4)


def test_per_layer_levels_rewrite_only_the_named_layers_each_at_its_level():
    model = two_layers(randn(48, 48), randn(48, 48))
    p = SparsifyWeights(per_layer={"A": 0.25, "B": 0.75})
    p(model)
    assert p.details["layers"]["A"]["density"] == pytest.approx(0.75, abs=1e-3)
    assert p.details["layers"]["B"]["density"] == pytest.approx(0.25, abs=1e-3)
    c = ClusterWeights(per_layer={"B": 3})
    c(two_layers(randn(48, 48), randn(48, 48)))
    assert set(c.details["layers"]) == {"B"} and c.details["layers"]["B"]["clusters"] == 8


def test_a_pass_left_at_auto_refuses_to_run_alone():
    with pytest.raises(ValueError, match="chosen from data"):
        SparsifyWeights(per_layer="auto")(two_layers(randn(48, 48), randn(48, 48)))


# -- the user's surface ----------------------------------------------------------------------------

def test_auto_round_trips_through_toml_and_builds_auto_passes():
    recipe = Recipe(passes=["simplify"], sparsity="auto", cluster_bits="auto", data=TEST)
    again = Recipe.from_toml_text(recipe.to_toml())
    assert (again.sparsity, again.cluster_bits) == ("auto", "auto")
    built = {p.name: p for p in again.resolved_passes()}
    assert built["sparsify"].per_layer == "auto" and built["cluster"].per_layer == "auto"


@pytest.mark.parametrize("changes,words", [
    (dict(sparsity="auto"), "--sparsity auto measures each layer on --eval"),
    (dict(sparsity="auto", data=TEST, sparsity_pattern="2:4"), "give one"),
    (dict(lowrank_energy="auto", data=TEST, lowrank_ratio=0.5), "give one"),
    (dict(cluster_bits="some", data=TEST), "must be a whole number"),
])
def test_auto_is_refused_in_one_line_where_it_cannot_work(changes, words):
    with pytest.raises(OptionError, match=words):
        Recipe(**changes).check_options()


def test_sparsity_auto_from_the_command_line_on_digits(tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([DIGITS, "--passes", "simplify,fold-bn", "--sparsity", "auto", "--eval", TEST, "--max-drop", "1",
                 "--no-latency", "-o", str(out), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    sens = data["passes"][-1]["details"]["sensitivity"]
    assert sens["measure"] == "accuracy drop (points)" and sens["bytes_after"] < sens["bytes_before"]
    v = data["validation"]
    assert v["ok"] and (v["accuracy_before"] - v["accuracy_after"]) * 100 <= 1 + 1e-9
    chosen = {u: r["level"] for u, r in sens["layers"].items() if r["level"] is not None}
    assert chosen and set(chosen) == set(data["passes"][-1]["details"]["layers"])


def test_each_layer_alone_is_judged_on_at_most_the_probe_samples(tmp_path, monkeypatch):
    """A large eval set: the (layer, level) probes read its first PROBE_SAMPLES samples, the path's
    whole-model checks all of it, and the note says so."""
    from onnxopt import sensitivity

    monkeypatch.setattr(sensitivity, "PROBE_SAMPLES", 32)
    path = tmp_path / "x.npz"
    np.savez(path, x=randn(96, 48))
    model = two_layers(randn(48, 48), spiky(48, 0.1))
    data = load_data(str(path), model, batch_size=16)
    original = ModelSnapshot(two_layers(randn(48, 48), randn(48, 48)))
    original.close()
    original = ModelSnapshot(model)
    seen = []
    real = sensitivity.compare_models

    def counting(a, b, data, **kw):
        seen.append(data.num_samples)
        return real(a, b, data, **kw)

    monkeypatch.setattr(sensitivity, "compare_models", counting)
    try:
        search = choose_levels(model, SparsifyWeights(), original, data, min_cosine=0.99)
    finally:
        original.close()
    assert search.details["probe_samples"] == 32 and "first 32 of 96 samples" in search.note
    assert f"{len(seen)} sessions" in search.note and search.details["sessions"] == len(seen)
    assert set(seen) == {32, 96} and seen.count(32) >= 2 * len(SparsifyWeights.LEVELS)


def test_lowrank_times_gemm_layers_fused_with_their_activation(tmp_path):
    """onnxruntime runs a Gemm and its Relu as one kernel named 'fused <gemm>': still timed."""
    import onnx_ir as ir

    from onnxopt.passes import REGISTRY
    from onnxopt.sensitivity import slower_layers
    from pathlib import Path

    model = ir.load(Path(__file__).resolve().parents[1] / "models" / "zoo" / "mlp_bn.onnx")
    for name in ("simplify", "fold-bn"):
        model = REGISTRY[name]()(model).model
    feed = {model.graph.inputs[0].name: randn(32, 64)}
    slower, latency = slower_layers(model, LowRankFactorize(ratio=0.5), feed)
    assert len(latency) == 2 and all(set(t) == {"before", "after"} for t in latency.values())

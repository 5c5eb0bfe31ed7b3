"""quantize-int4's 8-bit blocks and its way back: MatMulNBits bits=8 computes the dequantized
product, errors bounded by the block scales, and with a budget a 4-bit layer steps to 8 bits
before float, so the fallback ends smaller than one that goes straight to float."""

from __future__ import annotations

import os

import numpy as np
import pytest
from graphs import run
from transformer_graphs import single_matmul, tiny_transformer, token_feeds

import onnxopt
from onnxopt.errors import OptionError
from onnxopt.passes.quantize_int4 import QuantizeWeightsInt4, dequantize_blocks, gptq_blocks, hqq_blocks, rtn_blocks
from onnxopt.recipe import Recipe


def _weights_and_inputs(seed: int = 0, k: int = 96, n: int = 24):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, (k, n)) * 0.1).astype(np.float32), rng.standard_normal((5, k)).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_8bit_matmulnbits_is_the_dequantized_product_within_the_scales(symmetric):
    w, x = _weights_and_inputs()
    k, block = w.shape[0], 32
    model = single_matmul(w)
    p = QuantizeWeightsInt4(block_size=block, symmetric=symmetric, wide=["MatMul"])
    p(model)
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert node.attributes["bits"].value == 8
    y = run(model, {"x": x})[0].astype(np.float64)
    codes, scale, zero = rtn_blocks(w, block, symmetric, bits=8)
    deq = dequantize_blocks(codes, scale, zero, k).astype(np.float64)
    # The kernel's product of the dequantized weight: float32 sums of K terms, each within one ulp.
    np.testing.assert_allclose(y, x @ deq, rtol=0, atol=float(4 * k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(deq)).max()))
    step = np.abs(scale).T.repeat(block, axis=0)[:k]  # [K, N]: |s| of each weight's block
    # |s| / 2 per weight; symmetric codes reach -128|s| on the extreme's side but only 127|s| on the
    # other, where a value past 127.5|s| is clipped.
    per_weight = np.maximum(step / 2, np.abs(w) - 127 * step) if symmetric else step / 2
    assert np.all(np.abs(y - x @ w.astype(np.float64)) <= np.abs(x) @ per_weight * (1 + 1e-4) + 1e-5)


@pytest.mark.parametrize("method", ["rtn-symmetric", "rtn-asymmetric", "hqq", "gptq"])
def test_8bit_error_no_worse_than_4bit(method):
    w, _ = _weights_and_inputs(seed=1, k=128, n=48)
    k = w.shape[0]
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((256, k)) @ (rng.standard_normal((k, k)) * 0.3 + np.eye(k))).astype(np.float32)
    gram = x.T.astype(np.float64) @ x
    err = {}
    for bits in (4, 8):
        if method == "hqq":
            codes, scale, zero = hqq_blocks(w, 32, bits=bits)
        elif method == "gptq":
            codes, scale, zero = gptq_blocks(w, gram, 32, True, bits=bits)
        else:
            codes, scale, zero = rtn_blocks(w, 32, method == "rtn-symmetric", bits)
        approx = dequantize_blocks(codes, scale, zero, k)
        err[bits] = np.linalg.norm(x @ approx - x @ w) if method == "gptq" else np.linalg.norm(approx - w)
    assert err[8] <= err[4] / 8, err  # 16x finer steps: far below, not just below


def test_excluding_steps_4_then_8_then_float():
    feeds = token_feeds()
    p = QuantizeWeightsInt4()
    p(tiny_transformer())
    unit = "MatMul(q)"
    assert p.details["bits"][unit] == 4 and p.undo_step(unit) == "8 bits"
    q = p.excluding([unit])
    q(tiny_transformer())
    assert q.details["bits"][unit] == 8 and set(q.units) == set(p.units)
    assert q.details["wide"] == {unit: "the accuracy budget's fallback stepped it up from 4 bits"}
    assert all(b == 4 for u, b in q.details["bits"].items() if u != unit)
    assert "1 of 7 weights at 8 bits" in q.summary
    assert q.undo_step(unit) == "float"
    r = q.excluding([unit])
    model = tiny_transformer()
    r(model)
    assert unit not in r.units and r.details["left"][unit] == "excluded" and "0 of 6 weights at 8 bits" in r.summary
    assert run(model, feeds)[0].shape == run(tiny_transformer(), feeds)[0].shape
    # --int4-fallback float: straight to float
    f = QuantizeWeightsInt4(fallback="float")
    f(tiny_transformer())
    assert f.undo_step(unit) == "float"
    g = f.excluding([unit])
    g(tiny_transformer())
    assert unit not in g.units and not g.details["wide"]
    with pytest.raises(ValueError):
        QuantizeWeightsInt4(fallback="int16")


def test_isolating_rewrites_only_that_unit_at_its_bits():
    p = QuantizeWeightsInt4().excluding(["MatMul(k)"])  # MatMul(k) at 8 bits
    p(tiny_transformer())
    alone = p.isolating(["MatMul(k)"])
    model = tiny_transformer()
    alone(model)
    assert alone.units == ["MatMul(k)"] and alone.details["bits"] == {"MatMul(k)": 8}
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 1
    nothing = p.isolating([])
    assert not nothing(tiny_transformer()).modified


def test_8bit_embedding_table_within_its_scales():
    feeds = token_feeds()
    table = next(v for v in tiny_transformer().graph.initializers.values() if v.name == "E").const_value.numpy()
    for symmetric in (True, False):
        m = tiny_transformer()
        gather = next(n for n in m.graph if n.op_type == "Gather")
        m.graph.outputs[0] = gather.outputs[0]  # read the embedding alone
        gather.outputs[0].shape = None
        QuantizeWeightsInt4(symmetric=symmetric, wide=["Gather"])(m)
        gq = next(n for n in m.graph if n.op_type == "GatherBlockQuantized")
        assert gq.attributes["bits"].value == 8
        ref = table[feeds["ids"]]
        blocks = table.reshape(table.shape[0], -1, 32)
        s = (np.maximum(np.abs(blocks.max(-1)), np.abs(blocks.min(-1))) / 128 if symmetric
             else (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 255)
        step = s.repeat(32, axis=1)[feeds["ids"]]
        bound = np.maximum(step / 2, np.abs(ref) - 127 * step) if symmetric else step / 2
        assert np.all(np.abs(run(m, feeds)[0] - ref) <= bound * (1 + 1e-5) + 1e-7)


def test_budget_fallback_ends_at_8_bits_smaller_than_float_fallback(tmp_path):
    feeds = token_feeds(batch=8, seq=16)
    sizes, results = {}, {}
    for to in ("int8", "float"):
        r = onnxopt.optimize(tiny_transformer(), quantize="int4", data=feeds, min_cosine=0.995, latency=False,
                             int4_fallback=to)
        assert r.ok
        path = tmp_path / f"{to}.onnx"
        r.save(path)
        sizes[to] = os.path.getsize(path)
        results[to] = r
    record = next(p for p in results["int8"].report.passes if p.name == "quantize-int4")
    assert record.details["fallback"] == "int8"
    wide = record.details["wide"]
    assert wide and all(why.startswith("the accuracy budget's fallback") for why in wide.values())
    assert any(n.startswith("budget: stepped") and "to 8 bits" in n for n in results["int8"].report.notes)
    assert sizes["int8"] < sizes["float"], sizes
    float_record = next(p for p in results["float"].report.passes if p.name == "quantize-int4")
    assert not float_record.details["wide"]


def test_budget_fallback_trims_its_last_round_to_a_mix_of_4_and_8_bits():
    # min cosine 0.99: rounds of 1, 2, 4 steps would put all 7 layers at 8 bits; the last round's steps
    # are trimmed (bisection) to the fewest that still meet it.
    r = onnxopt.optimize(tiny_transformer(), quantize="int4", data=token_feeds(batch=8, seq=16), min_cosine=0.99,
                         latency=False)
    assert r.ok
    record = next(p for p in r.report.passes if p.name == "quantize-int4")
    bits = record.details["bits"]
    assert 8 in bits.values() and 4 in bits.values(), bits
    assert f"{sum(b == 8 for b in bits.values())} of 7 weights at 8 bits" in record.summary


def test_int4_fallback_option_round_trips_and_is_checked(tmp_path):
    recipe = Recipe(quantize="int4", int4_fallback="float")
    assert "int4_fallback = \"float\"" in recipe.to_toml()
    assert Recipe.from_toml_text(recipe.to_toml()) == recipe
    assert recipe.pass_list()[-1].fallback == "float"
    assert Recipe(quantize="int4").pass_list()[-1].fallback == "int8"
    with pytest.raises(OptionError, match="--int4-fallback 'int16'"):
        Recipe(quantize="int4", int4_fallback="int16").check_options()
    with pytest.raises(OptionError, match="apply to --quantize int4"):
        Recipe(int4_fallback="float").check_options()
    from onnxopt.cli import _recipe, build_parser

    parser = build_parser()
    args = parser.parse_args(["m.onnx", "--quantize", "int4", "--int4-fallback", "float"])
    assert _recipe(args, parser).int4_fallback == "float"

"""LowRankFactorize: exact at the numerical rank, Eckart–Young error below it, activation-aware
better on the outputs it was given, never where the pair would be larger."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphs import assert_equivalent, build, op_types, random_feeds, run, snapshot, value_names
from onnxopt.passes import LowRankFactorize

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
# Factors are computed in float64 and stored in float32: rounding, not rank, is all that differs.
RTOL = 1e-4
rng = np.random.default_rng(0)


def low_rank(m: int, n: int, k: int) -> np.ndarray:
    return (rng.standard_normal((m, k)) @ rng.standard_normal((k, n))).astype(np.float32)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def lowrank(model: ir.Model, feeds, rtol=RTOL, **kwargs) -> LowRankFactorize:
    before = snapshot(model)
    p = LowRankFactorize(min_params=16, **kwargs)
    p(model)
    if rtol is not None:
        assert_equivalent(before, model, feeds, rtol=rtol)
    names = value_names(model)
    assert len(names) == len(set(names))
    return p


def test_full_energy_reproduces_matmul_and_gemm_of_lower_rank():
    model = build(
        f"""{OPSET}
        g (float[N,64] x) => (float[N,40] y) {{
            h = MatMul(x, W)
            y = Gemm <transB=1, alpha=0.5, beta=2.0> (h, B, C)
        }}""",
        {"W": low_rank(64, 48, 5), "B": low_rank(40, 48, 4), "C": randn(40)},
    )
    p = lowrank(model, random_feeds(model, {"N": 5}), energy=1.0)
    layers = p.details["layers"]
    assert layers["W"]["rank"] == 5 and layers["B"]["rank"] == 4
    assert layers["W"]["params_after"] == 5 * (64 + 48) and layers["W"]["macs_after"] == 5 * (64 + 48)
    assert op_types(model) == ["MatMul", "MatMul", "Gemm", "Gemm"]
    assert layers["B"]["weight_error"] < 1e-6


def test_gemm_transa_and_no_transb():
    model = build(
        f"""{OPSET}
        g (float[32,N] x) => (float[N,24] y) {{ y = Gemm <transA=1> (x, W) }}""",
        {"W": low_rank(32, 24, 3)},
    )
    lowrank(model, random_feeds(model, {"N": 4}), energy=1.0)
    assert op_types(model) == ["Gemm", "Gemm"]


@pytest.mark.parametrize("form", ["kxk+1x1", "kx1+1xk"])
def test_full_energy_reproduces_conv_in_both_forms(form):
    o, c = 32, 16
    if form == "kxk+1x1":  # W = Q (O x r) P (r x C k k)
        w = (rng.standard_normal((o, 3)) @ rng.standard_normal((3, c * 9))).reshape(o, c, 3, 3)
    else:  # W[o,c,i,j] = sum_t V[t,c,i] H[o,t,j]: separable
        w = np.einsum("tci,otj->ocij", rng.standard_normal((2, c, 3)), rng.standard_normal((o, 2, 3)))
    model = build(
        f"""{OPSET}
        g (float[N,{c},9,10] x) => (float[N,{o},5,10] y) {{
            y = Conv <pads=[2, 1, 1, 1], strides=[2, 1], dilations=[1, 1]> (x, W, B)
        }}""",
        {"W": w.astype(np.float32), "B": randn(o)},
    )
    p = lowrank(model, random_feeds(model, {"N": 2}), energy=1.0)
    assert p.details["layers"]["W"]["form"] == form
    assert op_types(model) == ["Conv", "Conv"]


def test_full_rank_weight_is_left_alone():
    model = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,32] y) {{ y = MatMul(x, W) }}""",
        {"W": randn(32, 32)},
    )
    before = snapshot(model)
    p = LowRankFactorize(energy=1.0, min_params=16)
    assert p(model).modified is False
    assert snapshot(model) == before
    assert "pair would be larger" in p.details["skipped"]["W"]


def test_ratio_sets_the_rank_and_the_error_is_the_svd_tail():
    w = randn(64, 48)
    model = build(
        f"""{OPSET}
        g (float[N,64] x) => (float[N,48] y) {{ y = MatMul(x, W) }}""",
        {"W": w},
    )
    p = lowrank(model, None, rtol=None, ratio=0.5)
    record = p.details["layers"]["W"]
    rank = int(0.5 * 64 * 48 / (64 + 48))
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert record["rank"] == rank
    assert record["weight_error"] == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    x = randn(8, 64)
    y = run(model, {"x": x})[0]
    # ‖x(W − Ŵ)‖ <= ‖x‖₂ ‖W − Ŵ‖₂ = ‖x‖₂ s[rank]
    assert np.linalg.norm(y - x @ w, 2) <= np.linalg.norm(x, 2) * s[rank] * (1 + 1e-4)


def test_activation_aware_has_the_smaller_output_error_on_its_data():
    n_in, n_out = 48, 40
    w = randn(n_in, n_out)
    x = randn(256, n_in) * np.geomspace(10, 0.01, n_in).astype(np.float32)  # very unequal input scales
    text = f"""{OPSET}
        g (float[N,{n_in}] x) => (float[N,{n_out}] y) {{ y = MatMul(x, W) }}"""
    errors = {}
    for gram in (None, {"W": x.T.astype(np.float64) @ x}):
        model = build(text, {"W": w})
        p = LowRankFactorize(ratio=0.4, min_params=16, activation_gram=gram)
        p(model)
        errors[gram is None] = np.linalg.norm(run(model, {"x": x})[0] - x @ w)
    assert errors[False] < errors[True]
    assert "output_error" in p.details["layers"]["W"]


def test_shared_weight_is_skipped():
    w = low_rank(32, 32, 2)
    model = build(
        f"""{OPSET}
        g (float[N,32] x) => (float[N,32] y) {{
            h = MatMul(x, W)
            y = MatMul(h, W)
        }}""",
        {"W": w},
    )
    p = LowRankFactorize(energy=1.0, min_params=16)
    assert p(model).modified is False
    assert "read by 2 nodes" in p.details["skipped"]["W"]


def test_subgraph_matmul():
    text = f"""{OPSET}
        g (float[N,32] x, bool c) => (float[N,24] y) {{
            y = If(c) <
                then_branch = t () => (float[N,24] a) {{ a = MatMul(x, W) }},
                else_branch = e () => (float[N,24] b) {{ b = MatMul(x, V) }}
            >
        }}"""
    model = build(text, {"W": low_rank(32, 24, 2), "V": low_rank(32, 24, 3)})
    before = snapshot(model)
    p = LowRankFactorize(energy=1.0, min_params=16)
    p(model)
    assert set(p.details["layers"]) == {"W", "V"}
    for c in (True, False):
        assert_equivalent(before, model, {"x": randn(3, 32), "c": np.array(c)}, rtol=RTOL)

"""float16 / bfloat16: ConvertFloat16 on the zoo and digits, and float islands chosen by measurement.

Bounds, stated once: a float16 rounding moves a value by at most 2**-11 (4.9e-4) of itself; a zoo
net's output goes through at most ~25 roundings of weights and activations, so its error stays
within 25 * 4.9e-4 ~ 1.2e-2 of the output's range (the worst measured on an AMD EPYC: 3e-3, and
onnxruntime CPU computes float16 nodes in float32 inside, which only lowers it); the cosine bound
1 - 1e-3 follows from that error bound. File: weights halve, the graph's structure does not:
``converted <= original - W/2 + 5% + 4 kB`` with W the float32 constant bytes (the 5%: the types of
intermediate tensors, which the pass records, and the boundary Casts).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.data import Dataset
from onnxopt.passes.precision import ConvertFloat16, cast_pairs
from onnxopt.precision import CPU_FLOAT16_DISABLED, choose_float_islands, convert_precision, emulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(glob.glob(os.path.join(ROOT, "models", "zoo", "*.onnx"))) + [
    os.path.join(ROOT, "models", "digits", "digits_cnn.onnx")]


def _feed(session: ort.InferenceSession, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if n == 0 else 8) for n, d in enumerate(i.shape)]
        feed[i.name] = (rng.integers(0, 10, shape).astype(np.int64) if "int" in i.type
                        else rng.random(shape).astype(np.float32))
    return feed


def _float_bytes(model: ir.Model) -> int:
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT)
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].dtype == ir.DataType.FLOAT and node.outputs[0].const_value:
            total += node.outputs[0].const_value.nbytes
    return total


@pytest.mark.parametrize("path", MODELS, ids=lambda p: os.path.basename(p))
def test_zoo_float16_is_valid_smaller_and_close(path):
    model = ir.load(path)
    weights = _float_bytes(model)
    p = ConvertFloat16("float16")
    p(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    original = os.path.getsize(path)
    assert len(data) <= original - weights / 2 + 0.05 * original + 4096
    assert cast_pairs(model) == []
    assert not any(n.op_type == "Cast" and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Cast"
                   for n in model.graph)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(data, providers=["CPUExecutionProvider"], disabled_optimizers=list(CPU_FLOAT16_DISABLED))
    assert [i.type for i in cand.get_inputs()] == [i.type for i in ref.get_inputs()]  # keep_io_types
    assert [o.type for o in cand.get_outputs()] == [o.type for o in ref.get_outputs()]
    feed = _feed(ref)
    for r, c in zip(ref.run(None, feed), cand.run(None, feed)):
        assert c.dtype == np.float32 and np.isfinite(c).all()
        assert np.abs(r - c).max() <= 1.2e-2 * np.abs(r).max() + 1e-6
        assert float((r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c))) >= 1 - 1e-3


def test_bfloat16_structure_on_the_zoo():
    """onnxruntime CPU has no bfloat16 BatchNormalization/Gemm/Add kernels: structure only (checker)."""
    for path in MODELS:
        model = ir.load(path)
        ConvertFloat16("bf16")(model)
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        assert cast_pairs(model) == []
        assert any(v.dtype == ir.DataType.BFLOAT16 for v in model.graph.initializers.values())
        assert [v.dtype for v in model.graph.inputs] == [ir.load(path).graph.inputs[0].dtype]


_NORM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 64] y) {
  [mul] sq = Mul(x, x)
  [mean] ms = ReduceMean<axes = [1]>(sq)
  [sqrt] r = Sqrt(ms)
  [div] y = Div(x, r)
}
"""


def _norm_data() -> Dataset:
    x = (np.random.default_rng(0).standard_normal((8, 64)) * 1e3).astype(np.float32)  # x*x ~ 1e6 > 65504
    return Dataset([{"x": x}])


def test_overflow_shows_when_fully_converted():
    """Every node float16: the emulation (float16 storage; nodes matched by name) overflows: NaN/inf or y = x/inf = 0."""
    model = ir.from_onnx_text(_NORM)
    converted = model.clone()
    ConvertFloat16(op_block_list=())(converted)
    emulated, _ = emulate(model, converted, ir.DataType.FLOAT16)
    sess = ort.InferenceSession(ir.to_proto(emulated).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": _norm_data().batches[0]["x"]})[0]
    assert not np.isfinite(y).all() or np.abs(y).max() == 0


@pytest.mark.parametrize("block", [(), None], ids=["nothing-blocked", "default-blocked"])
def test_islands_keep_the_overflow_float_and_meet_the_budget(block):
    model = ir.from_onnx_text(_NORM)
    options = {} if block is None else {"op_block_list": block}
    converted, islands = choose_float_islands(model, _norm_data(), budget_cosine=0.9999, **options)
    kept = {i["node"] for i in islands}
    assert "mul" in kept and "sqrt" in kept
    assert any(i["by"] == "measured" and "overflow" in i["reason"] for i in islands)
    _, details = convert_precision(model, _norm_data(), **options)
    assert details["met"] and details["cosine_mean"] >= 0.9999 and not details["nonfinite"]
    onnx.checker.check_model(ir.to_proto(converted), full_check=True)


def test_convert_precision_on_the_transformer_meets_the_budget():
    model = ir.load(os.path.join(ROOT, "models", "zoo", "transformer_encoder.onnx"))
    data = Dataset([{"input": np.random.default_rng(0).integers(0, 100, (4, 16)).astype(np.int64)}])
    converted, details = convert_precision(model, data, "float16")
    assert details["met"] and details["cosine_worst"] >= 0.999
    assert {i["op_type"] for i in details["islands"]} <= {"Softmax", "LayerNormalization"}
    assert cast_pairs(converted) == []


def test_keep_float_and_constant_out_of_range():
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      big = Constant<value = float[4] {-1e9, 0.0, 1.0, 2.0}>()
      a = Add(x, big)
      b = Relu(a)
      y = Mul(b, b)
    }
    """)
    p = ConvertFloat16(keep_float=["Mul(y)"])
    p(model)
    assert "Add(a)" in p.details["kept"] and "65504" in p.details["kept"]["Add(a)"]
    assert "Mul(y)" in p.details["kept"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_exact_cast_pairs_fold_and_lossy_ones_stay():
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int8[N] x, float[N] f) => (float[N] y, float[N] z) {
      a = Cast<to = 1>(x)
      b = Cast<to = 10>(a)
      c = Cast<to = 1>(b)
      y = Relu(c)
      h = Cast<to = 10>(f)
      z = Cast<to = 1>(h)
    }
    """)
    p = ConvertFloat16(keep_float=["Relu(y)"])
    p(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    # int8 -> float32 -> float16 -> float32 is exact: one Cast from x remains before Relu;
    # float32 -> float16 -> float32 (the model's own rounding) is not exact and stays
    assert [first for first, _ in cast_pairs(model)] == ["Cast(h)"]


def test_subgraph_stays_float_with_a_cast_at_its_boundary():
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[4] x) => (float[4] y) {
      a = Relu(x)
      y = If(c) <then_branch = t () => (float[4] o) { o = Neg(a) },
                 else_branch = e () => (float[4] o2) { o2 = Abs(a) }>
    }
    """)
    p = ConvertFloat16()
    p(model)
    assert any("subgraph" in r for r in p.details["kept"].values())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"c": np.array(True), "x": np.array([-1, 2, -3, 4], np.float32)})[0]
    np.testing.assert_allclose(y, [0, -2, 0, -4])


@pytest.mark.cuda
def test_transformer_float16_on_cuda():
    model = ir.load(os.path.join(ROOT, "models", "zoo", "transformer_encoder.onnx"))
    data = Dataset([{"input": np.random.default_rng(0).integers(0, 100, (4, 16)).astype(np.int64)}])
    _, details = convert_precision(model, data, "float16", providers="cuda")
    assert details["met"] and details["cosine_mean"] >= 0.9999

"""The lossless passes over every model of the corpus: the zoo, the trained digits model and the
onnx package's real architectures with random weights. Each result must pass onnx.checker and load
in onnxruntime after every pass, and match the reference session (optimizations disabled) within
the pipeline's documented tolerance; no foldable BatchNormalization may be left."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from models.light import LIGHT_NAMES, load_light
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_RTOL

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "models" / "zoo").glob("*.onnx"))
DIGITS = ROOT / "models" / "digits" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits" / "digits_test.npz"
PASSES = list(onnxopt.DEFAULT_PASSES)  # simplify, fold-bn, prune (all-zero channels), share-init
LINEAR = {"Conv", "ConvTranspose", "Gemm"}


@lru_cache(maxsize=None)
def _light(name: str) -> onnx.ModelProto:
    return load_light(name)


def _unpadded(conv: ir.Node) -> bool:
    pads = conv.attributes.get("pads")
    auto = conv.attributes.get("auto_pad")
    return (pads is None or not any(pads.as_ints())) and (auto is None or auto.as_string() in ("NOTSET", "VALID"))


def foldable_batchnorms(model: ir.Model) -> list[str]:
    """BatchNormalizations that an exact fold exists for, judged independently of the pass."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "BatchNormalization":
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type in LINEAR and len(producer.outputs[0].uses()) == 1:
            found.append(node.name)
            continue
        uses = node.outputs[0].uses()
        if len(uses) == 1 and uses[0].node.op_type == "Conv" and uses[0].idx == 0 and _unpadded(uses[0].node):
            found.append(node.name)
    return found


def _check_result(result: onnxopt.OptimizeResult) -> None:
    v = result.report.validation
    assert v is not None and v.error is None, v and v.error
    for out in v.outputs:
        assert out.ok, f"{out.name}: max abs {out.max_abs:.3g}, max rel {out.max_rel:.3g} (atol {DEFAULT_ATOL}, rtol {DEFAULT_RTOL})"
    assert foldable_batchnorms(result.model) == []
    assert result.report.after.op_counts.get("BatchNormalization", 0) <= result.report.before.op_counts.get(
        "BatchNormalization", 0
    )


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_model(path: Path):
    before = onnx.load(str(path))
    named = {str(d) for i in before.graph.input for d in (x.dim_param for x in i.type.tensor_type.shape.dim) if d}
    dims = {k: v for k, v in {"batch": 2, "seq": 16}.items() if k in named}
    result = onnxopt.optimize(path, PASSES, check=True, latency=False, dims=dims)
    _check_result(result)
    assert result.report.before.op_counts.get("BatchNormalization", 0) > 0 or "transformer" in path.stem
    # Only BatchNormalizations without an exact fold remain (concat_net: BN after a Concat of Relus).
    assert result.report.after.op_counts.get("BatchNormalization", 0) == len(result.report.passes[1].details["left"])
    assert onnx.load(str(path)) == before, "the input file changed"


@pytest.mark.skipif(not DIGITS.exists(), reason="trained digits model not built")
def test_digits_model_keeps_accuracy(tmp_path):
    result = onnxopt.optimize(DIGITS, PASSES, data=DIGITS_TEST, check=True, latency=False)
    _check_result(result)
    v = result.report.validation
    assert v.accuracy_before is not None and v.accuracy_before >= 0.9
    assert v.accuracy_after == v.accuracy_before
    assert v.samples == len(np.load(DIGITS_TEST)["labels"])
    assert result.report.after.op_counts.get("BatchNormalization", 0) == 0
    out = result.save(tmp_path / "digits.opt.onnx")
    onnx.checker.check_model(str(out))


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_NAMES)
def test_onnx_architecture(name: str):
    proto = _light(name)
    result = onnxopt.optimize(proto, PASSES, check=True, latency=False)
    _check_result(result)
    before_bn = result.report.before.op_counts.get("BatchNormalization", 0)
    after_bn = result.report.after.op_counts.get("BatchNormalization", 0)
    fold = result.report.passes[1].details
    assert fold["folded"] == before_bn - after_bn
    assert len(fold["left"]) == after_bn  # every BatchNormalization left standing has a reason
    if name in ("densenet121", "inception_v2"):  # Caffe2 exports: BN, then Mul and Add of [C] constants
        before, after = result.report.before.op_counts, result.report.after.op_counts
        assert before["Mul"] == before["Add"] == before["BatchNormalization"] > 0
        assert "Mul" not in after and "Add" not in after and fold["affine_folded"] == before["Mul"] * 2


def _file_bytes(model: ir.Model) -> int:
    """Serialized size without recorded intermediate shapes (value_info: annotations that shape
    inference adds, a few bytes a node, not weights or graph)."""
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    return proto.ByteSize()


def _assert_never_grows(model: ir.Model) -> None:
    """Each lossless pass in turn leaves the serialized model and its weights no larger, but for the
    slack the report allows (``growth_slack``: a shuffle's Gather indices, a rewritten node's name)."""
    from onnxopt.passes import REGISTRY
    from onnxopt.pipeline import growth_slack
    from onnxopt.stats import model_stats

    size, weights = _file_bytes(model), model_stats(model).bytes
    for name in PASSES:
        model = REGISTRY[name]()(model).model
        after_size, after_weights = _file_bytes(model), model_stats(model).bytes
        assert after_size <= size + growth_slack(size), f"{name}: serialized {size:,} -> {after_size:,} bytes"
        assert after_weights <= weights + growth_slack(weights), f"{name}: weights {weights:,} -> {after_weights:,} bytes"
        size, weights = after_size, after_weights


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_model_never_grows(path: Path):
    _assert_never_grows(ir.load(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_NAMES)
def test_onnx_architecture_never_grows(name: str):
    _assert_never_grows(ir.serde.deserialize_model(_light(name)))

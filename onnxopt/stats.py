"""Figures of a model: nodes by type, weight elements and bytes, MACs of its linear ops."""

from __future__ import annotations

__all__ = ["model_stats", "count_macs", "macs_per_sample", "node_macs"]

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.optimizer import fold_constants_ir

from onnxopt.data import feed_rows
from onnxopt.report import ModelStats

logger = logging.getLogger(__name__)

# Ops whose multiply-accumulates are counted; everything else counts zero.
_CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}





def _weights(model: ir.Model):
    """Every constant tensor once: initializers of all graphs and Constant nodes' values."""
    seen = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None and id(value) not in seen:
                seen.add(id(value))
                yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                yield attr.value


def model_stats(model: ir.Model, *, dims: Mapping[str, int] | None = None) -> ModelStats:
    """Count nodes, parameters (weight elements), weight bytes and MACs (dynamic dims from ``dims``, else 1)."""
    op_counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op_counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    params = 0
    nbytes = 0
    for tensor in _weights(model):
        params += math.prod(tensor.shape.numpy()) if tensor.shape is not None else 0
        nbytes += tensor.nbytes
    return ModelStats(
        nodes=sum(op_counts.values()),
        params=int(params),
        bytes=int(nbytes),
        macs=count_macs(model, dims=dims),
        op_counts=dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if not all(isinstance(d, int) and d >= 0 for d in dims):  # -1: an exporter's "dynamic"
        return None
    return tuple(dims)


def count_macs(model: ir.Model, *, dims: Mapping[str, int] | None = None) -> int | None:
    """MACs of Conv, ConvTranspose, Gemm and MatMul (and their quantized forms) for one batch.

    Shapes are those recorded when the inputs are static and every counting node has them, else
    inferred on a structural copy whose dynamic input dims are fixed (``dims`` by name, else 1; see
    ``_with_fixed_shapes``); the caller's model is not touched. ``None`` when shapes are unknown
    for a node that counts.
    """
    total = 0
    unknown = 0
    for macs in _macs(model, dims, ir.traversal.RecursiveGraphIterator).values():
        if macs is None:
            unknown += 1
        else:
            total += macs
    if unknown:
        logger.debug("MACs unknown for %d nodes", unknown)
        return None
    return int(total)


def macs_per_sample(model: ir.Model, feed: Mapping[str, np.ndarray], dims: Mapping[str, int],
                    counted: int | None = None) -> int | None:
    """MACs of one sample of ``feed`` (one batch): the model counted at ``dims`` with its named batch
    dims at the feed's rows, divided by them, so that a ``--dim`` on the batch dim does not count the
    whole batch as one sample. ``counted`` (a count at ``dims``, batch dims at 1 unless ``dims`` names
    them) is returned as it is where ``dims`` leaves every batch dim at 1 or the feed has one row."""
    rows = feed_rows(feed)
    batch = {dim.value: rows for v in model.graph.inputs if v.shape is not None and len(v.shape) > 0
             for dim in [v.shape[0]] if isinstance(dim, ir.SymbolicDim) and dim.value}
    if counted is not None and (rows <= 1 or not any(dims.get(name, 1) != 1 for name in batch)):
        return counted
    total = count_macs(model, dims={**dims, **batch})
    return None if total is None else total // (rows if batch else 1)


def node_macs(
    model: ir.Model, *, dims: Mapping[str, int] | None = None, key: Callable[[ir.Node], str] = lambda node: node.name
) -> dict[str, int | None]:
    """MACs of each main-graph node that counts (see ``count_macs``), by ``key(node)``; None where
    its shapes are unknown."""
    return {key(node): macs for node, macs in _macs(model, dims, iter).items()}


def _macs(model: ir.Model, dims: Mapping[str, int] | None, nodes: Callable) -> dict[ir.Node, int | None]:
    """MACs of each counting node in ``nodes(graph)``.

    A model with static inputs whose counting nodes all have static shapes recorded (a fixed-size CNN
    after ``simplify``) is read as it is: DenseNet-121 in milliseconds. Else counted on
    ``_with_fixed_shapes`` (0.35 s for DenseNet-121): with dynamic inputs a recorded shape may be the
    exporter's trace size, which only re-inference at the fixed dims corrects.
    """
    if all(v.shape is not None and all(isinstance(d, int) and d >= 0 for d in v.shape) for v in model.graph.inputs):
        recorded = {node: _node_macs(node) for node in nodes(model.graph) if _counts(node)}
        if all(macs is not None for macs in recorded.values()):
            return recorded
    clone = model.clone()
    # The folder names unnamed nodes as it goes: each counted node is reported as the caller's own.
    original = {id(c): n for c, n in zip(ir.traversal.RecursiveGraphIterator(clone.graph),
                                         ir.traversal.RecursiveGraphIterator(model.graph))}
    return {original.get(id(node), node): _node_macs(node)
            for node in nodes(_with_fixed_shapes(clone, dims).graph) if _counts(node)}


def _with_fixed_shapes(model: ir.Model, dims: Mapping[str, int] | None) -> ir.Model:
    """``model`` (a structural copy the caller made) with dynamic input dims fixed (``dims`` by name,
    else 1) and shapes inferred.

    Shapes are inferred by onnxscript's constant folder, which evaluates what the fixed dims make
    constant as it goes: an exporter's Shape → Gather → Concat → Reshape chains (a transformer's
    attention heads) otherwise leave every MatMul after them with unknown shapes.
    """
    dims = dict(dims or {})
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        fixed = [d if isinstance(d, int) else dims.get(getattr(d, "value", None) or "", 1) for d in value.shape]
        value.shape = ir.Shape([d if d >= 0 else 1 for d in fixed])
    for node in model.graph:
        for out in node.outputs:
            out.shape = None  # stale shapes recorded by the exporter would hide the fixed dims
    try:
        fold_constants_ir(model, onnx_shape_inference=True)
    except Exception as exc:  # shape inference is best effort
        logger.debug("constant folding failed: %s", exc)
        try:
            ShapeInferencePass(strict_mode=False)(model)
        except Exception as exc:
            logger.debug("shape inference failed: %s", exc)
    return model


def _counts(node: ir.Node) -> bool:
    return node.op_type in _CONV_OPS or node.op_type in _MATMUL_OPS or node.op_type in ("ConvTranspose", "Gemm")


def _node_macs(node: ir.Node) -> int | None:
    op = node.op_type
    if op in _CONV_OPS or op == "ConvTranspose":
        w_index = 3 if op == "QLinearConv" else 1
        w = _static_shape(node.inputs[w_index] if len(node.inputs) > w_index else None)
        if op == "ConvTranspose":
            x = _static_shape(node.inputs[0])
            if w is None or x is None:
                return None
            # Every input element meets every kernel tap of its group's output channels.
            return math.prod(x) * w[1] * math.prod(w[2:])
        y = _static_shape(node.outputs[0])
        if w is None or y is None:
            return None
        return math.prod(y) * math.prod(w[1:])
    if op in _MATMUL_OPS or op == "Gemm":
        a_index = 0
        a = _static_shape(node.inputs[a_index])
        y = _static_shape(node.outputs[0])
        if a is None or y is None:
            return None
        if op == "Gemm":
            trans_a = node.attributes.get("transA")
            k = a[0] if trans_a is not None and trans_a.as_int() else a[-1]
        else:
            k = a[-1]
        return math.prod(y) * k
    return 0

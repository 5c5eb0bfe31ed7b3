"""Fold inference-mode BatchNormalization into a neighbouring Conv, ConvTranspose, Gemm or MatMul.

BatchNormalization is a per-channel affine map ``y = s * x + t`` with ``s = gamma / sqrt(var + eps)``
and ``t = beta - mean * s``. After a linear producer ``x = W * u + b``:

    W' = W scaled by s along the output-channel axis,   b' = s * b + t.

Before a linear consumer ``z = W * y + b`` (no zero padding, so every tap sees BN's output):

    W' = W scaled by s along the input-channel axis,    b' = b + sum over inputs and taps of W * t.

The arithmetic is done in float64 and cast back to the weight's dtype (fp16 models included).
"""

from __future__ import annotations

__all__ = ["FoldBatchNorm", "batchnorm_scale_shift"]

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, constant_array, drop_if_unused, graphs_of, replace_weight

logger = logging.getLogger(__name__)

_FLOAT_KINDS = "f"


@dataclass
class _Affine:
    """The BatchNormalization (or a constant Mul/Add/Sub/Div) as ``y = scale * x + shift`` per
    channel (float64); a scalar Mul/Add has length 1 until ``_check_channels`` widens it."""

    scale: np.ndarray
    shift: np.ndarray


class _Refusal(Exception):
    """A reason, in words, why one BatchNormalization cannot be folded."""


def _only_consumer(value: ir.Value) -> ir.Node | None:
    """The node that alone reads ``value`` (once), if the value is not also a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _batchnorm_affine(bn: ir.Node) -> _Affine:
    if bn.attributes.get_int("training_mode", 0):
        raise _Refusal("training_mode=1 (batch statistics are computed at run time)")
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        raise _Refusal("running mean/var outputs are used (training graph)")
    if not bn.attributes.get_int("spatial", 1):
        raise _Refusal("spatial=0 (per-element statistics)")
    params = []
    for role, value in zip(("scale", "bias", "mean", "var"), bn.inputs[1:5]):
        if value is not None and value.is_graph_input():
            raise _Refusal(f"its {role} '{value.name}' is a graph input")
        array = constant_array(value)
        if array is None:
            raise _Refusal(f"its {role} '{getattr(value, 'name', None)}' is not a constant")
        params.append(array.astype(np.float64).reshape(-1))
    gamma, beta, mean, var = params
    if not len(gamma) == len(beta) == len(mean) == len(var):
        raise _Refusal("its parameters disagree in length")
    eps = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return _Affine(scale, beta - mean * scale)


def batchnorm_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """An inference BatchNormalization as per-channel ``(scale, shift)`` in float64, or None where
    it is not a fixed affine map (training mode, parameters that are not constants)."""
    try:
        affine = _batchnorm_affine(bn)
    except _Refusal:
        return None
    return affine.scale, affine.shift


def _weight(node: ir.Node, index: int, role: str) -> np.ndarray:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise _Refusal(f"{node.op_type} has no {role}")
    if value.is_graph_input():
        raise _Refusal(f"{node.op_type} {role} '{value.name}' is a graph input")
    array = constant_array(value)
    if array is None:
        raise _Refusal(f"{node.op_type} {role} '{value.name}' is not a constant")
    if array.dtype.kind not in _FLOAT_KINDS:
        raise _Refusal(f"{node.op_type} {role} has dtype {array.dtype} (only float weights fold)")
    return array


def _bias(node: ir.Node, index: int, channels: int, dtype) -> np.ndarray:
    if index < len(node.inputs) and node.inputs[index] is not None:
        return _weight(node, index, "bias").astype(np.float64)
    return np.zeros(channels, dtype=np.float64)


def _check_channels(affine: _Affine, channels: int, where: str) -> _Affine:
    """``affine`` over ``channels`` channels (a scalar one widened), or a refusal."""
    if len(affine.scale) == 1 and channels != 1:
        return _Affine(np.full(channels, affine.scale[0]), np.full(channels, affine.shift[0]))
    if len(affine.scale) != channels:
        raise _Refusal(f"{where} has {channels} channels, the per-channel map {len(affine.scale)}")
    return affine


# Elementwise ops with a constant operand that are a per-channel affine map of their other input.
_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


def _data_index(node: ir.Node) -> int:
    """The input that carries data: a BatchNormalization's first, an elementwise op's only non-constant one."""
    if node.op_type == "BatchNormalization":
        return 0
    variable = [i for i, v in enumerate(node.inputs[:2]) if v is not None and constant_array(v) is None]
    if len(node.inputs) != 2 or len(variable) != 1:
        raise _Refusal("it has no constant operand")
    if node.op_type in ("Sub", "Div") and variable[0] != 0:
        raise _Refusal(f"{node.op_type} of a constant by the data is not affine in the data")
    return variable[0]


def _elementwise_affine(node: ir.Node, data_index: int, axis: int, rank: int | None) -> _Affine:
    """``node`` (Mul/Add/Sub/Div by a constant) as a per-channel affine map along ``axis`` of a rank-``rank`` input."""
    const = constant_array(node.inputs[1 - data_index])
    if const.dtype.kind not in _FLOAT_KINDS:
        raise _Refusal(f"its constant has dtype {const.dtype}")
    if rank is None or const.ndim > rank:
        raise _Refusal("its data rank is unknown or below its constant's")
    shape = (1,) * (rank - const.ndim) + const.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis % rank):
        raise _Refusal(f"its constant of shape {list(const.shape)} varies along more than the channel axis")
    c = const.astype(np.float64).reshape(-1)
    if node.op_type == "Div" and not np.all(c):
        raise _Refusal("it divides by zero")
    ones, zeros = np.ones_like(c), np.zeros_like(c)
    return {"Mul": lambda: _Affine(c, zeros), "Div": lambda: _Affine(1.0 / c, zeros),
            "Add": lambda: _Affine(ones, c), "Sub": lambda: _Affine(ones, -c)}[node.op_type]()


def _output_layout(producer: ir.Node, value: ir.Value) -> tuple[int, int | None]:
    """The channel axis of ``producer``'s output ``value`` and its rank (None when unknown)."""
    rank = len(value.shape) if value.shape is not None else None
    if rank is None and producer.inputs and producer.inputs[0] is not None and producer.inputs[0].shape is not None:
        rank = len(producer.inputs[0].shape)  # BatchNormalization, Concat, Add keep their input's rank; MatMul too (2-D weight)
    if producer.op_type in ("Conv", "ConvTranspose"):
        weight = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        return 1, rank if rank is not None else (weight.ndim if weight is not None else None)
    if producer.op_type == "Gemm":
        return 1, 2
    if producer.op_type in ("MatMul", "Add"):
        return -1, rank
    return 1, rank  # BatchNormalization, Concat (of Convs)


def _scaled(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight * scale`` in the weight's dtype, computed in float32 at least (float64 for float64).

    The scale is exact in float64; one float32 product per element rounds once, as float64
    arithmetic cast back would, without copying a large weight to float64 first.
    """
    work = np.float64 if weight.dtype == np.float64 else np.float32
    return np.multiply(weight, scale.astype(work), dtype=work).astype(weight.dtype, copy=False)


def _is_zero_padded(conv: ir.Node) -> bool:
    auto_pad = conv.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        return True
    pads = conv.attributes.get("pads")
    return pads is not None and any(p != 0 for p in pads.as_ints())


@dataclass
class _Dequantized:
    """A weight stored compactly and dequantized in the graph: ``Mul(Cast(q), scale)`` or
    ``DequantizeLinear(q, scale[, zero_point])`` with integer ``q`` and a constant float ``scale``."""

    node: ir.Node  # the Mul or DequantizeLinear
    scale_index: int
    scale: np.ndarray
    shape: tuple[int, ...]  # the weight's
    dtype: np.dtype  # the weight's (the scale's)


def _dequantized(layer: ir.Node, index: int) -> _Dequantized | None:
    """The compact storage behind ``layer``'s weight input ``index``, or None where the weight is not
    computed by a dequantizing Mul or DequantizeLinear; a refusal where it is but cannot take a scale."""
    value = layer.inputs[index] if index < len(layer.inputs) else None
    producer = value.producer() if value is not None else None
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in ("Mul", "DequantizeLinear"):
        return None
    if producer.op_type == "Mul":
        for q_index in (0, 1):
            cast = producer.inputs[q_index].producer() if producer.inputs[q_index] is not None else None
            stored = constant_array(cast.inputs[0]) if cast is not None and cast.op_type == "Cast" else None
            scale = constant_array(producer.inputs[1 - q_index])
            if stored is not None and stored.dtype.kind in "iu" and scale is not None and scale.dtype.kind in _FLOAT_KINDS:
                break
        else:
            return None
        if np.broadcast_shapes(stored.shape, scale.shape) != stored.shape:
            raise _Refusal(f"{layer.op_type} weight: its dequantizing scale is larger than the weight")
        scale_index = 1 - q_index
    else:
        stored = constant_array(producer.inputs[0])
        scale = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        if stored is None or scale is None or stored.dtype.kind not in "iu":
            return None
        if producer.attributes.get_int("block_size", 0):
            raise _Refusal(f"{layer.op_type} weight: blocked DequantizeLinear")
        scale_index = 1
    if _only_consumer(value) is not layer:
        raise _Refusal(f"{layer.op_type} weight: its dequantized value is read elsewhere too")
    return _Dequantized(producer, scale_index, scale, stored.shape, scale.dtype)


def _rescale(graph: ir.Graph, weight: _Dequantized, axis: int, scale: np.ndarray, replace) -> None:
    """Multiply a compactly stored weight by ``scale`` along ``axis`` through its dequantizing scale,
    so that the integer storage stays as it is (a refusal where the scale cannot take it)."""
    rank = len(weight.shape)
    axis %= rank
    old = weight.scale.astype(np.float64)
    node = weight.node
    if node.op_type == "Mul":
        full = old.reshape((1,) * (rank - old.ndim) + old.shape)
        if any(d != 1 for i, d in enumerate(full.shape) if i != axis):
            raise _Refusal(f"its dequantizing scale of shape {list(old.shape)} varies along more than the channel axis")
        target = [1] * rank
        target[axis] = -1
        new = np.broadcast_to(full, [weight.shape[i] if i == axis else 1 for i in range(rank)]) * scale.reshape(target)
        replace(graph, node, weight.scale_index, new.astype(weight.dtype), "bnfold_scale")
        return
    # DequantizeLinear: a per-tensor scale becomes per-axis; a per-axis one must be on this axis.
    if np.any(scale <= 0):
        raise _Refusal("the BatchNormalization scale is not positive: a DequantizeLinear scale must stay positive")
    if old.size != 1 and (old.ndim != 1 or node.attributes.get_int("axis", 1) % rank != axis):
        raise _Refusal("its DequantizeLinear is quantized along another axis")
    if old.size == 1:
        if graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0)) < 13:
            raise _Refusal("per-axis DequantizeLinear needs opset 13")
        zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and zero is None:
            raise _Refusal("its DequantizeLinear zero point is not a constant")
        if zero is not None:
            replace(graph, node, 2, np.full(weight.shape[axis], zero.reshape(-1)[0], dtype=zero.dtype), "bnfold_zero")
        node.attributes["axis"] = ir.AttrInt64("axis", axis)
    new = old.reshape(-1) * scale if old.size != 1 else old.reshape(-1)[0] * scale
    replace(graph, node, weight.scale_index, new.astype(weight.dtype), "bnfold_scale")


class FoldBatchNorm(OnnxoptPass):
    """Fold every foldable inference BatchNormalization; leave the rest with a reason.

    Rules, tried in order for each BatchNormalization (main graph and subgraphs):

    1. after ``Conv`` (any group), ``ConvTranspose`` (any group), ``Gemm`` (transB 0 or 1, alpha/beta
       honoured), or ``MatMul`` with a constant 2-D weight on a 2-D input, with or without a following
       ``Add`` of a constant bias: scale the weight's output channels, fold the shift into the bias;
    2. before a ``Conv`` without zero padding, or a ``Gemm`` (transA=0) whose input it alone feeds:
       scale the weight's input channels, fold the shift into the bias.

    Never folds a training-mode BatchNormalization, one whose parameters are graph inputs or not
    constant, or one whose producer's output is read elsewhere. Weights are replaced by new
    initializers; a weight shared with another node is left for that node.
    """

    name = "fold-bn"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        left: dict[str, str] = {}
        into: Counter[str] = Counter()
        affine_into: Counter[str] = Counter()
        self._names = NameScope(model.graph)
        for graph in graphs_of(model):
            for bn in list(graph):
                if bn.op_type in _ELEMENTWISE and bn.domain in ("", "ai.onnx"):
                    try:
                        affine_into[self._fold_elementwise(model.graph, bn)] += 1
                    except _Refusal as reason:  # most Adds and Muls are not affine maps of a layer: no news
                        logger.debug("fold-bn: %s %s stays: %s", bn.op_type, bn.name, reason)
                    continue
                if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                    continue
                label = bn.name or bn.outputs[0].name
                try:
                    # New weights go to the main graph: visible in every subgraph, named uniquely.
                    target = self._fold(model.graph, bn)
                except _Refusal as reason:
                    left[label] = str(reason)
                    logger.warning("fold-bn: left %s standing: %s", label, reason)
                    continue
                folded += 1
                into[target] += 1
                logger.info("fold-bn: folded %s into %s", label, target)
        total = folded + len(left)
        affine = sum(affine_into.values())
        self.summary = f"folded {folded} of {total} BatchNormalization" + (
            f" ({', '.join(f'{n} into {k}' for k, n in sorted(into.items()))})" if into else ""
        ) + (f"; {len(left)} left" if left else "") + (
            f"; {affine} constant Mul/Add/Sub/Div folded too" if affine else ""
        )
        self.details = {"folded": folded, "total": total, "into": dict(into), "left": left,
                        "affine_folded": affine, "affine_into": dict(affine_into)}
        return ir.passes.PassResult(model, modified=folded + affine > 0)

    def _replace(self, graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, hint: str) -> ir.Value:
        return replace_weight(graph, node, index, array, hint, names=self._names)

    # -- one BatchNormalization ---------------------------------------------------------------

    def _fold(self, graph: ir.Graph, bn: ir.Node) -> str:
        affine = _batchnorm_affine(bn)
        reasons = []
        producer = bn.inputs[0].producer()
        if producer is not None:
            try:
                return self._fold_into_producer(graph, bn, producer, affine)
            except _Refusal as reason:
                reasons.append(f"after {producer.op_type}: {reason}")
        else:
            reasons.append("its input is a graph input")
        consumer = _only_consumer(bn.outputs[0])
        if consumer is not None:
            try:
                return self._fold_into_consumer(graph, bn, consumer, affine)
            except _Refusal as reason:
                reasons.append(f"before {consumer.op_type}: {reason}")
        else:
            reasons.append("its output has several consumers or is a graph output")
        raise _Refusal("; ".join(reasons))

    def _fold_elementwise(self, graph: ir.Graph, node: ir.Node) -> str:
        """A Mul/Add/Sub/Div by a per-channel constant, folded like a BatchNormalization: into the
        layer (or BatchNormalization) before it, else into an unpadded Conv or a Gemm after it."""
        data_index = _data_index(node)
        data = node.inputs[data_index]
        reasons = []
        producer = data.producer()
        if producer is not None and not (node.op_type in ("Add", "Sub") and producer.op_type == "MatMul"):
            try:
                affine = _elementwise_affine(node, data_index, *_output_layout(producer, data))
                return self._fold_into_producer(graph, node, producer, affine)
            except _Refusal as reason:
                reasons.append(f"after {producer.op_type}: {reason}")
        consumer = _only_consumer(node.outputs[0])
        if consumer is not None and consumer.op_type in ("Conv", "Gemm") and consumer.inputs[0] is node.outputs[0]:
            weight = constant_array(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
            rank = 2 if consumer.op_type == "Gemm" else (weight.ndim if weight is not None else None)
            return self._fold_into_consumer(graph, node, consumer, _elementwise_affine(node, data_index, 1, rank))
        raise _Refusal("; ".join(reasons) or "no layer to fold into")

    def _merge_into_batchnorm(self, graph, bn: ir.Node, affine: _Affine) -> None:
        """An affine map after a BatchNormalization that stays: it takes the map into its scale and bias."""
        _batchnorm_affine(bn)  # refuses training mode and non-constant parameters
        gamma, beta = (_weight(bn, i, role) for i, role in ((1, "scale"), (2, "bias")))
        affine = _check_channels(affine, gamma.size, "BatchNormalization")
        self._replace(graph, bn, 1, (gamma.astype(np.float64) * affine.scale).astype(gamma.dtype), "affine_scale")
        self._replace(graph, bn, 2, (beta.astype(np.float64) * affine.scale + affine.shift).astype(beta.dtype), "affine_bias")

    def _fold_into_producer(self, graph, bn, producer: ir.Node, affine: _Affine) -> str:
        op = producer.op_type
        if producer.domain not in ("", "ai.onnx"):
            raise _Refusal(f"{op} is not a standard op")
        add = None
        if op == "Add":
            add, producer = producer, self._matmul_under_add(producer)
            op = "MatMul"
        elif op == "Concat":
            return self._fold_after_concat(graph, bn, producer, affine)
        elif op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"):
            raise _Refusal(f"{op} is not Conv, ConvTranspose, Gemm, MatMul, BatchNormalization or a Concat of Convs")
        if _only_consumer(producer.outputs[0]) is not (add or bn) or (
            add is not None and _only_consumer(add.outputs[0]) is not bn
        ):
            raise _Refusal(f"the {op} output is also read by another node or is a graph output")
        if producer.graph is not bn.graph or (add is not None and add.graph is not bn.graph):
            # Its output would have to become the subgraph's output, which must be made inside it.
            raise _Refusal(f"the {op} is in an outer graph")
        if op == "Conv":
            self._scale_out_channels(graph, producer, affine, weight_axis=0, bias_index=2)
        elif op == "BatchNormalization":
            self._merge_into_batchnorm(graph, producer, affine)
        elif op == "ConvTranspose":
            self._fold_after_conv_transpose(graph, producer, affine)
        elif op == "Gemm":
            self._fold_after_gemm(graph, producer, affine)
        else:
            self._fold_after_matmul(graph, producer, add, bn, affine)
            return "MatMul" if add is None else "MatMul+Add"
        self._bypass(graph, bn)
        return op

    def _fold_after_concat(self, graph, bn: ir.Node, concat: ir.Node, affine: _Affine) -> str:
        """A channel Concat of Conv/ConvTranspose outputs: each producer takes its slice of the BN."""
        if _only_consumer(concat.outputs[0]) is not bn or concat.graph is not bn.graph:
            raise _Refusal("the Concat output is also read elsewhere, or in an outer graph")
        axis = concat.attributes.get_int("axis", 0)
        parts = []
        for value in concat.inputs:
            node = value.producer() if value is not None else None
            if node is None or node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx"):
                raise _Refusal(f"Concat input '{getattr(value, 'name', None)}' is not a Conv or ConvTranspose output")
            if _only_consumer(value) is not concat or node.graph is not bn.graph:
                raise _Refusal(f"Concat input '{value.name}' is also read elsewhere")
            weight = _weight(node, 1, "weight")
            if axis not in (1, 1 - weight.ndim):
                raise _Refusal(f"Concat axis {axis} is not the channel axis")
            channels = weight.shape[0] if node.op_type == "Conv" else weight.shape[1] * node.attributes.get_int("group", 1)
            parts.append((node, channels))
        affine = _check_channels(affine, sum(c for _, c in parts), "Concat")
        offset = 0
        for node, channels in parts:
            part = _Affine(affine.scale[offset : offset + channels], affine.shift[offset : offset + channels])
            if node.op_type == "Conv":
                self._scale_out_channels(graph, node, part, weight_axis=0, bias_index=2)
            else:
                self._fold_after_conv_transpose(graph, node, part)
            offset += channels
        self._bypass(graph, bn)
        return "Concat of Convs"

    def _matmul_under_add(self, add: ir.Node) -> ir.Node:
        for i, value in enumerate(add.inputs[:2]):
            node = value.producer() if value is not None else None
            other = add.inputs[1 - i]
            if node is not None and node.op_type == "MatMul" and constant_array(other) is not None:
                return node
        raise _Refusal("Add is not MatMul plus a constant bias")

    def _bypass(self, graph: ir.Graph, bn: ir.Node) -> None:
        """Remove ``bn`` (or a folded Mul/Add): its consumers (and graph outputs) read its data input instead."""
        data_index = _data_index(bn)
        source = bn.inputs[data_index]
        out = bn.outputs[0]
        if out.is_graph_output():
            # The graph output keeps its name, type and shape: the producer's value takes them over.
            name = out.name
            out.name = None
            source.name = name
            if out.type is not None:
                source.type = out.type
            if out.shape is not None:
                source.shape = out.shape
        ir.convenience.replace_all_uses_with(out, source, replace_graph_outputs=True)
        params = [v for i, v in enumerate(bn.inputs) if i != data_index]
        bn.graph.remove(bn, safe=True)
        for value in params:
            if value is not None:
                drop_if_unused(graph, value)

    def _scale_out_channels(self, graph, node: ir.Node, affine: _Affine, *, weight_axis: int, bias_index: int):
        compact = _dequantized(node, 1) if constant_array(node.inputs[1]) is None else None
        if compact is not None:  # int8 storage stays int8: the scale takes the BatchNormalization's
            affine = _check_channels(affine, compact.shape[weight_axis], node.op_type)
            bias = _bias(node, bias_index, compact.shape[weight_axis], compact.dtype)
            _rescale(graph, compact, weight_axis, affine.scale, self._replace)
            self._replace(graph, node, bias_index, (bias * affine.scale + affine.shift).astype(compact.dtype), "bnfold_bias")
            return
        weight = _weight(node, 1, "weight")
        channels = weight.shape[weight_axis]
        affine = _check_channels(affine, channels, node.op_type)
        bias = _bias(node, bias_index, channels, weight.dtype)
        shape = [1] * weight.ndim
        shape[weight_axis] = -1
        new_w = _scaled(weight, affine.scale.reshape(shape))
        new_b = bias * affine.scale + affine.shift
        self._replace(graph, node, 1, new_w, "bnfold")
        self._replace(graph, node, bias_index, new_b.astype(weight.dtype), "bnfold_bias")

    def _fold_after_conv_transpose(self, graph, node: ir.Node, affine: _Affine):
        weight = _weight(node, 1, "weight")  # [C_in, C_out / group, *kernel]
        group = node.attributes.get_int("group", 1)
        if weight.shape[0] % group:
            raise _Refusal(f"input channels {weight.shape[0]} not divisible by group {group}")
        per_group = weight.shape[1]
        channels = per_group * group
        affine = _check_channels(affine, channels, "ConvTranspose")
        bias = _bias(node, 2, channels, weight.dtype)
        kernel = weight.shape[2:]
        w = weight.astype(np.float64).reshape(group, weight.shape[0] // group, per_group, *kernel)
        s = affine.scale.reshape(group, 1, per_group, *([1] * len(kernel)))
        new_w = (w * s).reshape(weight.shape)
        new_b = bias * affine.scale + affine.shift
        self._replace(graph, node, 1, new_w.astype(weight.dtype), "bnfold")
        self._replace(graph, node, 2, new_b.astype(weight.dtype), "bnfold_bias")

    def _fold_after_gemm(self, graph, node: ir.Node, affine: _Affine):
        compact = _dequantized(node, 1) if constant_array(node.inputs[1]) is None else None
        weight = compact if compact is not None else _weight(node, 1, "weight")
        if len(weight.shape) != 2:
            raise _Refusal("Gemm weight is not 2-D")
        trans_b = node.attributes.get_int("transB", 0)
        axis = 0 if trans_b else 1
        channels = weight.shape[axis]
        affine = _check_channels(affine, channels, "Gemm")
        beta = node.attributes.get_float("beta", 1.0)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = _weight(node, 2, "bias").astype(np.float64) * beta
        else:
            bias = np.zeros(channels)
        shape = [1, 1]
        shape[axis] = -1
        new_w = None if compact is not None else weight.astype(np.float64) * affine.scale.reshape(shape)
        new_b = bias * affine.scale + affine.shift  # broadcasts over a [M, N] or [1, N] bias too
        if compact is not None:
            _rescale(graph, compact, axis, affine.scale, self._replace)
        else:
            self._replace(graph, node, 1, new_w.astype(weight.dtype), "bnfold")
        self._replace(graph, node, 2, new_b.astype(weight.dtype), "bnfold_bias")
        if "beta" in node.attributes:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    def _fold_after_matmul(self, graph, matmul: ir.Node, add: ir.Node | None, bn: ir.Node, affine: _Affine):
        compact = _dequantized(matmul, 1) if constant_array(matmul.inputs[1]) is None else None
        weight = compact if compact is not None else _weight(matmul, 1, "weight")
        if len(weight.shape) != 2:
            raise _Refusal("MatMul weight is not 2-D")
        x = matmul.inputs[0]
        batchnorm = bn.op_type == "BatchNormalization"  # else a Mul/Add along the last axis, checked already
        if batchnorm and (x.shape is None or len(x.shape) != 2):
            # BatchNormalization's channel axis is 1: it is the weight's column axis only on 2-D input.
            raise _Refusal("MatMul input is not known to be 2-D")
        channels = weight.shape[1]
        affine = _check_channels(affine, channels, "MatMul")
        if add is not None:
            index = 1 if add.inputs[0].producer() is matmul else 0
            bias = constant_array(add.inputs[index]).astype(np.float64)
            if batchnorm and bias.ndim > 2:
                raise _Refusal(f"Add bias has rank {bias.ndim}: the output is not 2-D")
        if compact is not None:
            _rescale(graph, compact, 1, affine.scale, self._replace)
        else:
            new_w = weight.astype(np.float64) * affine.scale.reshape(1, -1)
            self._replace(graph, matmul, 1, new_w.astype(weight.dtype), "bnfold")
        if add is not None:
            new_b = bias * affine.scale + affine.shift
            self._replace(graph, add, index, new_b.astype(weight.dtype), "bnfold_bias")
            self._bypass(graph, bn)
            return
        if not np.any(affine.shift):  # a Mul or Div: nothing to add
            self._bypass(graph, bn)
            return
        # No bias yet: the BatchNormalization becomes an Add of its shift.
        new_b = affine.shift.astype(weight.dtype)
        bn_out = bn.outputs[0]
        params = list(bn.inputs[1:])  # removing the node below detaches its inputs
        add = ir.node("Add", inputs=[bn.inputs[0], bn.inputs[0]], name=f"{bn.name or 'bn'}_bnfold_add")
        bn.graph.insert_after(bn, add)
        self._replace(graph, add, 1, new_b, "bnfold_bias")
        add.outputs[0].dtype = bn_out.dtype
        add.outputs[0].shape = bn_out.shape
        ir.convenience.replace_nodes_and_values(bn.graph, add, [bn], [], [bn_out], [add.outputs[0]])
        for value in params:
            if value is not None:
                drop_if_unused(graph, value)

    # -- BatchNormalization before its consumer ------------------------------------------------

    def _fold_into_consumer(self, graph, bn: ir.Node, consumer: ir.Node, affine: _Affine) -> str:
        op = consumer.op_type
        if consumer.domain not in ("", "ai.onnx") or op not in ("Conv", "Gemm"):
            raise _Refusal(f"{op} is not Conv or Gemm")
        if consumer.inputs[0] is not bn.outputs[0]:
            raise _Refusal(f"it feeds the {op} weight, not its input")
        if op == "Conv":
            if _is_zero_padded(consumer) and np.any(affine.shift):  # a pure scale keeps zeros zero
                raise _Refusal("Conv pads with zeros, which BatchNormalization would have shifted")
            self._fold_before_conv(graph, consumer, affine)
        else:
            self._fold_before_gemm(graph, consumer, affine)
        self._bypass(graph, bn)
        return f"following {op}"

    def _fold_before_conv(self, graph, conv: ir.Node, affine: _Affine):
        weight = _weight(conv, 1, "weight")  # [C_out, C_in / group, *kernel]
        group = conv.attributes.get_int("group", 1)
        c_out, per_group = weight.shape[0], weight.shape[1]
        affine = _check_channels(affine, per_group * group, "Conv input")
        kernel = weight.shape[2:]
        w = weight.astype(np.float64).reshape(group, c_out // group, per_group, *kernel)
        s = affine.scale.reshape(group, 1, per_group, *([1] * len(kernel)))
        t = affine.shift.reshape(group, 1, per_group, *([1] * len(kernel)))
        new_w = (w * s).reshape(weight.shape)
        extra = (w * t).reshape(c_out, -1).sum(axis=1)
        new_b = _bias(conv, 2, c_out, weight.dtype) + extra
        self._replace(graph, conv, 1, new_w.astype(weight.dtype), "bnfold")
        self._replace(graph, conv, 2, new_b.astype(weight.dtype), "bnfold_bias")

    def _fold_before_gemm(self, graph, gemm: ir.Node, affine: _Affine):
        if gemm.attributes.get_int("transA", 0):
            raise _Refusal("Gemm has transA=1")
        weight = _weight(gemm, 1, "weight")
        if weight.ndim != 2:
            raise _Refusal("Gemm weight is not 2-D")
        trans_b = gemm.attributes.get_int("transB", 0)
        w = weight.astype(np.float64)
        w_kn = w.T if trans_b else w  # [K, N]
        affine = _check_channels(affine, w_kn.shape[0], "Gemm input")
        alpha = gemm.attributes.get_float("alpha", 1.0)
        beta = gemm.attributes.get_float("beta", 1.0)
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            bias = _weight(gemm, 2, "bias").astype(np.float64) * beta
        else:
            bias = np.zeros(w_kn.shape[1])
        new_w_kn = w_kn * affine.scale.reshape(-1, 1)
        new_w = new_w_kn.T if trans_b else new_w_kn
        new_b = bias + alpha * (affine.shift @ w_kn)
        self._replace(graph, gemm, 1, new_w.astype(weight.dtype), "bnfold")
        self._replace(graph, gemm, 2, new_b.astype(weight.dtype), "bnfold_bias")
        if "beta" in gemm.attributes:
            gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

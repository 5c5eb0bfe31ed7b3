"""Cross-layer equalization: rescale channels between two weighted layers so their weight ranges match.

For a producer W1 (output channel i), a chain of positively homogeneous ops (Relu, LeakyRelu, PRelu,
max or average pooling, zero Pad: f(x / s) = f(x) / s for s > 0) and a consumer W2 (input channel i):

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i   with   s_i = sqrt(r1_i / r2_i)

where r1_i = max|W1[i]| and r2_i = max|W2[:, i]|; both ranges become sqrt(r1_i * r2_i) and the float
model computes the same function (Nagel et al., "Data-Free Quantization", 2019). Pairs are
equalized in turn, and the sweep repeats until the scales settle, so a chain (pointwise →
depthwise → pointwise) equalizes as a whole. It is meant to run before ``quantize``: a weight
quantized per tensor (``--per-tensor``) no longer spends its levels on one outlier channel.
"""

from __future__ import annotations

__all__ = ["EqualizeCrossLayer"]

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, along_axis, channel_abs_max, constant_array, replace_weight

logger = logging.getLogger(__name__)

# Ops through which a per-channel positive scale passes unchanged.
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Identity"}
_MIN_RANGE = 1e-8


@dataclass
class _Layer:
    """A Conv or Gemm with its current weight (and bias) and how its channels are laid out."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    out_axis: int  # weight axis of output channels
    in_axis: int  # weight axis of input channels (depthwise: the output axis, channel i is row i)
    changed: bool = False

    def out_range(self) -> np.ndarray:
        return channel_abs_max(self.weight, self.out_axis)

    def in_range(self) -> np.ndarray:
        return channel_abs_max(self.weight, self.in_axis)


class EqualizeCrossLayer(OnnxoptPass):
    """Equalize the weight ranges of consecutive Conv/Gemm layers; the float function is unchanged.

    Rules:
    - producer: Conv (group 1 or depthwise) or Gemm with a constant weight and bias; consumer: Conv
      (group 1 or depthwise) or Gemm with a constant weight;
    - between them, only ops that commute with a positive per-channel scale (``_HOMOGENEOUS``, and
      Pad with a zero constant), each result read once and not a graph output;
    - Clip (ReLU6) is not homogeneous (its bound would move), so a ReLU6 chain is left alone, and said so.
    """

    name = "equalize"

    def __init__(self, *, iterations: int = 20, tolerance: float = 1e-3) -> None:
        super().__init__()
        self.iterations = iterations
        self.tolerance = tolerance

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers: dict[int, _Layer] = {}
        pairs: list[tuple[_Layer, _Layer]] = []
        refused: dict[str, str] = {}
        for node in graph:
            producer = _layer(node, layers)
            if producer is None:
                continue
            consumer_node, why = _follow(node.outputs[0])
            if consumer_node is None:
                if why:
                    refused[node.name or node.op_type] = why
                continue
            consumer = _layer(consumer_node, layers)
            if consumer is None:
                refused[node.name or node.op_type] = f"{consumer_node.op_type} reads it without a constant weight"
                continue
            if producer.weight.shape[producer.out_axis] != consumer.weight.shape[consumer.in_axis]:
                continue
            pairs.append((producer, consumer))
        sweeps = 0
        for sweeps in range(1, self.iterations + 1):
            worst = 0.0
            for producer, consumer in pairs:
                r1, r2 = producer.out_range(), consumer.in_range()
                ok = (r1 > _MIN_RANGE) & (r2 > _MIN_RANGE)
                s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
                if np.allclose(s, 1.0):
                    continue
                worst = max(worst, float(np.abs(np.log(s)).max()))
                producer.weight = producer.weight / along_axis(s, producer.weight.ndim, producer.out_axis)
                if producer.bias is not None:
                    producer.bias = producer.bias / s
                consumer.weight = consumer.weight * along_axis(s, consumer.weight.ndim, consumer.in_axis)
                producer.changed = consumer.changed = True
            if worst < self.tolerance:
                break
        names = NameScope(graph)
        changed = [layer for layer in layers.values() if layer.changed]
        for layer in changed:
            dtype = layer.node.inputs[1].const_value.dtype.numpy()
            replace_weight(graph, layer.node, 1, layer.weight.astype(dtype), "equalized", names)
            if layer.bias is not None and layer.node.inputs[2] is not None:
                replace_weight(graph, layer.node, 2, layer.bias.astype(dtype), "equalized", names)
            logger.info("equalize: rescaled %s", layer.node.name or layer.node.op_type)
        for what, why in refused.items():
            logger.info("equalize: %s not equalized: %s", what, why)
        self.details = {"pairs": len(pairs), "layers": len(changed), "sweeps": sweeps if pairs else 0, "left": refused}
        self.summary = f"equalized {len(pairs)} layer pairs ({len(changed)} layers rescaled, {self.details['sweeps']} sweeps)"
        return ir.passes.PassResult(model, modified=bool(changed))


def _layer(node: ir.Node, layers: dict[int, _Layer]) -> _Layer | None:
    if id(node) in layers:
        return layers[id(node)]
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.dtype.kind != "f" or weight.ndim < 2:
        return None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return None
    attrs = node.attributes
    if node.op_type == "Conv":
        group = attrs["group"].value if "group" in attrs else 1
        if group == 1:
            out_axis, in_axis = 0, 1
        elif weight.shape[1] == 1 and group == weight.shape[0]:
            out_axis, in_axis = 0, 0  # depthwise: channel i in and out
        else:
            return None
    else:
        if attrs.get("transA") is not None and attrs["transA"].value:
            return None
        if any(k in attrs and attrs[k].value != 1.0 for k in ("alpha", "beta")):
            return None
        trans_b = attrs["transB"].value if "transB" in attrs else 0
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
        if bias is not None and bias.size != weight.shape[out_axis]:
            return None
    if bias is not None:
        bias = bias.reshape(-1).astype(np.float64)
    layer = _Layer(node, weight.astype(np.float64), bias, out_axis, in_axis)
    layers[id(node)] = layer
    return layer


def _follow(value: ir.Value) -> tuple[ir.Node | None, str]:
    """The single weighted reader of ``value`` through homogeneous ops, or why there is none."""
    while True:
        if value.is_graph_output():
            return None, ""
        uses = value.uses()
        if len(uses) != 1:
            return None, ""
        reader = uses[0].node
        if uses[0].idx != 0 or reader.domain not in ("", "ai.onnx"):
            return None, ""
        if reader.op_type in ("Conv", "Gemm"):
            return reader, ""
        if reader.op_type == "Clip":
            return None, "Clip (ReLU6) bounds do not scale per channel"
        if reader.op_type == "Pad" and not _zero_pad(reader):
            return None, ""
        if reader.op_type not in _HOMOGENEOUS | {"Pad"}:
            return None, ""
        value = reader.outputs[0]


def _zero_pad(node: ir.Node) -> bool:
    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        pad_value = constant_array(node.inputs[2])
        return pad_value is not None and not np.any(pad_value)
    return True

"""Static int8 quantization: QuantizeLinear/DequantizeLinear pairs placed where onnxruntime fuses integer kernels.

The math, per tensor (activations) and per output channel (weights):

    uint8 asymmetric:  scale = (hi - lo) / 255,  zero_point = round(-lo / scale)   (lo <= 0 <= hi)
    int8 symmetric:    scale = max(|lo|, |hi|) / 127,  zero_point = 0
    weights:           int8 symmetric, scale_c = max|W_c| / m on the op's output-channel axis,
                       m = 2**(weight_bits - 1) - 1: 127, or 63 where the target's u8s8 kernels add
                       product pairs into int16 with saturation (x86 without VNNI: 255 x 126 = 32130
                       fits int16 whatever the pairing; see onnxopt.target)
    bias:              int32, scale_c = input scale * weight scale_c,  zero_point = 0

Calibrated ranges come in through the constructor (``ranges``: tensor name → (lo, hi)), so the pass
object is the whole recipe and replays without data; ``QuantizeQDQ.plan(model).tensors`` lists the
activations that need a range.
"""

from __future__ import annotations

__all__ = ["QuantizeQDQ", "QuantPlan", "QUANTIZED_OPS", "TARGET_WEIGHT_BITS", "already_quantized", "node_label"]

import fnmatch
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, along_axis, channel_abs_max, constant_array, drop_if_unused
from onnxopt.passes.fold_batchnorm import batchnorm_scale_shift

logger = logging.getLogger(__name__)

# Ops that compute in integers once quantized (onnxruntime: QLinearConv, QLinearMatMul /
# MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool, ...).
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_ELEMENTWISE = {"Add", "Mul"}
# Unary ops onnxruntime runs as a 256-entry table on integers (QLinearSigmoid, QLinearLeakyRelu):
# exact for a quantized input, so a SiLU (x * Sigmoid(x)) stays integer from end to end.
_LOOKUP = {"Sigmoid", "LeakyRelu"}
_POOLING = {"AveragePool", "GlobalAveragePool"}
# Ops that move or select values: their output takes their input's scale (no requantization), so
# onnxruntime drops the Q/DQ pair around them and runs them on integers.
_PASS_THROUGH = {
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Resize", "Split",
    "MaxPool", "GlobalMaxPool", "Identity", "Gather",
}
# Float inputs that are parameters, not data: a quantized value there would be a rounded scale or
# pad value (a Resize scale of 1.0 read back as 0.996 drops a row: onnxruntime.quantization's bug).
_PARAMETER_INPUTS = {"Resize": {1, 2, 3}, "Upsample": {1}, "Pad": {1, 2, 3}, "Clip": {1, 2}}
# Activations folded into the range of the op before them (Relu: zero point at the bottom of the range).
_FOLDED = {"Relu", "Clip"}
QUANTIZED_OPS = frozenset(_WEIGHTED | _ELEMENTWISE | _LOOKUP | _POOLING | {"Concat", "Gather"} | _PASS_THROUGH | _FOLDED)
# Never quantized: numerically sensitive, reported as such.
_SENSITIVE = {"Softmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
              "GroupNormalization", "RMSNormalization", "Sqrt", "Div", "Pow", "Exp", "Log", "Erf", "Tanh",
              "ReduceMean"}
_QUANTIZED_MARKERS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                      "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                      "MatMulIntegerToFloat"}
# Readers that see only a tensor's shape: they read the integer tensor, so that no DequantizeLinear
# runs just to feed them (exporters compute reshapes from activations' shapes).
_SHAPE_READERS = {"Shape", "Size"}
_CHAIN_REASON = "its result feeds no integer op: Q/DQ on its inputs would cost error and time"
_RECURRENT = {"LSTM", "GRU", "RNN"}
_RECURRENT_REASON = "recurrent op: onnxruntime has no QDQ kernel for it (only dynamic quantization)"
_SUBGRAPH_REASON = "inside a subgraph"
_BY_DESIGN = ("numerically sensitive", "an operand is a constant", "an input is a constant", _CHAIN_REASON)
# Only float32 is quantized: scales are float32, and QuantizeLinear takes no double (nor fp16 before
# opset 19). fp16, bf16 and double tensors stay as they are, with that reason.
_FLOATS = {ir.DataType.FLOAT}
_OTHER_FLOATS = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_MIN_SCALE = 1e-12
# Weight bits each target's int8 kernels compute exactly with (``onnxopt.target`` says which target a
# machine is): onnxruntime's u8s8 kernels on x86 without VNNI add product pairs into int16 with
# saturation, so 8-bit weights overflow there (2 x 255 x 127 = 64770); 7-bit ones cannot (32130).
TARGET_WEIGHT_BITS = {"avx2": 7, "avx512": 7, "vnni": 8, "arm64": 8, "tensorrt": 8}
# The largest int32 bias written: half of int32, leaving the accumulator room for the products.
_BIAS_LIMIT = 2**30


def _matches(pattern: str, node: ir.Node) -> bool:
    """Whether an ``exclude`` entry names ``node``: its op type, name or label, or an fnmatch pattern on its name."""
    name = node.name or ""
    return pattern in (node.op_type, name, node_label(node)) or bool(name and fnmatch.fnmatchcase(name, pattern))


def _feeds_parameter(value: ir.Value) -> bool:
    """Whether ``value`` reaches a parameter input (``_PARAMETER_INPUTS``), directly or through
    ops that pass it through."""
    todo, seen = [value], set()
    while todo:
        for use in todo.pop().uses():
            node = use.node
            if use.idx in _PARAMETER_INPUTS.get(node.op_type, ()):
                return True
            if use.idx == 0 and node.op_type in _PASS_THROUGH and id(node) not in seen:
                seen.add(id(node))
                todo.extend(node.outputs)
    return False


def _resize_axes_to_full_rank(graph: ir.Graph, names: NameScope,
                              inferred: Callable[[], Mapping[str, ir.Shape]]) -> list[str]:
    """Each Resize with opset 18's ``axes`` attribute rewritten to full-rank roi, scales or sizes (the
    same result): onnxruntime 1.32's layout transform of a QDQ Resize with ``axes`` fails (its
    'sizes' no longer match the axes; with scales, a Gather out of bounds). Where an input is not a
    constant, or ``sizes`` with other dims unknown or an aspect-ratio policy, the Resize is left as
    it is. ``inferred`` gives shapes the model does not record. Returns the labels of those rewritten."""
    done = []
    # Recorded dims are certain only when the inputs are static (else they may be an export's trace
    # sizes): only then are other axes' sizes written from them.
    static_inputs = all(v.shape is not None and all(isinstance(d, int) for d in v.shape) for v in graph.inputs)
    # With only a dynamic batch, the spatial dims recorded are certain too (a CNN's H and W).
    static_but_batch = all(v.shape is not None and all(isinstance(d, int) for d in v.shape[1:]) for v in graph.inputs)
    for node in list(graph):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or "axes" not in node.attributes:
            continue
        x = node.inputs[0]
        shape = None if x is None else x.shape if x.shape is not None else inferred().get(x.name)
        if shape is None:
            continue
        rank = len(shape)
        axes = [a % rank for a in node.attributes["axes"].as_ints()]
        given = {i: node.inputs[i] for i in (1, 2, 3) if len(node.inputs) > i and node.inputs[i] is not None}
        arrays = {i: constant_array(v) for i, v in given.items()}
        if any(a is None for a in arrays.values()):
            continue
        full: dict[int, np.ndarray] = {}
        if 1 in arrays and arrays[1].size:
            roi = np.concatenate([np.zeros(rank), np.ones(rank)]).astype(arrays[1].dtype)
            for j, a in enumerate(axes):
                roi[a], roi[rank + a] = arrays[1][j], arrays[1][len(axes) + j]
            full[1] = roi
        if 2 in arrays and arrays[2].size:
            scales = np.ones(rank, np.float32)
            scales[axes] = arrays[2]
            full[2] = scales
        if 3 in arrays and arrays[3].size:
            policy = node.attributes["keep_aspect_ratio_policy"].as_string() if "keep_aspect_ratio_policy" in node.attributes else "stretch"
            if policy != "stretch":
                continue
            dims = [shape[i] if isinstance(shape[i], int) else None for i in range(rank)]
            if static_inputs and all(dims[i] is not None for i in range(rank) if i not in axes):
                sizes = np.array([d or 0 for d in dims], np.int64)
                sizes[axes] = arrays[3]
                full[3] = sizes
            elif static_but_batch:  # as scales (the spec's own size / input), where they give the sizes exactly
                scales = np.ones(rank, np.float32)
                for a, size in zip(axes, arrays[3]):
                    if not dims[a]:
                        break
                    scales[a] = np.float32(int(size) / dims[a])
                    if int(np.floor(np.float32(dims[a]) * scales[a])) != int(size):
                        break
                else:
                    node.replace_input_with(3, None)
                    drop_if_unused(graph, given[3])
                    full[2] = scales
                if 2 not in full:
                    continue
            else:
                continue  # dims not certain: left as it is
        label = node_label(node)
        for i, array in full.items():
            old = node.inputs[i]
            node.replace_input_with(i, _initializer(graph, names, f"{label}_{('roi', 'scales', 'sizes')[i - 1]}", array))
            if old is not None:
                drop_if_unused(graph, old)
        node.attributes.pop("axes")
        done.append(label)
    return done


# Kernels of onnxruntime's weight-only and dynamic formats: a model holding them is quantized too.
_WEIGHT_ONLY_MARKERS = ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "QAttention")


def already_quantized(model: ir.Model, weight_only: bool = False) -> list[str]:
    """Names of the nodes that show ``model`` is quantized already (Q/DQ, QLinear*, *Integer; with
    ``weight_only``, also MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul, QAttention)."""
    markers = (*_QUANTIZED_MARKERS, *_WEIGHT_ONLY_MARKERS) if weight_only else _QUANTIZED_MARKERS
    return [
        node.name or node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type in markers
    ]


@dataclass
class QuantPlan:
    """What the pass will do to a graph: the activations it quantizes, grouped by shared scale, the
    nodes that become integer, and every node of a quantizable kind that stays float, with its reason."""

    tensors: list[str] = field(default_factory=list)            # activations that need a range, in order
    groups: dict[str, str] = field(default_factory=dict)        # tensor → representative of its scale group
    chains: dict[str, str] = field(default_factory=dict)        # tensor → its pass-through chain (groups less Concats)
    folded_outputs: list[str] = field(default_factory=list)     # outputs of folded Relu/Clip (non-negative ranges)
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)  # ranges known without data (Gather tables)
    nodes: dict[str, str] = field(default_factory=dict)         # node name → role ("weighted", "elementwise", ...)
    left: dict[str, str] = field(default_factory=dict)          # node name → why it stays float
    folded: dict[str, str] = field(default_factory=dict)        # Relu/Clip name → producer folded into
    tables: list[str] = field(default_factory=list)             # float constants stored as integers
    dtypes: dict[str, ir.DataType] = field(default_factory=dict)  # inferred types the model does not record
    shapes: dict[str, ir.Shape] = field(default_factory=dict)     # inferred shapes the model does not record
    outputs: dict[str, str] = field(default_factory=dict)       # node → the tensor carrying its result


class _Placement:
    """One ``QuantizeQDQ.plan`` under way: the ``QuantPlan`` it fills, the activations it marks for
    quantization (in order), and the scale groups it joins (union-find: pass-through chains, and
    those chains joined by Concats). Its steps run in the order ``QuantizeQDQ.plan`` gives."""

    _INTEGER_ROLES = ("weighted", "elementwise", "lookup", "concat", "pooling")

    def __init__(self, qdq: QuantizeQDQ, model: ir.Model) -> None:
        self.qdq, self.graph = qdq, model.graph
        self.plan = QuantPlan()
        self.quantized: dict[str, None] = {}  # ordered set of tensor names
        self.parent: dict[str, str] = {}  # scale groups: pass-through chains joined by Concats
        self.chain_parent: dict[str, str] = {}  # pass-through chains alone
        self.chain_candidates: list[ir.Node] = []  # ops that pay only inside an integer chain (``join_chains``)
        self.dtypes, self.shapes = _inferred_types(model)

    # ------------------------------------------------------------------ the pieces every step uses
    def find(self, x: str, parent: dict[str, str] | None = None) -> str:
        """The representative of ``x``'s scale group (``parent``: the groups, else the chains alone)."""
        parent = self.parent if parent is None else parent
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    def union(self, a: str, b: str, chain: bool = True) -> None:
        """One scale for ``a`` and ``b``; ``chain``: a pass-through chain too (not a Concat's join)."""
        for links in (self.parent, self.chain_parent) if chain else (self.parent,):
            ra, rb = self.find(a, links), self.find(b, links)
            if ra != rb:
                links[rb] = ra

    def dtype_of(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype if value.dtype is not None else self.dtypes.get(value.name)

    def is_activation(self, value: ir.Value | None) -> bool:
        """Whether ``value`` is a float32 tensor computed from the inputs: what calibration gives a range."""
        return (
            value is not None
            and self.dtype_of(value) in _FLOATS
            and constant_array(value) is None
            and not value.is_initializer()  # with a default that callers may override: not calibrated
        )

    def not_activation(self, value: ir.Value | None, what: str = "input") -> str:
        """Why ``value`` is not quantized as an activation."""
        dtype = self.dtype_of(value) if value is not None else None
        if dtype in _OTHER_FLOATS:
            return f"{what} is {dtype.name.lower()}: only float32 tensors are quantized"
        if value is not None and value.is_initializer() and value.is_graph_input():
            return f"{what} is a graph input with a default (an initializer callers may override)"
        return f"{what} is not a float activation"

    def mark(self, value: ir.Value) -> None:
        self.quantized.setdefault(value.name, None)

    def output_of(self, node: ir.Node) -> ir.Value:
        """The tensor that carries ``node``'s quantized output: a sole Relu/Clip reader folds in."""
        out = node.outputs[0]
        readers = out.uses()
        if len(readers) == 1 and not out.is_graph_output():
            reader = readers[0].node
            if reader.op_type in _FOLDED and not self.qdq._excluded(reader) and _clip_is_static(reader):
                self.plan.folded[node_label(reader)] = node_label(node)
                if reader.outputs[0].name not in self.plan.folded_outputs:
                    self.plan.folded_outputs.append(reader.outputs[0].name)
                return reader.outputs[0]
        return out

    # ------------------------------------------------------------------ the steps
    def place(self) -> None:
        """Each main-graph node of a quantizable kind, in order: quantized (its role in ``plan.nodes``,
        its tensors marked), left float with its reason (``plan.left``: ``exclude``d, a constant or
        non-float input, numerically sensitive), or, for Add, Mul, lookups and MatMuls of two
        activations, a candidate that ``join_chains`` decides."""
        for node in self.graph:
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                continue
            if self.qdq._excluded(node) and op in QUANTIZED_OPS:
                self.plan.left[node_label(node)] = self.qdq.reasons.get(node_label(node), "excluded")
            elif op in _WEIGHTED:
                self._weighted(node)
            elif op in _LOOKUP:
                if self.is_activation(node.inputs[0]):
                    self.chain_candidates.append(node)
            elif op in _ELEMENTWISE:
                if not all(self.is_activation(v) for v in node.inputs):
                    if self.dtype_of(node.outputs[0]) in _FLOATS:
                        self.plan.left[node_label(node)] = "an operand is a constant (bias or scale): kept in float for precision"
                    continue
                self.chain_candidates.append(node)
            elif op == "Concat":
                self._concat(node)
            elif op in _POOLING:
                if not self.is_activation(node.inputs[0]):
                    self.plan.left[node_label(node)] = self.not_activation(node.inputs[0])
                    continue
                self.mark(node.inputs[0])
                self.mark(node.outputs[0])
                self.plan.nodes[node_label(node)] = "pooling"
            elif op == "Gather" or op in _PASS_THROUGH:
                self._table(node)
            elif op in _SENSITIVE:
                self.plan.left[node_label(node)] = "numerically sensitive: stays float"

    def _weighted(self, node: ir.Node) -> None:
        """Conv, ConvTranspose, Gemm and MatMul: integer with a constant weight (MatMul: or a second
        activation, then a chain candidate) and a float activation input; Conv's output is quantized
        here (onnxruntime fuses only DQ → op → Q), MatMul's and Gemm's by ``mark_weighted_outputs``."""
        plan, label = self.plan, node_label(node)
        if node.op_type in ("Conv", "ConvTranspose"):
            if not self.is_activation(node.inputs[0]):
                plan.left[label] = self.not_activation(node.inputs[0])
                return
            if len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
                plan.left[label] = "weight is not a constant"
                return
            if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
                plan.left[label] = "bias is not a constant"
                return
            self.mark(node.inputs[0])
            self.mark(self.output_of(node))
        elif node.op_type == "Gemm":
            reason = _gemm_refusal(node)
            if reason is None and not self.is_activation(node.inputs[0]):
                reason = self.not_activation(node.inputs[0], "input A")
            if reason:
                plan.left[label] = reason
                return
            self.mark(node.inputs[0])
        else:  # MatMul
            a, b = node.inputs[0], node.inputs[1]
            if not self.is_activation(a):
                plan.left[label] = self.not_activation(a, "input A")
                return
            if constant_array(b) is None and not self.is_activation(b):
                plan.left[label] = "input B is neither a constant nor a float activation"
                return
            if constant_array(b) is None:
                self.chain_candidates.append(node)  # two activations: decided by ``join_chains``
                return
            self.mark(a)
        plan.nodes[label] = "weighted"

    def _concat(self, node: ir.Node) -> None:
        """A Concat of float activations computes on integers with one scale for its inputs and output
        (they join one scale group); one with a constant input, or that computes a parameter, stays float."""
        if not all(self.is_activation(v) for v in node.inputs):
            if self.dtype_of(node.outputs[0]) in _FLOATS:
                self.plan.left[node_label(node)] = "an input is a constant: kept in float"
            return
        if _feeds_parameter(node.outputs[0]):
            self.plan.left[node_label(node)] = "computes a parameter (Resize scales, Pad value, Clip bound): kept in float"
            return
        out = node.outputs[0]
        for v in node.inputs:
            self.mark(v)
            self.union(out.name, v.name, chain=False)
        self.mark(out)
        self.plan.nodes[node_label(node)] = "concat"

    def _table(self, node: ir.Node) -> None:
        """A float constant read only by shape ops or a Gather (an embedding table, a sliced projection
        weight) is stored as integers with its own range (``plan.fixed``), and its scale passes
        through to what reads it."""
        plan = self.plan
        table_value = node.inputs[0] if node.inputs else None
        table = constant_array(table_value)
        if (
            table is None or self.dtype_of(table_value) not in _FLOATS or table.size == 0
            or table_value.is_graph_output() or _feeds_parameter(table_value)
            or any(u.node.op_type not in _PASS_THROUGH | {"Gather"} or u.idx != 0
                   for u in table_value.uses())
        ):
            return
        self.mark(table_value)
        plan.fixed[table_value.name] = (float(min(table.min(), 0.0)), float(max(table.max(), 0.0)))
        plan.tables.append(table_value.name) if table_value.name not in plan.tables else None
        for out in node.outputs:
            self.mark(out)
            self.union(table_value.name, out.name)
        plan.nodes[node_label(node)] = "pass-through"

    def propagate(self) -> None:
        """Pass-through ops carry the scale of their data input forward (a fixed point over chains),
        and a Relu/Clip not folded into its producer takes its input's."""
        plan, changed = self.plan, True
        while changed:
            changed = False
            for node in self.graph:
                through = node.op_type in _PASS_THROUGH
                if not through and not (node.op_type in _FOLDED and node_label(node) not in plan.folded):
                    continue
                if self.qdq._excluded(node) or not node.inputs or node.inputs[0] is None:
                    continue
                if node.inputs[0].name not in self.quantized or node_label(node) in plan.nodes:
                    continue
                for out in node.outputs:
                    if self.dtype_of(out) in _FLOATS and not out.is_graph_output() and not _feeds_parameter(out):
                        self.mark(out)
                        if through:
                            self.union(node.inputs[0].name, out.name)
                plan.nodes[node_label(node)] = "pass-through" if through else "activation"
                changed = True

    def _feeds_integer_op(self, value: ir.Value, seen: set) -> bool:
        """Whether a quantized compute op reads ``value``, directly or through pass-through ops."""
        for use in value.uses():
            reader = use.node
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            if self.plan.nodes.get(node_label(reader)) in self._INTEGER_ROLES:
                return True
            if reader.op_type in _PASS_THROUGH and use.idx == 0 and not self.qdq._excluded(reader):
                if any(self._feeds_integer_op(out, seen) for out in reader.outputs):
                    return True
        return False

    def join_chains(self) -> None:
        """Add, Mul, lookups and activation × activation MatMul need a Q/DQ on every input: they pay off
        only inside an integer chain, when a quantized op reads their result (a residual Add before a
        Conv does; one before LayerNormalization only adds error and time), or, for a MatMul, when its
        B is an integer table. A fixed point, since such ops read each other; the others stay float."""
        plan, changed = self.plan, True
        while changed:
            changed = False
            for node in self.chain_candidates:
                if node_label(node) in plan.nodes:
                    continue
                b = node.inputs[1] if node.op_type == "MatMul" else None
                from_table = b is not None and b.name in self.quantized and self.find(b.name) in plan.fixed
                if not from_table and not self._feeds_integer_op(self.output_of(node), set()):
                    continue
                plan.nodes[node_label(node)] = (
                    "weighted" if node.op_type == "MatMul" else "lookup" if node.op_type in _LOOKUP else "elementwise"
                )
                changed = True
        for node in self.chain_candidates:
            if node_label(node) not in plan.nodes:
                plan.folded = {k: v for k, v in plan.folded.items() if v != node_label(node)}
                plan.left[node_label(node)] = _CHAIN_REASON
                continue
            for v in node.inputs:
                self.mark(v)
            if node.op_type != "MatMul":
                self.mark(self.output_of(node))

    def mark_weighted_outputs(self) -> None:
        """MatMul and Gemm outputs are quantized only when a quantized op reads them (else they fuse into
        float-output kernels), or after a folded Relu/Clip (so that it fuses away), or with ``quantize_outputs``."""
        for node in self.graph:
            if self.plan.nodes.get(node_label(node)) != "weighted" or node.op_type not in ("MatMul", "Gemm"):
                continue
            out = self.output_of(node)
            if out is not node.outputs[0] or self.qdq.quantize_outputs:
                self.mark(out)
                continue
            if any(node_label(u.node) in self.plan.nodes and u.node.op_type not in _PASS_THROUGH for u in out.uses()):
                self.mark(out)

    def result(self) -> QuantPlan:
        """The plan: each integer op's output tensor, the nodes out of reach (subgraphs, recurrent ops),
        and the marked tensors with their inferred types and shapes, scale groups and chains."""
        plan = self.plan
        for node in self.graph:
            if plan.nodes.get(node_label(node)) in self._INTEGER_ROLES:
                plan.outputs[node_label(node)] = self.output_of(node).name
        for label, reason in out_of_reach(self.graph).items():
            plan.left.setdefault(label, reason)
        plan.tensors = [t for t in self.quantized]
        plan.dtypes = {t: self.dtypes[t] for t in plan.tensors if t in self.dtypes}
        plan.shapes = {t: self.shapes[t] for t in plan.tensors if t in self.shapes}
        plan.groups = {t: self.find(t) for t in plan.tensors}
        plan.chains = {t: self.find(t, self.chain_parent) for t in plan.tensors}
        return plan


class QuantizeQDQ(OnnxoptPass):
    """Insert QDQ pairs with calibrated scales, weights as int8 initializers behind DequantizeLinear.

    Rules:
    - Conv (weight axis 0), ConvTranspose (axis 1; per-tensor when grouped), Gemm (axis by ``transB``)
      and MatMul (constant B of rank 2: per column) get per-channel int8 weights and an int32 bias.
    - Concat (one scale for its inputs and output), AveragePool and GlobalAveragePool compute on
      integers. Add and Mul of two activations (residuals) and MatMul of two activations do only
      inside an integer chain: when a quantized op reads their result; Add or Mul with a constant
      stays float.
    - Relu and Clip right after a quantized op (its only reader) are folded into its output range.
    - Shape ops and MaxPool pass their input's scale through; a float constant read only by Gather
      or shape ops (an embedding, a sliced projection weight) becomes an integer table whose scale
      its readers keep.
    - Softmax, normalizations and every other op stay float; so do ``exclude``d nodes (by name, op type
      or fnmatch pattern on the name), subgraphs, and anything without a calibrated range.
    - Conv and elementwise outputs are always quantized (onnxruntime fuses only DQ → op → Q); MatMul
      and Gemm outputs only when a quantized op reads them (else they fuse into float-output kernels).
    - With ``input_means`` (each Conv/Gemm input's per-channel mean; the pipeline measures them while
      calibrating), each bias absorbs the mean output error of its weight's rounding (``bias_correction``).
    - ``target`` (avx2, avx512, vnni, arm64, tensorrt; ``onnxopt.target`` detects, the pass never
      does) sets ``weight_bits``: 7 (weights in [-63, 63]) for x86 without VNNI, whose u8s8 kernels
      saturate int16 pair sums, else 8; tensorrt needs ``activations='int8'``.
      Both go into the model's ``metadata_props`` (``onnxopt.quantization.target``, ``.weight_range``).
    """

    name = "quantize"

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        *,
        activations: str = "uint8",
        per_channel: bool = True,
        exclude: Iterable[str] = (),
        quantize_outputs: bool = False,
        bias_correction: bool = True,
        input_means: Mapping[str, np.ndarray] | None = None,
        reasons: Mapping[str, str] | None = None,
        weight_bits: int | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__()
        if target is not None and target not in TARGET_WEIGHT_BITS:
            raise ValueError(f"target must be one of {', '.join(TARGET_WEIGHT_BITS)} (onnxopt.optimize resolves "
                             f"'auto' by detecting the machine), not {target!r}")
        if weight_bits is None:
            weight_bits = TARGET_WEIGHT_BITS.get(target, 8)
        if target == "tensorrt" and activations == "uint8":
            raise ValueError("target 'tensorrt' takes symmetric int8 activations: give activations='int8'")
        if weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 8, or 7 for CPUs whose int8 kernels saturate int16 pair sums, "
                             f"not {weight_bits!r}")
        if activations not in ("uint8", "int8", "auto"):
            raise ValueError(f"activations must be 'uint8' (asymmetric), 'int8' (symmetric) or 'auto' "
                             f"(chosen by onnxopt.optimize's measurement), not {activations!r}")
        self.ranges = None if ranges is None else {k: (float(v[0]), float(v[1])) for k, v in ranges.items()}
        self.activations = activations
        self.per_channel = per_channel
        self.exclude = tuple(exclude)
        self.quantize_outputs = quantize_outputs
        self.bias_correction = bias_correction
        self.input_means = None if input_means is None else {k: np.asarray(v, np.float64) for k, v in input_means.items()}
        self.reasons = dict(reasons or {})  # why an excluded node is, by its name: the report says it
        self.weight_bits = weight_bits
        self.target = target  # the name of the target the weight bits were chosen for (recorded, not used)

    def with_activations(self, activations: str) -> QuantizeQDQ:
        """The same recipe with activations stored as ``activations`` (``uint8`` or ``int8``)."""
        return self._replace(activations=activations)

    def for_target(self, target: str, activations: str | None = None) -> QuantizeQDQ:
        """The same recipe with the weight bits (and activation type, when given) that ``target`` needs."""
        return self._replace(target=target, weight_bits=TARGET_WEIGHT_BITS[target],
                             **({"activations": activations} if activations else {}))

    @property
    def weight_max(self) -> int:
        """The largest |int8 weight| written: 127 for 8-bit weights, 63 for 7-bit."""
        return 2 ** (self.weight_bits - 1) - 1

    def excluding(self, reasons: Mapping[str, str]) -> QuantizeQDQ:
        """The same recipe (ranges, options, measured input means) with more nodes kept float: ``reasons``
        maps each node name to why."""
        return self._replace(exclude=[*self.exclude, *reasons], reasons={**self.reasons, **reasons})

    def _replace(self, **changes) -> QuantizeQDQ:
        options = dict(activations=self.activations, per_channel=self.per_channel, exclude=self.exclude,
                       quantize_outputs=self.quantize_outputs, bias_correction=self.bias_correction,
                       input_means=self.input_means, reasons=self.reasons, weight_bits=self.weight_bits,
                       target=self.target)
        return QuantizeQDQ(self.ranges, **{**options, **changes})

    # ------------------------------------------------------------------ planning
    def _excluded(self, node: ir.Node) -> bool:
        return any(_matches(pattern, node) for pattern in self.exclude)

    def unmatched_exclusions(self, model: ir.Model) -> list[str]:
        """The ``exclude`` entries that match no node of ``model`` (a typo would quietly quantize the
        layer meant to stay float)."""
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        return [pattern for pattern in self.exclude if not any(_matches(pattern, node) for node in nodes)]

    def _standing_batchnorm(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-channel (scale, shift) of a BatchNormalization that ``_batchnorm_as_conv`` replaces:
        inference mode, float32, 1-3 spatial dims, not excluded, per-channel weights (one int8 weight
        per channel is then exact; per-tensor, the BN stays float)."""
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or not self.per_channel:
            return None
        x = node.inputs[0]
        if x is None or x.shape is None or not 3 <= len(x.shape) <= 5 or self._excluded(node):
            return None
        params = batchnorm_scale_shift(node)
        if params is None or constant_array(node.inputs[1]).dtype != np.float32:
            return None
        return params

    def _batchnorm_as_conv(self, graph: ir.Graph, bn: ir.Node, params, names: NameScope) -> None:
        """Replace a BatchNormalization that fold-bn left standing by the 1x1 depthwise Conv it equals
        (same name, same output), so that it runs as a QLinearConv inside the integer chain instead
        of a float island behind DequantizeLinear/QuantizeLinear and NHWC Transposes (DenseNet-121:
        62 of them)."""
        scale, shift = params
        x = bn.inputs[0]
        channels, rank = len(scale), len(x.shape)
        label = node_label(bn)
        weight = _initializer(graph, names, f"{label}_dw_weight", scale.reshape(channels, 1, *[1] * (rank - 2)).astype(np.float32))
        bias = _initializer(graph, names, f"{label}_dw_bias", shift.astype(np.float32))
        conv = ir.node("Conv", inputs=[x, weight, bias], attributes={"group": channels, "kernel_shape": [1] * (rank - 2)},
                       name=bn.name or None)
        old = list(bn.inputs[1:])
        ir.convenience.replace_nodes_and_values(graph, bn, [bn], [conv], [bn.outputs[0]], [conv.outputs[0]])
        for value in old:
            if value is not None:
                drop_if_unused(graph, value)

    def _batchnorms_as_convs(self, graph: ir.Graph) -> list[str]:
        """Every standing BatchNormalization of ``graph`` as a depthwise Conv; their labels."""
        names, done = NameScope(graph), []
        for node in list(graph):
            params = self._standing_batchnorm(node)
            if params is not None:
                done.append(node_label(node))
                self._batchnorm_as_conv(graph, node, params, names)
        return done

    def plan(self, model: ir.Model) -> QuantPlan:
        """Decide placement on the main graph without changing it (ranges are not needed), in the
        steps of ``_Placement``: ``place`` each node (quantized, left float with its reason, or a
        chain candidate), ``propagate`` scales through pass-through ops, ``join_chains`` (Add, Mul and
        activation × activation MatMul, integer only where a quantized op reads them), ``propagate``
        again from them, and ``mark_weighted_outputs`` (MatMul/Gemm outputs that a quantized op reads)."""
        if any(self._standing_batchnorm(node) is not None for node in model.graph):
            model = model.clone()  # plan the graph that ``call`` will quantize: standing BNs as Convs
            self._batchnorms_as_convs(model.graph)
        placement = _Placement(self, model)
        placement.place()
        placement.propagate()
        placement.join_chains()
        placement.propagate()
        placement.mark_weighted_outputs()
        return placement.result()

    # ------------------------------------------------------------------ rewriting
    def correctable_inputs(self, model: ir.Model) -> dict[str, int]:
        """Tensors whose per-channel mean bias correction needs (Conv and Gemm inputs), with their channel axis."""
        plan = self.plan(model)
        return {
            node.inputs[0].name: 1 for node in model.graph
            if plan.nodes.get(node_label(node)) == "weighted" and node.op_type in ("Conv", "Gemm")
        }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.ranges is None:
            raise ValueError("QuantizeQDQ needs calibrated ranges: QuantizeQDQ(ranges=calibrate(...))")
        if self.activations == "auto":
            raise ValueError("activations='auto' is chosen by measurement in onnxopt.optimize; "
                             "to run the pass alone, give 'uint8' or 'int8'")
        if self.bias_correction and self.input_means is None:
            logger.info("quantize: no bias correction: the inputs' channel means were not given (input_means=...)")
        self.details = {"left": {}, "quantized_nodes": [], "folded": {}, "tensor_map": {}}
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 13:
            self.summary = f"opset {opset} < 13: per-axis DequantizeLinear needs opset 13; nothing quantized"
            self.details["left"]["model"] = self.summary
            return ir.passes.PassResult(model, modified=False)
        marks = already_quantized(model)
        if marks:
            self.summary = f"already quantized ({marks[0]}, ...): nothing done"
            self.details["left"]["model"] = self.summary
            return ir.passes.PassResult(model, modified=False)

        graph = model.graph
        as_conv = self._batchnorms_as_convs(graph)
        names = NameScope(graph)
        full_rank = _resize_axes_to_full_rank(graph, names, functools.cache(lambda: _inferred_types(model)[1]))
        if full_rank:
            self.details["resize_axes_expanded"] = full_rank
        if as_conv:
            self.details["batchnorm_as_conv"] = as_conv
            logger.info("quantize: %d BatchNormalizations run as 1x1 depthwise Convs", len(as_conv))
        plan = self.plan(model)
        groups = self._scale_groups(plan)
        group_range = self._group_ranges(plan, groups)
        params: dict[str, tuple[float, int]] = {}
        for tensor in plan.tensors:
            g = groups[tensor]
            if g in group_range:
                params[tensor] = _activation_params(*group_range[g], self.activations)
        # Fixed (table) groups keep the table's exact range: the table is quantized with these params.
        values = {v.name: v for v in _all_values(graph)}
        for tensor, dtype in plan.dtypes.items():
            if tensor in values and values[tensor].dtype is None:
                values[tensor].dtype = dtype
        quant_dtype = ir.DataType.UINT8 if self.activations == "uint8" else ir.DataType.INT8

        left = dict(plan.left)
        # A quantized op whose activation inputs lack a range stays float.
        quantized_nodes: list[tuple[ir.Node, str, str]] = []  # labels before outputs are renamed
        io: dict[str, list] = {}  # node → [activation inputs, output] by their float names
        table_reads: set[str] = set()  # outputs of a Gather (or shape op) on an integer table
        for node in list(graph):
            role = plan.nodes.get(node_label(node))
            if role == "pass-through" and node.inputs[0] is not None and node.inputs[0].name in plan.tables:
                io[node_label(node)] = [[], node.outputs[0].name]  # a table read: its error is the table's
                table_reads.add(node.outputs[0].name)
            if role is None or role in ("pass-through", "activation"):
                continue
            needs = _activation_inputs(node, role)
            missing = [v.name for v in needs if v.name not in params]
            if missing:
                left[node_label(node)] = f"no calibrated range for {', '.join(missing)}"
                continue
            quantized_nodes.append((node, node_label(node), role))
            io[node_label(node)] = [[v.name for v in needs], plan.outputs.get(node_label(node), node.outputs[0].name)]

        # Found before Q/DQ go in: the MatMul's input shape decides, and its DQ output records none.
        bias_adds = {label: bias for node, label, role in quantized_nodes
                     if role == "weighted" and (bias := _fused_bias(node, self._excluded, plan.shapes)) is not None}

        # Activations: Q → DQ right after the producer; every reader takes the DQ output, except a
        # quantizable op left float: it reads the float tensor, or onnxruntime would quantize it
        # anyway (it fuses DQ → Conv/MatMul → Q with float weights). An op left float by design
        # (its result feeds no integer op) reads the DQ output of an op that computes on integers:
        # that op's float result does not exist, and reading it would undo the integer kernel.
        kept = [node for node in graph
                if node_label(node) in left and node.op_type in _WEIGHTED | _ELEMENTWISE | _POOLING | {"Concat"}]
        excluded = frozenset(id(node) for node in kept if self._excluded(node))
        by_design = frozenset(id(node) for node in kept) - excluded
        # A table read is integer too: onnxruntime fuses DequantizeLinear → Gather → QuantizeLinear into
        # a Gather on the table only when every reader takes the DQ output; a float reader of the Gather
        # would make it dequantize the whole table on every run (2 µs for the zoo transformer's 100x64
        # table, 10 ms for a 30k-token vocabulary), where reading the DQ output costs the same values.
        integer_outputs = {plan.outputs[label] for _, label, _ in quantized_nodes if label in plan.outputs} | table_reads
        dq_of: dict[str, ir.Value] = {}
        initializers = graph.initializers
        for tensor in plan.tables:
            value = initializers.get(tensor)
            if value is None or tensor not in params:
                continue
            scale, zp = params[tensor]
            q = _quantize_array(constant_array(value), np.float32(scale), zp, quant_dtype)
            dq_of[tensor] = self._table_dq(graph, value, q, np.float32(scale), np.array(zp, dtype=q.dtype), names)
        for tensor in plan.tensors:
            value = values.get(tensor)
            if value is None or tensor not in params or tensor in dq_of:
                continue
            if not value.uses() and not value.is_graph_output():
                continue
            scale, zp = params[tensor]
            keep_float = excluded if tensor in integer_outputs else excluded | by_design
            dq_of[tensor] = self._insert_qdq(graph, value, scale, zp, quant_dtype, names, keep_float)
            self.details["tensor_map"][tensor] = dq_of[tensor].name

        # Weights and biases.
        original = {dq.name: tensor for tensor, dq in dq_of.items()}
        weight_cache: dict[tuple, tuple[ir.Value, np.ndarray]] = {}
        for node, label, role in quantized_nodes:
            if role == "weighted":
                bias = bias_adds.get(label)
                self._quantize_weights(graph, node, label, params, weight_cache, names, original, bias)
                if bias is not None:
                    left.pop(node_label(bias[0]), None)  # its bias is added in the integer kernel
                    self.details.setdefault("matmul_biases", []).append(node_label(bias[0]))
            self.details["quantized_nodes"].append(label)
            logger.info("quantize: %s (%s) computes on integers", node.name, node.op_type)
        graph.sort()
        weighted_labels = {node_label(n) for n in graph if n.op_type in _WEIGHTED | _RECURRENT}
        # The plan already named them (``out_of_reach``): no second walk through the subgraphs.
        unreachable = {what: why for what, why in left.items()
                       if why.startswith(_SUBGRAPH_REASON) or why == _RECURRENT_REASON}
        for what, reason in left.items():
            # By design (Softmax, a constant operand) or by request (excluded) is information; a
            # refused Conv/Gemm/MatMul is a skip.
            weighted = what in weighted_labels or what in unreachable
            chosen = reason.startswith(_BY_DESIGN) or reason == "excluded" or what in self.reasons
            (logger.warning if weighted and not chosen else logger.info)("quantize: %s stays float: %s", what, reason)
        self.details["left"] = left
        self.details["folded"] = dict(plan.folded)
        self.details["activations"] = self.activations
        self.details["per_channel"] = self.per_channel
        self.details["weight_range"] = [-self.weight_max, self.weight_max]
        self.details["target"] = self.target
        self.details["io"] = io
        count = len(quantized_nodes)
        # Subgraph Conv/Gemm/MatMuls count too: a model whose weights sit in a Loop body is not quantized.
        in_subgraphs = sum(1 for reason in unreachable.values() if reason.startswith(_SUBGRAPH_REASON))
        weighted_total = sum(1 for n in graph if n.op_type in _WEIGHTED) + in_subgraphs
        weighted_done = sum(1 for n, _, _ in quantized_nodes if n.op_type in _WEIGHTED)
        self.details["weighted"] = {"total": weighted_total, "float": weighted_total - weighted_done,
                                    "in_subgraphs": in_subgraphs}
        self.summary = (
            f"quantized {count} nodes ({weighted_done} of {weighted_total} Conv/Gemm/MatMul), "
            f"{len(dq_of)} activations ({self.activations}{', per-channel weights' if self.per_channel else ''}"
            f"{', %d-bit weights' % self.weight_bits if self.weight_bits != 8 else ''}"
            f"{', target ' + self.target if self.target else ''}"
            f"{', %d biases corrected' % len(self.details['bias_corrected']) if self.details.get('bias_corrected') else ''}"
            f"{', %d BatchNormalizations as depthwise Conv' % len(as_conv) if as_conv else ''}); "
            f"{len(left)} left float"
        )
        modified = bool(dq_of or quantized_nodes)
        if modified:  # what the int8 weights were made for travels with the file
            model.metadata_props["onnxopt.quantization.target"] = self.target or "unspecified"
            model.metadata_props["onnxopt.quantization.weight_range"] = f"[{-self.weight_max}, {self.weight_max}]"
        return ir.passes.PassResult(model, modified=modified)

    def _group_ranges(self, plan: QuantPlan, groups: Mapping[str, str]) -> dict[str, tuple[float, float]]:
        """The range of each scale group: the union of its members' calibrated (or fixed) ranges."""
        group_range: dict[str, tuple[float, float]] = {}
        for tensor in plan.tensors:
            r = plan.fixed.get(tensor) or self.ranges.get(tensor)
            if r is None:
                continue
            g = groups[tensor]
            lo, hi = group_range.get(g, (r[0], r[1]))
            group_range[g] = (min(lo, r[0]), max(hi, r[1]))
        return group_range

    def _scale_groups(self, plan: QuantPlan) -> dict[str, str]:
        """``plan.groups``, less the non-negative chains (from a folded Relu) of a group that goes below
        zero: there the zero point would sit above 0, onnxruntime would have to keep the Relu and could
        not fuse the op before it (DenseNet-121's first Conv, whose pooled output joins a Concat of raw
        conv outputs). Such a chain keeps its own scale; the QLinearConcat requantizes it."""
        groups = dict(plan.groups)
        group_range = self._group_ranges(plan, groups)
        chain_range = self._group_ranges(plan, plan.chains)
        for tensor in plan.folded_outputs:
            chain = plan.chains.get(tensor)
            g = groups.get(tensor)
            if chain is None or g not in group_range or chain not in chain_range:
                continue
            if group_range[g][0] < 0 <= chain_range[chain][0]:
                for member, c in plan.chains.items():
                    if c == chain:
                        groups[member] = f"chain:{chain}"
        return groups

    def _insert_qdq(self, graph, value, scale, zp, dtype, names, keep_float=frozenset()) -> ir.Value:
        base = value.name
        indices = []
        if value.is_graph_output() and not value.is_graph_input():  # a graph input keeps its name
            # The graph output keeps its name, now on the dequantized tensor, so that the op fuses.
            indices = [i for i, output in enumerate(graph.outputs) if output is value]
            value.name = names.fresh(f"{base}_float")
        s = _initializer(graph, names, f"{base}_s", np.array(scale, dtype=np.float32))
        z = _initializer(graph, names, f"{base}_zp", np.array(zp, dtype=dtype.numpy()))
        # Parameters (a Resize's scales), directly or through a pass-through op, read the float value.
        readers = [use for use in value.uses() if id(use.node) not in keep_float
                   and use.idx not in _PARAMETER_INPUTS.get(use.node.op_type, ())
                   and not (use.idx == 0 and use.node.op_type in _PASS_THROUGH
                            and any(_feeds_parameter(out) for out in use.node.outputs))]
        q = ir.node("QuantizeLinear", [value, s, z], name=names.fresh(f"{base}_Q"))
        q.outputs[0].name = names.fresh(f"{base}_q")
        q.outputs[0].dtype = dtype
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=names.fresh(f"{base}_DQ"))
        dq.outputs[0].name = names.fresh(f"{base}_dq") if value.name == base else base
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape if value.name != base else None
        graph.extend([q, dq])
        for use in readers:
            shape_only = use.node.op_type in _SHAPE_READERS and use.node.domain in ("", "ai.onnx")
            use.node.replace_input_with(use.idx, q.outputs[0] if shape_only else dq.outputs[0])
        for index in indices:  # every place the output is listed (a model may list it twice)
            graph.outputs[index] = dq.outputs[0]
        return dq.outputs[0]

    def _table_dq(self, graph, value, q, scale, zp, names) -> ir.Value:
        """Every reader of the float constant ``value`` reads DequantizeLinear(q) instead; ``value`` goes."""
        base = value.name
        w = _initializer(graph, names, f"{base}_q", q)
        s = _initializer(graph, names, f"{base}_s", scale)
        z = _initializer(graph, names, f"{base}_zp", zp)
        dq = ir.node("DequantizeLinear", [w, s, z], name=names.fresh(f"{base}_DQ"))
        dq.outputs[0].name = names.fresh(f"{base}_dq")
        dq.outputs[0].dtype = value.dtype
        graph.append(dq)
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, dq.outputs[0])
        drop_if_unused(graph, value)
        return dq.outputs[0]

    def _replace_with_dq(self, graph, node, index, q, scale, zp, axis, names, hint) -> None:
        old = node.inputs[index]
        base = (old.name if old is not None and old.name else None) or node.name or node.op_type
        w = _initializer(graph, names, f"{base}_q", q)
        s = _initializer(graph, names, f"{base}_s", scale)
        z = _initializer(graph, names, f"{base}_zp", zp)
        attrs = {"axis": int(axis)} if axis is not None else {}
        dq = ir.node("DequantizeLinear", [w, s, z], attributes=attrs, name=names.fresh(f"{base}_DQ"))
        dq.outputs[0].name = names.fresh(f"{base}_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        graph.append(dq)
        node.replace_input_with(index, dq.outputs[0])
        if old is not None:
            drop_if_unused(graph, old)

    def _quantize_weights(self, graph, node, label, params, cache, names, original, bias_add=None) -> None:
        """``node``'s weight as per-channel int8 behind a DequantizeLinear, and its bias as int32: a
        Conv or Gemm bias input, or ``bias_add`` (``_fused_bias``: the Add that onnxruntime fuses
        into a MatMul's Gemm, and the index of its constant operand)."""
        op = node.op_type
        x_name = original.get(node.inputs[0].name, node.inputs[0].name)
        x_scale = params[x_name][0]
        if op == "MatMul" and constant_array(node.inputs[1]) is None:
            return  # two activations: both already behind Q/DQ
        w_value = node.inputs[1]
        w = constant_array(w_value).astype(np.float32)
        axis = _weight_axis(node, w)
        if not self.per_channel:
            axis = None
        key = (id(w_value), axis)
        bias = self._bias_of(node, bias_add)
        if key in cache and bias is not None:
            cached_scale = cache[key][1]
            if not np.array_equal(_widened_for_bias(cached_scale, bias, x_scale), cached_scale):
                key = (id(w_value), axis, id(node))  # this node's bias needs a wider scale: its own copy
        if key in cache:
            dq_out, w_scale, q = cache[key]
            node.replace_input_with(1, dq_out)
            drop_if_unused(graph, w_value)
        else:
            w_scale = _weight_scale(w, axis, self.weight_max)
            if bias is not None:
                w_scale = _widened_for_bias(w_scale, bias, x_scale)
            q = _round_weight(w, w_scale, axis, self.weight_max)
            zp = np.zeros(w_scale.shape, dtype=np.int8)
            scale = w_scale.astype(np.float32) if axis is not None else np.float32(w_scale.reshape(()))
            self._replace_with_dq(graph, node, 1, q, scale, zp.reshape(scale.shape), axis, names, "weight")
            cache[key] = (node.inputs[1], w_scale, q)
        if bias_add is not None:
            add, index = bias_add
            b = constant_array(add.inputs[index]).astype(np.float64).reshape(-1)
            self._int32_bias(graph, add, index, b, x_scale, w_scale, names)
            return
        bias_index = 2
        shift = self._bias_shift(node, w, q, w_scale, axis, x_name)
        has_bias = len(node.inputs) > bias_index and node.inputs[bias_index] is not None
        if has_bias or shift is not None:
            if has_bias:
                b = constant_array(node.inputs[bias_index]).astype(np.float64).reshape(-1)
            else:
                b = np.zeros(shift.shape[0], np.float64)
                node.resize_inputs(bias_index + 1)
            if shift is not None:
                b = b - shift
                self.details.setdefault("bias_corrected", []).append(label)
            self._int32_bias(graph, node, bias_index, b, x_scale, w_scale, names)

    @staticmethod
    def _bias_of(node, bias_add) -> np.ndarray | None:
        """The constant bias ``node``'s int32 bias will hold (float64, flat), or None."""
        if bias_add is not None:
            add, index = bias_add
            b = constant_array(add.inputs[index])
        elif node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = constant_array(node.inputs[2])
        else:
            return None
        return None if b is None else np.asarray(b, np.float64).reshape(-1)

    def _int32_bias(self, graph, node, index, b, x_scale, w_scale, names) -> None:
        """Input ``index`` of ``node`` becomes DequantizeLinear of ``b`` (float64, one value per output
        channel) as int32 with scale input scale × weight scale, zero point 0."""
        channels = b.shape[0]
        b_scale = (np.float64(x_scale) * np.asarray(w_scale, dtype=np.float64)).reshape(-1)
        if b_scale.size == 1 and channels > 1:
            b_scale = np.full(channels, b_scale[0])
        b_scale = np.maximum(b_scale, _MIN_SCALE).astype(np.float32)
        b = np.nan_to_num(b, nan=0.0, posinf=_BIAS_LIMIT * b_scale, neginf=-_BIAS_LIMIT * b_scale)
        q = np.clip(np.rint(b / b_scale.astype(np.float64)), -_BIAS_LIMIT, _BIAS_LIMIT).astype(np.int32)
        self._replace_with_dq(graph, node, index, q, b_scale, np.zeros(channels, np.int32), 0, names, "bias")

    def _bias_shift(self, node, w, q, w_scale, axis, x_name) -> np.ndarray | None:
        """The mean output error that rounding ``w`` to ``q`` causes, per output channel: (W_q - W) · E[x].

        Only the weight's own error is corrected (with the float input's channel means), so each
        layer's shift is independent of the others: correcting the whole measured output error at
        every layer at once counts upstream errors again at each layer (measured: worse).
        """
        if not self.bias_correction or node.op_type not in ("Conv", "Gemm"):
            return None
        if node.op_type == "Gemm" and any(
            a in node.attributes and node.attributes[a].value != 1.0 for a in ("alpha", "beta")
        ):
            return None  # the weight's error is scaled by alpha, a bias by beta
        mean = (self.input_means or {}).get(x_name)
        if mean is None or not np.isfinite(mean).all():
            return None
        error = q * along_axis(np.asarray(w_scale, np.float64), w.ndim, axis) - w.astype(np.float64)
        if node.op_type == "Gemm":
            trans_b = node.attributes["transB"].value if "transB" in node.attributes else 0
            if mean.shape[0] != w.shape[1 if trans_b else 0]:
                return None
            return error @ mean if trans_b else mean @ error
        out_channels, group_in = w.shape[0], w.shape[1]
        group = node.attributes["group"].value if "group" in node.attributes else 1
        if mean.shape[0] != group_in * group or out_channels % group:
            return None
        per_input = error.reshape(out_channels, group_in, -1).sum(axis=2)  # [O, C/g]
        group_of = np.arange(out_channels) // (out_channels // group)
        return (per_input * mean.reshape(group, group_in)[group_of]).sum(axis=1)


def _widened_for_bias(w_scale: np.ndarray, bias: np.ndarray, x_scale: float) -> np.ndarray:
    """``w_scale``, widened where the int32 bias (scale: input scale × weight scale) would pass
    ``_BIAS_LIMIT``: a bias far larger than the products it is added to (tiny inputs, a large
    bias) would saturate, and a saturated bias overflows onnxruntime's int32 accumulator."""
    bias = np.nan_to_num(np.abs(bias), nan=0.0, posinf=0.0)
    needed = bias / (max(float(x_scale), _MIN_SCALE) * _BIAS_LIMIT)
    if w_scale.size == 1:
        return np.maximum(w_scale, needed.max(initial=0.0))
    if needed.size != w_scale.size:
        return w_scale
    return np.maximum(w_scale, needed.reshape(w_scale.shape))


def _fused_bias(node: ir.Node, excluded: Callable[[ir.Node], bool],
                inferred: Mapping[str, ir.Shape]) -> tuple[ir.Node, int] | None:
    """The Add of a constant bias row that onnxruntime fuses with MatMul ``node`` into one Gemm, and
    the index of the bias among the Add's inputs; None where it does not.

    onnxruntime fuses MatMul → Add into a Gemm when A has rank 2, or a fully known shape (it then
    reshapes A to 2-D and back). With a float bias the Gemm stays float and dequantizes its weight
    on every run (measured: the zoo transformer at fixed shapes ran 2.3x its float time); with the
    bias as int32 behind a DequantizeLinear it becomes a QGemm. Where the fusion does not happen
    (A of rank 3 with dynamic dims: a MatMulIntegerToFloat), the bias stays float, since onnxruntime
    would run that DequantizeLinear on every call (measured 5% slower at batch 1).
    """
    a, out, w = node.inputs[0], node.outputs[0], constant_array(node.inputs[1])
    if node.op_type != "MatMul" or w is None or w.ndim != 2 or a is None:
        return None
    shape = a.shape if a.shape is not None else inferred.get(a.name)
    if shape is None or len(shape) < 2 or (len(shape) > 2 and not all(isinstance(d, int) for d in shape)):
        return None
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1:
        return None
    add, index = uses[0].node, 1 - uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or excluded(add):
        return None
    b = constant_array(add.inputs[index])
    channels = w.shape[1]
    if b is None or b.dtype != np.float32 or b.ndim > 2 or b.shape[-1:] != (channels,) or b.size != channels:
        return None
    return add, index


def out_of_reach(graph: ir.Graph) -> dict[str, str]:
    """Compute nodes that stay float because of where or what they are, by label: a Conv/Gemm/MatMul
    (or a recurrent op) inside an If/Loop/Scan body, whose tensors no calibration run can observe,
    and a recurrent op, which onnxruntime runs in integers only by dynamic quantization."""
    found: dict[str, str] = {}
    for node in graph:
        if node.op_type in _RECURRENT:
            found[node_label(node)] = _RECURRENT_REASON
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                bodies = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                bodies = list(attr.as_graphs())
            else:
                continue
            for body in bodies:
                for inner in ir.traversal.RecursiveGraphIterator(body):
                    if inner.op_type in _WEIGHTED | _RECURRENT:
                        found[node_label(inner)] = (
                            f"{_SUBGRAPH_REASON} ({attr.name} of {node.op_type} {node_label(node)}): "
                            "its tensors cannot be observed for calibration"
                        )
    return found


def node_label(node: ir.Node) -> str:
    """A node's name, or for an unnamed node its op type and first output (unique in a graph)."""
    if node.name:
        return node.name
    out = next((o.name for o in node.outputs if o.name), "")  # an LSTM may omit its first output
    return f"{node.op_type}({out})"


def _clip_is_static(node: ir.Node) -> bool:
    if node.op_type != "Clip":
        return True
    if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
        return True
    return all(v is None or constant_array(v) is not None for v in node.inputs[1:])


def _gemm_refusal(node: ir.Node) -> str | None:
    attr = lambda k, d: node.attributes[k].value if k in node.attributes else d  # noqa: E731
    if attr("transA", 0):
        return "transA=1"
    if constant_array(node.inputs[1]) is None:
        return "B is not a constant"
    b = constant_array(node.inputs[1])
    if b.ndim != 2:
        return "B is not 2-D"
    n = b.shape[0] if attr("transB", 0) else b.shape[1]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = constant_array(node.inputs[2])
        if c is None:
            return "C is not a constant"
        if c.size != n or (c.ndim == 2 and c.shape[0] != 1):
            return f"C of shape {list(c.shape)} is not a bias of {n}"
        if attr("alpha", 1.0) != 1.0 or attr("beta", 1.0) != 1.0:
            return "alpha or beta is not 1"
    return None


def _weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        group = node.attributes["group"].value if "group" in node.attributes else 1
        return 1 if group == 1 else None
    if op == "Gemm":
        trans_b = node.attributes["transB"].value if "transB" in node.attributes else 0
        return 0 if trans_b else 1
    if op == "MatMul":
        return w.ndim - 1 if w.ndim == 2 else None
    return None


def _round_weight(w: np.ndarray, w_scale: np.ndarray, axis: int | None, limit: int = 127) -> np.ndarray:
    """Symmetric int8 weight values: round(W / scale) clipped to [-limit, limit]."""
    return np.clip(np.rint(w / along_axis(np.asarray(w_scale, np.float64), w.ndim, axis)), -limit, limit).astype(np.int8)


def _weight_scale(w: np.ndarray, axis: int | None, limit: int = 127) -> np.ndarray:
    """max|W| / limit per channel (or per tensor); an all-zero channel gets scale 1 (its values stay 0)."""
    if w.size == 0:
        return np.ones(w.shape[axis] if axis is not None else 1, dtype=np.float64)
    if axis is None:
        m = np.array([np.abs(w).max()], dtype=np.float64)
    else:
        m = channel_abs_max(w, axis).astype(np.float64)
    return np.where(m > 0, m / float(limit), 1.0)


def _activation_params(lo: float, hi: float, activations: str) -> tuple[float, int]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = max(lo, -3.0e38), min(hi, 3.0e38)
    if activations == "int8":
        scale = max(abs(lo), abs(hi)) / 127.0
        return (scale if scale > _MIN_SCALE else 1.0), 0
    scale = (hi - lo) / 255.0
    if scale <= _MIN_SCALE:
        return 1.0, 0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zp


def _quantize_array(x: np.ndarray, scale: np.float32, zp: int, dtype: ir.DataType) -> np.ndarray:
    info = np.iinfo(dtype.numpy())
    return np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(dtype.numpy())


def _activation_inputs(node: ir.Node, role: str) -> list[ir.Value]:
    if role == "weighted":
        if node.op_type == "MatMul" and constant_array(node.inputs[1]) is None:
            return [node.inputs[0], node.inputs[1]]
        return [node.inputs[0]]
    return [v for v in node.inputs if v is not None]


def _inferred_types(model: ir.Model) -> tuple[dict[str, ir.DataType], dict[str, ir.Shape]]:
    """Element types and shapes of the main graph's values that the model does not record, by onnx
    shape inference.

    Exporters often write no value_info; a value of unknown type would otherwise never be quantized,
    and a MatMul input of unknown rank hides whether onnxruntime fuses its bias (``_fused_bias``).
    """
    untyped = any(v.dtype is None for node in model.graph for v in node.outputs)
    unshaped = any(node.op_type == "MatMul" and node.inputs and node.inputs[0] is not None and node.inputs[0].shape is None
                   for node in model.graph)
    if not (untyped or unshaped):
        return {}, {}
    proto = ir.to_proto(model)
    for tensor in proto.graph.initializer:  # types only: float weights' bytes are not needed
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                                    onnx.TensorProto.DOUBLE):
            continue  # integer tensors may be shapes that inference reads
        if len(tensor.dims) <= 1 and math.prod(tensor.dims) <= 8:
            continue  # small float vectors may be too: a Resize's scales
        tensor.ClearField("raw_data")
        for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field_name)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # inference is best effort: unknown types stay unknown
        logger.debug("type inference failed: %s", exc)
        return {}, {}
    types, shapes = {}, {}
    for info in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            types[info.name] = ir.DataType(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            shapes[info.name] = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                          for d in tensor_type.shape.dim])
    return types, shapes


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _initializer(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
    name = names.fresh(base)
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    value.dtype = value.const_value.dtype
    value.shape = value.const_value.shape
    graph.register_initializer(value)
    return value

"""Constant folding and dead-code removal, by onnxscript's optimizer and onnx-ir's common passes."""

from __future__ import annotations

__all__ = ["Simplify"]

import logging
import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import reshape_reshape_rule

from onnxopt.passes._base import OnnxoptPass
from onnxopt.passes.shape_arithmetic import ResolveShapeArithmetic

logger = logging.getLogger(__name__)


# Ops that only move or select a weight's values: folding them never grows the model when every
# reader of the weight is one of them (the weight itself then goes).
_LAYOUT_OPS = frozenset({"Slice", "Split", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def fold_weight_layout(node: ir.Node) -> bool | None:
    """Fold a layout op on a large constant when all the constant's readers are layout ops (else: default rules).

    onnxscript skips inputs over 8,192 elements that have several readers, so an exporter's packed
    attention weight (``in_proj_weight`` sliced into q, k, v, then transposed) stays a runtime
    Slice → Transpose chain: onnxruntime folds it for float, but once the weight is int8 behind a
    DequantizeLinear it runs on every call, and MatMul sees no constant weight to quantize per channel.
    """
    if node.op_type not in _LAYOUT_OPS or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    data = node.inputs[0]
    if data is None or data.const_value is None:
        return None
    for use in data.uses():
        reader = use.node
        if reader.op_type not in _LAYOUT_OPS or use.idx != 0:
            return None
        if any(v is not None and v.const_value is None for v in reader.inputs):
            return None
    return True


# A folded constant this small (8 int64: a shape) may replace inputs smaller than itself: the node it
# replaces takes more room in the file than the growth.
_SMALL_RESULT_BYTES = 64
# Integer initializers up to this many elements that are equal are merged by simplify itself.
_SMALL_DUPLICATE_ELEMENTS = 1024


def _tensor_bytes(value: ir.Value) -> int | None:
    """Bytes of ``value`` as a tensor, from its recorded type and static shape; None when unknown."""
    if value.const_value is not None:
        return value.const_value.nbytes
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return math.prod(shape) * dtype.itemsize


def keeps_storage_compact(node: ir.Node) -> bool | None:
    """Refuse (False) to fold a node whose result would take more bytes than the constants it frees.

    onnxscript's limits count elements, not bytes: a Cast of an int8 weight to float32 (the
    dequantizing Cast + Mul of a compact export) has as many elements and four times the bytes,
    and folding it made a recognizer with 39 such weights 12% larger. The freed inputs are the
    constants that only this node reads; a result of at most ``_SMALL_RESULT_BYTES`` (shape
    arithmetic) may still fold. Otherwise the default rules decide (None), as do layout ops on
    weights (``fold_weight_layout``, which never grows a weight).
    """
    layout = fold_weight_layout(node)
    if layout is not None:
        return layout
    sizes = [_tensor_bytes(out) for out in node.outputs]
    if any(size is None for size in sizes):
        return None  # shape inference could not say: onnxscript's element limits decide
    result = sum(sizes)
    if result <= _SMALL_RESULT_BYTES:
        return None
    freed = 0
    for value in {id(v): v for v in node.inputs if v is not None}.values():
        if value.const_value is None or value.is_graph_output():
            continue
        if all(use.node is node for use in value.uses()):
            freed += value.const_value.nbytes
    if result <= freed:
        return None
    logger.info("simplify: kept %s %s: folding makes %d bytes of the %d it frees", node.op_type,
                node.name, result, freed)
    return False


class _FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folder (it keeps QuantizeLinear/DequantizeLinear by design), plus weight
    layout ops, less the folds that would store more bytes than they free (``keeps_storage_compact``)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = fold_constants_ir(model, onnx_shape_inference=True, should_fold=keeps_storage_compact)
        return ir.passes.PassResult(model, modified=bool(result.modified))


def _sum_of_two(op, a, b):
    return op.Sum(a, b)


def _add(op, a, b):
    return op.Add(a, b)


class _ChannelShuffle(pattern.RewriteRuleClassBase):
    """ShuffleNet's channel shuffle, Reshape [N,C,H,W] → [N,g,C/g,H,W], Transpose (0,2,1,3,4), Reshape
    back, is a Gather of channels (exact: it moves values). onnxruntime runs the 5-D uint8 Transpose
    and the NCHW/NHWC Transposes around the Reshapes slowly: ShuffleNet int8 took 21 ms with them,
    8 ms with the Gather (fp32 6-8 ms either way)."""

    def pattern(self, op, x, split, merge):
        grouped = op.Reshape(x, split, _allow_other_attributes=True, _outputs=["grouped"])
        swapped = op.Transpose(grouped, perm=[0, 2, 1, 3, 4])
        return op.Reshape(swapped, merge, _allow_other_attributes=True, _outputs=["shuffled"])

    def check(self, context, x, grouped, shuffled, **_) -> bool:
        shapes = [v.shape for v in (x, grouped, shuffled)]
        if any(shape is None for shape in shapes) or [len(shape) for shape in shapes] != [4, 5, 4]:
            return False
        xs, gs, ss = (list(shape) for shape in shapes)
        return (
            all(isinstance(d, int) for d in (xs[1], gs[1], gs[2])) and gs[1] * gs[2] == xs[1]
            and [gs[0], gs[3], gs[4]] == [xs[0], xs[2], xs[3]] and ss == xs
            and not any(isinstance(d, ir.SymbolicDim) and d.value is None for d in xs)
        )

    def rewrite(self, op, x, grouped, **_):
        groups, per_group = grouped.shape[1], grouped.shape[2]
        # int32 indices: half the bytes of int64 (Gather takes either); identical ones are merged at the end.
        order = np.arange(groups * per_group, dtype=np.int32).reshape(groups, per_group).T.reshape(-1)
        return op.Gather(x, op.Constant(value=ir.tensor(order)), axis=1)


class _TransposeAsReshape(pattern.RewriteRuleClassBase):
    """A Transpose that moves only size-1 axes leaves every element where it was: it is a Reshape, which
    onnxruntime runs without copying (exact). Needs the input's static shape, as after ``fix-shapes``:
    the transformer's [1, 16, 64] ↔ [16, 1, 64] Transposes at batch 1 (4 of its 6 in onnxruntime's graph)."""

    def pattern(self, op, x, perm):
        return op.Transpose(x, perm=perm)

    def check(self, context, x, perm, **_) -> bool:
        shape = x.shape
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return False
        order = list(perm.as_ints())
        if sorted(order) != list(range(len(shape))) or order == sorted(order):
            return False  # invalid, or the identity (onnxscript's no-op rule)
        moved = [axis for axis in order if shape[axis] != 1]
        return moved == sorted(moved)

    def rewrite(self, op, x, perm, **_):
        target = np.array([x.shape[axis] for axis in perm.as_ints()], dtype=np.int64)
        return op.Reshape(x, op.Constant(value=ir.tensor(target)))


# Gemm's types that onnxruntime's CPU kernels run (it has no integer Gemm).
_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


class _MatMulAddAsGemm(pattern.RewriteRuleClassBase):
    """A MatMul of a static [..., K] activation by a constant [K, N] weight plus a constant [N] bias is
    Reshape [-1, K] → Gemm → Reshape [..., N] (the same products and sums; only their order may
    differ, within float rounding). onnxruntime does
    this itself at static shapes, after which the Reshapes it adds sit next to the model's own and
    stay; written in the file they merge (``reshape_reshape_rule``): the zoo transformer at fixed shapes
    runs 28 → 22 Reshapes in onnxruntime's graph, 0.94–0.96× the time."""

    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def check(self, context, x, w, b, **_) -> bool:
        shape, weight, bias = x.shape, w.const_value, b.const_value
        if shape is None or len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            return False
        if x.dtype not in _GEMM_TYPES or w.is_graph_input() or b.is_graph_input():  # an input: overridable
            return False
        if weight is None or bias is None or len(weight.shape) != 2 or weight.shape[0] != shape[-1]:
            return False
        dims = list(bias.shape)  # [N] or [1, ..., N], no more dims than x: the Add keeps x's shape
        return 0 < len(dims) <= len(shape) and dims[-1] == weight.shape[1] and all(d == 1 for d in dims[:-1])

    def rewrite(self, op, x, w, b, **_):
        k, n = w.const_value.shape
        flat = op.Reshape(x, op.Constant(value=ir.tensor(np.array([-1, k], np.int64))))
        bias = b if len(b.const_value.shape) == 1 else op.Reshape(b, op.Constant(value=ir.tensor(np.array([n], np.int64))))
        out = op.Gemm(flat, w, bias)
        return op.Reshape(out, op.Constant(value=ir.tensor(np.array([*x.shape[:-1], n], np.int64))))


class _BiasFirstMatMulAddAsGemm(_MatMulAddAsGemm):
    """The same with the bias as the Add's first operand (PyTorch's packed attention projections)."""

    def pattern(self, op, x, w, b):
        return op.Add(b, op.MatMul(x, w))


class _Canonicalize(ir.passes.InPlacePass):
    """Rewrites that change no value and help onnxruntime. A two-input Sum is an Add (same arithmetic,
    same broadcasting), and Add is what onnxruntime's fusions and quantized kernels know: ResNet-50's
    16 residual Sums (Caffe2 exports) ran as float islands between integer convs, now they are
    QLinearAdds. A channel shuffle becomes a Gather (``_ChannelShuffle``), a Transpose of size-1 axes a
    Reshape (``_TransposeAsReshape``), a static rank-3 MatMul + bias a Gemm between Reshapes
    (``_MatMulAddAsGemm``), and two Reshapes in a row one (onnxscript's ``reshape_reshape_rule``)."""

    _rules = pattern.RewriteRuleSet([pattern.RewriteRule(_sum_of_two, _add), _ChannelShuffle.rule()])
    # These trust recorded static shapes, which only static inputs make certain (an exporter may
    # record its trace's size for a dynamic dim): after fix-shapes, or for a model exported at fixed
    # sizes. They write a two-input Reshape (opset 5) and a Gemm with a broadcast [N] bias (opset 7).
    _static = pattern.RewriteRuleSet([*_rules.rules, _TransposeAsReshape.rule(), _MatMulAddAsGemm.rule(),
                                      _BiasFirstMatMulAddAsGemm.rule(), reshape_reshape_rule])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        static = all(v.shape is not None and all(isinstance(d, int) and d >= 0 for d in v.shape)
                     for v in model.graph.inputs)
        recent = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) >= 7
        rules = self._static if static and recent else self._rules
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))


class _MergeSmallIndexConstants(ir.passes.InPlacePass):
    """Main-graph integer initializers of at most ``_SMALL_DUPLICATE_ELEMENTS`` elements that are equal
    (dtype, shape, values) become one: the readers of the others read the first."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        first: dict[tuple, ir.Value] = {}
        modified = False
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if (tensor is None or value.is_graph_input() or value.is_graph_output()
                    or tensor.size > _SMALL_DUPLICATE_ELEMENTS or not tensor.dtype.is_integer()):
                continue
            key = (tensor.dtype, tuple(tensor.shape), tensor.tobytes())
            if key not in first:
                first[key] = value
                continue
            ir.convenience.replace_all_uses_with(value, first[key])
            graph.initializers.pop(value.name)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, less two cases it gets wrong (onnx-ir 1.1).

    An Identity that makes a graph output of a value that is already a graph output (the first
    output would take the second's name), or of an outer graph's value in a subgraph (the outer
    value cannot become the subgraph's output: onnx-ir raises), is kept.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if len(node.inputs) == 1 else None
        if (
            node.op_type == "Identity"
            and source is not None
            and any(out.is_graph_output() for out in node.outputs)
            and (source.is_graph_output() or source.graph is not node.graph)
        ):
            return False
        return super()._try_eliminate_identity_node(node)


class Simplify(OnnxoptPass):
    """Fold constant subgraphs, drop Identity and unused nodes, functions and opsets.

    Rules (all run by onnxscript / onnx-ir):
    - functions are inlined, so that folding sees through them;
    - nodes whose inputs are all constant are evaluated (QDQ nodes are kept); a large weight is sliced,
      split, transposed or reshaped ahead of time when only such layout ops read it;
    - shape arithmetic is resolved with symbolic dims (``shape_arithmetic``): static shape values become
      constants, a computed Reshape target a constant of sizes, 0 (copy) and -1, a Reshape to the
      shape it already has goes;
    - nodes that repeat another's computation (same op, attributes and inputs; not random ops) are
      merged (onnx-ir's common subexpression elimination: an exporter's shape arithmetic repeats);
    - Identity nodes, nodes no output depends on, unused functions and opset imports are removed;
    - a two-input Sum becomes an Add, a channel shuffle (Reshape, Transpose, Reshape) a Gather; with
      static inputs, a Transpose that moves only size-1 axes a Reshape, a MatMul + bias a Gemm between
      Reshapes, two Reshapes in a row one (onnxscript rewrite rules): exact (the Gemm within float
      rounding), and what onnxruntime's fusions and integer kernels run well;
    - Constant nodes are lifted to initializers, so later passes and tools see weights uniformly, and
      equal small integer initializers (up to 1,024 elements: indices, shapes) are stored once.

    It never stores more than it removes: a constant is folded only where its result takes no more
    bytes than the constants it frees (``keeps_storage_compact``), so int8 weights dequantized by
    Cast + Mul stay int8.
    """

    name = "simplify"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = _count_nodes(model)
        pipeline = ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager(
                [
                    _FoldConstants(),
                    ResolveShapeArithmetic(),
                    common.CommonSubexpressionEliminationPass(),
                    _Canonicalize(),
                    _IdentityElimination(),
                    common.RemoveUnusedNodesPass(),
                    common.RemoveUnusedFunctionsPass(),
                    common.RemoveUnusedOpsetsPass(),
                ],
                steps=3,
                early_stop=True,
            ),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            # Integer constants that rewrites and folding made alike (a channel shuffle's Gather
            # indices at each of its sizes, repeated shapes) are stored once; weights are share-init's.
            _MergeSmallIndexConstants(),
        )
        result = pipeline(model)
        nodes_after = _count_nodes(model)
        self.summary = f"{nodes_before} -> {nodes_after} nodes"
        self.details = {"nodes_before": nodes_before, "nodes_after": nodes_after}
        return ir.passes.PassResult(model, modified=result.modified)


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))

"""Resolve an exporter's shape arithmetic with symbolic dims: static shape values become constants,
and a Reshape whose target is computed gets a constant target of fixed sizes, 0 (copy) and -1.

An exporter computes every Reshape target at runtime, ``Concat(Unsqueeze(Gather(Shape(x), 0)), ...)``,
even where most of it is static (the head count, the head size). onnx's shape inference cannot see
through it once one dim is lost (a Slice with a computed end loses them all), and onnxscript's folder
only folds what is fully static. This module tracks each value's shape, and each small integer
tensor's value, as sympy expressions of the model's named dims (``batch``, ``seq``, ``4*batch``), then:

- an integer tensor whose value is static (``Gather(Shape(x), 2)`` when x's last dim is 64) becomes an
  initializer, so the arithmetic behind it is dead;
- a Reshape target whose entries are each static, equal to the input's dim at the same index (``0``,
  copy) or, for one entry, anything (``-1``: the element count decides it) becomes a constant.

The algebra assumes what onnxruntime's and onnxslim's symbolic inference assume: a dynamic dim is at
least 1 (no empty tensors), a named dim has one size throughout the graph, and two operands of a
broadcasting op are compatible (else the model fails to run anyway). The rewrites change no value.
"""

from __future__ import annotations

__all__ = ["ResolveShapeArithmetic"]

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import sympy

logger = logging.getLogger(__name__)

Dim = int | sympy.Expr | None  # a size: static, symbolic, or unknown
Shape = list[Dim] | None  # None: rank unknown

_INT_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32})
_RANGES = {ir.DataType.INT64: (-(2**63), 2**63 - 1), ir.DataType.INT32: (-(2**31), 2**31 - 1)}
_MAX_VALUES = 16  # integer tensors tracked by value: shape-sized ones only
_UNARY = frozenset({
    "Abs", "Cast", "CastLike", "Ceil", "Clip", "Cos", "DequantizeLinear", "Dropout", "Elu", "Erf", "Exp",
    "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization",
    "LeakyRelu", "Log", "LogSoftmax", "Neg", "Not", "QuantizeLinear", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Softmax", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
    "BatchNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
})
_BROADCAST = frozenset({
    "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
    "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor",
})


def _int(value) -> Dim:
    """A sympy integer as a Python int; other expressions as they are."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, sympy.Integer):
        return int(value)
    return value


def _is_static(dim: Dim) -> bool:
    return isinstance(dim, int)


class _Symbols:
    """One positive integer sympy symbol per dim name (the model's ``batch`` is one size throughout)."""

    def __init__(self) -> None:
        self._by_name: dict[str, sympy.Symbol] = {}

    def dim(self, dim) -> Dim:
        if isinstance(dim, int):
            return dim
        name = getattr(dim, "value", None)
        if not name:
            return None
        if name not in self._by_name:
            self._by_name[name] = sympy.Symbol(name, integer=True, positive=True)
        return self._by_name[name]


def _broadcast(shapes: Sequence[Shape]) -> Shape:
    """numpy broadcasting of shapes with symbolic dims (valid operands assumed: equal, or one is 1)."""
    if any(shape is None for shape in shapes):
        return None
    rank = max(len(shape) for shape in shapes)
    padded = [[1] * (rank - len(shape)) + list(shape) for shape in shapes]
    out: list[Dim] = []
    for dims in zip(*padded):
        known = [d for d in dims if d is not None and d != 1]
        if len(known) < len([d for d in dims if d != 1]):  # an unknown dim that could be anything
            static = [d for d in known if _is_static(d)]
            out.append(static[0] if static else None)
            continue
        if not known:
            out.append(1)
            continue
        static = [d for d in known if _is_static(d)]
        out.append(static[0] if static else _int(sympy.Max(*known)))
    return out


def _product(dims: Sequence[Dim]) -> Dim:
    if any(d is None for d in dims):
        return None
    if all(map(_is_static, dims)):
        return int(np.prod(dims, dtype=np.int64))
    return _int(sympy.Mul(*dims))


def _divide(a: Dim, b: Dim) -> Dim:
    """Integer division as onnxruntime does it (truncation), where the result is certain."""
    if a is None or b is None or b == 0:
        return None
    if _is_static(a) and _is_static(b):
        quotient = abs(a) // abs(b)
        return quotient if (a >= 0) == (b > 0) else -quotient
    ratio = sympy.sympify(a) / b
    if ratio.is_integer:
        return _int(ratio)
    if sympy.sympify(a).is_nonnegative and sympy.sympify(b).is_positive:
        return _int(sympy.floor(ratio))
    return None


_ARITHMETIC = {
    "Add": lambda a, b: _int(a + b),
    "Sub": lambda a, b: _int(a - b),
    "Mul": lambda a, b: _int(a * b),
    "Div": _divide,
    "Max": lambda a, b: _int(sympy.Max(a, b)),
    "Min": lambda a, b: _int(sympy.Min(a, b)),
}


class _Analysis:
    """Shapes of data values and values of small integer tensors, in one topological sweep of a graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.symbols = _Symbols()
        self.shapes: dict[ir.Value, Shape] = {}
        self.values: dict[ir.Value, tuple[list[Dim], int]] = {}  # entries, rank (0 or 1)
        for value in graph.inputs:
            self.shapes[value] = self._recorded_shape(value)
        for value in graph.initializers.values():
            if not value.is_graph_input():  # else only a default that the caller may override
                self._constant(value)
        for node in graph:
            try:
                self._visit(node)
            except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError) as error:
                logger.debug("shape arithmetic: %s %s skipped (%s)", node.op_type, node.name, error)

    # -- what the graph records ------------------------------------------------------------------

    def _recorded_shape(self, value: ir.Value) -> Shape:
        if value.shape is None:
            return None
        return [self.symbols.dim(d) for d in value.shape]

    def shape(self, value: ir.Value | None) -> Shape:
        if value is None:
            return None
        if value in self.shapes:
            return self.shapes[value]
        return self._recorded_shape(value)

    def _constant(self, value: ir.Value) -> bool:
        tensor = value.const_value
        if tensor is None:
            return False
        self.shapes[value] = list(tensor.shape)
        if tensor.dtype in _INT_TYPES and tensor.size <= _MAX_VALUES and len(tensor.shape) <= 1:
            array = tensor.numpy()
            self.values[value] = ([int(v) for v in array.reshape(-1)], array.ndim)
        return True

    def ints(self, value: ir.Value | None) -> list[int] | None:
        """The value's entries when all are static."""
        if value is None or value not in self.values:
            return None
        entries = self.values[value][0]
        return entries if all(_is_static(e) for e in entries) else None

    # -- one node ----------------------------------------------------------------------------------

    def _visit(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return
        out = node.outputs[0]
        if node.op_type == "Constant":
            self._constant(out)
            return
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return
        shape = self._shape_of(node)
        recorded = self._recorded_shape(out)
        if shape is None:
            shape = recorded
        elif recorded is not None and len(recorded) == len(shape):
            shape = [mine if mine is not None else theirs for mine, theirs in zip(shape, recorded)]
        self.shapes[out] = shape
        if out.dtype in _INT_TYPES and shape is not None and len(shape) <= 1:
            value = self._value_of(node)
            low, high = _RANGES[out.dtype]
            if value is not None and all(not _is_static(e) or low <= e <= high for e in value[0]):
                self.values[out] = value  # else onnxruntime wraps around: the value is not ours to know

    def _axes(self, node: ir.Node, index: int = 1) -> list[int] | None:
        attr = node.attributes.get("axes")
        if attr is not None:
            return list(attr.as_ints())
        if len(node.inputs) > index and node.inputs[index] is not None:
            return self.ints(node.inputs[index])
        return None

    def _shape_of(self, node: ir.Node) -> Shape:
        op, inputs = node.op_type, node.inputs
        first = self.shape(inputs[0]) if inputs else None
        if op in _UNARY:
            return None if first is None else list(first)
        if op in _BROADCAST:
            return _broadcast([self.shape(v) for v in inputs if v is not None])
        if op == "Shape":
            if first is None:
                return None
            return [len(self._shape_slice(node, first))]
        if op == "Transpose":
            if first is None:
                return None
            perm = node.attributes.get("perm")
            order = list(perm.as_ints()) if perm is not None else list(reversed(range(len(first))))
            return [first[i] for i in order]
        if op == "MatMul":
            return self._matmul(first, self.shape(inputs[1]))
        if op == "Gemm":
            b = self.shape(inputs[1])
            if first is None or b is None or len(first) != 2 or len(b) != 2:
                return None
            m = first[1] if node.attributes.get_int("transA", 0) else first[0]
            n = b[0] if node.attributes.get_int("transB", 0) else b[1]
            return [m, n]
        if op == "Reshape":
            return self._reshape(node, first)
        if op == "Unsqueeze":
            axes = self._axes(node)
            if first is None or axes is None:
                return None
            rank = len(first) + len(axes)
            axes = sorted(a % rank for a in axes)
            rest = iter(first)
            return [1 if i in axes else next(rest) for i in range(rank)]
        if op == "Squeeze":
            given = node.attributes.get("axes") is not None or (len(inputs) > 1 and inputs[1] is not None)
            axes = self._axes(node)
            if first is None or (given and axes is None):
                return None  # axes computed at runtime: any size-1 dim may go
            if not axes:  # none given (or an empty list): every size-1 dim goes
                return None if any(not _is_static(d) for d in first) else [d for d in first if d != 1]
            axes = {a % len(first) for a in axes}
            return [d for i, d in enumerate(first) if i not in axes]
        if op == "Gather":
            indices = self.shape(inputs[1])
            if first is None or indices is None:
                return None
            axis = node.attributes.get_int("axis", 0) % len(first)
            return first[:axis] + indices + first[axis + 1:]
        if op == "Concat":
            shapes = [self.shape(v) for v in inputs]
            if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
                return None
            axis = node.attributes.get_int("axis", 0) % len(shapes[0])
            out = list(shapes[0])
            sizes = [s[axis] for s in shapes]
            out[axis] = None if None in sizes else sum(sizes) if all(map(_is_static, sizes)) else _int(sympy.Add(*sizes))
            return out
        if op == "Flatten":
            if first is None:
                return None
            axis = node.attributes.get_int("axis", 1)
            axis = axis + len(first) if axis < 0 else axis
            return [_product(first[:axis]), _product(first[axis:])]
        if op == "Slice":
            return self._slice(node, first)
        if op == "Expand":
            target = self.values.get(inputs[1])
            if target is None:
                return None
            return _broadcast([first, list(target[0])])
        return None

    def _shape_slice(self, node: ir.Node, dims: list[Dim]) -> list[Dim]:
        start = node.attributes.get_int("start", 0)
        end_attr = node.attributes.get("end")
        end = end_attr.as_int() if end_attr is not None else len(dims)
        return dims[start:end]

    @staticmethod
    def _matmul(a: Shape, b: Shape) -> Shape:
        if a is None or b is None or not a or not b:
            return None
        a2 = [1] + a if len(a) == 1 else a
        b2 = b + [1] if len(b) == 1 else b
        batch = _broadcast([a2[:-2], b2[:-2]])
        if batch is None:
            return None
        out = batch + [a2[-2], b2[-1]]
        if len(a) == 1:
            out.pop(-2)
        if len(b) == 1:
            out.pop(-1)
        return out

    def _reshape(self, node: ir.Node, first: Shape) -> Shape:
        target = self.values.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None:
            return None
        entries = list(target[0])
        allow_zero = node.attributes.get_int("allowzero", 0)
        out: list[Dim] = []
        for i, entry in enumerate(entries):
            if entry == 0 and not allow_zero:
                out.append(first[i] if first is not None and i < len(first) else None)
            else:
                out.append(entry)
        if -1 in out:
            at = out.index(-1)
            total = _product(first) if first is not None else None
            rest = _product([d for i, d in enumerate(out) if i != at])
            out[at] = _divide(total, rest) if total is not None and rest not in (None, 0) else None
        return [d if d is None or _is_static(d) or d.is_positive else None for d in out]

    def _slice(self, node: ir.Node, first: Shape) -> Shape:
        if first is None:
            return None
        inputs = node.inputs
        starts = self.values.get(inputs[1]) if len(inputs) > 1 else None
        ends = self.values.get(inputs[2]) if len(inputs) > 2 else None
        axes = self.ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = self.ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
        if len(inputs) > 3 and inputs[3] is not None and axes is None:
            return None  # the sliced axes are unknown: every dim may change
        if len(inputs) > 4 and inputs[4] is not None and steps is None:
            return None  # computed steps: no length is certain
        count = len(starts[0]) if starts is not None else (len(axes) if axes is not None else None)
        if count is None:
            return None
        axes = axes if axes is not None else list(range(count))
        steps = steps if steps is not None else [1] * count
        out = list(first)
        for k, axis in enumerate(axes):
            axis %= len(first)
            start = starts[0][k] if starts is not None else None
            end = ends[0][k] if ends is not None else None
            out[axis] = self._slice_length(first[axis], start, end, steps[k])
        return out

    @staticmethod
    def _slice_length(dim: Dim, start: Dim, end: Dim, step: int) -> Dim:
        if all(_is_static(x) for x in (dim, start, end)):
            return len(range(*slice(start, end, step).indices(dim)))
        if dim is None or start is None or end is None or step != 1 or not _is_static(start) or start < 0:
            return None
        if _is_static(end) and end >= 2**62:  # "to the end"
            return _int(sympy.Max(dim - start, 0)) if start else dim
        if _is_static(end) or not sympy.sympify(end).is_nonnegative:
            return None
        return _int(sympy.Max(sympy.Min(end, dim) - start, 0)) if start else _int(sympy.Min(end, dim))

    def _value_of(self, node: ir.Node) -> tuple[list[Dim], int] | None:
        op, inputs = node.op_type, node.inputs
        if op == "Shape":
            dims = self.shape(inputs[0])
            return (self._shape_slice(node, dims), 1) if dims is not None else None
        if op == "Size":
            dims = self.shape(inputs[0])
            return ([_product(dims)], 0) if dims is not None else None
        source = self.values.get(inputs[0]) if inputs and inputs[0] is not None else None
        if op == "Identity" and source is not None:
            return source
        if op == "Cast" and source is not None:  # int64 keeps every value; int32 only those that fit
            return source if node.outputs[0].dtype == ir.DataType.INT64 or all(
                _is_static(e) for e in source[0]) else None
        if op == "Gather" and source is not None and source[1] == 1:
            indices = self.values.get(inputs[1])
            if indices is None or node.attributes.get_int("axis", 0) != 0:
                return None
            if not all(_is_static(i) for i in indices[0]):
                return None
            return [source[0][i] for i in indices[0]], indices[1]
        if op == "Unsqueeze" and source is not None and source[1] == 0:
            return list(source[0]), 1
        if op == "Squeeze" and source is not None and source[1] == 1 and len(source[0]) == 1:
            return list(source[0]), 0
        if op == "Reshape" and source is not None:  # a scalar to [1] and back (dynamo's exports)
            target = self.ints(inputs[1])
            if target == [] and len(source[0]) == 1:
                return list(source[0]), 0
            if target is not None and len(target) == 1 and target[0] in (-1, len(source[0])):
                return list(source[0]), 1
            return None
        if op == "Concat":
            parts = [self.values.get(v) for v in inputs]
            if any(p is None or p[1] != 1 for p in parts):
                return None
            return [e for p in parts for e in p[0]], 1
        if op == "Slice" and source is not None and source[1] == 1:
            starts, ends = self.ints(inputs[1]), self.ints(inputs[2])
            steps = self.ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
            if starts is None or ends is None or steps is None or len(starts) != 1:
                return None
            return source[0][slice(starts[0], min(ends[0], 2**31), steps[0])], 1
        if op in _ARITHMETIC and len(inputs) == 2:
            other = self.values.get(inputs[1])
            if source is None or other is None:
                return None
            a, b = source[0], other[0]
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                return None
            n = max(len(a), len(b))
            a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
            out = [None if x is None or y is None else _ARITHMETIC[op](x, y) for x, y in zip(a, b)]
            return out, max(source[1], other[1])
        return None


def _constant_like(graph: ir.Graph, like: ir.Value, entries: list[int], rank: int, name: str,
                   names: set[str]) -> ir.Value:
    """A new initializer of ``like``'s dtype holding ``entries`` (a scalar when ``rank`` is 0)."""
    array = np.array(entries, dtype=like.dtype.numpy()).reshape(() if rank == 0 else (len(entries),))
    unique, k = name, 0
    while unique in names:
        k += 1
        unique = f"{name}_{k}"
    names.add(unique)
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(like.dtype),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def _reshape_target(analysis: _Analysis, node: ir.Node) -> tuple[list[int], int] | None:
    """A constant target for a Reshape with a computed one (fixed sizes, 0 copies, at most one -1) and
    the ``allowzero`` to run it with.

    An exporter's ``allowzero=1`` (PyTorch's dynamo) matters only for a literal 0 in the target; without
    one, the new target may copy dims under ``allowzero=0`` (a copy is the input's own dim: the same
    size, zero or not).
    """
    target = analysis.values.get(node.inputs[1])
    if target is None or analysis.ints(node.inputs[1]) is not None:
        return None
    allow_zero = node.attributes.get_int("allowzero", 0)
    copies = not (allow_zero and any(_is_static(e) and e == 0 for e in target[0]))
    source = analysis.shape(node.inputs[0]) or []
    out: list[int | None] = []
    for i, entry in enumerate(target[0]):
        if _is_static(entry):
            out.append(entry)
        elif copies and entry is not None and i < len(source) and source[i] is not None \
                and (entry == source[i] or sympy.expand(entry - source[i]) == 0):
            out.append(0)
        else:
            out.append(None)
    if out.count(None) + out.count(-1) > 1:
        return None
    return [-1 if entry is None else entry for entry in out], (0 if copies and 0 in out else allow_zero)


class ResolveShapeArithmetic(ir.passes.InPlacePass):
    """Static shape values become initializers; computed Reshape targets become constants (see module doc).

    Main graph only: a node with a subgraph is opaque, its outputs keep their recorded shapes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis = _Analysis(graph)
        modified = False
        outputs = set(graph.outputs)
        names = {v.name for g in (graph, *graph.subgraphs()) for v in (*g.inputs, *g.initializers.values())} | {
            v.name for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.outputs}
        for node in list(graph):
            if node.op_type == "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for out in node.outputs:
                entries = analysis.ints(out)
                if entries is None or out in outputs or out.const_value is not None or not out.uses():
                    continue
                constant = _constant_like(graph, out, entries, analysis.values[out][1], f"{out.name}_static", names)
                ir.convenience.replace_all_uses_with(out, constant)
                modified = True
            if node.op_type == "Reshape" and len(node.inputs) > 1:
                source, out = analysis.shape(node.inputs[0]), node.outputs[0]
                result = analysis.shapes.get(out)
                if source is not None and source == result and None not in source and out not in outputs:
                    ir.convenience.replace_all_uses_with(out, node.inputs[0])  # a no-op Reshape
                    modified = True
                    continue
                resolved = _reshape_target(analysis, node)
                if resolved is not None:
                    target, allow_zero = resolved
                    value = _constant_like(graph, node.inputs[1], target, 1, f"{node.outputs[0].name}_target", names)
                    node.replace_input_with(1, value)
                    if allow_zero != node.attributes.get_int("allowzero", 0):
                        node.attributes["allowzero"] = ir.AttrInt64("allowzero", allow_zero)
                    modified = True
        return ir.passes.PassResult(model, modified=modified)

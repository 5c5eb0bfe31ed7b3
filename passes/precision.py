"""float16 / bfloat16: weights and compute in half precision, float32 kept where half precision overflows.

The conversion walks the main graph once, in order, and decides per node:

- **low** (float16 or bfloat16): its float32 inputs are read in the low dtype and its float32 outputs
  become low. Which inputs follow is read from the operator's schema at the model's opset: an input
  whose type constraint does not allow the low dtype (Resize's ``scales`` is ``tensor(float)``) stays
  float32, and a node whose float output cannot be low stays float32 as a whole. ``Cast(to=FLOAT)``
  becomes ``Cast(to=low)``, ``ConstantOfShape``'s value follows.
- **kept float32** (a float island): op types in ``op_block_list``, nodes named in ``keep_float``,
  nodes of other domains, nodes holding subgraphs (If/Loop/Scan: their bodies stay float32 and the
  main-graph values they read are cast back to float32 before them), and, for float16, nodes that read a
  constant beyond float16's range (|x| > 65504: a ``-1e9`` attention mask would become ``-inf``).
- **neutral**: nodes without a float32 tensor (shape arithmetic, integer ops) are not touched; a node
  with float inputs but no float output (``Shape``, ``Equal``) reads them in whatever dtype they have
  (constants in the low dtype, so that the float32 copy can go).

A value read in another dtype than it has gets one ``Cast`` per (value, dtype), shared by all readers;
a constant gets a converted copy instead (float16 rounding, ``round-to-nearest-even``), and the float32
original is dropped when nothing reads it any more. A Cast is always taken from the value a Cast
produced it from (``Cast(Cast(u))`` is written ``Cast(u)``), so the pass writes no Cast pair itself; the
pairs the input model had are folded where that is exact in value: ``Cast(A->B)`` then ``Cast(B->C)`` is
``Cast(A->C)`` when every A value is a B value (float16 -> float32, int8 -> float16, ...), and a Cast
to the dtype it reads is removed. float32 -> float16 -> float32 is not exact and is never folded.

With ``keep_io_types`` the graph's float32 inputs and outputs stay float32: one Cast after each input
and one before each output, which takes the output's name (the low tensor is renamed ``NAME_float16``).

Default block list (``DEFAULT_BLOCKED``), float32 because in half precision they overflow or lose what
the next op needs: squares and exponentials (``Pow``, ``Exp``: 256**2 and e**11.1 pass 65504), sums and
means over many values (``Reduce*``, ``CumSum``: a variance's mean of squares), the normalizations
that compute a variance (``LayerNormalization``, ``GroupNormalization``, ``InstanceNormalization``), the
probabilities (``Softmax``, ``LogSoftmax``); index generators and selections whose values half precision
cannot represent or whose ties it changes (``Range``, ``TopK``, ``NonMaxSuppression``, ``RoiAlign``); and
random generators and ``EyeLike``, whose output dtype is an attribute.
"""

from __future__ import annotations

__all__ = ["ConvertFloat16", "DEFAULT_BLOCKED", "FLOAT16_MAX", "cast_pairs"]

import logging
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, drop_if_unused
from onnxopt.passes.quantize import _inferred_types, node_label

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
_FLOAT = ir.DataType.FLOAT
_LOW = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
_NUMPY = {ir.DataType.FLOAT16: np.dtype(np.float16), ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
          ir.DataType.FLOAT: np.dtype(np.float32)}
_TYPE_STR = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}

DEFAULT_BLOCKED = (
    # overflow: squares, exponentials, sums and means of many values
    "Pow", "Exp", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum",
    # variances and probabilities
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
    # indices, selections, coordinates
    "Range", "TopK", "NonMaxSuppression", "RoiAlign",
    # output dtype given by an attribute
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "EyeLike",
)

# Inputs that stay float32 even where the schema allows the low dtype: coordinates, not data.
_FLOAT_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}

# Casts that keep every value: (from, to) where each ``from`` value is exactly a ``to`` value.
_EXACT_INTO = {
    ir.DataType.BOOL: None,  # into any numeric type
    ir.DataType.FLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.BFLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.FLOAT: {ir.DataType.DOUBLE},
    ir.DataType.INT8: {ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.FLOAT16,
                       ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.UINT8: {ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT16,
                        ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                        ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.INT16: {ir.DataType.INT32, ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.UINT16: {ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT32, ir.DataType.UINT64,
                         ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.INT32: {ir.DataType.INT64, ir.DataType.DOUBLE},
    ir.DataType.UINT32: {ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.DOUBLE},
}


def _exact(src: ir.DataType | None, dst: ir.DataType | None) -> bool:
    """Whether every value of ``src`` is exactly a value of ``dst``."""
    if src is None or dst is None:
        return False
    if src == dst:
        return True
    into = _EXACT_INTO.get(src, set())
    return dst != ir.DataType.STRING if into is None else dst in into


def _cast_input(node: ir.Node) -> ir.Value | None:
    """The input of a Cast node (of the default domain), else None."""
    if node is not None and node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.inputs:
        return node.inputs[0]
    return None


def cast_pairs(model: ir.Model) -> list[tuple[str, str]]:
    """Back-to-back Casts in the main graph: (first, second) labels."""
    pairs = []
    for node in model.graph:
        src = _cast_input(node)
        if src is not None and src.producer() is not None and _cast_input(src.producer()) is not None:
            pairs.append((node_label(src.producer()), node_label(node)))
    return pairs


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


class _Schemas:
    """Type constraints of operators at the model's opsets, cached."""

    def __init__(self, model: ir.Model) -> None:
        self.opsets = dict(model.opset_imports)
        self._cache: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}

    def get(self, node: ir.Node) -> onnx.defs.OpSchema | None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        key = (node.op_type, domain)
        if key not in self._cache:
            version = self.opsets.get(domain, self.opsets.get("ai.onnx" if domain == "" else domain))
            try:
                self._cache[key] = onnx.defs.get_schema(node.op_type, version, domain) if version else None
            except onnx.defs.SchemaError:
                self._cache[key] = None
        return self._cache[key]


def _allows(schema: onnx.defs.OpSchema, formals, index: int, type_str: str) -> bool:
    """Whether input/output ``index`` of ``schema`` may have type ``type_str``."""
    if index < len(formals):
        formal = formals[index]
    elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        formal = formals[-1]
    else:
        return False
    for constraint in schema.type_constraints:
        if constraint.type_param_str == formal.type_str:
            return type_str in constraint.allowed_type_strs
    return formal.type_str == type_str


class ConvertFloat16(OnnxoptPass):
    """Convert float32 weights and compute to float16 (or bfloat16), float32 islands where it overflows.

    Rules:
    - only the main graph is converted; subgraphs (If/Loop/Scan bodies) stay float32, and the float
      values they read from the main graph are cast back to float32 before the node that holds them;
    - ``op_block_list`` (op types, default ``DEFAULT_BLOCKED``) and ``keep_float`` (node names, or labels
      ``OpType(first_output)`` for unnamed nodes) stay float32, with Casts around them;
    - with ``keep_io_types`` (default) graph inputs and outputs stay float32;
    - integer and shape tensors are never touched; a float16 constant beyond 65504 keeps its readers
      float32;
    - no Cast pair is written; the input model's own pairs are folded where exact (see the module).
    """

    name = "precision"

    @property
    def lossy(self) -> bool:
        """Rounding weights and activations to 11 (bfloat16: 8) significant bits changes the outputs."""
        return True

    def __init__(
        self,
        dtype: str = "float16",
        keep_io_types: bool = True,
        keep_float: Iterable[str] = (),
        op_block_list: Iterable[str] = DEFAULT_BLOCKED,
    ) -> None:
        super().__init__()
        aliases = {"fp16": "float16", "bf16": "bfloat16"}
        dtype = aliases.get(dtype, dtype)
        if dtype not in _LOW:
            raise ValueError(f"dtype must be float16 or bfloat16 (fp16, bf16), not {dtype!r}")
        if isinstance(keep_float, str) or isinstance(op_block_list, str):
            raise ValueError("keep_float and op_block_list take lists of names, not one string")
        self.dtype = dtype
        self.keep_io_types = keep_io_types
        self.keep_float = tuple(keep_float)
        self.op_block_list = tuple(op_block_list)

    @property
    def low(self) -> ir.DataType:
        return _LOW[self.dtype]

    # ------------------------------------------------------------------ decisions
    def _keep_reason(self, node: ir.Node, schemas: _Schemas) -> str | None:
        """Why ``node`` stays float32, or None when it can run in the low dtype."""
        if node.name in self.keep_float or node_label(node) in self.keep_float:
            return "kept float (keep_float)"
        if node.op_type in self.op_block_list:
            return f"{node.op_type} is in the block list (overflows or loses precision in {self.dtype})"
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return "holds a subgraph: left float32 with Casts at its boundary"
        schema = schemas.get(node)
        if schema is None:
            return f"no schema for {node.domain or 'ai.onnx'}::{node.op_type} at this opset"
        low_str = _TYPE_STR[self.low]
        for i, out in enumerate(node.outputs):
            if out.dtype is None and out.uses():
                return f"output {out.name} of unknown type"
            if out.dtype == _FLOAT and not _allows(schema, schema.outputs, i, low_str):
                return f"{node.op_type} has no {self.dtype} output at opset {schema.since_version}+"
        floats = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == _FLOAT]
        if any(v is not None and v.dtype is None for v in node.inputs):
            return "an input of unknown type"
        if floats and not any(_allows(schema, schema.inputs, i, low_str) for i in floats):
            return f"{node.op_type} takes no {self.dtype} input at opset {schema.since_version}+"
        if self.low == ir.DataType.FLOAT16:
            for i in floats:
                tensor = _constant(node.inputs[i])
                if tensor is not None:
                    array = tensor.numpy()
                    finite = np.abs(array[np.isfinite(array)])
                    if finite.size and float(finite.max()) > FLOAT16_MAX:
                        return (f"reads constant {node.inputs[i].name} with |values| up to {float(finite.max()):.3g} "
                                f"(float16 ends at {FLOAT16_MAX:g})")
        return None

    # ------------------------------------------------------------------ rewrite
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.details = {"dtype": self.dtype, "converted": 0, "kept": {}, "casts": 0, "constants": 0,
                        "tensor_map": {}, "cast_pairs_left": []}
        types, _ = _inferred_types(model)
        for node in graph:
            for out in node.outputs:
                if out.dtype is None and out.name in types:
                    _retype(out, types[out.name])
        floats = [v for v in (*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs))
                  if v.dtype == _FLOAT]
        if not floats:
            self.summary = "no float32 tensor: nothing converted"
            return ir.passes.PassResult(model, modified=False)
        self._graph, self._names = graph, NameScope(graph)
        self._casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self._originals: set[int] = set()  # constants that copies replaced, dropped when unread
        original = {id(v): v.dtype for v in floats}
        if not self.keep_io_types:
            for v in graph.inputs:
                if v.dtype == _FLOAT and not v.is_initializer():
                    _retype(v, self.low)
        schemas = _Schemas(model)
        converted = 0
        for node in list(graph):
            if node.op_type == "Constant":
                continue  # its readers take a converted copy where they run low
            reason = self._keep_reason(node, schemas)
            touches_float = any(v is not None and original.get(id(v)) == _FLOAT for v in (*node.inputs, *node.outputs))
            if reason is None and touches_float:
                if self._to_low(node, schemas, original):
                    converted += 1
                continue
            if not touches_float and reason is None:
                continue
            if touches_float or any(original.get(id(v)) for v in _captured(node, graph)):
                self.details["kept"][node_label(node)] = reason
                logger.info("precision: %s stays float32: %s", node_label(node), reason)
            self._keep_float32(node, original)
        self._outputs(original)
        folded = self._fold_casts()
        for value in list(graph.initializers.values()):
            if id(value) in self._originals:
                drop_if_unused(graph, value)
        for node in list(graph):
            if node.op_type == "Constant" and id(node.outputs[0]) in self._originals:
                drop_if_unused(graph, node.outputs[0])
        graph.sort()
        self.details["converted"] = converted
        self.details["cast_pairs_left"] = cast_pairs(model)
        model.metadata_props["onnxopt.precision"] = self.dtype
        kept = len(self.details["kept"])
        self.summary = (
            f"{self.dtype}: {converted} nodes converted, {kept} kept float32"
            f"{' (' + ', '.join(list(self.details['kept'])[:4]) + (', ...' if kept > 4 else '') + ')' if kept else ''}; "
            f"{self.details['constants']} constants converted, {self.details['casts']} Casts inserted"
            f"{f', {folded} Cast pairs folded' if folded else ''}"
            f"{'; inputs and outputs stay float32' if self.keep_io_types else ''}"
        )
        return ir.passes.PassResult(model, modified=bool(converted or self.details["constants"]))

    def _to_low(self, node: ir.Node, schemas: _Schemas, original: dict[int, ir.DataType]) -> bool:
        """Run ``node`` in the low dtype: cast its float inputs, retype its float outputs."""
        schema = schemas.get(node)
        low_str = _TYPE_STR[self.low]
        float_outputs = [o for o in node.outputs if original.get(id(o)) == _FLOAT]
        float_inputs = [i for i, v in enumerate(node.inputs) if v is not None and original.get(id(v)) == _FLOAT]
        if not float_outputs:
            # Shape, Equal, ArgMax: read the inputs in the dtype they now have where they agree
            current = {node.inputs[i].dtype for i in float_inputs}
            constants = any(_constant(node.inputs[i]) is not None for i in float_inputs)  # read the converted copy
            if len(current) == 1 and not constants and all(_allows(schema, schema.inputs, i, low_str if self.low in current else
                                                 "tensor(float)") for i in float_inputs):
                return False
        for i in float_inputs:
            stays = i in _FLOAT_INPUTS.get(node.op_type, ()) or not _allows(schema, schema.inputs, i, low_str)
            want = _FLOAT if stays else self.low
            value = node.inputs[i]
            if value.dtype != want:
                node.replace_input_with(i, self._cast(value, want))
        for out in float_outputs:
            _retype(out, self.low)
        if node.op_type == "Cast" and node.attributes.get_int("to") == _FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", self.low)
        elif node.op_type == "ConstantOfShape" and float_outputs:
            attr = node.attributes.get("value")
            fill = attr.as_tensor().numpy() if attr is not None else np.zeros(1, np.float32)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(fill.astype(_NUMPY[self.low])))
        return True

    def _keep_float32(self, node: ir.Node, original: dict[int, ir.DataType]) -> None:
        """Feed ``node`` (and the subgraphs it holds) the float32 values it read before."""
        for i, value in enumerate(node.inputs):
            if value is not None and original.get(id(value)) == _FLOAT and value.dtype != _FLOAT:
                node.replace_input_with(i, self._cast(value, _FLOAT))
        for inner in _inner_nodes(node):
            for i, value in enumerate(inner.inputs):
                if value is not None and original.get(id(value)) == _FLOAT and value.dtype != _FLOAT:
                    inner.replace_input_with(i, self._cast(value, _FLOAT))

    def _outputs(self, original: dict[int, ir.DataType]) -> None:
        """float32 graph outputs with keep_io_types (else low ones): one Cast that takes the output's name."""
        graph = self._graph
        want = _FLOAT if self.keep_io_types else self.low
        for k, value in enumerate(list(graph.outputs)):
            if original.get(id(value)) != _FLOAT or value.dtype == want:
                continue
            name = value.name
            cast = self._new_cast(value, want)
            value.name = self._names.fresh(f"{name}_{value.dtype.name.lower()}")
            cast.name = name
            self.details["tensor_map"][name] = value.name
            graph.outputs[k] = cast

    # ------------------------------------------------------------------ casts
    def _cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        """``value`` in ``dtype``: a converted constant, or one shared Cast (read through a Cast's source)."""
        source = value
        producer = value.producer()
        inner = _cast_input(producer) if producer is not None and producer.graph is self._graph else None
        if inner is not None and inner.dtype is not None and inner.dtype != ir.DataType.STRING:
            source = inner  # Cast(Cast(u)) is written Cast(u)
            if source.dtype == dtype:
                return source
        key = (id(source), dtype)
        if key in self._casts:
            return self._casts[key]
        tensor = _constant(source)
        if tensor is not None and source.dtype in _NUMPY and tensor.numpy().dtype.kind == "f":
            result = self._converted_constant(source, tensor, dtype)
        else:
            result = self._new_cast(source, dtype)
        self._casts[key] = result
        return result

    def _new_cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        base = value.name or "value"
        node = ir.node("Cast", [value], attributes={"to": dtype}, name=self._names.fresh(f"{base}_cast_{dtype.name.lower()}"))
        out = node.outputs[0]
        out.name = self._names.fresh(f"{base}_{dtype.name.lower()}")
        _retype(out, dtype)
        out.shape = value.shape
        self._graph.append(node)
        self.details["casts"] += 1
        return out

    def _converted_constant(self, value: ir.Value, tensor: ir.TensorProtocol, dtype: ir.DataType) -> ir.Value:
        """A copy of a constant (initializer or Constant node) in ``dtype``."""
        array = tensor.numpy().astype(_NUMPY[dtype])
        name = self._names.fresh(f"{value.name or 'constant'}_{dtype.name.lower()}")
        self._originals.add(id(value))
        self.details["constants"] += 1
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant":
            node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=self._names.fresh(name))
            out = node.outputs[0]
            out.name = name
            self._graph.append(node)
        else:
            out = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            self._graph.register_initializer(out)
        _retype(out, dtype)
        out.shape = ir.Shape(array.shape)
        return out

    def _fold_casts(self) -> int:
        """Remove Casts to the dtype they read and fold exact Cast pairs; returns how many went."""
        graph, folded = self._graph, 0
        changed = True
        while changed:
            changed = False
            for node in list(graph):
                src = _cast_input(node)
                if src is None or src.dtype is None:
                    continue
                out = node.outputs[0]
                to = ir.DataType(node.attributes.get_int("to"))
                upstream = _cast_input(src.producer()) if src.producer() is not None else None
                if upstream is not None and upstream.dtype is not None and _exact(upstream.dtype, src.dtype) \
                        and upstream.dtype != ir.DataType.STRING:
                    node.replace_input_with(0, upstream)  # Cast(A->B) exact, then Cast(B->C): Cast(A->C)
                    first = src.producer()
                    if not any(o.uses() or o.is_graph_output() for o in first.outputs):
                        graph.remove(first, safe=True)
                    src, changed, folded = upstream, True, folded + 1
                if to == src.dtype and not out.is_graph_output():
                    out.replace_all_uses_with(src)
                    graph.remove(node, safe=True)
                    changed, folded = True, folded + 1
        return folded


def _retype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a new tensor type: setting ``dtype`` changes a type object that a clone of the
    model shares (onnx-ir copies types by reference)."""
    value.type = ir.TensorType(dtype)


def _inner_nodes(node: ir.Node):
    """Every node of the subgraphs that ``node`` holds, at any depth."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield from ir.traversal.RecursiveGraphIterator(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            for g in attr.value:
                yield from ir.traversal.RecursiveGraphIterator(g)


def _captured(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """Main-graph values that the subgraphs of ``node`` read."""
    return [v for inner in _inner_nodes(node) for v in inner.inputs if v is not None and v.graph is graph]

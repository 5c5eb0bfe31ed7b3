"""The weight tensors that the compression passes (cluster, sparsify) may re-encode, and how they are read.

A weight is a float initializer every reader of which takes it as a layer's weight (Conv/ConvTranspose
input 1, Gemm input 1, MatMul input 1) or as the stored values of a sparse weight (ScatterElements
input 2 into a ConstantOfShape, as ``sparsify`` writes). A tensor also read by anything else (an Add,
a graph output) is left alone: re-encoding it would change that reader too. A graph input that is also
an initializer is not a constant (the caller may feed it). Re-encoding replaces the tensor for all its
readers at once, so a weight shared by two layers stays shared.
"""

from __future__ import annotations

__all__ = ["Weight", "find_weights", "output_axis", "input_axis", "insert_front", "opset_of", "relative_gaps",
           "positions_of_gaps", "pack_codes", "unpack_codes", "packed_bits", "MAX_GAP", "COMPACT_OPSET",
           "add_initializer", "shared_constant", "decoder_bytes", "gaps_decoder", "codes_decoder"]

# Relative positions (uint8 gaps rebuilt by CumSum) and packed codes (unpacked by BitShift) need
# opset 11; below it the passes keep one uint8 code a byte and uint16/int32 positions.
COMPACT_OPSET = 11
MAX_GAP = 255

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import graphs_of

_WEIGHT_SLOT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class Weight:
    """One re-encodable weight: its value, content, readers and the graph that owns it."""

    value: ir.Value
    array: np.ndarray
    readers: list[ir.Node]
    graph: ir.Graph
    sparse_values: bool = False  # the stored non-zeros of a sparse weight (1-D, no channel axis)

    @property
    def name(self) -> str:
        return self.value.name or ""


def _is_sparse_values_slot(node: ir.Node, idx: int) -> bool:
    if node.op_type != "ScatterElements" or idx != 2 or node.domain not in ("", "ai.onnx"):
        return False
    data = node.inputs[0].producer() if node.inputs[0] is not None else None
    return data is not None and data.op_type == "ConstantOfShape"


def _reader_kind(node: ir.Node, idx: int) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if _WEIGHT_SLOT.get(node.op_type) == idx:
        return "layer"
    if _is_sparse_values_slot(node, idx):
        return "sparse"
    return None


def find_weights(
    model: ir.Model, layers: set[str] | None = None, min_elements: int = 0
) -> tuple[list[Weight], dict[str, str]]:
    """The re-encodable weights, and for each candidate left alone, why (name -> reason).

    ``layers``: only weights with these names, or read by nodes with these names (None: all).
    """
    weights, skipped = [], {}
    seen: set[int] = set()
    for graph in graphs_of(model):
        for value in graph.initializers.values():
            if id(value) in seen:
                continue
            seen.add(id(value))
            uses = value.uses()
            kinds = {_reader_kind(u.node, u.idx) for u in uses}
            if not uses or kinds - {"layer", "sparse"}:
                if "layer" in kinds or "sparse" in kinds:
                    skipped[value.name] = "also read as something other than a layer weight"
                continue
            readers = list(dict.fromkeys(u.node for u in uses))
            if layers is not None and value.name not in layers and not any(n.name in layers for n in readers):
                continue
            if value.is_graph_input() or value.is_graph_output():
                skipped[value.name] = "a graph input or output"
                continue
            if value.const_value is None:
                continue
            array = value.const_value.numpy()
            if array.dtype.kind != "f":
                skipped[value.name] = f"dtype {array.dtype} (only float weights)"
                continue
            if array.size < min_elements:
                skipped[value.name] = f"{array.size} elements < min_elements {min_elements}"
                continue
            if len(kinds) != 1:
                skipped[value.name] = "read both as a layer weight and as sparse values"
                continue
            weights.append(Weight(value, array, readers, graph, sparse_values=kinds == {"sparse"}))
    return weights, skipped


def output_axis(weight: Weight) -> int | None:
    """The output-channel axis all readers agree on, or None (readers disagree, sparse values)."""
    if weight.sparse_values:
        return None
    axes = set()
    ndim = weight.array.ndim
    for node in weight.readers:
        if node.op_type == "Conv":
            axes.add(0)
        elif node.op_type == "ConvTranspose":
            axes.add(1 if node.attributes.get_int("group", 1) == 1 else None)
        elif node.op_type == "Gemm":
            axes.add(0 if node.attributes.get_int("transB", 0) else 1)
        elif node.op_type == "MatMul":
            axes.add(ndim - 1 if ndim >= 2 else None)
    return axes.pop() if len(axes) == 1 else None


def input_axis(weight: Weight) -> int | None:
    """The input-channel (reduction) axis all readers agree on, or None."""
    if weight.sparse_values:
        return None
    axes = set()
    ndim = weight.array.ndim
    for node in weight.readers:
        if node.op_type == "Conv":
            axes.add(1)
        elif node.op_type == "ConvTranspose":
            axes.add(0)
        elif node.op_type == "Gemm":
            axes.add(1 if node.attributes.get_int("transB", 0) else 0)
        elif node.op_type == "MatMul":
            axes.add(ndim - 2 if ndim >= 2 else None)
    return axes.pop() if len(axes) == 1 else None


def insert_front(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Put ``nodes`` before every node of ``graph``: decoders of its weights run before any reader,
    subgraph readers included (a subgraph sees its outer graph's values)."""
    first = next(iter(graph), None)
    if first is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first, nodes)


def opset_of(model: ir.Model) -> int:
    """The default domain's opset of ``model``."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def relative_gaps(positions: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps uint8, values)`` storing sorted flat ``positions`` relatively, as Deep Compression does.

    The first gap is the first position (counted from 0), every later one the distance to the entry
    before (1..255). A longer distance gets filler entries every 255 positions: a gap of 255 and
    the value 0 (the dense tensor holds 0 there). ``np.cumsum(gaps)`` gives the positions back,
    fillers included (``positions_of_gaps``).
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    previous = np.concatenate([[0], positions[:-1]])
    gap = positions - previous
    fill = np.maximum(0, (gap + MAX_GAP - 1) // MAX_GAP - 1)
    at = np.cumsum(fill + 1) - 1  # where each real entry lands among all entries
    gaps = np.full(positions.size + int(fill.sum()), MAX_GAP, dtype=np.uint8)
    gaps[at] = (gap - MAX_GAP * fill).astype(np.uint8)
    stored = np.zeros(gaps.size, dtype=values.dtype)
    stored[at] = values
    return gaps, stored


def positions_of_gaps(gaps: np.ndarray) -> np.ndarray:
    """The flat positions ``relative_gaps`` stored (what the graph's CumSum computes)."""
    return np.cumsum(gaps.astype(np.int64))


def packed_bits(levels: int) -> int:
    """Bits a code takes when packed: 1, 2, 4 (a byte holds 8, 4 or 2 codes), else 8 (not packed)."""
    needed = max(1, int(levels - 1).bit_length())
    return next(b for b in (1, 2, 4, 8) if b >= needed)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (each < 2^bits, bits in 1, 2, 4) packed ``8 // bits`` a byte, field-major.

    The flat codes, padded with zeros to ``k * m`` (k = 8 // bits), are read as k rows of m: byte p
    holds row j's code p in bits ``8 - bits*(j+1)`` and up (row 0 in the high bits), so unpacking
    row by row and concatenating gives the codes in order without a transpose (``unpack_codes``).
    """
    k = 8 // bits
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    m = -(-flat.size // k)
    rows = np.zeros(k * m, dtype=np.uint8)
    rows[:flat.size] = flat
    rows = rows.reshape(k, m).astype(np.uint16)
    packed = np.zeros(m, dtype=np.uint16)
    for j in range(k):
        packed |= rows[j] << (8 - bits * (j + 1))
    return packed.astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of ``pack_codes``'s bytes, as the graph unpacks them."""
    k = 8 // bits
    rows = [((packed.astype(np.uint16) << (bits * j)) & 0xFF) >> (8 - bits) for j in range(k)]
    return np.concatenate(rows).astype(np.uint8)[:count]


def add_initializer(graph: ir.Graph, names, hint: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` under a fresh name from ``names`` (a NameScope)."""
    name = names.fresh(hint)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def shared_constant(graph: ir.Graph, names, hint: str, array: np.ndarray) -> ir.Value:
    """A small decoder constant (a shift, an axis, a start) shared by every decoder of ``graph``:
    the initializer named ``onnxopt_<hint>`` where it holds ``array``, else a new one. On a small
    model the names of a dozen copies would outweigh the packed codes they save."""
    name = f"onnxopt_{hint}"
    found = graph.initializers.get(name)
    if found is not None and found.const_value is not None:
        have = found.const_value.numpy()
        if have.dtype == array.dtype and have.shape == array.shape and np.array_equal(have, array):
            return found
    return add_initializer(graph, names, name, array)


def _node(names, base: str, op: str, inputs, out_hint: str, **attributes) -> ir.Node:
    """A decoder node; unnamed (its output's name says what it is: names would double its bytes)."""
    node = ir.node(op, inputs, attributes=attributes or None)
    node.outputs[0].name = names.fresh(f"{base}_{out_hint}")
    return node


def decoder_bytes(base: str, nodes: int) -> int:
    """About what ``nodes`` decoder nodes of weight ``base`` take in the file (each output name is
    written twice, as output and as the next node's input)."""
    return nodes * (2 * len(base) + 40)


def gaps_decoder(graph: ir.Graph, names, base: str, gaps: np.ndarray) -> tuple[list[ir.Node], ir.Value]:
    """Nodes rebuilding int64 positions from uint8 ``gaps``: ``CumSum(Cast<int64>(gaps), 0)``."""
    stored = add_initializer(graph, names, f"{base}_gaps", gaps)
    axis = shared_constant(graph, names, "axis0", np.array(0, dtype=np.int64))
    cast = _node(names, base, "Cast", [stored], "gaps_i64", to=ir.DataType.INT64)
    cumsum = _node(names, base, "CumSum", [cast.outputs[0], axis], "positions")
    return [cast, cumsum], cumsum.outputs[0]


def codes_decoder(graph: ir.Graph, names, base: str, codes: np.ndarray, bits: int) -> tuple[list[ir.Node], ir.Value]:
    """Nodes giving ``codes`` (uint8, any shape) back as int64 indices of that shape.

    ``bits`` 8: the codes are stored as they are, ``Cast<int64>``. 1, 2, 4: stored packed
    (``pack_codes``); row j is ``BitShift(BitShift(bytes, LEFT, bits*j), RIGHT, 8 - bits)`` (uint8
    arithmetic drops the bits shifted out on the left), the rows are concatenated, the padding sliced
    off and the result reshaped to ``codes.shape``.
    """
    if bits == 8:
        stored = add_initializer(graph, names, f"{base}_codes", codes.astype(np.uint8))
        cast = _node(names, base, "Cast", [stored], "codes_i64", to=ir.DataType.INT64)
        return [cast], cast.outputs[0]
    k = 8 // bits
    stored = add_initializer(graph, names, f"{base}_codes_packed", pack_codes(codes, bits))
    nodes, rows = [], []
    right = shared_constant(graph, names, f"shift{8 - bits}", np.array([8 - bits], dtype=np.uint8))
    for j in range(k):
        source = stored
        if j:
            left = shared_constant(graph, names, f"shift{bits * j}", np.array([bits * j], dtype=np.uint8))
            up = _node(names, base, "BitShift", [stored, left], f"codes_up{j}", direction="LEFT")
            nodes.append(up)
            source = up.outputs[0]
        down = _node(names, base, "BitShift", [source, right], f"codes_r{j}", direction="RIGHT")
        nodes.append(down)
        rows.append(down.outputs[0])
    value = rows[0]
    if k > 1:
        concat = _node(names, base, "Concat", rows, "codes_rows", axis=0)
        nodes.append(concat)
        value = concat.outputs[0]
    if codes.size != k * stored.shape[0]:
        start = shared_constant(graph, names, "start0", np.array([0], dtype=np.int64))
        end = add_initializer(graph, names, f"{base}_codes_end", np.array([codes.size], dtype=np.int64))
        cut = _node(names, base, "Slice", [value, start, end], "codes_flat")
        nodes.append(cut)
        value = cut.outputs[0]
    if codes.ndim != 1:
        shape = add_initializer(graph, names, f"{base}_codes_shape", np.array(codes.shape, dtype=np.int64))
        reshape = _node(names, base, "Reshape", [value, shape], "codes_shaped")
        nodes.append(reshape)
        value = reshape.outputs[0]
    cast = _node(names, base, "Cast", [value], "codes_i64", to=ir.DataType.INT64)
    nodes.append(cast)
    return nodes, cast.outputs[0]

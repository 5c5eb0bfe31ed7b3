"""The weight tensors that the compression passes (cluster, sparsify) may re-encode, and how they are read.

A weight is a float initializer every reader of which takes it as a layer's weight (Conv/ConvTranspose
input 1, Gemm input 1, MatMul input 1) or as the stored values of a sparse weight (ScatterElements
input 2 into a ConstantOfShape, as ``sparsify`` writes). A tensor also read by anything else (an Add,
a graph output) is left alone: re-encoding it would change that reader too. A graph input that is also
an initializer is not a constant (the caller may feed it). Re-encoding replaces the tensor for all its
readers at once, so a weight shared by two layers stays shared.
"""

from __future__ import annotations

__all__ = ["Weight", "find_weights", "output_axis", "input_axis", "insert_front"]

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

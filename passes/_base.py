"""What every onnxopt pass shares: a command-line name and a one-line summary of its last run."""

from __future__ import annotations

__all__ = [
    "AUTO", "OnnxoptPass", "NameScope", "constant_array", "replace_weight", "drop_if_unused", "graphs_of", "channel_abs_max",
    "along_axis",
]

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir


class OnnxoptPass(ir.passes.InPlacePass):
    """An in-place onnx-ir pass with a command-line ``name``; after a call, ``summary`` says what it did
    in one line (for the report) and ``details`` holds its figures."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""
        self.details: dict[str, Any] = {}


class LossyLayers:
    """The way back of a lossy pass that rewrites layers one by one (clustering, sparsity, low rank):
    after a run, ``units`` names the layers it changed (its ``details["layers"]`` keys: a weight's
    or a node's name), and ``excluding(units)`` is the same pass, leaving those alone. The pipeline's
    accuracy budget (``onnxopt.fallback``) undoes the most harmful layers with it, whatever the pass."""

    exclude: frozenset[str] = frozenset()

    @property
    def units(self) -> list[str]:
        return list(self.details.get("layers", {}))

    def excluding(self, units) -> LossyLayers:
        new = copy.copy(self)
        new.exclude = frozenset(self.exclude) | set(units)
        new.details, new.summary = {}, ""
        return new

    # Per-layer levels (sparsity, bits, energy: each pass's own), mildest first: the candidates a
    # search by measured sensitivity (``onnxopt.sensitivity``) tries on each layer.
    LEVELS: tuple = ()
    # ``per_layer``: unit -> level, only those units rewritten (each at its level); None: every layer
    # at the pass's one setting; ``AUTO``: to be chosen from data before the pass runs.
    per_layer: dict | str | None = None

    LEVEL_FIELD: str = ""  # the attribute that holds the pass's one setting: "sparsity", "bits", "energy"

    def uniform(self, level) -> LossyLayers:
        """The same pass with every layer at ``level`` (no ``per_layer``)."""
        new = copy.copy(self)
        new.per_layer = None
        setattr(new, self.LEVEL_FIELD, level)
        new.details, new.summary = {}, ""
        return new

    def at_levels(self, per_layer) -> LossyLayers:
        """The same pass rewriting exactly the units ``per_layer`` names, each at its level."""
        new = copy.copy(self)
        new.per_layer = dict(per_layer)
        new.details, new.summary = {}, ""
        return new

    def _check_levels(self) -> None:
        if self.per_layer == AUTO:
            raise ValueError(f"{self.name}: per_layer='auto' is chosen from data by onnxopt.optimize "
                             "(onnxopt.sensitivity); give a mapping of layer -> level to run the pass alone")

    def _level(self, *keys: str, default):
        """The level of the first of ``keys`` that ``per_layer`` names (else ``default``), and whether
        the layer is to be rewritten at all (with ``per_layer``, only the units it names are)."""
        if not isinstance(self.per_layer, dict):
            return default, True
        for key in keys:
            if key in self.per_layer:
                return self.per_layer[key], True
        return default, False


AUTO = "auto"


class LossyNodes:
    """The way back of a lossy pass that rewrites nodes and leaves those its ``exclude`` names (by
    name or label): ``units`` are the node labels of its last run (``details["quantized"]`` and
    ``details["embeddings"]``), ``excluding(units)`` the same pass with those excluded too."""

    exclude: tuple[str, ...] = ()

    @property
    def units(self) -> list[str]:
        return [*self.details.get("quantized", []), *self.details.get("embeddings", [])]

    def excluding(self, units) -> LossyNodes:
        new = copy.copy(self)
        new.exclude = (*self.exclude, *[u for u in units if u not in self.exclude])
        new.details, new.summary = {}, ""
        return new


def graphs_of(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield model.graph
    yield from model.graph.subgraphs()


def channel_abs_max(w: np.ndarray, axis: int) -> np.ndarray:
    """max|w| per index of ``axis`` (a weight's channel range)."""
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def along_axis(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-channel ``values`` (or one value when ``axis`` is None) shaped to broadcast along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return np.asarray(values).reshape(shape)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node), or None.

    A graph input that is also an initializer is not a constant: the caller may feed it.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def replace_weight(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, hint: str, names: NameScope | None = None
) -> ir.Value:
    """Give ``node`` a new initializer of ``graph`` at input ``index``; the old tensor is left for its other users.

    Weights are never mutated in place: another node may still read the old one. ``graph`` is
    ``node``'s graph or an outer one (the main graph holds weights for subgraphs too). A pass that
    replaces many weights passes one ``NameScope`` of ``graph`` to avoid re-listing its names.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    base = (old.name if old is not None and old.name else None) or node.name or node.op_type
    name = (names or NameScope(graph)).fresh(f"{base}_{hint}")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = value.const_value.shape
    graph.register_initializer(value)
    if index < len(node.inputs):
        node.replace_input_with(index, value)
    else:
        node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
    if old is not None:
        drop_if_unused(graph, old)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer, or a Constant node, that nothing reads any more.

    The value is removed from the graph that holds it, which may be an outer graph of ``graph``
    (a subgraph's node reading a main-graph weight).
    """
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    owner = value.graph
    if value.is_initializer() and owner is not None and owner.initializers.get(value.name) is value:
        owner.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


class NameScope:
    """The value names of a graph and its subgraphs, handing out new ones that clash with none.

    Subgraphs see their outer graphs' values, so a name new to ``graph`` alone could clash there.
    """

    def __init__(self, graph: ir.Graph):
        self.taken: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            self.taken.update(g.initializers)
            self.taken.update(v.name for v in g.inputs)
            self.taken.update(v.name for node in g for v in node.outputs)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _unique_name(graph: ir.Graph, base: str) -> str:
    """A name no value of ``graph`` or of its subgraphs has yet."""
    return NameScope(graph).fresh(base)

"""Share identical weights: one tensor for every repeated initializer or Constant, transposes included.

Tensors are grouped by dtype, shape and a probe of a few elements, hashed only where such a group
has two or more members, and confirmed equal byte for byte on a hash match. A weight that equals another's transpose (a tied
embedding exported as two tensors) is read through ``transA``/``transB`` of a Gemm, or through a
Transpose node in front of a MatMul.
"""

from __future__ import annotations

__all__ = ["ShareInitializers"]

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import OnnxoptPass, _unique_name, graphs_of

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    """One constant tensor that nodes read: an initializer, or a Constant node's output."""

    value: ir.Value
    graph: ir.Graph
    tensor: ir.TensorProtocol
    constant: ir.Node | None  # the Constant node, when the tensor is not an initializer

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)


def _shareable(value: ir.Value) -> bool:
    # A graph input may be fed by the caller, a graph output is part of the interface.
    return not (value.is_graph_input() or value.is_graph_output())


def _collect(model: ir.Model) -> list[_Entry]:
    entries = []
    for graph in graphs_of(model):
        for value in graph.initializers.values():
            if value.const_value is not None and _shareable(value):
                entries.append(_Entry(value, graph, value.const_value, None))
        for node in graph:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            attr = node.attributes.get("value")
            if attr is None or attr.type != ir.AttributeType.TENSOR or not _shareable(node.outputs[0]):
                continue
            entries.append(_Entry(node.outputs[0], graph, attr.value, node))
    return [e for e in entries if not e.tensor.dtype.is_string()]


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ShareInitializers(OnnxoptPass):
    """Make every repeated constant tensor one initializer.

    Rules:
    - equal dtype, shape and bytes → one initializer; duplicates anywhere (main graph, subgraphs,
      Constant nodes) read it. It lives in the main graph when the copies are spread over graphs,
      since subgraphs may read outer-scope values;
    - ``transposes=True``: a 2-D float weight equal to another's transpose is dropped; its Gemm
      readers flip ``transA``/``transB``, its MatMul readers read a Transpose of the kept one;
    - graph inputs and graph outputs are never merged.
    """

    name = "share-init"

    def __init__(self, transposes: bool = True) -> None:
        super().__init__()
        self.transposes = transposes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        entries = _collect(model)
        merged, saved = self._share_equal(model, entries)
        t_merged, t_saved = self._share_transposed(model) if self.transposes else (0, 0)
        self.summary = f"shared {merged} duplicate tensors" + (
            f" and {t_merged} transposed copies" if t_merged else ""
        ) + f"; saved {saved + t_saved:,} bytes"
        self.details = {"duplicates": merged, "transposed": t_merged, "bytes_saved": saved + t_saved}
        return ir.passes.PassResult(model, modified=bool(merged or t_merged))

    # -- exact duplicates --------------------------------------------------------------------

    def _share_equal(self, model: ir.Model, entries: list[_Entry]) -> tuple[int, int]:
        by_shape: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in entries:
            by_shape[(e.tensor.dtype, tuple(e.tensor.shape.numpy()))].append(e)
        merged = saved = 0
        for group in self._probe_groups(by_shape.values()):
            for same in self._equal_sets(group):
                m, s = self._merge(model, same)
                merged += m
                saved += s
        return merged, saved

    @staticmethod
    def _probe_groups(groups) -> list[list[_Entry]]:
        """Split each dtype-and-shape group by a cheap probe (up to 256 evenly spaced elements).

        Equal tensors have equal probes; tensors of one shape that differ (most weights) differ
        there too, so the full hash and byte comparison run only on likely duplicates.
        """
        out = []
        for group in groups:
            if len(group) < 2:
                continue
            by_probe: dict[bytes, list[_Entry]] = defaultdict(list)
            for e in group:
                flat = e.tensor.numpy().reshape(-1)
                step = max(1, flat.size // 256)
                by_probe[flat[::step].tobytes() + flat[-1:].tobytes()].append(e)
            out.extend(g for g in by_probe.values() if len(g) > 1)
        return out

    @staticmethod
    def _equal_sets(group: list[_Entry]) -> list[list[_Entry]]:
        """Split entries of one dtype and shape into sets of byte-identical tensors."""
        by_hash: dict[bytes, list[tuple[_Entry, bytes]]] = defaultdict(list)
        for e in group:
            data = e.tensor.tobytes()
            by_hash[_digest(data)].append((e, data))
        sets = []
        for candidates in by_hash.values():
            while candidates:
                first, first_data = candidates[0]
                same = [first]
                rest = []
                for e, data in candidates[1:]:
                    (same if data == first_data else rest).append(e)  # confirm: hashes can collide
                if len(same) > 1:
                    sets.append(same)
                candidates = rest
        return sets

    def _merge(self, model: ir.Model, same: list[_Entry]) -> tuple[int, int]:
        graphs = {id(e.graph) for e in same}
        home = same[0].graph if len(graphs) == 1 else model.graph
        keep = next((e for e in same if e.constant is None and e.graph is home), None)
        if keep is None:
            # Only Constant nodes, or copies in sibling subgraphs: one initializer in ``home``.
            name = _unique_name(model.graph, same[0].value.name or "shared")  # unique in every scope
            value = ir.Value(name=name, const_value=same[0].tensor)
            value.dtype = same[0].tensor.dtype
            value.shape = ir.Shape(same[0].tensor.shape.numpy())
            home.register_initializer(value)
            keep = _Entry(value, home, same[0].tensor, None)
            removed = list(same)
            saved = sum(e.nbytes for e in same[1:])
        else:
            removed = [e for e in same if e is not keep]
            saved = sum(e.nbytes for e in removed)
        for e in removed:
            ir.convenience.replace_all_uses_with(e.value, keep.value)
            self._drop(e)
            logger.info("share-init: %s now reads %s", e.value.name, keep.value.name)
        return len(same) - 1, saved

    @staticmethod
    def _drop(e: _Entry) -> None:
        if e.constant is not None:
            e.graph.remove(e.constant, safe=True)
        else:
            e.graph.initializers.pop(e.value.name)

    # -- transposed duplicates ------------------------------------------------------------------

    def _share_transposed(self, model: ir.Model) -> tuple[int, int]:
        graph = model.graph
        mats = [
            e for e in _collect(model)
            if e.graph is graph and e.constant is None and e.tensor.dtype.is_floating_point()
            and len(e.tensor.shape) == 2 and e.tensor.shape[0] != e.tensor.shape[1]
        ]
        by_key: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in mats:
            by_key[(e.tensor.dtype, tuple(e.tensor.shape.numpy()))].append(e)
        merged = saved = 0
        done: set[int] = set()
        for e in mats:
            rows, cols = e.tensor.shape.numpy()
            partners = by_key.get((e.tensor.dtype, (cols, rows)))
            if not partners or id(e) in done:
                continue
            transposed = np.ascontiguousarray(e.tensor.numpy().T).tobytes()
            for other in partners:
                if id(other) in done or other.tensor.tobytes() != transposed:
                    continue
                # Keep the one whose readers cannot take a transpose; drop the other.
                for keep, drop in ((e, other), (other, e)):
                    if self._readers_accept_transpose(drop.value):
                        self._read_through_transpose(graph, drop, keep)
                        done.update((id(e), id(other)))
                        merged += 1
                        saved += drop.nbytes
                        logger.info("share-init: %s is %s transposed", drop.value.name, keep.value.name)
                        break
                else:
                    logger.warning(
                        "share-init: %s equals %s transposed, but both are read by ops that take no transpose",
                        e.value.name, other.value.name,
                    )
                if id(e) in done:
                    break
        return merged, saved

    @staticmethod
    def _readers_accept_transpose(value: ir.Value) -> bool:
        return bool(value.uses()) and all(
            use.node.domain in ("", "ai.onnx")
            and ((use.node.op_type == "Gemm" and use.idx in (0, 1)) or (use.node.op_type == "MatMul" and use.idx == 1))
            for use in value.uses()
        )

    @staticmethod
    def _read_through_transpose(graph: ir.Graph, drop: _Entry, keep: _Entry) -> None:
        transpose_out = None
        for use in list(drop.value.uses()):
            node, idx = use.node, use.idx
            if node.op_type == "Gemm":
                attr = "transA" if idx == 0 else "transB"
                current = node.attributes.get(attr)
                flipped = 0 if current is not None and current.as_int() else 1
                node.attributes[attr] = ir.AttrInt64(attr, flipped)
                node.replace_input_with(idx, keep.value)
            else:
                if transpose_out is None:
                    transpose = ir.node(
                        "Transpose", inputs=[keep.value], attributes={"perm": [1, 0]},
                        name=_unique_name(graph, f"{drop.value.name}_transpose"),
                    )
                    transpose_out = transpose.outputs[0]
                    transpose_out.name = _unique_name(graph, f"{drop.value.name}_T")
                    transpose_out.dtype = drop.value.dtype
                    transpose_out.shape = drop.value.shape
                    graph.insert_before(next(iter(graph)), transpose)  # before every reader
                node.replace_input_with(idx, transpose_out)
        graph.initializers.pop(drop.value.name)

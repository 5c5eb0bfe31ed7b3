"""Share identical weights: one tensor for every repeated initializer or Constant, transposes included.

Tensors are grouped by dtype, shape and a probe of a few elements, hashed only where such a group
has two or more members, and confirmed equal byte for byte on a hash match. Weights kept in
external-data files are read in chunks through the file (``_TensorReader``), never memory-mapped
nor copied whole: on a model larger than memory, the pass holds one chunk at a time and leaves
every tensor lazy. A weight that equals another's transpose (a tied
embedding exported as two tensors) is read through ``transA``/``transB`` of a Gemm, or through a
Transpose node in front of a MatMul.
"""

from __future__ import annotations

__all__ = ["ShareInitializers"]

import hashlib
import logging
import os
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


# Bytes read at once when hashing or comparing a tensor kept in an external-data file.
_CHUNK_BYTES = 16 * 2**20


class _TensorReader:
    """Reads a tensor's bytes: through its file for an external tensor (``os.pread``: no memory map,
    so its pages never join the process's memory and the tensor stays lazy), else from its array."""

    def __init__(self, tensor: ir.TensorProtocol):
        self.tensor = tensor
        self.external = isinstance(tensor, ir.ExternalTensor) and getattr(tensor, "raw", None) is None \
            and tensor.dtype.bitwidth % 8 == 0
        self.nbytes = int(tensor.nbytes)

    def chunks(self):
        """The tensor's bytes, ``_CHUNK_BYTES`` at a time."""
        if not self.external:
            data = memoryview(np.ascontiguousarray(self.tensor.numpy()).reshape(-1).view(np.uint8))
            for start in range(0, len(data), _CHUNK_BYTES):
                yield data[start:start + _CHUNK_BYTES]
            return
        fd = os.open(self.tensor.path, os.O_RDONLY)
        try:
            base = self.tensor.offset or 0
            for start in range(0, self.nbytes, _CHUNK_BYTES):
                yield os.pread(fd, min(_CHUNK_BYTES, self.nbytes - start), base + start)
        finally:
            os.close(fd)

    def elements(self, indices: np.ndarray) -> bytes:
        """The bytes of the elements at these flat ``indices``."""
        if not self.external:
            return self.tensor.numpy().reshape(-1)[indices].tobytes()
        size = int(self.tensor.dtype.itemsize)
        base = self.tensor.offset or 0
        fd = os.open(self.tensor.path, os.O_RDONLY)
        try:
            return b"".join(os.pread(fd, size, base + int(i) * size) for i in indices)
        finally:
            os.close(fd)


def _digest(tensor: ir.TensorProtocol) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for chunk in _TensorReader(tensor).chunks():
        h.update(chunk)
    return h.digest()


def _same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Whether two tensors of one dtype and shape hold the same bytes, compared chunk by chunk."""
    return all(x == y for x, y in zip(_TensorReader(a).chunks(), _TensorReader(b).chunks()))


def _probe_indices(size: int) -> np.ndarray:
    """Up to 257 evenly spaced flat indices, the last element included."""
    step = max(1, size // 256)
    return np.unique(np.append(np.arange(0, size, step), size - 1)) if size else np.zeros(0, np.int64)


def _equal_transposed(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Whether 2-D ``b`` is ``a`` transposed, compared a block of rows at a time."""
    x, y = a.numpy(), b.numpy()
    x, y = x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")  # bytes, not values: -0.0 is not 0.0
    rows = max(1, _CHUNK_BYTES // max(1, x.shape[1] * x.itemsize))
    return all(np.array_equal(x[i:i + rows], y[:, i:i + rows].T) for i in range(0, x.shape[0], rows))


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
                size = int(np.prod(e.tensor.shape.numpy(), dtype=np.int64))
                by_probe[_TensorReader(e.tensor).elements(_probe_indices(size))].append(e)
            out.extend(g for g in by_probe.values() if len(g) > 1)
        return out

    @staticmethod
    def _equal_sets(group: list[_Entry]) -> list[list[_Entry]]:
        """Split entries of one dtype and shape into sets of byte-identical tensors (hashed and
        compared in chunks: no tensor is held whole in memory)."""
        by_hash: dict[bytes, list[_Entry]] = defaultdict(list)
        for e in group:
            by_hash[_digest(e.tensor)].append(e)
        sets = []
        for candidates in by_hash.values():
            while candidates:
                first = candidates[0]
                same = [first]
                rest = []
                for e in candidates[1:]:
                    (same if _same_bytes(e.tensor, first.tensor) else rest).append(e)  # confirm: hashes can collide
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
            # A probe first: the element (i, j) of one at (j, i) of the other. Only on a match is the
            # whole tensor compared (most weights of transposed shapes differ at the first probe).
            probe = _probe_indices(int(rows) * int(cols))
            mine = _TensorReader(e.tensor).elements(probe)
            at_transposed = (probe % cols) * rows + probe // cols
            for other in partners:
                if id(other) in done or _TensorReader(other.tensor).elements(at_transposed) != mine:
                    continue
                if not _equal_transposed(e.tensor, other.tensor):
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

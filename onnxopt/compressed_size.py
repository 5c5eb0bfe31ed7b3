"""What a model takes on disk: the file, the file after a general compressor, the weights alone, and
the Deep Compression storage figure.

- ``file_bytes`` / ``file_gzip9`` (/ ``file_zstd19`` where the ``zstandard`` module is importable);
- ``weight_bytes`` / ``weight_gzip9``: every initializer, sparse initializer and Constant tensor
  (codebooks and codes included) serialized as TensorProtos, concatenated, then gzip -9. A small
  model's node names and attributes can outweigh its compressed weights, so weights are counted apart;
- ``deep_compression_bytes``: the storage format of Han et al. 2016 (Deep Compression), per tensor:
  * a sparse weight (``sparsify``'s ScatterElements form, see ``passes/sparsify.py``; or an ONNX
    sparse initializer) stores, per non-zero, its gap to the previous one in b = 4 or 8 bits (the
    smaller total is taken); a gap over 2^b inserts filler zeros, entries of their own;
  * a clustered weight (``cluster``'s Gather form) stores its codes Huffman-coded by their
    frequencies (code tables not counted) and its codebook at 32 bits an entry; per-channel code
    offsets are implied by the shape and not counted;
  * both together: sparse entries (fillers as one more symbol, with a zero centroid added where the
    codebook lacks one) Huffman-coded, plus the gaps;
  * every other tensor at its raw size; the element counts and shapes of the decoders are implied.

The passes' compact stored forms (positions as uint8 gaps rebuilt by CumSum, codes packed and
unpacked by BitShift/Concat/Slice/Reshape) are folded first (``_FOLD``: integer ops on integer
constants), so the estimate reads the positions and codes they decode to, whichever form stored them.
"""

from __future__ import annotations

__all__ = ["compressed_sizes", "huffman_bits", "relative_index_entries", "run_sizes", "GZIP9_LIMIT",
           "DEEP_COMPRESSION_LIMIT"]

import gzip
import heapq
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

_INDEX_BITS = (4, 8)


def huffman_bits(counts) -> int:
    """Bits of a Huffman code of a sequence with these symbol frequencies (one symbol: 1 bit each)."""
    heap = [int(c) for c in counts if c > 0]
    if not heap:
        return 0
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged  # every symbol under this node gets one more bit
        heapq.heappush(heap, merged)
    return total


def relative_index_entries(positions: np.ndarray, bits: int) -> tuple[int, np.ndarray]:
    """``(fillers, filler_after)``: relative coding of sorted flat ``positions`` with ``bits``-bit gaps.

    Each entry stores its distance to the previous entry (the first: to position -1), 1..2^bits;
    a longer gap gets filler zeros every 2^bits positions. ``filler_after[i]``: fillers before non-zero i.
    """
    span = 2 ** bits
    gaps = np.diff(np.concatenate([[-1], np.sort(np.asarray(positions, dtype=np.int64))]))
    fill = np.maximum(0, (gaps + span - 1) // span - 1)
    return int(fill.sum()), fill


def _load(model) -> tuple[onnx.ModelProto, int | None]:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return onnx.load(str(path)), path.stat().st_size
    if isinstance(model, ir.Model):
        return ir.to_proto(model), None
    return model, None


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _gzip(data: bytes, level: int = 9) -> int:
    return len(gzip.compress(data, compresslevel=level, mtime=0))


# What every run's report measures, kept cheap: gzip -9 of 100 MB takes seconds, so larger files
# get level 6; the Deep Compression estimate parses every tensor, so it is left out past 500 MB.
GZIP9_LIMIT = 50 * 2**20
DEEP_COMPRESSION_LIMIT = 500 * 2**20
_SERIALIZE_LIMIT = 2**31 - 2**26  # protobuf's 2 GB: a larger model is only written with external data


# Integer decoder ops folded before the estimate (what passes/_weights.py writes to rebuild positions and codes).
_FOLD = ("Cast", "CumSum", "BitShift", "Concat", "Slice", "Reshape")


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray | None:
    """``node``'s output on constant integer ``inputs``, or None (not a decoder op we fold)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Cast":
        dtype = onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])
        return inputs[0].astype(dtype) if np.dtype(dtype).kind in "iu" else None
    if node.op_type == "CumSum":
        if attrs.get("exclusive") or attrs.get("reverse"):
            return None
        return np.cumsum(inputs[0], axis=int(inputs[1]), dtype=inputs[0].dtype)
    if node.op_type == "BitShift":
        x, shift = inputs[0], inputs[1].astype(np.uint64)
        wide = x.astype(np.uint64)
        out = wide << shift if attrs["direction"] == b"LEFT" or attrs["direction"] == "LEFT" else wide >> shift
        return (out & np.uint64(np.iinfo(x.dtype).max)).astype(x.dtype)
    if node.op_type == "Concat":
        return np.concatenate(inputs, axis=attrs["axis"])
    if node.op_type == "Slice":
        if len(inputs) > 3:
            return None
        return inputs[0][int(inputs[1][0]):int(inputs[2][0])] if inputs[0].ndim == 1 and inputs[1].size == 1 else None
    if node.op_type == "Reshape":
        return inputs[0].reshape([int(d) for d in inputs[1]]) if not np.any(inputs[1] <= 0) else None
    return None


class _Graph:
    """Tensors by name, and who produces and reads each value, over every graph of the model."""

    def __init__(self, proto: onnx.ModelProto):
        self.tensors: dict[str, np.ndarray] = {}
        self.sparse: dict[str, onnx.SparseTensorProto] = {}
        self.protos: list[bytes] = []
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for graph in _graphs(proto.graph):
            for t in graph.initializer:
                self.tensors[t.name] = numpy_helper.to_array(t)
                self.protos.append(t.SerializeToString())
            for s in graph.sparse_initializer:
                self.sparse[s.values.name] = s
                self.protos.append(s.SerializeToString())
            folded = self._fold(graph)
            for index, node in enumerate(graph.node):
                if index in folded:
                    continue
                for out in node.output:
                    self.producer[out] = node
                for i, name in enumerate(node.input):
                    if name:
                        self.readers[name].append((node, i))
                if node.op_type == "Constant":
                    for attr in node.attribute:
                        if attr.type == onnx.AttributeProto.TENSOR:
                            self.tensors[node.output[0]] = numpy_helper.to_array(attr.t)
                            self.protos.append(attr.t.SerializeToString())
                        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                            self.protos.append(attr.sparse_tensor.SerializeToString())

    def _fold(self, graph: onnx.GraphProto) -> set[int]:
        """Fold ``graph``'s integer decoders (``_FOLD``) on integer constants into ``tensors``; the
        constants only they read leave ``tensors`` (the folded result stands for them). The folded nodes'
        indices (not ids: protobuf hands out a new wrapper object each time a node is read)."""
        folded, consumed = set(), set()
        readers = defaultdict(list)
        for index, node in enumerate(graph.node):
            for name in node.input:
                readers[name].append(index)
        for index, node in enumerate(graph.node):
            if node.op_type not in _FOLD or len(node.output) != 1 or not node.input:
                continue
            inputs = [self.tensors.get(name) for name in node.input]
            if any(a is None or a.dtype.kind not in "iu" for a in inputs):
                continue
            out = _fold(node, inputs)
            if out is None:
                continue
            folded.add(index)
            self.tensors[node.output[0]] = out
            consumed.update(node.input)
        for name in consumed:
            if all(r in folded for r in readers[name]):
                self.tensors.pop(name, None)
        return folded

    def only_reader(self, name: str) -> tuple[onnx.NodeProto, int] | None:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def through_cast(self, name: str) -> tuple[onnx.NodeProto | None, int, list[str]]:
        """Follow ``name`` through Casts and constant Adds to its reader: (reader, input index, the Adds' constants)."""
        hop = self.only_reader(name)
        skipped = []
        while hop is not None and hop[0].op_type in ("Cast", "Add"):
            if hop[0].op_type == "Add":
                other = hop[0].input[1 - hop[1]]
                if other not in self.tensors:
                    return None, -1, skipped
                skipped.append(other)
            name = hop[0].output[0]
            hop = self.only_reader(name)
        return (*hop, skipped) if hop else (None, -1, skipped)


def _cluster_codes(g: _Graph, name: str) -> tuple[str, str, list[str]] | None:
    """(codebook, decoded value, code offsets) where ``name`` holds the codes of a Gather decoder, else None."""
    if g.tensors[name].dtype.kind not in "iu":
        return None
    node, idx, offsets = g.through_cast(name)
    if node is None or node.op_type != "Gather" or idx != 1 or node.input[0] not in g.tensors:
        return None
    return node.input[0], node.output[0], offsets


def _sparse_decoder(g: _Graph, name: str) -> tuple[str, str, int] | None:
    """(values source, shape name, numel) where ``name`` holds ScatterElements indices into ConstantOfShape."""
    if g.tensors[name].dtype.kind not in "iu":
        return None
    node, idx, offsets = g.through_cast(name)
    if node is None or offsets or node.op_type != "ScatterElements" or idx != 1:
        return None
    zeros = g.producer.get(node.input[0])
    if zeros is None or zeros.op_type != "ConstantOfShape" or zeros.input[0] not in g.tensors:
        return None
    return node.input[2], zeros.input[0], int(np.prod(g.tensors[zeros.input[0]]))


def _deep_compression(g: _Graph) -> tuple[int, dict]:
    bits_of: dict[str, int] = {}
    detail: dict[str, dict] = {}
    claimed: set[str] = set()
    clusters = {}
    for name in g.tensors:
        found = _cluster_codes(g, name)
        if found is not None:
            clusters[found[1]] = (name, found[0], found[2])
    for name in list(g.tensors):
        found = _sparse_decoder(g, name)
        if found is None:
            continue
        values_name, numel_name, numel = found
        positions = g.tensors[name].astype(np.int64).reshape(-1)
        cluster = clusters.pop(values_name, None)
        best = None
        for b in _INDEX_BITS:
            fillers, _ = relative_index_entries(positions, b)
            entries = positions.size + fillers
            if cluster is not None:
                codes_name, book_name, _ = cluster
                codes = g.tensors[codes_name].reshape(-1)
                book = g.tensors[book_name]
                counts = list(np.bincount(codes.astype(np.int64))) + [fillers]
                extra = 32 if fillers and not np.any(book == 0) else 0
                value_bits = huffman_bits(counts) + 32 * book.size + extra
            elif values_name in g.tensors:
                value_bits = entries * g.tensors[values_name].dtype.itemsize * 8
            else:
                break
            total = entries * b + value_bits
            if best is None or total < best[0]:
                best = (total, b, fillers)
        if best is None:
            continue
        total, b, fillers = best
        parts = [name, numel_name]
        if cluster is not None:
            parts += [cluster[0], cluster[1], *cluster[2]]
        elif values_name in g.tensors:
            parts.append(values_name)
        claimed.update(parts)
        bits_of[values_name] = total
        detail[values_name] = {"kind": "sparse" + (" + clustered" if cluster else ""), "nnz": int(positions.size),
                               "numel": numel, "index_bits": b, "fillers": fillers, "bits": total}
    for out, (codes_name, book_name, implied) in clusters.items():
        codes = g.tensors[codes_name].reshape(-1).astype(np.int64)
        book = g.tensors[book_name]
        total = huffman_bits(np.bincount(codes)) + 32 * book.size
        claimed.update([codes_name, book_name, *implied])
        bits_of[out] = total
        detail[out] = {"kind": "clustered", "clusters": int(book.size), "elements": int(codes.size), "bits": total,
                       "bits_per_weight": total / max(codes.size, 1)}
    # the decoders' shapes (Reshape targets of a ScatterElements output) are implied too
    for name in g.tensors:
        for node, idx in g.readers.get(name, []):
            if node.op_type == "Reshape" and idx == 1:
                src = g.producer.get(node.input[0])
                if src is not None and src.op_type == "ScatterElements":
                    claimed.add(name)
    for name, array in g.tensors.items():
        if name not in claimed:
            bits_of[name] = array.size * array.dtype.itemsize * 8
    for name, s in g.sparse.items():
        values = numpy_helper.to_array(s.values)
        positions = numpy_helper.to_array(s.indices).astype(np.int64)
        if positions.ndim == 2:  # coordinate form: flatten
            positions = np.ravel_multi_index(positions.T, tuple(s.dims))
        best = min((positions.size + relative_index_entries(positions, b)[0]) * (b + values.dtype.itemsize * 8)
                   for b in _INDEX_BITS)
        bits_of[name] = best
        detail[name] = {"kind": "sparse initializer", "nnz": int(positions.size), "bits": best}
    return math.ceil(sum(bits_of.values()) / 8), detail


def compressed_sizes(model_or_path) -> dict:
    """Sizes of ``model_or_path`` (a path, an ``ir.Model`` or an ``onnx.ModelProto``) in bytes; see the module docstring."""
    proto, on_disk = _load(model_or_path)
    data = proto.SerializeToString()
    g = _Graph(proto)
    weights = b"".join(g.protos)
    dc_bytes, dc_detail = _deep_compression(g)
    sizes = {
        "file_bytes": on_disk if on_disk is not None else len(data),
        "file_gzip9": _gzip(data),
        "weight_bytes": len(weights),
        "weight_gzip9": _gzip(weights),
        "deep_compression_bytes": dc_bytes,
        "deep_compression": dc_detail,
    }
    try:
        import zstandard
    except ImportError:
        pass
    else:
        compressor = zstandard.ZstdCompressor(level=19)
        sizes["file_zstd19"] = len(compressor.compress(data))
        sizes["weight_zstd19"] = len(compressor.compress(weights))
    return sizes


def run_sizes(model: ir.Model, value_info=None) -> dict:
    """The sizes a run reports for ``model`` (before or after the passes), in bytes:

    - ``file_bytes``: the model serialized as ``onnxopt.io.save_model`` writes it (``model_bytes``);
    - ``file_gzip`` at ``gzip_level`` (9 below ``GZIP9_LIMIT``, else 6, to stay within seconds);
    - ``weight_bytes`` / ``weight_gzip9`` and ``deep_compression_bytes`` (see the module docstring),
      left out (None) when the weights pass ``DEEP_COMPRESSION_LIMIT``;
    - ``notes``: what was left out and why.
    """
    from onnxopt.io import has_external_data, model_bytes, weight_bytes

    weights = weight_bytes(model)
    sizes = {"file_bytes": None, "file_gzip": None, "gzip_level": None, "weight_bytes": None, "weight_gzip9": None,
             "deep_compression_bytes": None, "notes": []}
    if has_external_data(model) or weights > _SERIALIZE_LIMIT:
        sizes["notes"].append(f"weights of {weights:,} bytes (or external data): file sizes not measured")
        return sizes
    data = model_bytes(model, value_info)
    level = 9 if len(data) < GZIP9_LIMIT else 6
    sizes.update(file_bytes=len(data), file_gzip=_gzip(data, level), gzip_level=level)
    if level != 9:
        sizes["notes"].append(f"file of {len(data) / 2**20:.0f} MB: gzip -6, not -9 (cheaper)")
    if weights > DEEP_COMPRESSION_LIMIT:
        sizes["notes"].append(f"weights of {weights / 2**20:.0f} MB: Deep Compression estimate left out")
        return sizes
    g = _Graph(onnx.load_from_string(data))
    blob = b"".join(g.protos)
    sizes.update(weight_bytes=len(blob), weight_gzip9=_gzip(blob), deep_compression_bytes=_deep_compression(g)[0])
    return sizes

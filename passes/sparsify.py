"""Unstructured magnitude pruning, stored sparse so that the file shrinks.

The smallest-magnitude weights are set to zero: ``sparsity`` of each layer's weights
(``scope="layer"``) or of all selected weights under one threshold (``scope="global"``), or in an
N:M ``pattern`` ("2:4": the 2 largest of every 4 consecutive weights along the input-channel axis,
the layout sparse tensor cores run).

Storage. onnx-ir (1.1) represents neither ``sparse_initializer`` nor a ``sparse_value`` attribute
(its serializer drops the first and raises on the second), and every onnxopt pass works on one
``ir.Model``. So a sparse weight is stored as ordinary initializers and rebuilt by the graph, in the
smaller of two forms::

    gaps     values [E] float, gaps [E] uint8        (opset 11+; Deep Compression's relative indices)
             positions = CumSum(Cast<int64>(gaps), 0)
    indices  values [nnz] float, indices [nnz] uint16 | int32 (uint16 while the tensor has <= 65536 elements)
             positions = Cast<int64>(indices)
    W = Reshape(ScatterElements(ConstantOfShape([numel]), positions, values), shape)

A gap is the distance to the entry before (the first: its position), 1..255; a longer one gets
filler entries every 255 positions, value 0 (``_weights.relative_gaps``), so E = nnz + fillers.
onnxruntime constant-folds the decoder when it creates a session (only the dense weight remains, so
run time is that of the dense model); the file holds ``E * (4 + 1)`` bytes in the gaps form, ``nnz *
(4 + 2)`` (int32: ``nnz * 8``) in the indices form, instead of ``4 * numel``. Where neither sparse form
would be smaller, the masked weight stays dense and the details say so. A ``cluster`` pass after this
one turns the values into codes (fillers get the exact code of 0).
"""

from __future__ import annotations

__all__ = ["SparsifyWeights"]

import logging

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import LossyLayers, NameScope, OnnxoptPass
from onnxopt.passes._weights import (COMPACT_OPSET, Weight, add_initializer, find_weights, gaps_decoder, input_axis,
                                     insert_front, opset_of, relative_gaps)

logger = logging.getLogger(__name__)

_SCOPES = ("layer", "global")
_PATTERNS = {"2:4": (2, 4)}


def _nm_mask(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest |w| of every ``m`` consecutive weights along ``axis``."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def _smallest_mask(magnitudes: np.ndarray, count: int) -> np.ndarray:
    """True for all but the ``count`` smallest entries (ties broken by position)."""
    keep = np.ones(magnitudes.size, dtype=bool)
    if count > 0:
        keep[np.argpartition(magnitudes.reshape(-1), count - 1)[:count]] = False
    return keep.reshape(magnitudes.shape)


def sparse_bytes(nnz: int, numel: int, ndim: int, itemsize: int) -> int:
    """Bytes of the indices form's initializers: values, indices, the element count and the shape."""
    index_bytes = 2 if numel <= 65536 else 4
    return nnz * (itemsize + index_bytes) + 8 + 8 * ndim


def gaps_bytes(entries: int, ndim: int, itemsize: int) -> int:
    """Bytes of the gaps form's initializers: values and gaps (fillers included), the CumSum axis,
    the element count and the shape."""
    return entries * (itemsize + 1) + 8 + 8 + 8 * ndim


class SparsifyWeights(LossyLayers, OnnxoptPass):
    """Zero the smallest weights; store each pruned weight sparse where that is smaller.

    Rules:
    - weights are those of ``_weights.find_weights`` (every reader a Conv/Gemm/MatMul weight slot);
      ``layers`` names weights or their nodes; tensors below ``min_elements`` are left dense;
    - ``sparsity=0`` without a pattern changes nothing;
    - ``pattern="2:4"`` needs the input-channel dimension a multiple of 4 and readers that agree on
      it; other weights are skipped with the reason;
    - the sparse form (see the module docstring) is written only where its bytes are fewer than
      the dense tensor's; else the masked weight stays dense, and ``details`` says which;
    - ``per_layer`` (weight or node name -> sparsity; ``onnxopt.sensitivity`` chooses it by measured
      sensitivity): only those weights, each at its own sparsity (0: left alone); ``scope`` is then
      per layer and ``pattern`` does not apply.
    """

    name = "sparsify"
    LEVEL_FIELD = "sparsity"
    LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)

    @property
    def lossy(self) -> bool:
        """Zeroing weights changes outputs, unless nothing is zeroed."""
        if self.per_layer is not None:
            return not isinstance(self.per_layer, dict) or any(v > 0 for v in self.per_layer.values())
        return not (self.sparsity == 0.0 and self.pattern is None)

    def __init__(
        self,
        sparsity: float = 0.5,
        scope: str = "layer",
        pattern: str | None = None,
        layers: list[str] | None = None,
        min_elements: int = 64,
        per_layer: dict[str, float] | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if pattern is not None and pattern not in _PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(_PATTERNS)} or None, got {pattern!r}")
        self.sparsity = sparsity
        self.scope = scope
        self.pattern = pattern
        if isinstance(per_layer, dict):
            bad = {k: v for k, v in per_layer.items() if not 0.0 <= v < 1.0}
            if bad:
                raise ValueError(f"per_layer sparsity must be in [0, 1), got {bad}")
            if pattern is not None:
                raise ValueError("per_layer sparsity and an N:M pattern do not combine")
        self.layers = set(layers) if layers is not None else None
        self.min_elements = min_elements
        self.per_layer = dict(per_layer) if isinstance(per_layer, dict) else per_layer

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_levels()
        self.details = {"layers": {}, "skipped": {}}
        if not self.lossy:
            self.summary = "sparsity 0: nothing pruned"
            return ir.passes.PassResult(model, modified=False)
        weights, skipped = find_weights(model, self.layers, self.min_elements)
        if self.per_layer is not None:  # only the layers it names, and not those at 0
            weights = [w for w in weights if self._sparsity(w) > 0]
        skipped.update({w.name: "kept for the accuracy budget" for w in weights if w.name in self.exclude})
        weights = [w for w in weights if w.name not in self.exclude]
        self.details["skipped"] = skipped
        weights = [w for w in weights if not w.sparse_values]  # already sparse
        self._compact = opset_of(model) >= COMPACT_OPSET
        masks = self._masks(weights)
        names = {}
        sparse = dense = before = after = 0
        for weight, mask in masks:
            graph = weight.graph
            scope = names.setdefault(id(graph), NameScope(graph))
            record = self._apply(weight, mask, scope)
            self.details["layers"][weight.name] = record
            before += record["bytes_before"]
            after += record["bytes_after"]
            sparse += record["form"] == "sparse"
            dense += record["form"] == "dense"
        self.summary = (
            f"pruned {len(masks)} weights ({self._setting()}); "
            f"{sparse} stored sparse, {dense} dense; weights {before:,} -> {after:,} bytes"
        )
        return ir.passes.PassResult(model, modified=bool(masks))

    def _masks(self, weights: list[Weight]) -> list[tuple[Weight, np.ndarray]]:
        out = []
        if self.pattern is not None:
            n, m = _PATTERNS[self.pattern]
            for w in weights:
                axis = input_axis(w)
                if axis is None or w.array.shape[axis] % m:
                    reason = "readers disagree on the input axis" if axis is None else (
                        f"input dimension {w.array.shape[axis]} is not a multiple of {m}")
                    self.details["skipped"][w.name] = reason
                    logger.warning("sparsify: %s left dense: %s", w.name, reason)
                    continue
                out.append((w, _nm_mask(w.array, axis, n, m)))
            return out
        if self.scope == "layer" or self.per_layer is not None:
            for w in weights:
                count = int(round(self._sparsity(w) * w.array.size))
                out.append((w, _smallest_mask(np.abs(w.array), count)))
            return out
        if not weights:
            return out
        flat = np.concatenate([np.abs(w.array.astype(np.float64)).reshape(-1) for w in weights])
        keep = _smallest_mask(flat, int(round(self.sparsity * flat.size)))
        start = 0
        for w in weights:
            out.append((w, keep[start:start + w.array.size].reshape(w.array.shape)))
            start += w.array.size
        return out

    def _sparsity(self, weight: Weight) -> float:
        level, named = self._level(weight.name, *(n.name for n in weight.readers if n.name), default=self.sparsity)
        return level if named else 0.0

    def _setting(self) -> str:
        if self.per_layer is not None:
            levels = sorted(set(self.per_layer.values()) - {0})
            return f"per layer: {', '.join(f'{v:.0%}' for v in levels)}"
        return self.pattern or f"{self.sparsity:.0%} {self.scope}"

    def _apply(self, weight: Weight, mask: np.ndarray, names: NameScope) -> dict:
        w = weight.array
        masked = np.where(mask, w, np.zeros((), dtype=w.dtype)).astype(w.dtype)
        nnz = int(np.count_nonzero(masked))
        dense_bytes = int(w.nbytes)
        flat = masked.reshape(-1)
        positions = np.flatnonzero(flat)
        forms = {"indices": sparse_bytes(nnz, w.size, w.ndim, w.dtype.itemsize)}
        if self._compact:
            gaps, stored = relative_gaps(positions, flat[positions])
            forms["gaps"] = gaps_bytes(gaps.size, w.ndim, w.dtype.itemsize)
        form = min(forms, key=lambda f: (forms[f], f != "gaps"))
        packed = forms[form]
        graph = weight.graph
        base = weight.name or "weight"
        record = {
            "shape": list(w.shape), "density": nnz / w.size, "pattern": self.pattern,
            "bytes_before": dense_bytes,
        }
        if packed >= dense_bytes:
            new = add_initializer(graph, names, f"{base}_pruned", masked)
            record.update(form="dense", bytes_after=dense_bytes)
            logger.info("sparsify: %s density %.3f: sparse form (%d B) not smaller, kept dense", base, nnz / w.size, packed)
        else:
            nodes = []
            if form == "gaps":
                values = add_initializer(graph, names, f"{base}_values", stored)
                nodes, indices = gaps_decoder(graph, names, base, gaps)
                record["fillers"] = int(gaps.size - nnz)
            else:
                index_dtype = np.uint16 if w.size <= 65536 else np.int32
                values = add_initializer(graph, names, f"{base}_values", flat[positions])
                indices = add_initializer(graph, names, f"{base}_indices", positions.astype(index_dtype))
                if index_dtype != np.int32:
                    cast = ir.node("Cast", [indices], attributes={"to": ir.DataType.INT64}, name=names.fresh(f"{base}_indices_cast"))
                    cast.outputs[0].name = names.fresh(f"{base}_indices_i64")
                    nodes.append(cast)
                    indices = cast.outputs[0]
            numel = add_initializer(graph, names, f"{base}_numel", np.array([w.size], dtype=np.int64))
            shape = add_initializer(graph, names, f"{base}_shape", np.array(w.shape, dtype=np.int64))
            zero = ir.tensor(np.zeros(1, dtype=w.dtype))
            zeros = ir.node("ConstantOfShape", [numel], attributes={"value": zero}, name=names.fresh(f"{base}_zeros"))
            zeros.outputs[0].name = names.fresh(f"{base}_zeros")
            scatter = ir.node("ScatterElements", [zeros.outputs[0], indices, values], attributes={"axis": 0},
                              name=names.fresh(f"{base}_scatter"))
            scatter.outputs[0].name = names.fresh(f"{base}_flat")
            reshape = ir.node("Reshape", [scatter.outputs[0], shape], name=names.fresh(f"{base}_dense"))
            new = reshape.outputs[0]
            new.name = names.fresh(f"{base}_sparse")
            nodes += [zeros, scatter, reshape]
            insert_front(graph, nodes)
            record.update(form="sparse", index_form=form, bytes_after=packed)
            logger.info("sparsify: %s density %.3f stored sparse (%s): %d -> %d B", base, nnz / w.size, form, dense_bytes, packed)
        new.dtype = weight.value.dtype
        new.shape = ir.Shape(w.shape)
        ir.convenience.replace_all_uses_with(weight.value, new)
        graph.initializers.pop(weight.value.name)
        return record

"""Weight sharing: each weight becomes a small codebook and one uint8 code per weight.

``bits`` = b gives 2^b shared values per tensor (or per output channel), found by 1-D k-means
(Lloyd's algorithm; initialization ``linear`` between min and max, ``density`` at evenly spaced
quantiles, or ``kmeans++`` from a fixed seed, as compared in Deep Compression, Han et al. 2016).
A tensor (channel) with at most 2^b distinct values keeps them exactly: clustering is lossless there.
Otherwise b = 1 gives binary weights, sign(W)·α per output channel with α = mean|W| of the channel
(XNOR-Net), and b = 2 ternary weights {-α, 0, +α}: zero where |W| <= Δ = 0.7·mean|W|, α the mean
|W| of the rest (Ternary Weight Networks).

In the graph (onnxruntime folds the decoder at session creation: the dense weight is what runs)::

    per tensor:   W = Gather(codebook[K], Cast<int64>(codes))
    per channel:  W = Gather(codebook[C*K], Cast<int64>(codes) + offsets)   offsets = c*K along the channel axis

Codes are packed where the codebook (a channel's) has at most 16 entries and the opset is 11+: 8, 4
or 2 codes a byte for 2, 4 or 16 entries (3 bits take 4), unpacked in the graph by ``BitShift``
(``_weights.codes_decoder``; BitwiseAnd would need opset 18), so the raw file holds b/8 of a byte a
weight (b = 1, 2, 4; 3 -> 4) where it held a byte, where that saves more than the unpacking nodes
take (``_weights.decoder_bytes``: their output names, written twice). Otherwise (b >= 5, opset < 11) one uint8 code a
byte; a general compressor or the Huffman figure of ``onnxopt.compressed_size`` counts the entropy.

The stored values of a sparse weight (``sparsify``) are clustered per tensor. Its filler entries
(value 0, see ``passes/sparsify.py``) must stay exactly 0: where there are any, the non-zeros get
2^b - 1 centroids (b = 1, 2: binary / ternary ones) and 0 is a codebook entry of its own.
"""

from __future__ import annotations

__all__ = ["ClusterWeights", "kmeans_1d"]

import logging

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import LossyLayers, NameScope, OnnxoptPass
from onnxopt.passes._weights import (COMPACT_OPSET, Weight, add_initializer, codes_decoder, decoder_bytes, find_weights,
                                     insert_front, opset_of, output_axis, packed_bits)

logger = logging.getLogger(__name__)

_INITS = ("kmeans++", "linear", "density")
_KMEANSPP_SAMPLE = 65536  # k-means++ seeds from at most this many weights


def _init_centroids(x: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    if init == "linear":
        return np.linspace(x.min(), x.max(), k)
    if init == "density":
        return np.quantile(x, (np.arange(k) + 0.5) / k)
    sample = x if x.size <= _KMEANSPP_SAMPLE else rng.choice(x, _KMEANSPP_SAMPLE, replace=False)
    centroids = [sample[rng.integers(sample.size)]]
    dist = (sample - centroids[0]) ** 2
    for _ in range(1, k):
        total = dist.sum()
        pick = rng.integers(sample.size) if total <= 0 else rng.choice(sample.size, p=dist / total)
        centroids.append(sample[pick])
        dist = np.minimum(dist, (sample - sample[pick]) ** 2)
    return np.sort(np.array(centroids))


def kmeans_1d(
    x: np.ndarray, k: int, init: str = "kmeans++", seed: int = 0, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, labels)`` of ``x`` (any shape) in at most ``k`` clusters; centroids sorted, in x's dtype.

    Where ``x`` has at most ``k`` distinct values, they are the centroids (exact).
    """
    flat = x.reshape(-1)
    distinct = np.unique(flat)
    if distinct.size <= k:
        return distinct, np.searchsorted(distinct, flat).reshape(x.shape)
    data = flat.astype(np.float64)
    centroids = np.unique(_init_centroids(data, k, init, np.random.default_rng(seed)))
    for _ in range(iterations):
        labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, data)
        counts = np.bincount(labels, minlength=centroids.size)
        sums = np.bincount(labels, weights=data, minlength=centroids.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new = np.unique(new)
        if new.size == centroids.size and np.allclose(new, centroids, rtol=0, atol=1e-12):
            centroids = new
            break
        centroids = new
    centroids = centroids.astype(x.dtype)
    mid = (centroids[1:].astype(np.float64) + centroids[:-1]) / 2
    return centroids, np.searchsorted(mid, data).reshape(x.shape)


def _binary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.abs(w.astype(np.float64)).mean()
    return np.array([-alpha, alpha], dtype=w.dtype), (w >= 0).astype(np.int64)


def _ternary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(w.astype(np.float64))
    delta = 0.7 * a.mean()
    big = a > delta
    alpha = a[big].mean() if big.any() else 0.0
    labels = np.where(w > delta, 2, np.where(w < -delta, 0, 1))
    return np.array([-alpha, 0.0, alpha], dtype=w.dtype), labels


class ClusterWeights(LossyLayers, OnnxoptPass):
    """Replace weights by a codebook of 2^bits values and uint8 codes, decoded by a Gather.

    Rules:
    - weights are those of ``_weights.find_weights`` (every reader a Conv/Gemm/MatMul weight slot,
      or the values of a sparse weight); ``layers`` names weights or their nodes; tensors below
      ``min_elements`` are left alone;
    - ``per_channel`` (and always for bits 1 and 2) needs the readers to agree on the output-channel
      axis; where they do not (or for sparse values) one codebook serves the tensor;
    - at most 2^bits distinct values (per channel where per channel): reproduced exactly;
    - deterministic: k-means++ draws from ``seed``;
    - ``per_layer`` (weight or node name -> bits; ``onnxopt.sensitivity`` chooses it by measured
      sensitivity): only those weights, each at its own bits.
    """

    name = "cluster"
    LEVEL_FIELD = "bits"
    LEVELS = (8, 6, 5, 4, 3, 2, 1)

    @property
    def lossy(self) -> bool:
        """Fewer centroids than a weight has values change it (8 bits keep 256 values exactly)."""
        return True

    def __init__(
        self,
        bits: int = 4,
        per_channel: bool = False,
        init: str = "kmeans++",
        layers: list[str] | None = None,
        min_elements: int = 64,
        seed: int = 0,
        per_layer: dict[str, int] | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be 1..8, got {bits}")
        if isinstance(per_layer, dict) and not all(isinstance(b, int) and 1 <= b <= 8 for b in per_layer.values()):
            raise ValueError(f"per_layer bits must be 1..8, got {per_layer}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.bits = bits
        self.per_channel = per_channel
        self.init = init
        self.layers = set(layers) if layers is not None else None
        self.min_elements = min_elements
        self.seed = seed
        self.per_layer = dict(per_layer) if isinstance(per_layer, dict) else per_layer

    def _bits(self, weight: Weight) -> int | None:
        """The weight's bits (None: ``per_layer`` leaves it alone)."""
        bits, named = self._level(weight.name, *(n.name for n in weight.readers if n.name), default=self.bits)
        return int(bits) if named else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_levels()
        weights, skipped = find_weights(model, self.layers, self.min_elements)
        weights = [w for w in weights if self._bits(w) is not None]
        skipped.update({w.name: "kept for the accuracy budget" for w in weights if w.name in self.exclude})
        weights = [w for w in weights if w.name not in self.exclude]
        self.details = {"bits": self.bits, "layers": {}, "skipped": skipped}
        self._compact = opset_of(model) >= COMPACT_OPSET
        scopes: dict[int, NameScope] = {}
        before = after = 0
        for weight in weights:
            names = scopes.setdefault(id(weight.graph), NameScope(weight.graph))
            record = self._apply(weight, names, self._bits(weight))
            self.details["layers"][weight.name] = record
            before += record["bytes_before"]
            after += record["bytes_after"]
        values = (f"{2 ** self.bits} values" if self.per_layer is None else
                  f"per layer {'/'.join(str(b) for b in sorted({self._bits(w) for w in weights}, reverse=True))} bits")
        self.summary = (
            f"clustered {len(weights)} weights to {values}"
            f"{' per channel' if self.per_channel else ''}; weights {before:,} -> {after:,} bytes"
        )
        return ir.passes.PassResult(model, modified=bool(weights))

    def _encode_with_zero(self, w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, str]:
        """A codebook for sparse values with fillers: the non-zeros' centroids and an exact 0."""
        nonzero = w != 0
        if np.unique(w).size <= 2 ** bits:
            return self._encode(w, bits)
        k = max(1, 2 ** bits - 1) if bits > 2 else None
        centroids, labels, mode = self._encode(w[nonzero], bits, k)
        book = np.unique(np.concatenate([centroids, np.zeros(1, dtype=w.dtype)]))
        codes = np.zeros(w.shape, dtype=np.int64)
        codes[nonzero] = np.searchsorted(book, centroids)[labels]
        codes[~nonzero] = np.searchsorted(book, np.zeros((), dtype=w.dtype))
        return book, codes, mode + " + zero"

    def _encode(self, w: np.ndarray, bits: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """One codebook for ``w``: ``(centroids, labels, mode)``; ``k`` centroids (default 2^bits)."""
        k = 2 ** bits if k is None else k
        if np.unique(w).size <= k:
            centroids, labels = kmeans_1d(w, k)
            return centroids, labels, "exact"
        if bits == 1:
            return (*_binary(w), "binary")
        if bits == 2:
            return (*_ternary(w), "ternary")
        return (*kmeans_1d(w, k, self.init, self.seed), "kmeans")

    def _apply(self, weight: Weight, names: NameScope, bits: int) -> dict:
        w = weight.array
        axis = output_axis(weight) if (self.per_channel or bits <= 2) else None
        if axis is not None and np.unique(w).size <= 2 ** bits:
            axis = None  # the whole tensor fits one exact codebook
        if axis is None and weight.sparse_values and not w.all():
            centroids, labels, mode = self._encode_with_zero(w, bits)
            codebook = centroids
            codes = labels
        elif axis is None:
            centroids, labels, mode = self._encode(w, bits)
            codebook = centroids
            codes = labels
        else:
            channels = np.moveaxis(w, axis, 0)
            books, code_list, modes = [], [], set()
            for channel in channels:
                c, lab, mode = self._encode(channel, bits)
                books.append(c)
                code_list.append(lab)
                modes.add(mode)
            k = max(b.size for b in books)
            codebook = np.stack([np.concatenate([b, np.full(k - b.size, b[-1], dtype=w.dtype)]) for b in books])
            codes = np.moveaxis(np.stack(code_list), 0, axis)
            mode = "/".join(sorted(modes))
        code_bits = packed_bits(codebook.shape[-1]) if self._compact else 8
        if code_bits < 8 and codes.size - -(-codes.size * code_bits // 8) <= decoder_bytes(weight.name, 2 * (8 // code_bits)):
            code_bits = 8  # the unpacking nodes would take more of the file than packing saves
        decoded = self._insert(weight, codebook, codes.astype(np.uint8), axis, names, code_bits)
        approx = codebook.reshape(-1)[codes if axis is None else codes + self._offsets(codebook, axis, w.ndim)]
        err = approx.astype(np.float64) - w
        norm = float(np.linalg.norm(w.astype(np.float64)))
        record = {
            "shape": list(w.shape), "mode": mode, "clusters": int(codebook.shape[-1]),
            "per_channel": axis is not None, "bits": bits,
            "bytes_before": int(w.nbytes),
            "code_bits": code_bits,
            "bytes_after": int(-(-codes.size * code_bits // 8) + codebook.nbytes + (8 * codebook.shape[0] if axis is not None else 0)),
            "max_abs_error": float(np.abs(err).max()),
            "relative_error": float(np.linalg.norm(err) / norm) if norm else 0.0,
        }
        logger.info("cluster: %s %s, %d clusters, rel. error %.3g", weight.name, mode, record["clusters"], record["relative_error"])
        ir.convenience.replace_all_uses_with(weight.value, decoded)
        weight.graph.initializers.pop(weight.value.name)
        return record

    @staticmethod
    def _offsets(codebook: np.ndarray, axis: int, ndim: int) -> np.ndarray:
        shape = [1] * ndim
        shape[axis] = codebook.shape[0]
        return (np.arange(codebook.shape[0], dtype=np.int64) * codebook.shape[1]).reshape(shape)

    def _insert(self, weight: Weight, codebook: np.ndarray, codes: np.ndarray, axis: int | None, names: NameScope,
                bits: int) -> ir.Value:
        graph = weight.graph
        base = weight.name or "weight"
        book = add_initializer(graph, names, f"{base}_codebook", np.ascontiguousarray(codebook.reshape(-1)))
        nodes, index = codes_decoder(graph, names, base, codes, bits)
        if axis is not None:
            offsets = add_initializer(graph, names, f"{base}_code_offsets", self._offsets(codebook, axis, codes.ndim))
            add = ir.node("Add", [index, offsets], name=names.fresh(f"{base}_codes_offset"))
            add.outputs[0].name = names.fresh(f"{base}_codes_flat")
            nodes.append(add)
            index = add.outputs[0]
        gather = ir.node("Gather", [book, index], attributes={"axis": 0}, name=names.fresh(f"{base}_decode"))
        out = gather.outputs[0]
        out.name = names.fresh(f"{base}_clustered")
        out.dtype = weight.value.dtype
        out.shape = ir.Shape(codes.shape)
        nodes.append(gather)
        insert_front(graph, nodes)
        return out

"""Cluster-aware training: a clustered weight trained as a latent float weight snapped to its centroids.

``cluster`` stores a weight as a codebook and codes, ``W = Gather(codebook, index)`` with ``index`` the
codes (``Cast``, or the ``BitShift`` unpacking of packed codes, ``passes/_weights.codes_decoder``)
plus, per output channel, offsets ``c*K``. Training only the codebook with the codes held moves
2^b values per tensor (channel): two for a binary channel, which cannot recover much (the digits CNN
at 1 bit: 92% after 60 epochs). Here, as in quantization-aware training, each clustered weight gets
a latent float tensor of the weight's shape, initialised to its decoded value, and the forward pass
maps every latent element to a centroid of its channel; a straight-through estimator passes the
weight's gradient to the latent unchanged, so codes change where the latent crosses a boundary:

    k-means (any b):  q = centroid nearest to the latent (its channel's codebook), and the
                      centroids trained by the summed gradient of their members (Deep Compression)
    binary (2 centroids -α, +α per channel, as the pass writes b = 1):  q = sign(latent)·α with
                      α = mean|latent| of the channel (XNOR-Net), so α follows the latents
    weight = q + latent - stop_gradient(latent)

A centroid that is exactly 0 (a sparse weight's filler entries, a pruned weight's zeros) stays 0,
and its members stay on it; no other element moves to it: the sparsity mask holds.

``write_codes`` stores the trained codes and codebook back into the *same* initializers (packed codes
re-packed with ``pack_codes``): the same names, shapes and dtypes, no node added or rewired, so the
file is as small as the pass left it. A decoder whose stored codes this module cannot re-encode
exactly is not recognized, and its codebook alone trains, as before.
"""

from __future__ import annotations

__all__ = ["ClusteredWeight", "find_clustered", "write_codes"]

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from onnxopt.passes._weights import pack_codes

_DECODER_OPS = {"Cast", "BitShift", "Concat", "Slice", "Reshape", "Add"}


@dataclass
class ClusteredWeight:
    """One clustered weight as the student trains it.

    ``gather``: the decoding node (its output is the weight); ``codebook``/``codes``: the initializer
    names; ``bits``: 8 (a byte a code) or 1, 2, 4 (packed); ``axis``: the output-channel axis of a
    per-channel codebook (None: one codebook); ``channels`` x ``k``: the codebook's layout;
    ``decoder``: the names of the values the decoder computes from the codes (index included)."""

    gather: ir.Node
    codebook: str
    codes: str
    bits: int
    offsets: str | None
    decoder: list[ir.Node]
    axis: int | None = None
    channels: int = 1
    k: int = 0
    shape: tuple = ()
    xnor: bool = False
    latent_key: str = ""
    zero_key: str = ""  # buffer: True for codebook entries held at exactly 0, [channels, k]
    held_key: str = ""  # buffer: True for weight elements on a held 0, channels first [channels, n]


def _single_use(value: ir.Value, node: ir.Node) -> bool:
    return all(use.node is node for use in value.uses())


def find_clustered(graph: ir.Graph) -> list[ClusteredWeight]:
    """The ``Gather(codebook, decoder(codes))`` weights of ``graph`` that ``cluster`` wrote (structure
    only; ``Student`` checks the codes re-encode exactly before it trains them as latents)."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        book, index = node.inputs
        if (book is None or index is None or book.const_value is None or book.name not in graph.initializers
                or book.is_graph_input() or book.is_graph_output() or not _single_use(book, node)):
            continue
        if book.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        parsed = _decoder(index, node, graph)
        if parsed is not None:
            codes, bits, offsets, chain = parsed
            found.append(ClusteredWeight(node, book.name, codes, bits, offsets, chain))
    return found


def _decoder(index: ir.Value, gather: ir.Node, graph: ir.Graph):
    """``(codes name, bits, offsets name | None, decoder nodes in graph order)`` of a cluster decoder, or None."""
    chain: list[ir.Node] = []
    codes = offsets = None
    bits = 8
    stack = [index]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type not in _DECODER_OPS or producer.domain not in ("", "ai.onnx"):
            return None
        if any(use.node is not gather and use.node not in chain and use.node.op_type not in _DECODER_OPS
               for use in value.uses()):
            return None  # the decoded codes are read by something else too
        chain.append(producer)
        for slot, source in enumerate(producer.inputs):
            if source is None:
                continue
            if source.const_value is None or source.name not in graph.initializers:
                stack.append(source)
                continue
            kind = producer.op_type
            if kind in ("Cast", "BitShift") and slot == 0 and source.const_value.dtype == ir.DataType.UINT8:
                if codes not in (None, source.name):
                    return None
                codes = source.name
            elif kind == "BitShift" and slot == 1 and producer.attributes.get_string("direction") == "RIGHT":
                bits = 8 - int(source.const_value.numpy().reshape(-1)[0])
            elif kind == "Add" and source.const_value.dtype == ir.DataType.INT64:
                if offsets not in (None, source.name):
                    return None
                offsets = source.name
    if codes is None or bits not in (1, 2, 4, 8):
        return None
    order = {id(n): i for i, n in enumerate(graph)}
    return codes, bits, offsets, sorted(set(chain), key=lambda n: order[id(n)])


def encode(local: np.ndarray, bits: int, shape: tuple) -> np.ndarray:
    """Channel-local codes as the codes initializer stores them (``shape``: its shape)."""
    if bits == 8:
        return np.ascontiguousarray(local, dtype=np.uint8).reshape(shape)
    return pack_codes(local, bits).reshape(shape)


def layout(cw: ClusteredWeight, index: np.ndarray, offsets: np.ndarray | None, book: np.ndarray,
           stored: np.ndarray) -> np.ndarray | None:
    """Fill in ``cw``'s axis and codebook layout from the decoded ``index``; returns the channel-local
    codes, or None where they do not re-encode to ``stored`` exactly (then ``cw`` is not trained as latents)."""
    cw.shape = tuple(index.shape)
    if offsets is None:
        cw.axis, cw.channels, cw.k, local = None, 1, book.size, index
    else:
        axes = [d for d, n in enumerate(offsets.shape) if n != 1]
        if offsets.ndim != index.ndim or len(axes) > 1:
            return None
        cw.axis = axes[0] if axes else 0
        cw.channels = offsets.shape[cw.axis] if axes else 1
        if book.size % cw.channels:
            return None
        cw.k = book.size // cw.channels
        if not np.array_equal(offsets.reshape(-1), np.arange(cw.channels) * cw.k):
            return None
        local = index - offsets
    if local.min(initial=0) < 0 or local.max(initial=0) >= cw.k or cw.k > 256:
        return None
    if cw.bits < 8 and cw.k > 2 ** cw.bits:
        return None
    if encode(local, cw.bits, stored.shape).tobytes() != stored.tobytes():
        return None
    rows = book.reshape(cw.channels, cw.k)
    cw.xnor = cw.k == 2 and bool(np.all(rows[:, 1] > 0)) and np.array_equal(rows[:, 0], -rows[:, 1])
    return local


def channels_first(t: torch.Tensor, cw: ClusteredWeight) -> torch.Tensor:
    """``t`` (the weight's shape) as [channels, elements of a channel]."""
    if cw.axis is None:
        return t.reshape(1, -1)
    return t.movedim(cw.axis, 0).reshape(cw.channels, -1)


def from_channels_first(t: torch.Tensor, cw: ClusteredWeight) -> torch.Tensor:
    if cw.axis is None:
        return t.reshape(cw.shape)
    moved = [cw.shape[cw.axis]] + [n for d, n in enumerate(cw.shape) if d != cw.axis]
    return t.reshape(moved).movedim(0, cw.axis)


def assign(cw: ClusteredWeight, latent: torch.Tensor, book: torch.Tensor, zero: torch.Tensor,
           held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, values)`` [channels, n]: each latent's centroid (channel-local slot) and its value,
    differentiable in the centroids (XNOR: in α); elements on a held 0 keep their slot and value 0."""
    lat = channels_first(latent, cw)
    if cw.xnor:
        alpha = lat.abs().mean(dim=1, keepdim=True)
        positive = (lat >= 0).detach()
        return positive.to(torch.int64), torch.where(positive, alpha, -alpha)
    rows = book.reshape(cw.channels, cw.k)
    key = torch.where(zero, torch.full_like(rows, float("inf")), rows).detach()
    ordered, order = torch.sort(key, dim=1, stable=True)
    mids = (ordered[:, 1:] + ordered[:, :-1]) / 2
    slots = order.gather(1, torch.searchsorted(mids.contiguous(), lat.detach().contiguous()))
    if held.any():
        first_zero = zero.to(torch.int64).argmax(dim=1, keepdim=True).expand_as(slots)
        slots = torch.where(held, first_zero, slots)
    values = torch.where(zero, torch.zeros_like(rows), rows).gather(1, slots)
    return slots, values


def quantized(cw: ClusteredWeight, latent: torch.Tensor, book: torch.Tensor, zero: torch.Tensor,
              held: torch.Tensor) -> torch.Tensor:
    """The weight the graph would decode from the latent's codes, with straight-through gradients."""
    _, values = assign(cw, latent, book, zero, held)
    lat = channels_first(latent, cw)
    out = values + (lat - lat.detach())
    if held.any():
        out = torch.where(held, torch.zeros_like(out), out)
    return from_channels_first(out, cw)


def write_codes(graph: ir.Graph, cw: ClusteredWeight, latent: torch.Tensor, book: torch.Tensor,
                zero: torch.Tensor, held: torch.Tensor) -> None:
    """Store ``cw``'s trained codes and codebook into its two initializers (same names, shapes, dtypes)."""
    with torch.no_grad():
        slots, values = assign(cw, latent, book, zero, held)
        if cw.xnor:
            alpha = channels_first(latent, cw).abs().mean(dim=1)
            rows = torch.stack([-alpha, alpha], dim=1)
        else:
            rows = torch.where(zero, torch.zeros_like(book.reshape(cw.channels, cw.k)), book.reshape(cw.channels, cw.k))
    local = from_channels_first(slots, cw).cpu().numpy()
    for name, array in ((cw.codes, None), (cw.codebook, rows.cpu().numpy().reshape(-1))):
        value = graph.initializers[name]
        old = value.const_value
        if array is None:
            array = encode(local, cw.bits, tuple(old.shape.numpy()))
        array = np.ascontiguousarray(array.astype(old.dtype.numpy()).reshape(old.shape.numpy()))
        value.const_value = ir.tensor(array, dtype=old.dtype, name=name)

"""Weight-only int4: block-wise 4-bit weights in com.microsoft MatMulNBits and GatherBlockQuantized,
with 8-bit blocks for the nodes that need them.

A MatMul weight ``W`` (K x N) is cut along K into blocks of ``block_size`` rows per column; each block
``b`` of column ``n`` keeps a float scale ``s`` and a zero point ``z`` and 4-bit codes ``q`` in [0, 15]::

    W[k, n] ~= (q[n, b, k mod B] - z[n, b]) * s[n, b]

- RTN symmetric (onnxruntime's layout, byte for byte): ``s = m / -8`` where ``m`` is the block's value
  of largest magnitude (sign kept), ``z = 8``, ``q = clip(floor(w / s + 8 + 1/2), 0, 15)``: the error
  is at most ``|s| / 2`` per weight, except on the side opposite the extreme, where codes reach only
  ``7|s|``: a value past ``7.5|s|`` there is clipped (error ``|w| - 7|s| <= |s|``).
- RTN asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``s = (hi - lo) / 15``,
  ``z = clip(floor(-lo / s + 1/2), 0, 15)`` stored packed as uint8; error at most ``s / 2``.
- HQQ (half-quadratic, no data): the zero point is a float, refined from the block's min/max (and,
  as a second start, from RTN asymmetric's) by
  alternating ``We = shrink_p(W - dequant(q))`` (the generalized soft threshold of an l_p, p < 1,
  norm: the outliers' error is allowed to stay) and ``z = mean(q - (W - We) / s)`` per block,
  ``beta`` growing by ``kappa`` each step; each block keeps the iterate with the smallest squared
  error (the starts included), so HQQ never does worse than RTN asymmetric in that measure.
- GPTQ (``calibration_gram`` gives ``H = X^T X`` per weight name): rows of W (input features) are
  rounded in order; each rounding error, divided by the Cholesky factor of ``H^-1``'s diagonal, is
  pushed onto the rows not yet rounded, so that ``||X W - X W_q||`` (not ``||W - W_q||``) is small.
  A block's scale is set when the block starts, from the rows as they are then.

Layout (what onnxruntime's MatMulNBitsQuantizer writes): ``B`` uint8 ``[N, n_blocks, B/2]``, element
``2i`` of a block in the low nibble of byte ``i``; rows past K pad with code 0; scales ``[N, n_blocks]``;
zero points uint8 ``[N, ceil(n_blocks/2)]`` (two blocks a byte, low nibble first, a missing last block
as 8) or float ``[N * n_blocks]`` (HQQ). Embedding tables (Gather of a constant 2-D table on axis 0)
become GatherBlockQuantized on int4 (symmetric, ``q - 0``) or uint4 codes, blocks along the hidden axis.

8 bits (``wide``): the same arithmetic with codes in [0, 255] and zero point 128 (symmetric: ``s = m / -128``;
HQQ's 8-bit blocks are RTN asymmetric: onnxruntime's CPU kernel takes no float zero points at 8 bits);
MatMulNBits ``bits = 8`` holds one code a byte, ``B`` ``[N, n_blocks, B]``, uint8 zero points ``[N, n_blocks]``
(byte for byte onnxruntime's ``quantize_matmul_8bits``); GatherBlockQuantized ``bits = 8`` reads uint8 codes
(no zero points: 128). A weight at 8 bits costs ``1 + 4/B`` bytes (4-bit: ``1/2 + 4/B``; float: 4), so the
accuracy budget's way back (``excluding``) steps a layer to 8 bits before float: its error drops ~16x
for a tenth of what float would cost in the file.
"""

from __future__ import annotations

__all__ = ["QuantizeWeightsInt4", "rtn_blocks", "hqq_blocks", "gptq_blocks", "pack_nibbles", "dequantize_blocks"]

import copy
import hashlib
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import LossyNodes, NameScope, OnnxoptPass, constant_array, drop_if_unused
from onnxopt.passes.quantize import _matches, already_quantized, node_label

logger = logging.getLogger(__name__)

_METHODS = ("rtn", "hqq", "gptq")
_SUPPORTED = ("MatMul", "Gemm")
_MS = "com.microsoft"
_FALLBACKS = ("int8", "float")  # where ``excluding`` sends a 4-bit unit
# The rounded weights kept for the fallback's reruns, at most (codes, scales, zero points): an LLM's
# would not fit, and there the reruns round again.
_MEMO_BYTES = 256 * 2**20


# ---------------------------------------------------------------------- the arithmetic
def _half_up(x: np.ndarray) -> np.ndarray:
    """Round half up, as onnxruntime's MLAS quantizer does (0.5 -> 1, -0.5 -> 0)."""
    return np.floor(x + np.float32(0.5))


def _levels(bits: int) -> tuple[int, int]:
    """(largest code, middle code) of ``bits``-bit codes: (15, 8) at 4 bits, (255, 128) at 8."""
    return 2**bits - 1, 2 ** (bits - 1)


def _params(blocks: np.ndarray, symmetric: bool, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """RTN (scale, zero point) per block of ``blocks`` [..., B], float32, for ``bits``-bit codes."""
    top, mid = _levels(bits)
    blocks = blocks.astype(np.float32)
    if symmetric:
        hi, lo = blocks.max(-1), blocks.min(-1)
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = (extreme / np.float32(-mid)).astype(np.float32)
        return scale, np.full(scale.shape, mid, np.float32)
    lo = np.minimum(blocks.min(-1), 0).astype(np.float32)
    hi = np.maximum(blocks.max(-1), 0).astype(np.float32)
    scale = ((hi - lo) / np.float32(top)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale == 0, mid, np.clip(_half_up(-lo / scale), 0, top)).astype(np.float32)
    return scale, zero


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int = 4) -> np.ndarray:
    """``bits``-bit codes (uint8) of ``blocks`` [..., B] for per-block ``scale`` and ``zero`` [...]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = np.where(scale == 0, 0, np.float32(1) / scale).astype(np.float32)
    x = blocks.astype(np.float32) * recip[..., None] + zero[..., None].astype(np.float32)
    return np.clip(_half_up(x), 0, _levels(bits)[0]).astype(np.uint8)


def _to_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """``w`` (K x N) as [N, n_blocks, B] (zero rows past K), and K."""
    k, n = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), np.float32)
    padded[:k] = w
    return np.ascontiguousarray(padded.T.reshape(n, n_blocks, block_size)), k


def _clear_padding(q: np.ndarray, k: int) -> np.ndarray:
    """Code 0 for the rows past K (onnxruntime leaves them 0)."""
    n, n_blocks, b = q.shape
    flat = q.reshape(n, n_blocks * b)
    flat[:, k:] = 0
    return flat.reshape(q.shape)


def rtn_blocks(w: np.ndarray, block_size: int, symmetric: bool,
               bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: (codes [N, n_blocks, B] uint8, scales [N, n_blocks], zero points [N, n_blocks] float)."""
    blocks, k = _to_blocks(w, block_size)
    scale, zero = _params(blocks, symmetric, bits)
    return _clear_padding(_codes(blocks, scale, zero, bits), k), scale, zero


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The generalized soft threshold: proximal step of ``|x|^p`` (p <= 1) with weight 1/beta."""
    a = np.abs(x)
    return np.sign(x) * np.maximum(a - (1.0 / beta) * np.power(a + 1e-8, p - 1), 0)


def hqq_blocks(w: np.ndarray, block_size: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
               kappa: float = 1.01, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ: a float zero point refined by half-quadratic splitting, from two starts (the block's own
    min/max, as the paper; RTN asymmetric's range that holds 0); per block, the iterate (starts
    included) with the smallest squared error is kept."""
    top, mid = _levels(bits)
    blocks, k = _to_blocks(w, block_size)
    real = np.ones_like(blocks, dtype=bool)
    real.reshape(blocks.shape[0], -1)[:, k:] = False
    lo = np.where(real, blocks, np.inf).min(-1)
    hi = np.where(real, blocks, -np.inf).max(-1)
    minmax = ((hi - lo) / np.float32(top)).astype(np.float32)
    starts = [(minmax, np.where(minmax == 0, mid, -lo / np.where(minmax == 0, 1, minmax)).round().astype(np.float32)),
              _params(blocks, symmetric=False, bits=bits)]
    best = None
    for scale, z in starts:
        safe = np.where(scale == 0, 1, scale).astype(np.float32)

        def error(z, scale=scale):
            q = _codes(blocks, scale, z, bits)
            return q, (np.where(real, (q - z[..., None]) * scale[..., None] - blocks, 0) ** 2).sum(-1)

        q0, err0 = error(z)
        if best is None:
            best = [q0, scale.copy(), z.copy(), err0]
        else:
            better = err0 < best[3]
            best = [np.where(better[..., None], q0, best[0]), np.where(better, scale, best[1]),
                    np.where(better, z, best[2]), np.where(better, err0, best[3])]
        b = beta
        for _ in range(iters):
            q = np.clip(np.rint(blocks / safe[..., None] + z[..., None]), 0, top)
            we = _shrink(blocks - (q - z[..., None]) * scale[..., None], b, p)
            z = np.where(scale == 0, z, ((q - (blocks - we) / safe[..., None]) * real).sum(-1) / real.sum(-1)).astype(np.float32)
            b *= kappa
            q_new, err = error(z)
            better = err < best[3]
            best = [np.where(better[..., None], q_new, best[0]), np.where(better, scale, best[1]),
                    np.where(better, z, best[2]), np.where(better, err, best[3])]
    q, scale, z, _ = best
    return _clear_padding(q.astype(np.uint8), k), scale.astype(np.float32), z.astype(np.float32)


def gptq_blocks(w: np.ndarray, gram: np.ndarray, block_size: int, symmetric: bool,
                damp: float = 0.01, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with the Hessian ``gram`` = X^T X (K x K): rounding with error compensation, block scales
    set from the compensated rows when each block starts."""
    k, n = w.shape
    work = w.astype(np.float64).copy()
    h = np.asarray(gram, np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    work[dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: the row-wise update factors
    n_blocks = -(-k // block_size)
    scale = np.zeros((n, n_blocks), np.float32)
    zero = np.zeros((n, n_blocks), np.float32)
    codes = np.zeros((n, n_blocks * block_size), np.uint8)
    for row in range(k):
        b = row // block_size
        if row % block_size == 0:
            end = min(row + block_size, k)
            block = np.zeros((n, block_size), np.float32)
            block[:, : end - row] = work[row:end].T
            scale[:, b], zero[:, b] = _params(block, symmetric, bits)
        q = _codes(work[row][:, None].astype(np.float32), scale[:, b], zero[:, b], bits)[:, 0]
        codes[:, row] = q
        deq = (q.astype(np.float64) - zero[:, b]) * scale[:, b]
        err = (work[row] - deq) / hinv[row, row]
        work[row + 1:] -= np.outer(hinv[row, row + 1:], err)
    return codes.reshape(n, n_blocks, block_size), scale, zero


def dequantize_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """The float weight (K x N) the codes stand for."""
    n, n_blocks, b = codes.shape
    w = (codes.astype(np.float32) - zero.reshape(n, n_blocks)[..., None]) * scale.reshape(n, n_blocks)[..., None]
    return w.reshape(n, n_blocks * b)[:, :k].T


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes a byte along the last axis, the first in the low nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] & 15) | ((codes[..., 1::2] & 15) << 4)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit codes as MatMulNBits stores them along the last axis: two a byte at 4 bits, one at 8."""
    return pack_nibbles(codes) if bits == 4 else codes.astype(np.uint8)


def _pack_zero_points(zero: np.ndarray, bits: int = 4) -> np.ndarray:
    """uint8 zero points [N, n_blocks] as MatMulNBits reads them: at 4 bits [N, ceil(n_blocks/2)], a
    missing last block as 8; at 8 bits [N, n_blocks], one a byte."""
    n, n_blocks = zero.shape
    if bits == 8:
        return zero.astype(np.uint8)
    z = np.full((n, n_blocks + n_blocks % 2), 8, np.uint8)
    z[:, :n_blocks] = zero.astype(np.uint8)
    return pack_nibbles(z)


# ---------------------------------------------------------------------- the pass
class QuantizeWeightsInt4(LossyNodes, OnnxoptPass):
    """Replace MatMul (and Gemm) weights by 4-bit blocks in MatMulNBits; embedding tables by GatherBlockQuantized.

    Rules:
    - a MatMul whose B is a constant 2-D float32 tensor with K >= ``block_size`` and whose A is float32;
      a Gemm (in ``op_types``, by default with MatMul: GPT-2's exports carry every projection as
      Gemm) with ``transA = 0`` and ``alpha = 1``: ``transB`` read, ``beta * C`` added after as a
      float bias;
    - ``block_size`` a power of two >= 16; ``symmetric`` (RTN, GPTQ) or not; HQQ is asymmetric with
      float zero points; GPTQ needs ``calibration_gram`` for the weight's name (else RTN, said so);
    - with ``embeddings``, a Gather on axis 0 of a constant 2-D float32 table, every reader of which
      is a Gather, whose width is a multiple of ``block_size``, becomes GatherBlockQuantized (RTN);
    - ``accuracy_level`` (0-4) is written on each MatMulNBits when given;
    - a node that ``wide`` names (op type, name, label or pattern, as ``exclude``) gets 8-bit blocks;
      ``fallback`` says where the way back (``excluding``) sends a unit: ``"int8"`` (default) to 8
      bits first, to float only when it is already at 8 bits; ``"float"`` straight to float;
    - a weight read by several nodes is quantized once; the float copy is dropped when nothing else reads it;
    - a model that is already quantized is left as it is, with that reason.
    """

    name = "quantize-int4"

    @property
    def lossy(self) -> bool:
        """4-bit weights change the outputs."""
        return True

    def __init__(
        self,
        block_size: int = 32,
        symmetric: bool = True,
        method: str = "rtn",
        accuracy_level: int | None = None,
        op_types: Iterable[str] = ("MatMul", "Gemm"),
        embeddings: bool = True,
        calibration_gram: Mapping[str, np.ndarray] | None = None,
        exclude: Iterable[str] = (),
        wide: Iterable[str] = (),
        fallback: str = "int8",
    ) -> None:
        super().__init__()
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (onnxruntime's kernels), not {block_size!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, not {method!r}")
        if fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(_FALLBACKS)}, not {fallback!r}")
        if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4 (MatMulNBits), not {accuracy_level!r}")
        op_types = tuple(op_types)
        unknown = [t for t in op_types if t not in _SUPPORTED]
        if unknown:
            raise ValueError(f"op_types: {', '.join(unknown)} not supported (only {', '.join(_SUPPORTED)})")
        self.block_size = block_size
        self.symmetric = symmetric
        self.method = method
        self.accuracy_level = accuracy_level
        self.op_types = op_types
        self.embeddings = embeddings
        self.calibration_gram = None if calibration_gram is None else dict(calibration_gram)
        self.exclude = tuple(exclude)
        self.wide = tuple(wide)
        self.fallback = fallback
        self.stepped: tuple[str, ...] = ()  # the units of ``wide`` that ``excluding`` put there
        self._memo: dict[tuple, tuple] = {}  # shared by the copies ``excluding`` makes: a weight is rounded once

    def excluding(self, units) -> QuantizeWeightsInt4:
        """The way back one step: with ``fallback = "int8"`` a unit at 4 bits goes to 8 bits (``wide``)
        and only a unit already at 8 bits to float (``exclude``); with ``"float"`` every unit goes to float."""
        units = list(units)
        if self.fallback == "float":
            return super().excluding(units)
        up = [u for u in units if self.undo_step(u) == "8 bits"]
        new = super().excluding([u for u in units if u not in up])
        new.wide = (*self.wide, *[u for u in up if u not in self.wide])
        new.stepped = (*self.stepped, *[u for u in up if u not in self.stepped])
        return new

    def final_steps(self) -> QuantizeWeightsInt4:
        """The same pass whose way back goes to float at once (``fallback="float"``; layers already at 8
        bits stay there): the budget's fallback, when 8-bit steps stopped moving its metric."""
        new = copy.copy(self)
        new.fallback = "float"
        return new

    def isolating(self, units) -> QuantizeWeightsInt4:
        """The same pass rewriting only ``units`` of its last run (each at the bits it had), every
        other one left float: the budget measures what one unit alone does to the outputs."""
        keep = set(units)
        return LossyNodes.excluding(self, [u for u in self.units if u not in keep])

    def undo_cost(self, unit: str) -> float | None:
        """Bytes the file grows by when ``excluding([unit])`` takes its next step (None: not known):
        to 8 bits, half a byte a weight; to float, 4 bytes less what it holds now."""
        size = self.details.get("sizes", {}).get(unit)
        if size is None:
            return None
        if self.undo_step(unit) == "8 bits":
            return size / 2
        held = (1 if self.details["bits"].get(unit) == 8 else 0.5) + 4 / self.block_size
        return size * (4 - held)

    def undo_step(self, unit: str) -> str:
        """What ``excluding([unit])`` makes of ``unit``: "8 bits" or "float"."""
        at_8 = self.details.get("bits", {}).get(unit) == 8 or unit in self.wide
        return "8 bits" if self.fallback == "int8" and not at_8 else "float"

    def gram_needs(self, model: ir.Model) -> dict[str, str]:
        """For GPTQ: weight name -> the activation whose X^T X (over all rows) the pass needs."""
        return {node.inputs[1].name: node.inputs[0].name for node in model.graph
                if node.op_type in self.op_types and self._matmul_refusal(node) is None}

    # ------------------------------------------------------------------ checks
    def _matmul_refusal(self, node: ir.Node) -> str | None:
        if any(_matches(p, node) for p in self.exclude):
            return "excluded"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "missing input"
        a = node.inputs[0]
        if a.dtype is not None and a.dtype != ir.DataType.FLOAT:
            return f"input A is {a.dtype.name} (only float32)"
        if a.shape is not None and len(a.shape) < 2:
            return "input A is 1-D"
        w = constant_array(node.inputs[1])
        if w is None:
            return "weight B is not a constant (both operands are activations)"
        if w.dtype != np.float32 or w.ndim != 2:
            return f"weight {w.dtype} of rank {w.ndim} (only 2-D float32)"
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
                return "Gemm with transA=1 or alpha != 1"
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and node.attributes.get_float("beta", 1.0) != 1.0 and constant_array(c) is None:
                return "Gemm with beta != 1 and a non-constant C"
        k = w.shape[1] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w.shape[0]
        if k < self.block_size:
            return f"K = {k} < block_size {self.block_size}"
        return None

    def _gather_refusal(self, node: ir.Node) -> str | None:
        if any(_matches(p, node) for p in self.exclude):
            return "excluded"
        table = node.inputs[0]
        t = constant_array(table)
        if t is None:
            return None  # not an embedding: a shape Gather, an activation
        if t.dtype != np.float32 or t.ndim != 2:
            return f"table {t.dtype} of rank {t.ndim} (only 2-D float32)"
        if node.attributes.get_int("axis", 0) != 0:
            return "Gather on axis 1"
        if t.shape[1] % self.block_size:
            return f"width {t.shape[1]} not a multiple of block_size {self.block_size}"
        if any(u.node.op_type != "Gather" or u.idx != 0 for u in table.uses()) or table.is_graph_output():
            return "the table is also read by something other than a Gather (tied weights)"
        return None

    # ------------------------------------------------------------------ rewrite
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {"method": self.method, "block_size": self.block_size, "symmetric": self.symmetric,
                        "accuracy_level": self.accuracy_level, "fallback": self.fallback, "quantized": [],
                        "embeddings": [], "left": {}, "weights": {}, "bits": {}, "wide": {}, "sizes": {}}
        marks = already_quantized(model, weight_only=True)
        if marks:
            self.summary = f"already quantized ({marks[0]}, ...): nothing done"
            self.details["left"]["model"] = self.summary
            logger.warning("quantize-int4: %s", self.summary)
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        names = NameScope(graph)
        done: dict[tuple, tuple] = {}
        tables: dict[int, tuple] = {}
        total = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            label = node_label(node)
            if node.op_type in _SUPPORTED:
                total += 1
                why = (f"op type {node.op_type} not in op_types" if node.op_type not in self.op_types
                       else self._matmul_refusal(node))
                if why is not None:
                    self.details["left"][label] = why
                    quiet = why == "excluded" or why.startswith(("weight B is not", "op type"))
                    (logger.info if quiet else logger.warning)("quantize-int4: %s stays float: %s", label, why)
                    continue
                self._rewrite_matmul(graph, node, label, names, done, self._bits(node, label))
                self.details["quantized"].append(label)
            elif node.op_type == "Gather" and self.embeddings:
                why = self._gather_refusal(node)
                if why is None and constant_array(node.inputs[0]) is None:
                    continue
                if why is not None:
                    self.details["left"][label] = why
                    (logger.info if why == "excluded" else logger.warning)("quantize-int4: embedding %s stays float: %s",
                                                                           label, why)
                    continue
                self._rewrite_gather(graph, node, label, names, tables, self._bits(node, label))
                self.details["embeddings"].append(label)
        count = len(self.details["quantized"]) + len(self.details["embeddings"])
        if count:
            model.opset_imports.setdefault(_MS, 1)
            graph.sort()
        weights = self.details["weights"].values()
        before = sum(r["bytes_before"] for r in weights)
        after = sum(r["bytes_after"] for r in weights)
        count = sum(r["bytes_before"] // 4 for r in weights)
        wide = [r for r in weights if r["bits"] == 8]
        self.details["bytes_per_weight"] = after / count if count else None
        self.summary = (
            f"int4 {self.method} (block {self.block_size}, {'symmetric' if self.symmetric and self.method != 'hqq' else 'asymmetric'}): "
            f"{len(self.details['quantized'])} of {total} MatMul/Gemm as MatMulNBits, "
            f"{len(self.details['embeddings'])} embedding tables as GatherBlockQuantized; "
            f"{len(wide)} of {len(self.details['weights'])} weights at 8 bits; weights {before:,} -> {after:,} bytes"
            + (f" ({after / count:.3f} bytes a weight)" if count else "")
        )
        return ir.passes.PassResult(model, modified=bool(len(self.details["quantized"]) + len(self.details["embeddings"])))

    def _bits(self, node: ir.Node, label: str) -> int:
        """8 for a node that ``wide`` names (recorded with why), else 4."""
        if not any(_matches(p, node) for p in self.wide):
            self.details["bits"][label] = 4
            return 4
        self.details["bits"][label] = 8
        self.details["wide"][label] = ("the accuracy budget's fallback stepped it up from 4 bits" if label in self.stepped
                                       else "named in wide")
        return 8

    def _quantize(self, w: np.ndarray, name: str, bits: int):
        """(codes, scales, zero points, float zero points?) of one weight, by the configured method; a
        weight met before with the same content and bits (an earlier run of this pass or of a copy that
        ``excluding`` made) is not rounded again."""
        gram = (self.calibration_gram or {}).get(name) if self.method == "gptq" else None
        with_gram = gram is not None and np.shape(gram) == (w.shape[0], w.shape[0])
        key = (name, bits, w.shape, hashlib.blake2b(w.tobytes(), digest_size=16).digest(), with_gram and id(gram))
        if key not in self._memo:
            if self.method == "hqq" and bits == 4:
                found = (*hqq_blocks(w, self.block_size, bits=bits), True)
            elif self.method == "hqq":  # onnxruntime's CPU kernel refuses float zero points at 8 bits
                found = (*rtn_blocks(w, self.block_size, False, bits), False)
            elif with_gram:
                found = (*gptq_blocks(w, gram, self.block_size, self.symmetric, bits=bits), False)
            else:
                found = (*rtn_blocks(w, self.block_size, self.symmetric, bits), False)
            if sum(a.nbytes for found in self._memo.values() for a in found[:3]) < _MEMO_BYTES:
                self._memo[key] = found
            return found
        if self.method == "gptq" and not with_gram:
            logger.warning("quantize-int4: no calibration gram for %s: rounded to nearest", name)
            self.details.setdefault("gptq_without_gram", []).append(name)
        return self._memo[key]

    def _rewrite_matmul(self, graph: ir.Graph, node: ir.Node, label: str, names: NameScope, done: dict,
                        bits: int) -> None:
        b = node.inputs[1]
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        key = (id(b), transposed, bits)
        if key not in done:
            w = constant_array(b)
            w = np.ascontiguousarray(w.T if transposed else w).astype(np.float32)
            codes, scale, zero, float_zero = self._quantize(w, b.name or label, bits)
            base = b.name or label
            packed = _const(graph, names, f"{base}_Q{bits}", pack_codes(codes, bits))
            scales = _const(graph, names, f"{base}_scales", scale.astype(np.float32))
            zp = None
            if float_zero:
                zp = _const(graph, names, f"{base}_zero_points", zero.reshape(-1).astype(np.float32))
            elif not self.symmetric or self.method == "hqq":
                zp = _const(graph, names, f"{base}_zero_points", _pack_zero_points(zero, bits))
            done[key] = (packed, scales, zp, w.shape)
            k, n = w.shape
            self._record(base if (id(b), transposed, 12 - bits) not in done else f"{base} ({bits} bits)", w,
                         dequantize_blocks(codes, scale, zero, k), bits, [packed, scales, zp])
        packed, scales, zp, (k, n) = done[key]
        self.details["sizes"][label] = k * n
        attributes = {"K": k, "N": n, "bits": bits, "block_size": self.block_size}
        if self.accuracy_level is not None:
            attributes["accuracy_level"] = self.accuracy_level
        inputs = [node.inputs[0], packed, scales] + ([zp] if zp is not None else [])
        mm = ir.node("MatMulNBits", inputs, attributes=attributes, domain=_MS, name=names.fresh(f"{label}_Q{bits}"))
        mm.outputs[0].name = names.fresh(f"{mm.name}_output")
        mm.outputs[0].dtype = ir.DataType.FLOAT
        new_nodes, last = [mm], mm
        c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if c is not None:
            beta = node.attributes.get_float("beta", 1.0)
            bias = c if beta == 1.0 else _const(graph, names, f"{c.name or label}_beta",
                                                (constant_array(c) * np.float32(beta)).astype(np.float32))
            last = ir.node("Add", [mm.outputs[0], bias], name=names.fresh(f"{label}_bias_add"))
            last.outputs[0].name = names.fresh(f"{last.name}_output")
            new_nodes.append(last)
        old = [v for v in node.inputs[1:] if v is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [last.outputs[0]])
        for value in old:
            drop_if_unused(graph, value)
        logger.info("quantize-int4: %s runs as MatMulNBits (K=%d, N=%d, %d bits)", label, k, n, bits)

    def _record(self, base: str, w: np.ndarray, approx: np.ndarray, bits: int, stored: list) -> None:
        """``details["weights"][base]``: shape, bits, bytes before and after, bytes a weight, relative error."""
        after = sum(_stored_bytes(v) for v in stored if v is not None)
        self.details["weights"][base] = {
            "shape": list(w.shape), "bits": bits, "bytes_before": int(w.nbytes), "bytes_after": after,
            "bytes_per_weight": after / w.size,
            "relative_error": float(np.linalg.norm(approx - w) / (np.linalg.norm(w) or 1.0)),
        }

    def _rewrite_gather(self, graph: ir.Graph, node: ir.Node, label: str, names: NameScope, tables: dict,
                        bits: int) -> None:
        table = node.inputs[0]
        key = (id(table), bits)
        if key not in tables:
            t = constant_array(table).astype(np.float32)
            rows, width = t.shape
            blocks = t.reshape(rows, width // self.block_size, self.block_size)
            scale, zero = _params(blocks, self.symmetric, bits)
            codes = _codes(blocks, scale, zero, bits).reshape(rows, width)
            base = table.name or label
            zp = None
            if bits == 8:  # uint8 codes, one a byte; without zero points onnxruntime takes 128
                data = _const(graph, names, f"{base}_Q8", codes)
                if not self.symmetric:
                    zp = _const(graph, names, f"{base}_zero_points", zero.astype(np.uint8))
            elif self.symmetric:  # int4 codes q - 8 (two's complement nibbles), zero point 0
                data = _packed(graph, names, f"{base}_Q4", (codes.astype(np.int8) - 8).astype(np.uint8), ir.DataType.INT4)
            else:
                data = _packed(graph, names, f"{base}_Q4", codes, ir.DataType.UINT4)
                zp = _packed(graph, names, f"{base}_zero_points", zero.astype(np.uint8), ir.DataType.UINT4)
            scales = _const(graph, names, f"{base}_scales", scale.astype(np.float32))
            tables[key] = (data, scales, zp)
            approx = (codes.reshape(blocks.shape).astype(np.float32) - zero[..., None]) * scale[..., None]
            self._record(base if (id(table), 12 - bits) not in tables else f"{base} ({bits} bits)", t,
                         approx.reshape(rows, width), bits, [data, scales, zp])
        data, scales, zp = tables[key]
        self.details["sizes"][label] = int(np.prod(data.shape))
        inputs = [data, node.inputs[1], scales] + ([zp] if zp is not None else [])
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block_size}
        if bits == 8:
            attributes["bits"] = 8
        gq = ir.node("GatherBlockQuantized", inputs, domain=_MS, name=names.fresh(f"{label}_Q{bits}"), attributes=attributes)
        gq.outputs[0].name = names.fresh(f"{gq.name}_output")
        gq.outputs[0].dtype = ir.DataType.FLOAT
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gq], [node.outputs[0]], [gq.outputs[0]])
        drop_if_unused(graph, table)
        logger.info("quantize-int4: embedding %s runs as GatherBlockQuantized (%d bits)", label, bits)


def _stored_bytes(value: ir.Value) -> int:
    """Bytes of an initializer's data as the file holds it (4-bit tensors two a byte)."""
    tensor = value.const_value
    return int(-(-tensor.size * tensor.dtype.bitwidth // 8))


def _const(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph`` holding ``array``."""
    name = names.fresh(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = value.const_value.shape
    graph.register_initializer(value)
    return value


def _packed(graph: ir.Graph, names: NameScope, base: str, nibbles: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """A new 4-bit initializer of ``graph``: ``nibbles`` (low 4 bits of each uint8) packed two a byte,
    row-major, of ``nibbles``' shape."""
    flat = nibbles.reshape(-1).astype(np.uint8) & 15
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    name = names.fresh(base)
    tensor = ir.PackedTensor(pack_nibbles(flat), dtype, shape=ir.Shape(nibbles.shape), name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.dtype = dtype
    value.shape = tensor.shape
    graph.register_initializer(value)
    return value

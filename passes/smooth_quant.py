"""SmoothQuant: move per-channel activation range from a LayerNormalization's output into the weights that read it.

Transformers carry a few channels of the residual stream 50-100x larger than the rest; after a
LayerNormalization they stay large (its gamma learns them), and one per-tensor activation scale
spends its 256 levels on them, rounding every other channel to a handful of levels. For an LN
whose output X feeds only MatMul/Gemm layers with constant weights W (Q/K/V projections, a
feed-forward up projection), per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)            (W_j: row j of every reader's weight)
    gamma_j /= s_j,  beta_j /= s_j,  W[j, :] *= s_j         so  (X / s) (s W) = X W

which is exact in real arithmetic and adds no op (Xiao et al., "SmoothQuant", 2023). ``alpha``
trades activation range against weight range: 0 leaves X alone, 1 moves all of its range into W.

``alpha="auto"`` picks, per LN, the alpha in 0.30, 0.35 ... 0.80 (or no smoothing at all, unless
one at least halves the proxy: ``AUTO_MIN_GAIN``) that minimizes a proxy of the int8 error of X W: the expected squared rounding error of the products
when X is quantized per tensor (uint8, step dx = 2 max_j(max|X_j| / s_j) / 255) and W per output
column n (int8, step dw_n = max_j |s_j W_jn| / 127), with every X_j at its calibrated max|X_j|:

    E = sum_n sum_j [ dx^2 (s_j W_jn)^2 + dw_n^2 (max|X_j| / s_j)^2 ] / 12

(uniform rounding noise, dx^2 / 12 per value, through each product; the signal X W does not depend
on s, so the least noise is the best SQNR). It uses only the per-channel absmax that calibration
gives, and it is a proxy: real activations sit below their max, most of the time.

The per-channel ``act_absmax`` of each LN output comes in through the constructor (gathered on
calibration data by ``onnxopt.calibrate.channel_absmax``), so the pass replays without data.
An LN whose output is also read by anything else (a post-LN encoder's residual Add reads it: BERT,
torch's ``nn.TransformerEncoderLayer`` by default) is left alone: scaling it would scale the
residual stream too, which no weight can undo without an added op.
"""

from __future__ import annotations

__all__ = ["SmoothQuant", "AUTO_ALPHAS", "AUTO_MIN_GAIN", "choose_alpha", "smoothing_error", "smoothing_scales"]

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, constant_array, replace_weight

logger = logging.getLogger(__name__)

AUTO_ALPHAS = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30 .. 0.80
_MIN = 1e-8
# "auto" smooths only where the proxy error at least halves: the proxy reads maxima, not the values
# (the zoo transformer, without outliers: 0.90 of its proxy error, and its worst cosine fell 0.99937 -> 0.99909).
AUTO_MIN_GAIN = 0.5
_MAX_SCALE = 1e4
_SHAPE_READERS = {"Shape", "Size"}  # a channel's scale is kept within [1e-4, 1e4]: no weight row overflows or vanishes


@dataclass
class _Reader:
    """A MatMul/Gemm reading the LN's output at input 0: its weight, with input channels as rows."""

    node: ir.Node
    index: int  # the weight's input index
    weight: np.ndarray
    transposed: bool  # Gemm transB=1: input channels are columns

    def rows(self) -> np.ndarray:
        return self.weight.T if self.transposed else self.weight


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _norm_of(node: ir.Node) -> str | None:
    """Why this LayerNormalization cannot be smoothed, or None."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return "not a LayerNormalization"
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    axis = _attr(node, "axis", -1)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return f"normalizes over axis {axis}, not the last"
    gamma = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if gamma is None or gamma.ndim != 1 or gamma.dtype != np.float32:
        return "its scale is not a constant float32 vector"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        beta = constant_array(node.inputs[2])
        if beta is None or beta.shape != gamma.shape:
            return "its bias is not a constant vector"
    return None


def _readers(out: ir.Value, channels: int) -> tuple[list[_Reader], str | None]:
    """The MatMul/Gemm readers of ``out`` with constant weights, or why there are none to smooth."""
    if out.is_graph_output():
        return [], "its output is a graph output"
    uses = [u for u in out.uses() if u.node.op_type not in _SHAPE_READERS]  # the shape does not change
    for use in uses:  # a reader of another kind first: it says why more plainly (a post-LN residual)
        node = use.node
        if use.idx != 0 or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            hint = " (a residual Add: post-LN)" if node.op_type == "Add" else ""
            return [], f"its output is also read by {node.op_type} '{node.name}'{hint}"
    readers = []
    for use in uses:
        node = use.node
        reader = _transposed_weight(node) if node.op_type == "MatMul" else None
        w = constant_array(node.inputs[1]) if reader is None else reader.weight
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return [], f"{node.op_type} '{node.name}' has no constant 2-D float32 weight"
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return [], f"Gemm '{node.name}' transposes its input"
        if reader is None:
            reader = _Reader(node, 1, w, node.op_type == "Gemm" and bool(_attr(node, "transB", 0)))
        if reader.rows().shape[0] != channels:
            return [], f"{node.op_type} '{node.name}' weight has {reader.rows().shape[0]} rows, not {channels}"
        readers.append(reader)
    if not readers:
        return [], "nothing reads its output"
    return readers, None


def _transposed_weight(matmul: ir.Node) -> _Reader | None:
    """A MatMul weight that is ``Transpose(constant)`` read by this MatMul alone (torch's export of a
    Linear before constant folding): the reader to rescale is the Transpose's constant, by columns."""
    t = matmul.inputs[1].producer() if matmul.inputs[1] is not None else None
    if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or len(matmul.inputs[1].uses()) != 1:
        return None
    w = constant_array(t.inputs[0])
    if w is None or w.ndim != 2 or list(_attr(t, "perm", [1, 0])) != [1, 0]:
        return None
    return _Reader(t, 0, w, True)


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel ``s = max|X|^alpha / max|W|^(1 - alpha)``, 1 where either side is 0,
    kept within [1e-4, 1e4] so that no weight row overflows or vanishes."""
    s = np.power(np.maximum(x_max, _MIN), alpha) / np.power(np.maximum(w_max, _MIN), 1.0 - alpha)
    s = np.where((x_max > _MIN) & (w_max > _MIN) & np.isfinite(s), s, 1.0)
    return np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE)


def smoothing_error(x_max: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """The proxy of the module docstring: expected squared rounding error of X W, uint8 per-tensor X
    at its per-channel max, int8 per-column W, after scaling channels by ``s`` (rows of ``weights``)."""
    x = np.asarray(x_max, np.float64) / s
    dx = 2.0 * x.max() / 255.0
    total = 0.0
    for w in weights:
        ws = np.asarray(w, np.float64) * s[:, None]
        dw = np.abs(ws).max(axis=0) / 127.0  # per output column
        total += dx * dx * float(np.square(ws).sum()) + float((dw * dw).sum() * np.square(x).sum())
    return total / 12.0


class SmoothQuant(OnnxoptPass):
    """Scale each LayerNormalization's output channels down, and its readers' weight rows up, by s.

    Rules (each refusal is logged and listed in ``details["skipped"]``):
    - a LayerNormalization over the last axis, with constant float32 scale (and bias);
    - its output read only by MatMul (input 0, constant 2-D weight) or Gemm (input 0, ``transA=0``,
      constant weight, either ``transB``), besides Shape/Size, and not a graph output;
    - ``act_absmax`` holds its output's per-channel max|x| (one value per channel).
    The function computed is unchanged (up to float rounding): no op is added or removed.
    """

    name = "smooth-quant"

    def __init__(self, alpha: float | str = 0.5, act_absmax: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        if not (alpha == "auto" or (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0)):
            raise ValueError(f"smooth-quant alpha {alpha!r}: a number in [0, 1] or 'auto'")
        self.alpha = alpha
        self.act_absmax = dict(act_absmax or {})

    @staticmethod
    def smoothable(model: ir.Model) -> dict[str, str]:
        """LN output name -> LN node name, for every LN the rules accept (its statistics are what to gather)."""
        found = {}
        for node in model.graph:
            if _norm_of(node) is not None:
                continue
            gamma = constant_array(node.inputs[1])
            if _readers(node.outputs[0], gamma.shape[0])[1] is None:
                found[node.outputs[0].name] = node.name
        return found

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        smoothed: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        for node in list(graph):
            if node.op_type != "LayerNormalization":
                continue
            label = node.name or node.outputs[0].name
            why = _norm_of(node)
            gamma = constant_array(node.inputs[1]) if why is None else None
            readers: list[_Reader] = []
            if why is None:
                readers, why = _readers(node.outputs[0], gamma.shape[0])
            x_max = self.act_absmax.get(node.outputs[0].name)
            if why is None and (x_max is None or np.shape(x_max) != gamma.shape):
                why = "no per-channel activation statistics for its output"
            if why is not None:
                skipped[label] = why
                logger.warning("smooth-quant: %s left alone: %s", label, why)
                continue
            x_max = np.abs(np.asarray(x_max, np.float64))
            rows = [r.rows().astype(np.float64) for r in readers]
            w_max = np.max([np.abs(w).max(axis=1) for w in rows], axis=0)
            alpha, s = self._choose(x_max, w_max, rows)
            if s is None:
                skipped[label] = "no alpha lowers the int8 error proxy (alpha auto)"
                logger.info("smooth-quant: %s left alone: smoothing does not lower its error proxy", label)
                continue
            s32 = s.astype(np.float32)
            replace_weight(graph, node, 1, (gamma / s32).astype(np.float32), "smooth", names)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                beta = constant_array(node.inputs[2])
                replace_weight(graph, node, 2, (beta / s32).astype(np.float32), "smooth", names)
            for r in readers:
                scaled = r.weight * (s32[None, :] if r.transposed else s32[:, None])
                replace_weight(graph, r.node, r.index, scaled.astype(np.float32), "smooth", names)
            smoothed[label] = {"alpha": alpha, "readers": [r.node.name or r.node.op_type for r in readers],
                               "range_before": round(float(x_max.max() / max(np.median(x_max), _MIN)), 2),
                               "range_after": round(float((x_max / s).max() / max(np.median(x_max / s), _MIN)), 2)}
            logger.info("smooth-quant: %s alpha %s into %d readers", label, alpha, len(readers))
        self.details = {"smoothed": smoothed, "skipped": skipped}
        total = len(smoothed) + len(skipped)
        self.summary = f"smoothed {len(smoothed)} of {total} LayerNormalization" + (
            f"; skipped {len(skipped)}" if skipped else "")
        return ir.passes.PassResult(model, modified=bool(smoothed))

    def _choose(self, x_max: np.ndarray, w_max: np.ndarray, rows: list[np.ndarray]):
        """(alpha, scales); for "auto", the grid's least proxy error, or (None, None) when no smoothing wins."""
        if self.alpha != "auto":
            return float(self.alpha), smoothing_scales(x_max, w_max, float(self.alpha))
        return choose_alpha(x_max, w_max, rows)


def choose_alpha(x_max: np.ndarray, w_max: np.ndarray, rows: list[np.ndarray]):
    """``alpha="auto"``: (alpha, scales) of ``AUTO_ALPHAS`` with the least ``smoothing_error``, or
    (None, None) when none at least halves the error of no smoothing (``AUTO_MIN_GAIN``)."""
    plain = smoothing_error(x_max, rows, np.ones_like(x_max))
    best = (plain * AUTO_MIN_GAIN, None, None)
    for alpha in AUTO_ALPHAS:
        s = smoothing_scales(x_max, w_max, alpha)
        err = smoothing_error(x_max, rows, s)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]

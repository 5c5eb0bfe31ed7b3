"""A numpy model of onnxruntime's u8s8 integer arithmetic on x86 CPUs without VNNI, for tests on any CPU.

MLAS's u8s8 GEMM and convolution kernels for SSE4.1, AVX2 and AVX-512 BW multiply uint8 activations
by int8 weights with ``pmaddubsw``: the products of each pair of adjacent K elements are added into
an int16 WITH SATURATION, then the pairs are summed exactly in int32 (``pmaddwd`` by ones). The
activations the kernel reads are the raw uint8 values (their zero point is subtracted afterwards,
through the weights' column sums), so any value in [0, 255] meets any weight. Convolutions run
channels-last: K is ordered (kh, kw, cin) per group, and a pair is two neighbours in that order
(the im2col QGEMM path, and the ConvSym path's blocks of 4 input channels, pair the same ones).
VNNI (``vpdpbusd``) and arm64 (``sdot``) sum into int32 directly: this module is what a VNNI
machine needs to see what an AVX2 one computes.

- ``kernel_order(op, w, attrs)``: a weight as [outputs, K] in the kernel's order.
- ``worst_pair(w_ok)``: the largest |pair sum| any uint8 input can reach, per output (analytic).
- ``pair_sums(x_mk, w_ok)``: the int32 dot products as the kernel computes them, and how many saturated.
- ``simulate(model, feeds)``: a QDQ model's outputs with every int8 Conv/Gemm/MatMul computed that
  way (onnx's reference evaluator for the rest), and the saturated outputs per node.
"""

from __future__ import annotations

__all__ = ["kernel_order", "worst_pair", "pair_sums", "simulate", "int8_weights"]

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

INT16 = (-32768, 32767)


def kernel_order(op: str, w: np.ndarray, trans_b: int = 0) -> np.ndarray:
    """``w`` as [outputs, K], K in the order the u8s8 kernel pairs it."""
    if op == "Conv":  # [O, C/g, kh, kw] → [O, kh, kw, C/g]: channels-last
        return w.transpose(0, *range(2, w.ndim), 1).reshape(w.shape[0], -1)
    if op == "Gemm":
        return w if trans_b else w.T
    if op == "MatMul":
        return w.T
    raise ValueError(op)


def _paired(w_ok: np.ndarray) -> np.ndarray:
    """[O, K/2, 2]: K padded with a zero to even length (the kernels pad K with zeros)."""
    w = w_ok.astype(np.int64)
    if w.shape[1] % 2:
        w = np.concatenate([w, np.zeros((w.shape[0], 1), np.int64)], axis=1)
    return w.reshape(w.shape[0], -1, 2)


def worst_pair(w_ok: np.ndarray) -> np.ndarray:
    """Per output: the largest |x_a w_a + x_b w_b| over adjacent pairs and every x in [0, 255]."""
    pairs = _paired(w_ok)
    high = 255 * np.clip(pairs, 0, None).sum(axis=2)   # inputs at 255 where the weight is positive
    low = 255 * np.clip(pairs, None, 0).sum(axis=2)    # where it is negative
    return np.maximum(high, -low).max(axis=1)


def pair_sums(x_mk: np.ndarray, w_ok: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, int]:
    """[M, O] int64 sums of uint8 ``x_mk`` [M, K] times int8 ``w_ok`` [O, K] with each adjacent pair
    clamped to int16, and the number of (row, output) sums in which some pair saturated."""
    pairs = _paired(w_ok)                                 # [O, P, 2]
    x = x_mk.astype(np.int64)
    if x.shape[1] % 2:
        x = np.concatenate([x, np.zeros((x.shape[0], 1), np.int64)], axis=1)
    x = x.reshape(x.shape[0], -1, 2)                      # [M, P, 2]
    out = np.empty((x.shape[0], pairs.shape[0]), np.int64)
    saturated = 0
    for i in range(0, x.shape[0], chunk):
        sums = np.einsum("mpt,opt->mop", x[i:i + chunk], pairs)  # [m, O, P]
        clamped = np.clip(sums, *INT16)
        saturated += int((clamped != sums).any(axis=2).sum())
        out[i:i + chunk] = clamped.sum(axis=2)
    return out, saturated


def int8_weights(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray, np.ndarray, dict]]:
    """Each Conv/Gemm/MatMul whose weight is DequantizeLinear of an int8 initializer: node name →
    (op, int8 weight, its scale, the node's attributes)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.dtype != np.int8:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found[node.name] = (node.op_type, w, numpy_helper.to_array(inits[dq.input[1]]), attrs)
    return found


def _activation_qparams(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of the uint8 DequantizeLinear that feeds input 0 of each named node."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.name not in names:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            raise ValueError(f"{node.name}: input is not dequantized: not an integer kernel")
        zp = inits[dq.input[2]]
        if zp.dtype != np.uint8:
            raise ValueError(f"{node.name}: activations are {zp.dtype}, the model covers uint8")
        found[node.name] = (float(inits[dq.input[1]]), int(zp))
    return found


def _im2col(x: np.ndarray, kernel: tuple[int, int], pads, strides, dilations, zp: int) -> np.ndarray:
    """[N, OH, OW, kh, kw, C] patches of uint8 NCHW ``x``, padded with the zero point."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    padded = np.full((n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), zp, x.dtype)
    padded[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + w] = x
    oh = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            cols[:, :, :, i, j, :] = patch.transpose(0, 2, 3, 1)
    return cols


def simulate(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, tuple[int, int]]]:
    """``model``'s outputs with its int8 Conv (2-D), Gemm and MatMul computed as x86 without VNNI
    does, and per such node (saturated sums, all sums). Each node's uint8 input is read back from
    its dequantized value (exact: (q - zp) * s rounds back to q)."""
    weights = int8_weights(model)
    qparams = _activation_qparams(model, set(weights))
    counts = {name: [0, 0] for name in weights}

    def integer(name, x):
        s, zp = qparams[name]
        return np.clip(np.rint(x.astype(np.float64) / s) + zp, 0, 255).astype(np.uint8), s, zp

    def requantized(acc, x_s, w_s):  # float output of the integer sum, as the QDQ graph has it
        return (acc.astype(np.float64) * x_s * w_s.astype(np.float64)).astype(np.float32)

    class Conv(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            name = self.onnx_node.name
            if name not in weights or x.ndim != 4:
                raise ValueError(f"{name}: the simulator covers 2-D convolutions with int8 weights")
            _, wq, w_s, _ = weights[name]
            xq, x_s, zp = integer(name, x)
            group = group or 1
            kernel = tuple(wq.shape[2:])
            cols = _im2col(xq, kernel, pads or [0] * 4, strides or [1, 1], dilations or [1, 1], zp)
            n, oh, ow = cols.shape[:3]
            out_per_group, c_per_group = wq.shape[0] // group, wq.shape[1]
            acc = np.empty((n * oh * ow, wq.shape[0]), np.int64)
            for g in range(group):
                x_mk = cols[..., g * c_per_group:(g + 1) * c_per_group].reshape(n * oh * ow, -1)
                w_ok = kernel_order("Conv", wq[g * out_per_group:(g + 1) * out_per_group])
                sums, sat = pair_sums(x_mk, w_ok)
                acc[:, g * out_per_group:(g + 1) * out_per_group] = sums - zp * w_ok.astype(np.int64).sum(axis=1)
                counts[name][0] += sat
            counts[name][1] += acc.size
            y = requantized(acc, x_s, np.broadcast_to(w_s, (wq.shape[0],)))
            y = y.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
            return ((y + b.reshape(1, -1, 1, 1)).astype(np.float32) if b is not None else y,)

    class Gemm(OpRun):
        op_domain = ""

        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            name = self.onnx_node.name
            if name not in weights or transA or (alpha or 1.0) != 1.0 or (beta or 1.0) != 1.0:
                raise ValueError(f"{name}: the simulator covers Gemm with int8 B, no transA, alpha = beta = 1")
            _, wq, w_s, _ = weights[name]
            xq, x_s, zp = integer(name, a)
            w_ok = kernel_order("Gemm", wq, transB or 0)
            sums, sat = pair_sums(xq, w_ok)
            acc = sums - zp * w_ok.astype(np.int64).sum(axis=1)
            counts[name][0] += sat
            counts[name][1] += acc.size
            y = requantized(acc, x_s, np.broadcast_to(w_s, (w_ok.shape[0],)))
            return ((y + c).astype(np.float32) if c is not None else y,)

    # onnx's evaluator implements DequantizeLinear from opset 19 only: the same per-axis semantics
    # as 13, so the copy it runs declares 21 (the simulated models use no op that changed since 13).
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    evaluator = ReferenceEvaluator(model, new_ops=[Conv, Gemm])
    outputs = evaluator.run(None, dict(feeds))
    return outputs, {name: (sat, total) for name, (sat, total) in counts.items()}

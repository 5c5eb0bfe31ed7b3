"""Low-rank factorization: a layer's weight W becomes two thinner layers, W ≈ P·Q of rank r.

Written as a map from ``n_in`` inputs to ``n_out`` outputs, W (n_in x n_out) has the SVD
``W = U S Vᵀ``; keeping r singular values, ``P = U_r S_r^½`` (n_in x r) and ``Q = S_r^½ V_rᵀ``
(r x n_out) minimize ‖W − PQ‖. With the inputs' Gram matrix ``G = XᵀX`` (from calibration data)
the error that matters is the output's, ‖XW − XPQ‖ = ‖M(W − PQ)‖ with ``G = MᵀM`` (M from G's
eigendecomposition): the SVD of ``MW`` is truncated instead, and ``P = M⁻¹ U_r S_r^½``.

The pair has ``r (n_in + n_out)`` weights against ``n_in n_out``: it is smaller only for
``r < n_in n_out / (n_in + n_out)``, and a layer is rewritten only then.

- MatMul x·W → (x·P)·Q; Gemm → Gemm(A, P) then Gemm(·, Q, C) with the original transA on the first
  and transB, alpha, beta and the bias on the second.
- Conv k_h x k_w (2-D, group 1): either a k_h x k_w Conv to r channels then a 1x1 Conv
  (W as (C k_h k_w) x O), or a k_h x 1 Conv to r channels then a 1 x k_w Conv (W as (C k_h) x (O k_w),
  the pads, strides and dilations split between the two); the one with fewer MACs (parameters where
  the spatial sizes are unknown) is chosen. A Gram matrix for a Conv is that of its im2col patches
  (C k_h k_w square) and selects the first form.

The rank is the smallest keeping ``energy`` of Σs² (``energy=1.0``: the numerical rank, so a
weight of lower rank is reproduced exactly) or, with ``ratio``, ``floor(ratio · n_in n_out / (n_in + n_out))``:
the factor pair then holds about ``ratio`` of the layer's weights.
"""

from __future__ import annotations

__all__ = ["LowRankFactorize", "factorize"]

import logging
import math

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import LossyLayers, NameScope, OnnxoptPass, constant_array, drop_if_unused, graphs_of

logger = logging.getLogger(__name__)


def _static(dims) -> list[int] | None:
    if dims is None:
        return None
    return [d if isinstance(d, int) else 1 for d in dims]  # symbolic dims (batch) count as 1


def _prod(values) -> int:
    return int(math.prod(values))


def factorize(
    w: np.ndarray, gram: np.ndarray | None = None, *, energy: float = 0.9, ratio: float | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(P, Q, info)`` with ``W ≈ P @ Q`` for ``w`` (n_in x n_out), in float64; see the module docstring.

    ``info``: rank, full rank, singular values kept, the relative weight error and, with ``gram``,
    the relative output error ‖M(W−PQ)‖/‖MW‖.
    """
    w = w.astype(np.float64)
    n_in, n_out = w.shape
    if gram is not None:
        lam, vec = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
        lam = np.maximum(lam, max(lam.max(), 0.0) * 1e-10 + 1e-300)
        root = np.sqrt(lam)
        m, m_inv = root[:, None] * vec.T, vec / root[None, :]
        target = m @ w
    else:
        m = m_inv = None
        target = w
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(n_in, n_out) * np.finfo(np.float32).eps
    numerical = int(np.count_nonzero(s > tol))
    if ratio is not None:
        rank = max(1, math.floor(ratio * n_in * n_out / (n_in + n_out)))
    else:
        power = s[:numerical] ** 2
        cum = np.cumsum(power)
        rank = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1 if numerical else 1
    rank = max(1, min(rank, max(numerical, 1)))
    root_s = np.sqrt(s[:rank])
    p = u[:, :rank] * root_s[None, :]
    q = root_s[:, None] * vt[:rank]
    if m_inv is not None:
        p = m_inv @ p
    approx = p @ q
    norm = np.linalg.norm(w)
    info = {
        "rank": rank, "full_rank": numerical,
        "energy_kept": float((s[:rank] ** 2).sum() / (s ** 2).sum()) if s.size and s[0] > 0 else 1.0,
        "weight_error": float(np.linalg.norm(w - approx) / norm) if norm else 0.0,
    }
    if m is not None:
        out_norm = np.linalg.norm(m @ w)
        info["output_error"] = float(np.linalg.norm(m @ (w - approx)) / out_norm) if out_norm else 0.0
    return p, q, info


class LowRankFactorize(LossyLayers, OnnxoptPass):
    """Factorize MatMul, Gemm and 2-D Conv weights into two layers of rank r where that is smaller.

    Rules:
    - the weight is a float constant (not a graph input), read by this node alone (a weight shared
      by two layers is skipped: factorizing it per reader would store it twice);
    - MatMul: 2-D weight at input 1; Gemm: constant B, its A not constant; Conv: 4-D weight, group 1,
      explicit pads (no auto_pad);
    - rewritten only where the pair has fewer weights (r < n_in n_out / (n_in + n_out));
    - ``layers`` names weights or nodes (None: all); weights below ``min_params`` are left alone;
    - ``activation_gram``: weight name -> XᵀX of that layer's inputs (n_in x n_in), optional;
    - ``per_layer`` (weight or node name -> energy; ``onnxopt.sensitivity`` chooses it by measured
      sensitivity): only those layers, each keeping its own fraction of energy (``ratio`` unused).
    """

    name = "lowrank"
    LEVEL_FIELD = "energy"
    LEVELS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.5)

    @property
    def lossy(self) -> bool:
        """A truncated factorization changes outputs; the full rank (energy 1, no ratio) does not."""
        if self.per_layer is not None:
            return not isinstance(self.per_layer, dict) or any(e < 1.0 for e in self.per_layer.values())
        return not (self.ratio is None and self.energy >= 1.0)

    def __init__(
        self,
        energy: float = 0.9,
        ratio: float | None = None,
        layers: list[str] | None = None,
        min_params: int = 1024,
        activation_gram: dict[str, np.ndarray] | None = None,
        per_layer: dict[str, float] | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        self.energy = energy
        self.ratio = ratio
        self.layers = set(layers) if layers is not None else None
        self.min_params = min_params
        self.activation_gram = dict(activation_gram or {})
        if isinstance(per_layer, dict) and not all(0.0 < e <= 1.0 for e in per_layer.values()):
            raise ValueError(f"per_layer energy must be in (0, 1], got {per_layer}")
        self.per_layer = dict(per_layer) if isinstance(per_layer, dict) else per_layer

    def gram_needs(self, model: ir.Model) -> dict[str, str]:
        """Weight name -> the activation whose ``XᵀX`` the activation-aware form needs: the input of
        each MatMul, and of each Gemm without transA, that this pass may factorize (a Conv's would
        be its im2col patches: not gathered, so Conv layers keep the weight-error form)."""
        needs = {}
        for graph in graphs_of(model):
            for node in graph:
                if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                    continue
                weight, x = node.inputs[1], node.inputs[0]
                if weight is None or x is None or not weight.name or not x.name or weight.name in self.activation_gram:
                    continue
                if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                    continue
                array = constant_array(weight)
                if array is not None and array.ndim == 2 and array.dtype.kind == "f" and array.size >= self.min_params:
                    needs[weight.name] = x.name
        return needs

    def uniform(self, level) -> LowRankFactorize:
        new = super().uniform(level)
        new.ratio = None
        return new

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_levels()
        self.details = {"layers": {}, "skipped": {}}
        done = 0
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        for graph in graphs_of(model):
            names = NameScope(graph)
            for node in list(graph):
                if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
                    continue
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                if weight is None:
                    continue
                key = weight.name or node.name
                if self.layers is not None and weight.name not in self.layers and node.name not in self.layers:
                    continue
                self._energy, named = self._level(key, node.name, default=self.energy)
                if not named:
                    continue
                if key in self.exclude or node.name in self.exclude:
                    self.details["skipped"][key] = "kept for the accuracy budget"
                    continue
                reason = self._refusal(node, weight)
                if reason is None:
                    record = (self._conv if node.op_type == "Conv" else self._dense)(graph, node, weight, names)
                    if isinstance(record, str):
                        reason = record
                    else:
                        self.details["layers"][key] = record
                        done += 1
                        logger.info("lowrank: %s %s rank %d, params %d -> %d", node.op_type, key, record["rank"],
                                    record["params_before"], record["params_after"])
                        continue
                if reason != "small":
                    self.details["skipped"][key] = reason
                    # two activations multiplied (attention's Q·Kᵀ) are no layer to factorize: not worth a warning
                    log = logger.debug if weight.producer() is not None and weight.producer().op_type != "Constant" else logger.warning
                    log("lowrank: %s %s left alone: %s", node.op_type, key, reason)
        before = sum(r["params_before"] for r in self.details["layers"].values())
        after = sum(r["params_after"] for r in self.details["layers"].values())
        self.summary = f"factorized {done} layers; their weights {before:,} -> {after:,} parameters" + (
            f"; skipped {len(self.details['skipped'])}" if self.details["skipped"] else "")
        return ir.passes.PassResult(model, modified=bool(done))

    def _refusal(self, node: ir.Node, weight: ir.Value) -> str | None:
        array = constant_array(weight)
        if array is None:
            return "weight is not a constant"
        if array.dtype.kind != "f":
            return f"weight dtype {array.dtype}"
        if array.size < self.min_params:
            return "small"
        if len(weight.uses()) != 1 or weight.is_graph_output():
            return f"weight read by {len(weight.uses())} nodes"
        if node.op_type == "Conv":
            if array.ndim != 4:
                return f"{array.ndim - 2}-D Conv"
            if node.attributes.get_int("group", 1) != 1:
                return "grouped Conv"
            if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
                return "auto_pad"
        elif array.ndim != 2:
            return f"{array.ndim}-D weight"
        elif node.op_type == "Gemm" and constant_array(node.inputs[0]) is not None:
            return "Gemm's A is a constant"
        elif node.op_type == "Gemm" and self._opset < 11:
            return "opset < 11 (the first Gemm of the pair would need a C)"
        return None

    def _gram(self, weight: ir.Value, n_in: int) -> np.ndarray | None:
        gram = self.activation_gram.get(weight.name)
        if gram is not None and np.shape(gram) != (n_in, n_in):
            raise ValueError(f"activation_gram[{weight.name!r}] has shape {np.shape(gram)}, expected {(n_in, n_in)}")
        return gram

    def _factor(self, w: np.ndarray, gram: np.ndarray | None):
        return factorize(w, gram, energy=self._energy, ratio=None if self.per_layer is not None else self.ratio)

    def _dense(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, names: NameScope) -> dict | str:
        b = constant_array(weight)
        trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        w = b.T if trans_b else b
        n_in, n_out = w.shape
        p, q, info = self._factor(w, self._gram(weight, n_in))
        r = info["rank"]
        if r * (n_in + n_out) >= n_in * n_out:
            return f"rank {r} is not below {n_in * n_out / (n_in + n_out):.1f} (the pair would be larger)"
        dtype = b.dtype
        first_w = (p.T if trans_b else p).astype(dtype)
        second_w = (q.T if trans_b else q).astype(dtype)
        attrs = {}
        if node.op_type == "Gemm":
            attrs = {"transA": node.attributes.get_int("transA", 0), "transB": int(trans_b)}
        hidden = self._first(graph, node, node.op_type, node.inputs[0], first_w, attrs, names, weight)
        node.replace_input_with(0, hidden)
        if node.op_type == "Gemm":
            node.attributes["transA"] = ir.AttrInt64("transA", 0)
        self._set_weight(graph, node, second_w, names, weight, "lowrank_v")
        rows = _static(node.outputs[0].shape)
        unit = "model" if rows else "per output row"
        rows = _prod(rows[:-1]) if rows else 1
        return {"op": node.op_type, "form": "two " + node.op_type, **info, "nodes": [hidden.producer().name, node.name],
                "params_before": n_in * n_out, "params_after": r * (n_in + n_out),
                "bytes_before": n_in * n_out * dtype.itemsize, "bytes_after": r * (n_in + n_out) * dtype.itemsize,
                "macs_before": rows * n_in * n_out, "macs_after": rows * r * (n_in + n_out), "macs_unit": unit}

    def _conv(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, names: NameScope) -> dict | str:
        w = constant_array(weight)
        o, c, kh, kw = w.shape
        ints = lambda name, default: list(node.attributes.get_ints(name, default))  # noqa: E731
        pads, strides, dilations = ints("pads", [0] * 4), ints("strides", [1, 1]), ints("dilations", [1, 1])
        out = _static(node.outputs[0].shape)
        inp = _static(node.inputs[0].shape)
        positions = _prod(out[2:]) if out and len(out) == 4 else None
        gram = self._gram(weight, c * kh * kw) if weight.name in self.activation_gram else None
        candidates = []
        p, q, info = self._factor(w.reshape(o, -1).T, gram)
        r = info["rank"]
        cost = r * (c * kh * kw + o)
        if cost < w.size:
            macs = positions * cost if positions else None
            candidates.append(("kxk+1x1", p, q, info, cost, macs))
        if kh > 1 and kw > 1 and gram is None:
            p2, q2, info2 = self._factor(w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw), None)
            r2 = info2["rank"]
            cost2 = r2 * (c * kh + o * kw)
            if cost2 < w.size:
                macs2 = None
                if positions and inp and len(inp) == 4:
                    macs2 = out[2] * inp[3] * r2 * c * kh + positions * o * r2 * kw
                candidates.append(("kx1+1xk", p2, q2, info2, cost2, macs2))
        if not candidates:
            return f"rank {r} is not below {w.size / (c * kh * kw + o):.1f} (the pair would be larger)"
        if all(cand[5] is not None for cand in candidates):
            form, p, q, info, cost, macs = min(candidates, key=lambda cand: cand[5])
        else:
            form, p, q, info, cost, macs = min(candidates, key=lambda cand: cand[4])
        r = info["rank"]
        bias_free = {"group": 1}
        if form == "kxk+1x1":
            first_w = p.T.reshape(r, c, kh, kw)
            second_w = q.T.reshape(o, r, 1, 1)
            first = {**bias_free, "kernel_shape": [kh, kw], "pads": pads, "strides": strides, "dilations": dilations}
            second = {"kernel_shape": [1, 1], "pads": [0, 0, 0, 0], "strides": [1, 1], "dilations": [1, 1]}
        else:
            first_w = p.T.reshape(r, c, kh, 1)
            second_w = q.reshape(r, o, kw).transpose(1, 0, 2).reshape(o, r, 1, kw)
            first = {**bias_free, "kernel_shape": [kh, 1], "pads": [pads[0], 0, pads[2], 0],
                     "strides": [strides[0], 1], "dilations": [dilations[0], 1]}
            second = {"kernel_shape": [1, kw], "pads": [0, pads[1], 0, pads[3]],
                      "strides": [1, strides[1]], "dilations": [1, dilations[1]]}
        hidden = self._first(graph, node, "Conv", node.inputs[0], first_w.astype(w.dtype), first, names, weight)
        node.replace_input_with(0, hidden)
        for key, value in second.items():
            node.attributes[key] = ir.AttrInt64s(key, value)
        self._set_weight(graph, node, second_w.astype(w.dtype), names, weight, "lowrank_v")
        if macs is None:  # spatial sizes unknown: MACs per output position (the k x 1 conv counted at its own)
            positions = None
            macs = cost
        return {"op": "Conv", "form": form, **info, "nodes": [hidden.producer().name, node.name], "params_before": int(w.size), "params_after": int(cost),
                "bytes_before": int(w.nbytes), "bytes_after": int(cost) * w.dtype.itemsize,
                "macs_before": (positions or 1) * int(w.size), "macs_after": macs,
                "macs_unit": "model" if positions else "per output position"}

    @staticmethod
    def _initializer(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
        name = names.fresh(base)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        value.dtype = value.const_value.dtype
        value.shape = ir.Shape(array.shape)
        graph.register_initializer(value)
        return value

    def _first(self, graph, node, op_type, x, array, attrs, names, weight) -> ir.Value:
        base = weight.name or node.name or op_type
        w_value = self._initializer(graph, names, f"{base}_lowrank_u", array)
        first = ir.node(op_type, [x, w_value], attributes=attrs, name=names.fresh(f"{node.name or op_type}_lowrank"))
        out = first.outputs[0]
        out.name = names.fresh(f"{node.name or base}_lowrank_hidden")
        out.dtype = w_value.dtype
        graph.insert_before(node, first)
        return out

    def _set_weight(self, graph, node, array, names, weight, hint) -> None:
        value = self._initializer(graph, names, f"{weight.name or node.name}_{hint}", array)
        node.replace_input_with(1, value)
        drop_if_unused(graph, weight)

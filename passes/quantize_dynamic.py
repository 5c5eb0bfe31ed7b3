"""Dynamic int8 quantization: int8 weights stored, activations quantized per run by DynamicQuantizeLinear.

Each MatMul with a constant 2-D float32 weight ``W`` (K x N), and each Gemm (``transB`` read, ``alpha``
and ``beta`` folded), becomes the pattern that onnxruntime's own ``quantize_dynamic`` writes and that
its graph optimizer fuses into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``::

    A_q, a_scale, a_zp = DynamicQuantizeLinear(A)              # uint8, per tensor, at run time
    acc   = MatMulInteger(A_q, W_q, a_zp, w_zp)                 # int32; W_q int8, w_zp = 0 per column
    scale = Mul(a_scale, w_scale)                               # [N] (or scalar per tensor)
    Y     = Mul(Cast(acc, to=float), scale)  [-> Add(Y, bias)]  # bias stays float

The math: ``w_scale_n = max_k |W[k, n]| / m`` with ``m = 2**(weight_bits - 1) - 1`` (127; 63 where the
target's u8s8 kernels add product pairs into int16 with saturation, see ``onnxopt.target``);
``W_q = round(W / w_scale)``, zero point 0 (symmetric). The activation's error is at most
``a_scale / 2`` per element, the weight's ``w_scale_n / 2``. Several MatMuls that read the same
activation (the Q/K/V projections) share one DynamicQuantizeLinear.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_LAYOUTS", "QuantizeDynamic"]

import copy
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import LossyNodes, NameScope, OnnxoptPass, constant_array, drop_if_unused
from onnxopt.passes.quantize import TARGET_WEIGHT_BITS, _matches, already_quantized, node_label

logger = logging.getLogger(__name__)

_SUPPORTED = ("MatMul", "Gemm")
# "row": every activation per row; "tensor": per tensor (onnxruntime's layout); "auto": per tensor, and
# the budget's fallback steps a harmful layer's input to per row before it goes float.
ACTIVATION_LAYOUTS = ("row", "tensor", "auto")
_MS = "com.microsoft"
_MIN_SCALE = 1e-12


def _quantize_weight(w: np.ndarray, per_channel: bool, weight_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 ``W_q``, float32 scale per column or one scale): symmetric, zero point 0."""
    w = w.astype(np.float32)
    absmax = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max(), np.float32)
    scale = np.maximum(absmax.astype(np.float32) / np.float32(weight_max), np.float32(_MIN_SCALE)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -weight_max, weight_max).astype(np.int8)
    return q, scale


class QuantizeDynamic(LossyNodes, OnnxoptPass):
    """Replace MatMul/Gemm with constant weights by DynamicQuantizeLinear → MatMulInteger → Cast → Mul.

    Rules:
    - a MatMul whose input B is a constant 2-D float32 tensor and whose input A is float32 (of known
      rank >= 2 where recorded; a 1-D A is left alone);
    - a Gemm with ``transA = 0`` and a constant B (``transB`` read); ``alpha`` is folded into the weight,
      ``beta * C`` is added after the scale Mul as a float bias (a non-constant C with ``beta != 1``
      is left alone);
    - ``op_types`` limits the kinds; ``exclude`` names nodes (op type, name, label or fnmatch pattern);
    - weights per column (``per_channel``) or per tensor, int8 symmetric with ``weight_bits`` 8 (values
      in [-127, 127]) or 7 ([-63, 63], for x86 without VNNI: ``for_target``);
    - a weight read by several nodes is quantized once; its float copy is dropped when no other node
      reads it;
    - a model that is already quantized (Q/DQ, QLinear*, *Integer, MatMulNBits) is left as it is.
    """

    name = "quantize-dynamic"

    @property
    def lossy(self) -> bool:
        """Weights rounded to int8 and activations to uint8 at run time change the outputs."""
        return True

    def __init__(
        self,
        per_channel: bool = True,
        op_types: Iterable[str] = _SUPPORTED,
        exclude: Iterable[str] = (),
        weight_bits: int = 8,
        target: str | None = None,
        embeddings: bool = True,
        activations: str = "row",
        smooth_alpha: float | str | None = None,
        act_absmax: Mapping[str, np.ndarray] | None = None,
        row_units: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if activations not in ACTIVATION_LAYOUTS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_LAYOUTS)}, not {activations!r}")
        if smooth_alpha is not None and smooth_alpha != "auto" and not (
                isinstance(smooth_alpha, (int, float)) and 0.0 <= float(smooth_alpha) <= 1.0):
            raise ValueError(f"smooth_alpha {smooth_alpha!r}: a number in [0, 1], 'auto', or None")
        if smooth_alpha is not None and activations == "tensor":
            raise ValueError("smoothing needs activations quantized per row: per tensor, the rows' spread, not the "
                             "channels', sets the step")
        if target is not None:
            if target not in TARGET_WEIGHT_BITS:
                raise ValueError(f"target must be one of {', '.join(TARGET_WEIGHT_BITS)}, not {target!r}")
            weight_bits = TARGET_WEIGHT_BITS[target]
        if weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 8, or 7 for CPUs whose int8 kernels saturate int16 pair sums, "
                             f"not {weight_bits!r}")
        op_types = tuple(op_types)
        unknown = [t for t in op_types if t not in _SUPPORTED]
        if unknown:
            raise ValueError(f"op_types: {', '.join(unknown)} not supported (only {', '.join(_SUPPORTED)})")
        self.per_channel = per_channel
        self.op_types = op_types
        self.exclude = tuple(exclude)
        self.weight_bits = weight_bits
        self.target = target
        self.embeddings = embeddings
        self.activations = activations
        self.row_units = tuple(row_units)
        self.row_activations: frozenset[str] = frozenset()  # inputs the budget's steps made per row, by name
        self.partial = True  # the budget's way back may stop at "per row" (``final_steps`` turns it off)
        self.smooth_alpha = smooth_alpha if smooth_alpha in (None, "auto") else float(smooth_alpha)
        self.act_absmax = dict(act_absmax or {})

    def for_target(self, target: str) -> QuantizeDynamic:
        """The same recipe with the weight bits that ``target`` needs (7 on x86 without VNNI)."""
        return QuantizeDynamic(per_channel=self.per_channel, op_types=self.op_types, exclude=self.exclude,
                               target=target, embeddings=self.embeddings, activations=self.activations,
                               smooth_alpha=self.smooth_alpha, act_absmax=self.act_absmax, row_units=self.row_units)

    @property
    def rows(self) -> bool:
        """Every activation quantized per row."""
        return self.activations == "row"

    # ------------------------------------------------------------------ the budget's steps
    def undo_step(self, unit: str) -> str:
        """What ``excluding([unit])`` makes of ``unit``: with ``activations="auto"`` a MatMul/Gemm whose
        input is quantized per tensor goes "per row" first, then "float"; a layer whose input is per row
        already (a sibling reading the same activation was stepped) goes to "float"."""
        if (self.activations != "auto" or not self.partial or unit in self.details.get("per_row", ())
                or unit in self.row_units or unit not in self.details.get("inputs", {})):  # tables, QAttention
            return "float"
        return "per row"

    def excluding(self, units) -> QuantizeDynamic:
        """The way back one step (``undo_step``): per tensor -> per row (``row_units``; every reader of
        that activation shares it) -> float (``exclude``)."""
        units = list(units)
        up = [u for u in units if self.undo_step(u) == "per row"]
        new = super().excluding([u for u in units if u not in up])
        new.row_units = (*self.row_units, *[u for u in up if u not in self.row_units])
        inputs = self.details.get("inputs", {})
        new.row_activations = self.row_activations | {inputs[u] for u in up if inputs.get(u)}
        return new

    def final_steps(self) -> QuantizeDynamic:
        """The same pass whose way back goes to float at once (the budget's fallback, when steps to
        per row stopped moving its metric)."""
        new = copy.copy(self)
        new.partial = False
        return new

    def isolating(self, units) -> QuantizeDynamic:
        """The same pass rewriting only ``units`` of its last run (each as it was), every other one left
        float: the budget measures what one unit alone does to the outputs."""
        keep = set(units)
        return LossyNodes.excluding(self, [u for u in self.units if u not in keep])

    @property
    def weight_max(self) -> int:
        """The largest |int8 weight| written: 127 for 8-bit weights, 63 for 7-bit."""
        return 2 ** (self.weight_bits - 1) - 1

    # ------------------------------------------------------------------ checks
    def _refusal(self, node: ir.Node) -> str | None:
        """Why ``node`` stays float, or None when it can be rewritten."""
        if any(_matches(p, node) for p in self.exclude):
            return "excluded"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "missing input"
        a, b = node.inputs[0], node.inputs[1]
        if a.dtype is not None and a.dtype != ir.DataType.FLOAT:
            return f"input A is {a.dtype.name} (DynamicQuantizeLinear takes float32)"
        w = constant_array(b)
        if w is None:
            return "weight B is not a constant (both operands are activations)"
        if w.dtype != np.float32:
            return f"weight dtype {w.dtype} (only float32)"
        if w.ndim != 2:
            return f"weight of rank {w.ndim} (only 2-D)"
        if node.op_type == "MatMul" and a.shape is not None and len(a.shape) < 2:
            return "input A is 1-D"
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                return "Gemm with transA=1"
            beta = node.attributes.get_float("beta", 1.0)
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and beta != 1.0 and constant_array(c) is None:
                return "Gemm with beta != 1 and a non-constant C"
        return None

    def smoothing_inputs(self, model: ir.Model) -> list[str]:
        """The activations this pass would quantize (the input A of each MatMul/Gemm it would rewrite):
        the tensors whose per-channel max|x| smoothing needs (``act_absmax``)."""
        names = []
        for node in model.graph:
            if (node.op_type in self.op_types and node.domain in ("", "ai.onnx") and self._refusal(node) is None
                    and node.inputs[0].name and node.inputs[0].name not in names):
                names.append(node.inputs[0].name)
        return names

    # ------------------------------------------------------------------ rewrite
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {"quantized": [], "embeddings": [], "left": {}, "weights": {}, "activations": self.activations,
                        "row_units": list(self.row_units),
                        "weight_range": [-self.weight_max, self.weight_max],
                        "per_channel": self.per_channel, "target": self.target}
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 11:
            self.summary = f"opset {opset} < 11: DynamicQuantizeLinear needs opset 11; nothing quantized"
            self.details["left"]["model"] = self.summary
            return ir.passes.PassResult(model, modified=False)
        marks = already_quantized(model, weight_only=True)
        if marks:
            self.summary = f"already quantized ({marks[0]}, ...): nothing done"
            self.details["left"]["model"] = self.summary
            logger.warning("quantize-dynamic: %s", self.summary)
            return ir.passes.PassResult(model, modified=False)

        graph = model.graph
        names = NameScope(graph)
        dq_inputs: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}   # id(A) -> (A_q, a_scale, a_zp)
        weights: dict[tuple[int, bool, float], tuple[ir.Value, ir.Value, ir.Value]] = {}  # (id(B), transposed, alpha)
        total = 0
        chosen: list[tuple[ir.Node, str]] = []
        for node in list(graph):
            if node.op_type not in _SUPPORTED or node.domain not in ("", "ai.onnx"):
                continue
            total += 1
            label = node_label(node)
            if node.op_type not in self.op_types:
                self.details["left"][label] = f"op type {node.op_type} not in op_types"
                continue
            why = self._refusal(node)
            if why is not None:
                self.details["left"][label] = why
                by_design = why == "excluded" or why.startswith("weight B is not a constant")
                (logger.info if by_design else logger.warning)("quantize-dynamic: %s stays float: %s", label, why)
                continue
            chosen.append((node, label))
        self._constants: dict[str, ir.Value] = {}
        self._opset = opset
        self._row_inputs = {id(node.inputs[0]) for node, label in chosen
                            if self.rows or label in self.row_units or node.inputs[0].name in self.row_activations}
        self.details["inputs"] = {label: node.inputs[0].name for node, label in chosen}
        self.details["per_row"] = [label for node, label in chosen if id(node.inputs[0]) in self._row_inputs]
        self._smoothing = self._smoothing_scales(chosen) if self.smooth_alpha is not None else {}
        if self.smooth_alpha is not None:
            self.details["smoothed"] = {name: {"alpha": alpha, "channels": int(sc.size),
                                               "range_before": r[0], "range_after": r[1]}
                                        for name, (sc, r, alpha) in self._smoothing.items()}
        for node, label in chosen:
            self._rewrite(graph, node, label, names, dq_inputs, weights)
            self.details["quantized"].append(label)
            logger.info("quantize-dynamic: %s (%s) runs on integers", label, node.op_type)
        # per tensor, for QAttention: a MatMul's DynamicQuantizeLinear of the same input serves it too
        tensor_inputs = {key: q for key, q in dq_inputs.items() if key not in self._row_inputs}
        self._attention_weights: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        attentions = 0
        for node in list(graph):
            if node.op_type != "Attention" or node.domain != _MS:
                continue
            label = node_label(node)
            why = self._attention_refusal(node)
            if why is not None:
                self.details["left"][label] = why
                logger.warning("quantize-dynamic: %s stays float: %s", label, why)
                continue
            self._rewrite_attention(graph, node, label, names, tensor_inputs)
            self.details["quantized"].append(label)
            attentions += 1
        tables: dict[int, tuple[ir.Value, ir.Value]] = {}
        for node in list(graph) if self.embeddings else ():
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            why = self._table_refusal(node)
            if why == "":
                continue  # not an embedding table (a shape Gather, an activation)
            label = node_label(node)
            if why is not None:
                self.details["left"][label] = why
                continue
            self._rewrite_table(graph, node, names, tables)
            self.details["embeddings"].append(label)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is not graph and node.op_type in _SUPPORTED:
                total += 1
                self.details["left"][node_label(node)] = "inside a subgraph"
        done = len(self.details["quantized"]) - attentions
        if done or self.details["embeddings"] or attentions:
            graph.sort()
            model.metadata_props["onnxopt.quantization.target"] = self.target or "unspecified"
            model.metadata_props["onnxopt.quantization.weight_range"] = f"[{-self.weight_max}, {self.weight_max}]"
        self.summary = (
            f"dynamic int8: {done} of {total} MatMul/Gemm on integers ({len(dq_inputs)} activations quantized at run "
            f"time, {len(weights)} weights {'per-channel' if self.per_channel else 'per-tensor'}"
            f"{', 7-bit' if self.weight_bits == 7 else ''}); {total - done} left float"
            + (f"; {attentions} Attention as QAttention (activations per tensor)" if attentions else "")
            + (f"; {len(tables)} embedding tables int8 per row" if tables else "")
            + ("; activations per row" if self.rows else "; activations per tensor" + (
                f" ({len(self._row_inputs)} of {len(dq_inputs)} per row, read by {len(self.details['per_row'])} layers;"
                f" the budget stepped {sum(u not in self.exclude for u in self.row_units)})"
                if self._row_inputs else ""))
            + (f", {len(self._smoothing)} smoothed (alpha {self.smooth_alpha})" if self._smoothing else
               ", none smoothed (smoothing applies to activations quantized per row)" if self.smooth_alpha is not None
               else "")
        )
        if any(n.domain == _MS for n in graph) and _MS not in model.opset_imports:
            model.opset_imports[_MS] = 1
        return ir.passes.PassResult(model, modified=bool(done or tables or attentions))

    # ------------------------------------------------------------------ fused attention
    def _attention_refusal(self, node: ir.Node) -> str | None:
        """None when a com.microsoft Attention (fused by onnxruntime's transformer optimizer: input,
        packed Q/K/V weight, bias, optional mask_index) can become QAttention, else why not."""
        if any(_matches(p, node) for p in self.exclude):
            return "excluded"
        if len(node.inputs) < 3 or node.inputs[0] is None or node.inputs[1] is None or node.inputs[2] is None:
            return "Attention without input, weight and bias"
        if any(v is not None for v in node.inputs[4:]):
            return "Attention with past state or an attention bias (QAttention takes neither here)"
        if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
            return "Attention's present output is read"
        extra = set(node.attributes) - {"num_heads", "unidirectional", "mask_filter_value", "scale"}
        if extra:
            return f"Attention attributes QAttention lacks: {', '.join(sorted(extra))}"
        if node.inputs[0].dtype is not None and node.inputs[0].dtype != ir.DataType.FLOAT:
            return f"input is {node.inputs[0].dtype.name}"
        w, bias = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return "the packed Q/K/V weight is not a constant 2-D float32 tensor"
        if bias is None or bias.dtype != np.float32 or bias.shape != (w.shape[1],):
            return "the bias is not a constant float32 vector of the weight's columns"
        return None

    def _rewrite_attention(self, graph: ir.Graph, node: ir.Node, label: str, names: NameScope,
                           tensor_inputs: dict) -> None:
        """Attention(x, W, b, mask) -> QAttention(DynamicQuantizeLinear(x), W_q, b, x_scale, w_scale, mask,
        x_zp, 0): onnxruntime's quantized attention; W per column (3 x hidden scales), int8, zero point 0.
        QAttention reads one activation scale: per tensor, whatever ``activations`` says."""
        a, b = node.inputs[0], node.inputs[1]
        if id(b) not in self._attention_weights:  # a packed weight two Attention nodes read: stored once
            q, scale = _quantize_weight(constant_array(b), self.per_channel, self.weight_max)
            base = b.name or label
            self._attention_weights[id(b)] = (_const(graph, names, f"{base}_quantized", q),
                                              _const(graph, names, f"{base}_scale", scale),
                                              _const(graph, names, f"{base}_zero_point", np.zeros(scale.shape, np.int8)))
            self.details["weights"][base] = {"shape": list(q.shape), "bytes_before": int(q.size * 4),
                                             "bytes_after": int(q.nbytes + scale.nbytes + scale.size)}
        w_q, w_s, w_zp = self._attention_weights[id(b)]
        if id(a) not in tensor_inputs:
            tensor_inputs[id(a)] = _quantize_tensor(graph, node, a, label, names)
        a_q, a_s, a_zp = tensor_inputs[id(a)]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attributes = {k: v.value for k, v in node.attributes.items()}
        qattention = ir.node("QAttention", [a_q, w_q, node.inputs[2], a_s, w_s, mask, a_zp, w_zp], domain=_MS,
                             attributes=attributes, name=names.fresh(f"{label}_quant"))
        out = qattention.outputs[0]
        out.name, out.dtype = names.fresh(f"{label}_quant_output"), ir.DataType.FLOAT
        ir.convenience.replace_nodes_and_values(graph, node, [node], [qattention], [node.outputs[0]], [out])
        drop_if_unused(graph, b)

    # ------------------------------------------------------------------ embedding tables
    def _table_refusal(self, node: ir.Node) -> str | None:
        """None when ``node`` reads an embedding table that can be stored int8, "" when it reads no
        table at all, else why the table stays float."""
        table = node.inputs[0] if node.inputs else None
        t = constant_array(table) if table is not None else None
        if t is None or t.dtype.kind != "f":
            return ""
        if any(_matches(p, node) for p in self.exclude):
            return "excluded"
        if t.dtype != np.float32 or t.ndim != 2:
            return f"table {t.dtype} of rank {t.ndim} (only 2-D float32)"
        if node.attributes.get_int("axis", 0) != 0:
            return "Gather on axis 1"
        if any(u.node.op_type != "Gather" or u.idx != 0 or u.node.attributes.get_int("axis", 0) != 0
               for u in table.uses()) or table.is_graph_output() or table.is_graph_input():
            return "the table is also read by something other than a Gather of rows (tied weights)"
        return None

    def _rewrite_table(self, graph: ir.Graph, node: ir.Node, names: NameScope, tables: dict) -> None:
        """Gather(table, ids) -> Cast(Gather(table_int8, ids)) * Unsqueeze(Gather(row_scales, ids)):
        each row stored as int8 with its own scale (max|row| / weight_max), read rows dequantized
        after the Gather, so that only the rows a run needs are turned back into floats."""
        table = node.inputs[0]
        if id(table) not in tables:
            t = constant_array(table)
            scale = np.abs(t).max(axis=1) / self.weight_max
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(t / scale[:, None]), -self.weight_max, self.weight_max).astype(np.int8)
            base = table.name or node_label(node)
            q_value = ir.Value(name=names.fresh(f"{base}_int8"), const_value=ir.tensor(q))
            s_value = ir.Value(name=names.fresh(f"{base}_row_scale"), const_value=ir.tensor(scale))
            for v in (q_value, s_value):
                v.const_value.name = v.name
                v.dtype, v.shape = v.const_value.dtype, v.const_value.shape
                graph.register_initializer(v)
            tables[id(table)] = (q_value, s_value)
            self.details["weights"][base] = {"shape": list(t.shape), "bytes_before": int(t.nbytes),
                                             "bytes_after": int(q.nbytes + scale.nbytes)}
        q_value, s_value = tables[id(table)]
        ids, out = node.inputs[1], node.outputs[0]
        axes = ir.Value(name=names.fresh(f"{node_label(node)}_axes"), const_value=ir.tensor(np.array([-1], np.int64)))
        axes.const_value.name = axes.name
        axes.dtype, axes.shape = axes.const_value.dtype, axes.const_value.shape
        graph.register_initializer(axes)
        rows = ir.node("Gather", [q_value, ids], attributes={"axis": 0}, name=names.fresh(f"{node.name or 'Gather'}_int8"))
        row_scales = ir.node("Gather", [s_value, ids], attributes={"axis": 0}, name=names.fresh(f"{node.name or 'Gather'}_scale"))
        floats = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=names.fresh("Cast_rows"))
        wide = ir.node("Unsqueeze", [row_scales.outputs[0], axes], name=names.fresh("Unsqueeze_scale"))
        mul = ir.node("Mul", [floats.outputs[0], wide.outputs[0]], name=names.fresh(f"{node.name or 'Gather'}_dequantized"))
        graph.insert_before(node, [rows, row_scales, floats, wide, mul])
        out.replace_all_uses_with(mul.outputs[0])
        if out.is_graph_output():
            graph.outputs[graph.outputs.index(out)] = mul.outputs[0]
        name, shape, type_ = out.name, out.shape, out.type
        graph.remove(node, safe=True)
        mul.outputs[0].name, mul.outputs[0].shape, mul.outputs[0].type = name, shape, type_
        if not table.uses():
            graph.initializers.pop(table.name, None)

    def _smoothing_scales(self, chosen: list[tuple[ir.Node, str]]) -> dict[str, tuple]:
        """Activation name -> (s, (range before, after), alpha): SmoothQuant's per-channel migration for each
        activation with calibrated ``act_absmax``, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` over
        the rows j of every quantized reader's weight. The pass then quantizes ``X / s`` per row and
        ``s W``: exact in real arithmetic, one Mul added per activation (shared by its readers)."""
        from onnxopt.passes.smooth_quant import choose_alpha, smoothing_scales

        readers: dict[str, list[np.ndarray]] = {}
        for node, _ in chosen:
            a = node.inputs[0]
            if a.name in self.act_absmax and id(a) in self._row_inputs:  # per tensor, the rows set the step
                readers.setdefault(a.name, []).append(self._weight(node))
        scales = {}
        for name, ws in readers.items():
            x_max = np.abs(np.asarray(self.act_absmax[name], np.float64)).reshape(-1)
            if any(w.shape[0] != x_max.size for w in ws):
                continue  # statistics of another layout: leave this activation unsmoothed
            w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0).astype(np.float64)
            if self.smooth_alpha == "auto":
                alpha, s = choose_alpha(x_max, w_max, [w.astype(np.float64) for w in ws])
                if s is None:
                    continue
            else:
                alpha, s = self.smooth_alpha, smoothing_scales(x_max, w_max, self.smooth_alpha)
            spread = lambda v: round(float(v.max() / max(np.median(v), 1e-12)), 2)  # noqa: E731
            scales[name] = (s.astype(np.float32), (spread(x_max), spread(x_max / s)), alpha)
        return scales

    @staticmethod
    def _weight(node: ir.Node) -> np.ndarray:
        """The node's weight as K x N float32 (Gemm's ``transB`` undone, ``alpha`` folded)."""
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        w = constant_array(node.inputs[1])
        return ((w.T if transposed else w) * np.float32(alpha)).astype(np.float32)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, label: str, names: NameScope,
                 dq_inputs: dict, weights: dict) -> None:
        a, b = node.inputs[0], node.inputs[1]
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        smooth = self._smoothing.get(a.name, (None,))[0] if a.name else None
        key = (id(b), transposed, alpha, a.name if smooth is not None else None)
        if key not in weights:
            w = self._weight(node)
            if smooth is not None:
                w = (w * smooth[:, None]).astype(np.float32)
            q, scale = _quantize_weight(w, self.per_channel, self.weight_max)
            base = b.name or label
            w_q = _const(graph, names, f"{base}_quantized", q)
            w_zp = _const(graph, names, f"{base}_zero_point", np.zeros(scale.shape, np.int8))
            w_s = _const(graph, names, f"{base}_scale", scale)
            weights[key] = (w_q, w_zp, w_s)
            self.details["weights"][base] = {"shape": list(w.shape), "bytes_before": int(w.nbytes),
                                             "bytes_after": int(q.nbytes + scale.nbytes + scale.size)}
        w_q, w_zp, w_s = weights[key]
        new_nodes: list[ir.Node] = []
        row_wise = self._row_wise(a)
        if id(a) not in dq_inputs and row_wise:
            dq_inputs[id(a)] = self._quantize_rows(graph, node, a, label, names)
        if id(a) not in dq_inputs:
            dq_inputs[id(a)] = _quantize_tensor(graph, node, a, label, names)
        a_q, a_s, a_zp = dq_inputs[id(a)]
        if row_wise:
            # MatMulIntegerToFloat at unit activation scale, then the rows' scales: not Mul(acc, Mul(a_scale,
            # w_scale)), which onnxruntime fuses into a MatMulIntegerToFloat reading a_scale as one scalar
            one = self._shared(graph, names, "unit", np.array(1.0, np.float32))
            acc = ir.node("MatMulIntegerToFloat", [a_q, w_q, one, w_s, a_zp, w_zp], domain=_MS,
                          name=names.fresh(f"{label}_quant"))
            out = ir.node("Mul", [acc.outputs[0], a_s], name=names.fresh(f"{label}_output_scale_mul"))
            made = [acc, out]
        else:
            acc = ir.node("MatMulInteger", [a_q, w_q, a_zp, w_zp], name=names.fresh(f"{label}_quant"))
            cast = ir.node("Cast", [acc.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                           name=names.fresh(f"{label}_cast"))
            scales = ir.node("Mul", [a_s, w_s], name=names.fresh(f"{label}_scales_mul"))
            out = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=names.fresh(f"{label}_output_scale_mul"))
            made = [scales, acc, cast, out]
        for n in made:
            n.outputs[0].name = names.fresh(f"{n.name}_output")
            n.outputs[0].dtype = ir.DataType.FLOAT
        if not row_wise:
            acc.outputs[0].dtype = ir.DataType.INT32
        # The output's shape, where known: onnxruntime's fusions downstream (SkipLayerNormalization, BiasGelu)
        # match on shapes, which no shape inference carries through a com.microsoft node.
        shape = node.outputs[0].shape or _output_shape(a, w_q)
        acc.outputs[0].shape = out.outputs[0].shape = shape
        new_nodes += made
        last = out
        c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if c is not None:
            beta = node.attributes.get_float("beta", 1.0)
            bias = c
            if beta != 1.0:
                bias = _const(graph, names, f"{c.name or label}_beta", (constant_array(c) * np.float32(beta)).astype(np.float32))
            last = ir.node("Add", [out.outputs[0], bias], name=names.fresh(f"{label}_bias_add"))
            last.outputs[0].name = names.fresh(f"{last.name}_output")
            last.outputs[0].dtype, last.outputs[0].shape = ir.DataType.FLOAT, out.outputs[0].shape
            new_nodes.append(last)
        old_inputs = [v for v in node.inputs[1:] if v is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [last.outputs[0]])
        for value in old_inputs:
            drop_if_unused(graph, value)

    def _shared(self, graph: ir.Graph, names: NameScope, key: str, array: np.ndarray) -> ir.Value:
        """One initializer per graph for each of the per-row layout's small constants (the file of a
        small model would otherwise carry six of them per activation)."""
        if key not in self._constants:
            self._constants[key] = _const(graph, names, f"onnxopt_dynamic_{key}", array)
        return self._constants[key]

    def _row_wise(self, a: ir.Value) -> bool:
        """Whether activation ``a`` is quantized per row (else per tensor): all with ``activations="row"``,
        else those a stepped unit (``row_units``) reads; its other readers share the per-row form."""
        return id(a) in self._row_inputs

    def _quantize_rows(self, graph: ir.Graph, node: ir.Node, a: ir.Value, label: str,
                       names: NameScope) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``(A_q, a_scale, a_zp)`` with one scale per row of A (the last axis), symmetric:
        ``peak = max(ReduceMax(A), -ReduceMin(A))`` per row, ``a_scale = peak / 127`` ([..., M, 1]),
        ``A_q = QuantizeLinear(A * (127 / peak), 1, 128)`` (uint8 in [1, 255]), so that the zero point
        MatMulInteger reads is the scalar 128 and ``a_scale`` broadcasts over the output's columns. Two
        reductions and a multiply by the reciprocal: measured 1-3% faster on all-MiniLM-L6-v2 than Abs,
        one reduction and a Div. A smoothed activation is multiplied by ``1 / s`` first."""
        base = a.name or label
        nodes: list[ir.Node] = []

        def add(op, inputs, dtype=ir.DataType.FLOAT, **attributes):
            n = ir.node(op, inputs, attributes=attributes, name=names.fresh(f"{base}_row_{op}"))
            n.outputs[0].name = names.fresh(f"{n.name}_output")
            n.outputs[0].dtype = dtype
            nodes.append(n)
            return n.outputs[0]

        def reduce(op: str, x: ir.Value) -> ir.Value:
            if self._opset >= 18:  # axes became an input
                return add(op, [x, self._shared(graph, names, "last_axis", np.array([-1], np.int64))], keepdims=1)
            return add(op, [x], axes=[-1], keepdims=1)

        smooth = self._smoothing.get(a.name, (None,))[0] if a.name else None
        if smooth is not None:
            a = add("Mul", [a, _const(graph, names, f"{base}_smooth_inverse", (1.0 / smooth).astype(np.float32))])
        floor = self._shared(graph, names, "row_floor", np.array(_MIN_SCALE * 127, np.float32))  # an all-zero row
        peak = add("Max", [reduce("ReduceMax", a), add("Neg", [reduce("ReduceMin", a)]), floor])
        scale = add("Mul", [peak, self._shared(graph, names, "row_step", np.array(1 / 127, np.float32))])
        levels = add("Div", [self._shared(graph, names, "row_levels", np.array(127, np.float32)), peak])
        unit = self._shared(graph, names, "unit", np.array(1.0, np.float32))
        offset = self._shared(graph, names, "row_zero_point", np.array(128, np.uint8))
        a_q = add("QuantizeLinear", [add("Mul", [a, levels]), unit, offset], ir.DataType.UINT8)
        a_q.shape = a.shape
        graph.insert_before(node, nodes)
        return a_q, scale, offset


def _quantize_tensor(graph: ir.Graph, node: ir.Node, a: ir.Value, label: str,
                     names: NameScope) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``(A_q, a_scale, a_zp)`` of one DynamicQuantizeLinear before ``node``: uint8, one scale per tensor."""
    dql = ir.node("DynamicQuantizeLinear", [a], name=names.fresh(f"{a.name or label}_DynamicQuantizeLinear"),
                  num_outputs=3)
    for out, suffix, dtype in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                  (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
        out.name, out.dtype = names.fresh(f"{a.name or label}_{suffix}"), dtype
    dql.outputs[0].shape = a.shape
    graph.insert_before(node, dql)
    return tuple(dql.outputs)


def _output_shape(a: ir.Value, w_q: ir.Value) -> ir.Shape | None:
    """``A @ W``'s shape from A's (rank >= 2, known) and the weight's columns, else None."""
    if a.shape is None or len(a.shape) < 2:
        return None
    return ir.Shape([*a.shape[:-1], w_q.const_value.shape[1]])


def _const(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph`` holding ``array``."""
    name = names.fresh(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = value.const_value.shape
    graph.register_initializer(value)
    return value

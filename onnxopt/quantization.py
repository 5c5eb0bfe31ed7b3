"""The pipeline's quantization step: check the inputs, calibrate, quantize, measure, fall back to float.

``optimize`` hands a ``QuantizeQDQ`` without ranges to ``QuantizationStep``; the step calibrates
on the ``--calibration`` data (streamed, ``onnxopt.calibrate``), runs the pass, and when an
accuracy budget is given, keeps the most harmful layers in float until the budget is met:

- with labels in the evaluation data: accuracy may drop at most ``max_drop`` points (default 1.0);
- without labels: every output's cosine to the float model must reach ``min_cosine`` (default 0.99).

Harm is measured per quantized node as the signal-to-quantization-noise ratio (SQNR) it loses:
the SQNR of its output against the float model, subtracted from the lowest SQNR of its inputs.
"""

from __future__ import annotations

__all__ = ["QuantizationStep", "DEFAULT_MAX_DROP", "DEFAULT_MIN_COSINE", "integer_node_count"]

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt.calibrate import DEFAULT_PERCENTILE, METHODS, calibrate
from onnxopt.data import Dataset, stream_data, synthetic_data
from onnxopt.errors import ModelLoadError, OptionError
from onnxopt.observe import DEFAULT_MAX_BYTES, BatchSplitter, ChannelMeanObserver, ErrorObserver, expose, optimized_ops
from onnxopt.passes.quantize import QuantizeQDQ, already_quantized, node_label
from onnxopt.report import Report, Validation
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 1.0  # accuracy points
DEFAULT_MIN_COSINE = 0.99
MAX_FALLBACK_ROUNDS = 8
SQNR_BATCHES = 4
# A quantized model whose Conv/Gemm/MatMul MACs stay float beyond this share is a failure.
MAX_FLOAT_SHARE = 0.5
_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INTEGER_OPS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")


def integer_node_count(ops: dict[str, int]) -> int:
    """Nodes of onnxruntime's optimized graph that compute on integers."""
    return sum(n for op, n in ops.items() if op.startswith(_INTEGER_OPS))


class QuantizationStep:
    """Everything ``optimize`` does for a ``quantize`` pass; built before any pass runs, so bad input fails first."""

    def __init__(
        self,
        model: ir.Model,
        label: str,
        *,
        calibration,
        method: str = "minmax",
        percentile: float = DEFAULT_PERCENTILE,
        max_drop: float | None = None,
        min_cosine: float | None = None,
        batch_size: int | None = None,
        dims: dict[str, int] | None = None,
        providers: str | Sequence[str] = "cpu",
    ) -> None:
        if calibration is None:
            raise OptionError(
                "quantize needs calibration data: pass --calibration FILE (.npz, folder of .npy, onnx test data), "
                "or --calibration synthetic to calibrate on random inputs (flagged in the report)"
            )
        if method not in METHODS:
            raise OptionError(f"--calibrate {method}: unknown method (known: {', '.join(METHODS)})")
        if max_drop is not None and not max_drop >= 0:
            raise OptionError(f"--max-drop {max_drop}: must be zero or positive (accuracy points)")
        if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
            raise OptionError(f"--min-cosine {min_cosine}: must be between -1 and 1")
        marks = already_quantized(model)
        if marks:
            raise ModelLoadError(
                f"{label}: already quantized ({len(marks)} quantized nodes, e.g. {marks[0]}); "
                "quantize the float model instead"
            )
        self.notes: list[str] = []
        self.method, self.percentile = method, percentile
        self.max_drop, self.min_cosine = max_drop, min_cosine
        self.providers = providers
        self.synthetic = isinstance(calibration, str) and calibration == "synthetic"
        if self.synthetic:
            self.calibration = synthetic_data(model, dims=dims)
            self.notes.append("calibrated on SYNTHETIC random inputs (--calibration synthetic): ranges may not fit real data")
        else:
            self.calibration = stream_data(calibration, model, batch_size=batch_size, dims=dims)
        self.details: dict[str, Any] = {}
        self.verdict_failed: str | None = None

    @staticmethod
    def upgrade_opset(model: ir.Model, label: str) -> tuple[ir.Model, str | None]:
        """Per-axis DequantizeLinear needs opset 13: convert older models, or refuse clearly."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset >= 13:
            return model, None
        try:
            proto = onnx.version_converter.convert_version(ir.to_proto(model), 13)
            upgraded = ir.from_proto(proto)
        except Exception as exc:
            raise ModelLoadError(
                f"{label}: opset {opset} is below 13, which quantization needs, and onnx's converter "
                f"cannot upgrade it: {' '.join(str(exc).split())[:200]}"
            ) from None
        return upgraded, f"opset {opset} upgraded to 13 for quantization (onnx.version_converter)"

    # ------------------------------------------------------------------ the pass
    def run(
        self,
        p: QuantizeQDQ,
        model: ir.Model,
        evaluation: Dataset | None,
        original: ModelSnapshot | None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> ir.passes.PassResult:
        plan = p.plan(model)
        start = time.perf_counter()
        means = {}
        if p.bias_correction and p.input_means is None:
            means = {t: ChannelMeanObserver(axis) for t, axis in p.correctable_inputs(model).items()}
        ranges = calibrate(
            model, plan.tensors, self.calibration, method=self.method, percentile=self.percentile,
            activations=p.activations, providers=self.providers, total=len(self.calibration) or None,
            progress=(lambda i, n: progress("calibrate", i, n)) if progress else None, channel_means=means,
        )
        if means:
            p.input_means = {t: obs.mean for t, obs in means.items() if obs.mean is not None}
        self.details["calibration"] = {
            "method": self.method, "samples": self.calibration.num_samples, "batches": len(self.calibration),
            "tensors": len(ranges), "seconds": round(time.perf_counter() - start, 3), "synthetic": self.synthetic,
            **({"percentile": self.percentile} if self.method == "percentile" else {}),
        }
        float_model = model.clone()
        user_exclude = list(p.exclude)
        p.ranges = ranges
        result = p(model)
        # The verdict judges every validated run by the budget (the defaults when none is given), so
        # the fallback works towards the same budget.
        budgeted = evaluation is not None and original is not None
        fallback: list[dict[str, Any]] = []
        if budgeted:
            for round_ in range(1, MAX_FALLBACK_ROUNDS + 1):
                met, figure = self._meets_budget(original, model, evaluation)
                if met:
                    break
                harm = self._harm(float_model, model, p, evaluation)
                candidates = [(h, node) for node, h in harm if node not in p.exclude and h > 0]
                if not candidates:
                    break
                take = candidates[: 2 ** (round_ - 1)]
                for h, node in take:
                    fallback.append({"node": node, "round": round_, "reason": f"loses {h:.1f} dB SQNR ({figure})"})
                    logger.info("quantize: keeping %s in float: loses %.1f dB SQNR", node, h)
                model = float_model.clone()
                p = QuantizeQDQ(ranges, activations=p.activations, per_channel=p.per_channel,
                                exclude=[*p.exclude, *(node for _, node in take)],
                                quantize_outputs=p.quantize_outputs, bias_correction=p.bias_correction,
                                input_means=p.input_means)
                result = p(model)
            else:
                met, figure = self._meets_budget(original, model, evaluation)
            self.details["budget"] = {"met": met, "figure": figure}
            if not met:
                self.verdict_failed = f"accuracy budget not met after keeping {len(fallback)} layers in float: {figure}"
        self.details["fallback"] = fallback
        self.details["user_exclude"] = user_exclude
        if evaluation is not None:
            self.details["sqnr_db"] = self._sqnr(float_model, model, p, evaluation)
        self.pass_ = p
        self.float_model = float_model
        return ir.passes.PassResult(model, modified=result.modified)

    def _limits(self, labels: bool) -> tuple[float | None, float | None]:
        if labels:
            return (self.max_drop if self.max_drop is not None else DEFAULT_MAX_DROP), self.min_cosine
        return None, (self.min_cosine if self.min_cosine is not None else DEFAULT_MIN_COSINE)

    def _meets_budget(self, original: ModelSnapshot, model: ir.Model, evaluation: Dataset) -> tuple[bool, str]:
        from onnxopt.validate import compare_models

        candidate = ModelSnapshot(model)
        try:
            v = compare_models(original, candidate, evaluation, providers=self.providers, runtime_floor=False)
        finally:
            candidate.close()
        return self.judge(v)

    def judge(self, v: Validation) -> tuple[bool, str]:
        """The lossy verdict on a validation: accuracy drop with labels, else every output's cosine."""
        if v.error:
            return False, v.error
        max_drop, min_cosine = self._limits(v.accuracy_before is not None)
        parts, ok = [], True
        if max_drop is not None and v.accuracy_before is not None and v.accuracy_after is not None:
            drop = (v.accuracy_before - v.accuracy_after) * 100
            ok &= drop <= max_drop + 1e-9
            parts.append(f"accuracy drop {drop:.2f} points (budget {max_drop:g})")
        if min_cosine is not None:
            worst = min((o.cosine for o in v.outputs if not math.isnan(o.cosine)), default=float("nan"))
            ok &= worst >= min_cosine
            parts.append(f"min cosine {worst:.5f} (budget {min_cosine:g})")
        return bool(ok), "; ".join(parts)

    def _errors(self, float_model: ir.Model, model: ir.Model, tensor_map: dict[str, str], evaluation: Dataset,
                tensors: list[str]) -> dict[str, float]:
        """SQNR (dB) of each named float tensor as the quantized model computes it, over a few batches."""
        names = [t for t in tensors if t]
        ref_model, ref_names = expose(float_model, names)
        quant_names = [tensor_map.get(t, t) for t in names]
        cand_model, cand_names = expose(model, quant_names)
        ref_snap, cand_snap = ModelSnapshot(ref_model), ModelSnapshot(cand_model)
        inputs = {v.name for v in float_model.graph.inputs}
        observers = {t: ErrorObserver() for t in names}
        try:
            providers = resolve_providers(self.providers)
            ref = ref_snap.session(providers=providers, optimization="disabled")
            cand = cand_snap.session(providers=providers, optimization="disabled")
            # Both models' tensors are alive at once: each run gets half the observation budget.
            splitter = BatchSplitter(float_model, DEFAULT_MAX_BYTES // 2)
            for feed in evaluation.batches[:SQNR_BATCHES]:
                for part in splitter.parts(feed):
                    r_out = run_session(ref, part)
                    c_out = run_session(cand, part)
                    splitter.learn(part, [*r_out.values(), *c_out.values()])
                    for t, qt in zip(names, quant_names):
                        r = part[t] if t in inputs else r_out.get(t)
                        c = c_out.get(qt)
                        if r is not None and c is not None:
                            observers[t].update(r, c)
                    del r_out, c_out
        finally:
            ref_snap.close()
            cand_snap.close()
        return {t: obs.sqnr_db for t, obs in observers.items() if obs.signal > 0}

    def _sqnr(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset) -> dict[str, float]:
        io_map = p.details.get("io", {})
        tensors = sorted({t for ins, out in io_map.values() for t in (*ins, out)})
        errors = self._errors(float_model, model, p.details.get("tensor_map", {}), evaluation, tensors)
        return {t: round(v, 2) if math.isfinite(v) else v for t, v in sorted(errors.items(), key=lambda kv: kv[1])}

    def _harm(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset) -> list[tuple[str, float]]:
        """Quantized compute nodes by the SQNR they lose (input's worst minus output's), most harmful first."""
        io_map = p.details.get("io", {})
        errors = self._sqnr(float_model, model, p, evaluation)
        harm = []
        for node, (ins, out) in io_map.items():
            if out not in errors:
                continue
            before = min((errors[t] for t in ins if t in errors), default=float("inf"))
            before = min(before, 60.0)  # exact inputs (graph inputs at high SQNR) count as 60 dB
            harm.append((node, float(before - errors[out])))
        harm.sort(key=lambda kv: -kv[1])
        return harm

    # ------------------------------------------------------------------ the verdict
    def finish(self, report: Report, candidate: ModelSnapshot | None, original: ModelSnapshot | None) -> None:
        """Lossy verdict, integer-node count, file sizes and the never-silent checks, into ``report``."""
        p = getattr(self, "pass_", None)
        record = next((r for r in report.passes if r.name == QuantizeQDQ.name), None)
        details = record.details if record is not None else {}
        details.update(self.details)
        report.notes[:0] = self.notes
        if candidate is not None:
            try:
                ops = optimized_ops_of(candidate, self.providers)
                details["onnxruntime_ops"] = ops
                details["integer_nodes"] = integer_node_count(ops)
                report.notes.append(f"quantize: {details['integer_nodes']} integer nodes in onnxruntime's optimized graph")
            except Exception as exc:  # the validation reports a model onnxruntime cannot load
                logger.debug("optimized graph unavailable: %s", exc)
            if original is not None:
                details["file_bytes"] = {"float": original.nbytes, "int8": candidate.nbytes,
                                         "ratio": round(candidate.nbytes / max(original.nbytes, 1), 3)}
                report.notes.append(
                    f"quantize: file {original.nbytes / 1e3:.1f} kB -> {candidate.nbytes / 1e3:.1f} kB "
                    f"({details['file_bytes']['ratio']:.2f}x)"
                )
        worst = [(t, db) for t, db in self.details.get("sqnr_db", {}).items() if isinstance(db, float)][:3]
        if worst:
            report.notes.append("quantize: lowest SQNR " + ", ".join(f"{t} {db:.1f} dB" for t, db in worst)
                                + " (every tensor in the JSON report)")
        for item in self.details.get("fallback", []):
            report.notes.append(f"quantize: kept {item['node']} in float: {item['reason']}")
        failures = []
        if p is not None:
            quantized = p.details.get("quantized_nodes", [])
            weighted = p.details.get("weighted", {"float": 0, "total": 0})
            left = p.details.get("left", {})
            share = float_mac_share(self.float_model, set(quantized))
            details["float_mac_share"] = share
            if not quantized:
                failures.append("nothing was quantized")
            elif share is not None and share > MAX_FLOAT_SHARE:
                failures.append(f"{share:.0%} of the Conv/Gemm/MatMul MACs stay float")
            elif ((share is None or weighted.get("in_subgraphs")) and weighted["total"]
                  and weighted["float"] / weighted["total"] > MAX_FLOAT_SHARE):
                # Subgraph MACs are not in the share (no shapes there): count the nodes instead.
                failures.append(f"{weighted['float']} of {weighted['total']} Conv/Gemm/MatMul stay float")
            if share is not None:
                elsewhere = weighted.get("in_subgraphs")
                report.notes.append(f"quantize: {1 - share:.1%} of the Conv/Gemm/MatMul MACs are quantized"
                                    + (f" (main graph; {elsewhere} more in subgraphs stay float)" if elsewhere else ""))
            if failures:
                for node, why in list(left.items())[:10]:
                    report.notes.append(f"quantize: {node} stays float: {why}")
        lat = report.latency
        if lat is not None and lat.verdict == "slower":
            # Measured, not assumed: say so where the int8 model loses, and what to try.
            details["int8_slower"] = round(lat.ratio, 3)
            macs = f" at {report.before.macs / 1e6:.1f} M MACs per run" if report.before.macs else ""
            report.notes.append(
                f"quantize: the int8 model takes {lat.ratio:.2f}x the float model's time on {', '.join(lat.providers)}{macs}: "
                "onnxruntime's integer kernels, the input QuantizeLinear and its layout Transposes cost more than "
                "they save here; measure at the batch size and threads you deploy (--batch-size, --threads), or ship float"
            )
        v = report.validation
        if v is not None:
            ok, figure = self.judge(v)
            v.criterion = f"{figure} (lossy pass, not the lossless tolerance)"
            max_drop, min_cosine = self._limits(v.accuracy_before is not None)
            for o in v.outputs:
                o.ok = min_cosine is None or (not math.isnan(o.cosine) and o.cosine >= min_cosine)
            v.ok = ok and not failures
            details["verdict"] = figure
        for failure in failures:
            report.notes.append(f"quantize FAILED: {failure}")
            if v is not None:
                v.ok = False
        if failures and v is None:  # no validation ran: the failure still decides the exit code
            report.validation = Validation(
                ok=False, providers=[], samples=0, batches=0, rtol=None, atol=0.0, data="-", synthetic=False,
                outputs=[], error=f"quantize: {'; '.join(failures)}",
            )
        self.failed = bool(failures)


def float_mac_share(model: ir.Model, quantized: set[str]) -> float | None:
    """Share of the Conv/ConvTranspose/Gemm/MatMul MACs of ``model`` (the float model) whose node is not
    in ``quantized``; dynamic dims count 1. None when shapes are unknown."""
    clone = model.clone()
    for value in clone.graph.inputs:
        if value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, int) and d > 0 else 1 for d in value.shape])
    for node in clone.graph:
        for out in node.outputs:
            out.shape = None
    try:
        ShapeInferencePass(strict_mode=False)(clone)
    except Exception as exc:  # best effort
        logger.debug("shape inference failed: %s", exc)
        return None
    total = left = 0
    for node in clone.graph:
        if node.op_type not in _LINEAR_OPS:
            continue
        macs = _macs(node)
        if macs is None:
            return None
        total += macs
        left += 0 if node_label(node) in quantized else macs
    return left / total if total else None


def _macs(node: ir.Node) -> int | None:
    shapes = [v.shape if v is not None else None for v in (*node.inputs[:2], node.outputs[0])]
    if any(s is None or not all(isinstance(d, int) for d in s) for s in shapes):
        return None
    x, w, y = (tuple(s) for s in shapes)
    if node.op_type == "Conv":
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        return math.prod(x) * w[1] * math.prod(w[2:])
    trans_a = node.attributes["transA"].value if "transA" in node.attributes else 0
    return math.prod(y) * (x[0] if node.op_type == "Gemm" and trans_a else x[-1])


def optimized_ops_of(snapshot: ModelSnapshot, providers) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs for a snapshot."""
    if snapshot.data is not None:
        return optimized_ops(ir.from_proto(onnx.load_from_string(snapshot.data)), providers=providers)
    return optimized_ops(ir.load(snapshot.path), providers=providers)

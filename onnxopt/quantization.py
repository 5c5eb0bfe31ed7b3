"""The pipeline's quantization step: check the inputs, calibrate, quantize, fall back, report.

``optimize`` hands a ``QuantizeQDQ`` without ranges to ``QuantizationStep``, which orchestrates:

1. calibrate on the ``--calibration`` data (streamed, ``onnxopt.calibrate``), after SmoothQuant when
   asked (``onnxopt.passes.smooth_quant``), and run the pass (``--activations auto``: uint8 or int8
   by measurement, ``onnxopt.speed_fallback.choose_activations``);
2. with evaluation data, judge the int8 model by the accuracy budget (``onnxopt.int8_fallback``:
   with labels the accuracy may drop at most ``max_drop`` points, default 1.0; without, every
   output's cosine to the float model must reach ``min_cosine``, default 0.99) and, while it misses,
   keep the most harmful quantized nodes float (``onnxopt.fallback``: the way back every lossy step
   shares; harm is the SQNR a node loses, ``onnxopt.sqnr``);
3. unless ``speed_fallback`` is off, keep float the layers whose int8 kernels run slower, where the
   whole model then runs faster and still meets the budget (``onnxopt.speed_fallback``);
4. ``finish``: the lossy verdict, the integer nodes, the float share of MACs and the notes, into the report.
"""

from __future__ import annotations

__all__ = ["QuantizationStep", "integer_node_count"]

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.calibrate import DEFAULT_PERCENTILE, METHODS, calibrate
from onnxopt.data import Dataset, feed_dims, stream_data, synthetic_data
from onnxopt.errors import ModelLoadError, OptionError, one_line
from onnxopt.fallback import fall_back
from onnxopt.int8_fallback import Int8Budget, NodeFallback
from onnxopt.observe import ChannelMeanObserver, optimized_ops
from onnxopt.passes.quantize import QuantizeQDQ, already_quantized
from onnxopt.report import Report, Validation
from onnxopt.runtime import ModelSnapshot
from onnxopt.speed_fallback import SpeedFallback, choose_activations, float_mac_share, speed_notes
from onnxopt.sqnr import QuantizedSqnr
from onnxopt.target import resolve as resolve_target

logger = logging.getLogger(__name__)

# A quantized model whose Conv/Gemm/MatMul MACs stay float beyond this share is a failure (and the
# speed fallback keeps no more layers float than that).
MAX_FLOAT_SHARE = 0.5
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
        threads: int | None = None,
        speed_fallback: bool = True,
        target: str | None = "auto",
        max_samples: int | None = None,
        judged_outputs: Sequence[str] | None = None,
        smooth_alpha: float | str | None = None,
    ) -> None:
        """``judged_outputs``: the outputs the budget judges (None: all; ``--outputs``); the others are
        reported. ``smooth_alpha``: SmoothQuant before quantizing (a float in (0, 1) or "auto"; None: off)."""
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
        if smooth_alpha is not None and not (smooth_alpha == "auto" or (
                isinstance(smooth_alpha, (int, float)) and 0.0 <= smooth_alpha <= 1.0)):
            raise OptionError(f"--smooth-quant {smooth_alpha}: a number in [0, 1] or 'auto'")
        marks = already_quantized(model)
        if marks:
            raise ModelLoadError(
                f"{label}: already quantized ({len(marks)} quantized nodes, e.g. {marks[0]}); "
                "quantize the float model instead"
            )
        self.notes: list[str] = []
        self.target = resolve_target(target, providers)  # an unknown --target fails before any work
        self.method, self.percentile = method, percentile
        self.judged_outputs = None if judged_outputs is None else list(judged_outputs)
        self.smooth_alpha = smooth_alpha
        self.providers = providers
        self.threads, self.speed_fallback = threads, speed_fallback
        self.synthetic = isinstance(calibration, str) and calibration == "synthetic"
        if self.synthetic:
            self.calibration = synthetic_data(model, dims=dims)
            self.notes.append("calibrated on SYNTHETIC random inputs (--calibration synthetic): ranges may not fit real data")
        else:
            self.calibration = stream_data(calibration, model, batch_size=batch_size, dims=dims, max_samples=max_samples)
        self.details: dict[str, Any] = {}
        self.verdict_failed: str | None = None
        # The budget's verdicts, the original's outputs they share and the validations they ran (the
        # pipeline reuses the last), and the SQNR measure that ranks nodes and fills the report.
        self.budget = Int8Budget(max_drop, min_cosine, providers=providers, judged_outputs=self.judged_outputs)
        self.sqnr = QuantizedSqnr(providers)
        # Dims that MAC shares are counted at: --dim, else the calibration data's (set as it streams).
        self.mac_dims: dict[str, int] = dict(dims or {})

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
                f"cannot upgrade it: {one_line(exc, 200)}"
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
        timing_feed: Mapping[str, np.ndarray] | None = None,
    ) -> ir.passes.PassResult:
        """Calibrate, quantize, fall back for accuracy (with ``evaluation`` and ``original``), then for
        speed on ``timing_feed`` (else the first calibration batch); the SQNR report last."""
        p = self._for_target(p)
        if self.smooth_alpha is not None:
            self._smooth(model, progress)
        first: list[dict[str, np.ndarray]] = []  # the first calibration batch, when timing needs it
        self._calibrate(p, model, timing_feed is None and self.speed_fallback, first, progress)
        float_model = model.clone()
        user_exclude = list(p.exclude)
        for pattern in p.unmatched_exclusions(model):
            self.notes.append(f"quantize: --exclude '{pattern}' matches no node (by name, op type or pattern)")
        feed = timing_feed if timing_feed is not None else (first[0] if first else None)  # what is timed
        if p.activations == "auto":
            p, model, result, self.details["activations_choice"] = choose_activations(
                p, model, float_model, feed, providers=self.providers, threads=self.threads,
                measure=self.speed_fallback, progress=progress)
        else:
            result = p(model)
        # The verdict judges every validated run by the budget (the defaults when none is given), so
        # the fallback works towards the same budget.
        budgeted = evaluation is not None and original is not None
        fallback: list[dict[str, Any]] = []
        runnable = True
        if budgeted:
            way = NodeFallback(self.budget, self.sqnr, original, evaluation, float_model, p, result)
            outcome = fall_back(way, model)
            model, p, result, fallback, runnable = outcome.model, way.p, way.result, way.kept, outcome.runnable
            self.details["budget"] = {"met": outcome.met, "figure": outcome.figure,
                                      **({"stuck": outcome.stuck} if outcome.stuck else {})}
            if outcome.stuck:
                self.notes.append(f"quantize: accuracy fallback: {outcome.stuck}")
            if not outcome.met:
                self.verdict_failed = (f"accuracy budget not met after keeping {len(fallback)} layers in float: "
                                       f"{outcome.figure}")
        if self.speed_fallback and self.verdict_failed is not None:
            # The run fails on accuracy and writes nothing: what its layers cost in time is moot.
            self.details["speed"] = {"skipped": "the accuracy budget is not met: nothing is written"}
        elif self.speed_fallback and feed is not None and result.modified and runnable:
            speed = SpeedFallback(self.providers, self.threads, mac_dims=self.mac_dims, max_float_share=MAX_FLOAT_SHARE)
            accurate = budgeted and self.details["budget"]["met"]
            try:
                model, p, result = speed.run(
                    float_model, model, p, result, feed,
                    (lambda variant: self.budget.meets(original, variant, evaluation)) if accurate else None, progress)
            finally:
                self.details["speed"] = speed.info
            if speed.figure is not None:
                self.details["budget"]["figure"] = speed.figure
        self.details["fallback"] = fallback
        self.details["user_exclude"] = user_exclude
        if evaluation is not None:
            try:
                # Over the samples of one observation run, as the rounds rank on: 8 samples of a small
                # model, one of a 320x320 detector (8 of those took 3.7 s, the last figures of the run).
                self.details["sqnr_db"] = self.sqnr.report(float_model, model, p, evaluation, max_parts=1)
            except Exception as exc:  # the validation that follows reports the failure itself
                logger.warning("quantize: no SQNR report: %s", one_line(exc))
                self.details["sqnr_db"] = {}
        self.sqnr.close()  # the float model's exposed session: no longer needed
        self.pass_ = p
        self.float_model = float_model
        return ir.passes.PassResult(model, modified=result.modified)

    def _calibrate(self, p: QuantizeQDQ, model: ir.Model, keep_first: bool, first: list[dict[str, np.ndarray]],
                   progress: Callable[[str, int, int], None] | None) -> None:
        """Ranges for every tensor ``p`` quantizes (``p.ranges``) and, for bias correction, its inputs'
        channel means, in one streamed run over the calibration data; the first batch goes into
        ``first`` when ``keep_first`` (the speed fallback's timing feed, and what ``auto`` times), and
        its dims into the dims MAC shares are counted at."""
        plan = p.plan(model)
        start = time.perf_counter()
        means = {}
        if p.bias_correction and p.input_means is None:
            means = {t: ChannelMeanObserver(axis) for t, axis in p.correctable_inputs(model).items()}

        def remembering(batches):
            for i, feed in enumerate(batches):
                if i == 0:
                    self.mac_dims = {**feed_dims(model, feed), **self.mac_dims}
                if not first and keep_first:
                    first.append(dict(feed))
                yield feed

        ranges = calibrate(
            model, plan.tensors, remembering(self.calibration), method=self.method, percentile=self.percentile,
            activations="uint8" if p.activations == "auto" else p.activations, providers=self.providers,
            total=len(self.calibration) or None,
            progress=(lambda i, n: progress("calibrate", i, n)) if progress else None, channel_means=means,
        )
        if means:
            p.input_means = {t: obs.mean for t, obs in means.items() if obs.mean is not None}
        self.details["calibration"] = {
            "method": self.method, "samples": self.calibration.num_samples, "batches": len(self.calibration),
            "tensors": len(ranges), "seconds": round(time.perf_counter() - start, 3), "synthetic": self.synthetic,
            **({"percentile": self.percentile} if self.method == "percentile" else {}),
        }
        p.ranges = ranges

    def _smooth(self, model: ir.Model, progress: Callable[[str, int, int], None] | None) -> None:
        """SmoothQuant (``onnxopt.passes.smooth_quant``) on ``model`` in place, before it is calibrated:
        the LayerNorms whose outputs only projections read, with their per-channel max|x| gathered in
        a streamed run over the calibration data. Residual Adds, LayerNorm and Softmax stay float
        (``QuantizeQDQ``'s placement: sensitive ops, and Adds that feed no integer op)."""
        from onnxopt.calibrate import channel_absmax
        from onnxopt.passes.smooth_quant import SmoothQuant

        targets = SmoothQuant.smoothable(model)
        absmax = channel_absmax(model, list(targets), self.calibration, providers=self.providers,
                                total=len(self.calibration) or None,
                                progress=(lambda i, n: progress("smooth", i, n)) if progress else None) if targets else {}
        smooth = SmoothQuant(self.smooth_alpha, absmax)
        smooth(model)
        self.details["smooth_quant"] = {"alpha": self.smooth_alpha, **smooth.details}
        self.notes.append(f"quantize: smooth-quant (alpha {self.smooth_alpha}): {smooth.summary}"
                          + (f" ({next(iter(smooth.details['skipped'].values()))}, ...)" if smooth.details["skipped"] else ""))

    def _for_target(self, p: QuantizeQDQ) -> QuantizeQDQ:
        """``p`` with the weight bits (and activations) of the resolved target, unless it names its own;
        the target goes into the report (and, through the pass, into the model's metadata)."""
        if p.target is None:
            wanted = self.target.activations
            if wanted and p.activations != wanted:
                self.notes.append(f"quantize: activations {wanted} for target {self.target.name} (not {p.activations})")
            p = p.for_target(self.target.name, wanted)
            record = self.target.as_dict()
        else:
            record = {"name": p.target, "detected": False, "weight_range": [-p.weight_max, p.weight_max],
                      "why": "given to the quantize pass"}
        self.details["target"] = record
        lo, hi = record["weight_range"]
        self.notes.append(f"quantize: target {record['name']}{' (detected)' if record['detected'] else ''}: "
                          f"weights in [{lo}, {hi}]; {record['why']}")
        return p

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
        choice = self.details.get("activations_choice")
        if choice:
            where = f"{', '.join(choice['providers'])}" + (f", batch {choice['batch']}, {choice['threads']} thread(s)"
                                                           if "batch" in choice else "")
            report.notes.append(f"quantize: activations {choice['chosen']} (--activations auto, {where}): {choice['why']}")
        report.notes.extend(speed_notes(self.details.get("speed")))
        failures = []
        if p is not None:
            quantized = p.details.get("quantized_nodes", [])
            weighted = p.details.get("weighted", {"float": 0, "total": 0})
            left = p.details.get("left", {})
            share = float_mac_share(self.float_model, set(quantized), dims=self.mac_dims)
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
        else:
            speed = self.details.get("speed") or {}
            versus = speed.get("vs_float")
            if versus and versus["verdict"] == "slower":  # faster than the original, but not by quantizing
                report.notes.append(
                    f"quantize: the int8 model takes {versus['ratio']:.2f}x the time of the float model the other "
                    f"passes made (batch {speed['batch']}, {speed['threads']} thread(s)): quantization itself "
                    "costs time here; the speed-up over the original comes from those passes"
                )
        v = report.validation
        if v is not None:
            ok, figure = self.budget.judge(v)
            v.criterion = f"{figure} (lossy pass, not the lossless tolerance)"
            max_drop, min_cosine = self.budget.limits(v.accuracy_before is not None)
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


def optimized_ops_of(snapshot: ModelSnapshot, providers) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs for a snapshot."""
    if snapshot.data is not None:
        return optimized_ops(ir.from_proto(onnx.load_from_string(snapshot.data)), providers=providers)
    return optimized_ops(ir.load(snapshot.path), providers=providers)

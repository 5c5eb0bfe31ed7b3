"""The pipeline's quantization step: check the inputs, calibrate, quantize, measure, fall back to float.

``optimize`` hands a ``QuantizeQDQ`` without ranges to ``QuantizationStep``; the step calibrates
on the ``--calibration`` data (streamed, ``onnxopt.calibrate``), runs the pass, and when an
accuracy budget is given, keeps the most harmful layers in float until the budget is met:

- with labels in the evaluation data: accuracy may drop at most ``max_drop`` points (default 1.0);
- without labels: every output's cosine to the float model must reach ``min_cosine`` (default 0.99).

Harm is measured per quantized node as the signal-to-quantization-noise ratio (SQNR) it loses:
the SQNR of its output against the float model, subtracted from the lowest SQNR of its inputs.

Then, unless ``speed_fallback`` is off, the step chooses by measurement where integer kernels pay:
onnxruntime's profiler times every layer's kernels in the float and the int8 model on one batch
(``onnxopt.profiling``; an int8 layer's cost includes quantizing its input), the layers whose int8
kernels run slower are kept float, and the mixed model is kept only if it runs faster than the
all-int8 one side by side (``onnxopt.latency``) and still meets the accuracy budget. On two shared
cores, the first conv of a three-channel image (im2col depth 27) and depthwise convs of 16 channels
ran 2-3x slower as QLinearConv than as float NCHWc convs at batch 32, while every pointwise conv ran
2-3x faster.
"""

from __future__ import annotations

__all__ = ["QuantizationStep", "DEFAULT_MAX_DROP", "DEFAULT_MIN_COSINE", "integer_node_count"]

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.budget import Convergence, shortfall, why_stuck
from onnxopt.budget import judge as judge_budget
from onnxopt.calibrate import DEFAULT_PERCENTILE, METHODS, calibrate
from onnxopt.data import Dataset, feed_dims, feed_rows, first_rows, stream_data, take_rows, synthetic_data
from onnxopt.errors import ModelLoadError, OptionError, one_line
from onnxopt.latency import call_seconds, compare_latency, median_interval, pair_seconds_needed, timing_settings
from onnxopt.latency import verdict as latency_verdict
from onnxopt.observe import DEFAULT_MAX_BYTES, BatchSplitter, ChannelMeanObserver, ErrorObserver, expose, optimized_ops
from onnxopt.passes.quantize import QuantizeQDQ, already_quantized, node_label
from onnxopt.profiling import kernel_times, layer_times, named_nodes
from onnxopt.report import Report, Validation
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session
from onnxopt.stats import node_macs
from onnxopt.target import resolve as resolve_target
from onnxopt.validate import ReferenceOutputs

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 1.0  # accuracy points
DEFAULT_MIN_COSINE = 0.99
MAX_FALLBACK_ROUNDS = 8
# Fallback rounds judged by the worst sample's cosine (no labels) are judged first on this many
# samples, the worst of the last validation on all the data: the worst cosine over fewer samples is
# never lower, so a round that misses there misses on the whole data; only a round that meets there
# is judged again on all of it (``_judge_round``). The worst samples stay the worst from round to
# round more often than not (the recognizer's first 4 samples met every round that all 32 missed).
JUDGE_SAMPLES = 4
# Per-tensor SQNR (the fallback's ranking and the report's figures) is read on the first samples
# of the evaluation data: the ranking is that of 128 samples on the zoo and the digits model, and
# exposing every tensor of two models costs a run per sample (the PaddleOCR detector: 20 of 72 s).
SQNR_SAMPLES = 8
# A quantized model whose Conv/Gemm/MatMul MACs stay float beyond this share is a failure.
MAX_FLOAT_SHARE = 0.5
# Speed fallback: an int8 layer counts as slower when its kernels take 10% and 1 µs (the profiler's
# resolution) longer than float; the mixed model must then be 2% faster than the all-int8 one. The
# profiler adds a few µs to every node, and an int8 layer carries its input's QuantizeLinear: small
# layers lean towards "slower", which costs a timing but never a slower model (the whole model decides).
SPEED_MARGIN = 0.10
SPEED_MIN_MICROS = 1.0
SPEED_MIN_GAIN = 0.02
# Each side-by-side timing gets about 24 calls of the model (12 blocks of 2 calls each way) within
# these bounds; the timing stops at its first decisive check. A set that cannot be told apart in
# that time stays int8 (the search errs towards the model it has). 40 calls and 30 s took the
# PaddleOCR detector's search (batch 16 at 320x320) 45 of its 72 s.
SPEED_BUDGET_SECONDS = (2.0, 12.0)
SPEED_BUDGET_CALLS = 24
ACTIVATIONS_BUDGET_SECONDS = 10.0  # uint8 against int8: the timing stops as soon as it is decisive
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
        self.max_drop, self.min_cosine = max_drop, min_cosine
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
        # The original's outputs on the evaluation data, run once for every validation of the step,
        # and each validation by the model it judged (the pipeline's own is then the last of them).
        self.reference_outputs = ReferenceOutputs()
        self._judged: dict[bytes, Validation] = {}
        self._subset: Dataset | None = None  # the last full validation's worst samples, which judge a round first
        self._subset_rows: list[int] = []
        self._last_on_subset = False  # whether the last round's verdict came from ``_subset`` alone
        self._subset_reference = ReferenceOutputs()
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
        speed on ``timing_feed`` (else the first calibration batch)."""
        p = self._for_target(p)
        if self.smooth_alpha is not None:
            self._smooth(model, progress)
        plan = p.plan(model)
        start = time.perf_counter()
        means = {}
        if p.bias_correction and p.input_means is None:
            means = {t: ChannelMeanObserver(axis) for t, axis in p.correctable_inputs(model).items()}
        first: list[dict[str, np.ndarray]] = []

        def remembering(batches):  # the first batch is kept for the speed fallback's timing
            for i, feed in enumerate(batches):
                if i == 0:
                    self.mac_dims = {**feed_dims(model, feed), **self.mac_dims}
                if not first and timing_feed is None and self.speed_fallback:  # also what ``auto`` times
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
        float_model = model.clone()
        user_exclude = list(p.exclude)
        for pattern in p.unmatched_exclusions(model):
            self.notes.append(f"quantize: --exclude '{pattern}' matches no node (by name, op type or pattern)")
        p.ranges = ranges
        feed = timing_feed if timing_feed is not None else (first[0] if first else None)  # what is timed
        if p.activations == "auto":
            p, model, result = self._choose_activations(p, model, float_model, feed, progress)
        else:
            result = p(model)
        # The verdict judges every validated run by the budget (the defaults when none is given), so
        # the fallback works towards the same budget.
        budgeted = evaluation is not None and original is not None
        fallback: list[dict[str, Any]] = []
        runnable = True
        if budgeted:
            first_figure, convergence, stuck, stalled_at = None, Convergence(), None, None
            for round_ in range(1, MAX_FALLBACK_ROUNDS + 1):
                met, figure = self._judge_round(original, model, evaluation, float_model)
                first_figure = first_figure or figure
                convergence.add(self._shortfall(), len(fallback))
                if met:
                    break
                try:
                    harm = self._harm(float_model, model, p, evaluation)
                except Exception as exc:  # onnxruntime refuses the quantized model: say so, don't crash
                    figure = f"onnxruntime cannot run the quantized model: {one_line(exc)}"
                    runnable = False
                    break
                candidates = [(h, node) for node, h in harm if node not in p.exclude and h > 0]
                if not candidates:
                    break
                rounds_left = sum(2 ** (r - 1) for r in range(round_, MAX_FALLBACK_ROUNDS + 1))
                if convergence.stalled(min(len(candidates), rounds_left)):  # more float layers no longer move the metric: say why, stop
                    stalled_at = candidates[0][0]
                    break
                take = candidates[: 2 ** (round_ - 1)]
                for h, node in take:
                    fallback.append({"node": node, "round": round_, "reason": f"loses {h:.1f} dB SQNR ({figure})"})
                    logger.info("quantize: keeping %s in float: loses %.1f dB SQNR", node, h)
                model = float_model.clone()
                p = p.excluding({item["node"]: f"kept float: {item['reason']}" for item in fallback[-len(take):]})
                result = p(model)
            else:
                met, figure = self._meets_budget(original, model, evaluation)
                self._last_on_subset = False
            if not met and runnable and self._last_on_subset:
                # The last miss was seen on the first samples (a miss on all the data too): the figure
                # of all of it for the report and the reasons, and the validation the pipeline reuses.
                met, figure = self._meets_budget(original, model, evaluation)
            if not met and runnable and (fallback or stalled_at is not None):  # stalled, every round used, or no layer left
                stuck = why_stuck(self._last, *self._limits(self._last.accuracy_before is not None), kept=len(fallback),
                                  first_figure=first_figure, figure=figure, top_harm_db=stalled_at)
            self.details["budget"] = {"met": met, "figure": figure, **({"stuck": stuck} if stuck else {})}
            if stuck:
                self.notes.append(f"quantize: accuracy fallback: {stuck}")
            if not met:
                self.verdict_failed = f"accuracy budget not met after keeping {len(fallback)} layers in float: {figure}"
        if self.speed_fallback and self.verdict_failed is not None:
            # The run fails on accuracy and writes nothing: what its layers cost in time is moot.
            self.details["speed"] = {"skipped": "the accuracy budget is not met: nothing is written"}
        elif self.speed_fallback and feed is not None and result.modified and runnable:
            model, p, result = self._speed_fallback(
                float_model, model, p, result, feed,
                evaluation if budgeted and self.details["budget"]["met"] else None, original, progress,
            )
        self.details["fallback"] = fallback
        self.details["user_exclude"] = user_exclude
        if evaluation is not None:
            try:
                # Over the samples of one observation run, as the rounds rank on: 8 samples of a small
                # model, one of a 320x320 detector (8 of those took 3.7 s, the last figures of the run).
                self.details["sqnr_db"] = self._sqnr(float_model, model, p, evaluation, max_parts=1)
            except Exception as exc:  # the validation that follows reports the failure itself
                logger.warning("quantize: no SQNR report: %s", one_line(exc))
                self.details["sqnr_db"] = {}
        if getattr(self, "_exposure", None) is not None:  # the float model's exposed session: no longer needed
            self._exposure[2].close()
            self._exposure = None
        self.pass_ = p
        self.float_model = float_model
        return ir.passes.PassResult(model, modified=result.modified)

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

    def _speed_fallback(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, result: ir.passes.PassResult,
                        feed: Mapping[str, np.ndarray], evaluation: Dataset | None, original: ModelSnapshot | None,
                        progress: Callable[[str, int, int], None] | None) -> tuple[ir.Model, QuantizeQDQ, ir.passes.PassResult]:
        """Keep float the layers whose int8 kernels run slower than their float ones on ``feed``, as many
        as make the model faster side by side (and, with ``evaluation``, keep the accuracy budget);
        returns the model, pass and result to go on with.

        The slower layers are tried worst first, in growing sets (1, 2, 4 … of them), each set timed
        against the best model so far; two sets in a row that are not faster end the search (a float
        layer among integer ones costs a QuantizeLinear, a DequantizeLinear and layout Transposes,
        which only the whole-model timing sees). Last, the chosen model is timed against ``float_model``
        (``vs_float``), so that the report can tell a speed-up of quantization from one of the passes
        before it. It is an optimization, not a condition of the run:
        a failure while measuring keeps the best model so far and says why."""
        start = time.perf_counter()
        settings = timing_settings(self.providers, 1 if self.threads is None else self.threads)
        if settings.providers[0] != "CPUExecutionProvider":
            # CUDA's profiler reports kernel launches, not GPU time; TensorRT runs one engine node.
            self.details["speed"] = {"skipped": f"per-layer times are CPU only, not {settings.providers[0]}"}
            return model, p, result
        quantized = list(p.details.get("quantized_nodes", []))
        info: dict[str, Any] = {"providers": list(settings.providers), "threads": settings.threads,
                                "batch": _batch_len(feed), "timed": [], "slower_in_int8": {}, "kept_float": [],
                                "tried": []}
        self.details["speed"] = info
        if progress:
            progress("speed", 0, 1)
        # The float model and the fastest so far are held, serialized once: the profiled snapshots
        # are timed again below (names aside, they are the same models).
        plain = best = None
        try:
            # onnxruntime reports node names: unnamed layers are profiled under their labels.
            named = [named_nodes(float_model), named_nodes(model)]
            plain = ModelSnapshot(named[0])
            best = ModelSnapshot(named[1])
            per_call = call_seconds(best, feed, settings)
            if pair_seconds_needed(per_call) > _speed_budget(per_call):
                # Every timing would stop undecided (no difference) after its first block: a call of
                # 0.12 s (a 320x320 detector at batch 2) needs 3.6 s for the 6 blocks of a verdict.
                # Profiling the layers (3 s there) would then only decide nothing.
                at = f" at batch {info['batch']}" if info["batch"] else ""
                info["skipped"] = (f"a call takes {per_call:.2f} s{at}: a side-by-side timing "
                                   f"needs {pair_seconds_needed(per_call):.1f} s for a verdict, more than the "
                                   f"{_speed_budget(per_call):.1f} s it may take; --batch-size N times at N")
                return model, p, result
            totals: list[list[float]] = []  # whole-run times of the profiled runs: the vs_float figure
            k_float, k_int8 = kernel_times([plain, best], feed, settings, totals=totals)
            t_float = layer_times(named[0], k_float, quantized)
            t_int8 = layer_times(named[1], k_int8, quantized)
            info["timed"] = [n for n in quantized if n in t_float and n in t_int8]
            # every timed layer's [int8, float] kernel microseconds, for the HTML report's per-layer plot
            info["layers"] = {n: [round(t_int8[n], 1), round(t_float[n], 1)] for n in info["timed"]}
            chosen = self._slower_layers(float_model, quantized, t_int8, t_float)
            info["slower_in_int8"] = {n: [t_int8[n], t_float[n]] for n in chosen}
            sizes = sorted({min(2 ** i, len(chosen)) for i in range(len(chosen).bit_length() + 1)} - {0})
            budget = _speed_budget(sum(k_int8.values()) * 1e-6)  # profiled: an overestimate, on the safe side
            ratio, misses = 1.0, 0
            model_micros = sum(k_int8.values())
            for step, size in enumerate(sizes, 1):
                if progress:
                    progress("speed", step, len(sizes))
                attempt = chosen[:size]
                gain = _profiled_gain(attempt, info["kept_float"], t_int8, t_float, model_micros)
                if gain < SPEED_MIN_GAIN:
                    # Not timed: the kernels these layers would save are less than the gain a timing must
                    # show (the profile charges each int8 layer its QuantizeLinear: it errs towards gain).
                    info["tried"].append({"float": attempt, "profiled_gain": round(gain, 4),
                                          "verdict": "not timed: profiled gain below the threshold"})
                    misses += 1
                    if misses == 2:
                        break
                    continue
                variant = float_model.clone()
                q = p.excluding({n: f"kept float for speed: int8 kernels {t_int8[n]:.0f} us, float {t_float[n]:.0f} us"
                                 for n in attempt})
                r = q(variant)
                candidate = ModelSnapshot(variant)
                try:
                    # Only a "faster" verdict counts: a timing that cannot reach one in its budget stops early.
                    figures = compare_latency(best, candidate, feed, providers=self.providers, threads=settings.threads,
                                              budget_seconds=budget, threshold=SPEED_MIN_GAIN, stop_undecidable=True)
                    tried = {"float": attempt, "ratio": round(figures.ratio, 3), "verdict": figures.verdict}
                    info["tried"].append(tried)
                    faster, figure = figures.verdict == "faster", None
                    if faster and evaluation is not None and original is not None:
                        faster, figure = self._meets_budget(original, variant, evaluation)
                        tried["verdict"] = "faster" if faster else "faster, but misses the accuracy budget"
                except BaseException:
                    candidate.close()
                    raise
                if not faster:
                    candidate.close()
                    misses += 1
                    if misses == 2:
                        break
                    continue
                misses = 0
                best.close()
                best, ratio = candidate, ratio * figures.ratio
                model, p, result = variant, q, r
                info["kept_float"], info["ratio"] = attempt, round(ratio, 3)
                if figure is not None:
                    self.details["budget"]["figure"] = figure
            if not info["kept_float"] and min(map(len, totals), default=0) >= 3:
                # The chosen model is the all-int8 one, profiled side by side with the float model above.
                info["vs_float"] = _profiled_ratio(totals[0], totals[1])
            else:
                info["vs_float"] = self._against_float(plain, best, feed, settings.threads, budget)
        except Exception as exc:  # onnxruntime's errors are not RuntimeErrors: any failure here skips the rest
            logger.warning("quantize: speed fallback stopped: %s", exc)
            info["error"] = one_line(exc, 200)
        finally:
            for snapshot in (plain, best):
                if snapshot is not None:
                    snapshot.close()
            info["seconds"] = round(time.perf_counter() - start, 2)
        for node in info["kept_float"]:
            logger.info("quantize: keeping %s in float: its int8 kernels take %.0f us, float %.0f us",
                        node, t_int8[node], t_float[node])
        return model, p, result

    def _against_float(self, plain: ModelSnapshot, chosen: ModelSnapshot, feed: Mapping[str, np.ndarray],
                       threads: int, budget: float) -> dict[str, Any]:
        """The chosen quantized model timed against ``plain``, the float model the other passes made:
        what quantization itself buys at this setting (a speed-up over the original may be theirs)."""
        figures = compare_latency(plain, chosen, feed, providers=self.providers, threads=threads,
                                  budget_seconds=budget, threshold=SPEED_MIN_GAIN)
        return {"ratio": round(figures.ratio, 3), "low": round(figures.ratio_low, 3), "high": round(figures.ratio_high, 3),
                "verdict": figures.verdict}

    def _choose_activations(self, p: QuantizeQDQ, model: ir.Model, float_model: ir.Model,
                            feed: Mapping[str, np.ndarray] | None, progress: Callable[[str, int, int], None] | None,
                            ) -> tuple[QuantizeQDQ, ir.Model, ir.passes.PassResult]:
        """``--activations auto``: uint8 (asymmetric) or int8 (symmetric), whichever model runs faster
        here, side by side; int8 only when decisively faster. TensorRT takes int8 without a timing (its
        explicit quantization is symmetric); without timing in the run, uint8 (the CPU default).
        Returns the pass, the quantized model (``model``, quantized in place as uint8, or an int8
        copy of ``float_model``) and the pass's result."""
        uint8 = p.with_activations("uint8")
        settings = timing_settings(self.providers, 1 if self.threads is None else self.threads)
        choice: dict[str, Any] = {"providers": list(settings.providers), "threads": settings.threads}
        self.details["activations_choice"] = choice
        if settings.providers[0] == "TensorrtExecutionProvider":
            choice.update(chosen="int8", why="TensorRT's explicit quantization takes symmetric int8")
            int8 = p.with_activations("int8")
            return int8, model, int8(model)
        result = uint8(model)
        if not self.speed_fallback or feed is None:
            choice.update(chosen="uint8", why="not measured (no timing in this run): the CPU default")
            return uint8, model, result
        if progress:
            progress("activations", 0, 1)
        int8, candidate = p.with_activations("int8"), float_model.clone()
        snapshots = []
        try:
            int8_result = int8(candidate)
            snapshots = [ModelSnapshot(model), ModelSnapshot(candidate)]
            figures = compare_latency(*snapshots, feed, providers=self.providers, threads=settings.threads,
                                      budget_seconds=ACTIVATIONS_BUDGET_SECONDS, threshold=SPEED_MIN_GAIN)
        except Exception as exc:  # a measurement, not a condition of the run
            logger.warning("quantize: activations not measured: %s", exc)
            choice.update(chosen="uint8", why=f"not measured ({one_line(exc, 120)}): the CPU default")
            return uint8, model, result
        finally:
            for snapshot in snapshots:
                snapshot.close()
        chosen = "int8" if figures.verdict == "faster" else "uint8"
        choice.update(chosen=chosen, batch=_batch_len(feed), int8_vs_uint8=round(figures.ratio, 3),
                      why=f"the int8 (symmetric) model ran {figures.ratio:.2f}x the uint8 one's time")
        return (int8, candidate, int8_result) if chosen == "int8" else (uint8, model, result)

    def _slower_layers(self, float_model: ir.Model, quantized: list[str], t_int8: dict[str, float],
                       t_float: dict[str, float]) -> list[str]:
        """Layers whose int8 kernels take longer than float, worst first, never so many that the float
        share of MACs would fail the run."""
        slower = sorted((n for n in quantized if n in t_float and n in t_int8
                         and t_int8[n] > t_float[n] * (1 + SPEED_MARGIN) + SPEED_MIN_MICROS),
                        key=lambda n: t_float[n] - t_int8[n])
        macs = node_macs(float_model, dims=self.mac_dims, key=node_label)
        weighted = set(macs)
        chosen: list[str] = []
        for node in slower:
            share = float_mac_share(float_model, set(quantized) - {*chosen, node}, macs)
            if share is None:  # shapes unknown: count the layers instead, as ``finish`` does
                share = len(weighted - set(quantized) | weighted & {*chosen, node}) / max(len(weighted), 1)
            if share <= MAX_FLOAT_SHARE:
                chosen.append(node)
        return chosen

    def _limits(self, labels: bool) -> tuple[float | None, float | None]:
        if labels:
            return (self.max_drop if self.max_drop is not None else DEFAULT_MAX_DROP), self.min_cosine
        return None, (self.min_cosine if self.min_cosine is not None else DEFAULT_MIN_COSINE)

    def _judge_round(self, original: ModelSnapshot, model: ir.Model, evaluation: Dataset,
                     float_model: ir.Model) -> tuple[bool, str]:
        """A fallback round's verdict: first on the samples that were worst in the last validation
        on all the data, where that is exact (a miss there is a miss on all; see ``JUDGE_SAMPLES``),
        on all the data otherwise and to confirm."""
        if self._subset is not None:
            met, figure = self._meets_budget(original, model, self._subset, self._subset_reference)
            if not met:
                self._last_on_subset = True
                return met, figure
        self._last_on_subset = False
        met, figure = self._meets_budget(original, model, evaluation)
        self._choose_subset(float_model, evaluation)
        return met, figure

    def _choose_subset(self, float_model: ir.Model, evaluation: Dataset) -> None:
        """The samples the next round is judged on first: the ``JUDGE_SAMPLES`` worst of the last
        validation on all the data (each judged output's worst in turn), which are the likeliest to
        miss again. Only the worst-sample cosine judges exactly on a subset: not with labels (an
        accuracy over fewer samples can be lower), nor where an output has no per-sample cosine."""
        v = self._last
        judged = [o for o in v.outputs if o.judged]
        if v.accuracy_before is not None or v.error or not judged or not all(o.samples and o.worst_samples for o in judged):
            self._subset = None
            return
        rows: list[int] = []
        for rank in range(max(len(o.worst_samples) for o in judged)):
            rows += [o.worst_samples[rank] for o in judged if rank < len(o.worst_samples)]
        rows = list(dict.fromkeys(rows))[:JUDGE_SAMPLES]
        if len(rows) >= evaluation.num_samples:
            self._subset = None
            return
        if self._subset is not None and rows == self._subset_rows:
            return  # the same samples: their reference outputs are kept
        feed = take_rows(float_model, evaluation, rows)
        if feed is None:
            self._subset = None
            return
        self._subset = Dataset([feed], None, f"{evaluation.source} (its {len(rows)} worst samples)",
                               synthetic=evaluation.synthetic)
        self._subset_rows = rows
        self._subset_reference = ReferenceOutputs()

    def _meets_budget(self, original: ModelSnapshot, model: ir.Model, evaluation: Dataset,
                      reference: ReferenceOutputs | None = None) -> tuple[bool, str]:
        """Validate ``model`` on ``evaluation`` and judge it by the budget; a validation on all the data
        (``reference`` None) is kept for the pipeline's own (``validated``)."""
        from onnxopt.validate import compare_models

        candidate = ModelSnapshot(model)
        try:
            v = compare_models(original, candidate, evaluation, providers=self.providers, runtime_floor=False,
                               reference_outputs=reference or self.reference_outputs,
                               judged_outputs=self.judged_outputs)
            key = _snapshot_key(candidate)
            if key is not None and reference is None:
                self._judged[key] = v
        finally:
            candidate.close()
        self._last = v
        return self.judge(v)

    def _shortfall(self) -> float:
        """How far the last judged model is from the budget (``budget.shortfall``)."""
        return shortfall(self._last, *self._limits(self._last.accuracy_before is not None))

    def validated(self, candidate: ModelSnapshot, rtol: float | None, atol: float) -> Validation | None:
        """The validation this step already ran of the very model ``candidate`` holds (the fallback
        judges every model it keeps on the same data), when asked with the tolerances it used; else None."""
        from onnxopt.validate import DEFAULT_ATOL

        if rtol is not None or atol != DEFAULT_ATOL:
            return None
        key = _snapshot_key(candidate)
        v = self._judged.get(key) if key is not None else None
        return copy.deepcopy(v) if v is not None else None

    def judge(self, v: Validation) -> tuple[bool, str]:
        """The lossy verdict on a validation: accuracy drop with labels, else every output's cosine."""
        if v.error:
            return False, v.error
        return judge_budget(v, *self._limits(v.accuracy_before is not None))

    def _errors(self, float_model: ir.Model, model: ir.Model, tensor_map: dict[str, str], evaluation: Dataset,
                tensors: list[str], max_parts: int | None = None) -> dict[str, float]:
        """SQNR (dB) of each named float tensor as the quantized model computes it, over the first
        ``SQNR_SAMPLES`` samples, or over as many as ``max_parts`` observation runs' worth of tensors
        hold (the splitter's ``max_bytes`` each; a detector's tensors at 320x320 fill one with one
        sample: its pixels are statistics enough). Counted in bytes, not runs: with batches of one
        sample (--batch-size 1, a model fixed at batch 1) each run holds one sample, and a small model's
        8 fit in one run's worth."""
        names = [t for t in tensors if t]
        quant_names = [tensor_map.get(t, t) for t in names]
        cand_model, cand_names = expose(model, quant_names)
        cand_snap = ModelSnapshot(cand_model)
        inputs = {v.name for v in float_model.graph.inputs}
        observers = {t: ErrorObserver() for t in names}
        try:
            providers = resolve_providers(self.providers)
            ref, splitter = self._float_exposure(float_model, names, providers)
            cand = cand_snap.session(providers=providers, optimization="disabled")
            seen = held = last = 0  # samples, bytes of tensors returned so far, and by the last run

            def full() -> bool:  # another run like the last would pass max_parts runs' worth of bytes
                return max_parts is not None and held > 0 and held + last > max_parts * splitter.max_bytes

            for feed in evaluation.batches:
                if seen >= SQNR_SAMPLES or full():
                    break

                def probe(first: dict[str, np.ndarray]) -> None:
                    splitter.learn(first, [*run_session(ref, first).values(), *run_session(cand, first).values()])

                for part in splitter.parts(first_rows(float_model, feed, SQNR_SAMPLES - seen), probe=probe):
                    if full():
                        break
                    seen += feed_rows(part)
                    r_out = run_session(ref, part)
                    c_out = run_session(cand, part)
                    last = sum(np.asarray(a).nbytes for a in (*r_out.values(), *c_out.values()))
                    held += last
                    splitter.learn(part, [*r_out.values(), *c_out.values()])
                    for t, qt in zip(names, quant_names):
                        r = part.get(t) if t in inputs else r_out.get(t)
                        c = c_out.get(qt)
                        if r is not None and c is not None:
                            observers[t].update(r, c)
                    del r_out, c_out
        finally:
            cand_snap.close()
        return {t: obs.sqnr_db for t, obs in observers.items() if obs.signal > 0}

    def _float_exposure(self, float_model: ir.Model, names: list[str], providers: list[str]):
        """A session of ``float_model`` with ``names`` exposed, and the ``BatchSplitter`` that cuts its
        feeds, made once per step: every fallback round compares against the same float model, and
        asks for the same tensors or fewer (its layers kept float drop out), so that the model is not
        serialized, loaded and probed again each round (extra outputs are not read)."""
        held = getattr(self, "_exposure", None)
        if held is None or held[0] is not float_model or not set(names) <= held[1]:
            ref_model, _ = expose(float_model, names)
            snapshot = ModelSnapshot(ref_model, by_reference=True)
            # Both models' tensors are alive at once: each run gets half the observation budget.
            held = (float_model, set(names), snapshot, BatchSplitter(float_model, DEFAULT_MAX_BYTES // 2))
            if getattr(self, "_exposure", None) is not None:
                self._exposure[2].close()
            self._exposure = held
        return held[2].session(providers=providers, optimization="disabled"), held[3]

    def _sqnr(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset,
              max_parts: int | None = None) -> dict[str, float]:
        io_map = p.details.get("io", {})
        tensors = sorted({t for ins, out in io_map.values() for t in (*ins, out)})
        errors = self._errors(float_model, model, p.details.get("tensor_map", {}), evaluation, tensors, max_parts)
        return {t: round(v, 2) if math.isfinite(v) else v for t, v in sorted(errors.items(), key=lambda kv: kv[1])}

    def _harm(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset) -> list[tuple[str, float]]:
        """Quantized compute nodes by the SQNR they lose (input's worst minus output's), most harmful first:
        measured on the samples of one observation run (``_errors``), since every round pays for it."""
        io_map = p.details.get("io", {})
        errors = self._sqnr(float_model, model, p, evaluation, max_parts=1)
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
        choice = self.details.get("activations_choice")
        if choice:
            where = f"{', '.join(choice['providers'])}" + (f", batch {choice['batch']}, {choice['threads']} thread(s)"
                                                           if "batch" in choice else "")
            report.notes.append(f"quantize: activations {choice['chosen']} (--activations auto, {where}): {choice['why']}")
        report.notes.extend(_speed_notes(self.details.get("speed")))
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


def float_mac_share(model: ir.Model, quantized: set[str], macs: dict[str, int | None] | None = None,
                    dims: Mapping[str, int] | None = None) -> float | None:
    """Share of the Conv/ConvTranspose/Gemm/MatMul MACs of ``model`` (the float model) whose node is not
    in ``quantized``; dynamic dims from ``dims`` by name, else 1. None when shapes are unknown.
    ``macs``: ``node_macs`` of ``model`` by node label, when already counted."""
    macs = node_macs(model, dims=dims, key=node_label) if macs is None else macs
    if any(m is None for m in macs.values()):
        return None
    total = sum(macs.values())
    left = sum(m for node, m in macs.items() if node not in quantized)
    return left / total if total else None


def optimized_ops_of(snapshot: ModelSnapshot, providers) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs for a snapshot."""
    if snapshot.data is not None:
        return optimized_ops(ir.from_proto(onnx.load_from_string(snapshot.data)), providers=providers)
    return optimized_ops(ir.load(snapshot.path), providers=providers)


def _speed_budget(call: float) -> float:
    """Seconds one side-by-side timing of the speed fallback may take, for calls of ``call`` seconds."""
    return min(max(SPEED_BUDGET_CALLS * call, SPEED_BUDGET_SECONDS[0]), SPEED_BUDGET_SECONDS[1])


def _speed_notes(speed: dict[str, Any] | None) -> list[str]:
    """What the speed fallback found and kept (each kept layer with both times), for the report."""
    if not speed:
        return []
    if "skipped" in speed:
        return [f"quantize: speed fallback skipped: {speed['skipped']}"]
    notes = []
    where = f"{', '.join(speed['providers'])}, batch {speed['batch']}, {speed['threads']} thread(s)"
    slow, kept = speed["slower_in_int8"], speed["kept_float"]
    if kept:
        notes.append(f"quantize: kept {len(kept)} layers float whose int8 kernels ran slower ({where}): the mixed "
                     f"model runs {speed['ratio']:.2f}x the all-int8 one's time")
        notes += [f"quantize: kept {n} float for speed: int8 kernels {slow[n][0]:.0f} us, float {slow[n][1]:.0f} us"
                  for n in kept]
    elif slow and speed["tried"]:
        tried = ", ".join(f"{t['ratio']:.2f}x" if "ratio" in t else f"{1 - t['profiled_gain']:.2f}x by its kernels, not timed"
                          for t in speed["tried"])
        notes.append(f"quantize: {len(slow)} layers ran slower in int8 than in float ({where}), but the model was not "
                     f"faster with them float ({tried} of the all-int8 time); they stay int8")
    elif not speed["timed"] and "error" not in speed:
        notes.append("quantize: speed fallback: no layer could be matched to onnxruntime's profile (unnamed nodes?)")
    if "error" in speed:
        notes.append(f"quantize: speed fallback stopped: {speed['error']}")
    return notes


def _profiled_gain(attempt: Sequence[str], kept: Sequence[str], t_int8: Mapping[str, float],
                   t_float: Mapping[str, float], model_micros: float) -> float:
    """The share of the all-int8 model's profiled time that keeping ``attempt`` float (beyond the
    ``kept`` layers, already float in the model it is timed against) saves in kernel time."""
    if model_micros <= 0:
        return math.inf  # nothing to go by: time it
    saved = sum(t_int8[n] - t_float[n] for n in attempt if n not in kept)
    return saved / model_micros


def _profiled_ratio(float_runs: Sequence[float], int8_runs: Sequence[float]) -> dict[str, Any]:
    """The int8 model's time against the float model's from ``kernel_times``'s interleaved profiled
    runs (paired in order), as ``_against_float`` reports a timing of its own."""
    n = min(len(float_runs), len(int8_runs))
    ratios = np.asarray(int8_runs[:n], dtype=float) / np.maximum(np.asarray(float_runs[:n], dtype=float), 1e-9)
    ratio = float(np.median(ratios))
    low, high = median_interval(ratios)
    return {"ratio": round(ratio, 3), "low": round(low, 3), "high": round(high, 3),
            "verdict": latency_verdict(ratio, low, high, SPEED_MIN_GAIN), "profiled": True}


def _snapshot_key(snapshot: ModelSnapshot) -> bytes | None:
    """A digest of a snapshot's serialized model (None for one in a folder: external data)."""
    return hashlib.sha256(snapshot.data).digest() if snapshot.data is not None else None


def _batch_len(feed: Mapping[str, np.ndarray]) -> int | None:
    shapes = [np.shape(a) for a in feed.values()]
    return int(shapes[0][0]) if shapes and shapes[0] else None



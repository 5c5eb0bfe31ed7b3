"""Where int8 pays, by measurement: the activation type, and the layers kept float for speed.

onnxruntime's integer kernels are not faster everywhere, and which layers lose depends on the CPU,
the batch and the threads. ``SpeedFallback`` times every layer's kernels in the float and the int8
model on one batch with onnxruntime's profiler (``onnxopt.profiling``; an int8 layer's cost includes
quantizing its input), keeps float the layers whose int8 kernels run slower, and keeps the mixed model
only if it runs faster than the all-int8 one side by side (``onnxopt.latency``) and still meets the
accuracy budget. On two shared cores, the first conv of a three-channel image (im2col depth 27) and
depthwise convs of 16 channels ran 2-3x slower as QLinearConv than as float NCHWc convs at batch 32,
while every pointwise conv ran 2-3x faster.

``choose_activations`` (``--activations auto``) times uint8 (asymmetric) against int8 (symmetric)
activations the same way. Both are optimizations, not conditions of the run: a failure while
measuring keeps the model it has and says why (``speed_notes`` for the report).
"""

from __future__ import annotations

__all__ = ["SpeedFallback", "choose_activations", "float_mac_share", "speed_notes"]

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import one_line
from onnxopt.latency import call_seconds, compare_latency, median_interval, pair_seconds_needed, timing_settings
from onnxopt.latency import verdict as latency_verdict
from onnxopt.passes.quantize import QuantizeQDQ, node_label
from onnxopt.profiling import kernel_times, layer_times, named_nodes
from onnxopt.runtime import ModelSnapshot
from onnxopt.stats import node_macs

logger = logging.getLogger(__name__)

# An int8 layer counts as slower when its kernels take 10% and 1 µs (the profiler's resolution)
# longer than float; the mixed model must then be 2% faster than the all-int8 one. The profiler adds
# a few µs to every node, and an int8 layer carries its input's QuantizeLinear: small layers lean
# towards "slower", which costs a timing but never a slower model (the whole model decides).
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

Accuracy = Callable[[ir.Model], tuple[bool, str]]  # the accuracy budget's verdict on a model, and its figure


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


class SpeedFallback:
    """Keep float the int8 layers that run slower than float, as many as make the model faster side by
    side, at ``providers`` and ``threads``; never so many that more than ``max_float_share`` of the
    MACs (counted at ``mac_dims``) stay float. ``info`` is what it found (the report's ``speed``)."""

    def __init__(self, providers, threads: int | None, *, mac_dims: Mapping[str, int], max_float_share: float) -> None:
        self.providers, self.threads = providers, threads
        self.mac_dims, self.max_float_share = mac_dims, max_float_share
        self.info: dict[str, Any] = {}
        self.figure: str | None = None  # the accuracy figure of the model kept, when one was judged

    def run(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, result: ir.passes.PassResult,
            feed: Mapping[str, np.ndarray], accuracy: Accuracy | None,
            progress: Callable[[str, int, int], None] | None) -> tuple[ir.Model, QuantizeQDQ, ir.passes.PassResult]:
        """Keep float the layers whose int8 kernels run slower than their float ones on ``feed``, as many
        as make the model faster side by side (and, with ``accuracy``, keep the accuracy budget);
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
            self.info = {"skipped": f"per-layer times are CPU only, not {settings.providers[0]}"}
            return model, p, result
        quantized = list(p.details.get("quantized_nodes", []))
        info: dict[str, Any] = {"providers": list(settings.providers), "threads": settings.threads,
                                "batch": batch_len(feed), "timed": [], "slower_in_int8": {}, "kept_float": [],
                                "tried": []}
        self.info = info
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
            chosen = self.slower_layers(float_model, quantized, t_int8, t_float)
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
                    if faster and accuracy is not None:
                        faster, figure = accuracy(variant)
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
                    self.figure = figure
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

    def slower_layers(self, float_model: ir.Model, quantized: list[str], t_int8: dict[str, float],
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
            if share is None:  # shapes unknown: count the layers instead, as the step's verdict does
                share = len(weighted - set(quantized) | weighted & {*chosen, node}) / max(len(weighted), 1)
            if share <= self.max_float_share:
                chosen.append(node)
        return chosen


def choose_activations(p: QuantizeQDQ, model: ir.Model, float_model: ir.Model, feed: Mapping[str, np.ndarray] | None,
                       *, providers, threads: int | None, measure: bool,
                       progress: Callable[[str, int, int], None] | None,
                       ) -> tuple[QuantizeQDQ, ir.Model, ir.passes.PassResult, dict[str, Any]]:
    """``--activations auto``: uint8 (asymmetric) or int8 (symmetric), whichever model runs faster
    here, side by side; int8 only when decisively faster. TensorRT takes int8 without a timing (its
    explicit quantization is symmetric); without timing in the run (``measure`` off, or no ``feed``),
    uint8 (the CPU default). Returns the pass, the quantized model (``model``, quantized in place as
    uint8, or an int8 copy of ``float_model``), the pass's result, and the choice for the report."""
    uint8 = p.with_activations("uint8")
    settings = timing_settings(providers, 1 if threads is None else threads)
    choice: dict[str, Any] = {"providers": list(settings.providers), "threads": settings.threads}
    if settings.providers[0] == "TensorrtExecutionProvider":
        choice.update(chosen="int8", why="TensorRT's explicit quantization takes symmetric int8")
        int8 = p.with_activations("int8")
        return int8, model, int8(model), choice
    result = uint8(model)
    if not measure or feed is None:
        choice.update(chosen="uint8", why="not measured (no timing in this run): the CPU default")
        return uint8, model, result, choice
    if progress:
        progress("activations", 0, 1)
    int8, candidate = p.with_activations("int8"), float_model.clone()
    snapshots = []
    try:
        int8_result = int8(candidate)
        snapshots = [ModelSnapshot(model), ModelSnapshot(candidate)]
        figures = compare_latency(*snapshots, feed, providers=providers, threads=settings.threads,
                                  budget_seconds=ACTIVATIONS_BUDGET_SECONDS, threshold=SPEED_MIN_GAIN)
    except Exception as exc:  # a measurement, not a condition of the run
        logger.warning("quantize: activations not measured: %s", exc)
        choice.update(chosen="uint8", why=f"not measured ({one_line(exc, 120)}): the CPU default")
        return uint8, model, result, choice
    finally:
        for snapshot in snapshots:
            snapshot.close()
    chosen = "int8" if figures.verdict == "faster" else "uint8"
    choice.update(chosen=chosen, batch=batch_len(feed), int8_vs_uint8=round(figures.ratio, 3),
                  why=f"the int8 (symmetric) model ran {figures.ratio:.2f}x the uint8 one's time")
    return (int8, candidate, int8_result, choice) if chosen == "int8" else (uint8, model, result, choice)


def speed_notes(speed: dict[str, Any] | None) -> list[str]:
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


def batch_len(feed: Mapping[str, np.ndarray]) -> int | None:
    """The rows of a feed: its first input's first dim."""
    shapes = [np.shape(a) for a in feed.values()]
    return int(shapes[0][0]) if shapes and shapes[0] else None


def _speed_budget(call: float) -> float:
    """Seconds one side-by-side timing of the speed fallback may take, for calls of ``call`` seconds."""
    return min(max(SPEED_BUDGET_CALLS * call, SPEED_BUDGET_SECONDS[0]), SPEED_BUDGET_SECONDS[1])


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
    runs (paired in order), as ``SpeedFallback._against_float`` reports a timing of its own."""
    n = min(len(float_runs), len(int8_runs))
    ratios = np.asarray(int8_runs[:n], dtype=float) / np.maximum(np.asarray(float_runs[:n], dtype=float), 1e-9)
    ratio = float(np.median(ratios))
    low, high = median_interval(ratios)
    return {"ratio": round(ratio, 3), "low": round(low, 3), "high": round(high, 3),
            "verdict": latency_verdict(ratio, low, high, SPEED_MIN_GAIN), "profiled": True}

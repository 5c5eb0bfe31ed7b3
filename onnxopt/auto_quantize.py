"""``--quantize auto``: static and dynamic int8 built from the same passes, judged by one budget, timed
side by side, and the faster that meets the budget kept.

Each candidate is a whole ``optimize()`` run on a copy of the recipe with ``quantize`` set to ``int8``
(calibrated QDQ, with its own accuracy and speed fallbacks) or ``int8-dynamic`` (with the lossy
passes' layer fallback), on the same data (``--data``, else the ``--calibration`` samples, else
synthetic inputs) and against the same budget: the user's ``--max-drop`` / ``--min-cosine``, else the
default (1 accuracy point with labels, 0.99 cosine per sample without), given explicitly to both so
that both fall back by it. Then the two results are timed against each other on the first batch
(``onnxopt.latency.compare_latency``: interleaved, the ratio's interval decides):

- only one meets the budget: that one;
- both: the faster; when the timing finds no difference, the more accurate (the higher judged
  figure);
- neither: the more accurate, and the run fails as each candidate would have.

Static int8 needs calibration: without ``--calibration`` only dynamic is built, and the report says
so. Weight-only int4 is not a candidate: it trades accuracy for size, not for speed.

The result is the kept run's own report (its passes, validation and latency against the input
model), with ``details["auto"]`` on its quantize record holding both candidates' figures and the
reason, and notes that say the same in words.
"""

from __future__ import annotations

__all__ = ["optimize_auto", "AUTO_MODES"]

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onnxopt import io
from onnxopt.budget import DEFAULT_MAX_DROP, DEFAULT_MIN_COSINE, judge
from onnxopt.data import feed_dims, load_data, parse_dims, timing_feed
from onnxopt.errors import OnnxoptError, OptionError, one_line
from onnxopt.latency import compare_latency
from onnxopt.runtime import ModelSnapshot
from onnxopt.stats import macs_per_sample
from onnxopt.synthetic import runnable_synthetic_data

if TYPE_CHECKING:
    from onnxopt.recipe import Recipe

# What ``onnxopt.optimize`` returns and takes as progress: passed in by the pipeline (``run``), so that
# this module does not import the pipeline that calls it.
OptimizeResult = Any
Progress = Callable[[str, int, int], None]

logger = logging.getLogger(__name__)

AUTO_MODES = ("int8", "int8-dynamic")  # static QDQ, dynamic
_RECORDS = {"int8": "quantize", "int8-dynamic": "quantize-dynamic"}


def optimize_auto(model, recipe: Recipe, progress: Progress | None = None, *,
                  run: Callable[..., OptimizeResult]) -> OptimizeResult:
    """Run ``recipe`` (``quantize == "auto"``) as static and as dynamic int8 with ``run``
    (``onnxopt.optimize``) and keep one (module docstring)."""
    if not recipe.validate:
        raise OptionError("--quantize auto keeps the candidate that meets the accuracy budget: it needs validation "
                          "(drop --no-validate)")
    loaded = io.load_model(model)  # for the timing feed; each candidate reads ``model`` itself
    data = recipe.data
    source_note = None
    if data is None and recipe.calibration is not None and not _is_synthetic(recipe.calibration):
        data = recipe.calibration  # both validated on the same samples
        source_note = "no --data given: both candidates validated on the --calibration samples"
    feed, labelled = _first_batch(loaded, data, recipe)
    snapshot = ModelSnapshot(loaded)
    input_bytes = snapshot.nbytes
    snapshot.close()
    max_drop, min_cosine = recipe.max_drop, recipe.min_cosine
    if max_drop is None and min_cosine is None:
        max_drop, min_cosine = (DEFAULT_MAX_DROP, None) if labelled else (None, DEFAULT_MIN_COSINE)
    candidates: dict[str, dict] = {}
    results: dict[str, OptimizeResult] = {}
    for mode in AUTO_MODES:
        if mode == "int8" and recipe.calibration is None:
            candidates[mode] = {"skipped": "static int8 needs --calibration (ranges come from data); "
                                           "only dynamic int8 was built"}
            continue
        sub = recipe.replace(quantize=mode, data=data, max_drop=max_drop, min_cosine=min_cosine)
        if mode == "int8":  # dynamic int8's own option does not apply to static int8
            sub = sub.replace(dynamic_activations="auto")
        if mode == "int8-dynamic":  # static int8's own options do not apply to dynamic int8
            sub = sub.replace(passes=_dynamic_passes(recipe.passes), **_static_defaults(recipe))
        if progress:
            progress(f"auto: {mode}", len(results), len(AUTO_MODES))
        start = time.perf_counter()
        try:
            result = run(model, sub, progress=progress)
        except OptionError:
            raise
        except OnnxoptError as exc:  # one candidate that cannot be built leaves the other
            candidates[mode] = {"skipped": f"failed: {one_line(exc, 200)}"}
            continue
        results[mode] = result
        candidates[mode] = _figures(result, max_drop, min_cosine, time.perf_counter() - start, input_bytes)
    if not results:
        raise OnnxoptError("--quantize auto: no candidate could be built: "
                           + "; ".join(f"{m}: {c['skipped']}" for m, c in candidates.items()))
    head_to_head = None
    if len(results) == 2:
        head_to_head = _time_pair(results["int8"], results["int8-dynamic"], feed, recipe)
    chosen, why = choose(candidates, head_to_head)
    kept = results[chosen]
    for mode, figures in candidates.items():
        figures["kept"] = mode == chosen
    auto = {"chosen": chosen, "why": why, "candidates": candidates,
            "budget": {"max_drop": max_drop, "min_cosine": min_cosine}}
    if head_to_head is not None:
        auto["dynamic_vs_static"] = head_to_head
    if source_note:
        auto["data"] = source_note
    record = next((r for r in reversed(kept.report.passes) if r.name == _RECORDS[chosen]), None)
    if record is not None:
        record.details["auto"] = auto
    kept.report.notes[:0] = [f"quantize auto: kept {chosen}: {why}",
                             *(f"quantize auto: {m}: {_describe(c)}" for m, c in candidates.items())]
    return kept


def choose(candidates: dict[str, dict], head_to_head: dict | None) -> tuple[str, str]:
    """The mode to keep and why, from each candidate's figures (``met``, ``figure``, ``score``) and the
    dynamic-vs-static timing (``ratio`` dynamic / static and its ``verdict``)."""
    built = {m: c for m, c in candidates.items() if "skipped" not in c}
    met = [m for m, c in built.items() if c["met"]]
    if len(built) == 1:
        (mode, c), = built.items()
        others = "; ".join(f"{m} not built ({c['skipped']})" for m, c in candidates.items() if "skipped" in c)
        return mode, f"the only candidate ({others}); {'meets' if c['met'] else 'MISSES'} the budget: {c['figure']}"
    if len(met) == 1:
        (other,) = set(built) - set(met)
        return met[0], f"the only one that meets the budget ({met[0]}: {built[met[0]]['figure']}; {other}: {built[other]['figure']})"
    most_accurate = max(built, key=lambda m: built[m]["score"])
    if not met:
        return most_accurate, f"neither meets the budget; kept the more accurate ({_scores(built)})"
    verdict, ratio = head_to_head["verdict"], head_to_head["ratio"]
    timing = f"dynamic takes {ratio:.2f}x static's time [{head_to_head['ratio_low']:.2f}, {head_to_head['ratio_high']:.2f}]"
    if verdict == "faster":
        return "int8-dynamic", f"both meet the budget; dynamic is faster ({timing})"
    if verdict == "slower":
        return "int8", f"both meet the budget; static is faster ({timing})"
    if not (head_to_head["ratio_low"] > 0 and math.isfinite(head_to_head["ratio_high"])):
        timing += ": too few repetitions to bound the ratio; a larger --latency-budget times more"
    return most_accurate, f"both meet the budget and the timing finds no difference ({timing}); kept the more accurate ({_scores(built)})"


def _figures(result: OptimizeResult, max_drop: float | None, min_cosine: float | None, seconds: float,
             input_bytes: int) -> dict:
    report, v = result.report, result.report.validation
    figures: dict = {"seconds": round(seconds, 3)}
    if v is None:
        return {**figures, "met": False, "figure": "not validated", "score": -math.inf}
    met, figure = judge(v, max_drop, min_cosine)
    judged = [o for o in v.outputs if getattr(o, "judged", True)]
    worst = min((o.cosine for o in judged if not math.isnan(o.cosine)), default=float("nan"))
    means = [o.cosine_mean for o in judged if o.cosine_mean is not None and not math.isnan(o.cosine_mean)]
    figures.update(met=bool(met and v.ok), figure=figure, cosine_worst=worst,
                   cosine_mean=min(means) if means else None)
    if v.accuracy_before is not None and v.accuracy_after is not None:
        figures["accuracy_drop"] = (v.accuracy_before - v.accuracy_after) * 100
    # The figure the budget judges, higher is better: accuracy kept with labels and a drop budget, else cosine.
    figures["score"] = -figures["accuracy_drop"] if max_drop is not None and "accuracy_drop" in figures else (
        worst if not math.isnan(worst) else -math.inf)
    if not v.ok and met:
        figures["figure"] += f"; failed otherwise: {v.criterion or v.error or 'see its report'}"
    snapshot = ModelSnapshot(result.model)
    try:
        figures["file_bytes"] = snapshot.nbytes
    finally:
        snapshot.close()
    figures["file_ratio"] = round(figures["file_bytes"] / max(input_bytes, 1), 4)
    before = report.before.bytes
    figures["weight_ratio"] = round(report.after.bytes / before, 4) if before else None
    if report.latency is not None:
        figures["latency_vs_input"] = {"ratio": report.latency.ratio, "low": report.latency.ratio_low,
                                       "high": report.latency.ratio_high, "verdict": report.latency.verdict}
    return figures


def _time_pair(static: OptimizeResult, dynamic: OptimizeResult, feed, recipe: Recipe) -> dict:
    a, b = ModelSnapshot(static.model), ModelSnapshot(dynamic.model)
    try:
        lat = compare_latency(a, b, feed, providers=recipe.providers, threads=recipe.threads,
                              budget_seconds=recipe.latency_budget)
    finally:
        a.close()
        b.close()
    return {"ratio": lat.ratio, "ratio_low": lat.ratio_low, "ratio_high": lat.ratio_high, "verdict": lat.verdict,
            "median_static_ms": lat.median_a_ms, "median_dynamic_ms": lat.median_b_ms, "threads": lat.threads,
            "repetitions": lat.repetitions}


def _first_batch(model, data, recipe: Recipe):
    """The feed both candidates are timed on, and whether the data has labels."""
    dims = parse_dims(recipe.dims)
    fixed = parse_dims(recipe.fix_dims, "--fix-dim")
    if fixed:  # both candidates take the data at the sizes --fix-dim gives: time them at those
        from onnxopt.passes import FixInputShapes

        model = FixInputShapes(fixed)(model.clone()).model
        dims = {k: v for k, v in dims.items() if k not in fixed}
    if data is None or _is_synthetic(data):
        dataset = runnable_synthetic_data(model, dims=dims, providers=recipe.providers, batch_size=recipe.batch_size)
    else:
        dataset = load_data(data, model, batch_size=recipe.batch_size, dims=dims, max_samples=recipe.max_samples)
    feed = dataset.batches[0]
    macs = macs_per_sample(model, feed, {**feed_dims(model, feed), **dims})
    return timing_feed(model, feed, macs, batch_given=recipe.batch_size is not None)[0], dataset.labels is not None


def _static_defaults(recipe: Recipe) -> dict:
    from onnxopt.recipe import _QUANTIZE_OPTIONS, Recipe

    default = Recipe()
    # smooth_quant applies to both modes (dynamic: one Mul per activation, passes/quantize_dynamic.py)
    return {n: getattr(default, n) for n in _QUANTIZE_OPTIONS if n not in ("exclude", "target", "smooth_quant")} | {
        "speed_fallback": None}


def _dynamic_passes(passes):
    """The passes with a listed static ``quantize`` pass replaced by ``quantize-dynamic``."""
    from onnxopt.recipe import _is_quantize

    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    return [("quantize-dynamic" if _is_quantize(p) else p) for p in passes]


def _is_synthetic(data) -> bool:
    return isinstance(data, str) and data == "synthetic"


def _scores(built: dict[str, dict]) -> str:
    return ", ".join(f"{m}: {c['figure']}" for m, c in built.items())


def _describe(c: dict) -> str:
    if "skipped" in c:
        return f"not built: {c['skipped']}"
    lat = c.get("latency_vs_input")
    speed = f", {lat['ratio']:.2f}x the input's latency" if lat else ""
    return f"{'meets' if c['met'] else 'misses'} the budget ({c['figure']}), file {c['file_ratio']:.2f}x{speed}"

"""Run named passes in order around a model, then prove the result: validation and latency side by side."""

from __future__ import annotations

__all__ = ["DEFAULT_PASSES", "OptimizeResult", "Recipe", "optimize", "resolve_passes", "check_model"]

import gc
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import io
from onnxopt.budget import judge
from onnxopt.compressed_size import run_sizes
from onnxopt.data import (Dataset, SampleRows, cannot_run, check_labels, feed_dims, head, input_specs, load_data,
                          parse_dims, sample_rows, timing_feed)
from onnxopt.errors import ModelLoadError, OnnxoptError, OptionError, UnknownPassError, one_line
from onnxopt.fallback import FINAL_STEPS, LossyFallback, lossy_units
from onnxopt.options import import_torch
from onnxopt.latency import compare_latency
from onnxopt.recipe import DEFAULT_PASSES, Recipe
from onnxopt.passes import (REGISTRY, ClusterWeights, FixInputShapes, LowRankFactorize, PruneChannels, QuantizeDynamic,
                            QuantizeQDQ, QuantizeWeightsInt4)
from onnxopt.passes._base import AUTO
from onnxopt.passes.fix_shapes import input_dim_names
from onnxopt.passes.prune_channels import DATA_CRITERIA
from onnxopt.quantization import QuantizationStep
from onnxopt.report import PassRecord, Report, Validation, plural
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session
from onnxopt.stats import macs_per_sample, model_stats
from onnxopt.synthetic import runnable_synthetic_data
from onnxopt.validate import DEFAULT_ATOL, ReferenceOutputs, compare_models

logger = logging.getLogger(__name__)

# Without --data, a quantized model is validated on this many calibration samples (not random inputs).
CALIBRATION_VALIDATION_SAMPLES = 512

# A model read from a file with external data and weights above this size is run so that memory
# peaks near its weights once, not four times: onnxruntime reads the input file itself (no copy),
# each pass's new weights are written out (``io.spill_tensors``), the reference runs on the data
# before the passes and its session is dropped, and the latency comparison (two sessions alive at
# once) is left to ``onnxopt bench`` with a note. See docs/benchmarks.md (models larger than memory).
LARGE_MODEL_BYTES = 2**30

Progress = Callable[[str, int, int], None]


@dataclass
class OptimizeResult:
    """The optimized model, the report of the run, and where the input came from."""

    model: ir.Model
    report: Report
    source: str | None = None
    # The intermediate values whose types the input declared: the saved file declares those, no more.
    value_info: frozenset[str] | None = None

    @property
    def ok(self) -> bool:
        return self.report.ok

    def save(self, path: str | os.PathLike, *, in_place: bool = False) -> Path:
        """Write the model atomically; refuses to overwrite the input unless ``in_place``."""
        saved = io.save_model(self.model, path, protect=self.source, in_place=in_place, value_info=self.value_info)
        self.report.output = str(saved)
        return saved


def resolve_passes(passes) -> list[ir.passes.PassBase]:
    """Pass names (a list, or one comma-separated string) or pass objects → pass objects."""
    return Recipe(passes=passes).resolved_passes()


def _pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", "") or type(p).__name__


def check_model(model: ir.Model) -> None:
    """onnx.checker and an onnxruntime session must both accept the model (used after every pass in tests)."""
    snapshot = ModelSnapshot(model)
    try:
        if snapshot.data is not None:
            onnx.checker.check_model(onnx.load_from_string(snapshot.data), full_check=False)
        else:
            onnx.checker.check_model(snapshot.path)
        snapshot.session(optimization="disabled")
    finally:
        snapshot.close()


def optimize(model, recipe: Recipe | Sequence | str | None = None, *, progress: Progress | None = None,
             **options) -> OptimizeResult:
    """Optimize ``model`` (a path, ``onnx.ModelProto`` or ``ir.Model``; never modified) as ``recipe`` says.

    ``recipe`` is a ``Recipe`` (``onnxopt.recipe``: every option of a run, readable from and
    writable to TOML), or the passes alone (names or pass objects) with the other options as
    keywords: ``optimize("m.onnx", ["simplify", "fold-bn"], data="x.npz")`` is
    ``optimize("m.onnx", Recipe(passes=["simplify", "fold-bn"], data="x.npz"))``. Keywords given
    with a ``Recipe`` override its fields. ``progress(stage, done, total)`` is called as work goes.
    Every option is checked first: a bad one raises ``OptionError`` with the command line's message.
    """
    if isinstance(recipe, Recipe):
        recipe = recipe.replace(**options)
    elif recipe is None:
        recipe = Recipe().replace(**options)
    elif "passes" in options:
        raise OptionError("optimize(): passes given twice (as the second argument and as passes=)")
    else:
        recipe = Recipe().replace(passes=recipe, **options)
    recipe.check_options()
    if recipe.quantize == "auto":  # static and dynamic int8, each a whole run: onnxopt.auto_quantize
        from onnxopt.auto_quantize import optimize_auto

        return optimize_auto(model, recipe, progress, run=optimize)
    return _optimize(model, recipe.pass_list(), progress=progress, **recipe.arguments())


def _optimize(
    model,
    passes: Sequence | str = DEFAULT_PASSES,
    *,
    data=None,
    dims: Mapping[str, int] | Sequence[str] | None = None,
    providers: str | Sequence[str] = "cpu",
    validate: bool = True,
    latency: bool = True,
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    batch_size: int | None = None,
    threads: int | None = None,
    latency_budget: float = 5.0,
    check: bool = False,
    progress: Progress | None = None,
    prune: float | None = None,
    importance: str = "l1",
    prune_scope: str = "layer",
    round_to: int = 1,
    protect_first: bool = True,
    calibration=None,
    calibrate: str = "minmax",
    percentile: float = 99.99,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    speed_fallback: bool | None = None,
    fix_dims: Mapping[str, int] | Sequence[str] | None = None,
    target: str | None = "auto",
    max_samples: int | None = None,
    distill: bool = False,
    train_data=None,
    epochs: int | None = None,
    steps: int | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    lr: float = 1e-3,
    seed: int = 0,
    distill_features: str | Sequence[str] | None = None,
    feature_weight: float = 1.0,
    outputs: Sequence[str] | None = None,
    smooth_quant: float | str | None = None,
    precision: str | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (a path, ``onnx.ModelProto`` or ``ir.Model``; never modified) with ``passes``.

    With ``validate`` the result runs beside the original under onnxruntime on ``data`` (a file,
    arrays, an iterable of feeds, or ``"synthetic"``; random inputs when None, flagged as such),
    and with ``latency`` both are timed side by side. ``rtol=None`` judges each output by the
    default for its dtype (1e-5 for float32, 2e-3 for float16; see ``onnxopt.validate``).
    ``check`` runs onnx.checker and creates an onnxruntime session after every pass.

    A ``quantize`` pass without ranges is calibrated on ``calibration`` (``calibrate`` names the
    method) and judged as a lossy pass: ``max_drop`` accuracy points with labels, else ``min_cosine``
    per output; then, with ``speed_fallback`` (None: when ``latency`` is measured), layers whose int8
    kernels run slower than float (at the ``threads`` and the batch that latency is measured at) stay
    float when that makes the model faster; see ``onnxopt.quantization`` and ``onnxopt.speed_fallback``.

    ``target`` (``auto``, ``avx2``, ``avx512``, ``vnni``, ``arm64``, ``tensorrt``; see ``onnxopt.target``)
    is the machine a quantized model is made for: its int8 weights are those its kernels sum exactly.

    ``fix_dims`` (``{"batch": 1, "seq": 128}``) fixes those input dims in the result (the
    ``fix-shapes`` pass, first unless listed): data and calibration must then have those sizes.
    ``max_samples`` reads at most that many samples of ``data`` and of ``calibration``.

    Every argument is checked first (``onnxopt.options``): a bad one raises ``OptionError``, with
    the message the command line gives for its flag. With ``validate=False``, the result must still
    pass onnx.checker and load in onnxruntime, else the report fails (nothing to write).
    """
    arguments = dict(locals())
    if precision == "bf16" and resolve_providers(providers) == ["CPUExecutionProvider"]:
        raise OptionError("--precision bf16: onnxruntime's CPU provider has no bfloat16 kernels (Relu, Conv, Gemm, ...), "
                          "so the result could not be run or validated here; use --precision fp16, or --providers cuda "
                          "on a machine with CUDA")
    pass_objects = resolve_passes(passes)
    requested = list(pass_objects)
    if prune is not None:  # importance pruning: lossy by request (see ``with_pruning``)
        pass_objects = with_pruning(pass_objects, prune, importance, prune_scope, round_to, protect_first)
    dims = parse_dims(dims)
    if calibration is None and data is None and any(_needs_grams(p) for p in pass_objects):
        raise OptionError(GPTQ_NEEDS_DATA)
    if calibration is None and any(_needs_smoothing(p) for p in pass_objects):
        raise OptionError(SMOOTHING_NEEDS_CALIBRATION)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    label = source or type(model).__name__
    working = io.load_model(model)
    declared = io.declared_value_names(working)
    large = io.has_external_data(working) and io.weight_bytes(working) > LARGE_MODEL_BYTES
    pass_objects, fixed_dims = with_fixed_dims(pass_objects, parse_dims(fix_dims, "--fix-dim"), dims, working, label)
    dims = {k: v for k, v in dims.items() if k not in fixed_dims}  # data meets those dims fixed
    quantizing = [p for p in pass_objects if isinstance(p, QuantizeQDQ) and p.ranges is None]
    if len([p for p in pass_objects if isinstance(p, QuantizeQDQ)]) > 1:
        raise OptionError("pass quantize is listed more than once: the second would find the model quantized already")
    if quantizing:
        working, upgraded = QuantizationStep.upgrade_opset(working, label)
    # Data and calibration must fit the model as it will be: with its dims fixed, if they are.
    fixer = next((p for p in pass_objects if isinstance(p, FixInputShapes)), None)
    data_model = FixInputShapes(fixer.dims)(working.clone()).model if fixer is not None else working
    quantization = None
    if quantizing:
        quantization = QuantizationStep(
            data_model, label, calibration=calibration, method=calibrate, percentile=percentile, max_drop=max_drop,
            min_cosine=min_cosine, batch_size=batch_size, dims=dims, providers=providers, threads=threads,
            speed_fallback=latency if speed_fallback is None else speed_fallback, target=target,
            max_samples=max_samples, judged_outputs=outputs, smooth_alpha=smooth_quant,
        )
        quantization.notes += [upgraded] if upgraded else []
    reference_outputs = None
    if validate or latency:
        # A large model's input file is the original as onnxruntime should read it: no copy is made.
        original = (ModelSnapshot.from_file(source) if large and source is not None and quantization is None
                    else ModelSnapshot(working))
        # Fail on bad data before spending time on passes.
        dataset = _dataset(data, data_model, dims, batch_size, quantization, max_samples, providers,
                           snapshot=original if data_model is working else None)
        try:
            original.session(optimization="disabled", providers=providers)
        except OnnxoptError:  # an unavailable provider says so itself
            raise
        except Exception as exc:
            raise ModelLoadError(f"{label}: onnxruntime cannot load the input model: {one_line(exc)}") from None
        if dataset.batches:  # data that passes every check and still does not fit (token ids past the table)
            try:
                first = run_session(original.session(optimization="disabled", providers=providers), dataset.batches[0])
            except Exception as exc:
                sizes = ", ".join(f"{k}={v}" for k, v in fixed_dims.items())
                raise cannot_run(f"{dataset.source} batch 0", dataset.batches[0], input_specs(data_model), exc,
                                 hints=[f"at the sizes --fix-dim gives: {sizes}" if sizes else ""]) from None
            if dataset.labels is not None and first:  # labels past the classes: refused before any pass
                name = next(iter(first))
                check_labels(dataset.labels, np.asarray(first[name]), name, dataset.source)
        if large and validate:
            reference_outputs = _reference_outputs(original, dataset, providers)
        elif validate and dataset.batches:  # the first batch's outputs, just computed, are the validation's too
            reference_outputs = quantization.budget.reference_outputs if quantization is not None else ReferenceOutputs()
            reference_outputs.keep(0, first)
        if quantization is not None and reference_outputs is not None:  # its fallback judges against these
            quantization.budget.reference_outputs = reference_outputs
        if large:
            original.release()  # its weights would sit beside each pass's and the candidate's
        if max_drop is not None and validate and dataset.labels is None:  # any lossy run, before any pass
            raise OptionError(f"--max-drop needs labels in the --eval data ({dataset.source} has none); "
                              "without labels the budget is --min-cosine")
    # MACs per sample at the data's other dims (a transformer's sequence length), unless --dim says.
    stat_dims = {**feed_dims(working, dataset.batches[0] if (validate or latency) and dataset.batches else None), **dims,
                 **fixed_dims}
    train = None
    if distill:  # read and checked before any pass runs
        scalar = [s.name for s in input_specs(working) if s.shape == ()]
        if scalar:
            raise OptionError(f"--distill: input '{scalar[0]}' is a scalar (0-d); distillation needs inputs with a "
                              "first axis of samples")
        if distill_features is not None and distill_features != "auto":  # a name no node computes: before any pass
            from onnxopt.distill import feature_candidates

            feature_candidates(working, working, distill_features)
        train = sample_rows(train_data, working, max_samples=max_samples)  # files: read a chunk at a time
    before = model_stats(working, dims=stat_dims)
    report = Report(model=label, output=None, before=before, after=before)
    # Judged on the model as the data meets it: a batch dim that --fix-dim fixes is never cut.
    timed, timed_note = (timing_feed(data_model, dataset.batches[0],
                                     macs_per_sample(working, dataset.batches[0], stat_dims, before.macs)
                                     if batch_size is None else before.macs, batch_given=batch_size is not None)
                         if (validate or latency) and dataset.batches else (None, None))
    if timed_note and (latency or (quantization is not None and quantization.speed_fallback)):  # something times it
        report.notes.append(f"latency: {timed_note}")
    sizes_before = run_sizes(working, declared)  # file, gzip, Deep Compression: after the passes too
    # A pass that says it changes outputs (importance pruning, clustering, sparsity, low rank) is
    # reported, not judged by the lossless tolerance.
    report.lossy = any(getattr(p, "lossy", False) for p in pass_objects if not isinstance(p, QuantizeQDQ))
    # With a budget, lossy passes that rewrite layers one by one are judged by it and undone layer by
    # layer while it misses (onnxopt.fallback); without, they are reported, not judged.
    auto = [p for p in pass_objects if getattr(p, "per_layer", None) == AUTO]
    if auto and not validate:
        raise OptionError(f"{auto[0].name}: levels per layer by sensitivity (auto) are measured against the input "
                          "model: not with validate=False (--no-validate)")
    budgeted = validate and (max_drop is not None or min_cosine is not None or bool(auto)) and quantization is None
    undoable = lossy_units(pass_objects) if budgeted else []
    fallback_start = fallback_from = None
    for step, p in enumerate(pass_objects):
        name = _pass_name(p)
        if undoable and fallback_start is None and p in undoable:
            fallback_start, fallback_from = working.clone(), step
        if progress:
            progress(f"pass {name}", step, len(pass_objects))
        if isinstance(p, PruneChannels) and p.importance in ("activation", "apoz", "entropy") and p.ratio is not None and p.activation is None:
            p.activation = activation_statistics(working, calibration if calibration is not None else data, dims, batch_size,
                                                 providers, nonzero=p.importance == "apoz", max_samples=max_samples,
                                                 entropy=p.importance == "entropy")
        elif isinstance(p, PruneChannels) and p.importance in ("taylor", "fisher") and p.ratio is not None and p.activation is None:
            p.activation = gradient_statistics(working, p.importance, calibration if calibration is not None else train_data,
                                               dims, batch_size, max_samples, seed)
        if _needs_grams(p):
            p.calibration_gram = gptq_grams(working, p, calibration if calibration is not None else data, dims, batch_size,
                                            providers, max_samples, progress)
        if _needs_smoothing(p):
            p.act_absmax = smoothing_statistics(working, p, calibration, dims, batch_size, providers, max_samples,
                                                progress)
        if isinstance(p, LowRankFactorize) and calibration is not None and not p.activation_gram:
            # activation-aware: the factors that keep the layer's output, not its weight (passes/lowrank.py)
            p.activation_gram = gptq_grams(working, p, calibration, dims, batch_size, providers, max_samples, progress,
                                           exclude_padding=True)
        if p in auto:  # levels per layer by measured sensitivity, on the model as this pass receives it
            _choose_levels(p, working, original, dataset, max_drop=max_drop, min_cosine=min_cosine, providers=providers,
                           outputs=outputs, feed=timed, threads=threads, progress=progress, notes=report.notes)
        elif isinstance(p, LowRankFactorize) and p.lossy:  # a pair that is not faster is not worth its error
            p = pass_objects[step] = _faster_layers_only(p, working, timed, providers, threads, report.notes)
        start = time.perf_counter()
        if quantization is not None and p in quantizing:
            result = quantization.run(p, working, dataset if validate else None, original if validate else None, progress,
                                      timing_feed=timed)
            p = quantization.pass_  # the recipe it settled on: falling back builds a new pass object
        else:
            result = p(working)
        seconds = time.perf_counter() - start
        working = result.model
        if large:
            io.spill_tensors(working)
            gc.collect()  # replaced weights sit in reference cycles (values and nodes) with their file maps
        if check:
            check_model(working)
        previous = report.passes[-1].after if report.passes else before
        # A pass that changed nothing leaves the figures as they were (counting MACs infers shapes: 0.2 s a model).
        after = model_stats(working, dims=stat_dims) if result.modified or previous is None else previous
        grown = _growth_note(name, previous, after)
        report.notes += [grown] if grown else []
        report.passes.append(
            PassRecord(
                name=name, modified=bool(result.modified), seconds=seconds,
                summary=getattr(p, "summary", "") or ("changed" if result.modified else "no change"),
                after=after, details=_details(p),
            )
        )
        # Layers the quantization step kept float on purpose, it reports itself.
        left = [(what, why) for what, why in (getattr(p, "details", {}) or {}).get("left", {}).items()
                if not why.startswith("kept float")]
        for what, reason in left[:3]:
            report.notes.append(f"{name}: {what} left: {reason}")
    fallback = None
    ran = list(pass_objects)  # the pass objects that made the model (the budget's fallback reruns some)
    if fallback_start is not None:
        fallback = LossyFallback(fallback_start, pass_objects[fallback_from:], original, dataset, max_drop=max_drop,
                                 min_cosine=min_cosine, providers=providers, judged_outputs=outputs)
        working, rerun, _, _ = fallback.run(working)
        ran = [*pass_objects[:fallback_from], *rerun]
        for record, p in zip(report.passes[fallback_from:], rerun):
            record.summary = getattr(p, "summary", "") or record.summary
            record.details = _details(p)
            record.after = model_stats(working, dims=stat_dims) if p is rerun[-1] else record.after
        report.notes += _fallback_notes(fallback.details)
        if fallback.details.get("stuck"):
            report.notes.append(f"budget: {fallback.details['stuck']}")
    if any(isinstance(p, (QuantizeDynamic, QuantizeWeightsInt4)) and p.details.get("quantized") for p in ran):
        report.notes.append(_fused_kernels_note(working, providers))
    if distill:  # the lossy passes' cost, won back from the input model as teacher
        epochs, lr = _low_bit_defaults(ran, epochs, steps, lr, report.notes)  # as the budget left them
        report.passes.append(distill_step(model, working, train, dict(
            epochs=epochs, steps=steps, temperature=temperature, alpha=alpha, lr=lr, seed=seed, providers=providers,
            batch_size=batch_size or 32, features=distill_features, feature_weight=feature_weight, outputs=outputs,
            **(channel_map(ran) if distill_features else {})), progress, stat_dims))
        report.lossy = True
    precision_missed = None
    if precision:  # last: islands are measured on the model as it ships
        record = _precision_step(working, precision, dataset if validate else None, providers, min_cosine, stat_dims)
        working = record.details.pop("model")
        report.passes.append(record)
        report.lossy = True
        if record.details.get("met") is False:
            precision_missed = record.summary
    report.after = report.passes[-1].after if report.passes else before
    report.sizes = {"before": sizes_before, "after": run_sizes(working, declared)}
    if validate or latency:
        candidate = ModelSnapshot(working)
        if validate:
            # The quantization step validated the model it settled on already: on the same data.
            report.validation = quantization.budget.validated(candidate, rtol, atol) if quantization is not None else None
            if report.validation is None:
                report.validation = compare_models(
                    original, candidate, dataset, providers=providers, rtol=rtol, atol=atol,
                    runtime_floor=quantization is None and not report.lossy,
                    progress=(lambda i, n: progress("validate", i, n)) if progress else None,
                    reference_outputs=quantization.budget.reference_outputs if quantization is not None else reference_outputs,
                    judged_outputs=outputs,
                )
            if large:
                candidate.release()
                original.release()
        if (validate and quantization is None and not report.lossy and prune is None and report.validation is not None
                and not report.validation.ok and report.validation.error is None and len(requested) > 0):
            left_out = _passes_that_break(model, requested, original, dataset, providers, rtol, atol, progress)
            kept = [p for p in requested if all(p is not q for q, _ in left_out)]
            if left_out and kept:  # each kept pass validated in turn: run again without the others, say why
                candidate.close()
                original.close()
                retried = _optimize(**{**arguments, "passes": kept})
                retried.report.notes[:0] = [f"{_pass_name(q)} left out: {why}" for q, why in left_out]
                return retried
        if budgeted and report.lossy and report.validation is not None and report.validation.error is None:
            _judge_by_budget(report, max_drop, min_cosine)
        if precision_missed and report.validation is not None:
            report.validation.ok, report.lossy = False, False
            report.validation.criterion = f"{precision} budget not met: {precision_missed}"
        if fixed_dims and report.validation is not None and report.validation.error and not report.validation.outputs:
            report.notes.append(_fixed_dims_failure(fixed_dims, original, dataset, providers))
        if latency and large:
            report.notes.append(
                f"latency not compared: side by side, two sessions would each hold the model's "
                f"{io.weight_bytes(working) / 1e9:.1f} GB of weights; time it with onnxopt bench")
        elif latency and quantization is not None and quantization.verdict_failed is not None:
            report.notes.append("latency not compared: the int8 model misses its accuracy budget and is not written")
        elif latency and (report.validation is None or report.validation.error is None):
            report.latency = compare_latency(
                original, candidate, timed, providers=providers, threads=threads,
                budget_seconds=latency_budget, stretch=LATENCY_STRETCH,
                progress=(lambda i, t: progress("latency", int(t), int(latency_budget))) if progress else None,
            )
        if quantization is not None:
            quantization.finish(report, candidate, original)
        candidate.close()
        original.close()
    if quantization is not None and not (validate or latency):
        quantization.finish(report, None, None)
    if not validate:
        report.validation = _unvalidated_check(working, rtol, atol)
    if progress:
        progress("done", 1, 1)
    return OptimizeResult(working, report, source, declared)


_STEP_WORDS = {"per row": "activations quantized per row"}  # a pass's partial undo step, in the report's words


def _fallback_notes(details: dict) -> list[str]:
    """The budget's way back in the report: the layers kept as they were (or float), and those only
    stepped part of the way (weight-only int4: to 8 bits; dynamic int8: to activations per row), a
    note each, with the figure the fallback ended on."""
    notes = []
    final = FINAL_STEPS
    where = {k["unit"]: k for k in details["kept"]}  # a unit stepped part of the way, then all of it: the last
    ended = list(where.values())
    partial = list(dict.fromkeys(k.get("to") for k in ended if k.get("to", "as it was") not in final))
    groups = [("kept {} as they were", [k for k in ended if k.get("to", "as it was") in final])]
    groups += [(f"stepped {{}} to {_STEP_WORDS.get(to, to)}", [k for k in ended if k.get("to") == to])
               for to in partial]
    for label, kept in groups:
        if kept:
            notes.append(f"budget: {label.format(plural(len(kept), 'layer'))}: {', '.join(k['unit'] for k in kept[:6])}"
                         f"{' …' if len(kept) > 6 else ''} ({details['figure']})")
    return notes


def _details(p) -> dict:
    """A pass's details for its record, with the sensitivity search that chose its levels (``auto``)."""
    details = dict(getattr(p, "details", {}) or {})
    if getattr(p, "sensitivity", None):
        details["sensitivity"] = p.sensitivity
    if getattr(p, "layer_latency", None):  # lowrank: each layer's kernel µs, one node before, two after
        details["latency_us"] = p.layer_latency
    return details


def _choose_levels(p, working: ir.Model, original: ModelSnapshot, dataset: Dataset, *, max_drop, min_cosine, providers,
                   outputs, feed, threads, progress, notes: list[str]) -> None:
    """Fill ``p.per_layer`` (``auto``) by measured sensitivity under the budget (``onnxopt.sensitivity``);
    a ``lowrank`` pass keeps only the layers whose two kernels run faster than the one (on ``feed``)."""
    from onnxopt.sensitivity import choose_levels, keep_faster

    search = choose_levels(working, p, original, dataset, max_drop=max_drop, min_cosine=min_cosine, providers=providers,
                           judged_outputs=outputs, progress=progress)
    if isinstance(p, LowRankFactorize):
        untimed = _untimed(feed, providers)
        if untimed:
            search.note += f"; {untimed}: layers kept by size and error alone"
        else:
            search = keep_faster(working, p, search, feed, providers, 1 if threads is None else threads)
    p.per_layer, p.sensitivity = search.per_layer, search.details
    notes.append(search.note)


# The integer kernels onnxruntime runs a dynamic int8 or weight-only int4 model on, once fused.
_INTEGER_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QAttention", "MatMulNBits",
                    "GatherBlockQuantized", "QGemm")


def _fused_kernels_note(model: ir.Model, providers) -> str:
    """What onnxruntime (all optimizations on) runs the quantized model's layers on, and the float
    weights that MatMul/Gemm/Attention still read (layers left float, with their reasons in the pass
    record): the issue's "the fused graph contains the integer kernels, no float weight copy remains"."""
    from onnxopt.observe import optimized_ops

    try:
        ops = optimized_ops(model, providers=providers)
    except Exception as exc:  # noqa: BLE001 - the note is a report line; validation says whether it runs
        return f"fused kernels: not read ({one_line(exc)[:120]})"
    kernels = ", ".join(f"{ops[k]} {k}" for k in _INTEGER_KERNELS if ops.get(k))
    left = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Attention") and len(n.inputs) > 1
            and n.inputs[1] is not None and n.inputs[1].const_value is not None
            and n.inputs[1].const_value.dtype == ir.DataType.FLOAT]
    held = sum(n.inputs[1].const_value.nbytes for n in left)
    return (f"fused kernels (onnxruntime, all optimizations): {kernels or 'none'}; float weights still read by "
            f"MatMul/Gemm/Attention: {len(left)} ({held / 1e6:.2f} MB)")


def _untimed(feed, providers) -> str | None:
    """Why lowrank's layers cannot be timed one by one here (no data, or not the CPU provider), or None."""
    if feed is None:
        return "not timed (no data to time on)"
    if resolve_providers(providers)[0] != "CPUExecutionProvider":
        return f"not timed: per-layer kernel times are CPU only, not {resolve_providers(providers)[0]}"
    return None


def _faster_layers_only(p: LowRankFactorize, working: ir.Model, feed, providers, threads,
                        notes: list[str]) -> LowRankFactorize:
    """``p`` without the layers whose two kernels did not run faster than the one they replace, measured
    (``onnxopt.sensitivity.slower_layers``: one interleaved profiled run on ``feed``, the run's first
    batch at ``--threads``, default 1); each timed layer's kernel µs goes into the pass's details."""
    from onnxopt.sensitivity import slower_layers

    untimed = _untimed(feed, providers)
    if untimed:
        notes.append(f"lowrank: layers {untimed}: kept by size alone")
        return p
    slower, latency = slower_layers(working, p, feed, providers, 1 if threads is None else threads)
    kept = p.excluding(slower) if slower else p
    kept.layer_latency = latency
    if not latency:
        notes.append("lowrank: layers not timed (no kernel of their own in onnxruntime's profile): kept by size alone")
    if slower:
        notes.append(f"lowrank: left alone as not faster (two kernels vs one, {threads or 1} thread"
                     f"{'s' if (threads or 1) != 1 else ''}): {', '.join(slower[:8])}{' …' if len(slower) > 8 else ''}"
                     f" ({len(slower)} of {len(latency)} timed)")
    return kept


def _precision_step(working: ir.Model, precision: str, dataset: Dataset | None, providers, min_cosine: float | None,
                    stat_dims: dict[str, int]) -> PassRecord:
    """``working`` in float16 or bfloat16 (``onnxopt.precision``): float32 islands chosen by measurement
    on ``dataset`` until the cosine per sample meets ``min_cosine`` (default 0.9999)."""
    from onnxopt.precision import convert_precision

    start = time.perf_counter()
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    converted, details = convert_precision(working, dataset, dtype, providers, 0.9999 if min_cosine is None else min_cosine)
    return PassRecord(name="precision", modified=True, seconds=time.perf_counter() - start,
                      summary=details.get("summary", ""), after=model_stats(converted, dims=stat_dims),
                      details={**details, "model": converted})


def _judge_by_budget(report: Report, max_drop: float | None, min_cosine: float | None) -> None:
    """A lossy run with a budget is judged by it (not reported as CHANGED): the verdict, per output too."""
    v = report.validation
    met, figure = judge(v, max_drop, min_cosine)
    v.criterion = f"{figure} (the lossy passes' budget, not the lossless tolerance)"
    for o in v.outputs:
        o.ok = min_cosine is None or (not math.isnan(o.cosine) and o.cosine >= min_cosine)
    v.ok = met
    report.lossy = False


# Distillation where clustering left 1 or 2 bits a weight and the run leaves epochs and lr at their
# defaults: the codes must move (cluster-aware training), which 10 epochs at 1e-3 do not do (the
# digits CNN at 1 bit: 73.5% after them, 97.8% after 60 epochs at 3e-3, stopped early at 27).
LOW_BIT_EPOCHS = 60
LOW_BIT_LR = 3e-3


# The side-by-side latency may run past --latency-budget, up to this many times it, to reach the 6
# pairs of a ratio with an interval (a 320x320 detector at batch 2 on a loaded machine: 0.2 s a call).
LATENCY_STRETCH = 3.0


def _low_bit_defaults(pass_objects, epochs: int | None, steps: int | None, lr: float, notes: list[str]) -> tuple:
    """``(epochs, lr)`` for distillation: the low-bit defaults where a ``cluster`` pass of 1 or 2 bits
    ran and the caller left either at its default (``epochs``/``steps`` None, ``lr`` 1e-3), else as given."""
    low = [b for b in (_least_bits(p) for p in pass_objects if isinstance(p, ClusterWeights)) if b is not None and b <= 2]
    default_lr = Recipe().lr
    if not low or (epochs is not None or steps is not None) and lr != default_lr:
        return epochs, lr
    if epochs is None and steps is None:
        epochs = LOW_BIT_EPOCHS
    lr = LOW_BIT_LR if lr == default_lr else lr
    notes.append(f"distill: {min(low)}-bit clusters: {epochs or steps} {'epochs' if epochs else 'steps'} at lr {lr:g} "
                 "unless --epochs/--steps and --lr say")
    return epochs, lr


def channel_map(passes: Sequence) -> dict:
    """What the pruning passes among ``passes`` (in the order they ran) record for distillation's
    intermediate matching: ``kept_channels`` (value name -> channel axis and the positions of the
    input model's value kept) and ``boundaries`` (the values consumers read by channel, the
    candidates of ``auto``); ``{}`` when no pass pruned."""
    from onnxopt.passes.prune_channels import compose_kept

    pruners = [p for p in passes if isinstance(p, PruneChannels) and p.boundaries]
    if not pruners:
        return {}
    kept: dict = {}
    for p in pruners:
        kept = compose_kept(kept, p.kept_channels)
    return {"kept_channels": kept, "boundaries": list(dict.fromkeys(b for p in pruners for b in p.boundaries))}


def _least_bits(p: ClusterWeights) -> int | None:
    """The fewest bits a cluster pass gave a layer in its last run (None: it changed none): after the
    budget's fallback, the layers it kept as they were do not count. Before a run: what it would give."""
    layers = (getattr(p, "details", None) or {}).get("layers")
    if layers is not None:
        return min((r["bits"] for r in layers.values() if "bits" in r), default=None)
    if isinstance(p.per_layer, dict):
        return min(p.per_layer.values(), default=None)
    return p.bits


def distill_step(model, working: ir.Model, train: Dataset | SampleRows, options: dict, progress: Progress | None,
                 stat_dims: dict[str, int]) -> PassRecord:
    """Train ``working``'s weights (in place; nodes and shapes unchanged) to match the input
    ``model`` on ``train``, with torch (``onnxopt[train]``): see ``onnxopt.distill``."""
    import_torch("--distill")
    from onnxopt.distill import distill as run_distillation
    teacher = io.load_model(model)
    start = time.perf_counter()
    result = run_distillation(working, teacher, train, threads=1,
                              progress=(lambda d: progress("distill", int(d["step"]), int(d["steps"]))) if progress else None,
                              **options)
    initial, best = result.initial, result.best

    def figure(entry: dict) -> str:
        for key, label in (("accuracy", "accuracy"), ("agreement", "agreement")):
            if entry.get(key) is not None:
                return f"{label} {entry[key]:.2%}"
        return f"loss {entry.get('loss', float('nan')):.4g}"

    matched = f"; matched {plural(len(result.features), 'intermediate tensor')}" if options.get("features") else ""
    chunks = f" in {result.chunks} chunks" if result.chunks > 1 else ""
    summary = (f"{result.steps} steps on {train.num_samples} samples ({train.source}{chunks}); held out: "
               f"{figure(initial)} -> {figure(best)}{', stopped early' if result.stopped_early else ''}{matched}")
    details = {"steps": result.steps, "best_step": result.best_step, "initial": initial, "best": best,
               "history": result.history, "kinds": result.kinds, "device": result.device, "samples": train.num_samples,
               "chunks": result.chunks}
    if options.get("features"):
        details["features"] = list(result.features)
        details["features_skipped"] = dict(result.features_skipped)
        details["feature_weight"] = options.get("feature_weight", 1.0)
    return PassRecord(name="distill", modified=True, seconds=time.perf_counter() - start, summary=summary,
                      after=model_stats(working, dims=stat_dims), details=details)


def _passes_that_break(model, passes, original: ModelSnapshot, dataset: Dataset, providers, rtol, atol,
                       progress: Progress | None) -> list[tuple[ir.passes.PassBase, str]]:
    """The lossless ``passes`` whose result fails validation, each with the reason, found by applying
    them in turn to a fresh copy of ``model`` and keeping each that validates.

    A lossless pass that breaks a model is a bug; a rewrite that changes what onnxruntime's own
    fusions make of the graph is not one that the pass can see (a dynamically quantized model:
    MatMulInteger fused into a different kernel, equal with optimizations off and not with them on).
    Either way the result is written without that pass, never with it, and the report says which.
    """
    working, left_out = io.load_model(model), []
    for step, p in enumerate(passes):
        if progress:
            progress(f"checking pass {_pass_name(p)}", step, len(passes))
        trial = p(working.clone()).model
        candidate = ModelSnapshot(trial)
        try:
            verdict = compare_models(original, candidate, dataset, providers=providers, rtol=rtol, atol=atol)
            if verdict.ok:
                working = trial
                continue
            unfused = compare_models(original, candidate, dataset, providers=providers, rtol=rtol, atol=atol,
                                     candidate_optimization="disabled", runtime_floor=False)
        finally:
            candidate.close()
        worst = max(verdict.outputs, key=lambda o: o.max_abs, default=None)
        error = f" (max error {worst.max_abs:.3g} at '{worst.name}')" if worst is not None else ""
        if unfused.ok:
            why = (f"onnxruntime fuses its result differently{error}: equal to the original with onnxruntime's "
                   "graph optimizations off, not with them on")
        else:
            why = f"its result differs from the original{error}; please report it"
        left_out.append((p, why))
    return left_out


def _unvalidated_check(model: ir.Model, rtol: float | None, atol: float) -> Validation | None:
    """Without validation, the result must still be a model: onnx.checker and an onnxruntime session
    accept it (None), else a failed ``Validation`` that says why, so that nothing is written."""
    try:
        check_model(model)
    except Exception as exc:
        return Validation(ok=False, providers=[], samples=0, batches=0, rtol=rtol, atol=atol, data="none (--no-validate)",
                          synthetic=False, outputs=[], error=f"the optimized model is not valid ONNX or onnxruntime "
                                                             f"cannot load it (checked under --no-validate): {one_line(exc, 200)}")
    return None


def growth_slack(nbytes: int) -> int:
    """Bytes a pass may add to a model of ``nbytes``: folded shape constants (each replacing a node that
    took more room) and a channel shuffle's Gather indices (ShuffleNet: +3.1 kB of 5.7 MB) stay
    within 1 KiB or 0.1%; beyond, a pass stored more than it removed."""
    return max(1024, nbytes // 1000)


def _growth_note(name: str, before, after) -> str | None:
    """A warning when pass ``name`` grew the model's weights (``ModelStats.bytes``, what the file
    holds) by more than ``growth_slack``. The run still succeeds, its output being valid and
    validated; the passes are built never to grow a model (``simplify`` folds only what stays as
    compact), so this names a pass that broke that rule."""
    if after.bytes <= before.bytes + growth_slack(before.bytes):
        return None
    return (f"{name}: the model grew from {before.bytes:,} to {after.bytes:,} bytes of weights "
            f"(+{(after.bytes - before.bytes) / max(before.bytes, 1):.1%}): please report it")


def _reference_outputs(original: ModelSnapshot, dataset: Dataset, providers) -> ReferenceOutputs:
    """The original's outputs on every batch of ``dataset`` (a large model: computed once, so that its
    session need not live beside the candidate's); an input that does not run is the data's error."""
    outputs = ReferenceOutputs(max_bytes=2**30)
    session = original.session(optimization="disabled", providers=providers)
    for i, feed in enumerate(dataset):
        try:
            outputs.keep(i, run_session(session, feed))
        except Exception as exc:
            raise cannot_run(f"{dataset.source} batch {i}", feed, [], exc) from None
    return outputs


def _dataset(data, model: ir.Model, dims: dict[str, int], batch_size: int | None,
             quantization: QuantizationStep | None = None, max_samples: int | None = None,
             providers="cpu", snapshot: ModelSnapshot | None = None) -> Dataset:
    if data is None and quantization is not None and not quantization.synthetic:
        # Random inputs fall outside the calibrated ranges and say nothing about a lossy result.
        dataset = head(quantization.calibration, CALIBRATION_VALIDATION_SAMPLES)
        if dataset is not None:
            dataset.notes.insert(0, f"no --data given: validated on the first {dataset.num_samples} --calibration "
                                    "samples (seen by calibration; pass --eval for held-out figures)")
            return dataset
    if data is None:  # inputs the model runs: sizes and values read from the graph, tried on it
        dataset = runnable_synthetic_data(model, dims=dims, providers=providers, batch_size=batch_size,
                                          snapshot=snapshot)
        dataset.notes.insert(0, "no --data given: validated on synthetic inputs")
        return dataset
    return load_data(data, model, batch_size=batch_size, dims=dims, max_samples=max_samples)


def _fixed_dims_failure(fixed_dims: dict[str, int], original: ModelSnapshot, dataset: Dataset, providers) -> str:
    """What to tell a user whose model fails at the sizes ``--fix-dim`` fixed: whether the original
    model runs at those sizes at all (a position table shorter than the sequence does not)."""
    sizes = ", ".join(f"{k}={v}" for k, v in fixed_dims.items())
    try:
        original.session(optimization="disabled", providers=providers).run(None, dataset.batches[0])
    except Exception as exc:
        return f"fix-shapes: the original model fails on inputs of {sizes} too: {one_line(exc, 200)}"
    return f"fix-shapes: the model fixed at {sizes} fails where the original runs: please report it"


def with_fixed_dims(pass_objects: list, fix_dims: dict[str, int], dims: dict[str, int], model: ir.Model,
                    label: str) -> tuple[list, dict[str, int]]:
    """The passes with a ``fix-shapes`` pass set to ``fix_dims`` (the one listed, else a new one first:
    it must run before ``simplify`` folds), and the sizes it fixes; refuses a listed ``fix-shapes``
    without sizes, a name no input dim of ``model`` has, and a size that ``dims`` contradicts."""
    listed = [p for p in pass_objects if isinstance(p, FixInputShapes)]
    if not fix_dims:
        if any(not p.dims for p in listed):
            raise OptionError("pass fix-shapes needs sizes: --fix-dim NAME=N (repeatable), e.g. --fix-dim batch=1")
        fix_dims = {k: v for p in listed for k, v in p.dims.items()}
        if not fix_dims:
            return pass_objects, {}
    for name, size in fix_dims.items():
        if dims.get(name, size) != size:
            raise OptionError(f"--fix-dim {name}={size} contradicts --dim {name}={dims[name]}")
    fixer = FixInputShapes(fix_dims)
    missing = fixer.missing(model)
    if missing:
        raise OptionError(f"--fix-dim {missing[0]}: {label} has no input dim of that name "
                          f"(named dims: {', '.join(input_dim_names(model)) or 'none'})")
    if listed:
        pass_objects = [fixer if isinstance(p, FixInputShapes) else p for p in pass_objects]
    else:
        pass_objects = [fixer, *pass_objects]
    return pass_objects, fix_dims


def with_pruning(pass_objects: list, ratio: float, importance: str = "l1", scope: str = "layer", round_to: int = 1,
                 protect_first: bool = True) -> list:
    """The passes with an importance-pruning ``prune`` pass: replacing a ``prune`` already listed, else
    inserted before ``fold-bn`` (BatchNorm scales are a criterion, and BN slices with its channels)."""
    try:
        pruner = PruneChannels(ratio=ratio, importance=importance, scope=scope, round_to=round_to,
                               protect_first=protect_first, activation={} if importance in DATA_CRITERIA else None)
    except ValueError as exc:
        raise OptionError(f"--prune: {exc}") from None
    pruner.activation = None
    names = [_pass_name(p) for p in pass_objects]
    if "prune" in names:
        return [pruner if n == "prune" else p for p, n in zip(pass_objects, names)]
    at = names.index("fold-bn") if "fold-bn" in names else (names.index("simplify") + 1 if "simplify" in names else 0)
    return [*pass_objects[:at], pruner, *pass_objects[at:]]


def activation_statistics(model: ir.Model, data, dims, batch_size, providers, nonzero: bool = False,
                          max_samples: int | None = None, entropy: bool = False) -> dict:
    """Mean |x| per channel (``nonzero``: the fraction of non-zero values; ``entropy``: the entropy,
    in bits, of the channel's histogram, ``onnxopt.observe.ChannelEntropyObserver``) of every tensor
    that a channel group's consumer reads, over ``data`` (the calibration set), streamed batch by
    batch through ``onnxopt.observe``."""
    from onnxopt.observe import observe
    from onnxopt.passes.channel_groups import analyze

    if data is None:
        raise OptionError("--importance activation/apoz/entropy needs --calibration (or --data)")
    axes = {p.value: p.axis for g in analyze(model).groups for p in g.probes}
    dataset = load_data(data, model, batch_size=batch_size, dims=dims, max_samples=max_samples)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    if entropy:
        from onnxopt.observe import ChannelEntropyObserver

        observers = {name: ChannelEntropyObserver(axis) for name, axis in axes.items()}
        observe(model, sorted(axes), dataset.batches, lambda name, array: observers[name].update(array), providers=providers)
        return {name: o.entropy for name, o in observers.items() if o.entropy is not None}

    def update(name: str, array: np.ndarray) -> None:
        a = np.moveaxis(np.abs(np.asarray(array, dtype=np.float64)), axes[name], 0)
        if nonzero:
            a = (a != 0).astype(np.float64)
        a = a.reshape(a.shape[0], -1)
        sums[name] = sums.get(name, 0) + a.sum(axis=1)
        counts[name] = counts.get(name, 0) + a.shape[1]

    observe(model, sorted(axes), dataset.batches, update, providers=providers)
    return {name: sums[name] / counts[name] for name in sums}


GPTQ_NEEDS_DATA = ("--int4-method gptq needs --calibration (or --data): its X^T X per weight input comes from "
                   "running the model on samples")


SMOOTHING_NEEDS_CALIBRATION = ("--smooth-quant with --quantize int8-dynamic needs --calibration: the per-channel "
                               "activation ranges it moves into the weights are measured there")


def _needs_smoothing(p) -> bool:
    return isinstance(p, QuantizeDynamic) and p.smooth_alpha is not None and not p.act_absmax


def smoothing_statistics(model: ir.Model, p: QuantizeDynamic, data, dims, batch_size, providers,
                         max_samples: int | None = None, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Per-channel max|x| (``onnxopt.calibrate.channel_absmax``) of every activation that ``p`` will
    quantize at run time, in one streamed run over the calibration data: SmoothQuant's statistic,
    which the dynamic pass turns into per-channel scales (``passes/quantize_dynamic.py``). Padding
    positions are kept: with activations quantized per row they do not set a real row's step, and on
    all-MiniLM-L6-v2 leaving them out changed the cosine by 2e-5."""
    from onnxopt.calibrate import channel_absmax

    tensors = p.smoothing_inputs(model)
    if not tensors:
        return {}
    dataset = load_data(data, model, batch_size=batch_size, dims=dims, max_samples=max_samples)
    return channel_absmax(model, tensors, dataset.batches, providers=providers, total=len(dataset.batches),
                          progress=(lambda i, n: progress("smoothing statistics", i, n)) if progress else None)


def _needs_grams(p) -> bool:
    return isinstance(p, QuantizeWeightsInt4) and p.method == "gptq" and p.calibration_gram is None


def gptq_grams(model: ir.Model, int4: QuantizeWeightsInt4, data, dims, batch_size, providers,
               max_samples: int | None = None, progress: Progress | None = None,
               exclude_padding: bool = False) -> dict[str, np.ndarray]:
    """Weight name -> ``X^T X`` of its MatMul/Gemm's activation input over ``data``, for GPTQ (and the
    activation-aware ``lowrank``: any pass with ``gram_needs``): one
    streamed run (``onnxopt.calibrate.gram_matrices``) for every input; weights that read the same
    input share its matrix. With ``exclude_padding``, padding positions are left out where the model
    has an attention-mask input (``onnxopt.validate.mask_input``) and the tensor is laid out
    ``[batch, sequence, K]``; off by default: on all-MiniLM-L6-v2 calibrated on 32 short sentences
    padded to 128, keeping the padding rows gave the better worst-sentence cosine (0.973 vs 0.967 at
    block 32; the ~420 real tokens alone leave the 1536-wide Gram far from full rank). Memory: a float64 K x K matrix per distinct input tensor (MiniLM's 384-
    and 1536-wide inputs: 1.2 and 18 MiB)."""
    from onnxopt.calibrate import gram_matrices

    if data is None:
        raise OptionError(GPTQ_NEEDS_DATA)
    needs = int4.gram_needs(model)
    if not needs:
        return {}
    dataset = load_data(data, model, batch_size=batch_size, dims=dims, max_samples=max_samples)
    from types import SimpleNamespace

    from onnxopt.validate import mask_input

    inputs = [SimpleNamespace(name=v.name, type=f"tensor({v.dtype.name.lower()})" if v.dtype is not None else "",
                              shape=list(v.shape) if v.shape is not None else None) for v in model.graph.inputs]
    grams = gram_matrices(model, sorted(set(needs.values())), dataset.batches, providers=providers,
                          total=len(dataset.batches), mask=mask_input(inputs) if exclude_padding else None,
                          progress=(lambda i, n: progress("gptq statistics", i, n)) if progress else None)
    return {weight: grams[tensor] for weight, tensor in needs.items() if tensor in grams}


def gradient_statistics(model: ir.Model, criterion: str, data, dims, batch_size, max_samples: int | None = None,
                        seed: int = 0) -> dict:
    """Taylor or Fisher scores per channel (``onnxopt.gradients``, with the torch student) of every
    tensor a channel group's consumer reads, over ``data`` (the calibration set, else the training
    data); the data's labels, when it has them, give the loss."""
    if data is None:
        raise OptionError(f"--importance {criterion} needs --calibration (or --train-data)")
    dataset = load_data(data, model, batch_size=batch_size or 32, dims=dims, max_samples=max_samples)
    import_torch(f"--importance {criterion}")  # the optional extra onnxopt[train]
    from onnxopt.gradients import gradient_importance

    return gradient_importance(model, dataset, criterion, seed=seed)


def explain_channels(model) -> str:
    """The channel groups of ``model`` (after ``simplify``, which folds constants): what ``prune`` would couple."""
    from onnxopt.passes import Simplify
    from onnxopt.passes.channel_groups import explain, find_channel_groups

    working = io.load_model(model)
    Simplify()(working)
    return explain(find_channel_groups(working))

"""Presets: a named search over recipes that ``onnxopt.optimize`` runs, keeping the best that meets the budget.

``deep-compression`` (Han et al. 2016, ``--preset deep-compression``): prune (channels by
importance, ``l1`` unless ``--importance`` says) → sparsify (magnitude, stored sparse) → distill →
cluster (k-means codebook of the distilled weights, codes) → distill again, both times from the input
model, for each setting of a small grid of global settings (``DEEP_COMPRESSION_GRID``: prune ratio x
sparsity x cluster bits). As in the paper, the weights are retrained after pruning and again after
clustering: one distillation after all three left the digits CNN at 80.6% (prune 0.5, sparsity 0.7,
4 bits), the centroids then having to stand for weights never trained sparse. The smallest Deep
Compression storage (``onnxopt.compressed_size``) whose accuracy on ``--eval`` stays within
``--max-drop`` (default 1 point) wins.

The search is cheap where it can be: a setting's storage hardly depends on distillation (the
tensors and their shapes are the same; only the clusters' frequencies, which the Huffman codes
follow, differ: 2571 vs 2577 bytes on the digits CNN), so every setting is first sized without
distillation, and the distilled runs go smallest first, stopping at the first that meets the
budget; the chosen run's own storage is what the report gives. Where none does, the mildest setting runs again with the budget (``onnxopt.fallback``: the
layers that harm most are kept as they were, judged before distillation, then distilled).

The accuracy that selects is measured on ``--eval``: a figure chosen on the data it is reported on
is optimistic by the selection; hold out a split of your own where that matters.
"""

from __future__ import annotations

__all__ = ["PRESETS", "DEEP_COMPRESSION_GRID", "Trial", "deep_compression", "run_preset"]

import copy
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxopt import io
from onnxopt.budget import DEFAULT_MAX_DROP, judge
from onnxopt.compressed_size import compressed_sizes
from onnxopt.data import load_data, parse_dims, sample_rows
from onnxopt.errors import OptionError
from onnxopt.options import require_torch
from onnxopt.pipeline import OptimizeResult, optimize, with_pruning
from onnxopt.recipe import DISTILL_OPTIONS, Recipe
from onnxopt.runtime import ModelSnapshot, run_session

PRESETS = ("deep-compression",)
DEEP_COMPRESSION_GRID: dict[str, tuple] = {"prune": (0.25, 0.5), "sparsity": (0.5, 0.7, 0.8), "cluster_bits": (4, 5)}
# Distillation defaults of the preset where the recipe leaves them at the command line's (10 epochs,
# lr 1e-3 win back a few points; a model pruned by half needs more: benchmarks/distill.py).
PRESET_EPOCHS = 60
PRESET_LR = 3e-3

Progress = Callable[[str, int, int], None]


@dataclass
class Trial:
    """One setting of the search: its storage, and (when it ran) its accuracy and verdict."""

    settings: dict[str, float]
    deep_compression_bytes: int | None = None
    weight_gzip9: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    met: bool | None = None  # None: not run (a smaller setting met the budget first)
    note: str = ""
    stages: list[dict] = field(default_factory=list)  # distill, cluster, distill: storage and accuracy

    def row(self) -> dict:
        return {"settings": self.settings, "deep_compression_bytes": self.deep_compression_bytes,
                "weight_gzip9": self.weight_gzip9, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "met": self.met, "note": self.note}


def check_preset_data(name: str, recipe: Recipe) -> None:
    """Refuse, in one line saying what is needed, a preset run without the data it needs, or without torch."""
    if name not in PRESETS:
        raise OptionError(f"--preset {name!r}: not one of {', '.join(PRESETS)}")
    missing = [what for what, given in (("--train-data (inputs to distill on; labels optional)", recipe.train_data),
                                        ("--eval (labelled data that judges accuracy)", recipe.data)) if given is None]
    if missing:
        raise OptionError(f"--preset {name} needs {' and '.join(missing)}")
    require_torch(f"--preset {name}")  # it distills: said before any setting is built


def _require_labels(model, recipe: Recipe) -> None:
    """Refuse ``--eval`` data without labels: the preset picks its setting by accuracy."""
    dataset = load_data(recipe.data, io.load_model(model), batch_size=recipe.batch_size, dims=parse_dims(recipe.dims),
                        max_samples=recipe.max_samples)
    if dataset.labels is None:
        raise OptionError(f"--preset deep-compression needs labels in the --eval data ({dataset.source} has none): "
                          "accuracy picks the setting")


def run_preset(name: str, model, recipe: Recipe, *, progress: Progress | None = None, **options) -> OptimizeResult:
    """Run preset ``name`` (one of ``PRESETS``) on ``model`` with ``recipe``'s data and options."""
    if name not in PRESETS:
        raise OptionError(f"--preset {name!r}: not one of {', '.join(PRESETS)}")
    return deep_compression(model, recipe, progress=progress, **options)


def deep_compression(model, recipe: Recipe, *, grid: Mapping[str, Sequence] | None = None,
                     progress: Progress | None = None, stages: bool = True) -> OptimizeResult:
    """prune → sparsify → cluster → distill over ``grid`` (default ``DEEP_COMPRESSION_GRID``); the
    smallest Deep Compression storage within ``recipe.max_drop`` accuracy points (default 1) wins.

    ``recipe`` needs ``data`` with labels (``--eval``) and ``train_data``. The result is the chosen
    run's, judged by the budget; ``result.report.search`` holds every setting tried (its storage,
    accuracy, verdict) and, with ``stages``, the chosen setting stage by stage (storage and accuracy
    after each pass, then after distillation).
    """
    grid = dict(DEEP_COMPRESSION_GRID if grid is None else grid)
    unknown = set(grid) - {"prune", "sparsity", "cluster_bits"}
    if unknown:
        raise OptionError(f"deep-compression grid: unknown setting(s) {', '.join(sorted(unknown))}")
    check_preset_data("deep-compression", recipe)
    _require_labels(model, recipe)  # before the first setting is built
    if recipe.min_cosine is not None:
        raise OptionError("--preset deep-compression judges accuracy (--max-drop); --min-cosine does not apply")
    max_drop = DEFAULT_MAX_DROP if recipe.max_drop is None else recipe.max_drop
    defaults = Recipe()
    base = recipe.replace(
        distill=True, max_drop=None, min_cosine=None, latency=False,
        epochs=PRESET_EPOCHS if recipe.epochs is None and recipe.steps is None else recipe.epochs,
        lr=PRESET_LR if recipe.lr == defaults.lr else recipe.lr,
    )
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # 1. Storage of every setting, without data (distillation changes it little).
    trials = []
    for i, s in enumerate(settings):
        if progress:
            progress("deep-compression: sizing", i, len(settings))
        sized = optimize(model, _undistilled(base.replace(**s)).replace(validate=False, latency=False))
        after = (sized.report.sizes or {}).get("after", {})
        trials.append(Trial(s, after.get("deep_compression_bytes"), after.get("weight_gzip9")))
    order = sorted(trials, key=lambda t: (t.deep_compression_bytes or math.inf, t.weight_gzip9 or math.inf))
    # 2. Distilled runs, smallest first, until one meets the budget.
    chosen, chosen_result = None, None
    sparse_runs: dict = {}  # (prune, sparsity) -> the distilled sparse model, shared by the cluster bits
    for i, trial in enumerate(order):
        if progress:
            progress(f"deep-compression: trial {_label(trial.settings)}", i, len(order))
        result = _run_setting(model, base, trial.settings, sparse_runs, progress, trial.stages)
        v = result.report.validation
        if v is None or v.accuracy_after is None:
            raise OptionError("--preset deep-compression needs labels in the --eval data (accuracy picks the setting)")
        trial.accuracy_before, trial.accuracy_after = v.accuracy_before, v.accuracy_after
        trial.met, _ = judge(v, max_drop, None)
        if trial.met:
            chosen, chosen_result = trial, result
            break
    for trial in order:
        if trial.met is None:
            trial.note = "not run: a smaller setting met the budget"
    if chosen is None:  # the mildest setting, with layers undone by the budget before distillation
        chosen = max(order, key=lambda t: (t.accuracy_after or 0, t.deep_compression_bytes or 0))
        chosen_result = optimize(model, base.replace(**chosen.settings, max_drop=max_drop), progress=progress)
        chosen.note = "no setting met the budget: this one ran again with layers kept by the budget"
    report = chosen_result.report
    v = report.validation
    if v is not None and v.error is None:
        met, figure = judge(v, max_drop, None)
        v.ok, report.lossy = met, False
        v.criterion = f"{figure} (the deep-compression preset's budget)"
    report.notes.insert(0, f"preset deep-compression: {_label(chosen.settings)} chosen of {len(order)} settings "
                           f"({sum(t.met is not None for t in order)} distilled); smallest Deep Compression storage "
                           f"within {max_drop:g} accuracy points")
    search = {"preset": "deep-compression", "max_drop": max_drop, "chosen": chosen.settings,
              "trials": [t.row() for t in order]}
    if stages and chosen.met:
        search["stages"] = _stages(model, base.replace(**chosen.settings), chosen.stages)
    report.search = search
    return chosen_result


def _run_setting(model, base: Recipe, settings: Mapping[str, float], sparse_runs: dict,
                 progress: Progress | None, tail: list[dict] | None = None) -> OptimizeResult:
    """prune + sparsify + distill (``optimize``; cached per prune and sparsity), then cluster and
    distill again from the input model; validated against the input model on ``base.data``."""
    from onnxopt.passes import ClusterWeights
    from onnxopt.pipeline import distill_step
    from onnxopt.compressed_size import run_sizes
    from onnxopt.data import parse_dims
    from onnxopt.report import PassRecord
    from onnxopt.stats import model_stats
    from onnxopt.validate import compare_models

    first = {k: v for k, v in settings.items() if k != "cluster_bits"}
    key = tuple(sorted(first.items()))
    if key not in sparse_runs:
        sparse_runs[key] = optimize(model, base.replace(**first, cluster_bits=None), progress=progress)
    sparse = sparse_runs[key]
    dataset = load_data(base.data, sparse.model, batch_size=base.batch_size, dims=parse_dims(base.dims),
                        max_samples=base.max_samples)
    tail = [] if tail is None else tail
    tail.append(_stage("distill", sparse.model, dataset, base.providers))
    if settings.get("cluster_bits") is None:
        return sparse
    working = sparse.model.clone()
    report = copy.deepcopy(sparse.report)
    dims = parse_dims(base.dims)
    cluster = ClusterWeights(bits=int(settings["cluster_bits"]), per_channel=base.cluster_per_channel)
    start = time.perf_counter()
    cluster(working)
    report.passes.append(PassRecord(name="cluster", modified=True, seconds=time.perf_counter() - start,
                                    summary=cluster.summary, after=model_stats(working, dims=dims),
                                    details=dict(cluster.details)))
    tail.append(_stage("cluster", working, dataset, base.providers))
    train = sample_rows(base.train_data, working, max_samples=base.max_samples)
    report.passes.append(distill_step(model, working, train, dict(
        epochs=base.epochs, steps=base.steps, temperature=base.temperature, alpha=base.alpha, lr=base.lr, seed=base.seed,
        providers=base.providers, batch_size=base.batch_size or 32), progress, dims))
    report.after = report.passes[-1].after
    report.sizes = {"before": (report.sizes or {}).get("before"), "after": run_sizes(working, sparse.value_info)}
    original, candidate = ModelSnapshot(io.load_model(model)), ModelSnapshot(working)
    tail.append(_stage("distill", working, dataset, base.providers))
    try:
        report.validation = compare_models(original, candidate, dataset, providers=base.providers, rtol=base.rtol,
                                           atol=base.atol, runtime_floor=False, judged_outputs=base.outputs)
    finally:
        original.close()
        candidate.close()
    return OptimizeResult(working, report, sparse.source, sparse.value_info)


def _label(settings: Mapping[str, float]) -> str:
    names = {"prune": "prune", "sparsity": "sparsity", "cluster_bits": "cluster bits"}
    return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in settings.items())


def _undistilled(recipe: Recipe) -> Recipe:
    """``recipe`` without distillation (its options back at their defaults, as the recipe requires)."""
    default = Recipe()
    return recipe.replace(distill=False, **{n: getattr(default, n) for n in DISTILL_OPTIONS})


def _stages(model, recipe: Recipe, tail: list[dict]) -> list[dict]:
    """Storage and accuracy after each pass of ``recipe`` before clustering (applied one by one to a
    fresh copy of ``model``), then ``tail`` (distill, cluster, distill, as ``_run_setting`` measured
    them): the preset's table, stage by stage."""
    working = io.load_model(model)
    dataset = load_data(recipe.data, working, batch_size=recipe.batch_size, max_samples=recipe.max_samples)
    passes = recipe.resolved_passes()
    if recipe.prune is not None:
        passes = with_pruning(passes, recipe.prune, recipe.importance, recipe.prune_scope, recipe.round_to,
                              recipe.protect_first)
    rows = [_stage("input (fp32)", working, dataset, recipe.providers)]
    for p in passes:
        name = getattr(p, "name", "") or type(p).__name__
        if name == "cluster" or getattr(p, "importance", None) in ("activation", "apoz", "entropy"):
            break  # clustering is of the distilled model; a criterion from data is measured by the pipeline alone
        p(working)
        rows.append(_stage(name, working, dataset, recipe.providers))
    return rows + tail


def _stage(name: str, model, dataset, providers) -> dict:
    sizes = compressed_sizes(model)
    snapshot = ModelSnapshot(model)
    try:
        session = snapshot.session(providers=providers)
        logits = [next(iter(run_session(session, feed).values())) for feed in dataset.batches]
    finally:
        snapshot.close()
    stacked = np.concatenate([l.reshape(l.shape[0], -1) for l in logits])
    accuracy = float((stacked.argmax(axis=1) == dataset.labels.reshape(-1)).mean()) if dataset.labels is not None else None
    return {"stage": name, "accuracy": accuracy, "weight_gzip9": sizes["weight_gzip9"],
            "deep_compression_bytes": sizes["deep_compression_bytes"], "file_bytes": sizes["file_bytes"]}

"""Per-layer levels of a lossy layer pass (sparsity, cluster bits, low-rank energy) chosen by measured sensitivity.

A uniform setting treats every layer alike; layers are not alike (the first convolution of a small
CNN holds few weights and decides everything after it). As in Deep Compression's per-layer
sensitivity analysis (Han et al. 2015) and HAQ's allocation under a budget (Wang et al. 2019):

1. **Sensitivity**: each layer alone, at each of the pass's candidate levels (``LEVELS``, mildest
   first), on the model the pass receives, compared with the original model on the evaluation data
   as the budget compares them (``onnxopt.validate.compare_models``, ``onnxopt.budget.judge``). The
   figure is the budget's: the accuracy drop in points with labels (``--max-drop``), else 1 − the
   worst cosine per sample (``--min-cosine``); ties (a drop of 0 at every mild level) are broken by
   1 − the mean cosine per sample. One onnxruntime session a (layer, level); the original's outputs
   are computed once. A level at which the layer alone misses the budget is never taken.
2. **Allocation**: from every layer left alone, the step that saves the most stored bytes per unit
   of sensitivity added (one layer to a harsher level) is taken, over and over: a path from the
   input model to the harshest setting, on which sensitive layers reach harsh levels last.
3. **Choice**: under the budget, the harshest setting on the path whose whole model meets it
   (bisection: a session a probe; the sum of single-layer sensitivities only orders the path, the
   whole model decides); at a size (``target_bytes``, or the bytes a uniform setting of the pass
   gives the same layers: ``like``), the first setting whose layers' bytes are
   at most the target, then validated once.

The result is a mapping layer -> level that the pass takes as ``per_layer`` (it replays without
data); ``details`` holds every figure measured, for the report.
"""

from __future__ import annotations

__all__ = ["PROBE_SAMPLES", "LevelSearch", "choose_levels", "keep_faster", "measure_latency", "slower_layers"]

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.budget import budget_limits, judge
from onnxopt.data import Dataset, head
from onnxopt.report import Validation
from onnxopt.runtime import ModelSnapshot
from onnxopt.validate import ReferenceOutputs, compare_models

# Samples each (layer, level) probe reads at most: one session a probe, so a large eval set costs
# layers x levels x its size; the path's whole-model checks read all of it.
PROBE_SAMPLES = 512

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def _sensitivity(v: Validation, max_drop: float | None, min_cosine: float | None) -> tuple[float, float]:
    """``(figure, tie)`` of a validation: the budget's own measure (accuracy drop in points, else
    1 − the worst judged cosine per sample) and 1 − the worst judged output's mean cosine per sample."""
    if v.error:
        return math.inf, math.inf
    max_drop, min_cosine = budget_limits(v, max_drop, min_cosine)
    judged = [o for o in v.outputs if getattr(o, "judged", True) and not math.isnan(o.cosine)]
    worst = min((o.cosine for o in judged), default=1.0)
    mean = min(((o.cosine_mean if o.cosine_mean is not None else o.cosine) for o in judged), default=1.0)
    figure = (v.accuracy_before - v.accuracy_after) * 100 if max_drop is not None else 1.0 - worst
    return float(figure), float(1.0 - mean)


@dataclass
class _Probe:
    """One layer alone at one level: what it stores and what it costs."""

    level: Any
    bytes_after: int
    figure: float
    tie: float
    met: bool
    record: dict


@dataclass
class LevelSearch:
    """The measurements and the choice of one search (``choose_levels``)."""

    per_layer: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class _Judge:
    """Validation of candidate models against the original on one dataset, the original run once."""

    def __init__(self, original: ModelSnapshot, data: Dataset, providers, judged_outputs, max_drop, min_cosine):
        self.original, self.data, self.providers = original, data, providers
        self.judged_outputs, self.max_drop, self.min_cosine = judged_outputs, max_drop, min_cosine
        self.reference = ReferenceOutputs(max_bytes=2**28)
        self.sessions = 0

    def __call__(self, model: ir.Model) -> tuple[Validation, bool, str]:
        candidate = ModelSnapshot(model)
        try:
            v = compare_models(self.original, candidate, self.data, providers=self.providers, runtime_floor=False,
                               reference_outputs=self.reference, judged_outputs=self.judged_outputs)
        finally:
            candidate.close()
        self.sessions += 1
        met, figure = judge(v, self.max_drop, self.min_cosine)
        return v, met, figure


def choose_levels(start: ir.Model, pass_, original: ModelSnapshot, data: Dataset, *, max_drop: float | None = None,
                  min_cosine: float | None = None, providers="cpu", judged_outputs: Sequence[str] | None = None,
                  levels: Sequence | None = None, target_bytes: int | None = None, like=None,
                  progress: Progress | None = None) -> LevelSearch:
    """Levels per layer for ``pass_`` (a ``LossyLayers`` pass) on ``start`` (the model it receives),
    by measured sensitivity against ``original`` on ``data`` (see the module docstring).

    ``levels``: the candidates, mildest first (default ``pass_.LEVELS``). ``target_bytes``: choose by
    size (the layers' stored bytes at most this) instead of by the budget; ``like``: a pass of the
    same kind at a uniform setting, whose bytes on the same layers are the target (a like-for-like
    comparison). ``start`` is not changed.
    """
    if like is not None:
        uniform = like.excluding(())  # a copy: the caller's pass keeps its details
        uniform(start.clone())
        like = {u: r["bytes_after"] for u, r in uniform.details.get("layers", {}).items()}
        target_bytes = -1  # the sum over the layers, once they are known (``_search``)
    levels = list(pass_.LEVELS if levels is None else levels)
    if not levels:
        raise ValueError(f"{pass_.name}: no levels to try")
    judge_ = _Judge(original, data, providers, judged_outputs, max_drop, min_cosine)
    v0, met0, figure0 = judge_(start)
    # The (layer, level) probes only order the path: on a large eval set they read its first
    # PROBE_SAMPLES samples; every whole-model check of the path reads all of it.
    few = head(data, PROBE_SAMPLES) if data.num_samples > PROBE_SAMPLES else None
    probe_judge = _Judge(original, few, providers, judged_outputs, max_drop, min_cosine) if few else judge_
    measure = ("accuracy drop (points)" if budget_limits(v0, max_drop, min_cosine)[0] is not None
               else "1 - worst cosine per sample")
    details: dict[str, Any] = {"measure": measure, "levels": levels, "layers": {}, "start": figure0}
    if not met0 and target_bytes is None:
        details["search"] = []
        return LevelSearch({}, details, f"{pass_.name} auto: the model it receives misses the budget already "
                                        f"({figure0}): every layer left as it was")
    if probe_judge is not judge_:
        details["probe_samples"] = few.num_samples
        v0 = probe_judge(start)[0]  # the probes' baseline, on the same samples as the probes
    with _quiet_passes():
        search = _search(start, pass_, levels, judge_, v0, figure0, details, target_bytes, progress, max_drop,
                         min_cosine, like, probe_judge)
    if probe_judge is not judge_:
        search.note += f"; each layer alone judged on the first {few.num_samples} of {data.num_samples} samples"
    return search


@contextlib.contextmanager
def _quiet_passes():
    """The passes' per-layer log lines (a skip is a warning) are not news while probing: one run
    a (layer, level) would repeat each many times."""
    log = logging.getLogger("onnxopt.passes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _search(start, pass_, levels, judge_, v0, figure0, details, target_bytes, progress, max_drop, min_cosine, like,
            probe_judge=None):
    probe_judge = probe_judge or judge_
    base, base_tie = _sensitivity(v0, max_drop, min_cosine)
    probe_pass = pass_.uniform(levels[-1])
    probe_pass(start.clone())
    units = list(probe_pass.units)
    probes: dict[str, list[_Probe]] = {}
    before: dict[str, int] = {}
    total = len(units) * len(levels)
    for i, unit in enumerate(units):
        probes[unit] = []
        for j, level in enumerate(levels):
            if progress:
                progress(f"{pass_.name} sensitivity", i * len(levels) + j, total)
            trial = pass_.at_levels({unit: level})
            model = trial(start.clone()).model
            record = trial.details.get("layers", {}).get(unit)
            if record is None:  # refused at this level (a low-rank pair no smaller): not a candidate
                continue
            v, met, _ = probe_judge(model)
            figure, tie = _sensitivity(v, max_drop, min_cosine)
            before[unit] = int(record["bytes_before"])
            probes[unit].append(_Probe(level, int(record["bytes_after"]), figure - base, tie - base_tie, met, record))
    if like is not None:  # the uniform setting's bytes on these layers (those it left alone: as they were)
        target_bytes = sum(like.get(u, b) for u, b in before.items())
    path = _greedy_path(probes, before, budgeted=target_bytes is None)

    def layer_bytes(state: Mapping[str, int]) -> int:
        return sum(probes[u][state[u]].bytes_after if u in state else before[u] for u in before)

    def levels_of(state: Mapping[str, int]) -> dict[str, Any]:
        return {u: probes[u][k].level for u, k in state.items()}

    search: list[dict] = []

    def check(k: int) -> bool:
        model = pass_.at_levels(levels_of(path[k]))(start.clone()).model
        v, met, figure = judge_(model)
        search.append({"step": k, "of": len(path) - 1, "bytes": layer_bytes(path[k]), "met": met, "figure": figure})
        return met

    if target_bytes is not None:
        chosen = next((k for k, s in enumerate(path) if layer_bytes(s) <= target_bytes), len(path) - 1)
        check(chosen)
    elif len(path) == 1 or check(len(path) - 1):
        chosen = len(path) - 1
    else:  # path[0] (nothing changed) meets, path[-1] misses
        low, high = 0, len(path) - 1
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if check(mid) else (low, mid)
        chosen = low
    state = path[chosen]
    per_layer = levels_of(state)
    for unit in before:
        rows = probes[unit]
        details["layers"][unit] = {
            "level": per_layer.get(unit),
            "sensitivity": {_key(p.level): round(p.figure, 6) for p in rows},
            "mean_cosine_loss": {_key(p.level): round(p.tie, 6) for p in rows},
            "alone_misses": [_key(p.level) for p in rows if not p.met],
            "bytes_before": before[unit],
            "bytes_after": probes[unit][state[unit]].bytes_after if unit in state else before[unit],
            **_macs(probes[unit][state[unit]].record if unit in state else None),
        }
    details.update(search=search, path_steps=len(path) - 1, chosen_step=chosen,
                   sessions=judge_.sessions + (probe_judge.sessions if probe_judge is not judge_ else 0),
                   bytes_before=sum(before.values()), bytes_after=layer_bytes(state),
                   figure=figure0, target_bytes=target_bytes)
    for row in search:  # the figure of the chosen setting, where it was judged
        if row["step"] == chosen:
            details["figure"] = row["figure"]
    return LevelSearch(per_layer, details, _note(pass_.name, details, target_bytes))


def _key(level) -> str:
    return f"{level:g}" if isinstance(level, float) else str(level)


def _macs(record: dict | None) -> dict:
    if not record or "macs_before" not in record:
        return {}
    return {"rank": record.get("rank"), "macs_before": record["macs_before"], "macs_after": record["macs_after"]}


def _greedy_path(probes: Mapping[str, list[_Probe]], before: Mapping[str, int], budgeted: bool) -> list[dict[str, int]]:
    """States (unit -> index into its probes) from none changed to the harshest, each one step on:
    the (unit, harsher level) with the least added sensitivity per byte saved (then the least added
    mean-cosine loss per byte, then the most bytes). Sensitivity is taken as never falling with a
    harsher level (the running maximum over the levels up to it). Under the budget, a level whose
    layer alone misses it, and every harsher one, is never taken."""
    envelope: dict[str, list[tuple[float, float]]] = {}
    allowed: dict[str, int] = {}
    for unit, rows in probes.items():
        fig = tie = 0.0
        envelope[unit] = []
        allowed[unit] = len(rows)
        for k, p in enumerate(rows):
            fig, tie = max(fig, p.figure), max(tie, p.tie)
            envelope[unit].append((fig, tie))
            if budgeted and not p.met and allowed[unit] == len(rows):
                allowed[unit] = k
    state: dict[str, int] = {}
    path = [dict(state)]
    while True:
        best = None
        for unit, rows in probes.items():
            k0 = state.get(unit, -1)
            fig0, tie0 = envelope[unit][k0] if k0 >= 0 else (0.0, 0.0)
            bytes0 = rows[k0].bytes_after if k0 >= 0 else before[unit]
            for k in range(k0 + 1, allowed[unit]):
                saved = bytes0 - rows[k].bytes_after
                if saved <= 0:
                    continue
                fig, tie = envelope[unit][k]
                score = ((fig - fig0) / saved, (tie - tie0) / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, unit, k)
        if best is None:
            return path
        state[best[1]] = best[2]
        path.append(dict(state))


def _note(name: str, details: dict, target_bytes: int | None) -> str:
    layers = details["layers"]
    chosen = [f"{u} {_key(r['level'])}" for u, r in layers.items() if r["level"] is not None]
    alone = [u for u, r in layers.items() if r["level"] is None]
    how = f"at {target_bytes:,} bytes of weights" if target_bytes is not None else "under the budget"
    text = (f"{name} auto: per layer by measured sensitivity {how} ({details['measure']}): "
            f"{', '.join(chosen) or 'none changed'}")
    if alone:
        text += f"; left alone: {', '.join(alone)}"
    text += (f"; weights {details['bytes_before']:,} -> {details['bytes_after']:,} bytes; {details['figure']}; "
             f"{details['sessions']} sessions")
    return text


def keep_faster(start: ir.Model, pass_, search: LevelSearch, feed: Mapping[str, np.ndarray], providers="cpu",
                threads: int | None = 1) -> LevelSearch:
    """``search`` (of a ``lowrank`` pass) without the layers whose two kernels did not run faster than
    the one they replace (``measure_latency``, on ``feed``); each layer's times go into its details.
    A layer that could not be timed is kept, and says so."""
    if not search.per_layer:
        return search
    slower, latency = slower_layers(start, pass_.at_levels(search.per_layer), feed, providers, threads)
    for unit in search.per_layer:
        search.details["layers"][unit]["latency_us"] = latency.get(
            unit, "not timed (no kernel of its own in the profile)")
    if slower:
        for unit in slower:
            row = search.details["layers"][unit]
            row.update(level=None, bytes_after=row["bytes_before"], not_faster=True)
            row.pop("rank", None)
        search.per_layer = {u: lv for u, lv in search.per_layer.items() if u not in slower}
        search.details["bytes_after"] = sum(r["bytes_after"] for r in search.details["layers"].values())
        search.note += (f"; left alone as not faster (two kernels vs one, {threads or 'default'} thread"
                        f"{'s' if threads != 1 else ''}): {', '.join(slower)}")
    search.details["latency"] = {"threads": threads, "batch": int(next(iter(feed.values())).shape[0]) if feed else None}
    return search


def slower_layers(start: ir.Model, pass_, feed: Mapping[str, np.ndarray], providers="cpu",
                  threads: int | None = 1) -> tuple[list[str], dict[str, dict]]:
    """``(slower, latency_us)`` of a ``lowrank`` pass at its own levels (a ratio, an energy): the layers
    whose two kernels did not run faster than the one they replace (``measure_latency`` on ``feed``, on
    a copy of ``start``), and each timed layer's kernel µs before and after."""
    from onnxopt.profiling import named_nodes

    start = named_nodes(start)  # onnxruntime reports kernel times by node name
    trial = copy.copy(pass_)  # the caller's pass keeps its details
    model = trial(start.clone()).model
    times = measure_latency(start, model, trial.details.get("layers", {}), feed, providers, threads)
    latency = {u: {"before": round(one, 1), "after": round(two, 1)} for u, (one, two) in times.items()}
    return [u for u, (one, two) in times.items() if two >= one], latency


def measure_latency(start: ir.Model, model: ir.Model, records: Mapping[str, dict], feed: Mapping[str, np.ndarray],
                    providers="cpu", threads: int | None = 1) -> dict[str, tuple[float, float]]:
    """Kernel time (µs) of each factorized layer before (its one node in ``start``) and after (its two
    nodes in ``model``; ``records``: the ``lowrank`` pass's layer records, with ``nodes``), from one
    interleaved profiled run of both models on ``feed`` (``onnxopt.profiling``). Layers whose nodes
    have no names, or no kernel of their own in the profile, are left out."""
    from onnxopt.latency import timing_settings
    from onnxopt.profiling import kernel_times, layer_times

    settings = timing_settings(providers, threads)
    pairs = {u: r["nodes"] for u, r in records.items() if r.get("nodes") and all(r["nodes"])}
    snapshots = [ModelSnapshot(start), ModelSnapshot(model)]
    try:
        t_before, t_after = kernel_times(snapshots, feed, settings)
    finally:
        for s in snapshots:
            s.close()
    one = layer_times(start, t_before, [nodes[1] for nodes in pairs.values()])
    two = layer_times(model, t_after, [n for nodes in pairs.values() for n in nodes])
    return {u: (one[nodes[1]], two.get(nodes[0], 0.0) + two.get(nodes[1], 0.0))
            for u, nodes in pairs.items() if nodes[1] in one and nodes[1] in two}

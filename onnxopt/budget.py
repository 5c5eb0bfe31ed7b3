"""One accuracy budget and one way back for the lossy passes that rewrite layers one by one.

A lossy pass (clustering, sparsity, low rank, dynamic int8, weight-only int4) says which layers it
changed (``units``) and can run again leaving some alone (``excluding(units)``; see
``passes._base.LossyLayers`` and ``LossyNodes``). With a budget (``max_drop`` accuracy points with
labels, else ``min_cosine`` per output), the pipeline judges the result and, while it misses,
undoes the most harmful layers, 1 then 2, 4 … of them, re-running the lossy passes on the model
they started from.

Harm is measured, not guessed: each unit's output tensor is compared with the same tensor of the
model before the lossy passes (SQNR, dB, on the first evaluation samples), and a unit's harm is the
SQNR its output loses against its worst input (what it added to the error, not what it inherited),
as the int8 step ranks its nodes (``onnxopt.quantization``).
"""

from __future__ import annotations

__all__ = ["Convergence", "budget_limits", "judge", "LossyFallback", "lossy_units", "shortfall", "tensor_sqnr", "unit_tensors",
           "why_stuck"]

import math
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxopt.data import Dataset, feed_rows
from onnxopt.observe import ErrorObserver, expose
from onnxopt.report import Validation
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session
from onnxopt.validate import compare_models

DEFAULT_MAX_DROP = 1.0  # accuracy points, with labels
DEFAULT_MIN_COSINE = 0.99  # per output, without
SQNR_SAMPLES = 8
MAX_ROUNDS = 8
# A fallback that keeps more layers as they were, round after round, without closing the gap to the
# budget is measuring something no layer causes: STALL_ROUNDS rounds in a row that each close less
# than STALL_GAIN of the gap they started from end it, and ``why_stuck`` says what the measure shows.
STALL_ROUNDS = 2
STALL_GAIN = 0.1
SPREAD_DB = 1.0  # no unit losing more than this at its own output: the error is spread over many


def _differs(o) -> bool:
    """An output compared as different without a cosine: its shape changed, or a non-numeric output
    differs (``validate``: no cosine, infinite error); not one the original gave no finite value on."""
    return math.isnan(o.cosine) and math.isinf(o.max_abs)


def judge(v: Validation, max_drop: float | None, min_cosine: float | None) -> tuple[bool, str]:
    """The budget's verdict on a validation: the accuracy drop with labels (``max_drop``, default 1
    point), else every output's cosine (``min_cosine``, default 0.99); with a figure that says why."""
    if v.error:
        return False, v.error
    labelled = v.accuracy_before is not None and v.accuracy_after is not None
    if max_drop is None and min_cosine is None:
        max_drop, min_cosine = (DEFAULT_MAX_DROP, None) if labelled else (None, DEFAULT_MIN_COSINE)
    parts, ok = [], True
    if max_drop is not None and labelled:
        drop = (v.accuracy_before - v.accuracy_after) * 100
        ok &= drop <= max_drop + 1e-9
        parts.append(f"accuracy drop {drop:.2f} points (budget {max_drop:g})")
    if min_cosine is not None:  # over the outputs the user judges (--outputs), each its worst sample
        judged = [o for o in v.outputs if getattr(o, "judged", True)]
        worst = min((o.cosine for o in judged if not math.isnan(o.cosine)), default=float("nan"))
        differs = [o.name for o in judged if _differs(o)]
        ok &= worst >= min_cosine and not differs
        which = "" if len(judged) == len(v.outputs) else f" of {', '.join(o.name for o in judged)}"
        parts.append(f"min cosine per sample{which} {worst:.5f} (budget {min_cosine:g})")
        if differs:
            parts.append(f"{', '.join(differs)} differ{'s' if len(differs) == 1 else ''} in shape or value (no cosine)")
    return bool(ok), "; ".join(parts)


def unit_tensors(model: ir.Model, unit: str) -> tuple[list[str], str] | None:
    """The data inputs and the output tensor of the node a unit names in ``model``: a node by name or
    label (``Op(output)``), else the first node that reads an initializer of that name."""
    graph = model.graph
    node = next((n for n in graph if n.name == unit or f"{n.op_type}({n.outputs[0].name})" == unit), None)
    if node is None and unit in graph.initializers:
        node = next((u.node for u in graph.initializers[unit].uses() if u.node.graph is graph), None)
    if node is None or not node.outputs or not node.outputs[0].name:
        return None
    inputs = [v.name for v in node.inputs if v is not None and v.name and v.const_value is None
              and not v.is_initializer()]
    return inputs, node.outputs[0].name


def tensor_sqnr(reference: ir.Model, candidate: ir.Model, names: Sequence[str], data: Dataset,
                providers="cpu", max_samples: int = SQNR_SAMPLES) -> dict[str, float]:
    """SQNR (dB) of each named tensor as ``candidate`` computes it against ``reference``, on the first
    ``max_samples`` samples of ``data`` (graph inputs are exact: +inf)."""
    inputs = {v.name for v in reference.graph.inputs}
    wanted = [n for n in dict.fromkeys(names) if n and n not in inputs]
    ref_model, _ = expose(reference, wanted)
    cand_model, _ = expose(candidate, wanted)
    observers = {n: ErrorObserver() for n in wanted}
    snapshots = [ModelSnapshot(ref_model, by_reference=True), ModelSnapshot(cand_model, by_reference=True)]
    try:
        resolved = resolve_providers(providers)
        ref, cand = (s.session(providers=resolved, optimization="disabled") for s in snapshots)
        seen = 0
        for feed in data.batches:
            if seen >= max_samples:
                break
            r_out, c_out = run_session(ref, feed), run_session(cand, feed)
            seen += feed_rows(feed)
            for n in wanted:
                if n in r_out and n in c_out:
                    observers[n].update(r_out[n], c_out[n])
    finally:
        for s in snapshots:
            s.close()
    result = {n: o.sqnr_db for n, o in observers.items() if o.signal > 0}
    result.update({n: math.inf for n in names if n in inputs})
    return result


def budget_limits(v: Validation, max_drop: float | None, min_cosine: float | None) -> tuple[float | None, float | None]:
    """The limits ``judge`` applies to ``v``: ``(max_drop, min_cosine)``, a limit that does not apply None."""
    labelled = v.accuracy_before is not None and v.accuracy_after is not None
    if max_drop is None and min_cosine is None:
        return (DEFAULT_MAX_DROP, None) if labelled else (None, DEFAULT_MIN_COSINE)
    return (max_drop if labelled else None), min_cosine


def shortfall(v: Validation, max_drop: float | None, min_cosine: float | None) -> float:
    """How far ``v`` is from the budget (``judge``'s limits), 0 when it holds, inf when the model did
    not run: accuracy points past ``max_drop`` plus cosine below ``min_cosine`` (the worst judged
    output's worst sample). The fallback watches it fall round by round."""
    if v.error:
        return math.inf
    max_drop, min_cosine = budget_limits(v, max_drop, min_cosine)
    gap = 0.0
    if max_drop is not None:
        gap += max(0.0, (v.accuracy_before - v.accuracy_after) * 100 - max_drop)
    if min_cosine is not None:
        judged = [o.cosine for o in v.outputs if getattr(o, "judged", True) and not math.isnan(o.cosine)]
        differs = any(_differs(o) for o in v.outputs if getattr(o, "judged", True))
        gap += max(0.0, min_cosine - min(judged)) if judged and not differs else math.inf
    return gap


class Convergence:
    """The shortfall of each fallback round (``add``, with the layers kept as they were so far);
    ``stalled`` when the last ``STALL_ROUNDS`` rounds each closed less than ``STALL_GAIN`` of the gap
    they started from (growing gaps included) and, at the rate per layer they closed it, the layers
    still ``available`` to the rounds left could not close the rest: rounds double the layers they
    keep (1, 2, 4, ...), so with the error spread over 20 layers or more the first two close under 10%
    each and the next three meet the budget."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.kept: list[int] = []

    def add(self, gap: float, kept: int = 0) -> None:
        self.gaps.append(gap)
        self.kept.append(kept)

    def stalled(self, available: int | None = None) -> bool:
        if len(self.gaps) <= STALL_ROUNDS:
            return False
        recent = self.gaps[-STALL_ROUNDS - 1:]
        if any(after < before * (1 - STALL_GAIN) for before, after in zip(recent, recent[1:])):
            return False
        layers = self.kept[-1] - self.kept[-STALL_ROUNDS - 1]
        closed = recent[0] - recent[-1]
        if available is None or layers <= 0 or not closed > 0 or not math.isfinite(recent[-1]):
            return True
        return closed / layers * available < recent[-1]


def why_stuck(v: Validation, max_drop: float | None, min_cosine: float | None, *, kept: int, first_figure: str,
              figure: str, top_harm_db: float | None = None) -> str:
    """Why keeping the most harmful layers as they were stopped moving the metric: what the measure
    itself shows (one sample, one output, too few samples, synthetic inputs, error spread over every
    layer), in one sentence for the report."""
    max_drop, min_cosine = budget_limits(v, max_drop, min_cosine)
    moved = f"keeping {kept} layer{'s' if kept != 1 else ''} as they were moved {first_figure} to {figure}"
    reasons = []
    if max_drop is not None and v.samples:
        step = 100.0 / v.samples
        drop = (v.accuracy_before - v.accuracy_after) * 100
        if max_drop + 1e-9 < drop <= 3 * step + 1e-9:  # the accuracy misses, by a few samples
            reasons.append(f"the drop is {round(drop / step)} of {v.samples} samples (one sample is {step:.2f} points): "
                           f"too few to judge a budget of {max_drop:g}; give more labelled samples (--eval)")
    if min_cosine is not None:
        judged = [o for o in v.outputs if getattr(o, "judged", True) and not math.isnan(o.cosine)]
        failing = [o for o in judged if o.cosine < min_cosine]
        passing = [o for o in judged if o.cosine >= min_cosine]
        for o in failing[:2]:
            if o.cosine_mean is not None and o.cosine_mean >= min_cosine:
                reasons.append(f"{o.name}: the mean cosine per sample ({o.cosine_mean:.5f}) meets the budget and the "
                               f"worst sample ({o.cosine:.5f}) does not: one sample rules the verdict (outputs near zero "
                               f"or inputs unlike the rest)")
        if failing and passing:
            reasons.append(f"{', '.join(o.name for o in failing)} misses while {', '.join(o.name for o in passing)} "
                           f"meets: judge only the outputs you use with --outputs")
    if top_harm_db is not None and top_harm_db < SPREAD_DB:
        reasons.append(f"no remaining layer loses more than {SPREAD_DB:g} dB at its own output: the error is spread "
                       f"over many layers, not in a few")
    if v.synthetic:
        reasons.append("the inputs are synthetic: give real --data or --eval")
    if not reasons:
        reasons.append("the budget may be beyond what this setting allows: try a looser budget or another method")
    return f"{moved}, short of the budget: {'; '.join(reasons)}"


class LossyFallback:
    """Judge a model made by lossy passes against the budget and, while it misses, undo the most
    harmful units of those passes (see the module docstring). ``start`` is the model before the
    first lossy pass; ``passes`` the lossy passes in order (each with ``units`` and ``excluding``)."""

    def __init__(self, start: ir.Model, passes: list, original: ModelSnapshot, data: Dataset, *,
                 max_drop: float | None, min_cosine: float | None, providers="cpu",
                 judged_outputs: Sequence[str] | None = None) -> None:
        self.start, self.passes, self.original, self.data = start, list(passes), original, data
        self.max_drop, self.min_cosine, self.providers = max_drop, min_cosine, providers
        self.judged_outputs = judged_outputs
        self.details: dict[str, Any] = {"rounds": [], "kept": []}

    def run(self, model: ir.Model) -> tuple[ir.Model, list, bool, str]:
        """The model, the passes as last run, whether the budget holds, and the figure."""
        met, figure = self._judge(model)
        first_figure, convergence = figure, Convergence()
        convergence.add(shortfall(self.last, self.max_drop, self.min_cosine))
        for round_ in range(1, MAX_ROUNDS + 1):
            if met:
                break
            harm = self._harm(model)
            candidates = [(h, u) for u, h in harm if h > 0]
            if not candidates:
                self.details["stuck"] = ("no layer adds error at its own output: the loss is spread over "
                                         "every layer, or comes from a pass without layers to undo")
                break
            if convergence.stalled(min(len(candidates), sum(2 ** (r - 1) for r in range(round_, MAX_ROUNDS + 1)))):
                self.details["stuck"] = why_stuck(self.last, self.max_drop, self.min_cosine, kept=len(self.details["kept"]),
                                                  first_figure=first_figure, figure=figure, top_harm_db=candidates[0][0])
                break
            take = candidates[: 2 ** (round_ - 1)]
            for h, unit in take:
                self.details["kept"].append({"unit": unit, "round": round_, "harm_db": round(h, 2), "figure": figure})
            units = {u for _, u in take}
            self.passes = [p.excluding([u for u in p.units if u in units]) if p in lossy_units(self.passes) else p
                           for p in self.passes]
            model = self._apply()
            met, figure = self._judge(model)
            convergence.add(shortfall(self.last, self.max_drop, self.min_cosine), len(self.details["kept"]))
            self.details["rounds"].append({"round": round_, "undone": sorted(units), "met": met, "figure": figure})
        if not met and "stuck" not in self.details and self.details["kept"]:  # every round used
            self.details["stuck"] = why_stuck(self.last, self.max_drop, self.min_cosine, kept=len(self.details["kept"]),
                                              first_figure=first_figure, figure=figure)
        self.details.update(met=met, figure=figure)
        return model, self.passes, met, figure

    def _apply(self) -> ir.Model:
        working = self.start.clone()
        for p in self.passes:
            working = p(working).model
        return working

    def _judge(self, model: ir.Model) -> tuple[bool, str]:
        candidate = ModelSnapshot(model)
        try:
            v = compare_models(self.original, candidate, self.data, providers=self.providers, runtime_floor=False,
                               judged_outputs=self.judged_outputs)
        finally:
            candidate.close()
        self.last = v
        return judge(v, self.max_drop, self.min_cosine)

    def _harm(self, model: ir.Model) -> list[tuple[str, float]]:
        """Units of the last run, most harmful first: SQNR lost at the unit's own output."""
        where: dict[str, tuple[list[str], str]] = {}
        for p in self.passes:
            for unit in getattr(p, "units", []):
                found = unit_tensors(self.start, unit)
                if found is not None:
                    where[unit] = found
        names = [t for ins, out in where.values() for t in (*ins, out)]
        errors = tensor_sqnr(self.start, model, names, self.data, self.providers)
        harm = []
        for unit, (ins, out) in where.items():
            if out not in errors:
                continue
            before = min([min(errors.get(t, math.inf), 60.0) for t in ins] or [60.0])
            harm.append((unit, float(before - errors[out])))
        harm.sort(key=lambda kv: -kv[1])
        return harm


def lossy_units(passes: Sequence) -> list:
    """The passes that can be undone unit by unit (``units`` and ``excluding``), lossy as configured."""
    return [p for p in passes if getattr(p, "lossy", False) and hasattr(p, "excluding") and hasattr(p, "units")]

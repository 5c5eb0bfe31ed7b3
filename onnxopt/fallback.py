"""The way back of every lossy step: while the budget misses, undo the most harmful units first.

A lossy step that can undo its work unit by unit says how through a ``Fallback``:

- ``judge(model)``: the budget's verdict on ``model`` and the figure that says why (``onnxopt.budget``);
  it may be ``provisional`` (judged on a few samples where a miss there is a miss on all the data),
  and ``confirm(model)`` gives the verdict on all of it;
- ``rank(model)``: the units of ``model`` with their harm (dB of SQNR lost at their own output,
  ``onnxopt.sqnr``), most harmful first;
- ``undo(units)``: the model made again with those units undone as well, and the ones before.

``fall_back`` runs the rounds: judge; while the budget misses, undo the most harmful 1, then 2, 4 …
units (``MAX_ROUNDS`` rounds at most), and stop when the budget holds, when no unit adds error,
or when the rounds stall (``Convergence``); the verdict a round ended on provisionally is confirmed,
and a fallback that ends short of the budget says why (``why_stuck``: what the measure shows).

Two steps run on it: the pipeline's for the lossy passes that rewrite layers one by one
(``LossyFallback`` below: clustering, sparsity, low rank, dynamic int8, weight-only int4), and the
int8 step's for its quantized nodes (``onnxopt.int8_fallback``).
"""

from __future__ import annotations

__all__ = ["CannotRank", "Convergence", "Fallback", "LossyFallback", "MAX_ROUNDS", "Outcome", "Undone", "fall_back",
           "lossy_units", "why_stuck"]

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxopt.budget import budget_limits, judge, shortfall
from onnxopt.data import Dataset
from onnxopt.report import Validation
from onnxopt.runtime import ModelSnapshot
from onnxopt.sqnr import rank_by_harm, tensor_sqnr, unit_tensors
from onnxopt.validate import compare_models

MAX_ROUNDS = 8
# A fallback that keeps more layers as they were, round after round, without closing the gap to the
# budget is measuring something no layer causes: STALL_ROUNDS rounds in a row that each close less
# than STALL_GAIN of the gap they started from end it, and ``why_stuck`` says what the measure shows.
STALL_ROUNDS = 2
STALL_GAIN = 0.1
SPREAD_DB = 1.0  # no unit losing more than this at its own output: the error is spread over many


class CannotRank(Exception):
    """``Fallback.rank`` could not measure the model (onnxruntime refuses it): the message is the figure."""


@dataclass
class Undone:
    """A unit the fallback undid: in which round, its harm (dB), and the figure of the model it was undone from."""

    unit: str
    round: int
    harm: float
    figure: str


@dataclass
class Outcome:
    """How a fallback ended: the last model, the verdict on it, the units undone in order, each round
    (``round``, ``undone``, ``met``, ``figure``), why it stopped short of the budget (``stuck``), and
    whether the model could be measured at all (``runnable``)."""

    model: ir.Model
    met: bool
    figure: str
    undone: list[Undone] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stuck: str | None = None
    runnable: bool = True


class Fallback:
    """What a lossy step gives ``fall_back`` (see the module docstring). ``last`` is the validation
    its last verdict came from; ``limits()`` the budget's (max_drop, min_cosine) for it."""

    provisional = False  # whether the last verdict came from fewer samples than ``confirm`` judges on
    # What the fallback says when no unit adds error at its own output; None: ``why_stuck``, if any unit was undone.
    no_units_reason: str | None = None
    last: Validation

    def judge(self, model: ir.Model) -> tuple[bool, str]:
        raise NotImplementedError

    def confirm(self, model: ir.Model) -> tuple[bool, str]:
        return self.judge(model)

    def limits(self) -> tuple[float | None, float | None]:
        raise NotImplementedError

    def rank(self, model: ir.Model) -> list[tuple[str, float]]:
        raise NotImplementedError

    def undo(self, units: list[Undone]) -> ir.Model:
        raise NotImplementedError


def fall_back(way: Fallback, model: ir.Model) -> Outcome:
    """Judge ``model`` and, while it misses the budget, undo the most harmful units of ``way``, 1 then
    2, 4 … of them a round; returns how it ended (see the module docstring)."""
    met, figure = way.judge(model)
    first_figure, convergence = figure, Convergence()
    convergence.add(shortfall(way.last, *way.limits()))
    outcome = Outcome(model, met, figure)
    stalled_at, no_units = None, False
    for round_ in range(1, MAX_ROUNDS + 1):
        if met:
            break
        try:
            ranked = way.rank(model)
        except CannotRank as exc:
            figure, outcome.runnable = str(exc), False
            break
        candidates = [(unit, harm) for unit, harm in ranked if harm > 0]
        if not candidates:
            no_units = True
            break
        if convergence.stalled(min(len(candidates), sum(2 ** (r - 1) for r in range(round_, MAX_ROUNDS + 1)))):
            stalled_at = candidates[0][1]  # more units undone no longer move the metric: say why, stop
            break
        take = [Undone(unit, round_, harm, figure) for unit, harm in candidates[: 2 ** (round_ - 1)]]
        outcome.undone += take
        model = way.undo(take)
        # After the last round nothing follows that a provisional verdict could decide: confirm at once.
        met, figure = way.confirm(model) if round_ == MAX_ROUNDS else way.judge(model)
        convergence.add(shortfall(way.last, *way.limits()), len(outcome.undone))
        outcome.rounds.append({"round": round_, "undone": sorted(u.unit for u in take), "met": met, "figure": figure})
    if not met and outcome.runnable and way.provisional:
        # The last miss was seen on the first samples (a miss on all the data too): the figure of all
        # of it for the report and the reasons.
        met, figure = way.confirm(model)
    if not met and outcome.runnable:
        if no_units and way.no_units_reason:
            outcome.stuck = way.no_units_reason
        elif outcome.undone or stalled_at is not None:  # stalled, every round used, or no unit left
            outcome.stuck = why_stuck(way.last, *way.limits(), kept=len(outcome.undone), first_figure=first_figure,
                                      figure=figure, top_harm_db=stalled_at)
    outcome.model, outcome.met, outcome.figure = model, met, figure
    return outcome


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


class LossyFallback(Fallback):
    """The pipeline's way back for the lossy passes that rewrite layers one by one (``lossy_units``:
    each says which layers it changed, ``units``, and runs again leaving some alone, ``excluding``;
    see ``passes._base.LossyLayers`` and ``LossyNodes``): judge the model they made against the budget
    and, while it misses, re-run them from ``start`` (the model before the first of them) leaving the
    most harmful layers as they were. A unit's harm is measured against the same tensors of ``start``."""

    no_units_reason = ("no layer adds error at its own output: the loss is spread over every layer, or comes "
                       "from a pass without layers to undo")

    def __init__(self, start: ir.Model, passes: list, original: ModelSnapshot, data: Dataset, *,
                 max_drop: float | None, min_cosine: float | None, providers="cpu",
                 judged_outputs: Sequence[str] | None = None) -> None:
        self.start, self.passes, self.original, self.data = start, list(passes), original, data
        self.max_drop, self.min_cosine, self.providers = max_drop, min_cosine, providers
        self.judged_outputs = judged_outputs
        self.details: dict[str, Any] = {"rounds": [], "kept": []}

    def run(self, model: ir.Model) -> tuple[ir.Model, list, bool, str]:
        """The model, the passes as last run, whether the budget holds, and the figure."""
        outcome = fall_back(self, model)
        self.details["rounds"] = outcome.rounds
        self.details["kept"] = [{"unit": u.unit, "round": u.round, "harm_db": round(u.harm, 2), "figure": u.figure}
                                for u in outcome.undone]
        if outcome.stuck:
            self.details["stuck"] = outcome.stuck
        self.details.update(met=outcome.met, figure=outcome.figure)
        return outcome.model, self.passes, outcome.met, outcome.figure

    def judge(self, model: ir.Model) -> tuple[bool, str]:
        candidate = ModelSnapshot(model)
        try:
            v = compare_models(self.original, candidate, self.data, providers=self.providers, runtime_floor=False,
                               judged_outputs=self.judged_outputs)
        finally:
            candidate.close()
        self.last = v
        return judge(v, self.max_drop, self.min_cosine)

    def limits(self) -> tuple[float | None, float | None]:
        return self.max_drop, self.min_cosine

    def rank(self, model: ir.Model) -> list[tuple[str, float]]:
        """Units of the last run, most harmful first: SQNR lost at the unit's own output."""
        where: dict[str, tuple[list[str], str]] = {}
        for p in self.passes:
            for unit in getattr(p, "units", []):
                found = unit_tensors(self.start, unit)
                if found is not None:
                    where[unit] = found
        names = [t for ins, out in where.values() for t in (*ins, out)]
        return rank_by_harm(where, tensor_sqnr(self.start, model, names, self.data, self.providers))

    def undo(self, units: list[Undone]) -> ir.Model:
        """The lossy passes run again from ``start``, each leaving ``units`` (and those before) alone."""
        undone = {u.unit for u in units}
        self.passes = [p.excluding([u for u in p.units if u in undone]) if p in lossy_units(self.passes) else p
                       for p in self.passes]
        working = self.start.clone()
        for p in self.passes:
            working = p(working).model
        return working


def lossy_units(passes: Sequence) -> list:
    """The passes that can be undone unit by unit (``units`` and ``excluding``), lossy as configured."""
    return [p for p in passes if getattr(p, "lossy", False) and hasattr(p, "excluding") and hasattr(p, "units")]

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

__all__ = ["Convergence", "judge", "LossyFallback", "lossy_units", "shortfall", "tensor_sqnr", "unit_tensors",
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
_FINAL = ("as it was", "float")  # undo steps after which a unit is out of the lossy pass


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


def _limits(v: Validation, max_drop: float | None, min_cosine: float | None) -> tuple[float | None, float | None]:
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
    max_drop, min_cosine = _limits(v, max_drop, min_cosine)
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
    max_drop, min_cosine = _limits(v, max_drop, min_cosine)
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
    harmful units of those passes (see the module docstring); a pass with ``undo_step`` undoes a unit
    in steps (int4 -> 8 bits -> float), each step a round's undoing, recorded in ``kept[i]["to"]``; a
    round takes partial steps only, while any unit has one left. ``start`` is the model before the
    first lossy pass; ``passes`` the lossy passes in order (each with ``units`` and ``excluding``)."""

    def __init__(self, start: ir.Model, passes: list, original: ModelSnapshot, data: Dataset, *,
                 max_drop: float | None, min_cosine: float | None, providers="cpu",
                 judged_outputs: Sequence[str] | None = None) -> None:
        self.start, self.passes, self.original, self.data = start, list(passes), original, data
        self.max_drop, self.min_cosine, self.providers = max_drop, min_cosine, providers
        self.judged_outputs = judged_outputs
        self.details: dict[str, Any] = {"rounds": [], "kept": []}
        self._alone: dict[tuple[str, str], float] = {}  # (unit, its next step) -> judged outputs' SQNR, it alone lossy
        self._reference: dict[str, list] | None = None

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
                                                  first_figure=first_figure, figure=figure, top_harm_db=max(h for h, _ in candidates))
                break
            # Partial steps (int4 -> 8 bits) first: a round sends nothing to float while a unit can
            # still step (8 bits removes most of a layer's error for a tenth of float's bytes).
            partial = [(h, u) for h, u in candidates if self._step(u) not in _FINAL]
            take = (partial or candidates)[: 2 ** (round_ - 1)]
            for h, unit in take:
                self.details["kept"].append({"unit": unit, "round": round_, "harm_db": round(h, 2), "figure": figure,
                                             "to": self._step(unit)})
            units = {u for _, u in take}
            before = self.passes
            self.passes = _undoing(self.passes, units)
            model = self._apply()
            met, figure = self._judge(model)
            convergence.add(shortfall(self.last, self.max_drop, self.min_cosine), len(self.details["kept"]))
            self.details["rounds"].append({"round": round_, "undone": sorted(units), "met": met, "figure": figure})
        lossy = lossy_units(self.passes)
        if met and self.details["rounds"] and len(take) > 1 and all(hasattr(p, "undo_cost") for p in lossy):
            model, figure = self._trim(before, [u for _, u in take], model, figure)
        if not met and "stuck" not in self.details and self.details["kept"]:  # every round used
            self.details["stuck"] = why_stuck(self.last, self.max_drop, self.min_cosine, kept=len(self.details["kept"]),
                                              first_figure=first_figure, figure=figure)
        self.details.update(met=met, figure=figure)
        return model, self.passes, met, figure

    def _trim(self, before: list, take: list[str], model: ir.Model, figure: str) -> tuple[ir.Model, str]:
        """The fewest of the last round's steps (in its order) that still meet the budget, by bisection:
        rounds double, so the last one may take twice what the budget needs, and where a pass prices
        its steps (``undo_cost``: bytes) those are bytes the file need not carry."""
        lo, hi, best = 0, len(take), (model, self.passes, figure, self.last)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            self.passes = _undoing(before, set(take[:mid]))
            candidate = self._apply()
            met, got = self._judge(candidate)
            self.details["rounds"].append({"round": "trim", "undone": sorted(take[:mid]), "met": met, "figure": got})
            if met:
                hi, best = mid, (candidate, self.passes, got, self.last)
            else:
                lo = mid
        model, self.passes, figure, self.last = best
        dropped = set(take[hi:])
        last = self.details["kept"][-1]["round"]
        self.details["kept"] = [k for k in self.details["kept"] if not (k["round"] == last and k["unit"] in dropped)]
        if dropped:
            self.details["trimmed"] = sorted(dropped)
        return model, figure

    def _step(self, unit: str) -> str:
        """Where undoing ``unit`` takes it: a pass's ``undo_step`` (weight-only int4: "8 bits" before
        "float"), else "as it was"."""
        for p in lossy_units(self.passes):
            if unit in p.units:
                return p.undo_step(unit) if hasattr(p, "undo_step") else "as it was"
        return "as it was"

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
        """Units of the last run, most harmful first: SQNR lost at the unit's own output; where every
        lossy pass can isolate a unit (``isolating``), at the judged outputs with that unit alone lossy."""
        lossy = lossy_units(self.passes)
        if lossy and all(hasattr(p, "isolating") for p in lossy):
            return self._harm_alone(lossy)
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


    def _harm_alone(self, lossy: list) -> list[tuple[str, float]]:
        """Units of the last run, most harmful first, by the SQNR (dB, 60 for exact) that the judged
        outputs lose when that unit alone is lossy as it now is (every other unit of the lossy passes
        left as it was), on the first ``SQNR_SAMPLES`` samples. Why not the SQNR lost at the unit's
        own output: on all-MiniLM-L6-v2 at int4 that ranks the embedding tables and the first
        layer's projections first (their inputs are exact), and stepping those 7 to 8 bits moved the
        sentence-embedding cosine 0.967 -> 0.965. Each unit is measured once per step it stands at;
        units with a partial step left (int4 -> 8 bits) first, the others only when none is left."""
        holder = {u: p for p in lossy for u in p.units}
        partial = [u for u in holder if self._step(u) not in _FINAL]
        harm = self._alone_harm(holder, partial or list(holder))
        if partial and not any(h > 0 for _, h in harm):
            harm = self._alone_harm(holder, [u for u in holder if u not in partial])

        def worth(unit: str, h: float) -> float:
            """Noise power removed per byte added where the pass says what a step costs (``undo_cost``):
            the greedy rule for the smallest file at a noise budget (MiniLM's 11.7M-weight token table
            at 8 bits alone is 0.065x of fp32). Else the harm."""
            cost = holder[unit].undo_cost(unit) if hasattr(holder[unit], "undo_cost") else None
            return 10 ** ((h - 60) / 10) / cost if cost else h

        harm.sort(key=lambda kv: -worth(*kv))
        return harm

    def _alone_harm(self, holder: dict, units: list[str]) -> list[tuple[str, float]]:
        todo = [u for u in units if (u, self._step(u)) not in self._alone]
        if todo:
            if self._reference is None:
                self._reference = self._outputs(self.start)
            reference = self._reference
            for unit in todo:
                working = self.start.clone()
                for p in self.passes:
                    if p in holder.values():
                        p = p.isolating([unit] if holder[unit] is p else [])
                    working = p(working).model
                got = self._outputs(working)
                observers = {n: ErrorObserver() for n in reference}
                for n, o in observers.items():
                    for r, c in zip(reference[n], got.get(n, [])):
                        o.update(r, c)
                sqnr = min((o.sqnr_db for o in observers.values() if o.signal > 0), default=math.inf)
                self._alone[(unit, self._step(unit))] = min(float(sqnr), 60.0)
        return [(u, 60.0 - self._alone[(u, self._step(u))]) for u in units]

    def _outputs(self, model: ir.Model) -> dict[str, list]:
        """The judged outputs (all, without ``judged_outputs``) of ``model`` on the first samples, by batch."""
        names = [v.name for v in model.graph.outputs if self.judged_outputs is None or v.name in self.judged_outputs]
        snapshot = ModelSnapshot(model, by_reference=True)
        out: dict[str, list] = {n: [] for n in names}
        try:
            session = snapshot.session(providers=resolve_providers(self.providers), optimization="disabled")
            seen = 0
            for feed in self.data.batches:
                if seen >= SQNR_SAMPLES:
                    break
                result = run_session(session, feed)
                seen += feed_rows(feed)
                for n in names:
                    out[n].append(result[n])
        finally:
            snapshot.close()
        return out


def _undoing(passes: list, units: set[str]) -> list:
    """``passes`` with the lossy ones undoing ``units`` one step each (``excluding``)."""
    lossy = lossy_units(passes)
    return [p.excluding([u for u in p.units if u in units]) if p in lossy else p for p in passes]


def lossy_units(passes: Sequence) -> list:
    """The passes that can be undone unit by unit (``units`` and ``excluding``), lossy as configured."""
    return [p for p in passes if getattr(p, "lossy", False) and hasattr(p, "excluding") and hasattr(p, "units")]

"""The accuracy budget of every lossy step: the metric, the limit, and the verdict.

With labels in the evaluation data the metric is the accuracy drop (``max_drop`` points, default
1.0); without, every judged output's cosine to the original, per sample, its worst sample
(``min_cosine``, default 0.99). ``judge`` gives the verdict on a validation (``onnxopt.validate``),
with the figure that says why; ``shortfall`` how far it is from the budget, which the fallback
(``onnxopt.fallback``: undo the most harmful units first) watches fall round by round.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_DROP", "DEFAULT_MIN_COSINE", "budget_limits", "judge", "shortfall"]

import math

from onnxopt.report import Validation

DEFAULT_MAX_DROP = 1.0  # accuracy points, with labels
DEFAULT_MIN_COSINE = 0.99  # per output, without


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

"""The int8 step's accuracy budget and its way back: the most harmful quantized nodes kept float.

``Int8Budget`` judges a quantized model against the original on the evaluation data: with labels the
accuracy may drop at most ``max_drop`` points (default 1.0), without them every judged output's
cosine per sample must reach ``min_cosine`` (default 0.99). Each validation on all the data is kept
by the model it judged, so that the pipeline's own validation of the model the step settles on is
one of them (``validated``), and the original's outputs are run once for all (``reference_outputs``).

``NodeFallback`` is the int8 step's ``onnxopt.fallback.Fallback``: its units are the quantized compute
nodes, ranked by the SQNR they lose (``onnxopt.sqnr.QuantizedSqnr.harm``), and undone by quantizing
the float model again with them excluded. Without labels a round is judged first on the samples that
were worst in the last validation on all the data (``JUDGE_SAMPLES``): the worst cosine over fewer
samples is never lower, so a miss there is a miss on all the data, and only a round that meets there
is judged again on all of it.
"""

from __future__ import annotations

__all__ = ["Int8Budget", "JUDGE_SAMPLES", "NodeFallback"]

import copy
import hashlib
import logging

import onnx_ir as ir

from onnxopt.budget import DEFAULT_MAX_DROP, DEFAULT_MIN_COSINE, judge
from onnxopt.data import Dataset, take_rows
from onnxopt.errors import one_line
from onnxopt.fallback import CannotRank, Fallback, Undone
from onnxopt.passes.quantize import QuantizeQDQ
from onnxopt.report import Validation
from onnxopt.runtime import ModelSnapshot
from onnxopt.sqnr import QuantizedSqnr
from onnxopt.validate import ReferenceOutputs

logger = logging.getLogger(__name__)

# Fallback rounds judged by the worst sample's cosine (no labels) are judged first on this many
# samples, the worst of the last validation on all the data: the worst cosine over fewer samples is
# never lower, so a round that misses there misses on the whole data; only a round that meets there
# is judged again on all of it (``NodeFallback.judge``). The worst samples stay the worst from round
# to round more often than not (the recognizer's first 4 samples met every round that all 32 missed).
JUDGE_SAMPLES = 4


class Int8Budget:
    """The int8 step's verdicts: ``judge`` a validation, ``meets`` (validate a model and judge it),
    and the validations it ran, for the pipeline to reuse (``validated``)."""

    def __init__(self, max_drop: float | None, min_cosine: float | None, *, providers="cpu",
                 judged_outputs: list[str] | None = None) -> None:
        self.max_drop, self.min_cosine = max_drop, min_cosine
        self.providers, self.judged_outputs = providers, judged_outputs
        # The original's outputs on the evaluation data, run once for every validation of the step,
        # and each validation by the model it judged (the pipeline's own is then the last of them).
        self.reference_outputs = ReferenceOutputs()
        self._judged: dict[bytes, Validation] = {}
        self.last: Validation | None = None

    def limits(self, labels: bool) -> tuple[float | None, float | None]:
        """(max_drop, min_cosine) of the verdict: with labels the accuracy drop (default 1 point) and
        ``min_cosine`` when given; without, every output's cosine (default 0.99)."""
        if labels:
            return (self.max_drop if self.max_drop is not None else DEFAULT_MAX_DROP), self.min_cosine
        return None, (self.min_cosine if self.min_cosine is not None else DEFAULT_MIN_COSINE)

    def judge(self, v: Validation) -> tuple[bool, str]:
        """The lossy verdict on a validation: accuracy drop with labels, else every output's cosine."""
        if v.error:
            return False, v.error
        return judge(v, *self.limits(v.accuracy_before is not None))

    def meets(self, original: ModelSnapshot, model: ir.Model, evaluation: Dataset,
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
        self.last = v
        return self.judge(v)

    def validated(self, candidate: ModelSnapshot, rtol: float | None, atol: float) -> Validation | None:
        """The validation this budget already ran of the very model ``candidate`` holds (the fallback
        judges every model it keeps on the same data), when asked with the tolerances it used; else None."""
        from onnxopt.validate import DEFAULT_ATOL

        if rtol is not None or atol != DEFAULT_ATOL:
            return None
        key = _snapshot_key(candidate)
        v = self._judged.get(key) if key is not None else None
        return copy.deepcopy(v) if v is not None else None


class NodeFallback(Fallback):
    """The int8 step's way back (see the module docstring): ``p`` quantized ``model`` from
    ``float_model``; each ``undo`` quantizes ``float_model`` again with more nodes excluded, and
    ``p``, ``result`` and ``kept`` (the report's ``fallback``: node, round, reason) follow."""

    def __init__(self, budget: Int8Budget, sqnr: QuantizedSqnr, original: ModelSnapshot, evaluation: Dataset,
                 float_model: ir.Model, p: QuantizeQDQ, result: ir.passes.PassResult) -> None:
        self.budget, self.sqnr, self.original, self.evaluation = budget, sqnr, original, evaluation
        self.float_model, self.p, self.result = float_model, p, result
        self.kept: list[dict[str, object]] = []
        self._subset: Dataset | None = None  # the last full validation's worst samples, which judge a round first
        self._subset_rows: list[int] = []
        self._subset_reference = ReferenceOutputs()

    @property
    def last(self) -> Validation:
        return self.budget.last

    def limits(self) -> tuple[float | None, float | None]:
        return self.budget.limits(self.budget.last.accuracy_before is not None)

    def judge(self, model: ir.Model) -> tuple[bool, str]:
        """A round's verdict: first on the samples that were worst in the last validation on all the
        data, where that is exact (a miss there is a miss on all; see ``JUDGE_SAMPLES``), on all the
        data otherwise and to confirm."""
        if self._subset is not None:
            met, figure = self.budget.meets(self.original, model, self._subset, self._subset_reference)
            if not met:
                self.provisional = True
                return met, figure
        met, figure = self.confirm(model)
        self._choose_subset()
        return met, figure

    def confirm(self, model: ir.Model) -> tuple[bool, str]:
        self.provisional = False
        return self.budget.meets(self.original, model, self.evaluation)

    def rank(self, model: ir.Model) -> list[tuple[str, float]]:
        """Quantized nodes not excluded yet, most harmful first (``QuantizedSqnr.harm``)."""
        try:
            harm = self.sqnr.harm(self.float_model, model, self.p, self.evaluation)
        except Exception as exc:  # onnxruntime refuses the quantized model: say so, don't crash
            raise CannotRank(f"onnxruntime cannot run the quantized model: {one_line(exc)}") from None
        return [(node, h) for node, h in harm if node not in self.p.exclude]

    def undo(self, units: list[Undone]) -> ir.Model:
        """``float_model`` quantized again with ``units`` kept float as well, each with its reason."""
        for u in units:
            self.kept.append({"node": u.unit, "round": u.round, "reason": f"loses {u.harm:.1f} dB SQNR ({u.figure})"})
            logger.info("quantize: keeping %s in float: loses %.1f dB SQNR", u.unit, u.harm)
        model = self.float_model.clone()
        self.p = self.p.excluding({item["node"]: f"kept float: {item['reason']}" for item in self.kept[-len(units):]})
        self.result = self.p(model)
        return model

    def _choose_subset(self) -> None:
        """The samples the next round is judged on first: the ``JUDGE_SAMPLES`` worst of the last
        validation on all the data (each judged output's worst in turn), which are the likeliest to
        miss again. Only the worst-sample cosine judges exactly on a subset: not with labels (an
        accuracy over fewer samples can be lower), nor where an output has no per-sample cosine."""
        v, evaluation = self.budget.last, self.evaluation
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
        feed = take_rows(self.float_model, evaluation, rows)
        if feed is None:
            self._subset = None
            return
        self._subset = Dataset([feed], None, f"{evaluation.source} (its {len(rows)} worst samples)",
                               synthetic=evaluation.synthetic)
        self._subset_rows = rows
        self._subset_reference = ReferenceOutputs()


def _snapshot_key(snapshot: ModelSnapshot) -> bytes | None:
    """A digest of a snapshot's serialized model (None for one in a folder: external data)."""
    return hashlib.sha256(snapshot.data).digest() if snapshot.data is not None else None

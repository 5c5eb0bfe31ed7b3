"""Compare two models on the same inputs under onnxruntime: per-output error, cosine, top-1, accuracy.

Cosine is taken per sample (each index of an output's first axis), then reported as the mean and
the worst over samples: one bad sentence in a batch of good ones shows, where a cosine over the
flattened batch averages it away. ``cosine`` is the worst, the figure a lossy budget judges.
An attention-mask input (``mask`` in its name, an integer or bool tensor of rank 2, ``[B, S]``)
marks padding: where it is 0, the values of every output whose leading dims are ``[B, S]`` are
left out of every figure (padding is computed, but nobody reads it).

The reference runs with graph optimizations disabled, so that onnxruntime's own fusions cannot
hide or cause a difference; the candidate runs as it will ship (all optimizations on). Where the
candidate misses the tolerance, the original is run as it would ship too: onnxruntime's own
optimizations move some models' outputs beyond 1e-5 (three convs whose logits reach the hundreds
before a Sigmoid: 1e-4), and a pass is not blamed for that noise (see ``RUNTIME_FLOOR_FACTOR``).
"""

from __future__ import annotations

__all__ = ["DEFAULT_RTOL", "DEFAULT_ATOL", "HALF_RTOL", "default_rtol", "compare_models", "OutputAccumulator",
           "ReferenceOutputs", "mask_input"]

from collections.abc import Callable, Sequence

import numpy as np

from onnxopt.data import Dataset, batch_samples, cannot_run, check_labels
from onnxopt.errors import one_line
from onnxopt.report import OutputComparison, Validation
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session

# The verdict for a lossless result: |candidate - reference| <= atol + rtol * max|reference|, per output.
# Folding BatchNorm re-associates float32 products, which moves outputs by a few ulps of their
# range (measured up to ~2e-6 relative on ResNet-50); 1e-5 leaves headroom without hiding a bug.
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6
# float16/bfloat16 outputs carry 10 (7) mantissa bits: one rounding is ~5e-4 (4e-3) of the value.
# fold-bn on fp16 models moved outputs by up to 8.4e-4 of their range over 20 seeds.
HALF_RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
# A candidate within atol + rtol * max|ref| + this factor times the difference that onnxruntime's
# own optimizations make on the unmodified original (its "runtime floor") passes: the pass's own
# rounding and onnxruntime's add up, and a real bug is orders of magnitude above either.
RUNTIME_FLOOR_FACTOR = 2.0
# Values an output is compared in at a time (float64 temporaries: 8 bytes each, a few alive at once).
_CHUNK_VALUES = 2**20
# Samples named per output as its worst (least cosine first): what a lossy search judges a candidate
# on first (a miss on any of them is a miss on all the data), and what the report names.
WORST_ROWS = 8


def default_rtol(dtype: np.dtype) -> float:
    """The documented default relative tolerance for an output of this dtype."""
    return HALF_RTOL.get(np.dtype(dtype).name, DEFAULT_RTOL)


class OutputAccumulator:
    """Streams one output's comparison batch by batch: max errors, cosine terms, argmax agreement."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.agree = 0
        self.rows = 0
        self.shape_error: str | None = None
        self.nonfinite = False  # the candidate is NaN/inf where the reference is finite, or differs where it is not
        self.values = 0
        self.finite = 0  # values finite in both, the ones the figures are over
        self.ref_nonfinite = 0
        self.dtype: np.dtype | None = None
        self.sample_cos_sum = 0.0  # per-sample cosines: their sum, count and least
        self.sample_cos_count = 0
        self.sample_cos_worst = float("inf")
        self.rows_seen = 0  # rows of the first axis so far: the next row's index over the whole data
        self.rows_per_batch = True  # each batch's output ran over as many rows as the batch has samples
        self.worst_rows: list[tuple[float, int]] = []  # the least per-sample cosines and their rows
        self.masked = 0  # values left out as padding

    def update(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None,
               samples: int | None = None) -> None:
        """Add one batch; ``mask`` ([B, S], nonzero where real) leaves padding out when the output's
        leading dims are [B, S]; ``samples``: the batch's samples (its output's rows are named as
        samples only where each batch's are as many)."""
        self.dtype = ref.dtype if self.dtype is None else self.dtype
        if samples is not None and (ref.ndim == 0 or ref.shape[0] != samples):
            self.rows_per_batch = False
        if ref.shape != cand.shape:
            self.shape_error = f"shape {list(cand.shape)} != reference {list(ref.shape)}"
            return
        if ref.dtype.kind not in "fiub" or cand.dtype.kind not in "fiub":
            if not np.array_equal(ref, cand):
                self.shape_error = "non-numeric output differs"
            return
        # In slices along axis 0: the float64 temporaries of a large output (a recognizer's 32x40x6625
        # probabilities: 68 MB each, eight of them) stay a few MB.
        if mask is not None and not (ref.ndim >= 2 and tuple(ref.shape[:2]) == tuple(np.shape(mask))):
            mask = None
        rows = max(1, _CHUNK_VALUES // max(ref[:1].size, 1)) if ref.ndim else 1
        if ref.ndim == 0 or rows >= ref.shape[0]:
            self._update(ref, cand, mask)
            return
        for start in range(0, ref.shape[0], rows):
            self._update(ref[start:start + rows], cand[start:start + rows],
                         None if mask is None else mask[start:start + rows])

    def _update(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None) -> None:
        try:
            self._add(ref, cand, mask)
        finally:
            self.rows_seen += int(ref.shape[0]) if ref.ndim else 1

    def _add(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None) -> None:
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        if r.size == 0:
            return
        real = None
        if mask is not None:  # padding: zeros in both, counted nowhere
            real = np.broadcast_to(np.asarray(mask).reshape(mask.shape + (1,) * (r.ndim - 2)) != 0, r.shape)
            self.masked += int(r.size - real.sum())
            r, c = np.where(real, r, 0.0), np.where(real, c, 0.0)
        ref_finite, cand_finite = np.isfinite(r), np.isfinite(c)
        self.values += r.size if real is None else int(real.sum())
        if (ref_finite & ~cand_finite).any():
            self.nonfinite = True
        if not ref_finite.all():
            # where the reference is NaN or infinite, the candidate must be the very same
            rn, cn = r[~ref_finite], c[~ref_finite]
            self.ref_nonfinite += rn.size
            if not ((np.isnan(rn) & np.isnan(cn)) | (rn == cn)).all():
                self.nonfinite = True
        finite = ref_finite & cand_finite
        self.finite += int(finite.sum() if real is None else (finite & real).sum())
        diff = np.abs(r - c)[finite]
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.ref_max = max(self.ref_max, float(np.abs(r[finite]).max()))
        rf, cf = np.where(finite, r, 0.0), np.where(finite, c, 0.0)
        self.dot += float((rf * cf).sum())
        self.ref_sq += float((rf * rf).sum())
        self.cand_sq += float((cf * cf).sum())
        if r.ndim >= 2:  # per sample: each index of the first axis
            flat = (r.shape[0], -1)
            dots = (rf * cf).reshape(flat).sum(axis=1)
            rsq, csq = (rf * rf).reshape(flat).sum(axis=1), (cf * cf).reshape(flat).sum(axis=1)
            seen = (finite if real is None else finite & real).reshape(flat).any(axis=1)
            cos = _cosines(dots[seen], rsq[seen], csq[seen])
            if cos.size:
                self.sample_cos_sum += float(cos.sum())
                self.sample_cos_count += int(cos.size)
                self.sample_cos_worst = min(self.sample_cos_worst, float(cos.min()))
                rows = self.rows_seen + np.flatnonzero(seen)
                least = np.argsort(cos, kind="stable")[:WORST_ROWS]
                self.worst_rows = sorted(self.worst_rows + [(float(cos[i]), int(rows[i])) for i in least])[:WORST_ROWS]
        if r.ndim == 2 and r.shape[1] > 1:
            rows = ref_finite.all(axis=1) if real is None else ref_finite.all(axis=1) & real.any(axis=1)
            if real is not None:  # padded positions never win the argmax
                r, c = np.where(real, r, -np.inf), np.where(real, c, -np.inf)
            self.agree += int((r[rows].argmax(axis=1) == c[rows].argmax(axis=1)).sum())
            self.rows += int(rows.sum())

    def note(self) -> str | None:
        """What the figures leave out: non-finite values, in either model."""
        if self.nonfinite:
            return f"'{self.name}': the optimized model gives NaN/inf where the original does not"
        if self.values and not self.finite:
            return (f"'{self.name}': the original gives no finite value on this data (all NaN/inf): nothing was "
                    "compared; give --data that the model computes finite outputs on")
        if self.ref_nonfinite:
            return (f"'{self.name}': the original gives NaN/inf at {self.ref_nonfinite} of {self.values} values and the "
                    "optimized model the same there; the figures are over the finite values")
        return None

    def result(self, rtol: float | None, atol: float, floor: float | None = None, samples: int | None = None) -> OutputComparison:
        """The figures and the verdict; ``rtol=None`` takes the default for the output's dtype.
        ``samples``: the data's sample count; the worst samples are named only where the output's
        first axis ran over exactly that many rows, each batch's as many as the batch's samples (its
        rows are the data's samples)."""
        rows_are_samples = samples is not None and self.rows_seen == samples and self.rows_per_batch
        if rtol is None:
            rtol = default_rtol(self.dtype) if self.dtype is not None else DEFAULT_RTOL
        if self.shape_error:
            return OutputComparison(self.name, float("inf"), float("inf"), float("nan"), None, False, rtol)
        if self.values and not self.finite:  # nothing to compare: no cosine, no pass
            cosine = mean = float("nan")
        elif self.sample_cos_count:
            cosine, mean = self.sample_cos_worst, self.sample_cos_sum / self.sample_cos_count
        else:  # a scalar or a vector per batch: one cosine over all of it
            cosine = mean = float(_cosines(np.array([self.dot]), np.array([self.ref_sq]), np.array([self.cand_sq]))[0])
        max_rel = self.max_abs / self.ref_max if self.ref_max > 0 else (0.0 if self.max_abs == 0 else float("inf"))
        allowed = atol + rtol * self.ref_max + RUNTIME_FLOOR_FACTOR * (floor or 0.0)
        ok = (not self.nonfinite) and self.max_abs <= allowed and (self.finite > 0 or self.values == 0)
        top1 = self.agree / self.rows if self.rows else None
        return OutputComparison(self.name, self.max_abs, max_rel, float(cosine), top1, bool(ok), rtol, floor,
                                cosine_mean=float(mean), cosine_worst=float(cosine),
                                samples=self.sample_cos_count or None, masked=self.masked,
                                worst_samples=[row for _, row in self.worst_rows] if rows_are_samples else [])


def _cosines(dot: np.ndarray, ref_sq: np.ndarray, cand_sq: np.ndarray) -> np.ndarray:
    """Cosine per entry; where either side is all zeros, 1 when both are, else 0."""
    denom = np.sqrt(ref_sq) * np.sqrt(cand_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where(ref_sq == cand_sq, 1.0, 0.0))
    return np.clip(cos, -1.0, 1.0)


_MASK_TYPES = {"tensor(int64)", "tensor(int32)", "tensor(int8)", "tensor(uint8)", "tensor(bool)", "tensor(int16)"}


def mask_input(inputs) -> str | None:
    """The attention-mask input among onnxruntime's ``inputs`` (NodeArg-like: ``name``, ``type``,
    ``shape``): ``mask`` in its name, an integer or bool tensor of rank 2; None when there is none
    or more than one (which one marks padding would be a guess)."""
    found = [i.name for i in inputs
             if "mask" in i.name.lower() and i.type in _MASK_TYPES and len(i.shape or ()) == 2]
    return found[0] if len(found) == 1 else None


def compare_models(
    reference: ModelSnapshot,
    candidate: ModelSnapshot,
    data: Dataset,
    *,
    providers: str | Sequence[str] = "cpu",
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    candidate_optimization: str = "all",
    runtime_floor: bool = True,
    progress: Callable[[int, int], None] | None = None,
    reference_outputs: ReferenceOutputs | None = None,
    judged_outputs: Sequence[str] | None = None,
) -> Validation:
    """Run both models on every batch of ``data`` and judge each output against the tolerance.

    ``rtol=None`` uses the documented default per output dtype (``default_rtol``). With
    ``runtime_floor``, an output that misses the tolerance is judged again with onnxruntime's own
    noise on the original added (``RUNTIME_FLOOR_FACTOR``); lossy callers, whose verdict is theirs,
    turn it off. A candidate that onnxruntime refuses to load or run is a failed validation, not a crash.
    ``reference_outputs`` keeps the reference's outputs on ``data`` between calls (a lossy search that
    validates many candidates against one reference runs the reference once).
    ``judged_outputs`` names the outputs the verdict judges (None: all); the others are compared and
    reported (``OutputComparison.judged`` False) but never fail it. An unknown name is an ``OptionError``.
    Padding that an attention-mask input marks (``mask_input``) is left out of every figure.
    """
    resolved = resolve_providers(providers)
    common = dict(
        ok=False, providers=resolved, samples=data.num_samples, batches=len(data), rtol=rtol, atol=atol,
        data=data.source, synthetic=data.synthetic, outputs=[], notes=list(data.notes),
    )
    # With every reference output at hand (a large model's, computed before the passes), the reference
    # session is not made: the two models' weights are never held at once.
    known = reference_outputs is not None and all(reference_outputs.get(i) is not None for i in range(len(data)))
    ref_session = None if known and len(data) else reference.session(providers=resolved, optimization="disabled")
    try:
        cand_session = candidate.session(providers=resolved, optimization=candidate_optimization)
    except Exception as exc:
        return Validation(**common, error=f"onnxruntime cannot load the optimized model: {one_line(exc)}")
    ref_names = list(reference_outputs.get(0)) if ref_session is None else [o.name for o in ref_session.get_outputs()]
    cand_names = [o.name for o in cand_session.get_outputs()]
    if ref_names != cand_names:
        return Validation(**common, error=f"outputs differ: {ref_names} vs {cand_names}")
    judged = _judged_names(judged_outputs, ref_names)
    mask_name = mask_input((ref_session or cand_session).get_inputs())
    accumulators = {name: OutputAccumulator(name) for name in ref_names}
    ref_logits, cand_logits = [], []
    for i, feed in enumerate(data):
        ref_out = reference_outputs.get(i) if reference_outputs is not None else None
        if ref_out is None:
            try:
                ref_out = run_session(ref_session, feed)
            except Exception as exc:  # the input model itself cannot run on it: the data does not fit
                raise cannot_run(f"{data.source} batch {i}", feed, [], exc) from None
            if reference_outputs is not None:
                reference_outputs.keep(i, ref_out)
        try:
            cand_out = run_session(cand_session, feed)
        except Exception as exc:
            return Validation(**common, error=f"onnxruntime cannot run the optimized model: {one_line(exc)}")
        if i == 0 and data.labels is not None:
            check_labels(data.labels, np.asarray(ref_out[ref_names[0]]), ref_names[0], data.source)
        mask = np.asarray(feed[mask_name]) if mask_name is not None and mask_name in feed else None
        for name in ref_names:
            accumulators[name].update(np.asarray(ref_out[name]), np.asarray(cand_out[name]), mask, batch_samples(feed))
        if data.labels is not None:
            ref_logits.append(np.asarray(ref_out[ref_names[0]]))
            cand_logits.append(np.asarray(cand_out[ref_names[0]]))
        if progress:
            progress(i + 1, len(data))
    outputs = [acc.result(rtol, atol, samples=data.num_samples) for acc in accumulators.values()]
    if runtime_floor and candidate_optimization != "disabled" and not all(o.ok for o in outputs):
        ref_session = ref_session or reference.session(providers=resolved, optimization="disabled")
        floors = _runtime_floor(reference, ref_session, resolved, candidate_optimization, data, ref_names)
        outputs = [acc.result(rtol, atol, floors.get(name), samples=data.num_samples) for name, acc in accumulators.items()]
        worst = max(floors, key=floors.get, default=None)
        if worst is not None and floors[worst] > 0:
            common["notes"].append(
                f"onnxruntime's own optimizations change the original's '{worst}' by up to {floors[worst]:.3g}; "
                f"the tolerance adds {RUNTIME_FLOOR_FACTOR:g}x that per output"
            )
    common["notes"] += [n for n in (acc.note() for acc in accumulators.values()) if n]
    padded = [acc.name for acc in accumulators.values() if acc.masked]
    if padded:
        common["notes"].append(f"padding positions excluded: mask input '{mask_name}' "
                               f"(outputs {', '.join(padded)}; {sum(accumulators[n].masked for n in padded)} values)")
    for o in outputs:
        o.judged = o.name in judged
    if len(judged) < len(outputs):
        common["notes"].append(f"judged outputs: {', '.join(judged)}; the others are reported, not judged")
    validation = Validation(**(common | {"ok": all(o.ok for o in outputs if o.judged), "outputs": outputs}))
    if data.labels is not None:
        validation.accuracy_before = _accuracy(ref_logits, data.labels)
        validation.accuracy_after = _accuracy(cand_logits, data.labels)
    return validation


def _judged_names(judged_outputs: Sequence[str] | None, names: list[str]) -> list[str]:
    """The outputs a verdict judges: ``judged_outputs`` (checked against ``names``), else all."""
    if judged_outputs is None:
        return list(names)
    from onnxopt.errors import OptionError

    wanted = [judged_outputs] if isinstance(judged_outputs, str) else list(judged_outputs)
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise OptionError(f"--outputs {','.join(wanted)}: {'no such output ' + ', '.join(unknown) if unknown else 'empty'} "
                          f"(the model's outputs: {', '.join(names)})")
    return [n for n in names if n in wanted]


class ReferenceOutputs:
    """The reference model's outputs per batch index, kept while they total at most ``max_bytes``
    (past that, none are kept: the reference runs again each time, as without a cache)."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.outputs: dict[int, dict[str, np.ndarray]] = {}
        self.nbytes = 0
        self.full = False

    def get(self, index: int) -> dict[str, np.ndarray] | None:
        return self.outputs.get(index)

    def keep(self, index: int, outputs: dict[str, np.ndarray]) -> None:
        if self.full:
            return
        self.nbytes += sum(np.asarray(v).nbytes for v in outputs.values())
        if self.nbytes > self.max_bytes:
            self.outputs.clear()
            self.full = True
            return
        self.outputs[index] = outputs


def _runtime_floor(reference: ModelSnapshot, ref_session, providers, optimization: str, data: Dataset,
                   names: list[str]) -> dict[str, float]:
    """Per output, the largest difference onnxruntime's own ``optimization`` makes on the unmodified model."""
    try:
        shipped = reference.session(providers=providers, optimization=optimization)
    except Exception:  # the original loads unoptimized; if it cannot load optimized, there is no floor
        return {}
    floors = dict.fromkeys(names, 0.0)
    for feed in data:
        plain, optimized = run_session(ref_session, feed), run_session(shipped, feed)
        for name in names:
            a, b = np.asarray(plain[name]), np.asarray(optimized[name])
            if a.shape == b.shape and a.dtype.kind == "f" and a.size:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                floors[name] = max(floors[name], float(np.nanmax(diff)))
    return floors


def _accuracy(logits: list[np.ndarray], labels: np.ndarray) -> float | None:
    stacked = np.concatenate([l.reshape(l.shape[0], -1) for l in logits])
    if stacked.shape[0] != len(labels):
        return None
    return float((stacked.argmax(axis=1) == labels.reshape(-1)).mean())



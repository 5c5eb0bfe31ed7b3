"""SQNR of a lossy model's tensors against the model it was made from, and the harm of each unit.

The signal-to-quantization-noise ratio (dB) of a tensor is its signal power over the power of its
difference from the same tensor of the reference model (``observe.ErrorObserver``). A unit's harm is
the SQNR its output loses against its worst input: what it added to the error, not what it
inherited. Inputs at ``EXACT_DB`` or more (graph inputs, exact tensors) count as ``EXACT_DB``. The
fallback of every lossy step (``onnxopt.fallback``) undoes the most harmful units first.

Two measures, for the two kinds of units:
- ``tensor_sqnr``: the same tensor names in both models (the layers of clustering, sparsity, low rank,
  dynamic int8, int4: ``unit_tensors`` finds a unit's tensors);
- ``QuantizedSqnr``: the float tensors of a QDQ model under their quantized names (``tensor_map`` of
  ``QuantizeQDQ``), with the float model's exposed session held across the fallback's rounds.

Per-tensor SQNR is read on the first ``SQNR_SAMPLES`` samples of the evaluation data: the ranking is
that of 128 samples on the zoo and the digits model, and exposing every tensor of two models costs a
run per sample (the PaddleOCR detector: 20 of 72 s).
"""

from __future__ import annotations

__all__ = ["EXACT_DB", "QuantizedSqnr", "SQNR_SAMPLES", "rank_by_harm", "tensor_sqnr", "unit_tensors"]

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset, feed_rows, first_rows
from onnxopt.observe import DEFAULT_MAX_BYTES, BatchSplitter, ErrorObserver, expose
from onnxopt.passes.quantize import QuantizeQDQ
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session

SQNR_SAMPLES = 8
EXACT_DB = 60.0  # an input at this SQNR or more counts as exact


def rank_by_harm(where: Mapping[str, tuple[Sequence[str], str]], errors: Mapping[str, float]) -> list[tuple[str, float]]:
    """Units by harm (dB), most harmful first: ``where`` maps each unit to its input tensors and its
    output tensor, ``errors`` each tensor to its SQNR; a unit whose output has no SQNR is left out."""
    harm = []
    for unit, (ins, out) in where.items():
        if out not in errors:
            continue
        before = min([min(errors.get(t, math.inf), EXACT_DB) for t in ins] or [EXACT_DB])
        harm.append((unit, float(before - errors[out])))
    harm.sort(key=lambda kv: -kv[1])
    return harm


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


class QuantizedSqnr:
    """SQNR of a QDQ model's tensors against the float model it was quantized from, for the int8
    step's fallback (``harm``) and report (``report``). The float model's exposed session is made
    once and held until ``close``: every fallback round compares against the same float model."""

    def __init__(self, providers="cpu") -> None:
        self.providers = providers
        self._exposure = None

    def close(self) -> None:
        """Release the float model's exposed session (no longer needed)."""
        if self._exposure is not None:
            self._exposure[2].close()
            self._exposure = None

    def report(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset,
               max_parts: int | None = None) -> dict[str, float]:
        """SQNR (dB, two decimals) of every tensor a quantized node reads or writes, lowest first."""
        io_map = p.details.get("io", {})
        tensors = sorted({t for ins, out in io_map.values() for t in (*ins, out)})
        errors = self.errors(float_model, model, p.details.get("tensor_map", {}), evaluation, tensors, max_parts)
        return {t: round(v, 2) if math.isfinite(v) else v for t, v in sorted(errors.items(), key=lambda kv: kv[1])}

    def harm(self, float_model: ir.Model, model: ir.Model, p: QuantizeQDQ, evaluation: Dataset) -> list[tuple[str, float]]:
        """Quantized compute nodes by the SQNR they lose (input's worst minus output's), most harmful first:
        measured on the samples of one observation run (``errors``), since every round pays for it."""
        return rank_by_harm(p.details.get("io", {}), self.report(float_model, model, p, evaluation, max_parts=1))

    def errors(self, float_model: ir.Model, model: ir.Model, tensor_map: dict[str, str], evaluation: Dataset,
               tensors: list[str], max_parts: int | None = None) -> dict[str, float]:
        """SQNR (dB) of each named float tensor as the quantized model computes it, over the first
        ``SQNR_SAMPLES`` samples, or over as many as ``max_parts`` observation runs' worth of tensors
        hold (the splitter's ``max_bytes`` each; a detector's tensors at 320x320 fill one with one
        sample: its pixels are statistics enough). Counted in bytes, not runs: with batches of one
        sample (--batch-size 1, a model fixed at batch 1) each run holds one sample, and a small model's
        8 fit in one run's worth."""
        names = [t for t in tensors if t]
        quant_names = [tensor_map.get(t, t) for t in names]
        cand_model, cand_names = expose(model, quant_names)
        cand_snap = ModelSnapshot(cand_model)
        inputs = {v.name for v in float_model.graph.inputs}
        observers = {t: ErrorObserver() for t in names}
        try:
            providers = resolve_providers(self.providers)
            ref, splitter = self._float_exposure(float_model, names, providers)
            cand = cand_snap.session(providers=providers, optimization="disabled")
            seen = held = last = 0  # samples, bytes of tensors returned so far, and by the last run

            def full() -> bool:  # another run like the last would pass max_parts runs' worth of bytes
                return max_parts is not None and held > 0 and held + last > max_parts * splitter.max_bytes

            for feed in evaluation.batches:
                if seen >= SQNR_SAMPLES or full():
                    break

                def probe(first: dict[str, np.ndarray]) -> None:
                    splitter.learn(first, [*run_session(ref, first).values(), *run_session(cand, first).values()])

                for part in splitter.parts(first_rows(float_model, feed, SQNR_SAMPLES - seen), probe=probe):
                    if full():
                        break
                    seen += feed_rows(part)
                    r_out = run_session(ref, part)
                    c_out = run_session(cand, part)
                    last = sum(np.asarray(a).nbytes for a in (*r_out.values(), *c_out.values()))
                    held += last
                    splitter.learn(part, [*r_out.values(), *c_out.values()])
                    for t, qt in zip(names, quant_names):
                        r = part.get(t) if t in inputs else r_out.get(t)
                        c = c_out.get(qt)
                        if r is not None and c is not None:
                            observers[t].update(r, c)
                    del r_out, c_out
        finally:
            cand_snap.close()
        return {t: obs.sqnr_db for t, obs in observers.items() if obs.signal > 0}

    def _float_exposure(self, float_model: ir.Model, names: list[str], providers: list[str]):
        """A session of ``float_model`` with ``names`` exposed, and the ``BatchSplitter`` that cuts its
        feeds, made once: every fallback round compares against the same float model, and asks for
        the same tensors or fewer (its layers kept float drop out), so that the model is not
        serialized, loaded and probed again each round (extra outputs are not read)."""
        held = self._exposure
        if held is None or held[0] is not float_model or not set(names) <= held[1]:
            ref_model, _ = expose(float_model, names)
            snapshot = ModelSnapshot(ref_model, by_reference=True)
            # Both models' tensors are alive at once: each run gets half the observation budget.
            held = (float_model, set(names), snapshot, BatchSplitter(float_model, DEFAULT_MAX_BYTES // 2))
            self.close()
            self._exposure = held
        return held[2].session(providers=providers, optimization="disabled"), held[3]

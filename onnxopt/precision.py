"""float16 / bfloat16 with float32 islands chosen by measurement: convert, judge, keep the worst nodes float.

``ConvertFloat16`` (``onnxopt.passes.precision``) keeps a fixed list of op types float32. Whether that
suffices depends on the values a model computes: a residual stream that reaches 300 overflows in a
``Mul(x, x)`` that no list names. ``choose_float_islands`` converts, runs the result beside the
float32 model on the data, and where the output cosine (per sample, averaged, the worst output)
misses the budget it measures each converted node:

- a node whose half-precision output is NaN/inf where float32 is finite, while its inputs are finite,
  is an overflow's source: those nodes are kept float32 first, and the measure is taken again;
- else each converted node's harm is the SQNR its output loses against its inputs' worst (inputs at
  60 dB or more count as 60 dB, as ``onnxopt.sqnr`` does), and the most harmful nodes are kept
  float32 in growing sets (1, 2, 4, ... up to ``max_islands``) until the budget holds.

Every island comes back with its reason. On CPU onnxruntime lacks most float16 kernels and inserts
its own Casts (the model runs, slowly); on CUDA it runs float16 kernels. Sessions for float16 models
on CPU leave out ``CPU_FLOAT16_DISABLED``: onnxruntime 1.32's ``MatmulTransposeFusion`` followed by its
NCHWc layout transformer crashes the process (SIGSEGV) on a float16 MatMul that reads a
``Transpose(perm=[1, 0, 2])``, as every PyTorch ``nn.TransformerEncoder`` export has.
"""

from __future__ import annotations

__all__ = ["CPU_FLOAT16_DISABLED", "choose_float_islands", "convert_precision", "output_cosines", "session_for"]

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.errors import OptionError
from onnxopt.observe import ErrorObserver, expose
from onnxopt.passes._base import NameScope
from onnxopt.passes.precision import DEFAULT_BLOCKED, ConvertFloat16
from onnxopt.passes.quantize import _inferred_types, node_label
from onnxopt.runtime import ModelSnapshot, resolve_providers, run_session

logger = logging.getLogger(__name__)

from onnxopt.runtime import CPU_FLOAT16_DISABLED  # noqa: E402  (defined beside the sessions that need it)
# Samples the budget is judged on, and the per-node measure is taken on.
JUDGE_SAMPLES = 64
MEASURE_SAMPLES = 8
# Inputs at or above this SQNR count as exact (float16 rounding alone is ~71 dB, bfloat16 ~53 dB).
_EXACT_DB = 100.0
_ROUND_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}


def session_for(snapshot: ModelSnapshot, providers: str | Sequence[str] = "cpu", optimization: str = "all"):
    """A session for a float16/bfloat16 model: on CPU without the transformers that crash on it."""
    resolved = resolve_providers(providers)
    options: dict[str, Any] = {"providers": resolved, "optimization": optimization}
    if resolved == ["CPUExecutionProvider"] and optimization != "disabled":
        options["disabled_optimizers"] = CPU_FLOAT16_DISABLED
    return snapshot.session(**options)


def _rows(feed: dict[str, np.ndarray]) -> int:
    return max((int(np.shape(a)[0]) for a in feed.values() if np.ndim(a) > 0), default=1)


def _first(data: Dataset, limit: int) -> list[dict[str, np.ndarray]]:
    """The data's first ``limit`` samples, as its batches (the last one cut)."""
    feeds, seen = [], 0
    for feed in data:
        if seen >= limit:
            break
        rows = _rows(feed)
        take = min(rows, limit - seen)
        feeds.append(feed if take == rows else {k: (v[:take] if np.ndim(v) and np.shape(v)[0] == rows else v)
                                                for k, v in feed.items()})
        seen += take
    return feeds


def output_cosines(reference: ModelSnapshot, candidate: ModelSnapshot, feeds: Iterable[dict[str, np.ndarray]], *,
                   providers: str | Sequence[str] = "cpu") -> dict[str, dict[str, Any]]:
    """Per output: cosine per sample (mean and worst) and whether the candidate gives NaN/inf where the
    reference is finite (such a sample counts as cosine -1)."""
    ref = reference.session(providers=resolve_providers(providers), optimization="disabled")
    cand = session_for(candidate, providers)
    per: dict[str, list[float]] = {}
    nonfinite: dict[str, bool] = {}
    for feed in feeds:
        r_out, c_out = run_session(ref, feed), run_session(cand, feed)
        for name, r in r_out.items():
            r = np.asarray(r, np.float64)
            c = np.asarray(c_out[name], np.float64)
            if r.dtype.kind != "f" or r.shape != c.shape:
                continue
            r2 = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(1, -1)
            c2 = c.reshape(r2.shape)
            finite = np.isfinite(r2)
            bad = (finite & ~np.isfinite(c2)).any(axis=1)
            nonfinite[name] = nonfinite.get(name, False) or bool(bad.any())
            rf, cf = np.where(finite, r2, 0.0), np.where(finite & np.isfinite(c2), c2, 0.0)
            dot = (rf * cf).sum(axis=1)
            norm = np.linalg.norm(rf, axis=1) * np.linalg.norm(cf, axis=1)
            same = np.linalg.norm(rf - cf, axis=1) == 0
            cos = np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), np.where(same, 1.0, 0.0))
            per.setdefault(name, []).extend(np.where(bad, -1.0, cos).tolist())
    return {name: {"mean": float(np.mean(v)), "worst": float(np.min(v)), "nonfinite": nonfinite[name]}
            for name, v in per.items()}


def emulate(reference: ir.Model, converted: ir.Model, low: ir.DataType) -> tuple[ir.Model, dict[str, str]]:
    """The float32 ``reference`` computing as ``converted`` stores: every tensor that ``converted`` holds
    in ``low`` is rounded there (``Cast(to=low)`` then ``Cast(to=FLOAT)``, constants rounded ahead).

    onnxruntime's CPU provider has few float16 kernels: it computes such nodes in float32 and removes
    the Cast pairs it inserted around them, so an activation beyond 65504 never overflows there and
    CPU validation sees only the weights' rounding. User Casts it keeps: this model overflows where a
    float16 device stores the tensor (each op still computes inside in float32, as float16 kernels
    accumulate). Nodes are matched by name (``choose_float_islands`` names every node first). Returns the
    model and, per rounded output tensor, the name of its rounded copy.
    """
    model = reference.clone()
    graph = model.graph
    _fill_types(model)
    names = NameScope(graph)
    low_nodes = {n.name: n for n in converted.graph if n.name and any(o.dtype == low for o in n.outputs)}
    rounded: dict[str, str] = {}
    cache: dict[int, ir.Value] = {}
    kind = _ROUND_NUMPY[low]
    done: set[ir.Value] = set()  # rounded outputs: read as they are

    def round_value(value: ir.Value, output: bool = False) -> ir.Value:
        if id(value) in cache:
            return cache[id(value)]
        tensor = None if value.is_graph_input() else ir.convenience.get_const_tensor(value)
        if tensor is not None:
            array = tensor.numpy().astype(kind).astype(np.float32)
            name = names.fresh(f"{value.name}_rounded")
            out = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
            graph.register_initializer(out)
        else:
            down = ir.node("Cast", [value], attributes={"to": low}, name=names.fresh(f"{value.name}_round_down"))
            up = ir.node("Cast", [down.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                         name=names.fresh(f"{value.name}_round_up"))
            down.outputs[0].name = names.fresh(f"{value.name}_{low.name.lower()}")
            out = up.outputs[0]
            out.name = names.fresh(f"{value.name}_rounded")
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), value.shape
            graph.extend([down, up])
            if output:  # an input rounded on entry is the reader's loss: it is read unrounded
                rounded[value.name] = out.name
        cache[id(value)] = out
        return out

    for node in list(graph):
        twin = low_nodes.get(node.name)
        if twin is None:
            continue
        for i, (value, twin_value) in enumerate(zip(node.inputs, twin.inputs)):
            if value is not None and value.dtype == ir.DataType.FLOAT and twin_value is not None and twin_value.dtype == low:
                producer = value.producer()
                if value not in done and (producer is None or producer.name not in low_nodes):
                    node.replace_input_with(i, round_value(value))
        for out in node.outputs:
            if out.dtype != ir.DataType.FLOAT:
                continue
            uses = list(out.uses())
            is_output = [k for k, v in enumerate(graph.outputs) if v is out]
            new = round_value(out, output=True)
            done.add(new)
            for use in uses:
                use.node.replace_input_with(use.idx, new)
            for k in is_output:
                name = out.name
                out.name = names.fresh(f"{name}_unrounded")
                new.name = name
                rounded[name] = name
                graph.outputs[k] = new
    graph.sort()
    return model, rounded


def _fill_types(model: ir.Model) -> None:
    """Element types of the main graph's values that the model does not record, by shape inference."""
    types, _ = _inferred_types(model)
    for node in model.graph:
        for out in node.outputs:
            if out.dtype is None and out.name in types:
                out.type = ir.TensorType(types[out.name])  # a new type: a clone shares the old


def _named(model: ir.Model) -> ir.Model:
    """A copy whose every main-graph node has a unique name (its label where it had none)."""
    copy = model.clone()
    _fill_types(copy)  # the per-node measure needs each tensor's type
    taken: set[str] = set()
    for node in copy.graph:
        name = node.name or node_label(node)
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    return copy


class _Judge:
    """The float32 reference and the budget: converts with a set of islands and scores the result."""

    def __init__(self, model: ir.Model, data: Dataset, dtype: str, budget: float, providers, keep_io_types: bool,
                 op_block_list: Sequence[str], keep_float: Sequence[str]) -> None:
        self.model, self.dtype, self.budget, self.providers = model, dtype, budget, providers
        self.keep_io_types, self.op_block_list, self.keep_float = keep_io_types, tuple(op_block_list), tuple(keep_float)
        self.reference = ModelSnapshot(model)
        self.feeds = _first(data, JUDGE_SAMPLES)
        self.tries = 0
        # onnxruntime's CPU provider computes float16 nodes in float32 (see ``emulate``): judge a model
        # that rounds where a float16 device stores
        self.emulated = resolve_providers(providers) == ["CPUExecutionProvider"]

    def judged(self, model: ir.Model, p: ConvertFloat16) -> tuple[ir.Model, dict[str, str]]:
        """The model that is run to judge ``model``, and where each original tensor is read in it."""
        if self.emulated:
            return emulate(self.model, model, p.low)
        return model, dict(p.details.get("tensor_map", {}))

    def convert(self, islands: Sequence[str]) -> tuple[ir.Model, ConvertFloat16]:
        model = self.model.clone()
        p = ConvertFloat16(self.dtype, keep_io_types=self.keep_io_types, keep_float=(*self.keep_float, *islands),
                           op_block_list=self.op_block_list)
        p(model)
        return model, p

    def score(self, model: ir.Model, p: ConvertFloat16) -> dict[str, Any]:
        self.tries += 1
        snapshot = ModelSnapshot(self.judged(model, p)[0])
        try:
            cosines = output_cosines(self.reference, snapshot, self.feeds, providers=self.providers)
        finally:
            snapshot.close()
        mean = min((c["mean"] for c in cosines.values()), default=1.0)
        worst = min((c["worst"] for c in cosines.values()), default=1.0)
        nonfinite = any(c["nonfinite"] for c in cosines.values())
        return {"cosine_mean": mean, "cosine_worst": worst, "nonfinite": nonfinite, "per_output": cosines,
                "met": bool(mean >= self.budget and not nonfinite)}


def _measure(judge: _Judge, converted: ir.Model, p: ConvertFloat16) -> tuple[list[tuple[str, float]], list[str]]:
    """(converted nodes by harm in dB, most harmful first; nodes whose output overflows first)."""
    low = p.low
    reference = judge.model
    by_name = {node.name: node for node in reference.graph}
    nodes = [n.name for n in converted.graph if n.name in by_name and any(o.dtype == low for o in n.outputs)]
    converted, renamed = judge.judged(converted, p)
    tensors = sorted({v.name for name in nodes for v in (*by_name[name].inputs, *by_name[name].outputs)
                      if v is not None and v.name and v.dtype == ir.DataType.FLOAT and v.const_value is None})
    inputs = {v.name for v in reference.graph.inputs}
    ref_model, _ = expose(reference, tensors)
    cand_model, _ = expose(converted, [renamed.get(t, t) for t in tensors])
    ref_snap, cand_snap = ModelSnapshot(ref_model), ModelSnapshot(cand_model)
    errors = {t: ErrorObserver() for t in tensors}
    overflow: dict[str, bool] = {t: False for t in tensors}
    try:
        providers = resolve_providers(judge.providers)
        ref = ref_snap.session(providers=providers, optimization="disabled")
        cand = cand_snap.session(providers=providers, optimization="disabled")
        for feed in _first(Dataset(judge.feeds), MEASURE_SAMPLES):
            r_out, c_out = run_session(ref, feed), run_session(cand, feed)
            for t in tensors:
                r = feed.get(t) if t in inputs else r_out.get(t)
                c = feed.get(t) if t in inputs else c_out.get(renamed.get(t, t))
                if r is None or c is None:
                    continue
                r, c = np.asarray(r, np.float64), np.asarray(c, np.float64)
                bad = np.isfinite(r) & ~np.isfinite(c)
                if bad.any():
                    overflow[t] = True
                ok = np.isfinite(r) & np.isfinite(c)
                errors[t].update(np.where(ok, r, 0.0), np.where(ok, c, 0.0))
    finally:
        ref_snap.close()
        cand_snap.close()

    def sqnr(t: str) -> float:
        if t not in errors:
            return _EXACT_DB  # a constant or a graph input: exact
        return -math.inf if overflow[t] else min(errors[t].sqnr_db, _EXACT_DB)

    harm, sources = [], []
    for name in nodes:
        node = by_name[name]
        ins = [v.name for v in node.inputs if v is not None and v.dtype == ir.DataType.FLOAT]
        outs = [v.name for v in node.outputs if v.dtype == ir.DataType.FLOAT]
        if not outs:
            continue
        if any(overflow.get(t) for t in outs) and not any(overflow.get(t) for t in ins):
            sources.append(name)
        before = min((sqnr(t) for t in ins), default=_EXACT_DB)
        after = min(sqnr(t) for t in outs)
        if math.isfinite(before) and not math.isnan(after) and before - after > 0:
            harm.append((name, float(before - after)))
    harm.sort(key=lambda kv: -kv[1])
    return harm, sources


def choose_float_islands(
    model_fp32: ir.Model,
    data: Dataset,
    *,
    dtype: str = "float16",
    budget_cosine: float = 0.9999,
    max_islands: int = 32,
    providers: str | Sequence[str] = "cpu",
    keep_io_types: bool = True,
    op_block_list: Sequence[str] = DEFAULT_BLOCKED,
    keep_float: Sequence[str] = (),
) -> tuple[ir.Model, list[dict[str, Any]]]:
    """Convert ``model_fp32`` to ``dtype`` with as few float32 islands as keep the output cosine within
    ``budget_cosine``; returns the model and every node kept float32 with its reason (``by``: ``rule``
    for the block list and the pass's own rules, ``measured`` for islands chosen here). A budget that
    ``max_islands`` islands cannot meet returns the last model tried (``convert_precision`` says so).
    """
    model, islands, _ = _choose(model_fp32, data, dtype=dtype, budget_cosine=budget_cosine, max_islands=max_islands,
                                providers=providers, keep_io_types=keep_io_types, op_block_list=op_block_list,
                                keep_float=keep_float)
    return model, islands


def _choose(model_fp32: ir.Model, data: Dataset, *, dtype: str, budget_cosine: float, max_islands: int, providers,
            keep_io_types: bool, op_block_list: Sequence[str], keep_float: Sequence[str]):
    if not 0.0 < budget_cosine <= 1.0:
        raise OptionError(f"budget cosine {budget_cosine!r}: must be in (0, 1]")
    named = _named(model_fp32)
    judge = _Judge(named, data, dtype, budget_cosine, providers, keep_io_types, op_block_list, keep_float)
    measured: dict[str, str] = {}
    model, p = judge.convert([])
    score = judge.score(model, p)
    rounds = 0
    while not score["met"] and len(measured) < max_islands and rounds < 8:
        rounds += 1
        harm, sources = _measure(judge, model, p)
        fresh = [s for s in sources if s not in measured]
        if fresh:
            for s in fresh:
                measured[s] = f"{dtype} output overflows (NaN/inf) where float32 is finite"
            model, p = judge.convert(list(measured))
            score = judge.score(model, p)
            continue
        ranked = [(n, h) for n, h in harm if n not in measured]
        if not ranked:
            break
        size, best = 1, None
        while True:
            take = ranked[:min(size, max_islands - len(measured))]
            trial = dict(measured) | {n: f"loses {h:.1f} dB SQNR in {dtype} (most harmful first)" for n, h in take}
            model, p = judge.convert(list(trial))
            score = judge.score(model, p)
            best = trial
            if score["met"] or len(take) == len(ranked) or len(trial) >= max_islands:
                break
            size *= 2
        measured = best
        break
    islands = [{"node": name, "op_type": _op(named, name), "reason": reason, "by": "rule"}
               for name, reason in p.details.get("kept", {}).items() if name not in measured]
    islands += [{"node": name, "op_type": _op(named, name), "reason": reason, "by": "measured"}
                for name, reason in measured.items()]
    judge.reference.close()
    return model, islands, {**score, "budget": budget_cosine, "tries": judge.tries, "summary": p.summary}


def _op(model: ir.Model, name: str) -> str:
    return next((n.op_type for n in model.graph if n.name == name), "?")


def convert_precision(model: ir.Model, dataset: Dataset | None, dtype: str = "float16",
                      providers: str | Sequence[str] = "cpu", budget: float = 0.9999,
                      **options) -> tuple[ir.Model, dict[str, Any]]:
    """The pipeline's entry: ``model`` in ``dtype`` (islands by measurement when ``dataset`` is given,
    else the block list alone), and the details the report shows: islands with reasons, cosine per
    sample (mean, worst), whether the budget is met, seconds, and a one-line summary."""
    start = time.perf_counter()
    if dataset is None:
        converted = model.clone()
        p = ConvertFloat16(dtype, **{k: v for k, v in options.items() if k in ("keep_io_types", "keep_float",
                                                                             "op_block_list")})
        p(converted)
        islands = [{"node": n, "op_type": "?", "reason": r, "by": "rule"} for n, r in p.details["kept"].items()]
        details: dict[str, Any] = {"dtype": p.dtype, "islands": islands, "met": None, "summary": p.summary}
    else:
        settings = {"max_islands": 32, "keep_io_types": True, "op_block_list": DEFAULT_BLOCKED, "keep_float": ()} | options
        converted, islands, last = _choose(model, dataset, dtype=dtype, budget_cosine=budget, providers=providers,
                                           **settings)
        measured = [i for i in islands if i["by"] == "measured"]
        details = {"dtype": dtype, "islands": islands, **{k: last[k] for k in ("cosine_mean", "cosine_worst",
                                                                                "nonfinite", "met", "budget", "tries")},
                   "per_output": last["per_output"]}
        details["summary"] = (f"{last['summary']}; {len(measured)} float32 islands by measurement; cosine per sample "
                              f"mean {last['cosine_mean']:.6f}, worst {last['cosine_worst']:.6f} (budget {budget:g}"
                              f"{', met' if last['met'] else ', MISSED'})")
    details["seconds"] = round(time.perf_counter() - start, 3)
    return converted, details

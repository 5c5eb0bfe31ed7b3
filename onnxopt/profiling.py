"""Per-node kernel times from onnxruntime's profiler, attributed to the layers of the model that ran.

onnxruntime runs its own rewrite of the graph, so ``layer_times`` maps the names it reports back:

- a node that onnxruntime fused or converted keeps the name of the node it replaced, sometimes
  with a suffix (DQ → Conv → Q becomes a QLinearConv named like the Conv; the NHWC layout
  conversion appends ``_token_N``; MatMul + Add fused into a Gemm appends ``/MatMulAddFusion``; a Gemm
  fused with its activation is named ``fused <name>``);
- a CPU NCHWc convolution is named after its output tensor plus ``_nchwc``: that tensor's producer,
  followed back through the activations fused into it (Relu, Clip, BatchNormalization …), is the layer;
- a QuantizeLinear is charged to the layers that read it through their DequantizeLinear (an int8
  layer pays for quantizing its input), split evenly among them.

onnxruntime's own nodes (layout Transposes, NCHWc reorders) stay unattributed: what they cost
shows only in a whole-model comparison (``onnxopt.latency``), which is how the choices made from
these figures are confirmed.
"""

from __future__ import annotations

__all__ = ["kernel_times", "layer_times", "named_nodes"]

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.latency import TimingSettings, check_runs, make_runner, timing_session, warm_up
from onnxopt.runtime import ModelSnapshot

# onnxruntime's suffixes on the nodes it rewrote: layout conversion tokens, a MatMul fused with its Add.
_TOKEN_SUFFIX = re.compile(r"((_token_\d+)|(/MatMulAddFusion))+$")
# and its prefix on a node fused with the activation after it (Gemm + Relu: "fused /0/Gemm")
_FUSED_PREFIX = "fused "
_KERNEL_SUFFIX = "_kernel_time"
_WARMUP_SECONDS = 0.3
# How far back from an NCHWc node's output tensor the layer may sit (Conv → BN → Relu → Clip).
_FUSED_DEPTH = 4


def kernel_times(
    snapshots: Sequence[ModelSnapshot],
    feed: Mapping[str, np.ndarray],
    settings: TimingSettings,
    *,
    seconds: float = 1.5,
    min_runs: int = 5,
    max_runs: int = 100,
    totals: list[list[float]] | None = None,
) -> list[dict[str, float]]:
    """Median kernel time (µs) of each node onnxruntime runs, by its name, for each model on ``feed``.

    The models run side by side in alternating blocks after a warm-up (as ``onnxopt.latency`` times
    them, so that drift hits all alike), for about ``seconds``: at least ``min_runs`` and, in whole
    blocks, about ``max_runs`` profiled runs each. Sessions use ``settings`` (threads, providers).
    ``totals``, when given, receives each model's whole-run times (µs, the profiled runs in order):
    a side-by-side timing of the models that costs no run more.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as folder:
        sessions, runs, checks = [], [], []
        for i, snapshot in enumerate(snapshots):
            label = f"profiled model {i + 1}"
            sessions.append(timing_session(snapshot, settings, label, profile_prefix=os.path.join(folder, f"m{i}")))
            runs.append(make_runner(sessions[-1], feed, settings.device))
            checked = time.perf_counter()
            check_runs(runs[-1], label)
            checks.append(time.perf_counter() - checked)
        # The checking run allocated; where it alone outlasts the warm-up, it was the warm-up (the
        # PaddleOCR recognizer at batch 32: 2.3 s a run).
        block = 1 if min(checks) >= _WARMUP_SECONDS else warm_up(runs, _WARMUP_SECONDS)
        counts, start = [0] * len(runs), time.perf_counter()
        while min(counts) < min_runs or (min(counts) < max_runs and time.perf_counter() - start < seconds):
            for i, run in enumerate(runs):
                for _ in range(block):
                    run()
                counts[i] += block
        traces = []
        for session in sessions:
            with open(session.end_profiling()) as f:
                traces.append(json.load(f))
    if totals is not None:
        totals.extend(_run_times(events, count) for events, count in zip(traces, counts))
    return [_medians(events, count) for events, count in zip(traces, counts)]


def _run_times(events: list[dict], runs: int) -> list[float]:
    """The last ``runs`` whole-run durations (µs) of a trace, in order."""
    spans = sorted((e["ts"], float(e.get("dur", 0))) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    return [d for _, d in spans[-runs:]] if runs > 0 else []


def _medians(events: list[dict], runs: int) -> dict[str, float]:
    """Per-node median over the last ``runs`` runs of a trace (the warm-up runs come first)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    cutoff = starts[-runs] if 0 < runs <= len(starts) else 0
    durations: dict[str, list[float]] = defaultdict(list)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith(_KERNEL_SUFFIX) and e.get("ts", 0) >= cutoff:
            durations[name[: -len(_KERNEL_SUFFIX)]].append(float(e.get("dur", 0)))
    return {name: float(np.median(d)) for name, d in durations.items()}


def named_nodes(model: ir.Model) -> ir.Model:
    """``model``, or a copy whose unnamed nodes are named by their labels (``node_label``): onnxruntime
    reports kernel times by node name."""
    from onnxopt.passes.quantize import node_label

    if all(node.name for node in model.graph):
        return model
    copy = model.clone()
    for node in copy.graph:
        if not node.name:
            node.name = node_label(node)
    return copy


def layer_times(model: ir.Model, times: Mapping[str, float], layers: Iterable[str]) -> dict[str, float]:
    """The part of ``times`` (``kernel_times`` of ``model``) that each of ``layers`` (node names of
    ``model``'s main graph) costs, by the rules in the module docstring; layers that no node maps to
    are absent."""
    layers = set(layers)
    nodes = {node.name: node for node in model.graph if node.name}
    producers = {out.name: node for node in model.graph for out in node.outputs if out.name}
    charged: dict[str, float] = defaultdict(float)
    for ort_name, micros in times.items():
        name = ort_name[len(_FUSED_PREFIX):] if ort_name.startswith(_FUSED_PREFIX) else ort_name
        for layer, share in _owners(_TOKEN_SUFFIX.sub("", name), nodes, producers, layers):
            charged[layer] += micros * share
    return dict(charged)


def _owners(name: str, nodes: Mapping[str, ir.Node], producers: Mapping[str, ir.Node],
            layers: set[str]) -> list[tuple[str, float]]:
    if name in layers:
        return [(name, 1.0)]
    node = nodes.get(name)
    if node is not None and node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
        readers = sorted({
            reader.name
            for dq, _ in node.outputs[0].uses() if dq.op_type == "DequantizeLinear"
            for reader, _ in dq.outputs[0].uses() if reader.name in layers
        })
        return [(layer, 1.0 / len(readers)) for layer in readers]
    if name.endswith("_nchwc"):
        producer = producers.get(name[: -len("_nchwc")])
        for _ in range(_FUSED_DEPTH):
            if producer is None:
                break
            if producer.name in layers:
                return [(producer.name, 1.0)]
            first = producer.inputs[0] if producer.inputs else None
            producer = first.producer() if first is not None else None
    return []


"""Structured channel pruning on the ONNX graph: remove whole channel groups (see ``channel_groups``).

Three ways to choose the channels, one surgery:

- lossless (the default): channels whose producing weights are all zero in every producer of
  their group. Such a channel still carries a constant ``v`` (the producer's bias, then
  BatchNormalization's shift, an activation of it, ...), computed exactly per channel along the
  group. Where ``v == 0`` at a consumer, dropping it changes nothing; where ``v != 0``, its
  contribution is folded into the consumer's bias when that is exact:

      Conv without padding:  b'[o] += v * sum over taps of W[o, c, ...]
      Gemm:                  C'     += (alpha / beta) * v * B[c, :]      (row c of op(B))
      MatMul + Add(const):   A'     += v * B[c, :]

  and the channel is kept otherwise (a padded Conv sees zeros at the border, not ``v``).
- ``channels_to_remove``: group id -> channel indices, as ``find_channel_groups`` numbers them;
- ``ratio`` with an ``importance`` (``l1``, ``l2``: the weight norms of every member of the group
  averaged, as Torch-Pruning's GroupMagnitudeImportance; ``bn``: BatchNormalization |scale|;
  ``activation``: mean |x| per channel where consumers read it; ``apoz``: the fraction of non-zero
  values there (1 - average percentage of zeros after Relu); ``entropy``: the entropy of each
  channel's histogram there (low: the channel says little about its input, pruned first); ``taylor``
  and ``fisher``: first-order Taylor |activation x gradient| and squared gradients per channel
  (``onnxopt.gradients``); all from ``activation`` statistics the caller computed), per group
  (``scope="layer"``: each group loses ``ratio`` of its channels) or
  over all groups (``scope="global"``: scores normalized by each group's mean, one threshold).
  The first layer's groups are protected unless ``protect_first=False``; ``round_to`` keeps
  channel counts multiples of it.

Surgery: every member loses the positions of the removed channels (new initializers; shared
tensors are never mutated), depthwise Convs shrink their ``group``, Splits their sizes, a
flattening Reshape its target. Stale intermediate shapes are cleared.
"""

from __future__ import annotations

__all__ = ["PruneChannels", "IMPORTANCE_CRITERIA", "DATA_CRITERIA", "kept_positions", "compose_kept"]

import logging
import math
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import NameScope, OnnxoptPass, constant_array, replace_weight
from onnxopt.passes.channel_groups import ChannelAnalysis, ChannelGroup, Track, analyze
from onnxopt.passes.channel_groups import is_padded, node_attr

logger = logging.getLogger(__name__)

IMPORTANCE_CRITERIA = ("l1", "l2", "bn", "activation", "apoz", "entropy", "taylor", "fisher")
# Criteria scored from data: the caller hands the scores in as ``activation`` (value name -> per channel).
DATA_CRITERIA = ("activation", "apoz", "entropy", "taylor", "fisher")


class PruneChannels(OnnxoptPass):
    """Remove channel groups' channels: all-zero ones losslessly (default), given ones, or the least important.

    Rules:

    1. only groups that ``find_channel_groups`` marks prunable are touched; a group keeps at least
       one channel;
    2. lossless mode removes a zero channel only where its constant can be dropped or folded
       exactly (see the module docstring), and keeps it otherwise, saying how many;
    3. importance modes never touch the first layer's groups unless ``protect_first=False``.
    """

    name = "prune"

    @property
    def lossy(self) -> bool:
        """Pruning by importance or given channels changes outputs; removing all-zero channels does not."""
        return self.mode != "zero"

    def __init__(
        self,
        channels_to_remove: dict[int, list[int]] | None = None,
        *,
        ratio: float | None = None,
        importance: str = "l1",
        scope: str = "layer",
        round_to: int = 1,
        protect_first: bool = True,
        activation: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        if importance not in IMPORTANCE_CRITERIA:
            raise ValueError(f"importance '{importance}': not one of {', '.join(IMPORTANCE_CRITERIA)}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope '{scope}': not 'layer' or 'global'")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio {ratio}: must be in [0, 1)")
        if round_to < 1:
            raise ValueError(f"round_to {round_to}: must be positive")
        if importance in DATA_CRITERIA and ratio is not None and activation is None:
            raise ValueError(f"importance '{importance}' needs activation statistics (value name -> score per channel)")
        self.channels_to_remove = channels_to_remove
        self.ratio = ratio
        self.importance = importance
        self.scope = scope
        self.round_to = round_to
        self.protect_first = protect_first
        self.activation = activation
        # Set by a run: value name -> (channel axis, positions kept of the value before the run), for
        # every value whose channel layout the analysis tracked; and the values a consumer (Conv,
        # Gemm, MatMul) reads by channel, in graph order: the channel groups' boundaries.
        self.kept_channels: dict[str, tuple[int, np.ndarray]] = {}
        self.boundaries: list[str] = []

    @property
    def mode(self) -> str:
        if self.channels_to_remove is not None:
            return "given"
        return "zero" if self.ratio is None else "importance"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        analysis = analyze(model)
        groups = analysis.groups
        folds: dict[tuple[ir.Node, int], np.ndarray] = {}
        left: dict[str, str] = {}
        kept_zero = 0
        if self.mode == "given":
            plan = {}
            for gid, channels in self.channels_to_remove.items():
                g = groups[gid]
                if not g.prunable:
                    left[f"group {gid}"] = g.reason
                    logger.warning("prune: group %d not pruned: %s", gid, g.reason)
                    continue
                plan[gid] = np.unique(np.asarray(list(channels), dtype=np.int64))
        elif self.mode == "zero":
            plan, folds, kept_zero, left = _lossless_plan(analysis)
        else:
            plan, left = self._importance_plan(groups)
        for gid, channels in list(plan.items()):
            if len(channels) >= groups[gid].size:  # a group keeps one channel
                plan[gid] = np.asarray(sorted(channels))[1:] if self.mode != "importance" else channels[:-1]
            if len(plan[gid]) == 0:
                del plan[gid]
        # Which positions of each tracked value survive, and where consumers read channels: what
        # distillation needs to compare the pruned student's activations with the teacher's.
        self.kept_channels = kept_positions(analysis, plan)
        self.boundaries = _boundaries(analysis)
        removed_params, bias_params = _surgery(model, analysis, plan, folds)
        removed = sum(len(c) for c in plan.values())
        total = sum(g.size for g in groups if g.prunable)
        self.details = {
            "mode": self.mode,
            "groups": len(groups),
            "prunable_groups": sum(g.prunable for g in groups),
            "channels_removed": int(removed),
            "prunable_channels": int(total),
            "params_removed": int(removed_params),
            "bias_params_added": int(bias_params),
            "removed": {int(gid): [int(c) for c in chans] for gid, chans in plan.items()},
            "sizes": {int(g.id): int(g.size) for g in groups},  # channels per group before: kept = size - removed
            "kept_zero_channels": int(kept_zero),
            "left": left,
        }
        what = {"zero": "all-zero channels", "given": "given channels", "importance": f"{self.importance} importance, ratio {self.ratio:g}" if self.ratio is not None else ""}[self.mode]
        unprunable = len(groups) - self.details["prunable_groups"]
        self.summary = (
            f"removed {removed} of {total} prunable channels in {len(plan)} of {self.details['prunable_groups']} prunable groups "
            f"({what}); {removed_params} parameters"
            + (f"; kept {kept_zero} zero channels whose constant cannot be folded" if kept_zero else "")
            + (f"; {unprunable} group{'' if unprunable == 1 else 's'} unprunable" if unprunable > 0 else "")
        )
        logger.info("prune: %s", self.summary)
        return ir.passes.PassResult(model, modified=bool(plan))

    # --- importance
    def _importance_plan(self, groups: list[ChannelGroup]):
        left: dict[str, str] = {}
        scores: dict[int, np.ndarray] = {}
        for g in groups:
            if not g.prunable:
                left[f"group {g.id}"] = g.reason
                continue
            if g.first and self.protect_first:
                continue
            s = _scores(g, self.importance, self.activation)
            if s is None:
                left[f"group {g.id}"] = f"no {self.importance} importance (no member carries it)"
                continue
            scores[g.id] = s
        plan: dict[int, np.ndarray] = {}
        if self.scope == "layer":
            for gid, s in scores.items():
                n = len(s) - int(len(s) * (1 - self.ratio))
                plan[gid] = self._choose(s, n)
        elif scores:
            normalized = {gid: s / (s.mean() if s.mean() > 0 else 1.0) for gid, s in scores.items()}
            flat = np.concatenate(list(normalized.values()))
            n = len(flat) - int(len(flat) * (1 - self.ratio))
            if n > 0:
                threshold = np.sort(flat, kind="stable")[n - 1]
                for gid, s in normalized.items():
                    plan[gid] = self._choose(s, int((s <= threshold).sum()))
        return {gid: c for gid, c in plan.items() if len(c)}, left

    def _choose(self, score: np.ndarray, n: int) -> np.ndarray:
        size = len(score)
        n = min(max(n, 0), size - 1)
        if self.round_to > 1 and n > 0:
            keep = size - n
            keep -= keep % self.round_to
            keep = max(keep, min(self.round_to, size))
            n = size - keep
        order = np.argsort(score, kind="stable")
        return np.sort(order[:n])


def kept_positions(analysis: ChannelAnalysis, plan: dict[int, np.ndarray]) -> dict[str, tuple[int, np.ndarray]]:
    """Per tracked value: its channel axis and the positions along it that removing ``plan``'s
    channels (group id -> channel indices) leaves, in order (all of them where nothing is removed)."""
    kept = {}
    for name, track in analysis.tracks.items():
        removed = []
        for seg in track.segs:
            channels = plan.get(seg.space) if seg.space is not None else None
            if channels is None or not len(channels):
                continue
            c = np.asarray(channels, dtype=np.int64)
            c = c[(c >= seg.start) & (c < seg.start + seg.length)]
            removed.append(((seg.offset + (c - seg.start) * seg.stride)[:, None] + np.arange(seg.stride)[None, :]).reshape(-1))
        positions = np.arange(track.size, dtype=np.int64)
        if removed:
            positions = np.setdiff1d(positions, np.concatenate(removed))
        kept[name] = (track.axis, positions)
    return kept


def compose_kept(first: dict[str, tuple[int, np.ndarray]], then: dict[str, tuple[int, np.ndarray]]) -> dict[str, tuple[int, np.ndarray]]:
    """The positions of the original values that two pruning runs in a row keep: ``then`` indexes
    the positions ``first`` left."""
    composed = dict(first)
    for name, (axis, positions) in then.items():
        before = first.get(name)
        composed[name] = (axis, positions) if before is None or before[0] != axis else (axis, before[1][positions])
    return composed


def _boundaries(analysis: ChannelAnalysis) -> list[str]:
    """The values that a consumer reads by channel (every group's probes), in graph order."""
    probed = {p.value for g in analysis.groups for p in g.probes}
    order = [v.name for node in analysis.nodes for v in node.outputs if v.name in probed]
    return list(dict.fromkeys(order))


def _member_array(m) -> np.ndarray | None:
    if m.index is None or m.index >= len(m.node.inputs):
        return None
    return constant_array(m.node.inputs[m.index])


def _per_channel(m, array: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of ``array`` (already |w|^p) over each group channel's positions in member ``m``: (channels, sums)."""
    moved = np.moveaxis(array, m.axis, 0)
    # the row size spelled out: numpy cannot infer -1 for an array of no elements (a 0-row Gemm weight)
    moved = moved.reshape(moved.shape[0], math.prod(moved.shape[1:])).sum(axis=1)
    channels = np.arange(m.start, m.start + m.length)
    pos = m.positions(channels).reshape(len(channels), m.stride)
    return channels, moved[pos].sum(axis=1)


def _scores(group: ChannelGroup, criterion: str, activation) -> np.ndarray | None:
    """One score per channel of the group (higher is more important)."""
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    if criterion in ("l1", "l2"):
        p = 1 if criterion == "l1" else 2
        for m in group.members:
            is_bn_scale = m.role == "param" and m.node.op_type == "BatchNormalization" and m.index == 1
            if not (m.role in ("out", "in", "dw") and m.index == 1) and not is_bn_scale:
                continue
            arr = _member_array(m)
            if arr is None:
                continue
            channels, sums = _per_channel(m, np.abs(arr.astype(np.float64)) ** p, group.size)
            total[channels] += sums
            count[channels] += 1
    elif criterion == "bn":
        for m in group.members:
            if m.role == "param" and m.node.op_type == "BatchNormalization" and m.index == 1:
                channels, sums = _per_channel(m, np.abs(_member_array(m).astype(np.float64)), group.size)
                total[channels] += sums
                count[channels] += 1
    else:
        for probe in group.probes:
            stat = (activation or {}).get(probe.value)
            if stat is None:
                continue
            stat = np.asarray(stat, dtype=np.float64).reshape(-1)
            channels = np.arange(probe.start, probe.start + probe.length)
            pos = probe.offset + (channels - probe.start)[:, None] * probe.stride + np.arange(probe.stride)[None, :]
            total[channels] += stat[pos].mean(axis=1)
            count[channels] += 1
    if not count.any():
        return None
    return total / np.maximum(count, 1)


# --- lossless: zero channels and the constants they carry

def _lossless_plan(analysis: ChannelAnalysis):
    groups = analysis.groups
    left: dict[str, str] = {}
    zero: dict[int, set[int]] = {}
    for g in groups:
        producers = [m for m in g.producers if m.index == 1]
        if not producers:
            continue
        candidates = np.ones(g.size, dtype=bool)
        for m in producers:
            arr = _member_array(m)
            channels, sums = _per_channel(m, np.abs(arr.astype(np.float64)), g.size)
            candidates[channels] &= sums == 0
        if candidates.any():
            if not g.prunable:
                left[f"group {g.id} ({int(candidates.sum())} zero channels)"] = g.reason
                continue
            zero[g.id] = set(np.flatnonzero(candidates).tolist())
    if not zero:
        return {}, {}, 0, left
    values, keep, fold_records = _propagate_constants(analysis, zero)
    for gid, c in keep:
        zero[gid].discard(c)
    kept = len(keep)
    folds: dict[tuple[ir.Node, int], np.ndarray] = {}
    for node, index, gid, c, contribution in fold_records:
        if c in zero.get(gid, ()):
            key = (node, index)
            folds[key] = folds.get(key, 0) + contribution
    plan = {gid: np.asarray(sorted(cs), dtype=np.int64) for gid, cs in zero.items() if cs}
    return plan, folds, kept, left


def _channel_of(track: Track, position: int) -> tuple[int | None, int]:
    for s in track.segs:
        if s.offset <= position < s.offset + s.length * s.stride:
            return s.space, s.start + (position - s.offset) // s.stride
    return None, -1


def _vector(value: ir.Value, track: Track) -> np.ndarray | None:
    """A constant operand as one value per channel position, or None if it varies along other axes."""
    arr = constant_array(value)
    if arr is None:
        return None
    arr = np.asarray(arr, dtype=np.float64)
    axis = track.axis - (track.rank - arr.ndim)
    if axis < 0 or arr.shape[axis] == 1:
        if arr.size and np.all(arr == arr.reshape(-1)[0]):
            return np.full(track.size, arr.reshape(-1)[0])
        return None
    moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return moved[:, 0].copy()


_UNARY = {
    "Relu": lambda v, n: np.maximum(v, 0),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Sigmoid": lambda v, n: 1 / (1 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "Abs": lambda v, n: np.abs(v),
    "Neg": lambda v, n: -v,
    "Exp": lambda v, n: np.exp(v),
    "LeakyRelu": lambda v, n: np.where(v < 0, node_attr(n, "alpha", 0.01) * v, v),
    "Elu": lambda v, n: np.where(v < 0, node_attr(n, "alpha", 1.0) * (np.exp(v) - 1), v),
    "HardSigmoid": lambda v, n: np.clip(node_attr(n, "alpha", 0.2) * v + node_attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6 + 0.5, 0, 1),
}
_PASS_THROUGH = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "Slice", "Transpose",
                 "Squeeze", "Unsqueeze"}


def _propagate_constants(analysis: ChannelAnalysis, zero: dict[int, set[int]]):
    """Per tracked value, the constant each zero channel carries (NaN: not constant / not a zero channel);
    the (group, channel) pairs that must stay; the bias folds that removing the rest needs."""
    tracks = analysis.tracks
    vals: dict[str, np.ndarray] = {}
    keep: set[tuple[int, int]] = set()
    folds: list = []

    def is_zero(track: Track, p: int) -> tuple[int | None, int, bool]:
        gid, c = _channel_of(track, p)
        return gid, c, gid is not None and c in zero.get(gid, ())

    for node in analysis.nodes:
        op = node.op_type
        x = node.inputs[0] if node.inputs else None
        tx = tracks.get(x.name) if x is not None and x.name in tracks else None
        # consumers: where a zero channel's constant meets a weight
        if tx is not None and op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and not (
            op == "Conv" and node_attr(node, "group", 1) > 1
        ):
            v = vals.get(x.name, np.full(tx.size, np.nan))
            w = constant_array(node.inputs[1])
            for p in range(tx.size):
                gid, c, z = is_zero(tx, p)
                if not z or v[p] == 0:
                    continue
                fold = None if np.isnan(v[p]) else _fold(node, p, v[p], w)
                if fold is None:
                    keep.add((gid, c))
                else:
                    folds.append((fold[0], fold[1], gid, c, fold[2]))
        out = node.outputs[0] if node.outputs else None
        if out is None or out.name not in tracks:
            continue
        t = tracks[out.name]
        depthwise = op == "Conv" and node_attr(node, "group", 1) > 1 and tx is not None
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and not depthwise:
            v = np.full(t.size, np.nan)
            bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            for p in range(t.size):
                if is_zero(t, p)[2]:
                    if bias is None:
                        v[p] = 0.0
                    else:
                        b = np.asarray(bias, dtype=np.float64).reshape(-1)
                        v[p] = (node_attr(node, "beta", 1.0) if op == "Gemm" else 1.0) * (b[p] if b.size > 1 else b[0])
            vals[out.name] = v
            continue
        if op == "Split":
            v = vals.get(x.name, np.full(tx.size, np.nan))
            lo = 0
            for o in node.outputs:
                to = tracks.get(o.name)
                if to is None:
                    continue
                if to.axis == tx.axis and len(node.outputs) > 1 and node_attr(node, "axis", 0) % tx.rank == tx.axis:
                    vals[o.name] = v[lo:lo + to.size]
                    lo += to.size
                else:
                    vals[o.name] = v
            continue
        vals[out.name] = _through(node, op, tracks, vals, t)
    return vals, keep, folds


def _through(node: ir.Node, op: str, tracks, vals, t: Track) -> np.ndarray:
    nan = np.full(t.size, np.nan)
    ins = [(v, tracks.get(v.name) if v is not None else None) for v in node.inputs]
    x = next((i for i, ti in ins if ti is not None), node.inputs[0])  # the first tracked input
    v = vals.get(x.name) if x is not None else None
    if op == "Conv":  # depthwise
        w = constant_array(node.inputs[1]).astype(np.float64)
        b = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        b = np.zeros(t.size) if b is None else np.asarray(b, dtype=np.float64)
        if v is None:
            return nan
        if is_padded(node):
            return np.where(v == 0, b, np.nan)
        return v * w.reshape(t.size, -1).sum(axis=1) + b
    if op in ("Concat", "Split") or op in _UNARY or op in _PASS_THROUGH or op in (
        "BatchNormalization", "InstanceNormalization", "PRelu", "Clip", "AveragePool", "Pad", "Flatten", "Reshape"
    ) or op in ("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean"):
        pass
    else:
        return nan
    if op == "Concat":
        tx = tracks.get(x.name)
        if tx is not None and tx.axis == t.axis and t.size == sum(
            (tracks[i.name].size if i.name in tracks else 0) for i in node.inputs
        ) and all(i.name in tracks for i in node.inputs):
            return np.concatenate([vals.get(i.name, np.full(tracks[i.name].size, np.nan)) for i in node.inputs])
        if t.axis != node_attr(node, "axis", 0) % t.rank:
            return nan
        parts = []
        for i in node.inputs:
            ti = tracks.get(i.name)
            parts.append(vals.get(i.name, np.full(ti.size, np.nan)) if ti is not None else np.full(1, np.nan))
        out = np.concatenate(parts)
        return out if len(out) == t.size else nan
    if v is None:
        return nan
    if op in _UNARY:
        return _UNARY[op](v, node)
    if op in _PASS_THROUGH:
        return v
    if op in ("Flatten", "Reshape"):
        stride = t.size // len(v) if len(v) else 1
        return np.repeat(v, stride)
    if op == "Clip":
        lo = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else node_attr(node, "min", -np.inf)
        hi = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else node_attr(node, "max", np.inf)
        return np.clip(v, float(np.asarray(lo)), float(np.asarray(hi)))
    if op == "BatchNormalization":
        s, bias, mean, var = (np.asarray(constant_array(node.inputs[i]), dtype=np.float64) for i in range(1, 5))
        scale = s / np.sqrt(var + node_attr(node, "epsilon", 1e-5))
        return (v - mean) * scale + bias
    if op == "InstanceNormalization":
        return np.where(np.isnan(v), np.nan, np.asarray(constant_array(node.inputs[2]), dtype=np.float64))
    if op == "PRelu":
        slope = _vector(node.inputs[1], t)
        return nan if slope is None else np.where(v < 0, slope * v, v)
    if op == "AveragePool":
        if is_padded(node) and node_attr(node, "count_include_pad", 0):
            return np.where(v == 0, 0.0, np.nan)
        return v
    if op == "Pad":
        mode = node_attr(node, "mode", "constant")
        if mode != "constant":
            return v
        fill = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        fill = 0.0 if fill is None or np.asarray(fill).size == 0 else float(np.asarray(fill).reshape(-1)[0])
        return np.where(v == fill, v, np.nan)
    # element-wise
    operands = []
    for value, tv in ins:
        if value is None:
            continue
        if tv is not None:
            operands.append(vals.get(value.name, np.full(t.size, np.nan)))
        else:
            vec = _vector(value, t)
            operands.append(np.full(t.size, np.nan) if vec is None else vec)
    if any(len(o) != t.size for o in operands):
        return nan
    with np.errstate(all="ignore"):
        if op == "Add" or op == "Sum":
            return np.sum(operands, axis=0)
        if op == "Sub":
            return operands[0] - operands[1]
        if op == "Mul":
            return operands[0] * operands[1]
        if op == "Div":
            return operands[0] / operands[1]
        if op == "Max":
            return np.max(operands, axis=0)
        if op == "Min":
            return np.min(operands, axis=0)
        if op == "Mean":
            return np.mean(operands, axis=0)
    return nan


def _fold(node: ir.Node, p: int, v: float, w: np.ndarray):
    """Where input position ``p`` carrying the constant ``v`` can be folded: (node, bias input index, contribution)."""
    op = node.op_type
    w = w.astype(np.float64)
    if op == "Conv":
        if is_padded(node):
            return None
        return node, 2, v * w[:, p].reshape(w.shape[0], -1).sum(axis=1)
    if op == "Gemm":
        row = w[:, p] if node_attr(node, "transB", 0) else w[p, :]
        beta = node_attr(node, "beta", 1.0)
        if beta == 0:
            return None
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if c is not None and c.size > 1 and c.ndim == 2 and c.shape[0] != 1:
            return None
        return node, 2, node_attr(node, "alpha", 1.0) * v * row / beta
    if op == "MatMul":
        uses = node.outputs[0].uses()
        if len(uses) != 1 or node.outputs[0].is_graph_output():
            return None
        add = uses[0].node
        if add.op_type != "Add" or len(add.inputs) != 2:
            return None
        other = 1 - uses[0].idx
        c = constant_array(add.inputs[other])
        if c is None or c.ndim > 1 or (c.size not in (1, w.shape[1])):
            return None
        return add, other, v * w[p, :]
    return None


# --- surgery

def _surgery(model: ir.Model, analysis: ChannelAnalysis, plan: dict[int, np.ndarray], folds) -> tuple[int, int]:
    """Remove the planned channels from every member: (parameters removed net, parameters of new biases)."""
    graph = model.graph
    deletions: dict[tuple[ir.Node, int], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    split_removed: dict[ir.Node, set[int]] = defaultdict(set)
    dw_removed: dict[ir.Node, set[int]] = defaultdict(set)
    reshape_removed: dict[ir.Node, set[int]] = defaultdict(set)
    for gid, channels in plan.items():
        for m in analysis.groups[gid].members:
            pos = m.positions(channels)
            if len(pos) == 0:
                continue
            if m.role == "split":
                split_removed[m.node].update(pos.tolist())
            elif m.role == "reshape":
                reshape_removed[m.node].update(pos.tolist())
            else:
                deletions[(m.node, m.index)][m.axis].update(pos.tolist())
                if m.role == "dw" and m.index == 1:
                    dw_removed[m.node].update(pos.tolist())
    if not plan:
        return 0, 0
    names = NameScope(graph)
    # Parameters removed, counted as the model holds them: a tensor that two nodes share (after
    # share-init, or two BatchNormalizations with equal shifts merged by simplify) is freed once,
    # when its last reader has its own pruned copy, and every copy written counts.
    replaced: dict[int, tuple[ir.Value, int]] = {}
    written = 0
    created: list[int] = []  # sizes of the biases that folded constants needed
    for node, index in dict.fromkeys(list(folds) + list(deletions)):
        old = node.inputs[index] if index < len(node.inputs) else None
        arr = constant_array(old) if old is not None else None
        new = arr
        contribution = folds.get((node, index))
        if contribution is not None:  # a zero channel's constant, folded into this bias
            base = np.zeros(np.shape(contribution)) if arr is None else arr.astype(np.float64)
            shape = np.broadcast_shapes(base.shape, np.shape(contribution))
            dtype = arr.dtype if arr is not None else np.dtype(np.float32)
            new = (np.broadcast_to(base, shape) + np.broadcast_to(contribution, shape)).astype(dtype)
        for axis, positions in deletions.get((node, index), {}).items():
            new = np.delete(new, sorted(positions), axis=axis)
        if arr is None:  # a new bias: it loses the output channels the weight loses
            out_axis = (0 if node_attr(node, "transB", 0) else 1) if node.op_type == "Gemm" else 0
            positions = deletions.get((node, 1), {}).get(out_axis)
            if positions:
                new = np.delete(new, sorted(positions), axis=0)
        if arr is not None:
            replaced[id(old)] = (old, arr.size)
        written += new.size
        if arr is None:
            created.append(new.size)
        replace_weight(graph, node, index, np.ascontiguousarray(new), "pruned", names)
    removed_params = sum(size for old, size in replaced.values() if not old.uses()) - written
    for node, positions in dw_removed.items():
        node.attributes["group"] = ir.AttrInt64("group", node_attr(node, "group", 1) - len(positions))
    for node, positions in split_removed.items():
        _resplit(graph, node, positions, analysis, names)
    for node, positions in reshape_removed.items():
        target = [int(x) for x in constant_array(node.inputs[1]).reshape(-1)]
        target[1] -= len(positions)
        replace_weight(graph, node, 1, np.asarray(target, dtype=np.int64), "pruned", names)
    produced = {out.name: out for node in graph for out in node.outputs}
    for name in analysis.tracks:
        value = produced.get(name)
        if value is not None and not value.is_graph_output():
            value.shape = None  # stale: the channel count changed
    return removed_params, sum(created)


def _resplit(graph: ir.Graph, node: ir.Node, positions: set[int], analysis: ChannelAnalysis, names: NameScope) -> None:
    sizes = [analysis.tracks[out.name].size for out in node.outputs]
    new, lo = [], 0
    for size in sizes:
        new.append(size - sum(lo <= p < lo + size for p in positions))
        lo += size
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", new)
        return
    node.attributes.pop("num_outputs", None)
    replace_weight(graph, node, 1, np.asarray(new, dtype=np.int64), "pruned", names)

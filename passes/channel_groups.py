"""Channel groups: which output channels of which layers must be pruned together (analysis only, no surgery).

A *producer* (Conv, ConvTranspose with group 1, Gemm, MatMul with a constant weight) opens a channel
space of C channels. Its indices are followed through every op that keeps them (BatchNormalization,
activations, pooling, Pad, Resize, Slice/Split on other axes, element-wise ops with constant
operands, depthwise Conv, Transpose, Squeeze/Unsqueeze) to every consumer (the input channels of a
Conv, Gemm or MatMul). Spaces that meet in an element-wise op (Add, Sum, Mul, Sub, ...) are coupled:
one index set for all of them. Concat on the channel axis places its inputs' channels at offsets;
Split on the channel axis takes ranges; Flatten (or a 2-D Reshape) before a Gemm/MatMul maps channel
``c`` to features ``[c*s, (c+1)*s)``.

A *group* is a set of coupled spaces with its *members*: every tensor slice that removing channel
``c`` of the group removes (``positions(c)``). A group that reaches a graph output, a Reshape that
mixes channels (ShuffleNet's channel shuffle), a grouped Conv, or an op this analysis does not know
is unprunable, with the reason.
"""

from __future__ import annotations

__all__ = [
    "ChannelGroup", "Member", "Probe", "ChannelAnalysis", "Seg", "Track", "analyze", "find_channel_groups", "explain",
    "node_attr", "is_padded",
]

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.passes._base import constant_array

logger = logging.getLogger(__name__)

# Ops that apply a per-element function: channel indices pass through unchanged.
UNARY_KEEPERS = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Gelu", "Erf", "Exp", "Abs", "Neg", "Sqrt", "Softplus", "Softsign", "Mish", "Identity", "Dropout",
    "Cast", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Log", "Sin", "Cos",
}
SPATIAL_KEEPERS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"}


@dataclass(frozen=True)
class Seg:
    """Channels ``[start, start+length)`` of space ``space`` (None: channels of no space) sit at
    positions ``offset + (c - start) * stride + [0, stride)`` of a tensor axis."""

    space: int | None
    start: int
    length: int
    offset: int
    stride: int = 1


@dataclass(frozen=True)
class Track:
    """How a value's channel axis is laid out: ``axis`` (of ``rank``) made of ``segs``."""

    axis: int
    rank: int
    segs: tuple[Seg, ...]

    @property
    def size(self) -> int:
        return sum(s.length * s.stride for s in self.segs)


@dataclass
class Member:
    """One tensor slice a group's channel removal touches.

    ``role``: ``out`` (a producer's weight/bias output axis), ``in`` (a consumer's weight input axis),
    ``param`` (a per-channel parameter: BatchNormalization, PRelu slope, a constant operand),
    ``dw`` (a depthwise Conv's weight/bias; its ``group`` shrinks), ``split`` (Split sizes),
    ``reshape`` (a flattening Reshape's shape).
    """

    node: ir.Node
    role: str
    index: int | None
    axis: int
    start: int
    length: int
    offset: int = 0
    stride: int = 1

    def positions(self, channels) -> np.ndarray:
        """Positions along ``axis`` that the group's ``channels`` occupy in this member."""
        c = np.asarray(sorted(channels), dtype=np.int64)
        c = c[(c >= self.start) & (c < self.start + self.length)]
        base = self.offset + (c - self.start) * self.stride
        return (base[:, None] + np.arange(self.stride)[None, :]).reshape(-1)

    def describe(self) -> str:
        where = f"{self.node.op_type} '{self.node.name}'"
        extra = ""
        if self.start or self.offset or self.stride != 1:
            extra = f" [channels {self.start}..{self.start + self.length} at {self.offset}" + (
                f", x{self.stride}]" if self.stride != 1 else "]")
        idx = "" if self.index is None else f" input {self.index} axis {self.axis}"
        return f"{self.role:7s} {where}{idx}{extra}"


@dataclass
class Probe:
    """A value whose channel axis a consumer reads: where activation statistics are taken."""

    value: str
    axis: int
    offset: int
    start: int
    length: int
    stride: int


@dataclass
class ChannelGroup:
    """Coupled channels: removing channel ``c`` removes ``m.positions([c])`` from every member ``m``."""

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    first: bool = False  # a producer reads the graph's inputs directly (the first layer)
    probes: list[Probe] = field(default_factory=list)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out"]

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"UNPRUNABLE: {self.reason}"
        if self.prunable and self.first:
            state += " (first layer: protected by default)"
        names = ", ".join(dict.fromkeys(m.node.name or m.node.op_type for m in self.producers))
        lines = [f"group {self.id}: {self.size} channels, {len(self.members)} members, {state}; producers: {names}"]
        lines += [f"    {m.describe()}" for m in self.members]
        return "\n".join(lines)


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    tracks: dict[str, Track]  # value name -> layout, with group ids in place of space ids
    nodes: list[ir.Node]  # main-graph nodes in order


class _Fail(Exception):
    pass


def node_attr(node: ir.Node, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    if a is None:
        return default
    return a.value


def _const_ints(value: ir.Value | None) -> list[int] | None:
    arr = constant_array(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def is_padded(node: ir.Node) -> bool:
    """Whether a Conv (or pool) pads its input with zeros."""
    auto_pad = node_attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(p != 0 for p in (node_attr(node, "pads", None) or []))


class _Analyzer:
    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.parent: list[int] = []
        self.space_size: list[int] = []
        self.reason: dict[int, list[str]] = {}
        self.first: set[int] = set()
        self.members: dict[int, list[Member]] = {}
        self.probes: dict[int, list[Probe]] = {}
        self.tracks: dict[ir.Value, Track] = {}
        self.derived: set[ir.Value] = set()  # values downstream of some producer
        self.model = model
        self._shapes: dict[str, tuple] | None = None

    @property
    def shapes(self) -> dict[str, tuple]:
        if self._shapes is None:  # shape inference only when a shape is not recorded
            self._shapes = _inferred_shapes(self.model)
        return self._shapes

    def shape_of(self, value: ir.Value):
        if value.shape is not None:
            return tuple(value.shape.dims)
        return self.shapes.get(value.name)

    # union-find over spaces
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        for why in self.reason.pop(hi, []):
            if why not in self.reason.setdefault(lo, []):
                self.reason[lo].append(why)
        if hi in self.first:
            self.first.add(lo)

    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.space_size.append(size)
        return len(self.parent) - 1

    def fail(self, track: Track | None, why: str) -> None:
        if track is None:
            return
        for seg in track.segs:
            if seg.space is not None:
                reasons = self.reason.setdefault(self.find(seg.space), [])
                if why not in reasons:
                    reasons.append(why)

    def add_member(self, seg: Seg, member: Member) -> None:
        self.members.setdefault(seg.space, []).append(member)

    def rank(self, value: ir.Value) -> int | None:
        shape = self.shape_of(value)
        return None if shape is None else len(shape)

    def static_shape(self, value: ir.Value):
        shape = self.shape_of(value)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return shape

    # --- the walk
    def run(self) -> ChannelAnalysis:
        nodes = list(self.graph)
        for node in nodes:
            tracked = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in self.tracks]
            if any(v in self.derived for v in node.inputs if v is not None):
                self.derived.update(node.outputs)
            try:
                self.visit(node, tracked)
            except _Fail as exc:
                for _, v in tracked:
                    self.fail(self.tracks[v], str(exc))
            for out in node.outputs:
                if out in self.tracks:
                    self.derived.add(out)
        # values read inside subgraphs or returned by the graph
        for value, track in self.tracks.items():
            if value.is_graph_output():
                self.fail(track, f"reaches the graph output '{value.name}'")
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.fail(track, f"read inside a subgraph of '{use.node.name}'")
        return self.collect(nodes)

    def collect(self, nodes) -> ChannelAnalysis:
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        ids = {r: i for i, r in enumerate(roots)}
        groups = [ChannelGroup(id=ids[r], size=self.space_size[r]) for r in roots]
        for space, members in self.members.items():
            groups[ids[self.find(space)]].members.extend(members)
        for space, probes in self.probes.items():
            groups[ids[self.find(space)]].probes.extend(probes)
        for r in roots:
            g = groups[ids[r]]
            if r in self.reason:
                reasons = self.reason[r]
                more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
                g.prunable, g.reason = False, "; ".join(reasons[:3]) + more
            g.first = r in self.first
        tracks = {}
        for value, t in self.tracks.items():
            segs = tuple(
                Seg(None if s.space is None else ids[self.find(s.space)], s.start, s.length, s.offset, s.stride) for s in t.segs
            )
            tracks[value.name] = Track(t.axis, t.rank, segs)
        return ChannelAnalysis(groups, tracks, nodes)

    def open_space(self, node: ir.Node, size: int, members: list[tuple[int, int]], out_axis: int, rank: int, data: ir.Value,
                   refuse: str | None = None):
        space = self.new_space(size)
        if refuse:
            self.reason[space] = [refuse]
        seg = Seg(space, 0, size, 0)
        for index, axis in members:
            self.add_member(seg, Member(node, "out", index, axis, 0, size))
        if data not in self.derived:
            self.first.add(space)
        self.tracks[node.outputs[0]] = Track(out_axis, rank, (seg,))

    def consume(self, node: ir.Node, track: Track, value: ir.Value, index: int, axis: int, stride: int = 1) -> None:
        for seg in track.segs:
            if seg.space is None:
                continue
            s = seg.stride * stride
            self.add_member(seg, Member(node, "in", index, axis, seg.start, seg.length, seg.offset * stride, s))
            self.probes.setdefault(seg.space, []).append(
                Probe(value.name, track.axis, seg.offset * stride, seg.start, seg.length, s)
            )

    def visit(self, node: ir.Node, tracked) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            if tracked:
                raise _Fail(f"{node.domain}.{op} '{node.name}' is not understood")
            return
        t0 = self.tracks[tracked[0][1]] if tracked else None
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            self.visit_linear(node, tracked)
            return
        if not tracked:
            return
        out = node.outputs[0] if node.outputs else None
        if op in UNARY_KEEPERS or op in ("BatchNormalization", "InstanceNormalization", "PRelu"):
            if len(tracked) != 1 or tracked[0][0] != 0:
                raise _Fail(f"{op} '{node.name}' reads channels as a parameter")
            if op in ("BatchNormalization", "InstanceNormalization"):
                if t0.axis != 1:
                    raise _Fail(f"{op} '{node.name}' normalizes another axis")
                for i in range(1, 5 if op == "BatchNormalization" else 3):
                    self.param(node, t0, i, 0, rank_aligned=False)
            elif op == "PRelu":
                self.param(node, t0, 1, None, rank_aligned=True)
            elif op == "Clip":
                for i in (1, 2):
                    if i < len(node.inputs) and node.inputs[i] is not None and constant_array(node.inputs[i]) is None:
                        raise _Fail(f"Clip '{node.name}' has non-constant bounds")
            self.tracks[out] = t0
            return
        if op in SPATIAL_KEEPERS:
            if t0.axis != 1:
                raise _Fail(f"{op} '{node.name}' pools over the channel axis")
            self.tracks[out] = t0
            return
        if op in BINARY:
            self.visit_binary(node, tracked)
            return
        if op == "Concat":
            self.visit_concat(node, tracked)
            return
        if op == "Split":
            self.visit_split(node, t0)
            return
        if op == "Pad":
            pads = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if pads is None:
                raise _Fail(f"Pad '{node.name}' has non-constant pads")
            axes = axes if axes is not None else list(range(len(pads) // 2))
            axes = [a % t0.rank for a in axes]
            if t0.axis in axes:
                k = axes.index(t0.axis)
                if pads[k] or pads[k + len(axes)]:
                    raise _Fail(f"Pad '{node.name}' pads the channel axis")
            self.tracks[out] = t0
            return
        if op in ("Resize", "Upsample"):
            scales_index = 2 if op == "Resize" else 1
            scales = constant_array(node.inputs[scales_index]) if len(node.inputs) > scales_index and node.inputs[scales_index] is not None else None
            if scales is None or scales.size == 0 or float(np.asarray(scales).reshape(-1)[t0.axis]) != 1.0:
                raise _Fail(f"{op} '{node.name}' has no constant scales keeping the channel axis")
            self.tracks[out] = t0
            return
        if op == "Slice":
            starts = _const_ints(node.inputs[1])
            axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if starts is None:
                raise _Fail(f"Slice '{node.name}' has non-constant starts")
            axes = [a % t0.rank for a in (axes if axes is not None else range(len(starts)))]
            if t0.axis in axes:
                raise _Fail(f"Slice '{node.name}' slices the channel axis")
            self.tracks[out] = t0
            return
        if op == "Transpose":
            perm = node_attr(node, "perm") or list(reversed(range(t0.rank)))
            self.tracks[out] = Track(list(perm).index(t0.axis), t0.rank, t0.segs)
            return
        if op in ("Squeeze", "Unsqueeze"):
            axes = node_attr(node, "axes")
            if axes is None and len(node.inputs) > 1:
                axes = _const_ints(node.inputs[1])
            if axes is None:
                raise _Fail(f"{op} '{node.name}' has unknown axes")
            if op == "Squeeze":
                axes = sorted(a % t0.rank for a in axes)
                if t0.axis in axes:
                    raise _Fail(f"Squeeze '{node.name}' removes the channel axis")
                self.tracks[out] = Track(t0.axis - sum(a < t0.axis for a in axes), t0.rank - len(axes), t0.segs)
            else:
                new_rank = t0.rank + len(axes)
                axes = sorted(a % new_rank for a in axes)
                axis = t0.axis
                for a in axes:
                    if a <= axis:
                        axis += 1
                self.tracks[out] = Track(axis, new_rank, t0.segs)
            return
        if op in ("Flatten", "Reshape"):
            self.visit_flatten(node, t0)
            return
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            axis = node_attr(node, "axis", -1) % t0.rank
            if axis == t0.axis:
                raise _Fail(f"{op} '{node.name}' normalizes over the channel axis")
            self.tracks[out] = t0
            return
        if op == "Shape":
            raise _Fail(f"Shape '{node.name}' reads the channel count")
        if op == "LRN":
            raise _Fail(f"LRN '{node.name}' mixes neighbouring channels")
        if op == "Gather" and node.inputs[0] is not None and node.inputs[0] in self.tracks:
            if node_attr(node, "axis", 0) % t0.rank == t0.axis:
                raise _Fail(f"Gather '{node.name}' mixes channels (a channel shuffle or selection)")
        raise _Fail(f"{op} '{node.name}' is not understood")

    def param(self, node: ir.Node, track: Track, index: int, axis: int | None, rank_aligned: bool) -> None:
        """A per-channel constant input of a keeper: sliced along the channel axis if it has one."""
        if index >= len(node.inputs) or node.inputs[index] is None:
            return
        value = node.inputs[index]
        arr = constant_array(value)
        if arr is None:
            raise _Fail(f"{node.op_type} '{node.name}' input '{value.name}' is not a constant")
        if axis is None:  # broadcast against the tracked value
            axis = track.axis - (track.rank - arr.ndim)
            if axis < 0 or arr.shape[axis] == 1:
                return
        if arr.shape[axis] != track.size:
            raise _Fail(f"{node.op_type} '{node.name}' parameter '{value.name}' has {arr.shape[axis]} channels, not {track.size}")
        for seg in track.segs:
            if seg.space is not None:
                self.add_member(seg, Member(node, "param", index, axis, seg.start, seg.length, seg.offset, seg.stride))

    def visit_linear(self, node: ir.Node, tracked) -> None:
        op = node.op_type
        x = node.inputs[0]
        t = self.tracks.get(x)
        for i, v in tracked:
            if i != 0:
                raise _Fail(f"{op} '{node.name}' reads channels as its weight")
        w_value = node.inputs[1] if len(node.inputs) > 1 else None
        w = constant_array(w_value)
        if w is None:
            if t is not None:
                raise _Fail(f"{op} '{node.name}' has a non-constant weight")
            return
        if op in ("Conv", "ConvTranspose"):
            group = node_attr(node, "group", 1)
            rank = w.ndim
            if op == "Conv" and group > 1:
                c_in = w.shape[1] * group
                if group == c_in and w.shape[0] == group and t is not None and t.axis == 1 and t.size == c_in:
                    for seg in t.segs:
                        if seg.space is not None:
                            self.add_member(seg, Member(node, "dw", 1, 0, seg.start, seg.length, seg.offset, seg.stride))
                            if len(node.inputs) > 2 and node.inputs[2] is not None:
                                self.add_member(seg, Member(node, "dw", 2, 0, seg.start, seg.length, seg.offset, seg.stride))
                    self.tracks[node.outputs[0]] = t
                    return
                why = f"grouped Conv '{node.name}' (group={group}) is not pruned"
                if t is not None:
                    self.fail(t, why)
                self.open_space(node, w.shape[0], [], 1, rank, x, refuse=why)
                return
            if group != 1:
                if t is not None:
                    raise _Fail(f"grouped ConvTranspose '{node.name}' reads these channels")
                return
            in_axis, out_axis = (1, 0) if op == "Conv" else (0, 1)
            if t is not None:
                if t.axis != 1 or t.size != w.shape[in_axis]:
                    raise _Fail(f"{op} '{node.name}' reads another axis")
                self.consume(node, t, x, 1, in_axis)
            members = [(1, out_axis)]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if constant_array(node.inputs[2]) is None:
                    return
                members.append((2, 0))
            self.open_space(node, w.shape[out_axis], members, 1, rank, x)
            return
        # Gemm / MatMul
        if w.ndim != 2:
            if t is not None:
                raise _Fail(f"{op} '{node.name}' has a {w.ndim}-D weight")
            return
        if op == "Gemm":
            trans_a, trans_b = node_attr(node, "transA", 0), node_attr(node, "transB", 0)
            in_axis, out_axis = (1, 0) if trans_b else (0, 1)
            rank = 2
            if t is not None:
                if trans_a or t.axis != 1:
                    raise _Fail(f"Gemm '{node.name}' reads channels on another axis (transA)")
        else:
            in_axis, out_axis = 0, 1
            rank = self.rank(x)
            if t is not None and (t.axis != t.rank - 1):
                raise _Fail(f"MatMul '{node.name}' reads channels on another axis")
            if rank is None:
                if t is not None:
                    raise _Fail(f"MatMul '{node.name}' input has unknown rank")
                return
        if t is not None:
            if t.size != w.shape[in_axis]:
                raise _Fail(f"{op} '{node.name}' reads {w.shape[in_axis]} features, its input has {t.size}")
            self.consume(node, t, x, 1, in_axis)
        members = [(1, out_axis)]
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            if c is None:
                return
            if c.size > 1:
                if c.ndim == 0 or c.shape[-1] != w.shape[out_axis] or math.prod(c.shape[:-1]) != 1:
                    return
                members.append((2, c.ndim - 1))
        self.open_space(node, w.shape[out_axis], members, rank - 1, rank, x)

    def visit_binary(self, node: ir.Node, tracked) -> None:
        out = node.outputs[0]
        tracks = [self.tracks[v] for _, v in tracked]
        rank = max(t.rank for t in tracks)
        from_right = {t.rank - t.axis for t in tracks}
        if len(from_right) != 1:
            raise _Fail(f"{node.op_type} '{node.name}' meets channels on different axes")
        base = max(tracks, key=lambda t: t.rank)
        for t in tracks[1:]:
            self.couple(tracks[0], t, node)
        result = Track(rank - from_right.pop(), rank, base.segs)
        for i, v in enumerate(node.inputs):
            if v is None or v in self.tracks:
                continue
            arr = constant_array(v)
            if arr is None:
                shape = self.static_shape(v)
                axis = result.axis - (rank - len(shape)) if shape is not None else None
                if shape is not None and (axis < 0 or shape[axis] == 1):
                    continue
                raise _Fail(f"{node.op_type} '{node.name}' operand '{v.name}' is not a constant")
            self.param(node, result, i, None, rank_aligned=True)
        self.tracks[out] = result

    def couple(self, a: Track, b: Track, node: ir.Node) -> None:
        if a.segs == b.segs:
            return
        if len(a.segs) != len(b.segs):
            raise _Fail(f"{node.op_type} '{node.name}' meets channels laid out differently")
        for sa, sb in zip(a.segs, b.segs):
            ok = (
                sa.space is not None and sb.space is not None and sa.offset == sb.offset and sa.stride == sb.stride
                and sa.length == sb.length and sa.start == sb.start == 0
                and self.space_size[sa.space] == self.space_size[sb.space] == sa.length
            )
            if not ok and sa != sb:
                raise _Fail(f"{node.op_type} '{node.name}' meets partial channel ranges")
            if ok:
                self.union(sa.space, sb.space)

    def visit_concat(self, node: ir.Node, tracked) -> None:
        t0 = self.tracks[tracked[0][1]]
        rank = t0.rank
        axis = node_attr(node, "axis", 0) % rank
        if axis != t0.axis:
            tracks = [self.tracks[v] for _, v in tracked]
            for t in tracks[1:]:
                self.couple(t0, t, node)
            if len(tracked) != len(node.inputs):
                raise _Fail(f"Concat '{node.name}' joins tracked channels with other values on another axis")
            self.tracks[node.outputs[0]] = t0
            return
        segs, offset = [], 0
        for v in node.inputs:
            t = self.tracks.get(v)
            if t is None:
                shape = self.static_shape(v)
                if shape is None:
                    raise _Fail(f"Concat '{node.name}' input '{v.name}' has an unknown channel count")
                segs.append(Seg(None, 0, shape[axis], offset))
                offset += shape[axis]
                continue
            if t.axis != axis:
                raise _Fail(f"Concat '{node.name}' inputs have channels on different axes")
            for s in t.segs:
                segs.append(Seg(s.space, s.start, s.length, s.offset + offset, s.stride))
            offset += t.size
        self.tracks[node.outputs[0]] = Track(axis, rank, tuple(segs))

    def visit_split(self, node: ir.Node, t0: Track) -> None:
        axis = node_attr(node, "axis", 0) % t0.rank
        if axis != t0.axis:
            for out in node.outputs:
                self.tracks[out] = t0
            return
        sizes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else node_attr(node, "split")
        if sizes is None:
            n = len(node.outputs)
            if t0.size % n:
                raise _Fail(f"Split '{node.name}' splits unevenly")
            sizes = [t0.size // n] * n
        if any(s.stride != 1 for s in t0.segs):
            raise _Fail(f"Split '{node.name}' splits flattened features")
        lo = 0
        for out, size in zip(node.outputs, sizes):
            hi = lo + size
            segs = []
            for s in t0.segs:
                a, b = max(lo, s.offset), min(hi, s.offset + s.length)
                if a < b:
                    segs.append(Seg(s.space, s.start + a - s.offset, b - a, a - lo))
            self.tracks[out] = Track(axis, t0.rank, tuple(segs))
            lo = hi
        for s in t0.segs:
            if s.space is not None:
                self.add_member(s, Member(node, "split", None, axis, s.start, s.length, s.offset, 1))

    def visit_flatten(self, node: ir.Node, t0: Track) -> None:
        out = node.outputs[0]
        if t0.axis != 1 or any(s.stride != 1 for s in t0.segs):
            raise _Fail(f"{node.op_type} '{node.name}' reshapes channels that are not on axis 1")
        if node.op_type == "Flatten":
            if node_attr(node, "axis", 1) != 1:
                raise _Fail(f"Flatten '{node.name}' does not flatten from axis 1")
        else:
            shape = _const_ints(node.inputs[1])
            if shape is None or len(shape) != 2:
                raise _Fail(f"Reshape '{node.name}' mixes channels (its target shape is not a constant 2-D flattening)")
        in_shape = self.shape_of(node.inputs[0])
        if in_shape is None or not all(isinstance(d, int) for d in in_shape[2:]):
            raise _Fail(f"{node.op_type} '{node.name}' input has unknown spatial dims")
        spatial = math.prod(in_shape[2:])
        if node.op_type == "Reshape":
            target = _const_ints(node.inputs[1])
            features = t0.size * spatial
            if target[1] not in (-1, features) or target[0] not in (-1, 0, in_shape[0]):
                raise _Fail(f"Reshape '{node.name}' mixes channels (target {target})")
            if target[1] != -1:
                for s in t0.segs:
                    if s.space is not None:
                        self.add_member(s, Member(node, "reshape", 1, 0, s.start, s.length, s.offset * spatial, spatial))
        segs = tuple(Seg(s.space, s.start, s.length, s.offset * spatial, spatial) for s in t0.segs)
        self.tracks[out] = Track(1, 2, segs)


def _inferred_shapes(model: ir.Model) -> dict[str, tuple]:
    """Value shapes from onnx shape inference on a copy (the model is not touched)."""
    import onnx

    shapes: dict[str, tuple] = {}
    try:
        proto = ir.serde.serialize_model(model)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim)
            shapes[vi.name] = dims
    except Exception as exc:  # best effort: values keep their recorded shapes
        logger.debug("shape inference failed: %s", exc)
    return shapes


def analyze(model: ir.Model) -> ChannelAnalysis:
    """Channel groups of the main graph, with each tracked value's layout (for the pruning pass)."""
    return _Analyzer(model).run()


def find_channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """Every channel group of the main graph: members, index mapping, size, prunable flag and reason."""
    return analyze(model).groups


def explain(groups: list[ChannelGroup]) -> str:
    """The plan in words: one paragraph per group."""
    prunable = [g for g in groups if g.prunable]
    head = f"{len(groups)} channel groups, {len(prunable)} prunable ({sum(g.size for g in prunable)} of {sum(g.size for g in groups)} channels)"
    return "\n".join([head, *(g.describe() for g in groups)])

"""Synthetic inputs that a model can run: sizes and values read from what the graph itself says.

Without ``--data`` a model is validated on made-up inputs; made up blindly (every dynamic dim 1,
random integers) they are often inputs no real caller sends: token-type ids past a 2-row table, an
image of 1x1 pixels that a detector's Resize refuses, an audio chunk of 1 sample that an STFT's
reflect padding refuses, a sample rate the graph's ``If`` does not know. This module reads the graph:

- an integer input that reaches a ``Gather``'s indices (directly or through Cast, Reshape,
  Unsqueeze, Slice, Add of a constant …) is drawn inside ``[0, rows)`` of the table it indexes;
- an input named like a mask, or used like one (Cast to bool, a ``Where`` condition, ``1 - mask``),
  is 0/1: ones, with the tail of the rows after the first masked out;
- a scalar input that the graph compares with constants (``Equal``/``Less``/``Greater``, also
  inside ``If`` branches) is tried with those constants (silero-vad's ``sr``: 16000);
- each dynamic dim gets a kind (batch, spatial, audio, sequence, other) from its name and place,
  and a short ladder of common sizes; ``search`` tries the ladders step by step (batch 2, then 1)
  on the ORIGINAL model under onnxruntime, one session for all tries, and keeps the first feed that
  runs with finite outputs. Size 1 is tried last only: models rarely run, or mean anything, there.

Dims named alike in several inputs stay equal; an unnamed dynamic dim of an input whose other dims
are fixed (an RNN state ``[2, ?, 128]``) is a batch dim and takes the batch size. ``--dim`` sizes
always win. Float values: images uniform in [0, 1), audio of small amplitude, states small, the
rest standard normal; one fixed seed, so a run is reproducible.
"""

from __future__ import annotations

__all__ = ["InputHints", "DimVar", "analyze", "dim_vars", "make_feed", "search", "runnable_synthetic_data"]

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.data import SYNTHETIC_LIMIT, Dataset, InputSpec, check_dim_names, input_specs, synthetic_data
from onnxopt.errors import DataError, OnnxoptError, one_line
from onnxopt.runtime import ModelSnapshot, run_session

LADDERS = {
    "spatial": (32, 64, 224, 256, 320, 640),
    "audio": (512, 1600, 16000),
    "sequence": (16, 128),
    "other": (16, 32, 64, 128),
}
BATCH_SIZES = (2, 1)
# A batch of 2 shows batch bugs; past this many bytes of inputs it is not worth the time.
CHEAP_BYTES = 64 * 2**20
MAX_SCALAR_COMBOS = 6

# Ops a value passes through unchanged in kind: an index stays an index, a mask a mask.
_FLOW = {"Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Slice", "Flatten", "Identity", "Expand",
         "Transpose", "Concat", "Tile", "Gather", "GatherElements", "Split", "Clip", "Abs"}
_COMPARE = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
_BATCH_NAME = re.compile(r"(^|[^a-z])(batch|bs|n|b|num_?batch)([^a-z]|$)|batch", re.I)
_AUDIO_NAME = re.compile(r"sample|audio|wav|pcm|signal|waveform", re.I)
_SEQ_NAME = re.compile(r"seq|sequence|token|len|length|time|frame|step|^[stl]$|^(num_)?words?$", re.I)
_MASK_NAME = re.compile(r"mask", re.I)
_STATE_NAME = re.compile(r"state|hidden|cache|past|memory|^[hc]\d*$|^(h|c)_", re.I)


@dataclass
class InputHints:
    """What the graph says of one input's values."""

    rows: int | None = None              # values must lie in [0, rows): the table it indexes
    mask: bool = False                   # 0/1
    constants: list = field(default_factory=list)  # what a scalar is compared with
    why: str = ""                        # for the report


@dataclass
class DimVar:
    """One dynamic size to choose: a named dim (shared by every input that names it) or an unnamed one."""

    key: str                 # the dim's name, or "input[axis]" when unnamed
    kind: str                # batch, spatial, audio, sequence, other
    named: bool
    where: list[tuple[str, int]] = field(default_factory=list)


# -- reading the graph ----------------------------------------------------------------------------


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:  # noqa: BLE001 - an unreadable tensor is simply not a known constant
            return None
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        for name, attr in node.attributes.items():
            if name == "value":
                return attr.value.numpy()
            if name in ("value_int", "value_float", "value_ints", "value_floats"):
                return np.asarray(attr.value)
    return None


def _consumers(model: ir.Model) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
    """Every use of every value, subgraphs included (an ``If`` branch reads outer values directly)."""
    uses: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for i, value in enumerate(node.inputs):
            if value is not None:
                uses.setdefault(value, []).append((node, i))
    return uses


def _reach(start: ir.Value, uses) -> list[tuple[ir.Node, int, int]]:
    """The uses that ``start``'s values reach through ops that keep them what they are: (node, input
    index, constant added on the way)."""
    found, seen, todo = [], set(), [(start, 0)]
    while todo and len(seen) < 2000:
        value, offset = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for node, i in uses.get(value, ()):
            found.append((node, i, offset))
            op = node.op_type
            if op in _FLOW and (i == 0 or op == "Concat"):
                todo += [(out, offset) for out in node.outputs]
            elif op in ("Add", "Sub") and len(node.inputs) == 2:
                other = _constant(node.inputs[1 - i])
                if other is not None and other.size == 1 and np.issubdtype(other.dtype, np.integer):
                    c = int(other.reshape(()))
                    shift = c if op == "Add" else (-c if i == 0 else None)
                    if shift is not None:
                        todo += [(out, offset + shift) for out in node.outputs]
    return found


def _table_rows(node: ir.Node) -> int | None:
    """Rows along the gathered axis of a Gather's data, when known."""
    data = node.inputs[0]
    axis = node.attributes.get("axis")
    axis = int(axis.value) if axis is not None else 0
    shape = data.shape if data is not None else None
    if shape is None or not len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else None


def analyze(model: ir.Model) -> dict[str, InputHints]:
    """What the graph says of each input's values: table bounds, masks, constants compared with."""
    uses = _consumers(model)
    hints: dict[str, InputHints] = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        h = InputHints(mask=bool(_MASK_NAME.search(value.name or "")))
        h.why = "named like a mask" if h.mask else ""
        for node, i, offset in _reach(value, uses):
            op = node.op_type
            if op == "Gather" and i == 1:
                rows = _table_rows(node)
                if rows is not None and rows - offset > 0 and (h.rows is None or rows - offset < h.rows):
                    h.rows = rows - offset
            elif not h.mask and ((op == "Cast" and node.attributes.get("to") is not None
                                  and node.attributes["to"].value == ir.DataType.BOOL)
                                 or (op == "Where" and i == 0) or op in ("Not", "And", "Or", "Xor")
                                 or (op == "Sub" and i == 1 and _is_one(_constant(node.inputs[0])))):
                h.mask, h.why = True, f"used like a mask ({op})"
            elif op in _COMPARE and len(node.inputs) == 2:
                c = _constant(node.inputs[1 - i])
                if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.number):
                    c = c.reshape(()).item()
                    if c not in h.constants:
                        h.constants.append(c)
        hints[value.name] = h
    return hints


def _is_one(c: np.ndarray | None) -> bool:
    return c is not None and c.size == 1 and float(c.reshape(())) == 1.0


def _dim_kind(spec: InputSpec, axis: int, name: str | None) -> str:
    shape = spec.shape or ()
    rank = len(shape)
    floating = np.issubdtype(spec.dtype, np.floating)
    fixed_elsewhere = all(isinstance(d, int) for j, d in enumerate(shape) if j != axis)
    if name and _BATCH_NAME.search(name):
        return "batch"
    if floating and ((rank <= 2 and axis == rank - 1 and axis > 0) or (name and _AUDIO_NAME.search(name))):
        return "audio"
    if name and _SEQ_NAME.search(name):
        return "sequence"
    if floating and rank == 4 and axis >= 1:
        channels_last = isinstance(shape[3], int) and shape[3] <= 4
        if (axis in (2, 3) and not channels_last) or (axis in (1, 2) and channels_last):
            return "spatial"
    if axis == 0 and rank >= 2:
        return "batch"
    if not name and fixed_elsewhere and rank >= 2:
        return "batch"  # an RNN state [2, ?, 128]: its unnamed dim is the batch
    if floating and rank == 1:
        return "audio"
    if not floating or rank == 3:
        return "sequence"
    return "other"


def dim_vars(specs: list[InputSpec]) -> list[DimVar]:
    """The dynamic sizes to choose, one per dim name (shared across inputs) or unnamed dim."""
    found: dict[str, DimVar] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, int):
                continue
            key = dim if isinstance(dim, str) else f"{spec.name}[{axis}]"
            var = found.get(key)
            if var is None:
                var = found[key] = DimVar(key, _dim_kind(spec, axis, dim), isinstance(dim, str))
            var.where.append((spec.name, axis))
    return list(found.values())


# -- making a feed --------------------------------------------------------------------------------


def _float_kind(spec: InputSpec, kinds: dict[int, str]) -> str:
    shape = spec.shape or ()
    if "spatial" in kinds.values() or (len(shape) == 4 and shape[1] in (1, 3)):
        return "image"
    if "audio" in kinds.values():
        return "audio"
    if _STATE_NAME.search(spec.name):
        return "state"
    return "normal"


def make_feed(specs: list[InputSpec], hints: Mapping[str, InputHints], sizes: Mapping[str, int],
              scalars: Mapping[str, object], seed: int = 0) -> dict[str, np.ndarray]:
    """One feed: shapes from ``sizes`` (dim key → size), values after ``hints``, ``scalars`` as given."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        kinds = {}
        shape = []
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            key = dim if isinstance(dim, str) else f"{spec.name}[{axis}]"
            shape.append(sizes[key])
            kinds[axis] = _dim_kind(spec, axis, dim)
        shape = tuple(shape)
        nbytes = math.prod(shape) * spec.dtype.itemsize
        if nbytes > SYNTHETIC_LIMIT:
            raise DataError(f"synthetic input '{spec.name}' of shape {list(shape)} would take {nbytes / 2**30:.1f} GiB "
                            f"(more than {SYNTHETIC_LIMIT / 2**30:.0f}); lower --dim or --fix-dim")
        feed[spec.name] = _values(rng, spec, shape, hints.get(spec.name, InputHints()), scalars, kinds)
    return feed


def _values(rng, spec: InputSpec, shape, hint: InputHints, scalars, kinds) -> np.ndarray:
    dtype = spec.dtype
    if spec.name in scalars:
        return np.full(shape, scalars[spec.name], dtype=dtype)
    if hint.mask and (dtype == np.bool_ or np.issubdtype(dtype, np.number)):
        mask = np.ones(shape, dtype=dtype)
        if len(shape) >= 2 and shape[-1] > 1:
            cut = max(1, shape[-1] * 3 // 4)
            mask[1:, ..., cut:] = 0  # rows after the first: a padded tail
        return mask
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        high = hint.rows if hint.rows is not None else 10
        high = min(high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        kind = _float_kind(spec, kinds)
        if kind == "image":
            return rng.random(size=shape).astype(dtype)
        if kind == "audio":
            return np.clip(0.1 * rng.standard_normal(size=shape), -1, 1).astype(dtype)
        if kind == "state":
            return (0.1 * rng.standard_normal(size=shape)).astype(dtype)
        return rng.standard_normal(size=shape).astype(dtype)
    raise DataError(f"cannot make synthetic data of dtype {dtype} (input '{spec.name}'); pass --data")


# -- choosing sizes ------------------------------------------------------------------------------


@dataclass
class Choice:
    feed: dict[str, np.ndarray]
    sizes: dict[str, int]
    scalars: dict[str, object]
    failures: list[tuple[str, str]]  # (what was tried, why it failed), in order


def _candidates(variables: list[DimVar], fixed: Mapping[str, int], scalar_options: dict[str, list]):
    """(sizes, scalars) to try, in order: ladder steps, batch 2 then 1 in each, then every dim at 1."""
    free = [v for v in variables if v.key not in fixed]
    has_batch = any(v.kind == "batch" for v in free)
    steps = max((len(LADDERS[v.kind]) for v in free if v.kind != "batch"), default=1)
    names = list(scalar_options)
    combos = list(itertools.islice(itertools.product(*(scalar_options[n] for n in names)), MAX_SCALAR_COMBOS))
    seen = set()
    for step in [*range(steps), None]:
        for batch in (BATCH_SIZES if has_batch else (None,)):
            sizes = dict(fixed)
            for v in free:
                if v.kind == "batch":
                    sizes[v.key] = 1 if step is None else batch
                else:
                    ladder = LADDERS[v.kind]
                    sizes[v.key] = 1 if step is None else ladder[min(step, len(ladder) - 1)]
            for combo in combos:
                key = (tuple(sorted(sizes.items())), combo)
                if key not in seen:
                    seen.add(key)
                    yield sizes, dict(zip(names, combo))


def _finite(outputs) -> bool:
    for out in outputs:
        a = np.asarray(out)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return False
    return True


def search(specs: list[InputSpec], hints: Mapping[str, InputHints], dims: Mapping[str, int],
           run: Callable[[dict[str, np.ndarray]], list], *, batch_size: int | None = None,
           seed: int = 0) -> Choice:
    """The first candidate feed that ``run`` runs with finite outputs, or a one-line ``DataError``."""
    variables = dim_vars(specs)
    fixed = {v.key: dims[v.key] for v in variables if v.named and v.key in dims}
    if batch_size:
        fixed.update({v.key: batch_size for v in variables if v.kind == "batch" and v.key not in fixed})
    scalar_options = {}
    for spec in specs:
        h = hints.get(spec.name)
        if spec.shape == () and h is not None and h.constants and np.issubdtype(spec.dtype, np.number):
            scalar_options[spec.name] = h.constants
    failures: list[tuple[str, str]] = []
    for sizes, scalars in _candidates(variables, fixed, scalar_options):
        feed = make_feed(specs, hints, sizes, scalars, seed)
        if any(v.kind == "batch" and sizes[v.key] > 1 and v.key not in fixed for v in variables) \
                and sum(a.nbytes for a in feed.values()) > CHEAP_BYTES:
            continue  # batch 1 comes next at the same sizes
        what = _describe(feed, scalars)
        try:
            outputs = run(feed)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any refusal of onnxruntime is a size to skip
            failures.append((what, one_line(exc, 160)))
            continue
        if not _finite(outputs):
            failures.append((what, "outputs NaN or inf"))
            continue
        return Choice(feed, sizes, scalars, failures)
    raise DataError(_nothing_runs(specs, variables, fixed, failures))


def _describe(feed: Mapping[str, np.ndarray], scalars: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={scalars[k] if k in scalars else a.item()}" if a.ndim == 0 else f"{k} {list(a.shape)}"
                     for k, a in feed.items())


def _nothing_runs(specs, variables, fixed, failures) -> str:
    """One line: the input whose size could not be chosen, what was tried, why it failed, what helps."""
    free = [v for v in variables if v.key not in fixed]
    target = next((v for v in free if v.kind != "batch"), free[0] if free else None)
    why = failures[0][1][:160] if failures else "no candidate"
    if target is None:
        name = next((s.name for s in specs), "?")
        return f"synthetic inputs: onnxruntime cannot run the model on them (input '{name}'): {why}; pass --data"
    name = target.where[0][0]
    tried = "/".join(map(str, LADDERS.get(target.kind, BATCH_SIZES)))
    helps = f"--dim {target.key}=N or --data" if target.named else "--data (that dim has no name for --dim)"
    return (f"synthetic inputs: onnxruntime runs the model at no size tried for input '{name}' "
            f"(dim {target.key}: {tried}, then 1): {why}; pass {helps}")


def _notes(choice: Choice, specs, hints, variables, user_dims) -> list[str]:
    notes = [f"synthetic inputs: {_describe(choice.feed, choice.scalars)}"]
    groups: dict[str, list[str]] = {}
    for v in variables:
        size = choice.sizes[v.key]
        why = ("--dim" if v.key in user_dims else "batch" if v.kind == "batch"
               else f"{v.kind}: first of {'/'.join(map(str, LADDERS[v.kind]))} that runs" if size != 1
               else f"no size of the {v.kind} ladder runs")
        groups.setdefault(why, []).append(f"{v.key}={size}")
    if groups:
        notes.append("sizes: " + "; ".join(f"{', '.join(keys)} ({why})" for why, keys in groups.items()))
    if choice.failures:
        first, why = choice.failures[0]
        more = f" (+{len(choice.failures) - 1} more tried)" if len(choice.failures) > 1 else ""
        notes.append(f"failed first at {first}: {why[:100]}{more}")
    values = []
    for spec in specs:
        h = hints.get(spec.name)
        if h is None:
            continue
        if spec.name in choice.scalars:
            values.append(f"{spec.name}={choice.scalars[spec.name]} (a constant the graph compares it with)")
        elif h.mask:
            values.append(f"{spec.name} 0/1 ({h.why})")
        elif h.rows is not None and np.issubdtype(spec.dtype, np.integer):
            values.append(f"{spec.name} in [0, {h.rows}) (rows of the table it indexes)")
    if values:
        notes.append("values: " + "; ".join(values))
    return notes


def runnable_synthetic_data(model: ir.Model, *, dims: Mapping[str, int] | None = None, providers="cpu",
                            batch_size: int | None = None, seed: int = 0,
                            snapshot: ModelSnapshot | None = None) -> Dataset:
    """One synthetic batch that ``model`` runs under onnxruntime (see the module docstring), with
    notes that say which sizes and values were chosen and why; a one-line ``DataError`` otherwise."""
    dims = dict(dims or {})
    specs = input_specs(model)
    check_dim_names(specs, dims)
    for spec in specs:
        if spec.shape is None:
            raise DataError(f"input '{spec.name}' has no shape; synthetic data needs one (pass --data)")
    hints = analyze(model)
    own = snapshot is None  # a caller's snapshot of ``model`` (a big model's file) is reused, not copied
    snapshot = ModelSnapshot(model) if own else snapshot
    try:
        try:
            session = snapshot.session(optimization="disabled", providers=providers)
        except OnnxoptError:
            raise
        except Exception:  # noqa: BLE001 - the caller reports a model onnxruntime cannot load, in its words
            return synthetic_data(model, dims=dims)
        choice = search(specs, hints, dims, lambda feed: list(run_session(session, feed).values()),
                        batch_size=batch_size, seed=seed)
    finally:
        if own:
            snapshot.close()
    notes = _notes(choice, specs, hints, dim_vars(specs), dims)
    return Dataset([choice.feed], None, "synthetic", synthetic=True, notes=notes)

"""Input data for running a model: files, arrays or iterables, matched to the model's inputs with clear errors.

Accepted sources: an ``.npz`` file, a folder of ``<input>.npy`` files, onnx test-data folders
(``input_0.pb`` … or ``test_data_set_*/``), a mapping of arrays, or an iterable of feed mappings
(one batch each; their lengths may differ). Arrays whose first axis counts samples are cut into
batches. Keys that are not model inputs and are named ``labels``/``label``/``y``/``targets`` are
taken as labels. Synthetic data is produced only when asked for.

``load_data`` holds every batch (validation data is read many times); ``stream_data`` reads an
``.npz`` or a folder of ``.npy`` sequentially from disk, and consumes an iterator as it goes, so
that calibration over thousands of samples holds one batch at a time; ``sample_rows`` reads the
same files by ranges of rows in any order, so that distillation shuffles a training set larger
than memory a chunk at a time.
"""

from __future__ import annotations

__all__ = [
    "InputSpec",
    "Dataset",
    "input_specs",
    "feed_dims",
    "feed_rows",
    "first_rows",
    "timing_feed",
    "TIMING_MACS",
    "load_data",
    "stream_data",
    "dim_conflicts",
    "cannot_run",
    "check_labels",
    "DataStream",
    "synthetic_data",
    "check_dim_names",
    "SYNTHETIC_LIMIT",
    "head",
    "parse_dims",
    "LABEL_KEYS",
    "check_data_path",
    "SampleRows",
    "sample_rows",
    "POOL_LIMIT",
]

import itertools
import math
import os
import re
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import DataError, OptionError, one_line

LABEL_KEYS = ("labels", "label", "y", "targets")
# The largest synthetic input made: a --dim typo (100000000) fails in a line, not in numpy's allocator.
SYNTHETIC_LIMIT = 4 * 2**30
# What a read-once iterator of batches keeps of its first batches, to validate on (see DataStream).
RETAINED_SAMPLES = 512
RETAINED_BYTES = 64 * 2**20
# The most bytes one array of --data/--calibration may declare (its .npy header: shape x itemsize) for
# what is read into memory at once: a 6 MB compressed .npz can declare gigabytes (a zip bomb).
READ_LIMIT = 4 * 2**30
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, numpy dtype and shape (ints for fixed dims, names or None for dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class Dataset:
    """Feeds for a model, batch by batch, with optional labels (one per sample, in order)."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    source: str = "data"
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(batch_samples(batch) for batch in self.batches)


def batch_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one batch as ``Dataset.num_samples`` counts them: its first input's first dim (1 for a scalar)."""
    first = next(iter(feed.values()), None)
    return 1 if first is None or np.ndim(first) == 0 else int(np.shape(first)[0])


def feed_dims(model: ir.Model, feed: Mapping[str, np.ndarray] | None) -> dict[str, int]:
    """The sizes that ``feed`` (one batch for ``model``) gives the named dynamic dims of the model's
    inputs past the first (batch) axis: the sequence length or image size that the data really has."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        array = (feed or {}).get(value.name)
        if array is None or value.shape is None or np.ndim(array) != len(value.shape):
            continue
        for axis, dim in enumerate(value.shape):
            name = getattr(dim, "value", None)
            if axis > 0 and isinstance(name, str) and name:
                dims.setdefault(name, int(np.shape(array)[axis]))
    return dims


def feed_rows(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in ``feed``: the largest leading dim of its inputs (1 for scalars)."""
    return max((int(np.shape(a)[0]) for a in feed.values() if np.ndim(a) > 0), default=1)


def _batch_like(model: ir.Model, feed: Mapping[str, np.ndarray]) -> bool:
    """Whether axis 0 of ``feed`` is surely its batch: every input has a rank, the same leading
    size, and a dynamic first dim in ``model``."""
    rows = feed_rows(feed)
    declared = {v.name: v.shape for v in model.graph.inputs}
    return all(
        np.ndim(a) > 0 and np.shape(a)[0] == rows
        and (declared.get(k) is None or len(declared[k]) == 0 or not isinstance(declared[k][0], int))
        for k, a in feed.items()
    )


def first_rows(model: ir.Model, feed: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``feed`` cut to its first ``n`` samples along axis 0 where that is surely a batch
    (``_batch_like``); else ``feed`` whole."""
    if n >= feed_rows(feed) or not _batch_like(model, feed):
        return dict(feed)
    return {k: a[:n] for k, a in feed.items()}


def take_rows(model: ir.Model, data: Dataset, rows: Sequence[int]) -> dict[str, np.ndarray] | None:
    """One feed of the samples ``rows`` (indices over all of ``data``'s batches, in data order), in
    the order given; None where a batch's axis 0 is not surely its samples (``_batch_like``), a
    batch's inputs differ in their other dims from the first's, or an index is out of range."""
    wanted = {row: i for i, row in enumerate(dict.fromkeys(rows))}  # duplicates once
    parts: dict[int, dict[str, np.ndarray]] = {}
    start, keys, tails = 0, None, None
    for feed in data.batches:
        n = feed_rows(feed)
        hits = [row for row in wanted if start <= row < start + n]
        if hits:
            if not _batch_like(model, feed):
                return None
            shape = {k: np.shape(a)[1:] for k, a in feed.items()}
            keys, tails = (list(feed), shape) if keys is None else (keys, tails)
            if shape != tails:
                return None
            for row in hits:
                parts[wanted[row]] = {k: feed[k][row - start] for k in keys}
        start += n
    if not rows or len(parts) != len(wanted):
        return None
    return {k: np.stack([parts[i][k] for i in range(len(wanted))]) for k in keys}


# MACs that one timed call of the model may take when onnxopt cut the data into batches itself: the
# speed fallback and the side-by-side latency repeat calls many times, and a 32-sample batch of a
# 700 M-MAC recognizer takes seconds a call on two cores (about 0.25 s a call at this figure there).
TIMING_MACS = 2 * 10**9


def timing_feed(model: ir.Model, feed: Mapping[str, np.ndarray], macs_per_sample: int | None, *,
                batch_given: bool) -> tuple[dict[str, np.ndarray], str | None]:
    """What the speed fallback and the latency comparison time: ``feed`` (the data's first batch), or
    its first rows when the batch is onnxopt's default cut (``batch_given`` False: no ``--batch-size``)
    and a call would take more than ``TIMING_MACS``: the largest power of two of samples under it
    (at least 1). Returns the feed and, when cut, the note that says so."""
    rows = feed_rows(feed)
    if batch_given or not macs_per_sample or rows <= 1 or rows * macs_per_sample <= TIMING_MACS:
        return dict(feed), None
    n = 1
    while n * 2 * macs_per_sample <= TIMING_MACS and n * 2 < rows:
        n *= 2
    cut = first_rows(model, feed, n)
    if feed_rows(cut) == rows:  # no batch axis to cut
        return dict(feed), None
    return cut, (f"timed at batch {n}, the first rows of the data's batch of {rows} ({macs_per_sample / 1e6:,.0f} M MACs "
                 f"a sample; --batch-size N times at N)")


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
            shape = tuple(_normalize_dim(d) for d in shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def _normalize_dim(dim):
    """Exporters write unknown dims as -1, '?' or odd names; keep names, map the rest to None."""
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    if dim in (None, "", "?", "-1"):
        return None
    return dim


def parse_dims(items: Iterable[str] | Mapping[str, int] | None, flag: str = "--dim") -> dict[str, int]:
    """``["batch=4", "seq=128"]`` → ``{"batch": 4, "seq": 128}``; errors name ``flag``."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        items = [f"{k}={v}" for k, v in items.items()]
    dims = {}
    for item in items:
        name, sep, value = str(item).rpartition("=")
        # isdecimal, not isdigit: int() refuses digits such as '²'.
        if not sep or not name.strip() or not value.strip().isdecimal() or int(value) <= 0:
            raise OptionError(f"{flag} {item!r}: expected NAME=POSITIVE_INT, e.g. batch=4")
        if dims.get(name.strip(), int(value)) != int(value):
            raise OptionError(f"{flag} {name.strip()} is given twice: {dims[name.strip()]} and {int(value)}")
        dims[name.strip()] = int(value)
    return dims


def load_data(
    source,
    model: ir.Model,
    *,
    batch_size: int | None = None,
    dims: Mapping[str, int] | None = None,
    labels_key: str | None = None,
    max_samples: int | None = None,
) -> Dataset:
    """Read ``source`` and return batches that fit ``model``'s inputs, or raise ``DataError``.

    ``source`` may be ``"synthetic"`` to ask for random inputs built from the input types.
    ``max_samples`` keeps only the first samples (entries along axis 0; of files, only those are read).
    """
    specs = input_specs(model)
    if isinstance(source, str) and source == "synthetic":
        return synthetic_data(model, dims=dims)
    if isinstance(source, Dataset):
        for batch in source.batches:
            _check_feed(batch, specs, source.source)
        return source
    if isinstance(source, (str, os.PathLike)):
        arrays, per_batch, name = _read_path(Path(source), specs, max_samples)
    elif isinstance(source, Mapping):
        arrays, per_batch, name = dict(source), None, "data"
    elif isinstance(source, Iterable):
        feeds = _feeds(source)
        arrays, per_batch, name = None, list(_first_samples(feeds, max_samples) if max_samples else feeds), "data"
    else:
        raise DataError(f"cannot read input data from {type(source).__name__}")
    if arrays is not None and max_samples:
        arrays = {k: v[:max_samples] if np.ndim(v) else v for k, v in arrays.items()}
    elif per_batch is not None and max_samples:
        per_batch = list(_first_samples(per_batch, max_samples))

    labels = None
    if per_batch is not None:
        batches = []
        for i, batch in enumerate(per_batch):
            batch = dict(batch)
            label = _pop_labels(batch, specs, labels_key)
            if label is not None:
                labels = label if labels is None else np.concatenate([labels, label])
            batches.append(_check_feed(batch, specs, f"{name} batch {i}"))
        if not batches:
            raise DataError(f"{name}: no batches")
        return Dataset(batches, labels, name)

    labels = _pop_labels(arrays, specs, labels_key)
    batches = _split_samples(arrays, specs, batch_size, name)
    if not batches:
        raise DataError(f"{name}: no samples (the arrays are empty along axis 0)")
    if labels is not None:
        total = sum(_batch_len(b, specs) for b in batches)
        if len(labels) != total:
            raise DataError(f"{name}: {len(labels)} labels for {total} samples")
    return Dataset(batches, labels, name)


def _feeds(source: Iterable) -> Iterator[dict]:
    """The batches of an iterable of feeds, each a dict; an item that is no mapping (a file name in
    a list) is a one-line ``DataError``."""
    for i, batch in enumerate(source):
        if not isinstance(batch, Mapping):
            raise DataError(f"data batch {i}: {type(batch).__name__} is not a mapping of input names to arrays "
                            "(give a file path as one string, a dict of arrays, or an iterable of such dicts)")
        yield dict(batch)


def _first_samples(feeds: Iterable[dict], max_samples: int) -> Iterator[dict]:
    """Feeds up to ``max_samples`` samples in all (entries along axis 0), the last one cut to fit."""
    left = max_samples
    for feed in feeds:
        if left <= 0:
            return
        lengths = {np.shape(v)[0] for v in feed.values() if np.ndim(v)}
        count = lengths.pop() if len(lengths) == 1 else 1
        if count > left:
            feed = {k: v[:left] if np.ndim(v) else v for k, v in feed.items()}
        left -= min(count, left)
        yield feed


def check_data_path(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file or a folder (symbolic links followed); else a one-line
    ``DataError``: missing, or a device, pipe or socket (``/dev/zero`` would be read forever, a FIFO
    would block), before anything opens it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{path}: not a regular file or folder (a device, pipe or socket); "
                        "give an .npz, .npy or .pb file or a folder of them")
    return path


def _regular_file(path: Path) -> Path:
    """``path`` when it is a regular file (a member of a data folder: an ``x.npy`` that is a FIFO or a
    folder is refused in one line, not opened)."""
    if check_data_path(path).is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    return path


def _read_path(path: Path, specs: list[InputSpec], max_samples: int | None = None):
    check_data_path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return {k: r.read(max_samples) for k, r in _npz_readers(path).items()}, None, str(path)
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise DataError(f"{path}: a single .npy feeds only a model with one input; this one has {len(specs)}")
            return {specs[0].name: _load_npy(path, max_samples)}, None, str(path)
        if path.suffix == ".pb":
            return None, [_read_pb_set([path], specs)], str(path)
        raise DataError(f"{path}: unknown data format (use .npz, .npy, a folder of .npy, or onnx test-data .pb)")
    sets = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("test_data_set"))
    if sets:
        return None, [_read_pb_set(sorted(s.glob("input_*.pb"), key=_pb_index), specs) for s in sets], str(path)
    pbs = sorted(path.glob("input_*.pb"), key=_pb_index)
    if pbs:
        return None, [_read_pb_set(pbs, specs)], str(path)
    npys = sorted(path.glob("*.npy"))
    if npys:
        return {p.stem: _load_npy(p, max_samples) for p in npys}, None, str(path)
    raise DataError(f"{path}: folder holds no .npy files, input_*.pb files or test_data_set_* folders")


def _load_npy(path: Path, max_samples: int | None = None) -> np.ndarray:
    """The array of an ``.npy`` file (its first ``max_samples`` rows), its declared size checked first."""
    _regular_file(path)
    try:
        return _RowReader(lambda: open(path, "rb"), str(path)).read(max_samples)
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc.strerror or exc})") from None


def _pb_index(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def _read_pb_set(paths: list[Path], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    feed = {}
    for i, p in enumerate(paths):
        tensor = onnx.TensorProto()
        if _regular_file(p).stat().st_size > READ_LIMIT:
            raise DataError(f"{p}: {_gib(p.stat().st_size)}, more than {_gib(READ_LIMIT)} to read at once")
        try:
            tensor.ParseFromString(p.read_bytes())
            array = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:
            raise DataError(f"{p}: not a readable TensorProto ({exc})") from None
        name = tensor.name or (specs[i].name if i < len(specs) else f"input_{i}")
        feed[name] = array
    return feed


def _pop_labels(arrays: dict, specs: list[InputSpec], labels_key: str | None):
    names = {s.name for s in specs}
    keys = (labels_key,) if labels_key else LABEL_KEYS
    for key in keys:
        if key in arrays and key not in names:
            labels = np.asarray(arrays.pop(key))
            if labels.dtype.kind not in "iub":
                raise DataError(f"labels '{key}' have dtype {labels.dtype}: they must be class indices (integers)")
            if labels.ndim > 1 and labels.shape[1:] != (1,) * (labels.ndim - 1):
                raise DataError(f"labels '{key}' have shape {list(labels.shape)}: one class index per sample is "
                                f"expected (one-hot labels: pass labels.argmax(axis=1))")
            if labels.size and labels.min() < 0:
                raise DataError(f"labels '{key}' hold {labels.min()}: class indices are 0 or more")
            return labels
    if labels_key:
        raise DataError(f"labels key '{labels_key}' not found in the data (keys: {', '.join(arrays)})")
    return None


def _check_names(keys, specs: list[InputSpec], where: str) -> None:
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in keys]
    unknown = [k for k in keys if k not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown name(s) {', '.join(unknown)}")
        raise DataError(f"{where}: {'; '.join(parts)} (the model expects {', '.join(s.describe() for s in specs)})")


def _check_feed(feed: Mapping[str, np.ndarray], specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    _check_names(feed.keys(), specs, where)
    checked = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        if array.dtype != spec.dtype:
            raise DataError(f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model expects rank {len(spec.shape)} ({spec.describe()})"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if isinstance(want, int) and got != want:
                    raise DataError(
                        f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model expects {spec.describe()} (axis {axis}: {got} != {want})"
                    )
        if array.dtype.kind == "f" and array.size and not np.isfinite(array).any():
            raise DataError(f"{where}: input '{spec.name}' has no finite value (all NaN or infinite)")
        checked[spec.name] = array
    return checked


def check_labels(labels: np.ndarray, logits: np.ndarray, output: str, where: str) -> None:
    """Refuse labels that no class of ``output`` (one batch of it: samples x classes) can match:
    negative, or the number of classes or more (an accuracy over them would be silently wrong)."""
    classes = math.prod(np.shape(logits)[1:]) if np.ndim(logits) > 1 else 0
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: label {labels.min()} is negative; labels are class indices 0..{max(classes - 1, 0)}")
    if labels.size and classes and labels.max() >= classes:
        raise DataError(f"{where}: label {labels.max()} is past the {classes} classes of output '{output}' "
                        f"(labels are class indices 0..{classes - 1})")


def dim_conflicts(feed: Mapping[str, np.ndarray], specs: list[InputSpec]) -> str:
    """Named dims that take different sizes across a feed's inputs ("dim 'S' is 5 in ids[1], 6 in
    mask[1]"), or "". onnxruntime does not require one size per name, so this is a hint for an error
    it raises, not a check of its own."""
    seen: dict[str, list[tuple[int, str]]] = {}
    for spec in specs:
        array = feed.get(spec.name)
        if spec.shape is None or array is None or np.ndim(array) != len(spec.shape):
            continue
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                seen.setdefault(dim, []).append((np.shape(array)[axis], f"{spec.name}[{axis}]"))
    parts = [f"dim '{dim}' is " + ", ".join(f"{size} in {where}" for size, where in uses)
             for dim, uses in seen.items() if len({size for size, _ in uses}) > 1]
    return "; ".join(parts)


def cannot_run(where: str, feed: Mapping[str, np.ndarray], specs: list[InputSpec], exc: BaseException, *,
               what: str = "the input model", hints: Iterable[str] = ()) -> DataError:
    """The one-line error for inputs that pass every check and still do not run (token ids past a
    table, a named dim of two sizes): where, the dims that disagree and other ``hints``, and why."""
    notes = "; ".join(h for h in (dim_conflicts(feed, specs), *hints) if h)
    return DataError(f"{where}: onnxruntime cannot run {what} on it{f' ({notes})' if notes else ''}: {one_line(exc)}")


def _batch_len(batch: Mapping[str, np.ndarray], specs: list[InputSpec]) -> int:
    array = batch[specs[0].name]
    return array.shape[0] if array.ndim else 1


def _split_samples(arrays: dict, specs: list[InputSpec], batch_size: int | None, where: str) -> list[dict]:
    """Cut arrays whose first axis counts samples into feeds that fit the model."""
    _check_names(arrays.keys(), specs, where)
    if not specs:
        return [{}]
    stacked = [s for s in specs if s.shape is not None and np.ndim(arrays[s.name]) == len(s.shape) + 1]
    if stacked and len(stacked) == len(specs):
        # One extra leading axis: every entry along it is a whole feed.
        count = _common_length({s.name: np.shape(arrays[s.name]) for s in specs}, where)
        return [_check_feed({s.name: arrays[s.name][i] for s in specs}, specs, f"{where} sample {i}") for i in range(count)]
    scalar = any(np.ndim(arrays[s.name]) == 0 for s in specs)
    if scalar:
        return [_check_feed(arrays, specs, where)]
    count = _common_length({s.name: np.shape(arrays[s.name]) for s in specs}, where)
    step = _batch_step(specs, count, batch_size, where)
    return [
        _check_feed({s.name: arrays[s.name][i : i + step] for s in specs}, specs, f"{where} samples {i}..{min(i + step, count) - 1}")
        for i in range(0, count, step)
    ]


def _common_length(shapes: Mapping[str, tuple[int, ...]], where: str) -> int:
    lengths = {name: shape[0] for name, shape in shapes.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise DataError(f"{where}: inputs disagree on the number of samples ({detail})")
    return next(iter(lengths.values()))


def _batch_step(specs: list[InputSpec], count: int, batch_size: int | None, where: str) -> int:
    """Samples per batch: the model's fixed batch dim (``count`` must be a multiple), else ``batch_size``."""
    first = specs[0]
    lead = first.shape[0] if first.shape else None
    if isinstance(lead, int) and lead > 0:
        if count % lead:
            raise DataError(
                f"{where}: input '{first.name}' has {count} samples along axis 0, not a multiple of the model's fixed batch {lead}"
            )
        return lead
    return batch_size or DEFAULT_BATCH_SIZE


def _fill_dim(dim, spec: InputSpec, axis: int, dims: Mapping[str, int], used_defaults: set) -> int:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim in dims:
        return dims[dim]
    used_defaults.add(f"{spec.name}[{axis}]" + (f" ({dim})" if dim else ""))
    return 1


def check_dim_names(specs: list[InputSpec], dims: Mapping[str, int]) -> None:
    """Refuse a ``--dim`` name that no input's dims carry."""
    known = {d for s in specs for d in (s.shape or ()) if isinstance(d, str)}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise OptionError(
            f"--dim {', '.join(unknown)}: no input has a dimension of that name "
            f"(named dims: {', '.join(sorted(known)) or 'none'})"
        )


def synthetic_data(
    model: ir.Model, *, dims: Mapping[str, int] | None = None, batches: int = 1, seed: int = 0
) -> Dataset:
    """Random feeds built from the input types; dynamic dims come from ``dims`` (name → size), else 1."""
    dims = dict(dims or {})
    specs = input_specs(model)
    rng = np.random.default_rng(seed)
    used_defaults: set[str] = set()
    check_dim_names(specs, dims)
    feeds = []
    for _ in range(batches):
        feed = {}
        for spec in specs:
            if spec.shape is None:
                raise DataError(f"input '{spec.name}' has no shape; synthetic data needs one (pass --data)")
            shape = tuple(_fill_dim(d, spec, i, dims, used_defaults) for i, d in enumerate(spec.shape))
            size = math.prod(shape) * spec.dtype.itemsize
            if size > SYNTHETIC_LIMIT:
                raise DataError(f"synthetic input '{spec.name}' of shape {list(shape)} would take {size / 2**30:.1f} GiB "
                                f"(more than {SYNTHETIC_LIMIT / 2**30:.0f}); lower --dim or --fix-dim")
            feed[spec.name] = _random_array(rng, spec.dtype, shape)
        feeds.append(feed)
    notes = []
    if used_defaults:
        notes.append("dynamic dims set to 1: " + ", ".join(sorted(used_defaults)) + " (use --dim NAME=N)")
    return Dataset(feeds, None, "synthetic", synthetic=True, notes=notes)


class DataStream:
    """Feeds checked as they are read, one batch in memory at a time (see ``stream_data``).

    ``num_batches`` and ``num_samples`` are known up front for files, and after the first full
    read for an iterator (which can be read once only). An iterator's first batches, up to
    ``RETAINED_SAMPLES`` samples and ``RETAINED_BYTES``, can be read ahead and kept (``head``), so
    that a run calibrated from an iterator still validates on real inputs; the read that follows
    starts with them.
    """

    synthetic = False
    labels = None

    def __init__(self, read: Callable[[], Iterator[Mapping[str, np.ndarray]]], specs: list[InputSpec], source: str,
                 *, batches: int | None = None, samples: int | None = None, once: bool = False) -> None:
        self._read, self._specs, self.source = read, specs, source
        self.num_batches, self.num_samples = batches, samples
        self._once, self._used = once, False
        self._pending: Iterator[Mapping[str, np.ndarray]] | None = None  # an iterator's unread rest
        self.retained: list[dict[str, np.ndarray]] = []  # an iterator's first batches, read ahead
        self.notes: list[str] = []

    def read_ahead(self) -> list[dict[str, np.ndarray]]:
        """An iterator's first batches (up to ``RETAINED_SAMPLES`` and ``RETAINED_BYTES``, at least
        one), read now and kept; a file's are read again when needed, so none are kept."""
        if not self._once or self._used or self.retained:
            return self.retained
        self._pending = self._read()
        samples = kept_bytes = 0
        while samples < RETAINED_SAMPLES:
            feed = next(self._pending, None)
            if feed is None:
                break
            # copied: a generator may refill one buffer for every batch
            checked = {k: np.array(v) for k, v in _check_feed(feed, self._specs, f"{self.source} batch {len(self.retained)}").items()}
            self.retained.append(checked)
            samples += _batch_len(checked, self._specs) if self._specs else 1
            kept_bytes += sum(v.nbytes for v in checked.values())
            if kept_bytes > RETAINED_BYTES:
                break
        return self.retained

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._once and self._used:
            raise DataError(f"{self.source}: an iterator of batches can be read only once")
        self._used = True
        rest = self._pending if self._pending is not None else self._read()
        batches = samples = 0
        for i, feed in enumerate(itertools.chain(self.retained, rest)):
            checked = _check_feed(feed, self._specs, f"{self.source} batch {i}")
            batches += 1
            samples += _batch_len(checked, self._specs) if self._specs else 1
            yield checked
        if not batches:
            raise DataError(f"{self.source}: no batches")
        self.num_batches, self.num_samples = batches, samples

    def __len__(self) -> int:
        return self.num_batches or 0

    @property
    def rereadable(self) -> bool:
        """Whether the batches can be read again (files can; an iterator only once)."""
        return not self._once


def head(data: Dataset | DataStream, max_samples: int) -> Dataset | None:
    """The first whole batches of ``data`` up to ``max_samples`` samples (at least one batch) in
    memory. Of a read-once iterator: the batches it read ahead (before its own read), or None
    once it has been read without that."""
    source = data
    if isinstance(data, DataStream) and not data.rereadable:
        source = data.read_ahead()
        if not source:
            return None
    taken = Dataset([], None, data.source, synthetic=bool(data.synthetic))
    for batch in source:
        taken.batches.append(batch)
        if taken.num_samples >= max_samples:
            break
    return taken


def stream_data(
    source,
    model: ir.Model,
    *,
    batch_size: int | None = None,
    dims: Mapping[str, int] | None = None,
    max_samples: int | None = None,
) -> Dataset | DataStream:
    """Like ``load_data``, but an ``.npz``, a folder of ``.npy`` or an iterator is read batch by batch
    (at most ``max_samples`` samples).

    Names, dtypes and shapes of the first batch are checked here, the rest as they are read.
    Other sources (arrays already in memory, onnx test data, ``"synthetic"``) load as usual.
    """
    specs = input_specs(model)
    stream = None
    if isinstance(source, (str, os.PathLike)) and str(source) != "synthetic":
        path = check_data_path(source)
        readers = _file_readers(path)
        if readers is not None:
            stream = _rows_stream(readers, specs, batch_size, str(path), max_samples)
    elif isinstance(source, Iterator):
        stream = _iterator_stream(_first_samples(_feeds(source), max_samples) if max_samples else _feeds(source), specs)
    if stream is None:
        return load_data(source, model, batch_size=batch_size, dims=dims, max_samples=max_samples)
    return stream


class SampleRows:
    """Samples read by ranges of rows, in any order: the training data of distillation.

    Over an ``.npz`` or a folder of ``.npy`` files, each ``read`` reads just those rows from disk and
    keeps nothing, so that a training set larger than memory is trained on a chunk at a time; over
    arrays in memory (every other source, pooled by ``sample_rows``) it slices them. Labels beside
    the inputs (``labels``, ``label``, ``y``, ``targets``) come with their rows.
    """

    synthetic = False

    def __init__(self, columns: Mapping[str, _RowReader | np.ndarray], labels: _RowReader | np.ndarray | None,
                 specs: list[InputSpec], source: str, count: int) -> None:
        self._columns, self._labels, self._specs = dict(columns), labels, specs
        self.source, self.num_samples = source, count

    @property
    def in_memory(self) -> bool:
        """Whether the samples are arrays in memory (a read slices them) rather than read from disk."""
        return all(isinstance(c, np.ndarray) for c in self._columns.values())

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample's inputs."""
        return sum(math.prod(c.shape[1:]) * c.dtype.itemsize for c in self._columns.values())

    def read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The inputs of samples ``[start, stop)`` and their labels (None without labels)."""
        stop = min(stop, self.num_samples)
        feed = {name: _row_range(column, start, stop) for name, column in self._columns.items()}
        if self._specs:
            feed = _check_feed(feed, self._specs, f"{self.source} samples {start}..{stop - 1}")
        if self._labels is None:
            return feed, None
        labels = np.asarray(_row_range(self._labels, start, stop)).reshape(-1)
        if labels.size and labels.min() < 0:
            raise DataError(f"{self.source}: label {labels.min()} is negative; labels are class indices, 0 or more")
        return feed, labels


def _row_range(column: _RowReader | np.ndarray, start: int, stop: int) -> np.ndarray:
    return column.rows(start, stop) if isinstance(column, _RowReader) else column[start:stop]


# What sample_rows pools in memory of a source that cannot be read by row ranges (arrays, an
# iterable of feeds, onnx test data): past this, a clear error that names the formats read from disk.
POOL_LIMIT = 2 * 2**30


def sample_rows(source, model: ir.Model, *, where: str = "train data", max_samples: int | None = None) -> SampleRows:
    """``source`` as ``SampleRows`` for ``model``'s inputs: an ``.npz`` or a folder of ``.npy`` with
    one sample per row is read from disk range by range (never whole); any other source is read by
    ``load_data`` and pooled in memory (at most ``POOL_LIMIT`` bytes). At most ``max_samples``."""
    if isinstance(source, SampleRows):
        return source
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)) and str(source) != "synthetic":
        readers = _file_readers(check_data_path(source))
        rows = None if readers is None else _file_rows(readers, specs, str(source), max_samples)
        if rows is not None:
            return rows
    if isinstance(source, Mapping):
        missing = [s.name for s in specs if s.name not in source]
        if missing:
            raise DataError(f"{where}: no input '{missing[0]}' (the model's inputs: {', '.join(s.name for s in specs)})")
    data = source if isinstance(source, (Dataset, DataStream)) else load_data(source, model, max_samples=max_samples)
    parts: dict[str, list[np.ndarray]] = {}
    size = 0
    for feed in data:
        for name, array in feed.items():
            array = np.asarray(array)
            if array.ndim == 0:
                raise DataError(f"{where}: input '{name}' is a scalar (0-d); distillation needs a first axis of samples")
            parts.setdefault(name, []).append(array)
            size += array.nbytes
        if size > POOL_LIMIT:
            raise DataError(f"{where}: more than {_gib(POOL_LIMIT)} of samples to hold in memory; give an .npz or a "
                            "folder of .npy files (one sample per row), which is read a chunk at a time")
    if not parts:
        raise DataError(f"{where}: no batches")
    pooled = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    count = _common_length({name: a.shape for name, a in pooled.items()}, where)
    labels = getattr(data, "labels", None)
    if labels is not None and len(labels) != count:
        raise DataError(f"{where}: {len(labels)} labels for {count} samples")
    return SampleRows(pooled, None if labels is None else np.asarray(labels), [], getattr(data, "source", where), count)


def _file_rows(readers: dict[str, _RowReader], specs: list[InputSpec], where: str,
               max_samples: int | None) -> SampleRows | None:
    """``readers``' arrays as rows of samples (labels too); None where the layout needs the
    in-memory reader (one feed per leading entry, scalars)."""
    inputs = {s.name for s in specs}
    label_key = next((k for k in LABEL_KEYS if k in readers and k not in inputs), None)
    labels = readers.get(label_key) if label_key else None
    total = _rows_of(readers, specs, where)
    if total is None:
        return None
    count = min(total, max_samples) if max_samples else total
    if labels is not None:
        shape = labels.shape
        if labels.dtype.kind not in "iub":
            raise DataError(f"labels '{label_key}' have dtype {labels.dtype}: they must be class indices (integers)")
        if not shape or shape[1:] != (1,) * (len(shape) - 1):
            raise DataError(f"labels '{label_key}' have shape {list(shape)}: one class index per sample is expected")
        if shape[0] != total:
            raise DataError(f"{where}: {shape[0]} labels for {total} samples")
    first = {s.name: np.broadcast_to(np.zeros((), readers[s.name].dtype), (1, *readers[s.name].shape[1:])) for s in specs}
    _check_feed(first, specs, f"{where} sample 0")
    return SampleRows({s.name: readers[s.name] for s in specs}, labels, specs, where, count)


class _RowReader:
    """Reads an ``.npy`` byte stream (a file or a member of an ``.npz``) block of rows by block of rows."""

    def __init__(self, open_stream: Callable[[], object], where: str) -> None:
        self._open, self.where = open_stream, where
        with self._open() as f:
            self.shape, self.fortran, self.dtype = _npy_header(f, where)

    def _check_size(self, rows: int | None) -> None:
        """Refuse reading more than ``READ_LIMIT`` bytes at once, by the header's word, before reading."""
        shape = self.shape if rows is None or not self.shape else (rows, *self.shape[1:])
        size = math.prod(shape) * self.dtype.itemsize
        if size > READ_LIMIT:
            raise DataError(f"{self.where}: declares {self.dtype}{list(self.shape)}, {_gib(size)} to read at once "
                            f"(more than {_gib(READ_LIMIT)}); use fewer samples, --max-samples N or a smaller --batch-size")

    def read(self, max_rows: int | None = None) -> np.ndarray:
        """The whole array, or its first ``max_rows`` rows (only those are read)."""
        rows = self.shape[0] if self.shape else None
        if rows is not None and max_rows is not None:
            rows = min(rows, max_rows)
        if not self.shape or self.fortran:  # a scalar, or column-major (rows not contiguous): read whole
            self._check_size(None)
            with self._open() as f:
                try:
                    whole = np.lib.format.read_array(f, allow_pickle=False)
                except ValueError as exc:
                    raise DataError(f"{self.where}: not a readable .npy array ({one_line(exc)})") from None
            return np.ascontiguousarray(whole[:rows]) if self.shape else whole
        return next(self.blocks(max(rows, 1), rows), np.empty((0, *self.shape[1:]), self.dtype))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``, only those read: the file (or zip member) is opened, its header read
        and the stream moved to ``start`` (a compressed ``.npz`` member is decompressed up to it)."""
        stop = min(stop, self.shape[0])
        if self.fortran:  # column-major: rows are not contiguous on disk
            return np.ascontiguousarray(self.read()[start:stop])
        n = max(stop - start, 0)
        self._check_size(n)
        row = self.shape[1:]
        row_bytes = math.prod(row) * self.dtype.itemsize
        with self._open() as f:
            _npy_header(f, self.where)
            f.seek(start * row_bytes, os.SEEK_CUR)
            buffer = bytearray(n * row_bytes)
            if f.readinto(buffer) != len(buffer):
                raise DataError(f"{self.where}: the file ends before its {self.shape[0]} rows")
        return np.frombuffer(buffer, dtype=self.dtype).reshape((n, *row))

    def blocks(self, step: int, count: int | None = None) -> Iterator[np.ndarray]:
        """Blocks of ``step`` rows of the first ``count`` rows (all by default)."""
        count = self.shape[0] if count is None else min(count, self.shape[0])
        row = self.shape[1:]
        row_bytes = math.prod(row) * self.dtype.itemsize
        with self._open() as f:
            if self.fortran:  # column-major: rows are not contiguous on disk, so it is read whole
                self._check_size(None)
                whole = np.lib.format.read_array(f, allow_pickle=False)  # reads its own header
                for i in range(0, count, step):
                    yield np.ascontiguousarray(whole[i:i + step])
                return
            self._check_size(min(step, count))
            _npy_header(f, self.where)
            for i in range(0, count, step):
                n = min(step, count - i)
                buffer = bytearray(n * row_bytes)
                if f.readinto(buffer) != len(buffer):
                    raise DataError(f"{self.where}: the file ends before its {self.shape[0]} rows")
                yield np.frombuffer(buffer, dtype=self.dtype).reshape((n, *row))


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _npy_header(f, where: str):
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: not a readable .npy array ({one_line(exc)})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects; only numeric arrays are read")
    return shape, fortran, dtype


def _npz_readers(path: Path) -> dict[str, _RowReader]:
    """A row reader per array of an ``.npz`` (each member decompressed as it is read, never whole)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith(".npy")]
            starts = {n: _stored_start(path, archive.getinfo(n)) for n in members}
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({one_line(exc)})") from None

    def opener(member: str):
        def open_member():
            if starts[member] is not None:  # stored as it is: the file itself, from the member's first byte
                f = open(path, "rb")  # noqa: SIM115 (the reader closes it: with open_member() as f)
                f.seek(starts[member])
                return f
            archive = zipfile.ZipFile(path)
            return _Closing(archive.open(member), archive)
        return open_member

    return {m[:-4]: _RowReader(opener(m), f"{path}[{m[:-4]}]") for m in members}


def _stored_start(path: Path, info: zipfile.ZipInfo) -> int | None:
    """Where an uncompressed, unencrypted member's bytes start in the ``.npz`` (``np.savez`` writes
    such members), so that a range of its rows is read from there, not through every byte before
    it; None for other members (they are read through their zip stream)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def _file_readers(path: Path) -> dict[str, _RowReader] | None:
    """A row reader per array of an ``.npz`` or of a folder of ``.npy`` files (not onnx test data);
    None for other sources."""
    if path.is_file() and path.suffix == ".npz":
        return _npz_readers(path)
    if not path.is_dir() or any(path.glob("input_*.pb")) or any(path.glob("test_data_set*")):
        return None
    files = sorted(path.glob("*.npy"))
    if not files:
        return None
    return {f.stem: _RowReader(lambda f=f: open(_regular_file(f), "rb"), str(f)) for f in files}


class _Closing:
    """A zip member whose archive closes with it."""

    def __init__(self, handle, archive) -> None:
        self._handle, self._archive = handle, archive

    def __enter__(self):
        return self._handle

    def __exit__(self, *exc) -> None:
        self._handle.close()
        self._archive.close()


def _rows_of(readers: dict[str, _RowReader], specs: list[InputSpec], where: str) -> int | None:
    """The samples (rows) of on-disk arrays that feed ``specs`` a sample a row, their names checked
    (labels aside); None where the layout needs the in-memory reader (one feed per leading entry, scalars)."""
    inputs = {s.name for s in specs}
    _check_names([name for name in readers if name in inputs or name not in LABEL_KEYS], specs, where)
    if not specs or any(s.shape is None or len(readers[s.name].shape) != len(s.shape) for s in specs):
        return None
    count = _common_length({s.name: readers[s.name].shape for s in specs}, where)
    if count == 0:
        raise DataError(f"{where}: no samples (the arrays are empty along axis 0)")
    return count


def _rows_stream(readers: dict[str, _RowReader], specs: list[InputSpec], batch_size: int | None,
                 where: str, max_samples: int | None = None) -> DataStream | None:
    """Batches cut along axis 0 of on-disk arrays; None where the layout needs the in-memory reader
    (one feed per leading entry, scalars). Labels are skipped: calibration reads no labels."""
    count = _rows_of(readers, specs, where)
    if count is None:
        return None
    count = min(count, max_samples) if max_samples else count
    step = _batch_step(specs, count, batch_size, where)
    # dtypes and fixed dims, before any pass runs: a zero-copy stand-in for the first batch
    first = {s.name: np.broadcast_to(np.zeros((), readers[s.name].dtype), (min(step, count), *readers[s.name].shape[1:]))
             for s in specs}
    _check_feed(first, specs, f"{where} samples 0..{min(step, count) - 1}")

    def read() -> Iterator[dict[str, np.ndarray]]:
        blocks = {s.name: readers[s.name].blocks(step, count) for s in specs}
        for _ in range(0, count, step):
            yield {name: next(it) for name, it in blocks.items()}

    return DataStream(read, specs, where, batches=math.ceil(count / step), samples=count)


def _iterator_stream(source: Iterator, specs: list[InputSpec]) -> DataStream:
    try:
        first = next(source)
    except StopIteration:
        raise DataError("data: no batches") from None
    first = dict(first)
    _pop_labels(first, specs, None)  # calibration needs no labels
    _check_feed(first, specs, "data batch 0")

    def read() -> Iterator[Mapping[str, np.ndarray]]:
        yield first
        for batch in source:
            batch = dict(batch)
            _pop_labels(batch, specs, None)
            yield batch

    return DataStream(read, specs, "data", once=True)


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        # Small non-negative integers: valid token ids and indices for most models.
        return rng.integers(0, 10, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(size=shape).astype(dtype)
    raise DataError(f"cannot make synthetic data of dtype {dtype}")

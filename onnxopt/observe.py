"""Stream a model's intermediate tensors to observers, batch by batch; memory bounded by one run.

The model is copied with the requested tensors added as graph outputs; each batch is run once,
every observer is updated, and the batch's tensors are dropped before the next one. A batch whose
exposed tensors would exceed ``max_bytes`` is run in slices along its batch axis (the very first
run is one sample, which measures what a sample costs), so a 320x320 detector calibrates in the
same memory at batch 1 or 64. Batches may differ in shape (ragged sequence lengths): observers
only see values.
"""

from __future__ import annotations

__all__ = ["MinMaxObserver", "HistogramObserver", "ChannelMeanObserver", "ChannelAbsMaxObserver", "ErrorObserver", "BatchSplitter", "observe", "expose", "optimized_ops",
           "DEFAULT_MAX_BYTES"]

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import cannot_run, input_specs
from onnxopt.runtime import QUIET_RUN, ModelSnapshot, resolve_providers

logger = logging.getLogger(__name__)

DEFAULT_BINS = 2048
# Past this magnitude a histogram is binned in float64: x - lo of two float32s could overflow.
_FLOAT32_SAFE = 1e37
# Bytes of exposed tensors one run may return: onnxruntime holds as much again in its arena.
DEFAULT_MAX_BYTES = 128 * 2**20


class MinMaxObserver:
    """Running minimum and maximum of the finite values seen."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        finite = x if np.isfinite(x).all() else x[np.isfinite(x)]
        if finite.size == 0:
            return
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.count += int(finite.size)


class HistogramObserver(MinMaxObserver):
    """A signed histogram of ``bins`` equal bins over a range that grows with the data.

    When a batch falls outside the current range, the range widens (with 25% headroom, so that a
    slowly drifting tensor is re-binned a few times, not every batch) and the old counts are
    redistributed onto the new bins in proportion to their overlap. Memory is ``bins`` floats.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        self.bins = int(bins)
        self.counts: np.ndarray | None = None
        self.lo = 0.0
        self.hi = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.size and not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if x.size == 0:
            return
        super().update(x)
        lo, hi = float(x.min()), float(x.max())
        if max(abs(lo), abs(hi), abs(self.lo), abs(self.hi)) > _FLOAT32_SAFE:
            x = x.astype(np.float64)  # bin arithmetic (x - lo) would overflow float32
        if self.counts is None:
            if hi <= lo:
                lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
            self.lo, self.hi = lo, hi
            self.counts = np.zeros(self.bins, dtype=np.float64)
        elif lo < self.lo or hi > self.hi:
            width = self.hi - self.lo
            new_lo = min(self.lo, lo - 0.25 * width) if lo < self.lo else self.lo
            new_hi = max(self.hi, hi + 0.25 * width) if hi > self.hi else self.hi
            self._rebin(new_lo, new_hi)
        if x.dtype == np.float32 and (self.hi - self.lo) / self.bins < 4 * np.finfo(np.float32).eps * max(abs(self.lo), abs(self.hi)):
            x = x.astype(np.float64)  # bins narrower than float32 resolves there (a near-constant tensor)
        counts, _ = np.histogram(x, bins=self.bins, range=(self.lo, self.hi))
        self.counts += counts

    def _rebin(self, lo: float, hi: float) -> None:
        old_edges = self.edges
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        # The old cumulative count, linear within each old bin, read at the new edges.
        self.counts = np.diff(np.interp(new_edges, old_edges, cumulative))
        self.lo, self.hi = lo, hi


class ChannelMeanObserver:
    """Running mean of a tensor per index of one axis (a channel), over every other axis."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count: np.ndarray | None = None  # finite values seen per channel

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.size == 0:
            return
        axis = self.axis % x.ndim
        rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        if self.total is not None and self.total.shape[0] != rows.shape[0]:
            return  # a ragged channel count: not a channel axis
        finite = np.isfinite(rows)
        if finite.all():
            sums, counts = rows.sum(axis=1), np.full(rows.shape[0], rows.shape[1], np.int64)
        else:  # NaN or inf in a batch: the mean is of the finite values (as the range observers see them)
            sums, counts = np.where(finite, rows, 0.0).sum(axis=1), finite.sum(axis=1)
        self.total = sums if self.total is None else self.total + sums
        self.count = counts if self.count is None else self.count + counts

    @property
    def mean(self) -> np.ndarray | None:
        """Per-channel mean; None before any value, and for a channel with no finite value."""
        if self.total is None or not (self.count > 0).all():
            return None
        return self.total / self.count


class ChannelEntropyObserver:
    """A histogram of ``bins`` equal bins per index of one axis (a channel), over every other axis and
    every batch, and the entropy (bits) of each: ``--importance entropy``.

    Each channel's range is set by the first batch and widens as ``HistogramObserver``'s does (25%
    headroom, old counts spread onto the new bins by overlap). A constant channel (a dead ReLU) puts
    every value in one bin: entropy 0, the least information, pruned first. Memory: channels x bins.
    """

    def __init__(self, axis: int, bins: int = 64) -> None:
        self.axis = axis
        self.bins = int(bins)
        self.counts: np.ndarray | None = None
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.size == 0:
            return
        rows = np.moveaxis(x, self.axis % x.ndim, 0).reshape(x.shape[self.axis % x.ndim], -1)
        if self.counts is not None and rows.shape[0] != self.counts.shape[0]:
            return  # a ragged channel count: not a channel axis
        rows = np.where(np.isfinite(rows), rows, np.nan)
        lo, hi = np.nanmin(rows, axis=1), np.nanmax(rows, axis=1)
        lo, hi = np.where(np.isnan(lo), 0.0, lo), np.where(np.isnan(hi), 0.0, hi)
        if self.counts is None:
            pad = np.where(hi > lo, 0.0, 0.5 * np.maximum(np.abs(lo), 1e-6))
            self.lo, self.hi = lo - pad, hi + pad
            self.counts = np.zeros((rows.shape[0], self.bins))
        else:
            for c in np.flatnonzero((lo < self.lo) | (hi > self.hi)):
                width = self.hi[c] - self.lo[c]
                new_lo = min(self.lo[c], lo[c] - 0.25 * width) if lo[c] < self.lo[c] else self.lo[c]
                new_hi = max(self.hi[c], hi[c] + 0.25 * width) if hi[c] > self.hi[c] else self.hi[c]
                old = np.linspace(self.lo[c], self.hi[c], self.bins + 1)
                cumulative = np.concatenate([[0.0], np.cumsum(self.counts[c])])
                self.counts[c] = np.diff(np.interp(np.linspace(new_lo, new_hi, self.bins + 1), old, cumulative))
                self.lo[c], self.hi[c] = new_lo, new_hi
        width = (self.hi - self.lo)[:, None]
        index = np.clip(np.floor((rows - self.lo[:, None]) / width * self.bins), 0, self.bins - 1)
        channel = np.broadcast_to(np.arange(rows.shape[0])[:, None], rows.shape)
        keep = ~np.isnan(index)
        flat = channel[keep] * self.bins + index[keep].astype(np.int64)
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    @property
    def entropy(self) -> np.ndarray | None:
        """Entropy in bits per channel, in [0, log2(bins)]; None before any value."""
        if self.counts is None:
            return None
        total = self.counts.sum(axis=1, keepdims=True)
        p = self.counts / np.maximum(total, 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)


class ChannelAbsMaxObserver:
    """Running max|x| per index of one axis (a channel), over every other axis and every batch:
    the activation statistic SmoothQuant reads (``onnxopt.passes.smooth_quant``)."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.absmax: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.size == 0:
            return
        rows = np.abs(np.moveaxis(x, self.axis % x.ndim, 0).reshape(x.shape[self.axis % x.ndim], -1))
        if not np.isfinite(rows).all():
            rows = np.where(np.isfinite(rows), rows, 0)
        peak = rows.max(axis=1).astype(np.float64)
        if self.absmax is not None and self.absmax.shape != peak.shape:
            return  # a ragged channel count: not a channel axis
        self.absmax = peak if self.absmax is None else np.maximum(self.absmax, peak)


class ErrorObserver:
    """Signal and error energy of a tensor against its float reference: SQNR in dB."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        r = np.asarray(reference, dtype=np.float64)
        c = np.asarray(candidate, dtype=np.float64)
        if r.shape != c.shape:
            return
        self.signal += float(np.square(r).sum())
        self.noise += float(np.square(r - c).sum())

    @property
    def sqnr_db(self) -> float:
        if self.noise <= 0:
            return float("inf")
        if self.signal <= 0:
            return float("-inf")
        return float(10.0 * np.log10(self.signal / self.noise))


class BatchSplitter:
    """Cuts feeds along the batch axis so that the tensors one run returns stay within ``max_bytes``.

    Cutting assumes that axis 0 is the batch axis (as ``--batch-size`` does): inputs whose first dim
    the model fixes are never cut, and a feed that fits runs whole. The cost of a sample is learned
    from the runs as bytes returned per byte fed (the largest ratio seen, so a longer sequence is
    costed by its length). Before any run, ``parts`` runs ``probe`` on the feed's first sample to
    measure it (its outputs are dropped: a model whose axis 0 is not a batch, a sequence-first
    Softmax, is then still observed on whole feeds); without a probe the first slice is one sample.
    """

    def __init__(self, model: ir.Model, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        self.cuttable = bool(inputs) and all(
            v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int) for v in inputs
        )
        self.max_bytes = max_bytes
        self.ratio: float | None = None  # bytes returned per byte fed

    def parts(self, feed: Mapping[str, np.ndarray],
              probe: Callable[[dict[str, np.ndarray]], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
        lengths = {np.shape(v)[0] if np.ndim(v) else None for v in feed.values()}
        if not self.cuttable or len(lengths) != 1 or None in lengths or next(iter(lengths)) <= 1:
            yield dict(feed)
            return
        count, start = next(iter(lengths)), 0
        fed_per_sample = sum(np.asarray(v).nbytes for v in feed.values()) / count
        if self.ratio is None and probe is not None:
            probe({k: v[:1] for k, v in feed.items()})
        while start < count:
            if self.ratio is None:
                rows = 1
            else:
                rows = max(1, int(self.max_bytes // max(self.ratio * fed_per_sample, 1.0)))
                if start == 0 and rows >= count:
                    yield dict(feed)
                    return
            yield {k: v[start:start + rows] for k, v in feed.items()}
            start += rows

    def learn(self, part: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        fed = sum(np.asarray(v).nbytes for v in part.values())
        returned = sum(np.asarray(o).nbytes for o in outputs)
        if fed > 0:
            self.ratio = max(self.ratio or 0.0, returned / fed)


def expose(model: ir.Model, names: Iterable[str]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` whose graph outputs also include the named tensors (graph inputs excepted)."""
    copy = model.clone()
    wanted = set(names)
    present = {v.name for v in copy.graph.outputs}
    exposed = []
    for node in copy.graph:
        for value in node.outputs:
            if value.name in wanted and value.name not in present:
                copy.graph.outputs.append(value)
                present.add(value.name)
                exposed.append(value.name)
    exposed += [v.name for v in copy.graph.outputs if v.name in wanted and v.name not in exposed]
    return copy, exposed


def observe(
    model: ir.Model,
    names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    update: Callable[[str, np.ndarray], None],
    *,
    providers: str | Sequence[str] = "cpu",
    total: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    where: str = "batch",
) -> int:
    """Run ``model`` on each batch and call ``update(name, array)`` for every named tensor.

    Named graph inputs are read from the feed, and given to ``update`` before the part's other tensors. Returns the number of batches run; a batch that
    onnxruntime cannot run raises a one-line ``DataError`` naming ``where`` and the batch's index. Only one run's
    tensors are alive at a time, at most about ``max_bytes`` of them (see ``BatchSplitter``).
    """
    copy, exposed = expose(model, names)
    inputs = {v.name for v in model.graph.inputs}
    from_feed = [n for n in names if n in inputs]
    snapshot = ModelSnapshot(copy, by_reference=True)  # weights left in their files are not copied
    del copy
    try:
        session = snapshot.session(providers=resolve_providers(providers), optimization="disabled")
        splitter = BatchSplitter(model, max_bytes)
        count = 0
        def run(part: dict[str, np.ndarray]) -> list[np.ndarray]:
            try:
                return session.run(exposed, part, QUIET_RUN) if exposed else []
            except Exception as exc:  # inputs that pass every check and still do not fit the model
                raise cannot_run(f"{where} {count}", part, input_specs(model), exc, what="the model") from None

        for feed in batches:
            for part in splitter.parts(feed, probe=lambda first: splitter.learn(first, run(first))):
                outputs = run(part)
                splitter.learn(part, outputs)
                for name in from_feed:  # inputs first: an observer may read the part's mask before its tensors
                    if name in part:  # an input with a default (an initializer) may be left out
                        update(name, np.asarray(part[name]))
                for name, array in zip(exposed, outputs):
                    update(name, array)
                del outputs
            count += 1
            if progress:
                progress(count, total or count)
        return count
    finally:
        snapshot.close()


def optimized_ops(model: ir.Model, *, providers: str | Sequence[str] = "cpu") -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (all optimizations on): what it fused, what stayed."""
    snapshot = ModelSnapshot(model)
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        try:
            snapshot.session(providers=resolve_providers(providers), optimization="all", optimized_model_path=path)
            proto = onnx.load(path, load_external_data=False)
        finally:
            snapshot.close()
    return dict(Counter(node.op_type for node in proto.graph.node))

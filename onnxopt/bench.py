"""``onnxopt bench``: time one model, or a candidate against a baseline, and fail on a regression.

    python -m onnxopt bench model.onnx [--vs baseline.onnx] [--max-slowdown 5%] [--json out.json]

Exit codes: 0 no regression (or a single model timed), 1 the candidate is slower than the
baseline beyond ``--max-slowdown``, 2 bad input. The measurement and its statistics are in
``onnxopt.latency``; ``bench()`` is the same thing from Python.
"""

from __future__ import annotations

__all__ = ["ModelTiming", "BenchResult", "bench", "render", "write_json", "build_parser", "main"]

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from onnxopt import io
from onnxopt.data import Dataset, input_specs, load_data, parse_dims, synthetic_data
from onnxopt.errors import DataError, OnnxoptError, OptionError
from onnxopt.latency import (
    DEFAULT_BUDGET_SECONDS,
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_SLOWDOWN,
    Progress,
    check_runs,
    decisive,
    machine_info,
    make_runner,
    measure_pair,
    measure_single,
    median_interval,
    parse_fraction,
    summarize,
    timing_session,
    timing_settings,
)
from onnxopt.report import json_safe, render_bench, write_json_file
from onnxopt.runtime import OPTIMIZATION_LEVELS, ModelSnapshot
from onnxopt.terminal import ArgumentParser
from onnxopt.terminal import Progress as ProgressLine

render = render_bench  # the terminal view lives in onnxopt.report

EXIT_OK, EXIT_SLOWER, EXIT_BAD_INPUT = 0, 1, 2

SAME_MACHINE_NOTE = (
    "absolute figures compare only on the same machine under the same settings; "
    "to compare two models, time them together with --vs"
)


@dataclass
class ModelTiming:
    """Absolute figures of one model: per-call median and p90 (ms), calls timed, samples per second."""

    model: str
    median_ms: float
    p90_ms: float
    runs: int
    throughput: float
    median_low_ms: float | None = None
    median_high_ms: float | None = None


@dataclass
class BenchResult:
    """One model's figures, or two models' with their ratio and a verdict.

    ``ratio`` is candidate / baseline (above 1: the candidate is slower); ``verdict`` is
    ``slower``, ``faster`` or ``no difference``, and None when a single model was timed.
    """

    candidate: ModelTiming
    baseline: ModelTiming | None
    verdict: str | None
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    confidence: float
    max_slowdown: float
    blocks: int
    calls_per_block: int
    seconds: float
    budget_seconds: float
    stopped: str
    settings: dict
    machine: dict
    notes: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        return self.verdict == "slower"

    @property
    def conclusive(self) -> bool:
        """False when 'no difference' only means the interval was still too wide to tell."""
        if self.verdict != "no difference" or self.ratio_low is None or self.ratio_high is None:
            return True
        return decisive(self.ratio_low, self.ratio_high, self.max_slowdown)

    def to_dict(self) -> dict:
        return json_safe(asdict(self) | {"regression": self.regression, "conclusive": self.conclusive})


def _label(model, role: str) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"{role} ({type(model).__name__})"


def _feed(model, data, dims: dict[str, int], batch: int | None, notes: list[str]) -> tuple[dict, str]:
    """The one feed the models are timed on, and where it came from."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0):
        raise OptionError(f"--batch {batch!r}: must be a positive whole number")
    if data is not None and not (isinstance(data, str) and data == "synthetic"):
        dataset = load_data(data, model, batch_size=batch, dims=dims)
        if len(dataset) > 1:
            notes.append(f"timed on the first of {len(dataset)} batches of {dataset.source}")
        return dataset.batches[0], dataset.source
    specs = input_specs(model)
    dims = dict(dims)
    if batch is not None:
        for spec in specs:
            first = spec.shape[0] if spec.shape else None
            if isinstance(first, int) and first != batch:
                raise OptionError(f"--batch {batch}: input '{spec.name}' has a fixed first dimension of {first}")
            if isinstance(first, str):
                dims.setdefault(first, batch)
    dataset = synthetic_data(model, dims=dims)
    feed = dataset.batches[0]
    if batch is not None:  # an unnamed dynamic first dim: repeat the one random sample
        feed = {
            s.name: np.repeat(feed[s.name], batch, axis=0) if s.shape and s.shape[0] is None else feed[s.name]
            for s in specs
        }
    notes += dataset.notes
    return feed, "synthetic"


def _batch_of(feed: Mapping[str, np.ndarray], batch: int | None) -> int:
    if batch is not None:
        return batch
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _timing(label: str, runs: list[float], batch: int, interval: tuple[float, float] | None = None) -> ModelTiming:
    median = float(np.median(runs))
    low, high = interval if interval is not None else (None, None)
    return ModelTiming(
        model=label,
        median_ms=median * 1e3,
        p90_ms=float(np.quantile(runs, 0.9)) * 1e3,
        runs=len(runs),
        throughput=batch / median if median > 0 else math.inf,
        median_low_ms=None if low is None or low <= 0 else low * 1e3,
        median_high_ms=None if high is None or not math.isfinite(high) else high * 1e3,
    )


def bench(
    model,
    baseline=None,
    *,
    data=None,
    dims: Mapping[str, int] | Sequence[str] | None = None,
    batch: int | None = None,
    providers: str | Sequence[str] = "cpu",
    threads: int | None = 1,
    inter_threads: int | None = 1,
    optimization: str = "all",
    spinning: bool = False,
    max_slowdown: float | str = DEFAULT_MAX_SLOWDOWN,
    confidence: float = DEFAULT_CONFIDENCE,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    progress: Progress | None = None,
) -> BenchResult:
    """Time ``model`` alone, or against ``baseline`` interleaved, and judge it at ``max_slowdown``.

    ``model`` and ``baseline`` are paths, ``onnx.ModelProto`` or ``ir.Model``. Both run on one
    feed: from ``data`` (a file, arrays, or ``"synthetic"``; synthetic when None), ``batch``
    samples, named dynamic dims from ``dims``. ``threads``/``inter_threads`` are onnxruntime's
    intra- and inter-op thread counts (0 or None: onnxruntime's default); ``max_slowdown`` is a
    fraction or a string such as ``"5%"``. ``budget_seconds`` bounds the whole call, model
    loading aside. Raises an ``OnnxoptError`` on input a user can fix.
    """
    threshold = parse_fraction(max_slowdown)
    if not 0.5 <= confidence < 1:
        raise OptionError(f"--confidence {confidence!r}: must be at least 0.5 and below 1")
    if isinstance(budget_seconds, bool) or not isinstance(budget_seconds, (int, float)) or not 0 < budget_seconds < math.inf:
        raise OptionError(f"--budget {budget_seconds!r}: must be a positive, finite number of seconds")
    settings = timing_settings(providers, threads, inter_threads, optimization, spinning)
    dims = parse_dims(dims)
    candidate = io.load_model(model)
    notes: list[str] = []
    feed, source = _feed(candidate, data, dims, batch, notes)
    labels = [_label(model, "candidate")]
    snapshots = [ModelSnapshot(candidate)]
    del candidate
    try:
        if baseline is not None:
            reference = io.load_model(baseline)
            try:
                load_data(Dataset([feed], source=source), reference)
            except DataError as exc:
                raise DataError(f"{_label(baseline, 'baseline')} takes other inputs than {labels[0]}: {exc}") from None
            snapshots.insert(0, ModelSnapshot(reference))
            labels.insert(0, _label(baseline, "baseline"))
            del reference
        start = time.perf_counter()
        runners = []
        for snapshot, label in zip(snapshots, labels):
            runners.append(make_runner(timing_session(snapshot, settings, label), feed, settings.device))
            check_runs(runners[-1], label)
        budget = max(budget_seconds - (time.perf_counter() - start), 0.1)
        n = _batch_of(feed, batch)
        common = dict(
            confidence=confidence, max_slowdown=threshold, budget_seconds=budget_seconds,
            settings=settings.as_dict() | dict(batch=n, data=source), machine=machine_info(settings.providers),
            notes=notes,
        )
        if baseline is None:
            single = measure_single(runners[0], budget_seconds=budget, confidence=confidence, progress=progress)
            notes.append(SAME_MACHINE_NOTE)
            return BenchResult(
                candidate=_timing(labels[0], single.runs, n, median_interval(single.blocks, confidence)),
                baseline=None, verdict=None, ratio=None, ratio_low=None, ratio_high=None, blocks=len(single),
                calls_per_block=2 * single.inner, seconds=time.perf_counter() - start, stopped=single.stopped,
                **common,
            )
        times, k = measure_pair(
            runners[0], runners[1], budget_seconds=budget, threshold=threshold, confidence=confidence,
            progress=progress,
        )
        figures = summarize(times, threshold=threshold, confidence=confidence)
        result = BenchResult(
            candidate=_timing(labels[1], times.runs_b, n), baseline=_timing(labels[0], times.runs_a, n),
            verdict=figures["verdict"], ratio=figures["ratio"], ratio_low=figures["ratio_low"],
            ratio_high=figures["ratio_high"], blocks=len(times), calls_per_block=4 * k,
            seconds=time.perf_counter() - start, stopped=times.stopped, **common,
        )
        if not result.conclusive:
            notes.append(
                f"the interval still reaches past ±{threshold:.0%} after {result.seconds:.0f} s: 'no difference' "
                "here means 'not shown'; a larger --budget gives a firmer answer"
            )
        return result
    finally:
        for snapshot in snapshots:
            snapshot.close()


def write_json(result: BenchResult, path: str | os.PathLike) -> None:
    """Write the result as JSON, atomically."""
    try:
        write_json_file(result.to_dict(), path)
    except OSError as exc:
        raise OptionError(f"--json {path}: cannot write ({exc.strerror or exc})") from None


# --- the command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:

    parser = ArgumentParser(
        prog="onnxopt bench",
        description="Time an ONNX model, or a candidate against a baseline interleaved, with a regression verdict.",
        epilog="Exit codes: 0 no regression, 1 the candidate is slower beyond --max-slowdown, 2 bad input.",
    )
    parser.add_argument("model", help="the .onnx model to time (the candidate, with --vs)")
    parser.add_argument("--vs", metavar="BASELINE", help="the baseline .onnx to compare against, timed interleaved")
    parser.add_argument("--max-slowdown", default="5%", metavar="PCT", help="slowdown allowed before failing, e.g. 5%% or 0.05 (default 5%%)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="confidence of the ratio's interval (default 0.95)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS, metavar="S", help=f"seconds of timing at most (default {DEFAULT_BUDGET_SECONDS:g}); stops sooner once settled")
    parser.add_argument("--providers", default="cpu", help="execution provider: cpu (default), cuda, ...")
    parser.add_argument("--threads", type=int, default=1, metavar="N", help="intra-op threads (default 1: stable on shared machines; 0: onnxruntime's default)")
    parser.add_argument("--inter-threads", type=int, default=1, metavar="N", help="inter-op threads (default 1; 0: onnxruntime's default)")
    parser.add_argument("--optimization", default="all", choices=list(OPTIMIZATION_LEVELS), help="onnxruntime graph optimization level (default all)")
    parser.add_argument("--spin", dest="spinning", action="store_true", help="let worker threads spin-wait (onnxruntime's default; noisy on shared cores)")
    parser.add_argument("--batch", type=int, metavar="N", help="samples per run: the first dim of synthetic inputs, or how --data is cut")
    parser.add_argument("--data", help="inputs: .npz, folder of .npy, onnx test-data .pb, or 'synthetic' (default)")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="size of a named dynamic dim for synthetic inputs (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON (verdict, ratio and interval, medians, settings)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (the exit code still tells)")
    return parser


def main(argv: list[str] | None = None) -> int:

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # --help, or a bad option (already printed in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    line = ProgressLine(enabled=not args.quiet, stream=sys.stderr)
    try:
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise OptionError(f"--json {args.json}: folder '{os.path.dirname(os.path.abspath(args.json))}' does not exist")
        result = bench(
            args.model, args.vs, data=args.data, dims=args.dim, batch=args.batch, providers=args.providers,
            threads=args.threads, inter_threads=args.inter_threads, optimization=args.optimization,
            spinning=args.spinning, max_slowdown=args.max_slowdown, confidence=args.confidence,
            budget_seconds=args.budget,
            progress=lambda blocks, elapsed: line(f"timing: {blocks} blocks, {elapsed:.0f}/{args.budget:.0f} s", 0, 1),
        )
        line("done", 1, 1)
        if args.json:
            write_json(result, args.json)
    except OnnxoptError as exc:
        line("done", 1, 1)
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        line("done", 1, 1)
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(render_bench(result))
    return EXIT_SLOWER if result.regression else EXIT_OK

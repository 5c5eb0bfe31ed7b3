"""Latency of one model, or of two side by side, with a verdict that holds on a noisy, shared machine.

Measurement
    Each session first warms up (arena allocation, kernel choice). Then A and B run in *blocks*:
    ``k`` calls of A, ``k`` of B, ``k`` of B, ``k`` of A (ABBA), the next block BAAB, and so on,
    with ``k`` chosen so that ``k`` calls last about 3 ms. Every call is timed on its own. Drift
    (another process, frequency changes, a warming cache) that is slow compared with a block hits
    A and B alike; the ABBA/BAAB order also gives each model as many runs right after a switch as
    right after itself. Python's garbage collector is paused while timing.

    On CPU, sessions use one intra-op thread unless told otherwise, and worker threads do not
    spin-wait: on two shared cores, onnxruntime's default (one spinning thread per core) made the
    per-block ratio five times noisier (robust SD 0.3 instead of 0.06 on a 1 ms model) and runs
    took three times longer. With CUDA, inputs and outputs stay on the device (I/O binding), so
    that host copies do not dominate what is timed.

Statistics
    A block gives one ratio ``r_i = min(B's 2k calls) / min(A's 2k calls)``. The fastest call of
    a block is the one no other process interrupted: under load (two busy processes on two
    cores) the ratio of block minima kept its value (1.24 for 25% more work) and a robust SD of
    0.03, where the ratio of block medians drifted (0.90 to 1.28 for the same pair of models)
    because a longer call is preempted more often. The ratio reported is the median of the
    ``r_i``; its interval is the sign-test (order-statistic) interval of that median: with ``n``
    blocks, the ``j``-th smallest and ``j``-th largest ratio, where ``j`` is the largest integer
    with ``P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2``. It assumes nothing about the shape
    of the noise (heavy tails, bursts), only that blocks are exchangeable. The medians and p90
    shown beside the ratio are those of every timed call.

Verdict, at a threshold ``t`` (``max_slowdown``) with ``U = 1 + t`` and ``L = 1 / (1 + t)``
    ``slower`` when the median ratio exceeds ``U`` *and* the interval lies above 1 (the
    difference is both large enough to matter and real); ``faster`` when the ratio is below ``L``
    and the interval lies below 1; ``no difference`` otherwise. A false alarm therefore needs a
    point estimate more than ``t`` away from the truth, not merely an interval that misses 1
    (which a persistent 1% difference between two sessions of the same model, e.g. from memory
    placement, would produce on a long run); a missed regression of ``3t`` or more needs the
    interval to stretch below 1.

Stopping
    After at least 20 blocks and 1 s of timing (or, where the budget cannot hold 20 blocks, as soon
    as the interval is finite: 6 blocks at 95%), the interval is checked as blocks accrue, and
    timing stops as soon as it is *decisive*: it lies wholly above ``U`` (slower whatever more
    data says), wholly below ``L``, or wholly inside ``(L, U)`` (no difference at this
    threshold); or when its half-width is under 1% of the ratio (more data would not help); or
    when the next block would overrun the budget (warm-up included; session creation is not).
    Two models far apart, or alike, are therefore settled in a second or two; time is spent only
    where the ratio is near the threshold. The verdict rules do not depend on when timing
    stopped, and because a decisive stop needs the interval beyond a threshold, looking at the
    interval repeatedly does not add false alarms at the scale of ``t``.

Measured on a shared 2-core Xeon (load average 2-5 from other jobs, plus added load: busy
loops, a multi-threaded matrix product, bursts), 0.3-1.5 ms models, defaults, ``t = 5%``:
    identical models judged ``no difference`` in 240 of 240 comparisons, 25% more work judged
    ``slower`` in 240 of 240, 10% more in 20 of 20; 3% more work judged ``no difference`` in 20
    of 20, and 5% (the threshold itself) ``slower`` in 8 of 20. A comparison took 1.4 s
    (median), 3.2 s at most. ``benchmarks/latency.py`` times the first two; ``tests/test_latency.py``
    checks them at 19 of 20 on a simulated noisy machine (a virtual clock).

Absolute figures (median, p90, throughput) compare only on the same machine with the same
settings; the ratio of two models timed together is what carries over.
"""

from __future__ import annotations

__all__ = [
    "PairedTimes",
    "SingleTimes",
    "DEFAULT_BUDGET_SECONDS",
    "DEFAULT_MAX_SLOWDOWN",
    "DEFAULT_CONFIDENCE",
    "measure_pair",
    "measure_single",
    "median_interval",
    "summarize",
    "verdict",
    "decisive",
    "parse_fraction",
    "TimingSettings",
    "timing_settings",
    "timing_session",
    "make_runner",
    "check_runs",
    "compare_latency",
    "machine_description",
    "machine_info",
]

import gc
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from onnxopt.errors import DataError, ModelLoadError, OptionError
from onnxopt.report import LatencyComparison
from onnxopt.runtime import CPU_FLOAT16_DISABLED, OPTIMIZATION_LEVELS, ModelSnapshot, resolve_providers, session_options

DEFAULT_BUDGET_SECONDS = 20.0
DEFAULT_MAX_SLOWDOWN = 0.05
DEFAULT_CONFIDENCE = 0.95

# k calls of one model in a row should last about this long: long enough that a switch between
# sessions is a small part of it, short enough that many blocks fit in the budget.
_HALF_BLOCK_SECONDS = 0.003
_MIN_BLOCKS = 20
_MIN_TIMING_SECONDS = 1.0
_TARGET_HALFWIDTH = 0.01
_WARMUP_SECONDS = 0.3
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_MIN_WARMUP_CALLS = 3

Progress = Callable[[int, float], None]


@dataclass
class PairedTimes:
    """Interleaved timings of A and B in seconds: one entry per block in ``a``/``b``, every call in ``runs_*``."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    runs_a: list[float] = field(default_factory=list)
    runs_b: list[float] = field(default_factory=list)
    inner: int = 1
    seconds: float = 0.0
    stopped: str = ""

    def __len__(self) -> int:
        return len(self.a)

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.b) / np.asarray(self.a)


@dataclass
class SingleTimes:
    """Timings of one model: block medians in ``blocks``, every call in ``runs`` (seconds)."""

    blocks: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)
    inner: int = 1
    seconds: float = 0.0
    stopped: str = ""

    def __len__(self) -> int:
        return len(self.blocks)


def median_interval(values, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval of the median (sign test): a pair of order statistics.

    Returns ``(0, inf)`` when there are too few values for the confidence asked (fewer than 6
    at 95%).
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    tail = (1 - confidence) / 2
    # j = how many values may be cut from each end: the largest j with P(Bin(n, 1/2) <= j - 1) <= tail.
    log_half_n = n * math.log(0.5)
    cdf, j = 0.0, 0
    for i in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
        if cdf > tail:
            break
        j = i + 1
    if j == 0:
        return 0.0, math.inf
    return float(x[j - 1]), float(x[n - j])


def interval_values(confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest values whose ``median_interval`` is finite (6 at 95%)."""
    return max(1, math.ceil(math.log((1 - confidence) / 2) / math.log(0.5) - 1e-12))


def pair_seconds_needed(call_seconds: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The least time ``measure_pair`` takes to reach a finite interval when each model's call takes
    ``call_seconds``: the warm-up (3 calls each) and ``interval_values`` blocks of ABBA half-blocks.
    A caller with less budget than this gets ``no difference`` whatever the models (sessions'
    creation not counted)."""
    k = max(1, math.ceil(_HALF_BLOCK_SECONDS / max(call_seconds, 1e-7)))
    warm = max(2 * _MIN_WARMUP_CALLS * call_seconds, _WARMUP_SECONDS) if call_seconds < _WARMUP_SECONDS else 2 * call_seconds
    return warm + interval_values(confidence) * 4 * k * call_seconds


def verdict(ratio: float, low: float, high: float, threshold: float) -> str:
    """``slower``, ``faster`` or ``no difference`` for a ratio B/A and its interval (module docstring)."""
    if ratio > 1 + threshold and low > 1:
        return "slower"
    if ratio < 1 / (1 + threshold) and high < 1:
        return "faster"
    return "no difference"


def decisive(low: float, high: float, threshold: float) -> bool:
    """Whether an interval settles the verdict: wholly beyond ``1 + t`` or ``1 / (1 + t)``, or wholly between."""
    upper, lower = 1 + threshold, 1 / (1 + threshold)
    return low > upper or high < lower or (lower < low and high < upper)


def _timed(fn: Callable[[], object], count: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        fn()
        out.append(clock() - start)


class _GcPaused:
    """Pause Python's garbage collector (a collection inside a timed call is noise)."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()


def warm_up(runs: Sequence[Callable[[], object]], seconds: float) -> int:
    """Run each callable in turn for ``seconds`` (at least 3 times each, or once each where a call
    alone outlasts ``seconds``); return the inner count ``k``.

    The first call allocates (arena, prepacked weights); where one call takes longer than the
    whole warm-up (a batch of 32 text lines: 2.3 s), two more calls each only cost time: they
    took 9 of the PaddleOCR recognizer's 22 s per side-by-side timing (2 shared cores)."""
    times: list[list[float]] = [[] for _ in runs]
    end = time.perf_counter() + seconds
    while True:
        for fn, out in zip(runs, times):
            _timed(fn, 1, out)
        if time.perf_counter() >= end and (len(times[0]) >= _MIN_WARMUP_CALLS
                                           or min(t[-1] for t in times) >= seconds):
            break
    # The first calls are the slow ones: judge the cost of a call by the later half.
    per_call = min(float(np.median(t[len(t) // 2 :])) for t in times)
    return max(1, math.ceil(_HALF_BLOCK_SECONDS / max(per_call, 1e-7)))


def measure_pair(
    run_a: Callable[[], object],
    run_b: Callable[[], object],
    *,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    threshold: float = DEFAULT_MAX_SLOWDOWN,
    confidence: float = DEFAULT_CONFIDENCE,
    min_pairs: int = _MIN_BLOCKS,
    min_seconds: float = _MIN_TIMING_SECONDS,
    max_pairs: int = 1_000_000,
    target_halfwidth: float = _TARGET_HALFWIDTH,
    warmup_seconds: float = _WARMUP_SECONDS,
    progress: Progress | None = None,
    stop_undecidable: bool = False,
    stretch: float = 1.0,
) -> tuple[PairedTimes, int]:
    """Time two callables in ABBA/BAAB blocks until the verdict is settled or the budget is spent.

    ``a[i]``/``b[i]`` are the fastest call of each model in block ``i``; every call is kept in
    ``runs_a``/``runs_b`` for medians and p90.

    Returns the timings and the number of calls per half-block ``k``. See the module docstring
    for the stopping rule; ``progress(blocks, elapsed_seconds)`` is called after each block.
    With ``stop_undecidable``, timing also stops (``stopped == "undecidable"``) once the budget
    cannot hold the blocks that a finite interval needs (6 at 95%), even were the next blocks a
    quarter faster than the last: the verdict is then ``no difference`` whenever it stops, and a
    caller that acts only on a ``faster``/``slower`` verdict (the speed fallback, whose models run
    0.6-2.3 s a call on a batch of text images) saves the rest of the budget.
    ``stretch``: where the budget ends before the interval is finite (6 blocks at 95%), timing goes
    on to those blocks while it stays within ``stretch`` times the budget (a report's latency on a
    slow model or a loaded machine: a ratio with an interval, not "no verdict").
    """
    start = time.perf_counter()
    times = PairedTimes()
    with _GcPaused():
        times.inner = k = warm_up((run_a, run_b), min(warmup_seconds, budget_seconds / 10))
        timing_start = time.perf_counter()
        next_check = min_pairs
        block_seconds = 0.0
        needed = interval_values(confidence)  # blocks of the first finite interval

        def reachable(now: float, per_block: float) -> int:
            """Blocks done, and those the rest of the budget holds at ``per_block`` seconds each."""
            return len(times) + int(max(budget_seconds - (now - start), 0.0) // per_block)

        while True:
            block_start = time.perf_counter()
            end = block_start - start + block_seconds  # where the next block would end
            if len(times) and end > budget_seconds and not (len(times) < needed and end <= stretch * budget_seconds):
                times.stopped = "budget"
                break
            ta: list[float] = []
            tb: list[float] = []
            order = ((run_a, ta), (run_b, tb), (run_b, tb), (run_a, ta))
            if len(times) % 2:
                order = order[1], order[0], order[3], order[2]
            for fn, out in order:
                _timed(fn, k, out)
            times.a.append(min(ta))
            times.b.append(min(tb))
            times.runs_a += ta
            times.runs_b += tb
            now = time.perf_counter()
            block_seconds = now - block_start
            if progress:
                progress(len(times), now - start)
            if len(times) >= max_pairs:
                times.stopped = "max_pairs"
                break
            if stop_undecidable and len(times) < needed and reachable(now, 0.75 * block_seconds) < needed:
                times.stopped = "undecidable"
                break
            if needed <= len(times) < next_check and min_pairs <= _MIN_BLOCKS and reachable(now, block_seconds) < min_pairs:
                # The budget cannot hold ``min_pairs`` blocks (calls of a tenth of a second): the verdict
                # would come from fewer blocks at the budget's end anyway, so it may come as soon as it is
                # settled. A caller asking for more blocks than the default gets them.
                next_check = len(times)
            if len(times) >= next_check and now - timing_start >= min_seconds:
                next_check = len(times) + max(1, len(times) // 50)
                ratios = times.ratios
                low, high = median_interval(ratios, confidence)
                if decisive(low, high, threshold):
                    times.stopped = "decided"
                    break
                if (high - low) / 2 <= target_halfwidth * float(np.median(ratios)):
                    times.stopped = "precise"
                    break
    times.seconds = time.perf_counter() - start
    return times, k


def measure_single(
    run: Callable[[], object],
    *,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    confidence: float = DEFAULT_CONFIDENCE,
    min_blocks: int = _MIN_BLOCKS,
    min_seconds: float = _MIN_TIMING_SECONDS,
    target_halfwidth: float = 2 * _TARGET_HALFWIDTH,
    warmup_seconds: float = _WARMUP_SECONDS,
    progress: Progress | None = None,
) -> SingleTimes:
    """Time one callable in blocks of ``k`` calls until its median is known within ``target_halfwidth``."""
    start = time.perf_counter()
    times = SingleTimes()
    with _GcPaused():
        times.inner = k = warm_up((run,), min(warmup_seconds, budget_seconds / 10))
        timing_start = time.perf_counter()
        block_seconds = 0.0
        while True:
            block_start = time.perf_counter()
            if len(times) and block_start - start + block_seconds > budget_seconds:
                times.stopped = "budget"
                break
            calls: list[float] = []
            _timed(run, 2 * k, calls)
            times.blocks.append(float(np.median(calls)))
            times.runs += calls
            now = time.perf_counter()
            block_seconds = now - block_start
            if progress:
                progress(len(times), now - start)
            if len(times) >= min_blocks and now - timing_start >= min_seconds:
                low, high = median_interval(times.blocks, confidence)
                if (high - low) / 2 <= target_halfwidth * float(np.median(times.blocks)):
                    times.stopped = "precise"
                    break
    times.seconds = time.perf_counter() - start
    return times


def summarize(
    times: PairedTimes,
    *,
    threshold: float = DEFAULT_MAX_SLOWDOWN,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Medians and p90 of every call, the median block ratio B/A with its interval, and the verdict."""
    a = np.asarray(times.runs_a or times.a)
    b = np.asarray(times.runs_b or times.b)
    ratios = times.ratios
    ratio = float(np.median(ratios))
    low, high = median_interval(ratios, confidence)
    return dict(
        median_a_ms=float(np.median(a)) * 1e3,
        median_b_ms=float(np.median(b)) * 1e3,
        p90_a_ms=float(np.quantile(a, 0.9)) * 1e3,
        p90_b_ms=float(np.quantile(b, 0.9)) * 1e3,
        ratio=ratio,
        ratio_low=low,
        ratio_high=high,
        confidence=confidence,
        repetitions=len(times),
        verdict=verdict(ratio, low, high, threshold),
    )


def parse_fraction(value, what: str = "--max-slowdown") -> float:
    """``"5%"``, ``"0.05"`` or ``0.05`` → 0.05; a bare number above 1 is refused as ambiguous."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise OptionError(f"{what} {value!r}: expected a percentage such as 5% or a fraction such as 0.05") from None
    if not text.endswith("%") and fraction > 1:
        raise OptionError(f"{what} {value!r}: ambiguous; write {text}% or {fraction / 100:g}")
    if not 0 < fraction < 10 or not math.isfinite(fraction):
        raise OptionError(f"{what} {value!r}: must be above 0%")
    return fraction


# --- sessions, feeds, machines -----------------------------------------------------------------


@dataclass(frozen=True)
class TimingSettings:
    """The session settings both models are timed under (see ``timing_settings``)."""

    providers: tuple[str, ...]
    threads: int | None
    inter_threads: int | None
    optimization: str
    spinning: bool

    @property
    def device(self) -> str | None:
        """The device that I/O binding keeps tensors on, or None to use ``session.run``."""
        return "cuda" if self.providers[0] in _CUDA_PROVIDERS else None

    def as_dict(self) -> dict:
        return dict(
            providers=list(self.providers),
            threads=self.threads,
            inter_threads=self.inter_threads,
            optimization=self.optimization,
            spinning=self.spinning,
            io_binding=self.device is not None,
        )


def timing_settings(
    providers: str | Sequence[str] = "cpu",
    threads: int | None = 1,
    inter_threads: int | None = 1,
    optimization: str = "all",
    spinning: bool = False,
) -> TimingSettings:
    """Checked settings: provider short names resolved, thread counts whole (0/None: onnxruntime's choice)."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise OptionError(f"--optimization {optimization!r}: unknown level (known: {', '.join(OPTIMIZATION_LEVELS)})")
    for name, value in (("threads", threads), ("inter-threads", inter_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise OptionError(f"--{name} {value!r}: must be a whole number (0 for onnxruntime's default)")
    return TimingSettings(tuple(resolve_providers(providers)), threads, inter_threads, optimization, bool(spinning))


def timing_session(snapshot: ModelSnapshot, settings: TimingSettings, label: str,
                   profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session for timing; worker threads do not spin-wait unless ``settings.spinning``.
    With ``profile_prefix``, onnxruntime's profiler writes its trace there (see ``onnxopt.profiling``)."""
    options = session_options(
        optimization=settings.optimization,
        intra_op_threads=settings.threads,
        inter_op_threads=settings.inter_threads,
    )
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not settings.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = snapshot.data if snapshot.data is not None else snapshot.path
    extra = {"disabled_optimizers": list(CPU_FLOAT16_DISABLED)} if getattr(snapshot, "float16", False) else {}
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(settings.providers), **extra)
    except Exception as exc:
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelLoadError(f"{label}: onnxruntime cannot load the model: {text}") from None


def make_runner(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray], device: str | None = None
) -> Callable[[], object]:
    """A call that runs ``session`` on ``feed``; with ``device``, inputs and outputs stay there (I/O binding)."""
    names = [o.name for o in session.get_outputs()]
    if device is None:
        feed = dict(feed)
        return lambda: session.run(names, feed)
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0))
    for name in names:
        binding.bind_output(name, device, 0)
    binding.synchronize_inputs()
    # run_with_iobinding synchronizes the device's stream before it returns, so a call is timed whole.
    return lambda: session.run_with_iobinding(binding)


def call_seconds(snapshot: ModelSnapshot, feed: Mapping[str, np.ndarray], settings: TimingSettings) -> float:
    """Seconds of one warm call of ``snapshot`` on ``feed`` (the faster of two after the first): a
    cheap estimate, for deciding whether a timing can reach a verdict at all."""
    session = timing_session(snapshot, settings, "the model")
    run = make_runner(session, feed, settings.device)
    check_runs(run, "the model")
    spent = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        spent.append(time.perf_counter() - start)
    return min(spent)


def check_runs(run: Callable[[], object], label: str) -> None:
    """Run once, turning onnxruntime's failure on these inputs into a one-line ``DataError``."""
    try:
        run()
    except Exception as exc:
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DataError(f"{label}: onnxruntime cannot run the model on these inputs: {text}") from None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    tool = shutil.which("nvidia-smi")
    if not tool:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def machine_info(providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict:
    """Where figures were taken: CPU model and cores, GPU (when a CUDA provider is used), versions."""
    info = dict(
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        onnxruntime=ort.__version__,
    )
    if any(p in _CUDA_PROVIDERS for p in providers):
        info["gpu"] = _gpu_name()
    return info


def machine_description(threads: int | None = None) -> str:
    """CPU model and thread count: absolute latencies compare only on the same machine."""
    return f"{_cpu_name()}, {os.cpu_count()} cores, threads={threads or 'default'}"


# --- the comparison used by the optimize pipeline --------------------------------------------


def compare_latency(
    model_a: ModelSnapshot,
    model_b: ModelSnapshot,
    feed: Mapping[str, np.ndarray],
    *,
    providers="cpu",
    threads: int | None = None,
    budget_seconds: float = 5.0,
    threshold: float = DEFAULT_MAX_SLOWDOWN,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: Progress | None = None,
    stop_undecidable: bool = False,
    stretch: float = 1.0,
) -> LatencyComparison:
    """Latency of ``model_b`` against ``model_a`` on one feed, interleaved, under the same settings.

    ``threads=None`` means one intra-op thread: a ratio measured on one thread is stable on a
    shared machine (``threads=0`` gives onnxruntime's default). ``stop_undecidable``, ``stretch``: see ``measure_pair``.
    """
    threads = 1 if threads is None else threads
    settings = timing_settings(providers, threads, 1, "all", False)
    start = time.perf_counter()
    session_a = timing_session(model_a, settings, "original")
    session_b = timing_session(model_b, settings, "candidate")
    spent = time.perf_counter() - start
    times, _ = measure_pair(
        make_runner(session_a, feed, settings.device), make_runner(session_b, feed, settings.device),
        budget_seconds=max(budget_seconds - spent, 0.1), threshold=threshold, confidence=confidence,
        progress=progress, stop_undecidable=stop_undecidable, stretch=stretch,
    )
    figures = summarize(times, threshold=threshold, confidence=confidence)
    return LatencyComparison(
        **figures, providers=list(settings.providers), threads=threads, machine=machine_description(threads),
        seconds=time.perf_counter() - start,
    )

"""Many recipes over one model: built in parallel, cached, timed apart, and judged on a Pareto front.

A *grid* (TOML) expands to recipes (``expand_grid``); ``run_sweep`` builds each with
``optimize()`` (no latency) in a worker process, or as a Ray task (``onnxopt.sweep_ray``), and
keeps each model under ``out_dir/models/<key>.onnx`` with its figures in ``<key>.json``. The key
is the sha256 of the input model's bytes, the recipe's TOML and the bytes of its data files, so a
rerun or an extended grid builds only the recipes it has not built before (``cached``). A recipe
that fails (an error, a failed validation, a worker that died) is recorded with ``error`` and the
sweep goes on; failures are not cached, a rerun tries them again.

Latency is measured in a phase of its own, after every build: each model against the original,
interleaved and paired (``onnxopt.latency.compare_latency``), one at a time in this process, so
that no concurrent build disturbs the clock. Then the Pareto front over quality (accuracy with
labels, else the least cosine over outputs: higher is better), the latency ratio (lower) and the
file's bytes (lower): a result is on the front (``pareto``) when no other is at least as good on
every objective and better on one, where two latency ratios within each other's noise (overlapping
95% intervals, or medians within 5%) count as equally good, so that the front does not follow the
timing noise of one run or engine (``dominates``). ``out_dir/sweep.json``
holds every result; each front point's recipe is written as ``out_dir/front-<n>.toml``, which
``python -m onnxopt MODEL --recipe`` replays.
"""

from __future__ import annotations

__all__ = ["SweepEntry", "SweepResult", "expand_grid", "load_grid", "recipe_key", "run_sweep", "pareto_flags",
           "build_recipe", "dominates", "latency_compare"]

import concurrent.futures
import contextlib
import glob
import hashlib
import itertools
import math
import multiprocessing
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from onnxopt import io
from onnxopt.errors import OnnxoptError, OptionError, one_line
from onnxopt.recipe import Recipe, read_toml
from onnxopt.sweep_build import _worker_init, build_recipe, report_metrics  # noqa: F401  (build_recipe: the public face)

Progress = Callable[[str, int, int], None]

# Fields that may be None, where a grid's "none" means None (quantize = ["none", "int8"]).
_NULLABLE = frozenset({f.name for f in fields(Recipe) if f.default is None} | {"target"})
# Fields whose one value is a list or a table: a grid gives a list of such values.
_LIST_VALUED = frozenset({"passes", "exclude", "providers"})
_TABLE_VALUED = frozenset({"dims", "fix_dims"})
_DATA_FIELDS = ("data", "calibration")
# The most recipes a grid may expand to: each is a whole optimize() run, timed after.
MAX_RECIPES = 1000
MAX_WORKERS = 256


# -- the grid ---------------------------------------------------------------------------------------


def load_grid(path: str | os.PathLike) -> list[Recipe]:
    """The recipes a grid TOML file expands to (``expand_grid``); a bad file is a one-line ``OptionError``."""
    return expand_grid(read_toml(path, "--grid"), where=f"--grid {path}")


def expand_grid(table: Mapping[str, Any], *, where: str = "grid") -> list[Recipe]:
    """The recipes of a grid: the product of its keys' lists, then its ``[[recipe]]`` tables.

    Each top-level key is a ``Recipe`` field with a list of values (a single value is a list of
    one; ``"none"`` is None where the field may be None); ``passes``, ``exclude`` and
    ``providers`` take a list of lists. ``[base]`` holds fields every recipe shares;
    ``[[recipe]]`` tables add recipes one by one (over ``base``). Identical recipes are kept
    once. Unknown keys and bad values are refused in one line, naming the recipe.
    """
    table = dict(table)
    base = table.pop("base", {})
    listed = table.pop("recipe", [])
    if not isinstance(base, Mapping):
        raise OptionError(f"{where}: 'base' must be a table ([base])")
    if not isinstance(listed, list) or not all(isinstance(r, Mapping) for r in listed):
        raise OptionError(f"{where}: 'recipe' must be an array of tables ([[recipe]])")
    _check_names(table, where)
    _check_names(base, f"{where} [base]")
    for i, entry in enumerate(listed, 1):
        _check_names(entry, f"{where} [[recipe]] {i}")
    axes = [(name, _values(name, value, where)) for name, value in table.items()]
    count = (math.prod(len(v) for _, v in axes) if axes else 0) + len(listed)
    if count > MAX_RECIPES:  # counted before any is built: 1000 x 1000 values would fill the memory first
        sizes = " x ".join(str(len(v)) for _, v in axes) or "0"
        raise OptionError(f"{where}: {count:,} recipes ({sizes} from the lists, {len(listed)} listed); "
                          f"a sweep takes at most {MAX_RECIPES:,}: give fewer values")
    combos = [dict(zip([n for n, _ in axes], c)) for c in itertools.product(*(v for _, v in axes))] if axes else []
    raw = [{**base, **c} for c in combos] + [{**base, **entry} for entry in listed]
    if not raw:
        if not base:
            raise OptionError(f"{where}: no recipes: give fields with lists of values, or [[recipe]] tables")
        raw = [dict(base)]
    recipes, seen = [], set()
    for i, values in enumerate(raw, 1):
        values = {k: None if k in _NULLABLE and v == "none" else v for k, v in values.items()}
        try:
            recipe = Recipe(**values)
            recipe.check_options()
            text = recipe.to_toml()
        except OnnxoptError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if k not in base)
            raise OptionError(f"{where}: recipe {i}{f' ({shown})' if shown else ''}: {exc}") from None
        if text not in seen:
            seen.add(text)
            recipes.append(recipe)
    return recipes


def _check_names(names: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise OptionError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(sorted(known))})")


def _values(name: str, value, where: str) -> list:
    if name in _TABLE_VALUED and isinstance(value, Mapping):
        return [value]
    if not isinstance(value, list):
        if isinstance(value, Mapping):
            raise OptionError(f"{where}: {name}: give a list of values, not a table")
        return [value]
    if not value:
        raise OptionError(f"{where}: {name}: an empty list gives no recipes")
    if name in _LIST_VALUED and not all(isinstance(v, list) for v in value):
        raise OptionError(f"{where}: {name}: give a list of lists, e.g. {name} = [[\"simplify\", \"fold-bn\"], "
                          f"[\"simplify\"]]; one list for every recipe goes under [base]")
    return value


# -- keys and caching -------------------------------------------------------------------------------


def _file_digest(path: str, cache: dict[str, str]) -> str:
    """sha256 of a file's bytes, or of every file under a folder (names and bytes); other values as text."""
    if path in cache:
        return cache[path]
    h = hashlib.sha256()
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif p.is_dir():
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(child.relative_to(p)).encode() + b"\0" + child.read_bytes())
    else:
        h.update(b"value:" + str(path).encode())
    cache[path] = h.hexdigest()
    return cache[path]


def model_digest(model_path: str | os.PathLike) -> str:
    """sha256 of the model file and of its external data files (in name order)."""
    h = hashlib.sha256()
    for path in [Path(model_path), *sorted(io.referenced_files(model_path))]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def recipe_key(model_digest_hex: str, recipe: Recipe, digests: dict[str, str] | None = None) -> str:
    """The cache key of ``recipe`` on a model: sha256 of the model's digest, the recipe's TOML with its
    data paths left out, and the digests of its data files (a moved file keeps its key; an edited one
    does not)."""
    digests = {} if digests is None else digests
    data = {name: getattr(recipe, name) for name in _DATA_FIELDS}
    text = recipe.replace(data=None, calibration=None).to_toml()
    h = hashlib.sha256(model_digest_hex.encode() + b"\0" + text.encode())
    for name, value in data.items():
        if value is not None:
            h.update(f"\0{name}:".encode() + _file_digest(os.fspath(value), digests).encode())
    return h.hexdigest()[:32]


# -- results ----------------------------------------------------------------------------------------


@dataclass
class SweepEntry:
    """One recipe's result: its figures, where its model is, and whether it was built now."""

    recipe: Recipe
    key: str
    metrics: dict = field(default_factory=dict)
    model: str | None = None
    cached: bool = False
    pareto: bool = False
    error: str | None = None
    built: dict = field(default_factory=dict)

    def recipe_fields(self) -> dict:
        return tomllib.loads(self.recipe.to_toml())

    def to_dict(self) -> dict:
        return {"recipe": self.recipe_fields(), "key": self.key, "metrics": self.metrics, "model": self.model,
                "cached": self.cached, "pareto": self.pareto, "error": self.error, "built": self.built}


@dataclass
class SweepResult:
    """Every recipe's result, in the grid's order, and where they were written."""

    entries: list[SweepEntry]
    out_dir: str
    quality: str | None  # "accuracy" or "cosine": the front's first objective
    seconds: float = 0.0
    build_seconds: float = 0.0
    timing_seconds: float = 0.0
    engine: str = "pool"
    fronts: list[str] = field(default_factory=list)
    model: str = ""  # the input model's path

    @property
    def front(self) -> list[SweepEntry]:
        return [e for e in self.entries if e.pareto]

    @property
    def failed(self) -> list[SweepEntry]:
        return [e for e in self.entries if e.error]

    def to_dict(self) -> dict:
        return {"model": self.model, "results": [e.to_dict() for e in self.entries], "quality": self.quality,
                "engine": self.engine,
                "seconds": self.seconds, "build_seconds": self.build_seconds, "timing_seconds": self.timing_seconds,
                "fronts": self.fronts}


# -- the Pareto front -------------------------------------------------------------------------------


def objectives(entries: Sequence[SweepEntry]) -> tuple[str | None, list[tuple[str, int]]]:
    """The quality figure (accuracy where every good result has one, else cosine) and the objectives
    (name, sign: +1 higher is better, -1 lower) that every good result has."""
    good = [e for e in entries if not e.error]
    quality = None
    for name in ("accuracy", "cosine"):
        if good and all(e.metrics.get(name) is not None for e in good):
            quality = name
            break
    chosen = [(quality, 1)] if quality else []
    for name in ("latency_ratio", "file_bytes"):
        if good and all(e.metrics.get(name) is not None for e in good):
            chosen.append((name, -1))
    return quality, chosen


def pareto_flags(points: Sequence[Sequence[float]]) -> list[bool]:
    """For points whose coordinates are all 'higher is better': True where no other point is at
    least as high everywhere and higher somewhere."""
    flags = []
    for i, p in enumerate(points):
        dominated = any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))
                        for j, q in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


LATENCY_TIE = 0.05  # as ``onnxopt bench``'s default --max-slowdown: smaller differences are a tie


def latency_compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    """-1 where ``a``'s latency ratio is lower than ``b``'s beyond the noise, 1 where higher, 0 a tie.

    Two ratios, each timed against the original in its own paired run, differ by noise: on a model
    where no recipe changes the kernels much they are all within a few percent of 1, and which one
    looks faster changes from run to run. So, as ``onnxopt.latency.verdict`` decides "faster", a
    difference counts only when it is real and large enough to matter: the two 95% intervals
    (``latency_low``..``latency_high``) do not overlap, where both are known, and the medians differ
    by more than 5% (``LATENCY_TIE``) of the larger. The 5% floor is needed beside the intervals:
    each interval is a few tenths of a percent wide, from one run's paired blocks, while the same
    recipe timed in another run (another engine, another load) moves by several percent.
    """
    ra, rb = float(a["latency_ratio"]), float(b["latency_ratio"])
    if abs(ra - rb) <= LATENCY_TIE * max(abs(ra), abs(rb)):
        return 0
    lows, highs = (a.get("latency_low"), b.get("latency_low")), (a.get("latency_high"), b.get("latency_high"))
    if None not in lows and None not in highs and not (float(highs[0]) < float(lows[1]) or
                                                       float(highs[1]) < float(lows[0])):
        return 0  # the intervals overlap
    return -1 if ra < rb else 1


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], chosen: Sequence[tuple[str, int]]) -> bool:
    """Whether metrics ``a`` dominate ``b`` on the objectives ``chosen`` (name, +1 higher is better,
    -1 lower): at least as good on every one and better on one, where latency ratios within each
    other's noise (``latency_compare``) are as good as each other."""
    better = False
    for name, sign in chosen:
        if name == "latency_ratio":
            c = -latency_compare(a, b)  # 1: a is faster
        else:
            x, y = sign * float(a[name]), sign * float(b[name])
            c = (x > y) - (x < y)
        if c < 0:
            return False
        better = better or c > 0
    return better


def _mark_front(entries: list[SweepEntry]) -> str | None:
    quality, chosen = objectives(entries)
    good = [e for e in entries if not e.error]
    for e in entries:
        e.pareto = False
    if not chosen:
        return quality
    for e in good:
        e.pareto = not any(dominates(o.metrics, e.metrics, chosen) for o in good if o is not e)
    return quality


def front_order(entries: Sequence[SweepEntry], quality: str | None) -> list[SweepEntry]:
    """Front points first, then the dominated, then the failed; each by quality (best first), then
    latency ratio, then size."""
    def key(e: SweepEntry):
        m = e.metrics
        q = m.get(quality) if quality else None
        return (bool(e.error), not e.pareto, -(q if q is not None else -1e300),
                m.get("latency_ratio") if m.get("latency_ratio") is not None else 1e300,
                m.get("file_bytes") if m.get("file_bytes") is not None else 1e300)
    return sorted(entries, key=key)


# -- the sweep --------------------------------------------------------------------------------------


def _with_data(recipe: Recipe, eval, calibration) -> Recipe:
    changes = {}
    if eval is not None and recipe.data is None:
        changes["data"] = eval
    if calibration is not None and recipe.calibration is None:
        changes["calibration"] = calibration
    return recipe.replace(**changes) if changes else recipe


def _check_data_paths(recipes: Sequence[Recipe]) -> None:
    from onnxopt.data import check_data_path

    for recipe in recipes:
        for name in (*_DATA_FIELDS, "train_data"):
            value = getattr(recipe, name)
            if value is None or value == "synthetic":
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise OptionError(f"sweep: {name} must be a file path (workers read it), not {type(value).__name__}")
            flag = {"data": "--eval", "calibration": "--calibration"}.get(name, "train_data")
            if not os.path.exists(value):
                raise OptionError(f"{flag} {value}: no such file or folder")
            try:
                check_data_path(value)  # a device or a FIFO: refused here, not in every worker
            except OnnxoptError as exc:
                raise OptionError(f"{flag} {exc}") from None


def _check_providers(recipes: Sequence[Recipe], local: bool) -> None:
    """Refuse a provider name onnxruntime does not know, and (built here) one this machine lacks, in
    one line before any worker starts; Ray's workers may have providers this machine has not."""
    from onnxopt.errors import ProviderError
    from onnxopt.runtime import resolve_providers

    for i, recipe in enumerate(recipes, 1):
        try:
            resolve_providers(recipe.providers)
        except ProviderError as exc:
            if local:
                raise OptionError(f"sweep: recipe {i}: {exc}") from None
        except OnnxoptError as exc:
            raise OptionError(f"sweep: recipe {i}: {exc}") from None


def run_sweep(
    model_path: str | os.PathLike,
    recipes: Sequence[Recipe],
    *,
    eval=None,
    calibration=None,
    out_dir: str | os.PathLike,
    workers: int | None = None,
    ray: str | None = None,
    latency_budget: float = 2.0,
    progress: Progress | None = None,
    _build: Callable[[str, Recipe, str], dict] = build_recipe,
) -> SweepResult:
    """Build every recipe (new ones only), time each result against the original, mark the front.

    ``eval`` and ``calibration`` (file paths) fill each recipe's ``data`` and ``calibration``
    where it gives none. ``workers`` processes build (default: ``os.cpu_count()``); with ``ray``
    (``"auto"`` for a local cluster, else a cluster's address) Ray tasks build instead. Each
    result is then timed for ``latency_budget`` seconds (0: not timed). Writes ``out_dir/sweep.json``,
    ``out_dir/sweep.html`` (the Pareto plot, self-contained) and ``out_dir/front-<n>.toml``; returns the results in the recipes' order.
    """
    start = time.perf_counter()
    model_path = os.fspath(model_path)
    io.check_model_path(model_path)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise OptionError(f"--workers {workers!r}: must be a positive whole number")
    if workers is not None and workers > MAX_WORKERS:
        raise OptionError(f"--workers {workers}: more than {MAX_WORKERS} processes; give at most one per core")
    if workers is not None and ray is not None:
        raise OptionError("--workers and --ray: give one (Ray schedules its own workers)")
    if isinstance(latency_budget, bool) or not (isinstance(latency_budget, (int, float)) and 0 <= latency_budget < math.inf):
        raise OptionError(f"--latency-budget {latency_budget!r}: must be 0 (no timing) or a finite number of seconds")
    if not recipes:
        raise OptionError("sweep: no recipes")
    if ray is not None:
        from onnxopt.sweep_ray import require_ray

        require_ray()
    recipes = [_with_data(r, eval, calibration) for r in recipes]
    _check_data_paths(recipes)
    _check_providers(recipes, local=ray is None)
    io.load_model(model_path)  # a model that does not load is refused before any worker starts
    out = Path(out_dir)
    models_dir = out / "models"
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    digest = model_digest(model_path)
    digests: dict[str, str] = {}
    entries = [SweepEntry(recipe=r, key=recipe_key(digest, r, digests)) for r in recipes]
    todo: dict[str, SweepEntry] = {}
    for e in entries:
        cached = _read_record(models_dir, e.key)
        if cached is not None:
            e.metrics, e.built, e.cached = cached.get("metrics", {}), cached.get("built", {}), True
            e.model = str(models_dir / f"{e.key}.onnx")
        elif e.key not in todo:
            todo[e.key] = e
    build_start = time.perf_counter()
    jobs = [(e.key, e.recipe, str(models_dir / f"{e.key}.onnx")) for e in todo.values()]
    if ray is not None:
        from onnxopt.sweep_ray import build_on_ray

        records = build_on_ray(model_path, jobs, ray, progress=progress)
        engine = "ray"
    else:
        records = _build_on_pool(model_path, jobs, workers, progress, _build)
        engine = "pool"
    build_seconds = time.perf_counter() - build_start
    for key, record in records.items():
        _apply(todo[key], record, models_dir)
    for e in entries:  # the same recipe listed twice shares one build
        if e.key in todo and e is not todo[e.key]:
            first = todo[e.key]
            e.metrics, e.built, e.error, e.model = first.metrics, first.built, first.error, first.model
    timing_start = time.perf_counter()
    if latency_budget > 0:
        _time_results(model_path, entries, models_dir, latency_budget, progress)
    timing_seconds = time.perf_counter() - timing_start
    quality = _mark_front(entries)
    result = SweepResult(entries, str(out), quality, time.perf_counter() - start, build_seconds, timing_seconds, engine,
                         model=model_path)
    result.fronts = _write_fronts(out, front_order(entries, quality), quality)
    result.seconds = time.perf_counter() - start
    from onnxopt.html_report import stage_html
    from onnxopt.report import write_json_file

    write_json_file(result.to_dict(), out / "sweep.json")
    page = out / "sweep.html"  # the Pareto plot to look at, always: atomic, as sweep.json
    os.replace(stage_html(None, page, sweep=result.to_dict(), flag="--out"), page)
    if progress:
        progress("done", 1, 1)
    return result


def _read_record(models_dir: Path, key: str) -> dict | None:
    import json

    record_path, model = models_dir / f"{key}.json", models_dir / f"{key}.onnx"
    if not (record_path.is_file() and model.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and not record.get("error") else None


def _write_record(models_dir: Path, entry: SweepEntry) -> None:
    from onnxopt.report import write_json_file

    write_json_file({"key": entry.key, "recipe": entry.recipe_fields(), "metrics": entry.metrics,
                     "built": entry.built}, models_dir / f"{entry.key}.json")


def _apply(entry: SweepEntry, record: dict, models_dir: Path) -> None:
    entry.metrics = dict(record.get("metrics") or {})
    entry.built = dict(record.get("built") or {})
    entry.error = record.get("error")
    entry.cached = False
    path = models_dir / f"{entry.key}.onnx"
    if entry.error is None and path.is_file():
        entry.model = str(path)
        _write_record(models_dir, entry)
    elif entry.error is None:
        entry.error = "the worker returned no model file"


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["onnxopt.pipeline"])  # imported once, in the server, not per worker
        return ctx
    return multiprocessing.get_context("spawn")


def _build_on_pool(model_path: str, jobs: list[tuple[str, Recipe, str]], workers: int | None,
                   progress: Progress | None, build: Callable) -> dict[str, dict]:
    """Records by key. A worker that dies breaks the pool: the recipes it took down with it are run
    again, each alone in a fresh one-worker pool, so that only the one that kills its worker fails."""
    if not jobs:
        return {}
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    records: dict[str, dict] = {}
    broken = _pool_round(model_path, jobs, workers, progress, build, records, len(jobs))
    for job in broken:
        if workers == 1 and len(broken) == 1:
            records[job[0]] = _died(job)
            continue
        again = _pool_round(model_path, [job], 1, progress, build, records, len(jobs))
        for lost in again:
            records[lost[0]] = _died(lost)
    return records


def _died(job) -> dict:
    return {"metrics": {}, "built": {}, "error": "its worker process died (killed, out of memory or crashed)"}


def _pool_round(model_path, jobs, workers, progress, build, records, total) -> list:
    ctx = _pool_context()
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    broken = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                                initargs=(threads,)) as pool:
        futures = {pool.submit(build, model_path, recipe, out): (key, recipe, out) for key, recipe, out in jobs}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = futures[future]
                try:
                    records[job[0]] = future.result()
                except BrokenProcessPool:
                    broken.append(job)
                except Exception as exc:  # the record could not come back (pickling): a failed recipe
                    records[job[0]] = {"metrics": {}, "built": {}, "error": f"{type(exc).__name__}: {one_line(exc)}"}
            if progress:
                failed = sum(1 for r in records.values() if r.get("error"))
                running = min(workers, len(pending))
                progress(f"building ({running} running, {failed} failed)", len(records), total)
    return broken


# -- the timing phase -------------------------------------------------------------------------------


def _time_results(model_path: str, entries: list[SweepEntry], models_dir: Path, budget: float,
                  progress: Progress | None) -> None:
    """Each good result without a latency figure, timed against the original: one at a time, here."""
    from onnxopt.data import load_data
    from onnxopt.latency import compare_latency
    from onnxopt.runtime import ModelSnapshot
    from onnxopt.synthetic import runnable_synthetic_data

    todo = [e for e in entries if not e.error and e.model and e.metrics.get("latency_ratio") is None]
    if not todo:
        return
    original_model = io.load_model(model_path)
    original = ModelSnapshot(original_model)
    feeds: dict[tuple, dict] = {}
    timed: set[str] = set()
    by_content: dict[tuple, dict] = {}  # byte-identical models (two recipes, one result) are timed once
    try:
        for i, e in enumerate(todo):
            if progress:
                progress("timing", i, len(todo))
            if e.key in timed:
                continue
            timed.add(e.key)
            r = e.recipe
            same = (model_digest(e.model), os.fspath(r.data) if r.data is not None else None, r.batch_size,
                    str(r.providers), r.threads)
            if same in by_content:
                e.metrics.update(by_content[same])
                _write_record(models_dir, e)
                continue
            try:
                where = (os.fspath(r.data) if r.data is not None else None, r.batch_size)
                if where not in feeds:
                    dataset = (load_data(r.data, original_model, batch_size=r.batch_size)
                               if r.data is not None and r.data != "synthetic"
                               else runnable_synthetic_data(original_model, batch_size=r.batch_size))
                    feeds[where] = dataset.batches[0]
                candidate = ModelSnapshot(io.load_model(e.model))
                try:
                    latency = compare_latency(original, candidate, feeds[where], providers=r.providers,
                                              threads=r.threads, budget_seconds=budget)
                finally:
                    candidate.close()
                known = latency.ratio_low > 0 and math.isfinite(latency.ratio_high)  # too few blocks: (0, inf)
                e.metrics.update(latency_ratio=latency.ratio, latency_low=latency.ratio_low if known else None,
                                 latency_high=latency.ratio_high if known else None, latency_verdict=latency.verdict,
                                 latency_ms=latency.median_b_ms, original_ms=latency.median_a_ms)
                by_content[same] = {k: v for k, v in e.metrics.items() if k.startswith("latency") or k == "original_ms"}
            except Exception as exc:  # a model that cannot be timed (other input sizes) stays off the latency axis
                e.metrics["latency_error"] = one_line(exc)
                continue
            _write_record(models_dir, e)
        for e in entries:  # a recipe listed twice
            same = next((t for t in todo if t.key == e.key and t is not e), None)
            if same is not None and e.metrics.get("latency_ratio") is None:
                e.metrics.update({k: v for k, v in same.metrics.items() if k.startswith("latency") or k == "original_ms"})
    finally:
        original.close()


def _write_fronts(out: Path, ordered: list[SweepEntry], quality: str | None) -> list[str]:
    """Each front point's recipe as ``front-<n>.toml`` (data paths absolute, so that it replays from
    anywhere), after removing the fronts of an earlier run."""
    for old in glob.glob(str(out / "front-*.toml")):
        with contextlib.suppress(OSError):
            os.unlink(old)
    written = []
    for n, e in enumerate([e for e in ordered if e.pareto], 1):
        recipe = e.recipe.replace(**{name: os.path.abspath(os.fspath(getattr(e.recipe, name)))
                                     for name in _DATA_FIELDS
                                     if isinstance(getattr(e.recipe, name), (str, os.PathLike))
                                     and os.path.exists(getattr(e.recipe, name))})
        path = out / f"front-{n}.toml"
        figures = ", ".join(f"{k} {e.metrics[k]:.4g}" for k in (quality, "latency_ratio", "file_bytes")
                            if k and e.metrics.get(k) is not None)
        text = recipe.to_toml().replace("# onnxopt recipe:", f"# sweep front point {n} ({figures})\n# onnxopt recipe:", 1)
        os.replace(io.stage_text(text, path, "--out"), path)
        written.append(str(path))
    return written

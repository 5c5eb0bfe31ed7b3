"""Run named passes in order around a model, then prove the result: validation and latency side by side."""

from __future__ import annotations

__all__ = ["DEFAULT_PASSES", "OptimizeResult", "optimize", "resolve_passes", "check_model"]

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxopt import io
from onnxopt.data import Dataset, load_data, parse_dims, synthetic_data
from onnxopt.errors import ModelLoadError, OnnxoptError, UnknownPassError
from onnxopt.latency import compare_latency
from onnxopt.passes import REGISTRY
from onnxopt.report import ModelStats, PassRecord, Report
from onnxopt.runtime import ModelSnapshot, create_session
from onnxopt.stats import model_stats
from onnxopt.validate import DEFAULT_ATOL, compare_models

logger = logging.getLogger(__name__)

DEFAULT_PASSES = ("simplify", "fold-bn", "share-init")

Progress = Callable[[str, int, int], None]


@dataclass
class OptimizeResult:
    """The optimized model, the report of the run, and where the input came from."""

    model: ir.Model
    report: Report
    source: str | None = None

    @property
    def ok(self) -> bool:
        return self.report.ok

    def save(self, path: str | os.PathLike, *, in_place: bool = False) -> Path:
        """Write the model atomically; refuses to overwrite the input unless ``in_place``."""
        saved = io.save_model(self.model, path, protect=self.source, in_place=in_place)
        self.report.output = str(saved)
        return saved


def resolve_passes(passes) -> list[ir.passes.PassBase]:
    """Pass names (a list, or one comma-separated string) or pass objects → pass objects."""
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
    resolved = []
    for item in passes:
        if isinstance(item, ir.passes.PassBase):
            resolved.append(item)
            continue
        name = str(item).strip()
        if name not in REGISTRY:
            raise UnknownPassError(f"unknown pass '{name}' (known: {', '.join(REGISTRY)})")
        resolved.append(REGISTRY[name]())
    return resolved


def _pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", "") or type(p).__name__


def check_model(model: ir.Model) -> None:
    """onnx.checker and an onnxruntime session must both accept the model (used after every pass in tests)."""
    snapshot = ModelSnapshot(model)
    try:
        if snapshot.data is not None:
            onnx.checker.check_model(onnx.load_from_string(snapshot.data), full_check=False)
        else:
            onnx.checker.check_model(snapshot.path)
        snapshot.session(optimization="disabled")
    finally:
        snapshot.close()


def optimize(
    model,
    passes: Sequence | str = DEFAULT_PASSES,
    *,
    data=None,
    dims: Mapping[str, int] | Sequence[str] | None = None,
    providers: str | Sequence[str] = "cpu",
    validate: bool = True,
    latency: bool = True,
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    batch_size: int | None = None,
    threads: int | None = None,
    latency_budget: float = 5.0,
    check: bool = False,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (a path, ``onnx.ModelProto`` or ``ir.Model``; never modified) with ``passes``.

    With ``validate`` the result runs beside the original under onnxruntime on ``data`` (a file,
    arrays, an iterable of feeds, or ``"synthetic"``; random inputs when None, flagged as such),
    and with ``latency`` both are timed side by side. ``rtol=None`` judges each output by the
    default for its dtype (1e-5 for float32, 2e-3 for float16; see ``onnxopt.validate``).
    ``check`` runs onnx.checker and creates an onnxruntime session after every pass.
    """
    pass_objects = resolve_passes(passes)
    dims = parse_dims(dims)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    label = source or type(model).__name__
    working = io.load_model(model)
    if validate or latency:
        # Fail on bad data before spending time on passes.
        dataset = _dataset(data, working, dims, batch_size)
        original = ModelSnapshot(working)
        try:
            original.session(optimization="disabled", providers=providers)
        except OnnxoptError:  # an unavailable provider says so itself
            raise
        except Exception as exc:
            raise ModelLoadError(f"{label}: onnxruntime cannot load the input model: {_one_line(exc)}") from None
    before = model_stats(working, dims=dims)
    report = Report(model=label, output=None, before=before, after=before)
    for step, p in enumerate(pass_objects):
        name = _pass_name(p)
        if progress:
            progress(f"pass {name}", step, len(pass_objects))
        start = time.perf_counter()
        result = p(working)
        seconds = time.perf_counter() - start
        working = result.model
        if check:
            check_model(working)
        after = model_stats(working, dims=dims)
        report.passes.append(
            PassRecord(
                name=name, modified=bool(result.modified), seconds=seconds,
                summary=getattr(p, "summary", "") or ("changed" if result.modified else "no change"),
                after=after, details=dict(getattr(p, "details", {}) or {}),
            )
        )
        for what, reason in list((getattr(p, "details", {}) or {}).get("left", {}).items())[:3]:
            report.notes.append(f"{name}: {what} left: {reason}")
    report.after = report.passes[-1].after if report.passes else before
    if validate or latency:
        candidate = ModelSnapshot(working)
        if validate:
            report.validation = compare_models(
                original, candidate, dataset, providers=providers, rtol=rtol, atol=atol,
                progress=(lambda i, n: progress("validate", i, n)) if progress else None,
            )
        if latency and (report.validation is None or report.validation.error is None):
            report.latency = compare_latency(
                original, candidate, dataset.batches[0], providers=providers, threads=threads,
                budget_seconds=latency_budget,
                progress=(lambda i, t: progress("latency", int(t), int(latency_budget))) if progress else None,
            )
        candidate.close()
        original.close()
    if progress:
        progress("done", 1, 1)
    return OptimizeResult(working, report, source)


def _dataset(data, model: ir.Model, dims: dict[str, int], batch_size: int | None) -> Dataset:
    if data is None:
        dataset = synthetic_data(model, dims=dims)
        dataset.notes.insert(0, "no --data given: validated on synthetic random inputs")
        return dataset
    return load_data(data, model, batch_size=batch_size, dims=dims)


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc).strip() or type(exc).__name__).split())[:300]

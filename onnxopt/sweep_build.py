"""One recipe of a sweep, built where a worker runs it (a pool process or a Ray task): ``optimize()``
without latency, the model saved, the figures returned as a record. ``onnxopt.sweep`` and
``onnxopt.sweep_ray`` both call it; it knows neither."""

from __future__ import annotations

__all__ = ["build_recipe", "report_metrics"]

import os
import time
from typing import Any

from onnxopt.errors import OnnxoptError, one_line
from onnxopt.recipe import Recipe


def build_recipe(model: str, recipe: Recipe, out_path: str) -> dict:
    """Run ``optimize(model, recipe)`` without latency and save the model to ``out_path``.

    Returns a record: ``metrics`` (quality, size, MACs, parameters), ``built`` (the process id,
    wall-clock time and seconds of this build: the marker that it ran) and ``error`` when it failed.
    Never raises for a failing recipe: the error is the record's.
    """
    from onnxopt.pipeline import optimize
    from onnxopt.report import failure_reason

    start = time.perf_counter()
    built = {"pid": os.getpid(), "time": time.time()}
    record: dict[str, Any] = {"metrics": {}, "error": None, "built": built}
    try:
        result = optimize(model, recipe.replace(latency=False))
        record["metrics"] = report_metrics(result.report)
        if not result.ok:
            record["error"] = f"validation failed: {failure_reason(result.report)}"
        else:
            result.save(out_path)
            record["metrics"]["file_bytes"] = os.path.getsize(out_path)
    except OnnxoptError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # a bug in a pass must not end the sweep: recorded, with its type
        record["error"] = f"{type(exc).__name__}: {one_line(exc)}"
    built["seconds"] = time.perf_counter() - start
    return record


def report_metrics(report) -> dict:
    """Quality and size of a run's result: accuracy (with labels), the least cosine over outputs,
    MACs and parameters."""
    v = report.validation
    cosines = [o.cosine for o in v.outputs] if v is not None else []
    return {
        "accuracy": v.accuracy_after if v is not None else None,
        "accuracy_before": v.accuracy_before if v is not None else None,
        "cosine": min(cosines) if cosines else None,
        "macs": report.after.macs,
        "params": report.after.params,
    }


def _worker_init(threads: int | None) -> None:
    """In each pool worker: onnxruntime's sessions use ``threads`` intra-op threads (cores / workers),
    so that workers do not fight over the cores; passes' warnings stay in their records, not on stderr."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    if threads:
        from onnxopt import runtime

        runtime.DEFAULT_INTRA_OP_THREADS = threads

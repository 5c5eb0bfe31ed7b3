"""A sweep's builds as Ray tasks: the same ``build_recipe`` as the process pool, on a Ray cluster.

The input model and every data file are put into Ray's object store once (``ray.put``) and each
task writes them to a temporary folder of its own, so that a remote node needs no shared
filesystem; the task sends the built model back as bytes and the driver writes it. A task that
raises or whose worker dies is recorded as failed with Ray's reason; the sweep goes on. ``ray`` is
an optional extra (``pip install 'onnxopt[ray]'``), imported only here.
"""

from __future__ import annotations

__all__ = ["require_ray", "build_on_ray"]

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from onnxopt import io
from onnxopt.errors import OptionError, one_line
from onnxopt.recipe import Recipe

MISSING = "--ray needs the ray package: pip install 'onnxopt[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line ``OptionError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OptionError(MISSING) from None
    return ray


def _files(path: str) -> dict[str, bytes]:
    """A file, or every file under a folder, by relative name."""
    p = Path(path)
    if p.is_dir():
        return {str(q.relative_to(p)): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}
    return {p.name: p.read_bytes()}


def _write(files: dict[str, bytes], folder: str) -> None:
    for name, data in files.items():
        target = os.path.join(folder, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)


def _data_paths(recipe: Recipe) -> list[str]:
    return [os.fspath(v) for v in (recipe.data, recipe.calibration)
            if isinstance(v, (str, os.PathLike)) and v != "synthetic"]


def run_task(model: dict, data: dict, recipe: Recipe, out_name: str) -> tuple[dict, dict[str, bytes] | None]:
    """On a Ray worker: the model and data files written to a temporary folder, the recipe built
    there (``onnxopt.sweep_build.build_recipe``), the result's files returned as bytes."""
    from onnxopt import runtime
    from onnxopt.sweep_build import build_recipe

    import logging

    logging.getLogger().setLevel(logging.ERROR)
    runtime.DEFAULT_INTRA_OP_THREADS = 1  # each task holds one CPU of the cluster
    folder = tempfile.mkdtemp(prefix="onnxopt-ray-")
    try:
        _write(model["files"], os.path.join(folder, "model"))
        local = {}
        for i, (path, entry) in enumerate(data.items()):
            where = os.path.join(folder, f"data{i}")
            _write(entry["files"], where)
            local[path] = where if entry["folder"] else os.path.join(where, next(iter(entry["files"])))
        changes = {name: local[os.fspath(value)] for name in ("data", "calibration")
                   if isinstance(value := getattr(recipe, name), (str, os.PathLike)) and os.fspath(value) in local}
        out_dir = os.path.join(folder, "out")
        os.makedirs(out_dir)
        record = build_recipe(os.path.join(folder, "model", model["name"]), recipe.replace(**changes),
                              os.path.join(out_dir, out_name))
        files = _files(out_dir) if record.get("error") is None else None
        return record, files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build_on_ray(model_path: str, jobs: list[tuple[str, Recipe, str]], address: str,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Records by key, as ``onnxopt.sweep``'s pool gives them; models written to each job's path.

    ``address`` ``"auto"`` starts a local cluster (``ray.init()``), anything else connects to it
    (``ray.init(address=...)``); a cluster this process had already joined is used as it is.
    """
    ray = require_ray()
    if not jobs:
        return {}
    started = False
    if not ray.is_initialized():
        try:
            if address == "auto":
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            raise OptionError(f"--ray {address}: cannot start or reach a Ray cluster: {one_line(exc)}"
                              f"{_auth_hint(address)}") from None
        started = True
    try:
        return _run(ray, model_path, jobs, progress)
    finally:
        if started:
            ray.shutdown()


def _auth_hint(address: str) -> str:
    """Ray (2.5x on) starts a cluster with token authentication where ``~/.ray/auth_token`` exists,
    but a driver given an address sends the token only with ``RAY_AUTH_MODE=token``: it is then
    refused, and Ray says only that it could not connect."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return ""
    if not os.path.isfile(os.path.join(os.path.expanduser("~"), ".ray", "auth_token")):
        return ""
    return " (if the cluster uses token authentication, set RAY_AUTH_MODE=token for this command)"


def _run(ray, model_path, jobs, progress) -> dict[str, dict]:
    model_files = {os.path.basename(model_path): Path(model_path).read_bytes()}
    for extra in sorted(io.referenced_files(model_path)):
        model_files[os.path.relpath(extra, os.path.dirname(os.path.abspath(model_path)))] = extra.read_bytes()
    data = {}
    for _, recipe, _ in jobs:
        for path in _data_paths(recipe):
            if path not in data:
                data[path] = {"files": _files(path), "folder": os.path.isdir(path)}
    model_ref = ray.put({"name": os.path.basename(model_path), "files": model_files})  # shipped once
    data_ref = ray.put(data)
    task = ray.remote(num_cpus=1, max_retries=0)(run_task)
    refs = {task.remote(model_ref, data_ref, recipe, os.path.basename(out)): (key, out) for key, recipe, out in jobs}
    records: dict[str, dict] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            key, out = refs[ref]
            try:
                record, files = ray.get(ref)
            except Exception as exc:  # the task raised, or its worker died: Ray says which
                records[key] = {"metrics": {}, "built": {}, "error": f"ray: {type(exc).__name__}: {one_line(exc)}"}
                continue
            if files:
                folder = os.path.dirname(out)
                for rel, blob in files.items():  # the model and any external data it names
                    target = os.path.join(folder, rel)
                    tmp = target + f".{os.getpid()}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(blob)
                    os.replace(tmp, target)
            records[key] = record
        if progress:
            failed = sum(1 for r in records.values() if r.get("error"))
            progress(f"building on ray ({len(pending)} left, {failed} failed)", len(records), len(jobs))
    return records

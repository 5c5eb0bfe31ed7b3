"""The arguments of ``onnxopt.optimize``, checked in one place and in the command line's words.

The command line calls ``check_arguments`` before any work and ``optimize`` calls it first, so a
value is refused the same way from both (``batch_size=0`` and ``--batch-size 0`` both say
"--batch-size 0: must be positive"), with an ``OptionError`` instead of a ``TypeError`` from deep
inside a pass or numpy.
"""

from __future__ import annotations

__all__ = ["check_arguments", "require_torch", "import_torch"]

import importlib.util
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir

from onnxopt.calibrate import METHODS
from onnxopt.errors import OptionError
from onnxopt.passes.prune_channels import IMPORTANCE_CRITERIA
from onnxopt.target import TARGETS

# More intra-op threads than any machine has cores: onnxruntime would start them all.
MAX_THREADS = 1024

_FLAGS = {  # argument of optimize() -> its command-line flag
    "batch_size": "--batch-size", "threads": "--threads", "round_to": "--round-to", "max_samples": "--max-samples",
    "rtol": "--rtol", "atol": "--atol", "latency_budget": "--latency-budget", "max_drop": "--max-drop",
    "min_cosine": "--min-cosine", "percentile": "--percentile", "prune": "--prune", "importance": "--importance",
    "prune_scope": "--prune-scope", "calibrate": "--calibrate", "dims": "--dim", "fix_dims": "--fix-dim",
    "providers": "--providers", "passes": "--passes", "validate": "--no-validate", "latency": "--no-latency",
    "protect_first": "--prune-first", "speed_fallback": "--no-speed-fallback", "check": "check", "target": "--target",
}


def check_arguments(args: Mapping[str, Any]) -> None:
    """Refuse an argument of ``optimize`` (given by name in ``args``; unknown names are left to
    their owners) whose type or value cannot work; raises ``OptionError`` with one line."""
    def given(name: str) -> bool:
        return args.get(name) is not None

    _check_passes(args.get("passes", ()))
    for name in ("batch_size", "threads", "max_samples"):
        if given(name):
            _integer(name, args[name], least=1)
    if "round_to" in args:
        _integer("round_to", args["round_to"], least=1)
    for name in ("atol", "latency_budget", "rtol"):
        if given(name) or (name in args and name in ("atol", "latency_budget")):
            _number(name, args[name], low=0.0)
    if given("max_drop"):  # accuracy points: 100 loses everything
        _number("max_drop", args["max_drop"], low=0.0, high=100.0)
    if given("threads") and args["threads"] > MAX_THREADS:
        raise OptionError(f"--threads {args['threads']}: more than {MAX_THREADS}; give at most one per core")
    if given("min_cosine"):
        _number("min_cosine", args["min_cosine"], low=-1.0, high=1.0)
    if given("percentile"):
        _number("percentile", args["percentile"], low=50.0, high=100.0, low_open=True)
    if given("prune"):
        _number("prune", args["prune"], low=0.0, high=1.0, high_open=True)
    for name, choices in (("importance", IMPORTANCE_CRITERIA), ("prune_scope", ("layer", "global")), ("calibrate", METHODS),
                          ("target", TARGETS)):
        if name in args and args[name] not in choices and not (name == "target" and args[name] is None):
            raise OptionError(f"{_FLAGS[name]} {args[name]!r}: not one of {', '.join(choices)}")
    for name in ("validate", "latency", "protect_first", "check"):
        if name in args and not isinstance(args[name], bool):
            raise OptionError(f"{_FLAGS[name]}: {name} must be True or False, not {args[name]!r}")
    if given("speed_fallback") and not isinstance(args["speed_fallback"], bool):
        raise OptionError(f"--no-speed-fallback: speed_fallback must be None, True or False, not {args['speed_fallback']!r}")
    for name in ("dims", "fix_dims"):
        if given(name):
            _check_dims(name, args[name])
    if "providers" in args:
        providers = args["providers"]
        if not (isinstance(providers, str) or (isinstance(providers, Iterable) and providers
                                                and all(isinstance(p, str) for p in providers))):
            raise OptionError(f"--providers: give a name ('cpu', 'cuda') or a list of names, not {providers!r}")
    lossy = given("prune") or given("precision") or any(getattr(p, "lossy", False) for p in args.get("passes", ()) if not isinstance(p, str))
    if not _quantizes(args.get("passes", ())) and not lossy:
        for name in ("max_drop", "min_cosine"):
            if given(name):
                raise OptionError(f"{_FLAGS[name]} applies to a lossy run (--quantize, --cluster-bits, --sparsity, "
                                  "--lowrank-energy, ...), and no pass of this one is lossy")


def _check_passes(passes) -> None:
    if isinstance(passes, str):
        return
    if not isinstance(passes, Iterable) or isinstance(passes, Mapping):
        raise OptionError(f"--passes: give pass names (a list, or one comma-separated string) or pass objects, "
                          f"not {type(passes).__name__}")
    for item in passes:
        if not isinstance(item, (str, ir.passes.PassBase)):
            raise OptionError(f"--passes: {item!r} is neither a pass name nor an onnx-ir pass object")


def _quantizes(passes) -> bool:
    if isinstance(passes, str):
        return "quantize" in [p.strip() for p in passes.split(",")]
    return any(p == "quantize" or getattr(p, "name", None) == "quantize" for p in passes or ())


def _integer(name: str, value, *, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{_FLAGS[name]} {value!r}: must be a whole number")
    if value < least:
        raise OptionError(f"{_FLAGS[name]} {value}: must be positive")


def _number(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
    """``value`` a finite real number within the bounds (``high=inf``: no upper bound, but finite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{_FLAGS[name]} {value!r}: must be a number")
    value = float(value)
    if math.isinf(value):
        raise OptionError(f"{_FLAGS[name]} {value:g}: must be a finite number")
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:
        if high == math.inf:
            raise OptionError(f"{_FLAGS[name]} {value:g}: must be zero or positive")
        raise OptionError(f"{_FLAGS[name]} {value:g}: must be in {'(' if low_open else '['}{low:g}, "
                          f"{high:g}{')' if high_open else ']'}")


def _check_dims(name: str, dims) -> None:
    if isinstance(dims, Mapping):
        for key, size in dims.items():
            if not isinstance(key, str) or isinstance(size, bool) or not isinstance(size, numbers.Integral):
                raise OptionError(f"{_FLAGS[name]} {key!r}={size!r}: give a dim name and a whole size")
            if size < 1:
                raise OptionError(f"{_FLAGS[name]} {key}={size}: the size must be positive")
        return
    if isinstance(dims, str) or not isinstance(dims, Iterable):
        raise OptionError(f"{_FLAGS[name]}: give a list of 'NAME=N' strings or a {{name: size}} mapping, "
                          f"not {type(dims).__name__}")


def _torch_missing(what: str, name: str | None = None) -> OptionError:
    return OptionError(f"{what} needs torch ({name or 'torch'} is missing): pip install 'onnxopt[train]'")


def require_torch(what: str) -> None:
    """Refuse ``what`` (``--distill``, ``--importance taylor``) in one line naming the extra to
    install when torch cannot be found; cheap (torch is looked for, not imported)."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _torch_missing(what)


def import_torch(what: str):
    """``import torch`` for ``what``; a torch that is missing or fails to import is the one line of
    ``require_torch``, not a traceback."""
    try:
        import torch
    except ImportError as exc:
        raise _torch_missing(what, exc.name) from None
    return torch

"""Every package that onnxopt imports when it loads is one that installing onnxopt brings.

An import at module level in ``onnxopt/`` or ``passes/`` must belong to a declared dependency (a
package found only because a test extra or a developer's machine has it fails here). Imports inside
functions are the optional features' (torch for training, ray for sweeps) and are not checked."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body:  # module level only, including `if TYPE_CHECKING:` is excluded below
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# Modules that are the optional extras themselves: they may import that extra at module level, and
# nothing imported when onnxopt loads imports them (checked below).
EXTRA_MODULES = {"student.py": "train", "cluster_training.py": "train"}  # they import torch: imported by training only


def _names(deps: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in deps}


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _names(project["dependencies"] + (project["optional-dependencies"][extra] if extra else []))


def test_module_level_imports_are_declared_dependencies():
    sources = sorted((ROOT / "onnxopt").glob("*.py")) + sorted((ROOT / "passes").glob("*.py"))
    distributions = packages_distributions()
    missing = {}
    for path in sources:
        declared = _declared(EXTRA_MODULES.get(path.name) if path.parent.name == "onnxopt" else None)
        third_party = {m for m in _module_level_imports(path)
                       if m not in sys.stdlib_module_names and m not in {"onnxopt", "passes", "__future__"}}
        for module in sorted(third_party):
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not dists & declared:
                missing[f"{path.name}: {module}"] = sorted(dists)
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"


def test_extra_modules_are_not_imported_when_onnxopt_loads():
    """``import onnxopt`` (and its command line, its pipeline, distill's API) must not load torch."""
    code = ("import sys, onnxopt, onnxopt.cli, onnxopt.pipeline, onnxopt.distill; "
            "print(sorted(m for m in ('torch', 'onnxopt.student') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in (ROOT / "onnxopt").glob("*.py"):
        if path.name in EXTRA_MODULES:
            continue
        for name in _module_level_imports(path) | _module_level_from_onnxopt(path):
            assert name not in {"torch"} | {f"onnxopt.{m[:-3]}" for m in EXTRA_MODULES}, f"{path.name} imports {name}"


def _module_level_from_onnxopt(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("onnxopt.")}

"""Every package that onnxopt imports when it loads is one that installing onnxopt brings.

An import at module level in ``onnxopt/`` or ``passes/`` must belong to a declared dependency (a
package found only because a test extra or a developer's machine has it fails here). Imports inside
functions are the optional features' (torch for training, ray for sweeps) and are not checked."""

from __future__ import annotations

import ast
import re
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


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in project["dependencies"]}


def test_module_level_imports_are_declared_dependencies():
    sources = sorted((ROOT / "onnxopt").glob("*.py")) + sorted((ROOT / "passes").glob("*.py"))
    imported = set().union(*(_module_level_imports(p) for p in sources))
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in {"onnxopt", "passes", "__future__"}}
    distributions = packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"

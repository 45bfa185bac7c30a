"""CLI sub-commands: each module has `configure(parser)` and `run(args)`.

`COMMANDS` lists them for `sgsd.cli`; `run_in_process` runs one (as `sgsd compare --in-process` runs
its stages) without going through the CLI entry point, so no command imports `sgsd.cli`.
"""

from __future__ import annotations

import importlib
from typing import Sequence

# (command, module, help). Nested groups ("skills validate") are handled by the module itself.
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "sgsd.commands.train", "train a model with SGSD, GRPO or OPSD from a YAML config"),
    ("eval", "sgsd.commands.evaluate", "evaluate a model (avg@k, pass@k, maj@k) or compare evaluations"),
    ("skills", "sgsd.commands.skills", "validate, show, retrieve from, build and report on skill banks"),
    ("compare", "sgsd.commands.compare", "train several methods from one start and evaluate them into one table"),
    ("bench", "sgsd.commands.bench", "benchmark the loss phase and training step"),
    ("models", "sgsd.commands.models", "import models: a GGUF checkpoint as a Hugging Face directory"),
    ("demo", "sgsd.commands.demo", "run the offline demo: SGSD vs GRPO vs OPSD in a small synthetic world"),
    ("sweep", "sgsd.commands.sweep", "when does SGSD beat GRPO? the demo's comparison over a grid of world settings"),
]


def run_in_process(argv: Sequence[str]) -> int:
    """Run `sgsd ARGV...` in this process: the sub-command's exit status; its `UserError`s propagate."""
    modules = {name: module for name, module, _ in COMMANDS}
    if not argv or argv[0] not in modules:
        raise ValueError(f"run_in_process: expected one of {', '.join(modules)} first, got {list(argv)[:1]}")
    from sgsd.commands.options import SgsdArgumentParser

    module = importlib.import_module(modules[argv[0]])
    parser = SgsdArgumentParser(prog=f"sgsd {argv[0]}")
    module.configure(parser)
    return int(module.run(parser.parse_args(list(argv[1:]))) or 0)

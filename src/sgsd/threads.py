"""How many CPU threads torch and tokenizers use: one policy for every command and the test suite.

Why: on cores that other programs share, torch's OpenMP workers wait on each other at every parallel
region, so a small model runs many times slower with two threads than with one (docs/performance.md,
"Threads": the tiny training step and the demo's warm-up measured idle and loaded). Threads pay only
for models large enough that each matrix product outweighs that synchronisation.

The decision (`choose_threads`), first rule that applies:
1. `--threads N` (the CLI stores it in `SGSD_THREADS`, so sub-processes inherit it) or `SGSD_THREADS`;
2. the user's own `OMP_NUM_THREADS` (else `MKL_NUM_THREADS`). torchrun sets `OMP_NUM_THREADS=1` for
   its workers when the user did not; that placeholder is not a choice and is ignored (set
   `SGSD_THREADS=1` to force one thread per rank);
3. the model's size: below `THREADS_PAY_PARAMETERS` parameters one thread, else this process's share of
   the cores (the cores it may run on divided among the `LOCAL_WORLD_SIZE` processes of the machine).
   Before a model exists (`parameters=None`) one thread: what runs then (parsing, data, tokenizers'
   set-up) has no matrix products worth splitting.

Where it is applied: `configure_process` once per process before torch does work (`sgsd.cli.main`,
tests/conftest.py), `fit_to_model` wherever a model is built or loaded (`sgsd.models.load_model`, the
benchmarks). Torch's inter-op pool can be sized only before its first use, so it takes the decision of
`configure_process` (1 unless set explicitly); tokenizers' parallelism follows every decision
(`TOKENIZERS_PARALLELISM` on iff more than one thread, `RAYON_NUM_THREADS` the same count; either
left alone when the user set it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from sgsd.errors import UserError, shorten

if TYPE_CHECKING:
    import torch

# Below this size one intra-op thread, from it on the process's share of the cores. Measured with
# `sgsd bench threads --sizes ...` on 2 shared cores (docs/performance.md, "Threads"): with two competing
# 2-thread processes every size from the tiny model to SmolLM2-135M ran 1.2-10x slower with 2 threads
# than with 1, while without them 2 threads saved at most 20-40%. So every size measured gets one
# thread; the cut-off sits just above the largest (135 M), where no measurement says threads lose.
THREADS_PAY_PARAMETERS = 200_000_000

ENV_THREADS = "SGSD_THREADS"
USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """`threads` intra-op threads, and why (`reason`, for logs and errors)."""

    threads: int
    reason: str
    explicit: bool  # set by the user (flag or environment), not derived from the model's size


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def core_share(cores: int, env: Mapping[str, str]) -> int:
    """This process's share of `cores` when the machine runs `LOCAL_WORLD_SIZE` processes of one launch."""
    local = _positive_int(env.get("LOCAL_WORLD_SIZE", "1"), "LOCAL_WORLD_SIZE")
    return max(cores // local, 1)


def choose_threads(*, parameters: int | None, env: Mapping[str, str] | None = None,
                   cores: int | None = None) -> ThreadChoice:
    """The intra-op thread count for a model of `parameters` parameters (None: no model yet), from
    `env` (default `os.environ`) and `cores` (default `available_cores()`). Rules: module docstring."""
    env = os.environ if env is None else env
    if env.get(ENV_THREADS, "").strip():
        return _within_cores(_positive_int(env[ENV_THREADS], f"--threads / {ENV_THREADS}"), ENV_THREADS, cores)
    for name in USER_THREAD_VARIABLES:
        value = env.get(name, "").strip()
        if value and not (name == "OMP_NUM_THREADS" and _torchrun_placeholder(value, env)):
            # OpenMP allows a list per nesting level ("4,2"): the first is the outer level's
            return _within_cores(_positive_int(value.split(",")[0], name), name, cores)
    if parameters is None:
        return ThreadChoice(1, "no model yet", False)
    if parameters < THREADS_PAY_PARAMETERS:
        return ThreadChoice(1, f"{parameters:,} parameters < {THREADS_PAY_PARAMETERS:,}", False)
    share = core_share(available_cores() if cores is None else cores, env)
    return ThreadChoice(share, f"{parameters:,} parameters: this process's share of the cores", False)


def _within_cores(threads: int, name: str, cores: int | None) -> ThreadChoice:
    """An explicit setting, capped at the cores this process may run on: more threads than cores only wait
    on each other (2,000 on 2 cores ran 12x slower), and torch's pool cannot start 100,000 (it crashed)."""
    cores = available_cores() if cores is None else cores
    if threads > cores:
        return ThreadChoice(cores, f"{name}={threads} capped at the {cores} cores this process may use", True)
    return ThreadChoice(threads, name, True)


def configure_process(threads: int | None = None) -> ThreadChoice:
    """Once per process, before torch does work: record `threads` (`--threads`) for this process and its
    sub-processes, size torch's intra-op and inter-op pools and tokenizers' parallelism."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        os.environ[ENV_THREADS] = str(threads)
    choice = choose_threads(parameters=None)
    if "capped" in choice.reason and os.environ.get("RANK", "0") == "0":
        print(f"sgsd: note: {choice.reason}; using {choice.threads}", file=sys.stderr)
    import torch

    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:  # the pool was already used (e.g. a second call in one process): it keeps its size
        pass
    _apply(choice)
    return choice


def fit_to_model(model: torch.nn.Module) -> ThreadChoice:
    """Where a model is built or loaded: apply the decision for its size (an explicit setting wins)."""
    return fit_to_parameters(sum(p.numel() for p in model.parameters()))


def fit_to_parameters(parameters: int) -> ThreadChoice:
    """`fit_to_model` for a model of `parameters` parameters not built yet."""
    choice = choose_threads(parameters=parameters)
    _apply(choice)
    return choice


def _apply(choice: ThreadChoice) -> None:
    import torch

    torch.set_num_threads(choice.threads)
    # tokenizers' Rust pool: on only with several threads, and no larger than torch's
    _set_unless_users("TOKENIZERS_PARALLELISM", "true" if choice.threads > 1 else "false")
    _set_unless_users("RAYON_NUM_THREADS", str(choice.threads))


def _set_unless_users(name: str, value: str) -> None:
    """Set `name` unless the user did: a value this policy wrote (in this process or a parent, marked by
    SGSD_POLICY_<name>) is ours to change."""
    marker = f"SGSD_POLICY_{name}"
    current = os.environ.get(name)
    if current is None or current == os.environ.get(marker):
        os.environ[name] = os.environ[marker] = value


def _torchrun_placeholder(value: str, env: Mapping[str, str]) -> bool:
    """torchrun writes OMP_NUM_THREADS=1 into its workers' environment when the user set none."""
    return value == "1" and "TORCHELASTIC_RUN_ID" in env and env.get("LOCAL_WORLD_SIZE", "1").strip() != "1"


def _positive_int(text: str, where: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{where}: expected a whole number of threads >= 1, got {shorten(repr(text), 40)}") from None
    if value < 1:
        raise UserError(f"{where}: expected a whole number of threads >= 1, got {value}")
    return value

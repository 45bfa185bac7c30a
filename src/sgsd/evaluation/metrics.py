"""Sampling metrics over P problems with n samples each (docs/spec.md section 7): pure functions, no I/O.

- avg@k: mean over problems of the fraction of correct samples (k = n samples per problem): the
  paper's headline number, an estimate of pass@1.
- pass@k: unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
  eq. 1): 1 - C(n - c, k) / C(n, k) per problem, averaged; needs n >= k.
- maj@k: the majority answer's correctness; ties between equally frequent answers count as the
  expected correctness of a uniform tie-break; samples without an answer do not vote.
- A percentile bootstrap interval over problems (the paper: one of 30 problems is 3.3 points).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), computed as a product to stay exact for large n."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"pass_at_k: num_correct={num_correct} outside [0, {num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={num_samples}] for the unbiased estimator")
    if num_samples - num_correct < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    """[P] fraction of correct samples per problem."""
    if not correct or any(len(row) == 0 for row in correct):
        raise ValueError("per_problem_accuracy: every problem needs at least one sample")
    return np.array([float(np.mean(row)) for row in correct])


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    return float(per_problem_accuracy(correct).mean())


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    return float(np.mean([pass_at_k(len(row), int(sum(row)), k) for row in correct]))


def majority_correct(answer_keys: Sequence[Hashable | None], correct: Sequence[bool]) -> float:
    """Correctness of the most frequent answer of one problem, in [0, 1].

    answer_keys[j]: the equivalence class of sample j's answer (None: no answer, does not vote).
    A class's correctness is the mean of its samples' (equal unless a check timed out); tied classes
    are averaged (a uniform random tie-break, in expectation).
    """
    if len(answer_keys) != len(correct):
        raise ValueError("majority_correct: one key per sample")
    votes = Counter(key for key in answer_keys if key is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    by_key: dict[Hashable, list[bool]] = defaultdict(list)
    for key, ok in zip(answer_keys, correct):
        if key is not None:
            by_key[key].append(ok)
    winners = [key for key, count in votes.items() if count == top]
    return float(np.mean([np.mean(by_key[key]) for key in winners]))


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per problem), seeded."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci: confidence={confidence} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)

"""avg@k, pass@k, maj@k and the bootstrap interval against brute force and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sgsd.evaluation.metrics import (
    avg_at_k,
    bootstrap_ci,
    majority_correct,
    mean_pass_at_k,
    pass_at_k,
    per_problem_accuracy,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c of them correct) holding at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # both sides are ratios of small integers; 1e-12 allows only float rounding
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_limits():
    assert pass_at_k(12, 0, 12) == 0.0
    assert pass_at_k(12, 1, 12) == 1.0  # k = n: any correct sample
    assert pass_at_k(12, 3, 1) == pytest.approx(3 / 12, abs=1e-12)  # pass@1 is the fraction correct
    # 1 - C(10, 2) / C(12, 2) = 1 - 45/66
    assert pass_at_k(12, 2, 2) == pytest.approx(1 - 45 / 66, abs=1e-12)
    # large n stays accurate (a naive binomial ratio overflows floats)
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)  # k > n: no unbiased estimate
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_avg_and_mean_pass_at_k_against_loops():
    rng = np.random.default_rng(3)
    correct = [list(rng.random(6) < p) for p in (0.0, 0.2, 0.5, 0.9, 1.0)]
    expected_avg = sum(sum(row) / len(row) for row in correct) / len(correct)
    assert avg_at_k(correct) == pytest.approx(expected_avg, abs=1e-12)
    assert per_problem_accuracy(correct).tolist() == pytest.approx([sum(r) / 6 for r in correct], abs=1e-12)
    for k in (1, 3, 6):
        expected = sum(brute_pass_at_k(6, int(sum(row)), k) for row in correct) / len(correct)
        assert mean_pass_at_k(correct, k) == pytest.approx(expected, abs=1e-12)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct), abs=1e-12)
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def brute_majority(keys, correct) -> float:
    """Expected correctness when a uniformly random most-voted class is picked."""
    votes = {}
    for key, ok in zip(keys, correct):
        if key is not None:
            votes.setdefault(key, []).append(ok)
    if not votes:
        return 0.0
    top = max(len(v) for v in votes.values())
    winners = [v for v in votes.values() if len(v) == top]
    return sum(sum(v) / len(v) for v in winners) / len(winners)


def test_majority_correct_hand_cases():
    assert majority_correct(["g", "a", "a"], [True, False, False]) == 0.0
    assert majority_correct(["g", "g", "a"], [True, True, False]) == 1.0
    assert majority_correct(["g", "a"], [True, False]) == 0.5  # tie: coin flip in expectation
    assert majority_correct([None, None, "g"], [False, False, True]) == 1.0  # no answer does not vote
    assert majority_correct([None, None], [False, False]) == 0.0


def test_majority_correct_random_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        keys = [None if r < 0.2 else "abc"[int(r * 10) % 3] for r in rng.random(n)]
        correct = [key == "a" for key in keys]
        assert majority_correct(keys, correct) == pytest.approx(brute_majority(keys, correct), abs=1e-12)


def test_bootstrap_interval():
    values = [1.0] * 15 + [0.0] * 15
    low, high = bootstrap_ci(values, seed=0)
    assert low < 0.5 < high
    # normal approximation: 0.5 -/+ 1.96 * 0.5 / sqrt(30) = [0.321, 0.679]; the bootstrap means move in
    # steps of 1/30 and the resampling adds Monte Carlo error, hence 0.04
    assert low == pytest.approx(0.5 - 1.96 * 0.5 / math.sqrt(30), abs=0.04)
    assert high == pytest.approx(0.5 + 1.96 * 0.5 / math.sqrt(30), abs=0.04)
    assert bootstrap_ci(values, seed=0) == (low, high)  # seeded
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)
    narrow = bootstrap_ci(values, confidence=0.5, seed=0)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(ValueError):
        bootstrap_ci([])

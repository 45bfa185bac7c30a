"""The grader on the real benchmark golds (../shared/benchmarks): each boxed gold grades correct."""

from __future__ import annotations

import re

import pytest
from conftest import BENCHMARKS, require_shared

from sgsd.evaluation.benchmarks import load_benchmark
from sgsd.verify import grade_batch

GRADED = ("aime24", "aime25", "hmmt25", "math500")


@pytest.fixture(scope="module")
def golds() -> dict[str, list[str]]:
    data_dir = require_shared(BENCHMARKS)
    return {name: [p.answer for p in load_benchmark(name, data_dir=data_dir).problems] for name in GRADED}


def test_every_boxed_gold_grades_correct(golds):
    pairs = [(name, gold) for name in GRADED for gold in golds[name]]
    assert len(pairs) == 30 + 30 + 30 + 500
    # A realistic completion: reasoning with other numbers and an earlier box, then the final box.
    completions = [f"We try \\boxed{{0}} first; that fails.\n\nTherefore the answer is $\\boxed{{{gold}}}$."
                   for _, gold in pairs]
    results = grade_batch(completions, [gold for _, gold in pairs], workers=2, timeout_s=10.0)
    failed = [(name, gold, r) for (name, gold), r in zip(pairs, results) if not r.correct]
    assert not failed, f"{len(failed)} golds do not match themselves: {failed[:10]}"


def test_integer_off_by_one_grades_wrong(golds):
    integers = [g for name in GRADED for g in golds[name] if re.fullmatch(r"-?\d+", g)]
    assert len(integers) >= 60 + 14  # every AIME answer and HMMT's 14 integers
    completions = [f"\\boxed{{{int(g) + delta}}}" for g in integers for delta in (-1, 1)]
    results = grade_batch(completions, [g for g in integers for _ in (-1, 1)], workers=2)
    assert not any(r.correct for r in results)
    assert all(r.failure is None for r in results)


def test_aime_zero_padding(golds):
    padded = [g for g in golds["aime24"] if g.startswith("0")]
    assert padded, "AIME24 golds are zero-padded to three digits"
    results = grade_batch([f"\\boxed{{{int(g)}}}" for g in padded], padded)
    assert all(r.correct for r in results)

"""Teacher construction from a retrieval (docs/spec.md section 3).

Teacher r is the rank-aligned pair (skill r, mistake r), r = 0..K-1 with K = min(#skills, #mistakes,
k). Its pair score is the mean of the two retrieval scores; the teacher weights are
a = softmax(pair scores) at temperature 1, or uniform 1/K when the retrieval has no scores (random
mode). Weights sum to 1 per problem. Each teacher's guidance renders its ONE pair
(`sgsd.prompts.render_guidance([skill], [mistake])`).

Training retrieves per generation batch and caches the teachers per (bank version, problem) in memory
(`sgsd.trainers.sgsd_trainer.TeacherSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from sgsd.prompts import render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill
from sgsd.skills.retrieval import Retrieval


@dataclass(frozen=True)
class Teacher:
    skill: GeneralSkill
    mistake: CommonMistake
    score: float | None  # mean of the skill and mistake scores; None in random mode
    weight: float  # a_k: softmax over the pair scores (or 1/K); sums to 1 over a problem's teachers
    guidance: str  # the teacher's privileged-information block (one pair)


def pair_weights(scores: Sequence[float | None]) -> list[float]:
    """softmax(scores) at temperature 1 (max-subtracted, float64); uniform 1/K if any score is None."""
    if not scores:
        return []
    if any(s is None for s in scores):
        return [1.0 / len(scores)] * len(scores)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = math.fsum(exps)
    return [e / total for e in exps]


def build_teachers(retrieval: Retrieval, k: int | None = None) -> list[Teacher]:
    """The K rank-aligned teachers of one problem (K = min(len(skills), len(mistakes), k))."""
    size = min(len(retrieval.skills), len(retrieval.mistakes))
    if k is not None:
        size = min(size, k)
    pairs = list(zip(retrieval.skills[:size], retrieval.mistakes[:size]))
    scores = [None if s.score is None or m.score is None else (s.score + m.score) / 2.0 for s, m in pairs]
    weights = pair_weights(scores)
    return [
        Teacher(s.item, m.item, score, weight, render_guidance([s.item], [m.item]))
        for (s, m), score, weight in zip(pairs, scores, weights)
    ]

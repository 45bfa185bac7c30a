"""Teacher construction from a retrieval (docs/spec.md section 3).

Teacher r is the rank-aligned pair (skill r, mistake r), r = 0..K-1 with K = min(#skills, #mistakes,
k). Its pair score is the mean of the two retrieval scores; the teacher weights are
a = softmax(pair scores) at temperature 1, or uniform 1/K when the retrieval has no scores (random
mode). Weights sum to 1 per problem. Each teacher's guidance renders its ONE pair
(`sgsd.prompts.render_guidance([skill], [mistake])`).

Training and the probe retrieve per batch and cache the teachers (and the control teacher's guidance,
`sgsd.skills.controls`) per (bank version, problem) in memory (`TeacherSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from sgsd.prompts import render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank
from sgsd.skills.controls import control_guidance
from sgsd.skills.retrieval import Retrieval, Retriever

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


class TeacherSource:
    """Problems -> their K teachers (and control guidance), cached per bank version."""

    def __init__(self, bank: SkillBank, retriever: Retriever, num_teachers: int) -> None:
        self.bank, self.retriever, self.num_teachers = bank, retriever, num_teachers
        self._cache: dict[tuple[str, str], list[Teacher]] = {}
        self._controls: dict[tuple[str, str, str], str] = {}

    def set_bank(self, bank: SkillBank) -> None:
        """Use an updated bank (online skill update); cached teachers of the old bank are dropped."""
        self.bank = bank
        self.retriever = self.retriever.rebind(bank)
        self._cache.clear()
        self._controls.clear()

    def teachers_for(self, problems: Sequence[str]) -> list[list[Teacher]]:
        version = self.bank.version
        missing = list(dict.fromkeys(p for p in problems if (version, p) not in self._cache))
        if missing:
            for problem, retrieval in zip(missing, self.retriever.retrieve_many(missing, self.num_teachers)):
                self._cache[(version, problem)] = build_teachers(retrieval, self.num_teachers)
        return [self._cache[(version, p)] for p in problems]

    def controls_for(self, problems: Sequence[str], kind: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The control teacher's guidance block of each problem (`sgsd.skills.controls.control_guidance`)."""
        teachers = self.teachers_for(problems)
        version = self.bank.version
        out = []
        for problem, row in zip(problems, teachers):
            key = (version, kind, problem)
            if key not in self._controls:
                self._controls[key] = control_guidance(kind, problem=problem, teachers=row, bank=self.bank,
                                                       tokenizer=tokenizer)
            out.append(self._controls[key])
        return out

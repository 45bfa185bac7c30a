"""The demo's synthetic math world: multi-step addition of single digits, one running total per line.

A problem asks for the sum of 4-5 single-digit numbers in plain words ("What is 7 + 5 + 8 + 3 + 9?"),
so the project's student prompt (`sgsd.prompts.student_prompt`) wraps it unchanged. A worked
solution adds the numbers left to right, one step per line, and ends with the answer in a box::

    7+5=12
    12+8=20
    20+3=23
    23+9=32
    \\\\boxed{32}

Why this shape:
- Every step is local: the total comes from the line above, the next number from the problem just
  after the previous one. A 0.7 M-parameter model learns it in minutes on a CPU, whatever text
  surrounds the problem (a skill block before it, a reference answer after it). Column addition of
  3-4 digit numbers, tried first, needs right-to-left digit look-ups that the model learned as
  "distance from the end of the prompt", which broke under the OPSD reference prompt.
- Carries are frequent (about 1.8 per problem) and each is one decision, the tens digit of the new
  total: the decision a hint can change is a visible share of the ~28 counted completion tokens
  (DEMO_NOTES: with a wordy format most teachers were neutral at theta = 0.05).

Two kinds of mistakes appear in the synthetic worked solutions that the warm-up imitates:
- a forgotten carry (`12+8=10`): the ones digits reach 10 but the tens digit is not increased. Its
  rate depends on the hint in the prompt - a helpful skill lowers it, a misleading one raises it
  (see `sgsd.demo.bank`);
- an arithmetic slip (a total off by one): no hint changes its rate; only a reference answer (the
  OPSD teacher's privileged information) does.
Later lines always continue from the written total, so a mistake propagates like a real one.

Everything is deterministic from `WorldConfig.seed`; train and test problems never share a sequence
of numbers. Problems are the trainers' `sgsd.data.Problem` (id, text, answer); their numbers are read
back from the text (`problem_terms`). Answers are integers written as strings, graded by `sgsd.verify.grade`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from sgsd.data import Problem
from sgsd.errors import ConfigError
from sgsd.storage import atomic_write_jsonl

PROBLEM_TEMPLATES = (
    "What is {terms}?",
    "Compute {terms}.",
)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class MistakeRates:
    """Per-decision mistake probabilities of one kind of prompt.

    forget_carry: probability that a carry (ones digits reaching 10) does not increase the tens
        digit of the new total. Applies to each carry separately.
    slip: probability that a new total is written off by one (up or down). Applies to each line.
    """

    forget_carry: float
    slip: float

    def __post_init__(self) -> None:
        for name in ("forget_carry", "slip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"MistakeRates.{name} = {value}: expected a probability in [0, 1]")


@dataclass(frozen=True)
class WorldConfig:
    """Size and difficulty of the world.

    min_terms / max_terms: how many numbers (each 1-9) a problem adds.
    min_carries: problems with fewer carries are redrawn, so that the carry skill always matters.
    """

    seed: int = 0
    num_train: int = 4000
    num_test: int = 200
    min_terms: int = 4
    max_terms: int = 5
    min_carries: int = 1

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms <= 12:
            raise ConfigError(
                f"WorldConfig terms: need 2 <= min_terms <= max_terms <= 12, got {self.min_terms}..{self.max_terms}"
            )
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError(f"WorldConfig: num_train and num_test must be >= 1, got {self.num_train}, {self.num_test}")
        if not 0 <= self.min_carries < self.min_terms:
            raise ConfigError(f"WorldConfig.min_carries = {self.min_carries}: must be in [0, min_terms - 1]")
        # Loose bound (ignores the carry filter): the draw loop must be able to finish.
        if 2 * (self.num_train + self.num_test) > 9**self.max_terms:
            raise ConfigError(f"WorldConfig: {self.num_train + self.num_test} problems are too many for {self.max_terms} terms")


@dataclass(frozen=True)
class World:
    config: WorldConfig
    train: tuple[Problem, ...] = field(repr=False)
    test: tuple[Problem, ...] = field(repr=False)


@dataclass(frozen=True)
class WorkedSolution:
    """A synthetic solution: its text, the answer it reaches and the mistakes it contains."""

    text: str
    final_answer: str
    forgotten_carries: int
    slips: int

    @property
    def correct(self) -> bool:
        return self.forgotten_carries == 0 and self.slips == 0


def is_carry(total: int, term: int) -> bool:
    """Adding `term` to `total` carries when the ones digits reach 10."""
    return total % 10 + term >= 10


def problem_terms(problem: Problem) -> tuple[int, ...]:
    """The numbers a problem of this world adds, in order (its text names them and nothing else)."""
    found = tuple(int(t) for t in _NUMBER.findall(problem.problem))
    if len(found) < 2:
        raise ValueError(f"problem {problem.problem_id!r} is not an addition of this world: {problem.problem!r}")
    return found


def count_carries(terms: Sequence[int]) -> int:
    """Carries of the correct running sum of `terms`."""
    total, carries = terms[0], 0
    for term in terms[1:]:
        carries += is_carry(total, term)
        total += term
    return carries


def problem_text(terms: Sequence[int], template: str) -> str:
    return template.format(terms=" + ".join(str(t) for t in terms))


def make_world(config: WorldConfig) -> World:
    """Draw `num_train + num_test` distinct problems; the first `num_test` drawn form the test split."""
    rng = random.Random(f"sgsd-demo-world:{config.seed}")
    seen: set[tuple[int, ...]] = set()
    problems: list[Problem] = []
    while len(problems) < config.num_train + config.num_test:
        terms = tuple(rng.randint(1, 9) for _ in range(rng.randint(config.min_terms, config.max_terms)))
        if terms in seen or count_carries(terms) < config.min_carries:
            continue
        seen.add(terms)
        text = problem_text(terms, PROBLEM_TEMPLATES[rng.randrange(len(PROBLEM_TEMPLATES))])
        split = "test" if len(problems) < config.num_test else "train"
        index = len(problems) if split == "test" else len(problems) - config.num_test
        problems.append(Problem(f"{split}-{index:05d}", text, str(sum(terms))))
    return World(config, train=tuple(problems[config.num_test:]), test=tuple(problems[: config.num_test]))


def worked_solution(problem: Problem, rates: MistakeRates, rng: random.Random) -> WorkedSolution:
    """A step-by-step solution with mistakes drawn at `rates` (see the module docstring)."""
    numbers = problem_terms(problem)
    total = numbers[0]
    lines: list[str] = []
    forgotten = slips = 0
    for term in numbers[1:]:
        new = total + term
        if is_carry(total, term) and rng.random() < rates.forget_carry:
            new, forgotten = new - 10, forgotten + 1
        if rng.random() < rates.slip:
            new = new + 1 if new == 0 else new + rng.choice((-1, 1))
            slips += 1
        lines.append(f"{total}+{term}={new}")
        total = new
    lines.append(f"\\boxed{{{total}}}")
    return WorkedSolution("\n".join(lines), str(total), forgotten, slips)


def write_problems(problems: Sequence[Problem], path: str) -> None:
    """Write problems as JSONL (`id`, `problem`, `answer`), the format `sgsd.data.load_problems` reads (atomic)."""
    atomic_write_jsonl(path, ({"id": p.problem_id, "problem": p.problem, "answer": p.answer} for p in problems))

"""The demo's synthetic math world: multi-digit addition solved column by column.

A problem asks for the sum of two numbers of the same length (3 or 4 digits) in plain words
("What is 4728 + 3594?"), so the project's student prompt (`sgsd.prompts.student_prompt`) wraps it
unchanged. A worked solution adds one column per line, right to left, each line written as
`digit + digit + carry-in = sum`, and ends with the final answer in a box::

    8+4+0=12
    2+9+1=12
    7+5+1=13
    4+3+1=8
    \\boxed{8322}

The format is deliberately terse (about 40 counted tokens for four columns): SGSD's support is a
mean over completion tokens, and a decision that a hint changes (here: the carry-in digit) must be a
visible share of them (DEMO_NOTES: with a wordy format most teachers were neutral at theta = 0.05).
It is also regular, so that a tiny model learns it in minutes on a CPU: equal-length operands and
lines of fixed shape put the digits a line needs at nearly fixed distances from it.

Two kinds of mistakes appear in the synthetic worked solutions that the warm-up imitates:
- a forgotten carry (`2+9+0=11` above): its rate depends on the hint in the prompt - a helpful skill
  lowers it, a misleading one raises it (see `sgsd.demo.bank`);
- an arithmetic slip (a column sum off by one): no hint changes its rate; only a reference
  solution (the OPSD teacher's privileged information) does.
Later columns always follow the written line, so a mistake propagates like a real one.

Everything is deterministic from `WorldConfig.seed`; train and test problems never share an
(a, b) pair. Answers are integers written as strings, the format `sgsd.verify.grade` expects.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

from sgsd.errors import ConfigError

# Both templates put the operands at the same distance from the end of the prompt.
PROBLEM_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
)


@dataclass(frozen=True)
class MistakeRates:
    """Per-decision mistake probabilities of one kind of prompt.

    forget_carry: probability that a carry (a column sum of 10 or more) is not added to the next
        column. Applies to each carry separately.
    slip: probability that a column sum is written off by one (up or down). Applies to each column.
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

    min_digits / max_digits: operand length range (both operands of a problem have the same length).
    min_carries: problems with fewer carries into a next column are redrawn, so that the carry skill
        matters in every problem.
    """

    seed: int = 0
    num_train: int = 4000
    num_test: int = 200
    min_digits: int = 3
    max_digits: int = 4
    min_carries: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ConfigError(
                f"WorldConfig digits: need 1 <= min_digits <= max_digits <= 9, got {self.min_digits}..{self.max_digits}"
            )
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError(f"WorldConfig: num_train and num_test must be >= 1, got {self.num_train}, {self.num_test}")
        if not 0 <= self.min_carries < self.max_digits:
            raise ConfigError(
                f"WorldConfig.min_carries = {self.min_carries}: must be in [0, max_digits - 1 = {self.max_digits - 1}]"
            )
        capacity = (9 * 10 ** (self.max_digits - 1)) ** 2 // 4
        if self.num_train + self.num_test > capacity:
            raise ConfigError(f"WorldConfig: {self.num_train + self.num_test} problems do not fit in {self.max_digits}-digit operands")

    def digest(self) -> str:
        """A short stable hash of the configuration (cache keys)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Problem:
    """One addition problem. `answer` is the gold final answer as a string (for `sgsd.verify.grade`)."""

    problem_id: str
    text: str
    a: int
    b: int
    answer: str

    @property
    def num_carries(self) -> int:
        """Carries into a next column (a carry out of the leftmost column is just written down)."""
        return count_carries(self.a, self.b)


@dataclass(frozen=True)
class Column:
    digit_a: int
    digit_b: int
    carry_in: int
    carry_out: int


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


def columns(a: int, b: int) -> list[Column]:
    """The correct columns of a + b, ones first (a missing digit counts as 0)."""
    out, carry = [], 0
    width = max(len(str(a)), len(str(b)))
    for i in range(width):
        da, db = a // 10**i % 10, b // 10**i % 10
        total = da + db + carry
        out.append(Column(da, db, carry, total // 10))
        carry = total // 10
    return out


def count_carries(a: int, b: int) -> int:
    """Carries a solver must add to a next column: the decisions a forgotten carry can get wrong."""
    return sum(1 for column in columns(a, b) if column.carry_in)


def _draw_operands(rng: random.Random, config: WorldConfig) -> tuple[int, int]:
    digits = rng.randint(config.min_digits, config.max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 1), 10**digits - 1)


def make_world(config: WorldConfig) -> World:
    """Draw `num_train + num_test` distinct problems; the first `num_test` drawn form the test split."""
    rng = random.Random(f"sgsd-demo-world:{config.seed}")
    seen: set[tuple[int, int]] = set()
    problems: list[Problem] = []
    while len(problems) < config.num_train + config.num_test:
        a, b = _draw_operands(rng, config)
        # a + b and b + a are the same problem to a learner: keep them on one side of the split.
        key = (min(a, b), max(a, b))
        if key in seen or count_carries(a, b) < config.min_carries:
            continue
        seen.add(key)
        template = PROBLEM_TEMPLATES[rng.randrange(len(PROBLEM_TEMPLATES))]
        split = "test" if len(problems) < config.num_test else "train"
        index = len(problems) if split == "test" else len(problems) - config.num_test
        problems.append(Problem(f"{split}-{index:05d}", template.format(a=a, b=b), a, b, str(a + b)))
    return World(config, train=tuple(problems[config.num_test:]), test=tuple(problems[: config.num_test]))


def worked_solution(problem: Problem, rates: MistakeRates, rng: random.Random) -> WorkedSolution:
    """A column-by-column solution with mistakes drawn at `rates` (see the module docstring)."""
    width = max(len(str(problem.a)), len(str(problem.b)))
    lines: list[str] = []
    written_digits: list[str] = []
    carry = forgotten = slips = 0
    for i in range(width):
        da, db = problem.a // 10**i % 10, problem.b // 10**i % 10
        if carry and rng.random() < rates.forget_carry:
            carry, forgotten = 0, forgotten + 1
        total = da + db + carry
        if rng.random() < rates.slip:
            # Off by one, staying a possible column sum (0..19).
            total = total + 1 if total == 0 else total - 1 if total == 19 else total + rng.choice((-1, 1))
            slips += 1
        lines.append(f"{da}+{db}+{carry}={total}")
        if i == width - 1:
            written_digits.append(str(total))
        else:
            written_digits.append(str(total % 10))
            carry = total // 10
    final = "".join(reversed(written_digits)).lstrip("0") or "0"
    lines.append(f"\\boxed{{{final}}}")
    return WorkedSolution("\n".join(lines), final, forgotten, slips)


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def boxed_integer(completion: str) -> str | None:
    """The integer in the last `\\boxed{...}` of a completion, or None (a quick exact check for the demo)."""
    found = _BOXED.findall(completion)
    return str(int(found[-1])) if found else None


def is_correct(completion: str, problem: Problem) -> bool:
    return boxed_integer(completion) == problem.answer


def to_training_problems(problems: Sequence[Problem]) -> list:
    """The problems as `sgsd.data.Problem(problem_id, problem, answer)`, the trainers' input type."""
    from sgsd.data import Problem as TrainingProblem

    return [TrainingProblem(p.problem_id, p.text, p.answer) for p in problems]


def write_problems(problems: Sequence[Problem], path: str) -> None:
    """Write problems as JSONL (`id`, `problem`, `answer`), the format `sgsd.data.load_problems` reads (atomic)."""
    from sgsd.skills.storage import atomic_write_jsonl

    atomic_write_jsonl(path, ({"id": p.problem_id, "problem": p.text, "answer": p.answer} for p in problems))

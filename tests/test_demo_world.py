"""The demo's world and seed bank: determinism, disjoint splits, answers correct by construction,
mistakes that behave as documented, a bank that loads with the project's skill-bank loader."""

from __future__ import annotations

import json
import random
import re

import pytest

from sgsd.demo.bank import HELPFUL, IRRELEVANT, MISLEADING, hint_effect, item_labels, seed_bank, write_seed_bank
from sgsd.demo.world import (
    MistakeRates,
    WorldConfig,
    boxed_integer,
    columns,
    is_correct,
    make_world,
    to_training_problems,
    worked_solution,
)
from sgsd.errors import ConfigError

SMALL = WorldConfig(seed=3, num_train=300, num_test=60)
LINE = re.compile(r"^(\d)\+(\d)\+([01])=(\d+)$")


def _written_carries(text: str) -> int:
    """Column lines that add a carry (`d+d+1=s`)."""
    return sum(1 for line in text.split("\n") if (m := LINE.match(line)) and m.group(3) == "1")


def test_world_is_deterministic_and_seed_dependent():
    assert make_world(SMALL) == make_world(SMALL)
    other = make_world(WorldConfig(seed=4, num_train=300, num_test=60))
    assert [p.text for p in other.train] != [p.text for p in make_world(SMALL).train]


def test_splits_are_disjoint_even_up_to_operand_order():
    world = make_world(SMALL)
    assert len(world.train) == 300 and len(world.test) == 60
    train = {frozenset((p.a, p.b)) for p in world.train}
    test = {frozenset((p.a, p.b)) for p in world.test}
    assert not train & test
    assert len({p.problem_id for p in world.train + world.test}) == 360


def test_problems_respect_the_config():
    world = make_world(SMALL)
    for p in world.train + world.test:
        assert 100 <= p.a <= 9999 and 100 <= p.b <= 9999 and len(str(p.a)) == len(str(p.b))
        assert p.num_carries >= SMALL.min_carries
        assert p.answer == str(p.a + p.b)
        assert str(p.a) in p.text and str(p.b) in p.text


def test_columns_reconstruct_the_sum():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        cols = columns(a, b)
        total = sum(((c.digit_a + c.digit_b + c.carry_in) % 10) * 10**i for i, c in enumerate(cols))
        assert total + cols[-1].carry_out * 10 ** len(cols) == a + b


def test_error_free_solutions_are_correct_and_follow_the_format():
    world = make_world(SMALL)
    rng = random.Random(0)
    for p in world.train:
        sol = worked_solution(p, MistakeRates(0.0, 0.0), rng)
        assert sol.correct and sol.final_answer == p.answer
        assert is_correct(sol.text, p)
        *lines, last = sol.text.split("\n")
        assert last == f"\\boxed{{{p.answer}}}"
        assert len(lines) == max(len(str(p.a)), len(str(p.b)))
        for line, col in zip(lines, columns(p.a, p.b)):
            da, db, carry, total = LINE.match(line).groups()
            assert (int(da), int(db), int(carry)) == (col.digit_a, col.digit_b, col.carry_in)
            assert int(total) == col.digit_a + col.digit_b + col.carry_in


def test_mistakes_make_wrong_answers_and_are_counted():
    world = make_world(SMALL)
    rng = random.Random(1)
    # Every problem has a carry, so forgetting all carries always gives a wrong answer.
    for p in world.train[:100]:
        sol = worked_solution(p, MistakeRates(1.0, 0.0), rng)
        assert sol.forgotten_carries >= 1 and not is_correct(sol.text, p)
        assert _written_carries(sol.text) == 0
    # A slip in every column changes the units digit, so the answer is always wrong.
    for p in world.train[:100]:
        sol = worked_solution(p, MistakeRates(0.0, 1.0), rng)
        assert sol.slips == len(columns(p.a, p.b)) and not is_correct(sol.text, p)


def test_mistake_rates_are_close_to_the_requested_rates():
    world = make_world(WorldConfig(seed=0, num_train=3000, num_test=10))
    rng = random.Random(2)
    carries = forgotten = 0
    for p in world.train:
        sol = worked_solution(p, MistakeRates(0.3, 0.0), rng)
        forgotten += sol.forgotten_carries
        # A forgotten carry can remove the next carry, so count the carries of the written solution.
        carries += _written_carries(sol.text) + sol.forgotten_carries
    # ~6000 carries: the binomial standard error of the rate is ~0.006; 0.03 is 5 standard errors.
    assert abs(forgotten / carries - 0.3) < 0.03


def test_boxed_integer_and_grader_format():
    assert boxed_integer("4+5=9\n\\boxed{123}") == "123"
    assert boxed_integer("\\boxed{1} then \\boxed{ 0042 }") == "42"
    assert boxed_integer("no box") is None
    world = make_world(SMALL)
    sol = worked_solution(world.test[0], MistakeRates(0.0, 0.0), random.Random(0))
    from sgsd.verify import grade

    assert grade(sol.text, world.test[0].answer).correct


def test_training_problems_conversion():
    world = make_world(SMALL)
    converted = to_training_problems(world.test[:3])
    assert [(c.problem_id, c.problem, c.answer) for c in converted] == [
        (p.problem_id, p.text, p.answer) for p in world.test[:3]
    ]


def test_written_problems_load_with_the_project_loader(tmp_path):
    from sgsd.data import load_problems
    from sgsd.demo.world import write_problems

    world = make_world(SMALL)
    path = tmp_path / "train.jsonl"
    write_problems(world.train[:20], str(path))
    loaded, report = load_problems(str(path))
    assert [(p.problem_id, p.problem, p.answer) for p in loaded] == [
        (p.problem_id, p.text, p.answer) for p in world.train[:20]
    ]
    assert report.kept == 20


def test_bad_world_config_is_a_config_error():
    with pytest.raises(ConfigError, match="digits"):
        WorldConfig(min_digits=5, max_digits=3)
    with pytest.raises(ConfigError, match="probability"):
        MistakeRates(forget_carry=1.5, slip=0.0)


def test_seed_bank_loads_with_the_project_loader_and_has_all_labels(tmp_path):
    from sgsd.skills import load_bank

    path = write_seed_bank(tmp_path / "bank.json")
    raw = json.loads(path.read_text())
    assert set(raw) >= {"general_skills", "common_mistakes", "task_specific_skills", "metadata"}
    bank = load_bank(path)
    ids = [s.skill_id for s in bank.general_skills] + [m.mistake_id for m in bank.common_mistakes]
    assert ids == [s["skill_id"] for s in raw["general_skills"]] + [m["mistake_id"] for m in raw["common_mistakes"]]
    labels = raw["metadata"]["labels"]
    assert set(labels) == set(ids)
    for kind in ("skill", "mistake"):
        prefix = "gen_" if kind == "skill" else "err_"
        assert {labels[i] for i in ids if i.startswith(prefix)} == {HELPFUL, IRRELEVANT, MISLEADING}
    assert seed_bank() == raw and not list(tmp_path.glob(".*tmp"))


def test_hint_effect_counts_helpful_minus_misleading():
    labels = item_labels()
    helpful = [i for i, lab in labels.items() if lab == HELPFUL]
    misleading = [i for i, lab in labels.items() if lab == MISLEADING]
    irrelevant = [i for i, lab in labels.items() if lab == IRRELEVANT]
    assert hint_effect(helpful[:2]) == 2
    assert hint_effect([helpful[0], misleading[0]]) == 0
    assert hint_effect(misleading[:2] + irrelevant) == -2
    assert hint_effect(["dyn_001"]) == 0

"""The demo's world and seed bank: determinism, disjoint splits, answers correct by construction,
mistakes that behave as documented, a bank that loads with the project's skill-bank loader."""

from __future__ import annotations

import json
import random
import re

import pytest

from sgsd.demo.bank import HELPFUL, IRRELEVANT, MISLEADING, hint_effect, item_labels, seed_bank, write_seed_bank
from sgsd.data import Problem
from sgsd.demo.evaluate import is_correct
from sgsd.demo.world import MistakeRates, WorldConfig, count_carries, make_world, problem_terms, worked_solution
from sgsd.errors import ConfigError

SMALL = WorldConfig(seed=3, num_train=300, num_test=60)
LINE = re.compile(r"^(\d+)\+(\d)=(\d+)$")


def _lines(text: str) -> list[tuple[int, int, int]]:
    """(total, term, new total) of each step line."""
    return [tuple(int(x) for x in LINE.match(line).groups()) for line in text.split("\n")[:-1]]


def test_world_is_deterministic_and_seed_dependent():
    assert make_world(SMALL) == make_world(SMALL)
    other = make_world(WorldConfig(seed=4, num_train=300, num_test=60))
    assert [p.problem for p in other.train] != [p.problem for p in make_world(SMALL).train]


def test_splits_are_disjoint():
    world = make_world(SMALL)
    assert len(world.train) == 300 and len(world.test) == 60
    terms = {split: {problem_terms(p) for p in getattr(world, split)} for split in ("train", "test")}
    assert not terms["train"] & terms["test"]
    assert len(terms["train"] | terms["test"]) == 360
    assert len({p.problem_id for p in world.train + world.test}) == 360


def test_problems_respect_the_config():
    world = make_world(SMALL)
    for p in world.train + world.test:
        terms = problem_terms(p)
        assert isinstance(p, Problem)  # the trainers' problem type
        assert SMALL.min_terms <= len(terms) <= SMALL.max_terms and all(1 <= t <= 9 for t in terms)
        assert count_carries(terms) >= SMALL.min_carries
        assert p.answer == str(sum(terms))
        assert " + ".join(map(str, terms)) in p.problem


def test_count_carries_by_hand():
    assert count_carries([7, 5, 8, 3, 9]) == 3  # 7+5=12, 12+8=20, 20+3=23 (no carry), 23+9=32
    assert count_carries([1, 2, 3, 4]) == 1  # 6+4=10
    assert count_carries([1, 1, 1]) == 0


def test_error_free_solutions_are_correct_and_follow_the_format():
    world = make_world(SMALL)
    rng = random.Random(0)
    for p in world.train:
        sol = worked_solution(p, MistakeRates(0.0, 0.0), rng)
        assert sol.correct and sol.final_answer == p.answer
        assert is_correct(sol.text, p)
        assert sol.text.split("\n")[-1] == f"\\boxed{{{p.answer}}}"
        steps = _lines(sol.text)
        assert [term for _, term, _ in steps] == list(problem_terms(p)[1:])
        assert steps[0][0] == problem_terms(p)[0]
        for (total, term, new), following in zip(steps, steps[1:] + [(int(p.answer), 0, 0)]):
            assert new == total + term and following[0] == new


def test_mistakes_make_wrong_answers_and_are_counted():
    world = make_world(SMALL)
    rng = random.Random(1)
    # Every problem has a carry, so forgetting all carries always gives a wrong answer, 10 too
    # small per carry forgotten; lines continue from the written total.
    for p in world.train[:100]:
        sol = worked_solution(p, MistakeRates(1.0, 0.0), rng)
        assert sol.forgotten_carries >= 1 and not is_correct(sol.text, p)
        assert int(sol.final_answer) == sum(problem_terms(p)) - 10 * sol.forgotten_carries
        for total, term, new in _lines(sol.text):
            assert new == total + term - (10 if total % 10 + term >= 10 else 0)
    # A slip in every line moves each total by one: the answer is wrong unless the slips cancel.
    wrong = 0
    for p in world.train[:100]:
        sol = worked_solution(p, MistakeRates(0.0, 1.0), rng)
        assert sol.slips == len(problem_terms(p)) - 1
        for total, term, new in _lines(sol.text):
            assert abs(new - (total + term)) == 1
        wrong += not is_correct(sol.text, p)
    assert wrong >= 50


def test_mistake_rates_are_close_to_the_requested_rates():
    world = make_world(WorldConfig(seed=0, num_train=3000, num_test=10))
    rng = random.Random(2)
    carries = forgotten = 0
    for p in world.train:
        sol = worked_solution(p, MistakeRates(0.3, 0.0), rng)
        forgotten += sol.forgotten_carries
        # Carries of the written solution (a forgotten carry changes the later ones).
        carries += sum(total % 10 + term >= 10 for total, term, _ in _lines(sol.text))
    # ~5500 carries: the binomial standard error of the rate is ~0.006; 0.03 is 5 standard errors.
    assert carries > 4000 and abs(forgotten / carries - 0.3) < 0.03


def test_the_project_grader_reads_the_worlds_solutions():
    world = make_world(SMALL)
    problem = world.test[0]
    assert is_correct(worked_solution(problem, MistakeRates(0.0, 0.0), random.Random(0)).text, problem)
    assert not is_correct("no box", problem) and not is_correct(f"\\boxed{{{int(problem.answer) + 1}}}", problem)
    assert is_correct(f"1+1=2\n\\boxed{{ 0{problem.answer} }}", problem)  # leading zero: the same integer


def test_numbers_are_read_back_from_the_problem_text():
    assert problem_terms(Problem("x", "What is 7 + 5 + 18?", "30")) == (7, 5, 18)
    with pytest.raises(ValueError, match="not an addition"):
        problem_terms(Problem("y", "What is the answer?", "1"))


def test_written_problems_load_with_the_project_loader(tmp_path):
    from sgsd.data import load_problems
    from sgsd.demo.world import write_problems

    world = make_world(SMALL)
    path = tmp_path / "train.jsonl"
    write_problems(world.train[:20], str(path))
    loaded, report = load_problems(str(path))
    assert [(p.problem_id, p.problem, p.answer) for p in loaded] == [
        (p.problem_id, p.problem, p.answer) for p in world.train[:20]
    ]
    assert report.kept == 20


def test_bad_world_config_is_a_config_error():
    with pytest.raises(ConfigError, match="terms"):
        WorldConfig(min_terms=5, max_terms=3)
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

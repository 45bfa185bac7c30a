"""The demo's method choice and learning-rate search (issue 14, item 3), without training: recipes per
method, the tie rule of the search, the held-out validation split, the pairs compared, and the
over-seed intervals of the polarity-rule comparison."""

import json
from pathlib import Path

import pytest

from sgsd.cli import main
from sgsd.demo.run import (
    DEFAULT_METHODS,
    DEMO_METHODS,
    FULL,
    QUICK,
    SMOKE,
    choose_learning_rate,
    make_plan,
    method_config,
    parse_methods,
    plan_record,
    run_name,
    split_validation,
)
from sgsd.errors import UserError
from sgsd.methods import check_run_config


@pytest.mark.parametrize("name", sorted(DEMO_METHODS))
def test_every_demo_method_is_a_valid_recipe_with_the_shared_budget(name):
    spec = DEMO_METHODS[name]
    cfg = method_config(name, FULL, Path("/m"), Path("/d.jsonl"), Path("/b.json"), seed=3, learning_rate=3e-4)
    check_run_config(cfg)
    assert cfg.method == spec.method and cfg.training.learning_rate == 3e-4 and cfg.training.seed == 3
    # the same rollouts per step for every method: grouped methods take fewer prompts, G completions each
    generations = FULL.grpo_generations if spec.grouped else 1
    assert cfg.training.prompts_per_device * generations == FULL.prompts_per_step
    assert (cfg.sgsd.polarity_test == "z") == name.startswith("sgsd-z")
    assert cfg.sgsd.polarity_z == {"sgsd-z1": 1.0}.get(name, 1.96)
    assert cfg.grpo.skills_in_prompt == (name == "grpo-skill") and cfg.opsd.skills == (name == "opsd-skill")
    # without a rate, the plan's shared one
    assert method_config(name, FULL, Path("/m"), Path("/d"), Path("/b"), 0).training.learning_rate == FULL.learning_rate


def test_parse_methods_keeps_order_and_refuses_unknown_or_repeated_names():
    assert parse_methods("sgsd-pg, grpo,sgsd") == ("sgsd-pg", "grpo", "sgsd")
    with pytest.raises(UserError, match="unknown ppo; choose from"):
        parse_methods("grpo,ppo")
    with pytest.raises(UserError, match="names a method twice"):
        parse_methods("sgsd,sgsd")
    with pytest.raises(UserError, match="at least one"):
        parse_methods(" , ")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "grpo,ppo"], "--methods: unknown ppo"),
    (["--quick", "--preset", "full"], "--quick and --preset full: choose one"),
    (["--lr-grid", "1e-4,3e-4"], "--lr-grid: only with --tune-lr"),
    (["--tune-lr", "--lr-grid", "1e-4,fast"], "--lr-grid: 'fast' is not a number"),
    (["--tune-lr", "--lr-grid", "1e-4,-3e-4"], "--lr-grid: -3e-4 is not a positive learning rate"),
    (["--tune-lr", "--lr-grid", "1e-4,1e-4"], "names a rate twice"),
])
def test_demo_command_line_errors_are_one_line_before_any_work(tmp_path, capsys, argv, message):
    code = main(["demo", *argv, "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_lr_grid_is_sorted_and_reaches_the_plan():
    from sgsd.demo.run import parse_lr_grid

    assert parse_lr_grid("3e-4, 5e-5,1e-4") == (5e-5, 1e-4, 3e-4)
    plan = make_plan(preset="full", tune_lr=True, lr_grid=(5e-5, 2e-4))
    assert plan.lr_grid == (5e-5, 2e-4) and plan_record(plan) == plan_record(FULL)


def test_learning_rate_choice_takes_the_best_and_breaks_ties_toward_the_shared_rate():
    assert choose_learning_rate({3e-5: 0.4, 1e-4: 0.5, 3e-4: 0.6}, 1e-4) == 3e-4
    assert choose_learning_rate({3e-5: 0.6, 1e-4: 0.6, 3e-4: 0.6}, 1e-4) == 1e-4
    assert choose_learning_rate({3e-5: 0.6, 1e-4: 0.5, 3e-4: 0.6}, 1e-4) == 3e-5  # then the smaller rate


def test_run_names_keep_the_former_layout_at_the_shared_rate():
    assert run_name("sgsd", 2, FULL.learning_rate, FULL) == "sgsd-seed2"
    assert run_name("sgsd-pg", 0, 3e-4, FULL) == "sgsd-pg-lr0.0003-seed0"


def test_validation_problems_come_from_the_training_split_and_leave_it():
    from sgsd.demo.world import WorldConfig, make_world

    world = make_world(WorldConfig(seed=0, num_train=300, num_test=20))
    train, validation = split_validation(world.train, 50)
    assert len(validation) == 50 and len(train) == 250
    assert {p.problem_id for p in validation} <= {p.problem_id for p in world.train}
    assert not {p.problem_id for p in validation} & {p.problem_id for p in train}
    assert not {p.problem_id for p in validation} & {p.problem_id for p in world.test}
    assert split_validation(world.train, 50) == (train, validation)  # fixed, not drawn per run


def test_plan_record_ignores_what_only_chooses_which_runs_exist():
    # methods, the search and its grid name run directories; they do not change what a run directory holds
    assert plan_record(FULL) == plan_record(make_plan(preset="full", methods=("sgsd-pg",), tune_lr=True))
    assert plan_record(QUICK) != plan_record(FULL) != plan_record(SMOKE)
    assert make_plan().methods == DEFAULT_METHODS and not make_plan().tune_lr


def test_pairs_compare_every_method_with_base_sgsd_and_grpo():
    from sgsd.demo.report import comparison_pairs

    pairs = comparison_pairs(["grpo", "opsd", "sgsd", "sgsd-z", "sgsd-pg"])
    assert pairs == [("grpo", "base"), ("opsd", "base"), ("sgsd", "base"), ("sgsd-z", "base"), ("sgsd-pg", "base"),
                     ("sgsd", "grpo"), ("sgsd", "opsd"), ("sgsd-z", "sgsd"), ("sgsd-z", "grpo"),
                     ("sgsd-pg", "sgsd"), ("sgsd-pg", "grpo")]
    assert comparison_pairs(["sgsd-z"]) == [("sgsd-z", "base")]  # no reference run, no comparison with it


def test_mean_interval_is_students_t_over_seeds():
    from sgsd.demo.report import mean_interval

    v = mean_interval([1.0, 2.0, 3.0])  # mean 2, standard deviation 1, t(0.975, 2) = 4.303
    assert v["mean"] == 2.0 and v["ci_low"] == pytest.approx(2 - 4.303 / 3**0.5) and v["ci_high"] == pytest.approx(2 + 4.303 / 3**0.5)
    one = mean_interval([0.3])
    assert one["mean"] == 0.3 and one["ci_low"] is None and one["n"] == 1


def _attribution(path: Path, items: dict[str, tuple[int, int, int]]) -> Path:
    path.mkdir()
    state = {"rollouts": 1, "items": [
        {"kind": "skill", "id": item_id, "uses": h + m + n, "helpful": h, "harmful": m, "neutral": n,
         "support_sum": 0.0, "weight_sum": 0.0} for item_id, (h, m, n) in items.items()]}
    (path / "attribution.json").write_text(json.dumps(state))
    return path


def test_polarity_separation_is_net_helpful_minus_net_misleading_per_seed(tmp_path):
    from sgsd.demo.report import polarity_separation

    labels = {"a": "helpful", "b": "misleading", "c": "irrelevant"}
    seed0 = _attribution(tmp_path / "s0", {"a": (6, 2, 2), "b": (1, 3, 1), "c": (1, 1, 8)})
    seed1 = _attribution(tmp_path / "s1", {"a": (4, 4, 2), "b": (0, 5, 0), "c": (0, 0, 10)})
    out = polarity_separation([seed0, seed1], labels)
    # seed 0: helpful +0.4, misleading -0.4; seed 1: helpful 0.0, misleading -1.0
    assert out["net_helpful"]["per_seed"] == pytest.approx([0.4, 0.0])
    assert out["net_misleading"]["per_seed"] == pytest.approx([-0.4, -1.0])
    assert out["separation"]["per_seed"] == pytest.approx([0.8, 1.0])
    assert out["separation"]["mean"] == pytest.approx(0.9)
    assert out["neutral_fraction"]["per_seed"] == pytest.approx([11 / 25, 12 / 25])
    assert out["separation"]["ci_low"] < 0.9 < out["separation"]["ci_high"]

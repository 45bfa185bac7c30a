"""`sgsd sweep`: the grid's banks, cells and shared runs, the report read from an output directory, and the
smoke grid end to end (trains once, resumes without training, refuses other settings)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from sgsd.cli import main
from sgsd.demo.bank import seed_bank
from sgsd.demo.evaluate import AccuracyEstimate
from sgsd.demo.run import EvaluationCache
from sgsd.demo.sweep_grid import (BASES_FILE, FULL_GRID, PAPER, SMOKE_GRID, Cell, bank_path, cell_runs, probe_dir,
                                  run_dir, sweep_bank, sweep_record, world_dir)
from sgsd.demo.sweep_report import held_out_problems, teacher_polarity, write_sweep_report
from sgsd.errors import UserError


def _label_counts(bank, kind):
    labels = bank["metadata"]["labels"]
    field = "skill_id" if kind == "general_skills" else "mistake_id"
    return Counter(labels[item[field]] for item in bank[kind])


def test_sweep_banks_mix_the_seed_banks_items_and_hold_k_of_each_kind():
    seed = seed_bank()
    # at K = 4 the seed mix is the demo's bank itself: the reference cell trains the demo's runs
    bank = sweep_bank("seed", 4)
    assert bank["general_skills"] == seed["general_skills"] and bank["common_mistakes"] == seed["common_mistakes"]
    # at K = 8 it is repeated whole: the label mix stays 2:3:2
    assert _label_counts(sweep_bank("seed", 8), "general_skills") == {"helpful": 4, "irrelevant": 6, "misleading": 4}
    helpful = sweep_bank("helpful", 4)
    assert [s["skill_id"] for s in helpful["general_skills"]] == ["gen_001", "gen_002", "gen_001-copy2", "gen_002-copy2"]
    assert helpful["general_skills"][2]["principle"] == helpful["general_skills"][0]["principle"]
    assert _label_counts(helpful, "common_mistakes") == {"helpful": 4}
    assert _label_counts(sweep_bank("misleading", 4), "common_mistakes") == {"misleading": 4, "helpful": 1,
                                                                             "irrelevant": 2}
    with pytest.raises(UserError, match="sweep bank 'best'"):
        sweep_bank("best", 4)


@pytest.mark.parametrize("name,k", [("helpful", 4), ("helpful", 8), ("seed", 8), ("misleading", 1)])
def test_sweep_banks_load_and_give_k_teachers(tmp_path, name, k):
    """Random retrieval draws K distinct items: a bank shorter than K would silently give fewer teachers."""
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import RandomRetriever
    from sgsd.skills.teachers import build_teachers

    path = tmp_path / "bank.json"
    path.write_text(json.dumps(sweep_bank(name, k)))
    bank = load_bank(path)
    teachers = build_teachers(RandomRetriever(bank).retrieve("What is 7 + 5 + 8 + 3?", k), k)
    assert len(teachers) == k


def test_cells_share_runs_that_do_not_depend_on_their_setting():
    sizes = FULL_GRID.sizes
    runs = {cell.name: cell_runs(cell, sizes) for cell in FULL_GRID.cells}
    # GRPO depends on world and budget, OPSD on the world, SGSD on world, bank and K
    assert runs["demo-helpful-k4-equal"]["grpo"] == runs["demo-seed-k1-equal"]["grpo"]
    assert runs["demo-misleading-k4-equal"]["opsd"] == runs["demo-seed-k4-paper"]["opsd"]
    assert runs["demo-seed-k4-paper"]["sgsd"] == runs["demo-seed-k4-equal"]["sgsd"]
    assert runs["hard-seed-k4-equal"]["grpo"].key == runs["demo-seed-k4-equal"]["grpo"].key  # same name ...
    assert runs["hard-seed-k4-equal"]["grpo"] != runs["demo-seed-k4-equal"]["grpo"]  # ... another world's run
    distinct = {(s.world, s.key) for r in runs.values() for s in r.values()}
    assert len(distinct) == 14  # 8 in the demo's world, 6 in the hard one (docs/sweep.md)
    # the paper's budget: GRPO keeps its prompts and doubles its completions per prompt
    equal, paper = runs["demo-seed-k4-equal"]["grpo"], runs["demo-seed-k4-paper"]["grpo"]
    assert (paper.rollouts, paper.generations) == (2 * equal.rollouts, 8)
    assert paper.rollouts // paper.generations == equal.rollouts // equal.generations
    assert runs["demo-seed-k4-paper"]["sgsd"].rollouts == equal.rollouts


def test_run_plans_carry_the_runs_settings():
    cell = Cell("hard", "helpful", k=8, budget=PAPER)
    runs = cell_runs(cell, FULL_GRID.sizes)
    sgsd, grpo = FULL_GRID.run_plan(runs["sgsd"]), FULL_GRID.run_plan(runs["grpo"])
    assert sgsd.num_teachers == 8 and sgsd.prompts_per_step == 32
    assert (grpo.prompts_per_step, grpo.grpo_generations) == (64, 8)
    assert sgsd.max_new_tokens == 80 and FULL_GRID.run_plan(cell_runs(Cell("demo"), FULL_GRID.sizes)["sgsd"]).max_new_tokens == 64
    # every replication of a world has its own warm start, and the two worlds differ
    digests = {FULL_GRID.warmup(world, seed).digest() for world in ("demo", "hard") for seed in (0, 1, 2)}
    assert len(digests) == 6


@pytest.mark.parametrize("kwargs,message", [
    ({"world": "moon"}, "world 'moon'"), ({"world": "demo", "bank": "gold"}, "bank 'gold'"),
    ({"world": "demo", "k": 0}, "K = 0"), ({"world": "demo", "budget": "double"}, "budget 'double'"),
])
def test_bad_cells_are_refused_in_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        Cell(**kwargs)


def test_selecting_cells_and_seeds_keeps_the_record():
    """The output directory's record holds what runs depend on, not which cells run: a subset resumes into it."""
    subset = FULL_GRID.select(["hard-seed-k4-equal"], 1)
    assert [c.name for c in subset.cells] == ["hard-seed-k4-equal"] and subset.seeds == (0,)
    assert sweep_record(subset) == sweep_record(FULL_GRID) != sweep_record(SMOKE_GRID)
    with pytest.raises(UserError, match="--cells: demo-gold-k4-equal not in grid full"):
        FULL_GRID.select(["demo-gold-k4-equal"])


def _estimate(per_problem, k=1):
    mean = sum(per_problem) / len(per_problem)
    return AccuracyEstimate(mean, mean, mean, len(per_problem), k, tuple(per_problem))


def _fake_sweep(out: Path, grid, accuracy, *, skip=()):
    """An output directory as a sweep leaves it, with chosen per-problem accuracies: accuracy(world, run key, seed)."""
    cache = EvaluationCache(out)
    for world in {c.world for c in grid.cells}:
        test = held_out_problems(grid, world)
        bases = {str(s): {"sha256": "0" * 64, "path": "x", "warmup_seconds": 1.0, "trained_now": False, "k": grid.sizes.k,
                          "problem_ids": [p.problem_id for p in test],
                          **_estimate(accuracy(world, "base", s)).to_json(),
                          "per_problem": list(accuracy(world, "base", s))} for s in grid.seeds}
        world_dir(out, world).mkdir(parents=True, exist_ok=True)
        (world_dir(out, world) / BASES_FILE).write_text(json.dumps(bases))
    for cell in grid.cells:
        for spec in cell_runs(cell, grid.sizes).values():
            for seed in grid.seeds:
                if (spec.world, spec.key) in skip:
                    continue
                final = run_dir(out, spec, seed) / "final"
                final.mkdir(parents=True, exist_ok=True)
                (final / "model.safetensors").write_bytes(b"weights")
                steps = [{"step": 1, "grpo/zero_advantage_fraction": 0.5, "sgsd/quadrant_warning": 0.25},
                         {"step": 2, "grpo/zero_advantage_fraction": 1.0, "sgsd/quadrant_warning": 0.75}]
                (final.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
                plan = grid.run_plan(spec)
                cache.put(cache.key(final, held_out_problems(grid, spec.world), k=plan.k, seed=seed,
                                    max_new_tokens=plan.max_new_tokens),
                          _estimate(accuracy(spec.world, spec.key, seed)))


def test_report_gives_verdicts_from_intervals_and_no_numbers_for_unfinished_cells(tmp_path):
    grid = SMOKE_GRID.select(seeds=3)
    n = grid.sizes.eval_problems

    def accuracy(world, key, seed):
        # SGSD solves every problem, GRPO none, OPSD half: SGSD ahead of both in every replication
        if key.startswith("sgsd"):
            return [1.0] * n
        if key.startswith("opsd"):
            return [float(i % 2) for i in range(n)]
        return [0.0] * n

    # the hard world's SGSD run is missing: its cell is not measured
    hard_sgsd = cell_runs(grid.cells[2], grid.sizes)["sgsd"]
    _fake_sweep(tmp_path, grid, accuracy, skip={("hard", hard_sgsd.key)})
    results = write_sweep_report(tmp_path, grid)
    by_name = {c["name"]: c for c in results["cells"]}
    reference = by_name["demo-seed-k2-equal"]
    assert reference["status"] == "measured"
    assert reference["comparisons"]["sgsd-grpo"]["difference"] == pytest.approx(1.0)
    assert reference["comparisons"]["sgsd-grpo"]["verdict"] == "ahead"
    assert reference["comparisons"]["sgsd-grpo"]["replications_agreeing"] == 3
    assert reference["comparisons"]["sgsd-opsd"]["difference"] == pytest.approx(0.5)
    # what the runs logged, averaged over steps and replications
    signals = reference["training_signals"]
    assert signals["grpo"]["grpo/zero_advantage_fraction"] == pytest.approx(0.75)
    assert signals["sgsd"]["sgsd/quadrant_warning"] == pytest.approx(0.5)
    assert signals["sgsd"]["sgsd/success_rate"] is None  # never logged: not measured, not zero
    # the paper-budget cell is contrasted with the reference: other SGSD bank, other GRPO budget
    contrasts = by_name["demo-helpful-k2-paper"]["contrasts"]
    assert set(contrasts) == {"sgsd-vs-reference", "grpo-vs-reference"}
    assert contrasts["grpo-vs-reference"]["first"] == "grpo-r16-g8" and contrasts["grpo-vs-reference"]["difference"] == 0
    hard = by_name["hard-seed-k1-equal"]
    assert hard["status"] == "not measured" and "comparisons" not in hard and "methods" not in hard
    assert (hard["evaluated"], hard["needed"]) == (9, 12)  # 3 Base + 2 methods x 3 seeds of 3 + 3 x 3
    report = (tmp_path / "report.md").read_text()
    assert "per measured cell (2 of 3)" in report
    assert "- hard-seed-k1-equal (the harder world): 9 of 12 evaluations done" in report
    assert "| demo-seed-k2-equal | +1.000 [+1.000, +1.000] | +1.000, +1.000, +1.000 | 3 of 3 | **ahead** |" in report
    assert "hard-seed-k1-equal | +" not in report  # no numbers for the unfinished cell
    assert "| demo-seed-k2-equal | 75% | 50% / - | - / - | - | - |" in report
    assert f"--grid smoke --output-dir {tmp_path}" in report
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["cells"][2]["status"] == "not measured"


def test_teacher_polarity_reads_failures_against_the_banks_labels(tmp_path):
    grid = SMOKE_GRID
    cell = grid.cells[0]
    bank_path(tmp_path, cell.bank, cell.k).parent.mkdir(parents=True)
    bank_path(tmp_path, cell.bank, cell.k).write_text(json.dumps(sweep_bank(cell.bank, cell.k)))
    assert teacher_polarity(tmp_path, grid, cell) is None  # not probed yet
    rows = [  # rollout 0 failed, rollout 1 succeeded
        {"rollout": 0, "reward": 0.0, "skill_id": "gen_001", "mistake_id": "err_001", "rho": 1},  # helpful pair warns
        {"rollout": 0, "reward": 0.0, "skill_id": "gen_001", "mistake_id": "err_003", "rho": -1},  # net helpful endorses
        {"rollout": 0, "reward": 0.0, "skill_id": "gen_006", "mistake_id": "err_001", "rho": 0},  # no net effect
        {"rollout": 0, "reward": 0.0, "skill_id": "gen_006", "mistake_id": "err_007", "rho": -1},  # misleading endorses
        {"rollout": 1, "reward": 1.0, "skill_id": "gen_002", "mistake_id": "err_002", "rho": 1},
    ]
    folder = probe_dir(tmp_path, cell, 0)
    folder.mkdir(parents=True)
    (folder / "teachers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "probe.json").write_text(json.dumps({"success_rate": 0.5}))
    result = teacher_polarity(tmp_path, grid, cell)
    failure = result["by_outcome"]["failure"]
    assert failure["net helpful"] == {"teachers": 2, "+1": 0.5, "-1": 0.5, "0": 0.0}
    assert failure["no net effect"] == {"teachers": 1, "+1": 0.0, "-1": 0.0, "0": 1.0}
    assert failure["net misleading"] == {"teachers": 1, "+1": 0.0, "-1": 1.0, "0": 0.0}
    assert result["by_outcome"]["success"]["net helpful"]["+1"] == 1.0
    assert result["failure_share_per_replication"] == [0.5]


# About 80 s on 2 loaded cores: one 30-step warm-up, 5 two-step runs (OPSD shared by the two cells), 2 probes.
@pytest.mark.slow
def test_smoke_sweep_trains_each_run_once_and_resumes_without_training(tmp_path, capsys):
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    argv = ["sweep", "--grid", "smoke", "--cells", "demo-seed-k2-equal,demo-helpful-k2-paper",
            "--output-dir", str(out), "--cache-dir", str(cache)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in results["cells"]] == ["measured", "measured"]
    for cell in results["cells"]:
        for key in ("sgsd-grpo", "sgsd-opsd", "sgsd-base"):
            c = cell["comparisons"][key]
            assert c["ci_low"] <= c["difference"] <= c["ci_high"] and c["replications"] == 1
        assert cell["teachers"] is not None
    timings = json.loads((out / "timings.json").read_text())
    trained = sorted(k for k, v in timings.items() if "train_s" in v)
    assert trained == ["demo/grpo-r16-g8-seed0", "demo/grpo-r8-g4-seed0", "demo/opsd-r8-seed0",
                       "demo/sgsd-helpful-k2-r8-seed0", "demo/sgsd-seed-k2-r8-seed0"]  # OPSD once, for both cells
    assert results["worlds"]["demo"]["warm_starts"][0]["trained_now"] is True
    assert (out / "sweep.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/demo/*/final/*.safetensors")}
    capsys.readouterr()
    # a rerun trains and evaluates nothing, and reports the same numbers
    assert main(argv) == 0
    assert "trained in" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/demo/*/final/*.safetensors")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == results["cells"]
    assert json.loads((out / "timings.json").read_text()) == timings
    # --report-only rewrites the report from the directory; another grid's settings are refused in one line
    (out / "report.md").unlink()
    assert main(["sweep", "--grid", "smoke", "--cells", "demo-seed-k2-equal", "--output-dir", str(out),
                 "--report-only"]) == 0
    assert "demo-seed-k2-equal" in (out / "report.md").read_text()
    assert main(["sweep", "--grid", "full", "--output-dir", str(out), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier `sgsd sweep` made with other settings" in err and len(err.strip().splitlines()) == 1

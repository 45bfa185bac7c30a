"""Intervals over the demo's unit of replication (a seed with its own warm start) on hand-made data with
known answers, the warm start of each replication, and the one-ulp perturbation of the noise check."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from sgsd.demo.replication import replicated_difference, two_level_interval, two_level_means


def test_a_constant_grid_has_a_zero_width_interval():
    assert two_level_interval([[0.25] * 7] * 3) == (0.25, 0.25)


def test_replication_level_with_two_values_has_the_known_bootstrap_distribution():
    # Differences 0 in one replication and 1 in the other, on every problem: a resample's mean is the
    # share of its 2 draws that picked the second replication: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    means = two_level_means([[0.0] * 5, [1.0] * 5], resamples=20_000, seed=3)
    assert set(np.round(means, 12)) == {0.0, 0.5, 1.0}
    # 20,000 draws: the standard error of a share near 1/2 is 0.0035; 0.02 is more than 5 of them.
    assert abs(float(np.mean(means == 0.5)) - 0.5) < 0.02
    assert two_level_interval([[0.0] * 5, [1.0] * 5]) == (0.0, 1.0)


def test_additive_grid_variance_is_replication_part_over_r_plus_problem_part_over_p():
    # d[r, p] = a_r + b_p: row and column resampling are independent, so the bootstrap variance of the
    # grid mean is var(a) / R + var(b) / P (population variances), exactly in expectation.
    a = np.array([0.0, 0.1, -0.2, 0.3])
    b = np.linspace(-0.5, 0.5, 50) ** 3
    grid = a[:, None] + b[None, :]
    expected = a.var() / a.size + b.var() / b.size
    measured = float(np.var(two_level_means(grid, resamples=40_000, seed=1)))
    # The variance of 40,000 draws has a relative standard error of about sqrt(2 / 40,000) = 0.7%
    # (a bit more for these non-normal means); 4% is more than 5 of them.
    assert measured == pytest.approx(expected, rel=0.04)


def test_problems_shared_by_every_replication_are_not_counted_as_independent():
    # Every replication is scored on the same problems, so a problem effect shared by all ten of them
    # must keep its full weight var(b) / P; a nested bootstrap (problems redrawn within each
    # replication) would give var(b) / (R P), ten times less.
    b = np.linspace(0.0, 1.0, 40)
    grid = np.tile(b, (10, 1))
    measured = float(np.var(two_level_means(grid, resamples=40_000, seed=2)))
    assert measured == pytest.approx(b.var() / b.size, rel=0.04)  # tolerance: as above


def test_one_strong_replication_is_not_a_replicated_finding():
    from sgsd.demo.evaluate import paired_difference

    # Replication 0 gains 0.3 on every problem, replications 1 and 2 lose 0.05 on every problem.
    # Averaged over seeds first and resampled over problems only (the former interval), the difference
    # is +0.067 on every problem: a zero-width interval, "ahead". Over replications it is not separated:
    # a resample draws only the two losing replications with probability (2/3)^3 = 0.30.
    base = [0.2, 0.4, 0.5, 0.6] * 10
    second = {s: base for s in (0, 1, 2)}
    first = {0: [x + 0.3 for x in base], 1: [x - 0.05 for x in base], 2: [x - 0.05 for x in base]}
    pooled = [statistics.fmean(v) for v in zip(*first.values())]
    _, old_low, _ = paired_difference(pooled, base)
    assert old_low > 0.06
    result = replicated_difference(first, second)
    assert result.difference == pytest.approx(0.2 / 3)
    assert result.ci_low == pytest.approx(-0.05) and result.ci_high == pytest.approx(0.3)
    assert result.verdict == "not separated" and result.agreeing == 1
    assert [s for s, _ in result.per_replication] == [0, 1, 2]
    assert [d for _, d in result.per_replication] == pytest.approx([0.3, -0.05, -0.05])
    record = result.to_json()
    assert record["replications"] == 3 and record["replications_agreeing"] == 1
    assert record["per_replication"][1] == {"seed": 1, "difference": pytest.approx(-0.05)}


def test_a_difference_every_replication_agrees_on_is_ahead():
    rng = np.random.default_rng(0)
    second = {s: list(rng.uniform(0, 1, 60)) for s in (0, 1, 2)}
    first = {s: [x + 0.1 + 0.01 * s for x in v] for s, v in second.items()}
    result = replicated_difference(first, second)
    assert result.verdict == "ahead" and result.agreeing == 3
    # every cell is 0.10, 0.11 or 0.12, so every resample's mean lies in [0.10, 0.12]
    assert 0.1 - 1e-12 <= result.ci_low <= result.difference <= result.ci_high <= 0.12 + 1e-12
    behind = replicated_difference(second, first)
    assert behind.verdict == "behind" and behind.agreeing == 3 and behind.difference == pytest.approx(-0.11)


def test_replicated_difference_pairs_by_seed_and_refuses_mismatches():
    first = {0: [1.0, 0.0], 1: [1.0, 1.0], 5: [0.0, 0.0]}
    second = {1: [0.0, 1.0], 0: [0.0, 0.0]}
    result = replicated_difference(first, second)  # seed 5 has no partner: left out
    assert result.per_replication == ((0, 0.5), (1, 0.5))
    with pytest.raises(ValueError, match="same problems"):
        replicated_difference({0: [1.0, 0.0]}, {0: [1.0]})
    with pytest.raises(ValueError, match="no replication in common"):
        replicated_difference({0: [1.0]}, {1: [1.0]})
    with pytest.raises(ValueError, match="grid"):
        two_level_means([])


def test_each_seed_has_its_own_warm_start_cache_key():
    from sgsd.demo.presets import DEMO_WARMUP, warmup_config

    assert warmup_config(0) == DEMO_WARMUP  # seed 0 is the warm start the demo always had
    digests = {warmup_config(seed).digest() for seed in (0, 1, 2, 100)}
    assert len(digests) == 4
    assert warmup_config(1).world == DEMO_WARMUP.world  # the same problems for every replication
    short = warmup_config(1, steps=30)
    assert short.steps == 30 and short.early_steps <= 30 and short.seed == 1
    assert short.digest() != warmup_config(1).digest()


def test_report_compares_each_replication_with_its_own_base():
    from sgsd.demo.report import comparisons

    # Base differs between the two warm starts; each method is Base + 0.1 in its own replication.
    base = {0: [0.2, 0.4, 0.6, 0.8], 1: [0.0, 0.1, 0.2, 0.3]}
    grpo = {s: [x + 0.1 for x in v] for s, v in base.items()}
    sgsd = {0: [x + 0.2 for x in base[0]], 1: [x - 0.1 for x in base[1]]}
    compared = comparisons({"base": base, "grpo": grpo, "sgsd": sgsd})
    c = compared["grpo-base"]
    # paired within each replication: exactly +0.1 everywhere, whatever the warm starts' own levels
    assert c["difference"] == pytest.approx(0.1) and c["ci_low"] == pytest.approx(0.1)
    assert c["verdict"] == "ahead" and c["replications_agreeing"] == 2
    s = compared["sgsd-grpo"]
    assert [r["difference"] for r in s["per_replication"]] == pytest.approx([0.1, -0.2])
    assert s["verdict"] == "not separated" and s["replications_agreeing"] == 1


def _results(runs, bases, comparisons):
    return {"runs": [{"method": m, "seed": s, "learning_rate": 1e-4, "avg_at_k": v} for (m, s), v in runs.items()],
            "warm_starts": [{"seed": s, "base": {"mean": v}} for s, v in bases.items()],
            "methods": {"base": {"mean": statistics.fmean(bases.values())},
                        "sgsd": {"mean": statistics.fmean(v for (m, _), v in runs.items() if m == "sgsd")}},
            "comparisons": {k: {"difference": d, "verdict": v} for k, (d, v) in comparisons.items()}}


def _demo_noise():
    """scripts/demo_noise.py, a measurement script outside the package, as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_noise.py"
    spec = importlib.util.spec_from_file_location("demo_noise", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_moves_are_perturbed_minus_exact():
    accuracy_moves, format_moves = _demo_noise().accuracy_moves, _demo_noise().format_moves

    exact = _results({("sgsd", 0): 0.50, ("sgsd", 1): 0.60}, {0: 0.30, 1: 0.28},
                     {"sgsd-base": (0.26, "ahead")})
    perturbed = _results({("sgsd", 0): 0.42, ("sgsd", 1): 0.61}, {0: 0.30, 1: 0.29},
                         {"sgsd-base": (0.22, "ahead")})
    moves = accuracy_moves(exact, perturbed)
    assert [r["move"] for r in moves["runs"]] == pytest.approx([-0.08, 0.01])
    assert moves["max_abs_run_move"] == pytest.approx(0.08) and moves["mean_abs_run_move"] == pytest.approx(0.045)
    assert [b["move"] for b in moves["base"]] == pytest.approx([0.0, 0.01])
    assert moves["methods"]["sgsd"]["move"] == pytest.approx(-0.035)
    assert moves["comparisons"]["sgsd-base"]["move"] == pytest.approx(-0.04)
    assert moves["comparisons"]["sgsd-base"]["verdicts"] == ["ahead", "ahead"]
    text = format_moves(moves, 4)
    assert "| SGSD (lr 0.0001) | 0 | 0.500 | 0.420 | -0.080 |" in text and "Largest move of one training run: 0.080" in text
    with pytest.raises(ValueError, match="different runs"):
        accuracy_moves(exact, _results({("sgsd", 0): 0.5}, {0: 0.3}, {}))


# About 1 minute on 2 loaded cores: two smoke demos of one 2-step run each (one 30-step warm-up).
@pytest.mark.slow
def test_noise_check_runs_the_demo_from_warm_starts_one_ulp_apart(tmp_path, capsys):
    import json

    main = _demo_noise().main

    exact, perturbed = tmp_path / "exact", tmp_path / "ulp"
    argv = ["--exact", str(exact), "--perturbed", str(perturbed), "--preset", "smoke", "--methods", "grpo",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    a = json.loads((exact / "results.json").read_text())
    b = json.loads((perturbed / "results.json").read_text())
    assert a["plan"]["ulp_noise"] == "" and b["plan"]["ulp_noise"] == "warm-up"
    wa, wb = a["warm_starts"][0], b["warm_starts"][0]
    assert wa["seed"] == wb["seed"] == 0 and wa["sha256"] != wb["sha256"]
    assert wb["path"] == wa["path"] + "-ulp-init" and not wb["from_cache"]  # warmed up again, from moved weights
    moves = json.loads((perturbed / "noise.json").read_text())
    run = moves["runs"][0]
    assert run["exact"] == a["runs"][0]["avg_at_k"] and run["perturbed"] == b["runs"][0]["avg_at_k"]
    assert "how far avg@1 moved" in capsys.readouterr().out
    assert main(["--exact", str(exact), "--perturbed", str(exact)]) == 2

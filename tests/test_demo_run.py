"""`sgsd demo --quick` end to end, offline: report, plots and results are written and agree."""

import json
from pathlib import Path

import pytest

from sgsd.cli import main


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One fresh warm-start cache for this module's end-to-end runs: the first trains it (as on a
    newcomer's machine), the next loads it."""
    return tmp_path_factory.mktemp("demo-cache")


# About 1.5 minutes on 2 idle cores (88 s measured), most of it the cold warm-up (the cache is a fresh
# tmp dir): the one test that runs the whole default demo, as a newcomer would.
@pytest.mark.slow
def test_quick_demo_writes_report_plots_and_results(tmp_path, capsys, demo_cache):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(demo_cache), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"base", "grpo", "opsd", "sgsd"}
    for name, m in results["methods"].items():
        assert 0.0 <= m["ci_low"] <= m["mean"] <= m["ci_high"] <= 1.0, name
    for plot in ("accuracy_over_steps.png", "polarity_over_steps.png", "attribution_by_item.png"):
        assert (out / plot).stat().st_size > 1000
    report = (out / "report.md").read_text()
    for name in ("GRPO", "OPSD", "SGSD", "Base"):
        assert f"| {name} | {results['methods'][name.lower()]['mean']:.3f} |" in report
    assert "What these numbers mean and do not mean" in report
    # every method is compared with Base on the same problems, and the report says so
    for pair in ("grpo-base", "opsd-base", "sgsd-base", "sgsd-grpo", "sgsd-opsd"):
        c = results["comparisons"][pair]
        assert c["ci_low"] <= c["difference"] <= c["ci_high"], pair
    sgsd, base = results["methods"]["sgsd"]["mean"], results["methods"]["base"]["mean"]
    assert results["comparisons"]["sgsd-base"]["difference"] == pytest.approx(sgsd - base, abs=1e-9)
    assert f"{sgsd - base:+.3f} vs Base, paired 95% interval" in report
    assert "running total" in report
    # polarity fractions recorded for every SGSD step, and each step's classes sum to one
    series = results["sgsd_polarity_over_steps"]
    steps = [s for s, _ in series["helpful"]]
    assert steps == list(range(1, results["plan"]["steps"] + 1))
    for (_, h), (_, m), (_, n) in zip(series["helpful"], series["harmful"], series["neutral"]):
        assert h + m + n == pytest.approx(1.0, abs=1e-6)
    assert "report:" in capsys.readouterr().out
    # the probe ran on the warm start before training, with every control, and the report reads it by label
    from sgsd.demo.bank import item_labels
    from sgsd.demo.plan import QUICK
    from sgsd.demo.report import probe_summary

    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert probe["rollouts"] == QUICK.probe_rollouts and set(probe["controls"]) == {"none", "neutral", "shuffled"}
    assert (out / "probe" / "report.md").exists() and (out / "probe" / "teachers.jsonl").exists()
    assert results["probe"] == json.loads(json.dumps(probe_summary(probe, item_labels(), warm_start=0)))
    assert "### Before training: `sgsd skills probe` on warm start 0" in report


# The smoke preset with its own 30-step warm-ups (the tuning seed's and seed 0's): a minute or two on 2 idle
# cores, several on a loaded machine.
@pytest.mark.slow
def test_demo_methods_and_learning_rate_search_end_to_end(tmp_path, capsys, demo_cache, monkeypatch):
    import yaml

    out = tmp_path / "demo"
    methods = ["grpo", "sgsd", "sgsd-z", "sgsd-pg"]
    argv = ["demo", "--preset", "smoke", "--methods", ",".join(methods), "--tune-lr", "--output-dir", str(out),
            "--cache-dir", str(demo_cache), "--quiet"]
    code = main(argv)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    plan = results["plan"]
    assert list(results["methods"]) == ["base", *methods] and list(results["tuned"]) == methods
    # the search: every method on every grid point with the tuning seed, scored on validation problems
    train_ids = {json.loads(line)["id"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    warm_paths = {w["seed"]: w["path"] for w in results["warm_starts"]}
    assert sorted(warm_paths) == [0, plan["tuning_seed"]] and len(set(warm_paths.values())) == 2
    assert {w["seed"]: w["used_for"] for w in results["warm_starts"]} == {0: "evaluation", plan["tuning_seed"]: "tuning"}
    for method in methods:
        search = results["lr_search"][method]
        grid = {g["learning_rate"]: g["mean"] for g in search["grid"]}
        assert list(grid) == plan["lr_grid"]
        best = max(grid.values())
        assert grid[search["chosen"]] == best
        for lr in grid:
            run = out / "tune" / f"{method}-lr{lr:g}-seed{plan['tuning_seed']}"
            resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
            assert resolved["training"]["learning_rate"] == lr and resolved["training"]["seed"] == plan["tuning_seed"]
            assert resolved["data"]["path"] == str(out / "data" / "train.jsonl")
            # from the tuning seed's own warm start, not an evaluation seed's
            assert resolved["model"]["name_or_path"] == warm_paths[plan["tuning_seed"]]
        # the tuned run trains at the chosen rate (in the shared-rate run's directory when they agree)
        chosen = search["chosen"]
        name = f"{method}-seed0" if chosen == plan["learning_rate"] else f"{method}-lr{chosen:g}-seed0"
        resolved = yaml.safe_load((out / "runs" / name / "resolved_config.yaml").read_text())
        assert resolved["training"]["learning_rate"] == chosen and results["tuned"][method]["learning_rate"] == chosen
        if chosen == plan["learning_rate"]:
            assert results["tuned"][method]["per_seed"] == results["methods"][method]["per_seed"]
    assert len(train_ids) == 3000 - plan["validation_problems"]  # the validation problems left the training data
    # every other method against SGSD and GRPO, at the shared and at the chosen rates
    for pair in ("sgsd-grpo", "sgsd-z-sgsd", "sgsd-z-grpo", "sgsd-pg-sgsd", "sgsd-pg-grpo"):
        for table in ("comparisons", "tuned_comparisons"):
            c = results[table][pair]
            assert c["ci_low"] <= c["difference"] <= c["ci_high"], (table, pair)
    for method in methods:
        c = results["tuned_comparisons"][f"{method}-untuned"]
        tuned, shared = results["tuned"][method]["mean"], results["methods"][method]["mean"]
        assert c["difference"] == pytest.approx(tuned - shared, abs=1e-9)
    # each polarity rule's separation of helpful from misleading items
    assert set(results["polarity_rules"]) == {"sgsd", "sgsd-z", "sgsd-pg"}
    for method, variants in results["polarity_rules"].items():
        for v in variants.values():
            assert v["separation"]["mean"] == pytest.approx(v["net_helpful"]["mean"] - v["net_misleading"]["mean"])
    report = (out / "report.md").read_text()
    assert "## Learning rates chosen on validation problems" in report and "| SGSD-z |" in report
    assert "| SGSD+PG - GRPO |" in report and "how well each separates helpful from misleading" in report
    assert "SGSD+PG" in capsys.readouterr().out
    # The same command again trains nothing and evaluates nothing but the warm starts (Base of the tuning
    # seed's and of seed 0's, and seed 0's curve start point): every checkpoint's evaluation comes from
    # evaluations.json, with the same numbers.
    import sgsd.demo.evaluate as evaluate_module
    import sgsd.demo.run as run_module

    calls = []
    real_accuracy = evaluate_module.accuracy

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(run_module, "accuracy", counting)  # the demo's run imports it by name
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert calls == [plan["eval_problems"], plan["eval_problems"], plan["curve_problems"]]
    for key in ("methods", "tuned", "comparisons", "tuned_comparisons", "lr_search", "polarity_rules"):
        assert again[key] == results[key], key
    # the same warm starts, loaded from the cache this time
    assert [(w["seed"], w["sha256"], w["base"]) for w in again["warm_starts"]] == \
        [(w["seed"], w["sha256"], w["base"]) for w in results["warm_starts"]]
    assert all(w["from_cache"] for w in again["warm_starts"])


def test_demo_refuses_an_output_dir_made_with_other_settings(tmp_path, capsys):
    from sgsd.demo.run import FULL, QUICK, demo_settings, plan_record
    from sgsd.run_dir import write_output_record

    out = tmp_path / "demo"
    out.mkdir()
    write_output_record(out, "demo", demo_settings(FULL))  # what a full demo records there
    # --quick into a full demo's directory: its 30-step runs must not pass for 6-step ones.
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "holds an earlier `sgsd demo` made with other settings" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before any work
    # More seeds with the same settings is not a different plan: finished seeds are reused.
    assert plan_record(QUICK) == plan_record(type(QUICK)(**{**vars(QUICK), "seeds": (0, 1, 2)}))


def test_demo_refuses_runs_without_a_plan_record(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "runs" / "sgsd-seed0").mkdir(parents=True)
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 2 and "holds files that `sgsd demo` did not write (runs/)" in capsys.readouterr().err


def test_demo_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "not-a-dir"
    target.write_text("keep me")
    code = main(["demo", "--quick", "--output-dir", str(target), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("exists and is not a directory") and "\n" not in err
    assert target.read_text() == "keep me"


def test_demo_unwritable_cache_is_refused_before_the_warm_up(tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    code = main(["demo", "--quick", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(blocker), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "warm-start cache" in err and "not a writable directory" in err and "\n" not in err


# About 1 minute on 2 loaded cores (smoke preset: two 30-step warm-ups, four 2-step runs).
@pytest.mark.slow
def test_every_seed_is_a_replication_with_its_own_warm_start(tmp_path):
    import yaml

    out = tmp_path / "demo"
    argv = ["demo", "--preset", "smoke", "--methods", "grpo,sgsd", "--seeds", "2", "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    warms = {w["seed"]: w for w in results["warm_starts"]}
    assert sorted(warms) == [0, 1]
    # independent warm starts: other weights, each cached under its own key
    assert warms[0]["sha256"] != warms[1]["sha256"] and warms[0]["path"] != warms[1]["path"]
    from sgsd.demo.warmup import weights_sha256

    for seed, w in warms.items():
        assert weights_sha256(Path(w["path"])) == w["sha256"] and 0 <= w["base"]["mean"] <= 1
        assert json.loads((Path(w["path"]) / "warmup.json").read_text())["config"]["seed"] == seed
    # every training run records its warm start and trained from it
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        assert run["warm_start"] == run["seed"] and run["warm_start_sha256"] == warms[run["seed"]]["sha256"]
        resolved = yaml.safe_load((Path(run["run_dir"]) / "resolved_config.yaml").read_text())
        assert resolved["model"]["name_or_path"] == warms[run["seed"]]["path"]
    # Base is per warm start, and every paired difference is taken replication by replication
    assert results["methods"]["base"]["per_seed"] == [warms[0]["base"]["mean"], warms[1]["base"]["mean"]]
    means = {(r["method"], r["seed"]): r["avg_at_k"] for r in results["runs"]}
    for key, first, second in (("sgsd-grpo", "sgsd", "grpo"), ("grpo-base", "grpo", None)):
        c = results["comparisons"][key]
        expected = [means[(first, s)] - (means[(second, s)] if second else warms[s]["base"]["mean"]) for s in (0, 1)]
        assert [r["difference"] for r in c["per_replication"]] == pytest.approx(expected, abs=1e-12)
        assert c["replications"] == 2 and c["ci_low"] <= c["difference"] <= c["ci_high"]
    report = (out / "report.md").read_text()
    assert f"`{warms[1]['sha256'][:16]}`" in report and "| per replication | sign agreed |" in report

"""`sgsd demo --quick` end to end, offline: report, plots and results are written and agree."""

import json

import pytest

from sgsd.cli import main


# About 3 minutes on 2 cores, most of it the cold warm-up (the cache is a fresh tmp dir): the one
# test that runs the whole demo, as a newcomer would.
@pytest.mark.slow
def test_quick_demo_writes_report_plots_and_results(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
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


def test_demo_refuses_an_output_dir_made_with_other_settings(tmp_path, capsys):
    from sgsd.demo.run import FULL, PLAN_FILE, QUICK, plan_record

    out = tmp_path / "demo"
    out.mkdir()
    (out / PLAN_FILE).write_text(json.dumps(plan_record(FULL)))
    # --quick into a full demo's directory: its 30-step runs must not pass for 6-step ones.
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a demo made with other settings" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before any work
    # More seeds with the same settings is not a different plan: finished seeds are reused.
    assert plan_record(QUICK) == plan_record(type(QUICK)(**{**vars(QUICK), "seeds": (0, 1, 2)}))


def test_demo_refuses_runs_without_a_plan_record(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "runs" / "sgsd-seed0").mkdir(parents=True)
    code = main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 2 and "has runs/ but no demo_plan.json" in capsys.readouterr().err


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

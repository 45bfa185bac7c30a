"""The demo report's logic on hand-made inputs: pooled intervals, findings that follow the numbers,
attribution grouped by label."""

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from sgsd.demo.evaluate import estimate
from sgsd.demo.report import _findings, _pooled, attribution_by_label


def _run(method, seed, per_problem):
    return SimpleNamespace(method=method, seed=seed, final=estimate(per_problem, 2))


def test_pooled_averages_seeds_per_problem():
    runs = [_run("sgsd", 0, [1.0, 0.0, 0.5, 0.5]), _run("sgsd", 1, [0.0, 0.0, 0.5, 1.0])]
    pooled = _pooled(runs, "sgsd")
    assert pooled["mean"] == (0.5 + 0.0 + 0.5 + 0.75) / 4  # per-problem means over seeds, then over problems
    assert pooled["per_seed"] == [0.5, 0.375] and pooled["seeds"] == 2
    assert pooled["ci_low"] <= pooled["mean"] <= pooled["ci_high"]


def _method(mean, low, high):
    return {"mean": mean, "ci_low": low, "ci_high": high}


def test_findings_do_not_rank_overlapping_methods():
    methods = {"base": _method(0.4, 0.3, 0.5), "grpo": _method(0.45, 0.35, 0.55), "opsd": _method(0.5, 0.4, 0.6),
               "sgsd": _method(0.52, 0.42, 0.62)}
    text = "\n".join(_findings(methods, {}))
    assert "does not rank them" in text and "within the uncertainty of Base" in text


def test_findings_report_a_separated_winner():
    methods = {"base": _method(0.2, 0.15, 0.25), "grpo": _method(0.3, 0.25, 0.35), "opsd": _method(0.5, 0.45, 0.55),
               "sgsd": _method(0.8, 0.75, 0.85)}
    text = "\n".join(_findings(methods, {}))
    assert "SGSD is ahead of OPSD" in text and "(above Base)" in text


def test_attribution_grouped_by_label(tmp_path):
    state = {"rollouts": 3, "items": [
        {"kind": "skill", "id": "gen_001", "uses": 4, "helpful": 3, "harmful": 1, "neutral": 0, "support_sum": 0.2,
         "weight_sum": 1.0},
        {"kind": "mistake", "id": "err_006", "uses": 2, "helpful": 0, "harmful": 2, "neutral": 0, "support_sum": -0.1,
         "weight_sum": 0.5},
    ]}
    run = tmp_path / "sgsd-seed0"
    run.mkdir()
    (run / "attribution.json").write_text(json.dumps(state))
    out = attribution_by_label([Path(run)], {"gen_001": "helpful", "err_006": "misleading"})
    assert out["by_label"]["helpful"] == {"uses": 4, "helpful_fraction": 0.75, "harmful_fraction": 0.25,
                                          "neutral_fraction": 0.0, "net": 0.5}
    assert out["by_label"]["misleading"]["harmful_fraction"] == 1.0
    text = "\n".join(_findings({"base": _method(0.1, 0, 0.2), "grpo": _method(0.1, 0, 0.2),
                                "opsd": _method(0.1, 0, 0.2), "sgsd": _method(0.1, 0, 0.2)}, out))
    assert "did separate misleading from helpful" in text


def test_findings_flag_an_uninformative_warm_start():
    methods = {"base": _method(0.005, 0.0, 0.015), "grpo": _method(0.005, 0.0, 0.015),
               "opsd": _method(0.0, 0.0, 0.0), "sgsd": _method(0.005, 0.0, 0.015)}
    assert "cannot show differences between methods" in "\n".join(_findings(methods, {}))
    methods["base"] = _method(0.5, 0.4, 0.6)
    assert "cannot show differences" not in "\n".join(_findings(methods, {}))


def test_paired_difference_cancels_shared_problem_difficulty():
    from sgsd.demo.evaluate import paired_difference
    from sgsd.evaluation.metrics import bootstrap_ci

    # Method b is method a plus exactly 0.1 on every problem; problems vary a lot in difficulty.
    a = [0.0, 0.1, 0.3, 0.5, 0.8, 0.9] * 10
    b = [x + 0.1 for x in a]
    difference, low, high = paired_difference(b, a)
    assert abs(difference - 0.1) < 1e-12 and abs(low - 0.1) < 1e-12 and abs(high - 0.1) < 1e-12
    # Unpaired, the same data gives wide overlapping intervals: pairing is what separates them.
    assert bootstrap_ci(b)[0] < bootstrap_ci(a)[1]


def test_paired_difference_refuses_different_problem_sets():
    import pytest

    from sgsd.demo.evaluate import paired_difference

    with pytest.raises(ValueError, match="same problems"):
        paired_difference([1.0, 0.0], [1.0])


def test_comparisons_and_findings_use_paired_intervals():
    from sgsd.demo.report import comparisons

    base = [0.0, 0.5, 1.0, 0.5] * 10
    better = [min(1.0, x + 0.25) for x in base]  # ahead on every problem that is not already solved
    by_seed = {"base": {0: base, 1: base}, "grpo": {0: base, 1: base}, "opsd": {0: base, 1: base},
               "sgsd": {0: better, 1: [min(1.0, x + 0.05) for x in base]}}
    compared = comparisons(by_seed)
    assert compared["grpo-base"]["difference"] == 0.0 and compared["grpo-base"]["ci_low"] == 0.0
    sgsd_grpo = compared["sgsd-grpo"]
    # both replications gain (0.1875 and 0.0375 on average): ahead, and the sign agreed in both
    assert sgsd_grpo["ci_low"] > 0 and sgsd_grpo["replications_agreeing"] == 2 and sgsd_grpo["replications"] == 2
    methods = {name: {"mean": statistics.fmean(statistics.fmean(v) for v in seeds.values()), "ci_low": 0.0,
                      "ci_high": 1.0} for name, seeds in by_seed.items()}
    text = "\n".join(_findings(methods, {}, compared))
    assert "SGSD is ahead of GRPO" in text and "the sign agreed in 2 of 2 replications (+0.188, +0.038)" in text
    assert ("GRPO: 0.500 [0.000, 1.000], +0.000 vs Base, paired 95% interval [+0.000, +0.000] (not separated from "
            "Base; per replication +0.000, +0.000)") in text


def test_findings_rank_items_by_net_polarity():
    methods = {name: _method(0.5, 0.4, 0.6) for name in ("base", "grpo", "opsd", "sgsd")}
    items = {"gen_001": {"label": "helpful", "uses": 10, "helpful": 5, "harmful": 1, "neutral": 4},
             "gen_006": {"label": "misleading", "uses": 10, "helpful": 1, "harmful": 3, "neutral": 6}}
    by_label = {"helpful": {"helpful_fraction": 0.5, "harmful_fraction": 0.1, "neutral_fraction": 0.4},
                "misleading": {"helpful_fraction": 0.1, "harmful_fraction": 0.3, "neutral_fraction": 0.6}}
    text = "\n".join(_findings(methods, {"by_label": by_label, "items": items}))
    assert "helpful items +0.400 to +0.400, misleading items -0.200 to -0.200" in text
    assert "every helpful item ranks above every misleading one" in text
    items["gen_006"].update(helpful=6, harmful=0)
    assert "the two groups overlap" in "\n".join(_findings(methods, {"by_label": by_label, "items": items}))


def test_without_skill_teachers_only_the_accuracy_plot_is_drawn(tmp_path):
    from sgsd.demo.report import _plot

    curves = {"grpo": [(0, 0.2), (2, 0.3)], "opsd": [(0, 0.2), (2, 0.25)]}
    assert _plot(tmp_path, curves, {}, {}) == ["accuracy_over_steps.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_over_steps.png"]
    items = {"gen_001": {"label": "helpful", "uses": 4, "helpful": 3, "harmful": 1, "neutral": 0}}
    fractions = {"helpful": [(1, 0.5)], "harmful": [(1, 0.2)], "neutral": [(1, 0.3)]}
    assert _plot(tmp_path, curves, fractions, items, "SGSD-z") == [
        "accuracy_over_steps.png", "polarity_over_steps.png", "attribution_by_item.png"]


def _probe_section(items, *, both=0.25, p=0.04):
    quadrants = {"helpful": 0.1, "over_suppressive": 0.2, "misleading": 0.05, "warning": 0.4, "neutral": 0.25}
    return {"quadrants": quadrants, "items": items, "sign_disagreement": {"share_with_both_signs": both},
            "between_items": {"p_value": p}, "block_shift_mean": -0.02, "control_shift_mean": None if both else -0.2}


def test_probe_summary_reads_net_polarity_by_label():
    """The demo report's probe table: items pooled by their label, (helpful - harmful) / uses, by hand."""
    from sgsd.demo.report import _probe_section as section_markdown
    from sgsd.demo.report import probe_summary

    labels = {"gen_001": "helpful", "mis_001": "helpful", "gen_006": "misleading", "gen_003": "irrelevant"}
    none = {"gen_001": {"uses": 6, "helpful": 4, "harmful": 1}, "mis_001": {"uses": 4, "helpful": 1, "harmful": 0},
            "gen_006": {"uses": 5, "helpful": 1, "harmful": 3}, "gen_003": {"uses": 2, "helpful": 1, "harmful": 1}}
    neutral = {"gen_001": {"uses": 6, "helpful": 0, "harmful": 0}, "gen_006": {"uses": 5, "helpful": 0, "harmful": 5}}
    probe = {"rollouts": 32, "success_rate": 0.25, "num_teachers": 2,
             "controls": {"none": _probe_section(none), "neutral": _probe_section(neutral, both=None, p=None)}}
    summary = probe_summary(probe, labels, warm_start=3)
    assert summary["warm_start"] == 3 and summary["rollouts"] == 32
    got = summary["controls"]["none"]
    # helpful: (4 + 1 - 1 - 0) / (6 + 4) = 0.4; misleading: (1 - 3) / 5 = -0.4; irrelevant: 0 / 2
    assert got["net_by_label"] == {"helpful": 0.4, "irrelevant": 0.0, "misleading": -0.4}
    assert got["uses_by_label"] == {"helpful": 10, "irrelevant": 2, "misleading": 5}
    assert abs(got["separation"] - 0.8) < 1e-12 and got["between_items_p"] == 0.04
    # variances: helpful ((5 + 1)/10 - 0.16)/10 = 0.044, misleading ((1 + 3)/5 - 0.16)/5 = 0.128
    half = 1.96 * (0.044 + 0.128) ** 0.5
    assert got["separation_interval"] == pytest.approx([0.8 - half, 0.8 + half], abs=1e-12)
    assert summary["controls"]["neutral"]["separation"] == 1.0  # 0 - (-1)
    text = section_markdown({"probe": summary})
    assert "### Before training: `sgsd skills probe` on warm start 3" in text
    assert "| none | 10% | 20% | 5% | 40% | 25% | +0.40 | +0.00 | -0.40 | +0.80 [-0.01, +1.61] | 25% | 0.040 | -0.020 / - |" in text
    # a label none of whose items was used, and an untestable statistic, print "-" (not a net of 0)
    # neutral: no variance in either label (every helpful-label outcome 0, every misleading one -1)
    assert "| neutral | 10% | 20% | 5% | 40% | 25% | +0.00 | - | -1.00 | +1.00 [+1.00, +1.00] | - | - | -0.020 / -0.200 |" in text
    assert section_markdown({"probe": None}) == ""

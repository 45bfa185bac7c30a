"""The demo's report: results.json, report.md and PNG plots, stating what was found and what it means.

Numbers are computed here from the run directories (metrics.jsonl, attribution.json, checkpoint
evaluations); the prose around them is conditional on what was measured, never fixed in advance.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

from sgsd.demo.bank import item_labels
from sgsd.demo.evaluate import AccuracyEstimate
from sgsd.demo.plan import DEMO_METHODS, DemoPlan, MethodRun, label
from sgsd.demo.replication import replicated_difference, two_level_interval
from sgsd.demo.warmup import WarmStart, weights_sha256
from sgsd.run_dir import RunDir
from sgsd.skills.attribution import AttributionTracker
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_text, read_jsonl


COLORS = {"base": "#7f7f7f", "grpo": "#1f77b4", "opsd": "#2ca02c", "sgsd": "#d62728", "sgsd-z": "#ff7f0e",
          "sgsd-pg": "#9467bd", "grpo-skill": "#17becf", "opsd-skill": "#8c564b"}
REFERENCES = ("sgsd", "grpo")  # every other method is compared with these
# Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (intervals over a few seeds).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
LABEL_COLORS = {"helpful": "#2ca02c", "irrelevant": "#7f7f7f", "misleading": "#d62728"}


def pooled_estimate(by_seed: dict[int, AccuracyEstimate]) -> JSONObject:
    """avg@k over replications (seed -> its final evaluation, on the same problems): the mean over seeds and
    problems, a 95% interval resampling both (`sgsd.demo.replication`), the per-seed values, and the
    per-problem accuracies of each seed (`by_seed`, for paired comparisons; not written to results.json)."""
    seeds = sorted(by_seed)
    grid = [by_seed[s].per_problem for s in seeds]
    low, high = two_level_interval(grid)
    first = by_seed[seeds[0]]
    return {"mean": statistics.fmean(by_seed[s].mean for s in seeds), "ci_low": low, "ci_high": high,
            "num_problems": first.num_problems, "samples_per_problem": first.samples_per_problem,
            "seeds": len(seeds), "per_seed": [by_seed[s].mean for s in seeds],
            "by_seed": {s: by_seed[s].per_problem for s in seeds}}


def _pooled(runs: Sequence[MethodRun], method: str) -> JSONObject:
    """`pooled_estimate` of one method's runs."""
    return pooled_estimate({r.seed: r.final for r in runs if r.method == method})


def step_seconds(run_dirs: Sequence[Path]) -> float | None:
    """Median seconds per optimizer step (the trainers' `time/step_s`) over every step of `run_dirs`:
    read from the runs' metrics, so a run reused from an earlier invocation counts with its own time."""
    values = [value for _, value in _metric_series(run_dirs, "time/step_s", mean=False)]
    return statistics.median(values) if values else None


def _metric_series(run_dirs: Sequence[Path], key: str, *, mean: bool = True) -> list[tuple[int, float]]:
    """(step, value) of `key` in the runs' metrics.jsonl: the mean over runs per step, or every value."""
    by_step: dict[int, list[float]] = {}
    for run_dir in run_dirs:
        for record in read_jsonl(RunDir(run_dir).metrics):
            if record.get(key) is not None:
                by_step.setdefault(int(record["step"]), []).append(float(record[key]))
    if not mean:
        return sorted((step, value) for step, values in by_step.items() for value in values)
    return sorted((step, statistics.fmean(values)) for step, values in by_step.items())


def net_polarity(counts: JSONObject) -> float:
    """(helpful - harmful) / uses of an item or a label: > 0 pulled toward, < 0 pushed away (0 if unused)."""
    return (counts["helpful"] - counts["harmful"]) / max(counts["uses"], 1)


def attribution_by_label(run_dirs: Sequence[Path], labels: dict[str, str]) -> dict[str, JSONObject]:
    """Per label: uses and the fractions of helpful (+1), harmful (-1) and neutral (0) teacher outcomes."""
    totals: dict[str, dict[str, float]] = {}
    per_item: dict[str, dict[str, float]] = {}
    for run_dir in run_dirs:
        tracker = AttributionTracker.load(run_dir)
        for (_, item_id), stats in tracker.items.items():
            item = per_item.setdefault(item_id, {"uses": 0, "helpful": 0, "harmful": 0, "neutral": 0})
            for key in item:
                item[key] += getattr(stats, key)
    for item_id, counts in per_item.items():
        label = labels.get(item_id, "unlabelled")
        total = totals.setdefault(label, {"uses": 0, "helpful": 0, "harmful": 0, "neutral": 0})
        for key in total:
            total[key] += counts[key]
    out = {}
    for label, total in sorted(totals.items()):
        uses = max(total["uses"], 1)
        out[label] = {"uses": int(total["uses"]), **{f"{k}_fraction": total[k] / uses for k in ("helpful", "harmful", "neutral")},
                      "net": net_polarity(total)}
    items = {item_id: {"label": labels.get(item_id, "unlabelled"), **counts} for item_id, counts in sorted(per_item.items())}
    return {"by_label": out, "items": items}


def probe_summary(probe: JSONObject, labels: dict[str, str], *, warm_start: int) -> JSONObject:
    """What `sgsd skills probe` said about a warm start before any training, per control, read by item label:
    the quadrant shares, the share of rollouts whose signed teachers have both signs, the between-item test,
    and net polarity per label (helpful - harmful) / uses, pooled over the label's items (an item takes every
    signed or neutral outcome of the teachers it was part of)."""
    controls = {}
    for control, section in probe["controls"].items():
        totals: dict[str, dict[str, int]] = {}
        for item_id, item in section["items"].items():
            total = totals.setdefault(labels.get(item_id, "unlabelled"), {"uses": 0, "helpful": 0, "harmful": 0})
            for key in total:
                total[key] += int(item[key])
        net = {label: net_polarity(total) for label, total in sorted(totals.items())}
        separation, interval = None, None
        if {"helpful", "misleading"} <= net.keys():
            separation = net["helpful"] - net["misleading"]
            # normal interval from each label's outcome variance, the labels taken as independent; the
            # teachers of one rollout share its completion, so this understates the uncertainty somewhat
            variance = sum(((totals[k]["helpful"] + totals[k]["harmful"]) / totals[k]["uses"] - net[k] ** 2)
                           / totals[k]["uses"] for k in ("helpful", "misleading") if totals[k]["uses"])
            half = 1.96 * math.sqrt(max(variance, 0.0))
            interval = [separation - half, separation + half]
        controls[control] = {"quadrants": section["quadrants"],
                             "share_with_both_signs": section["sign_disagreement"]["share_with_both_signs"],
                             "between_items_p": section["between_items"]["p_value"],
                             "net_by_label": net, "uses_by_label": {k: v["uses"] for k, v in sorted(totals.items())},
                             "separation": separation, "separation_interval": interval,
                             "block_shift_mean": section.get("block_shift_mean"),
                             "control_shift_mean": section.get("control_shift_mean")}
    return {"warm_start": warm_start, "rollouts": probe["rollouts"], "success_rate": probe["success_rate"],
            "num_teachers": probe["num_teachers"], "controls": controls}


def _plot(out: Path, curves: dict[str, list[tuple[int, float]]], fractions: dict[str, list[tuple[int, float]]],
          items: dict[str, JSONObject], polarity_label: str = "SGSD") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=label(method), color=COLORS.get(method))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out accuracy (sampled, T=1)")
    ax.set_title("Accuracy over training steps (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_over_steps.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_over_steps.png")
    if not items:  # no method with skill teachers ran: nothing to show about polarity
        return written

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in fractions.items():
        if points:
            ax.plot(*zip(*points), marker=".", label=name)
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of teachers")
    ax.set_title(f"{polarity_label} teacher polarity over steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "polarity_over_steps.png", dpi=120)
    plt.close(fig)
    written.append("polarity_over_steps.png")

    names = list(items)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    for i, name in enumerate(names):
        stats = items[name]
        ax.bar(i, net_polarity(stats), color=LABEL_COLORS.get(stats["label"], "#bcbd22"))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("(helpful - harmful) / uses")
    ax.set_title(f"{polarity_label} attribution per item\n(label: green helpful, grey irrelevant, red misleading)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "attribution_by_item.png", dpi=120)
    plt.close(fig)
    written.append("attribution_by_item.png")
    return written


def _overlap(a: JSONObject, b: JSONObject) -> bool:
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def comparison_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Which paired differences the report holds: every method vs Base, SGSD vs GRPO and OPSD, and every
    other method vs SGSD and vs GRPO (those present)."""
    pairs = [(m, "base") for m in names]
    if "sgsd" in names:
        pairs += [("sgsd", other) for other in ("grpo", "opsd") if other in names]
    for m in names:
        if m not in ("sgsd", "grpo", "opsd"):
            pairs += [(m, ref) for ref in REFERENCES if ref in names]
    return pairs


def paired_comparison(first: str, second: str, first_by_seed: dict[int, Sequence[float]],
                      second_by_seed: dict[int, Sequence[float]]) -> JSONObject:
    """One paired difference `first` - `second` of per-problem accuracies given per replication (seed ->
    accuracies on the same problems): `sgsd.demo.replication.replicated_difference` (difference, interval
    over replications and problems, per-replication differences, how many replications agree in sign,
    verdict)."""
    return {"first": first, "second": second, **replicated_difference(first_by_seed, second_by_seed).to_json()}


def comparisons(by_seed: dict[str, dict[int, Sequence[float]]]) -> dict[str, JSONObject]:
    """Paired differences on the same held-out problems, replication by replication (Base of a seed is
    that seed's warm start), for the pairs of `comparison_pairs`; `by_seed[method][seed]` holds the
    per-problem accuracies. Keys are "<first>-<second>"; `first` and `second` name the methods."""
    pairs = comparison_pairs([m for m in by_seed if m != "base"])
    return {f"{first}-{second}": paired_comparison(first, second, by_seed[first], by_seed[second])
            for first, second in pairs if first in by_seed and second in by_seed}


def mean_interval(values: Sequence[float]) -> JSONObject:
    """Mean of a few per-seed values with a 95% Student-t interval (None with one value: not measured)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": len(values)}
    half = T_975[min(len(values) - 1, len(T_975)) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(values)}


def polarity_separation(run_dirs: Sequence[Path], labels: dict[str, str]) -> JSONObject:
    """How well a polarity rule separates the seed bank's helpful items from its misleading ones.

    Per seed (one run directory each): net polarity (helpful - harmful) / uses per label, the separation
    net(helpful) - net(misleading), and the neutral share; then mean and 95% t-interval over seeds.
    """
    per_seed: dict[str, list[float]] = {}
    for run_dir in run_dirs:
        by_label = attribution_by_label([run_dir], labels)["by_label"]
        for name, stats in by_label.items():
            per_seed.setdefault(f"net_{name}", []).append(stats["net"])
        if {"helpful", "misleading"} <= by_label.keys():
            per_seed.setdefault("separation", []).append(by_label["helpful"]["net"] - by_label["misleading"]["net"])
        uses = sum(v["uses"] for v in by_label.values())
        neutral = sum(v["neutral_fraction"] * v["uses"] for v in by_label.values())
        per_seed.setdefault("neutral_fraction", []).append(neutral / max(uses, 1))
    return {key: {**mean_interval(values), "per_seed": values} for key, values in per_seed.items()}


def _verdict(c: JSONObject) -> str:
    return c["verdict"]


def _agreement(c: JSONObject) -> str:
    """"3 of 3": replications whose difference has the sign of the overall one ("-" when that is 0)."""
    if c["difference"] == 0:
        return "-"
    return f"{c['replications_agreeing']} of {c['replications']}"


def _per_replication(c: JSONObject) -> str:
    return ", ".join(f"{r['difference']:+.3f}" for r in c["per_replication"])


def _noise_note(ulp_noise: str) -> str:
    if ulp_noise == "warm-start":
        return "; every warm start carries one ulp of noise on each weight (`python scripts/demo_noise.py`)"
    if ulp_noise == "warm-up":
        return ("; every warm start was warmed up from initial weights moved by one ulp (`python "
                "scripts/demo_noise.py --at warm-up`)")
    return ""


def _replication_note(c: JSONObject) -> str:
    """"; the sign agreed in 2 of 3 replications (+0.010, -0.004, +0.020)", or that there was one."""
    if c["replications"] < 2:
        return "; one replication (one warm start): not replicated"
    if c["difference"] == 0:
        return f"; per replication {_per_replication(c)}"
    return f"; the sign agreed in {_agreement(c)} replications ({_per_replication(c)})"


def _findings(methods: dict[str, JSONObject], attribution: JSONObject,
              compared: dict[str, JSONObject] | None = None) -> list[str]:
    """Sentences that follow the numbers. With `compared` (paired differences), verdicts come from the
    paired intervals; without, from whether the unpaired intervals overlap (more conservative)."""
    lines = []
    base = methods["base"]
    if not 0.05 <= base["mean"] <= 0.95:
        lines.append(f"- The warm start solves {base['mean']:.1%} of held-out problems: almost every reward is the same, "
                     "so training gets almost no signal and this run cannot show differences between methods.")
    compared = compared or {}

    names = [name for name in methods if name != "base"]
    for method in names:
        m = methods[method]
        delta = m["mean"] - base["mean"]
        c = compared.get(f"{method}-base")
        if c is not None:
            verdict = {"ahead": "above Base", "behind": "below Base",
                       "not separated": "not separated from Base"}[_verdict(c)]
            lines.append(f"- {label(method)}: {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}], {delta:+.3f} vs "
                         f"Base, paired 95% interval [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] ({verdict}"
                         f"{_replication_note(c)}).")
        else:
            verdict = "within the uncertainty of" if _overlap(m, base) else ("above" if delta > 0 else "below")
            lines.append(f"- {label(method)}: {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}], {delta:+.3f} vs "
                         f"Base ({verdict} Base).")
    for c in compared.values():
        first, second = c.get("first"), c.get("second")
        if first is None or second == "base":
            continue
        a, b = label(first), label(second)
        verdict = {"ahead": f"{a} is ahead of {b}", "behind": f"{a} is behind {b}",
                   "not separated": f"{a} and {b} are not separated"}[_verdict(c)]
        lines.append(f"- {verdict}: difference {c['difference']:+.3f}, paired 95% interval "
                     f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]{_replication_note(c)}.")
    if not compared:
        ranked = sorted(names, key=lambda name: -methods[name]["mean"])
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            if _overlap(methods[best], methods[second]):
                lines.append(f"- The best method ({label(best)}) is not separated from the next ({label(second)}): "
                             "their intervals overlap, so this run does not rank them.")
            else:
                lines.append(f"- {label(best)} is ahead of {label(second)} with non-overlapping intervals in this run.")
    by_label = attribution.get("by_label", {})
    if {"helpful", "misleading"} <= by_label.keys():
        h, m = by_label["helpful"], by_label["misleading"]
        lines.append(
            f"- Polarity by label: helpful items were in helpful teachers {h['helpful_fraction']:.0%} and harmful "
            f"ones {h['harmful_fraction']:.0%} of their uses; misleading items {m['helpful_fraction']:.0%} and "
            f"{m['harmful_fraction']:.0%} (neutral {h['neutral_fraction']:.0%} / {m['neutral_fraction']:.0%}).")
        net = {}
        for stats in attribution.get("items", {}).values():
            if stats["uses"]:
                net.setdefault(stats["label"], []).append(net_polarity(stats))
        if net.get("helpful") and net.get("misleading"):
            lowest, highest = min(net["helpful"]), max(net["misleading"])
            lines.append(
                f"- Per item, net (helpful - harmful) share of uses: helpful items {min(net['helpful']):+.3f} to "
                f"{max(net['helpful']):+.3f}, misleading items {min(net['misleading']):+.3f} to {highest:+.3f}"
                + (" - every helpful item ranks above every misleading one." if lowest > highest
                   else " - the two groups overlap."))
        flipped = m["harmful_fraction"] > m["helpful_fraction"] and h["helpful_fraction"] > h["harmful_fraction"]
        if flipped:
            lines.append("- SGSD's polarity did separate misleading from helpful items here: misleading items were "
                         "pushed away more often than pulled toward, helpful items the other way round.")
        else:
            lines.append("- SGSD's polarity did not cleanly separate misleading from helpful items in this run: a "
                         "teacher pairs one skill with one mistake, so labels mix within a teacher, and the outcome "
                         "(success or failure) flips every teacher's polarity together.")
    return lines


def _fmt_interval(v: JSONObject) -> str:
    if v.get("ci_low") is None:
        return "(one seed)"
    return f"[{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"


def warm_start_records(warms: dict[int, WarmStart], bases: dict[int, AccuracyEstimate],
                       evaluation_seeds: Sequence[int]) -> list[JSONObject]:
    """results.json's `warm_starts`: one entry per warm start (seed, sha256 of its weights, its Base
    avg@k on the test problems, where it is cached, whether it was trained now, what it was used for)."""
    return [{"seed": seed, "sha256": weights_sha256(warm.path), "base": bases[seed].to_json(),
             "used_for": "evaluation" if seed in evaluation_seeds else "tuning", "path": str(warm.path),
             "from_cache": warm.from_cache, "warmup_seconds": warm.report.seconds,
             "num_parameters": warm.report.num_parameters} for seed, warm in sorted(warms.items())]


def write_report(out: Path, *, plan: DemoPlan, warms: dict[int, WarmStart], bases: dict[int, AccuracyEstimate],
                 runs: Sequence[MethodRun], bank_path: Path, seconds: float,
                 lr_search: JSONObject | None = None, probe: JSONObject | None = None,
                 probe_seed: int | None = None) -> JSONObject:
    """results.json, report.md and the plots. `warms` and `bases`: each replication's warm start and its
    avg@k (Base), by seed; `runs` holds the shared-rate runs and, with a learning-rate search
    (`lr_search`), the runs at each method's chosen rate (`tuned`); `probe`: `sgsd skills probe`'s result
    on warm start `probe_seed` before training (probe.json)."""
    names = [m for m in plan.methods if any(r.method == m for r in runs)]
    untuned = [r for r in runs if not r.tuned]
    tuned_runs = [r for r in runs if r.tuned]
    warm_starts = warm_start_records(warms, bases, plan.seeds)
    methods: dict[str, JSONObject] = {"base": pooled_estimate({s: bases[s] for s in plan.seeds})}
    by_seed: dict[str, dict[int, Sequence[float]]] = {"base": methods["base"].pop("by_seed")}
    for method in names:
        methods[method] = _pooled(untuned, method)
        methods[method]["step_seconds_median"] = step_seconds([r.run_dir for r in untuned if r.method == method])
        by_seed[method] = methods[method].pop("by_seed")
    compared = comparisons(by_seed)
    tuned: dict[str, JSONObject] = {}
    tuned_compared: dict[str, JSONObject] = {}
    if tuned_runs:
        tuned_by_seed: dict[str, dict[int, Sequence[float]]] = {"base": by_seed["base"]}
        for method in names:
            tuned[method] = {**_pooled(tuned_runs, method), "learning_rate": (lr_search or {})[method]["chosen"]}
            tuned_by_seed[method] = tuned[method].pop("by_seed")
        tuned_compared = comparisons(tuned_by_seed)
        # each method at its chosen rate against itself at the shared rate
        for method in names:
            tuned_compared[f"{method}-untuned"] = paired_comparison(
                method, f"{label(method)} at the shared rate", tuned_by_seed[method], by_seed[method])
    curves = {}
    for method in names:
        steps: dict[int, list[float]] = {}
        for run in untuned:
            if run.method == method:
                for step, value in run.curve:
                    steps.setdefault(step, []).append(value)
        curves[method] = sorted((s, statistics.fmean(v)) for s, v in steps.items())
    polarity_methods = [m for m in names if DEMO_METHODS[m].polarity]
    reference = "sgsd" if "sgsd" in polarity_methods else (polarity_methods[0] if polarity_methods else None)
    ref_dirs = [r.run_dir for r in untuned if r.method == reference]
    fractions = {name: _metric_series(ref_dirs, f"sgsd/{name}_fraction") for name in ("helpful", "harmful", "neutral")}
    attribution = attribution_by_label(ref_dirs, item_labels()) if ref_dirs else {"by_label": {}, "items": {}}
    rules: dict[str, JSONObject] = {}
    for method in polarity_methods:
        rules[method] = {"untuned": polarity_separation([r.run_dir for r in untuned if r.method == method],
                                                        item_labels())}
        if tuned_runs:
            rules[method]["tuned"] = polarity_separation([r.run_dir for r in tuned_runs if r.method == method],
                                                         item_labels())
    plots = _plot(out, curves, fractions, attribution["items"], label(reference) if reference else "SGSD")
    results = {
        "methods": methods,
        "comparisons": compared,
        "tuned": tuned,
        "tuned_comparisons": tuned_compared,
        "lr_search": lr_search or {},
        "k": plan.k,
        "plan": {k: v for k, v in vars(plan).items()},
        "warm_starts": warm_starts,
        "runs": [{"method": r.method, "seed": r.seed, "learning_rate": r.learning_rate, "tuned": r.tuned,
                  "warm_start": r.warm_start, "warm_start_sha256": next(w["sha256"] for w in warm_starts
                                                                        if w["seed"] == r.warm_start),
                  "avg_at_k": r.final.mean, "run_dir": str(r.run_dir)} for r in runs],
        "accuracy_over_steps": {m: [[s, v] for s, v in c] for m, c in curves.items()},
        "polarity_method": reference,
        "sgsd_polarity_over_steps": {m: [[s, v] for s, v in c] for m, c in fractions.items()},
        "attribution": attribution,
        "polarity_rules": rules,
        "probe": probe_summary(probe, item_labels(), warm_start=int(probe_seed if probe_seed is not None
                                                                     else plan.seeds[0])) if probe else None,
        "seconds": seconds,
        "plots": plots,
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _markdown(results, plan))
    return results


def _result_rows(methods: dict[str, JSONObject], *, with_lr: bool = False, timing: bool = False) -> str:
    def seconds(m: JSONObject) -> str:
        value = m.get("step_seconds_median")
        return f" {value:.2f} |" if value is not None else " |"

    return "\n".join(
        f"| {label(name)} |" + (f" {m['learning_rate']:g} |" if with_lr else "")
        + f" {m['mean']:.3f} | [{m['ci_low']:.3f}, {m['ci_high']:.3f}] | "
        f"{m['seeds']} | {', '.join(f'{v:.3f}' for v in m['per_seed'])} |" + (seconds(m) if timing else "")
        for name, m in methods.items())


def _comparison_rows(compared: dict[str, JSONObject]) -> str:
    def name(n: str) -> str:
        return n if " " in n else label(n)

    return "\n".join(
        f"| {name(c['first'])} - {name(c['second'])} | {c['difference']:+.3f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
        f"{_per_replication(c)} | {_agreement(c)} | {_verdict(c)} |" for c in compared.values())


def _tuning_section(results: JSONObject) -> str:
    search = results["lr_search"]
    if not search:
        return ""
    k, plan = results["k"], results["plan"]
    grid = [g["learning_rate"] for g in next(iter(search.values()))["grid"]]
    header = " | ".join(f"lr {lr:g}" for lr in grid)
    rows = "\n".join(
        f"| {label(m)} | " + " | ".join(f"{g['mean']:.3f}" for g in v["grid"]) + f" | {v['chosen']:g} |"
        for m, v in search.items())
    if all(v["chosen"] == plan["learning_rate"] for v in search.values()):
        tuned = (f"\nEvery method chose the shared rate {plan['learning_rate']:g}: its results at the chosen rate are "
                 "the shared-rate results above.\n")
    else:
        tuned = f"""
### Results at each method's chosen rate
| method | learning rate | avg@{k} | 95% interval | seeds | per seed |
| --- | --- | --- | --- | --- | --- |
{_result_rows(results['tuned'], with_lr=True)}

| paired difference (tuned) | difference | 95% interval | per replication | sign agreed | verdict |
| --- | --- | --- | --- | --- | --- |
{_comparison_rows(results['tuned_comparisons'])}
"""
    edge = [label(m) for m, v in search.items() if len(grid) > 2 and v["chosen"] in (min(grid), max(grid))]
    edge_note = (f"\nChosen at an edge of the grid: {', '.join(edge)}; a wider grid might choose a rate further out.\n"
                 if edge else "")
    return f"""
## Learning rates chosen on validation problems (`--tune-lr`)
Each method trained once per rate (training seed {plan['tuning_seed']}, not an evaluation seed, from that seed's
own warm start, so the choice does not rest on an evaluation replication's warm start) and was scored by
avg@{k} on {plan['validation_problems']} validation problems held out of the training split (never the test
problems); the best rate was chosen (a tie goes to the shared rate {plan['learning_rate']:g}).

| method | {header} | chosen |
| --- | {' | '.join('---' for _ in grid)} | --- |
{rows}
{edge_note}{tuned}"""


def _polarity_section(results: JSONObject) -> str:
    rules = results["polarity_rules"]
    if not rules:
        return ""
    rows = []
    shared = results["plan"]["learning_rate"]
    for method, variants in rules.items():
        for variant, v in variants.items():
            chosen = results["lr_search"].get(method, {}).get("chosen", shared)
            if "separation" not in v or (variant == "tuned" and chosen == shared):
                continue  # a tuned row that is the shared-rate row again
            rate = f"lr {shared:g}, shared" if variant == "untuned" else f"lr {chosen:g}, tuned"
            rows.append(
                f"| {label(method)} ({rate}) | {v['net_helpful']['mean']:+.3f} | {v.get('net_irrelevant', {}).get('mean', 0.0):+.3f} | "
                f"{v['net_misleading']['mean']:+.3f} | {v['separation']['mean']:+.3f} {_fmt_interval(v['separation'])} | "
                f"{v['neutral_fraction']['mean']:.2f} |")
    return """
### Polarity rules: how well each separates helpful from misleading items
Net polarity (helpful - harmful) / uses per label, separation = net(helpful) - net(misleading) with a
95% t-interval over seeds, and the share of neutral teacher outcomes (mean over seeds).

| method | net helpful | net irrelevant | net misleading | separation [95% over seeds] | neutral |
| --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n"


def _probe_section(results: JSONObject) -> str:
    from sgsd.probe.report import format_p

    probe = results.get("probe")
    if not probe:
        return ""
    labels = [label for label in ("helpful", "irrelevant", "misleading")
              if any(label in c["net_by_label"] for c in probe["controls"].values())]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    rows = []
    for control, c in probe["controls"].items():
        q = c["quadrants"]
        p = c["between_items_p"]
        sep, interval = c["separation"], c.get("separation_interval")
        rows.append(f"| {control} | " + " | ".join(share(q[k]) for k in ("helpful", "over_suppressive", "misleading",
                                                                         "warning", "neutral"))
                    + " | " + " | ".join(f"{c['net_by_label'][label]:+.2f}" if label in c["net_by_label"] else "-"
                                         for label in labels)
                    + f" | {'-' if sep is None else f'{sep:+.2f}'}"
                    + (f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "")
                    + f" | {share(c['share_with_both_signs'])} | "
                    + ("-" if p is None else format_p(p).removeprefix("= ")) + " | "
                    + " / ".join("-" if c.get(k) is None else f"{c[k]:+.3f}"
                                 for k in ("block_shift_mean", "control_shift_mean")) + " |")
    return f"""
### Before training: `sgsd skills probe` on warm start {probe['warm_start']}
What the probe (`probe/report.md`) said before any training: {probe['rollouts']} student rollouts of training
problems (success rate {probe['success_rate']:.0%}), each scored under SGSD's K = {probe['num_teachers']} teachers
and under each control block, polarity by the SGSD runs' own rule. Quadrant shares of the teachers; net
polarity per item label (the labels are never seen by the probe); separation = net helpful - net
misleading, with a 95% normal interval from the outcomes' variance (approximate: the teachers of one
rollout share its completion); "both signs": rollouts whose signed teachers include both signs;
"between items": the permutation test of whether items differ in net polarity (within rollouts); "shift":
the mean change of the student's log-prob per token that a skill block and the control block cause (a
control far outside the skill blocks' range is no like-for-like block for this model). One warm start
and one draw of rollouts: this says what the teachers do before training, not what training will find.

| control | helpful | over-suppressive | misleading | warning | neutral | {' | '.join(f'net {label}' for label in labels)} | separation [95%] | both signs | between items p | shift: skill / control |
| --- | --- | --- | --- | --- | --- | {' | '.join('---' for _ in labels)} | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n"


def _markdown(results: JSONObject, plan: DemoPlan) -> str:
    methods, k = results["methods"], results["k"]
    rows = _result_rows(methods, timing=True)
    labels = "\n".join(
        f"| {name} | {v['uses']} | {v['helpful_fraction']:.2f} | {v['harmful_fraction']:.2f} | {v['neutral_fraction']:.2f} | "
        f"{v['net']:+.2f} |"
        for name, v in results["attribution"]["by_label"].items())
    findings = "\n".join(_findings(methods, results["attribution"], results["comparisons"]))
    warms = results["warm_starts"]
    trained = [w for w in warms if not w["from_cache"]]
    warmup = (f"{len(trained)} trained now, {sum(w['warmup_seconds'] for w in trained):.0f} s in all" if trained
              else "all loaded from the cache this time")
    warm_rows = "\n".join(
        f"| {w['seed']} | {w['used_for']} | `{w['sha256'][:16]}` | {w['base']['mean']:.3f} | "
        f"{w['warmup_seconds']:.0f} | {'yes' if w['from_cache'] else 'no'} |" for w in warms)
    replications = len(plan.seeds)
    seed_note = (f" With {replications} replications, the replication level of the bootstrap resamples "
                 f"{replications} values, so its interval cannot reach beyond their spread: read the per-replication "
                 "column, and a verdict whose sign did not agree in every replication as fragile."
                 if replications > 1 else
                 " With one replication (one warm start), how far another warm start or another machine moves the "
                 "numbers is not measured: no finding of this run is replicated.")
    names = [m for m in methods if m != "base"]
    listed = ", ".join(label(m) for m in names)
    described = "\n".join(f"- {label(m)}: {DEMO_METHODS[m].description}." for m in names)
    reference = results.get("polarity_method")
    polarity_plots = ("" if "attribution_by_item.png" not in results["plots"] else
                      f", `polarity_over_steps.png` ({label(reference)}'s helpful / harmful / neutral teacher fractions), "
                      "`attribution_by_item.png` (per item: (helpful - harmful) / uses, coloured by label)")
    polarity_table = "" if not reference else f"""
### {label(reference)} polarity by item label
| label | uses | helpful | harmful | neutral | net (helpful - harmful) |
| --- | --- | --- | --- | --- | --- |
{labels}
"""
    return f"""# SGSD demo report

## What was run
A synthetic world of single-digit sums ("What is 7 + 5 + 8 + 3 + 9?") solved as a running total, one
line per step, with the final answer in `\\boxed{{}}`. A tiny Qwen3-architecture model
({warms[0]['num_parameters']:,} parameters) was warmed up in-process, once per seed ({warmup}), on synthetic
worked solutions in which carries into the tens are forgotten at a base rate without a hint, rarely
with a helpful hint and often with a misleading one, plus off-by-one slips that no hint fixes (only the
OPSD reference answer does); so it solves some problems, fails others, and reads hints.
Each seed is one replication: its own warm start (its own warm-up seed and data order), from which
{listed} trained with the project's trainers (`sgsd train`'s code path, training seed = the seed) for
{plan.steps} optimizer steps each, {plan.prompts_per_step} rollouts per step (G = {plan.grpo_generations}
completions per prompt for the group-advantage methods), learning rate {plan.learning_rate}, seeds
{list(plan.seeds)}{_noise_note(plan.ulp_noise)}:

{described}

Skill teachers: K = {plan.num_teachers} per rollout from a seed bank of helpful, irrelevant and misleading
skills and mistakes (random retrieval; the labels are used only in this report), live-policy teacher,
threshold {plan.confidence_threshold}. OPSD's teacher was the warm start given the reference answer.
Training used the world's training split less {plan.validation_problems} validation problems.
Evaluation: avg@{k} (temperature 1) on {plan.eval_problems} held-out problems, graded by the project's
grader; 95% intervals by a two-level bootstrap over replications and problems (`sgsd.demo.replication`).

| warm start (seed) | used for | sha256 of its weights | Base avg@{k} | warm-up s | cached |
| --- | --- | --- | --- | --- | --- |
{warm_rows}

## Results (shared learning rate {plan.learning_rate:g})
| method | avg@{k} | 95% interval | seeds | per seed | median s / step |
| --- | --- | --- | --- | --- | --- |
{rows}

{findings}

| paired difference | difference | 95% interval | per replication | sign agreed | verdict |
| --- | --- | --- | --- | --- | --- |
{_comparison_rows(results['comparisons'])}

Plots: `accuracy_over_steps.png` (held-out accuracy at each checkpoint, {plan.curve_problems} problems){polarity_plots}.
{polarity_table}{_polarity_section(results)}{_probe_section(results)}{_tuning_section(results)}
## What these numbers mean and do not mean
- This is a toy world and a sub-million-parameter model trained for a few steps on a laptop. It shows
  the whole method running end to end and how teacher polarity behaves on labelled skills; it says
  nothing about AIME, HMMT or the paper's models, where `sgsd eval` on real checkpoints is the test.
- Intervals are 95% percentile bootstraps that resample replications (a seed with its own warm start)
  and the {plan.eval_problems} held-out problems; differences are paired (same replication, same
  problems), which cancels problem difficulty and the warm start's own level.{seed_note}
- The ordering of the methods is a property of this world and these settings ({plan.steps} steps,
  learning rate {plan.learning_rate}, random retrieval, one (skill, mistake) pair per teacher); it is
  evidence neither for nor against the paper's results.
- In this world the helpful hint addresses exactly the dominant mistake, which favours any method
  that learns to carry; a real skill bank is noisier, which is what SGSD's gate and polarity are for.
- Total time: {results['seconds']:.0f} s (warm starts: {warmup}).
"""

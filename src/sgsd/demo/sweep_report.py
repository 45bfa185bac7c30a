"""The sweep's report: results.json, report.md and sweep.png, read from the output directory alone.

Everything comes from what the sweep left on disk (each world's `bases.json`, `evaluations.json`, the probes'
`teachers.jsonl`, `timings.json`), so the report of an unfinished sweep can be written at any time and the
report of a finished one rewritten without training. A cell is "measured" only when every one of its runs and
warm starts has been evaluated in every replication; an unfinished cell is listed with its progress and no
numbers. Verdicts are the demo's (`sgsd.demo.replication`): ahead / behind when the 95% interval of the
paired difference excludes 0, else not separated, with the per-replication differences and the sign count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sgsd.data import Problem
from sgsd.demo.evaluate import AccuracyEstimate, subset
from sgsd.demo.report import comparisons, paired_comparison, pooled_estimate
from sgsd.demo.run import EvaluationCache
from sgsd.demo.sweep_grid import (BASES_FILE, METHODS, TIMINGS_FILE, WORLDS, Cell, SweepGrid, bank_path, cell_runs,
                                  probe_dir, reference_cell, run_dir, world_dir)
from sgsd.demo.world import make_world
from sgsd.run_dir import RunDir
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_text, read_jsonl


FIGURE = "sweep.png"
HEADLINES = ("sgsd-grpo", "sgsd-opsd")  # the figure's two panels
NAMES = {"base": "Base", "grpo": "GRPO", "opsd": "OPSD", "sgsd": "SGSD"}
# A teacher's pair by its net hint effect (#helpful - #misleading items, as the warm-up data used it).
PAIR_CLASSES = ("net helpful", "no net effect", "net misleading")


def _read(path: Path) -> JSONObject:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def held_out_problems(grid: SweepGrid, world: str) -> list[Problem]:
    """The held-out problems every run of `world` is evaluated on (as `sgsd.demo.sweep.Sweep.world` picks them)."""
    return subset(make_world(grid.warmup(world, 0).world).test, grid.sizes.eval_problems, seed=0)


def _estimate(entry: JSONObject) -> AccuracyEstimate:
    return AccuracyEstimate(entry["mean"], entry["ci_low"], entry["ci_high"], entry["num_problems"],
                            entry["samples_per_problem"], tuple(entry["per_problem"]))


def _finals(out: Path, grid: SweepGrid, tests: dict[str, list[Problem]]) -> dict[tuple[str, str, int], AccuracyEstimate]:
    """(world, run key, seed) -> final evaluation, for every run of the grid evaluated so far; ("base", world, seed)
    likewise for each warm start."""
    cache = EvaluationCache(out)
    found: dict[tuple[str, str, int], AccuracyEstimate] = {}
    for world in {c.world for c in grid.cells}:
        ids = [p.problem_id for p in tests[world]]
        for seed, entry in _read(world_dir(out, world) / BASES_FILE).items():
            if entry.get("problem_ids") == ids and entry.get("k") == grid.sizes.k:
                found[(world, "base", int(seed))] = _estimate(entry)
    for cell in grid.cells:
        for spec in cell_runs(cell, grid.sizes).values():
            plan = grid.run_plan(spec)
            for seed in grid.seeds:
                final = RunDir(run_dir(out, spec, seed)).final
                if (spec.world, spec.key, seed) in found or not final.exists():
                    continue
                known = cache.get(cache.key(final, tests[spec.world], k=plan.k, seed=seed,
                                            max_new_tokens=plan.max_new_tokens))
                if known is not None:
                    found[(spec.world, spec.key, seed)] = known
    return found


def _pair_class(skill: str, mistake: str, labels: dict[str, str]) -> str:
    effect = sum({"helpful": 1, "misleading": -1}.get(labels.get(item, "irrelevant"), 0) for item in (skill, mistake))
    return PAIR_CLASSES[0] if effect > 0 else PAIR_CLASSES[2] if effect < 0 else PAIR_CLASSES[1]


def teacher_polarity(out: Path, grid: SweepGrid, cell: Cell) -> JSONObject | None:
    """What the cell's teachers said before training (`sgsd skills probe`, one per replication), read against
    the bank's labels: per outcome (failed / successful rollouts) and pair class, the shares of teachers with
    polarity +1 (agrees with the verifier: warns on a failure, endorses a success), -1 (the opposite) and 0.
    None until every replication has been probed."""
    labels = _read(bank_path(out, cell.bank, cell.k)).get("metadata", {}).get("labels", {})
    counts: dict[str, dict[str, dict[str, int]]] = {}
    failure_share = []
    for seed in grid.seeds:
        path = probe_dir(out, cell, seed) / "teachers.jsonl"
        if not (path.parent / "probe.json").exists():
            return None
        rollouts: dict[int, float] = {}
        for row in read_jsonl(path):
            rollouts[row["rollout"]] = row["reward"]
            outcome = "failure" if row["reward"] <= 0 else "success"
            cls = _pair_class(row["skill_id"], row["mistake_id"], labels)
            c = counts.setdefault(outcome, {}).setdefault(cls, {"+1": 0, "-1": 0, "0": 0})
            c[{1: "+1", -1: "-1"}.get(int(row["rho"]), "0")] += 1
        probe = _read(path.parent / "probe.json")
        failure_share.append(1 - probe["success_rate"] if "success_rate" in probe else
                             sum(r <= 0 for r in rollouts.values()) / max(len(rollouts), 1))
    shares = {outcome: {cls: {"teachers": sum(c.values()), **{k: v / max(sum(c.values()), 1) for k, v in c.items()}}
                        for cls, c in by_class.items()} for outcome, by_class in counts.items()}
    return {"rollouts_per_replication": grid.probe_rollouts, "failure_share_per_replication": failure_share,
            "by_outcome": shares}


# What the runs logged that bears on the mechanism, averaged over steps and replications: how many of GRPO's
# groups had no signal (every completion with the same reward: zero advantage), and the quadrants of SGSD's
# teachers (docs/spec.md section 4: on failures a teacher warns, support < 0, or endorses, support > 0).
TRAINING_SIGNALS = {"grpo": ("grpo/zero_advantage_fraction",),
                    "sgsd": ("sgsd/quadrant_warning", "sgsd/quadrant_misleading", "sgsd/quadrant_helpful",
                             "sgsd/quadrant_over_suppressive", "sgsd/neutral_fraction", "sgsd/success_rate")}


def metric_mean(run_dirs: Sequence[Path], key: str) -> float | None:
    """Mean of `key` over every logged step of `run_dirs` (metrics.jsonl); None if never logged."""
    values = [float(r[key]) for d in run_dirs for r in read_jsonl(RunDir(d).metrics) if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _cell_result(out: Path, grid: SweepGrid, cell: Cell, finals: dict[tuple[str, str, int], AccuracyEstimate]) -> JSONObject:
    runs = cell_runs(cell, grid.sizes)
    needed = [(cell.world, "base", s) for s in grid.seeds]
    needed += [(cell.world, spec.key, s) for spec in runs.values() for s in grid.seeds]
    done = sum(key in finals for key in needed)
    result: JSONObject = {"name": cell.name, "world": cell.world, "bank": cell.bank, "k": cell.k,
                              "budget": cell.budget, "purpose": cell.purpose,
                              "runs": {m: spec.key for m, spec in runs.items()},
                              "evaluated": done, "needed": len(needed),
                              "status": "measured" if done == len(needed) else "not measured"}
    result["teachers"] = teacher_polarity(out, grid, cell)
    if done < len(needed):
        return result
    by_seed = {"base": {s: finals[(cell.world, "base", s)] for s in grid.seeds}}
    by_seed |= {m: {s: finals[(cell.world, spec.key, s)] for s in grid.seeds} for m, spec in runs.items()}
    pooled = {m: pooled_estimate(v) for m, v in by_seed.items()}
    result["comparisons"] = comparisons({m: p.pop("by_seed") for m, p in pooled.items()})
    result["methods"] = pooled
    # Against the world's reference cell (the demo's settings): how far this cell's setting moved SGSD and GRPO.
    reference = cell_runs(reference_cell(cell.world, grid.sizes), grid.sizes)
    contrasts = {}
    for method in ("sgsd", "grpo"):
        ref_key = reference[method].key
        if ref_key == runs[method].key or not all((cell.world, ref_key, s) in finals for s in grid.seeds):
            continue
        contrasts[f"{method}-vs-reference"] = paired_comparison(
            runs[method].key, ref_key,
            {s: finals[(cell.world, runs[method].key, s)].per_problem for s in grid.seeds},
            {s: finals[(cell.world, ref_key, s)].per_problem for s in grid.seeds})
    result["contrasts"] = contrasts
    result["training_signals"] = {
        method: {key: metric_mean([run_dir(out, runs[method], seed) for seed in grid.seeds], key) for key in keys}
        for method, keys in TRAINING_SIGNALS.items()}
    return result


def _timings(out: Path) -> JSONObject:
    timings = _read(out / TIMINGS_FILE)
    train = [v["train_s"] for k, v in timings.items() if "train_s" in v]
    evaluate = [v["eval_s"] for k, v in timings.items() if "eval_s" in v]
    loads = [v["load_average_1min"] for v in timings.values() if "load_average_1min" in v]
    return {"runs_trained": len(train), "train_s": sum(train), "eval_and_probe_s": sum(evaluate),
            "load_average_1min_range": [min(loads), max(loads)] if loads else None, "per_run": timings}


def gather(out: Path, grid: SweepGrid) -> JSONObject:
    """results.json's content: the worlds (warm starts, Base), every cell, timings."""
    tests = {world: held_out_problems(grid, world) for world in {c.world for c in grid.cells}}
    finals = _finals(out, grid, tests)
    worlds = {}
    for world in dict.fromkeys(c.world for c in grid.cells):
        bases = _read(world_dir(out, world) / BASES_FILE)
        entries = [{"seed": int(s), **{k: v for k, v in e.items() if k not in ("per_problem", "problem_ids")}}
                   for s, e in sorted(bases.items(), key=lambda item: int(item[0]))]
        base = {s: finals[(world, "base", s)] for s in grid.seeds if (world, "base", s) in finals}
        worlds[world] = {"description": WORLDS[world].description, "warm_starts": entries,
                         "warm_start_digest": grid.warmup(world, 0).digest(),
                         "base": {k: v for k, v in pooled_estimate(base).items() if k != "by_seed"} if base else None}
    cells = [_cell_result(out, grid, cell, finals) for cell in grid.cells]
    return {"grid": grid.name, "seeds": list(grid.seeds), "k": grid.sizes.k, "steps": grid.sizes.steps,
            "rollouts_per_step": grid.sizes.prompts_per_step, "learning_rate": grid.sizes.learning_rate,
            "eval_problems": grid.sizes.eval_problems, "worlds": worlds, "cells": cells,
            "timings": _timings(out)}


def _interval(c: JSONObject) -> str:
    return f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def _per_rep(c: JSONObject) -> str:
    return ", ".join(f"{r['difference']:+.3f}" for r in c["per_replication"])


def _sign(c: JSONObject) -> str:
    return f"{c['replications_agreeing']} of {c['replications']}" if c["difference"] else "-"


def plot(results: JSONObject, path: Path) -> None:
    """One figure: per cell, SGSD - GRPO and SGSD - OPSD with 95% intervals (coloured by verdict) and the
    per-replication differences as dots; cells not measured yet are named and left empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    colors = {"ahead": "#2ca02c", "behind": "#d62728", "not separated": "#7f7f7f"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(cells) + 1.6), sharey=True)
    ys = list(range(len(cells)))[::-1]
    for ax, key in zip(axes, HEADLINES):
        ax.axvline(0, color="black", linewidth=0.8)
        for y, cell in zip(ys, cells):
            c = cell.get("comparisons", {}).get(key)
            if c is None:
                ax.text(0, y, "not measured yet", ha="center", va="center", fontsize=8, color="#7f7f7f")
                continue
            color = colors[c["verdict"]]
            ax.errorbar(c["difference"], y, xerr=[[c["difference"] - c["ci_low"]], [c["ci_high"] - c["difference"]]],
                        fmt="o", color=color, capsize=3)
            ax.scatter([r["difference"] for r in c["per_replication"]], [y - 0.18] * len(c["per_replication"]),
                       s=10, color=color, alpha=0.6)
        first, second = key.split("-")
        ax.set_title(f"{NAMES[first]} - {NAMES[second]} (avg@{results['k']}, 95% interval; dots: replications)",
                     fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([c["name"] for c in cells], fontsize=8)
    fig.suptitle(f"sgsd sweep --grid {results['grid']}: green ahead, red behind, grey not separated", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _teacher_cells(cell: JSONObject) -> str:
    t = cell["teachers"]
    if t is None:
        return "| " + cell["name"] + " | not probed yet | | | |"
    fail = t["by_outcome"].get("failure", {})

    def share(cls: str) -> str:
        c = fail.get(cls)
        return "-" if c is None else f"{c['+1']:.0%} / {c['-1']:.0%} / {c['0']:.0%} ({c['teachers']})"

    failures = ", ".join(f"{x:.0%}" for x in t["failure_share_per_replication"])
    return f"| {cell['name']} | {failures} | " + " | ".join(share(cls) for cls in PAIR_CLASSES) + " |"


def _signal_row(cell: JSONObject) -> str:
    g, t = cell["training_signals"]["grpo"], cell["training_signals"]["sgsd"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    return (f"| {cell['name']} | {pct(g['grpo/zero_advantage_fraction'])} | {pct(t['sgsd/quadrant_warning'])} / "
            f"{pct(t['sgsd/quadrant_misleading'])} | {pct(t['sgsd/quadrant_helpful'])} / "
            f"{pct(t['sgsd/quadrant_over_suppressive'])} | {pct(t['sgsd/neutral_fraction'])} | "
            f"{pct(t['sgsd/success_rate'])} |")


def markdown(results: JSONObject, grid: SweepGrid, out: Path) -> str:
    k = results["k"]
    measured = [c for c in results["cells"] if c["status"] == "measured"]
    pending = [c for c in results["cells"] if c["status"] != "measured"]
    world_rows = []
    for name, w in results["worlds"].items():
        for e in w["warm_starts"]:
            world_rows.append(f"| {name} | {e['seed']} | `{e['sha256'][:16]}` | {e['mean']:.3f} | "
                              f"{e['warmup_seconds']:.0f} | {'yes' if e['trained_now'] else 'no (cache)'} |")
        if w["base"]:
            b = w["base"]
            world_rows.append(f"| {name} | pooled | | {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] | | |")
    rows = []
    for c in measured:
        h = [c["comparisons"][key] for key in HEADLINES]
        rows.append(f"| {c['name']} | " + " | ".join(f"{_interval(x)} | {_per_rep(x)} | {_sign(x)} | **{x['verdict']}**"
                                                   for x in h) + " |")
    accuracy_rows = [f"| {c['name']} | " + " | ".join(
        f"{c['methods'][m]['mean']:.3f} [{c['methods'][m]['ci_low']:.3f}, {c['methods'][m]['ci_high']:.3f}]"
        for m in ("base", *METHODS)) + " |" for c in measured]
    contrast_rows = [f"| {c['name']} | {x['first']} - {x['second']} | {_interval(x)} | {_per_rep(x)} | {_sign(x)} | "
                     f"{x['verdict']} |" for c in measured for x in c["contrasts"].values()]
    pending_rows = [f"- {c['name']} ({c['purpose']}): {c['evaluated']} of {c['needed']} evaluations done"
                    for c in pending]
    t = results["timings"]
    load = t["load_average_1min_range"]
    return f"""# When does SGSD beat GRPO? Sweep report (grid `{results['grid']}`)

Each cell trains GRPO, OPSD and SGSD from each replication's warm start (seeds {results['seeds']}, each with
its own warm start per world) for {results['steps']} steps at learning rate {results['learning_rate']:g}, with the
demo's recipe, and evaluates avg@{k} on {results['eval_problems']} held-out problems of its world. Paired
differences take each replication's runs on the same problems; 95% intervals resample replications and problems
(two-level bootstrap, `sgsd.demo.replication`); the verdict is "ahead" or "behind" only when the interval excludes
0. The replication level resamples {len(results['seeds'])} value(s), so an interval cannot reach beyond their spread:
read the sign count.
Cell names: world-bank-K-budget (`equal`: every method {results['rollouts_per_step']} rollouts per step;
`paper`: GRPO with twice SGSD's rollouts, G = 8). Predictions and the reasons for each cell: docs/sweep.md.

## Worlds and warm starts
| world | warm start (seed) | sha256 | Base avg@{k} | warm-up s | trained by this sweep |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(world_rows) or '| (none yet) | | | | | |'}

## SGSD against GRPO and OPSD, per measured cell ({len(measured)} of {len(results['cells'])})
| cell | SGSD - GRPO [95%] | per replication | sign agreed | verdict | SGSD - OPSD [95%] | per replication | sign agreed | verdict |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows) or '| (none yet) | | | | | | | | |'}

Figure: `{FIGURE}`.

| cell | Base | GRPO | OPSD | SGSD |
| --- | --- | --- | --- | --- |
{chr(10).join(accuracy_rows) or '| (none yet) | | | | |'}

### What each setting did to SGSD and GRPO, against its world's reference cell (same replications, same problems)
| cell | difference | value [95%] | per replication | sign agreed | verdict |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(contrast_rows) or '| (none yet) | | | | | |'}

### What the runs saw during training (means over steps and replications)
GRPO: the share of groups with zero advantage (every completion of the prompt scored alike: no signal).
SGSD: the quadrants of its teachers, as shares of all teachers: on failed rollouts "warning" (support < 0:
pushed away from the failure) and "endorsing" (support > 0: pulled toward it, the paper's "misleading"
quadrant); on successes "helpful" and "over-suppressive"; "neutral" (|support| <= threshold); and the
share of SGSD's rollouts that succeeded.

| cell | GRPO groups without signal | SGSD on failures: warning / endorsing | on successes: helpful / over-suppressive | neutral | SGSD success rate |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(_signal_row(c) for c in measured) or '| (none yet) | | | | | |'}

## The teachers on failed rollouts, before training (`sgsd skills probe`, {grid.probe_rollouts} rollouts per replication)
Polarity +1 agrees with the verifier (on a failure: the teacher warns, it finds the failed rollout less likely
than the student does); -1 endorses the failure; 0 is neutral (|support| <= {grid.sizes.confidence_threshold}).
Teachers are classed by their (skill, mistake) pair's labels: net helpful (more helpful than misleading items),
no net effect, net misleading. Shares pooled over replications (teachers counted).

| cell | failed rollouts (per replication) | net helpful: +1 / -1 / 0 (teachers) | no net effect | net misleading |
| --- | --- | --- | --- | --- |
{chr(10).join(_teacher_cells(c) for c in results['cells'])}

## Not measured yet
{chr(10).join(pending_rows) or 'Every cell of the grid is measured.'}

To continue (finished runs and evaluations are reused, interrupted runs resume):
`sgsd sweep --grid {results['grid']} --output-dir {out}` (with the same `--cache-dir`, if one was given).

## Time
{t['runs_trained']} training runs trained by this directory's sweeps: {t['train_s']:.0f} s of training,
{t['eval_and_probe_s']:.0f} s of evaluation and probes (wall clock{'' if load is None else f'; 1-minute load average {load[0]:.1f} to {load[1]:.1f} when each finished'}),
warm-ups not included (see the warm-start table). Per run: `timings.json`.
"""


def write_sweep_report(out: Path, grid: SweepGrid, *, seconds: float | None = None) -> JSONObject:
    """Write results.json, report.md and the figure from what `out` holds; return results.json's content."""
    results = gather(out, grid)
    if seconds is not None:
        results["seconds_this_invocation"] = seconds
    plot(results, out / FIGURE)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", markdown(results, grid, out))
    return results

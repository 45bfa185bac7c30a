"""What the probe writes: probe.json, teachers.jsonl (one row per control, rollout and teacher),
report.md with a verdict in plain words, and the plots support.png and items.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from sgsd.probe.rollouts import ProbeRollout
from sgsd.probe.statistics import MIN_ITEM_USES
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_jsonl, atomic_write_text
from sgsd.teacher_scoring import QUADRANTS, TeacherProbe


def format_p(p: float) -> str:
    """"= 0.042", or "< 0.001" where the test's resolution (1 / (permutations + 1)) ends."""
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


def verdict(section: JSONObject, control: str) -> list[str]:
    """Plain-word answers to the two questions that decide whether SGSD has a signal."""
    lines = []
    dis = section["sign_disagreement"]
    share = dis["share_with_both_signs"]
    if share is None:
        lines.append(f"- **Do the teachers of one rollout differ in sign?** Not measurable: no rollout has two "
                     f"teachers whose sign counts (control {control}).")
    else:
        word = "Yes, often" if share >= 0.5 else ("Sometimes" if share > 0 else "No")
        lines.append(f"- **Do the teachers of one rollout differ in sign?** {word}: {share:.0%} of the "
                     f"{dis['rollouts_with_two_signed_teachers']} rollouts with at least two signed teachers have "
                     f"both signs (control {control}).")
    test = section["between_items"]
    if test["p_value"] is None:
        lines.append(f"- **Does net polarity differ between items beyond chance?** Not testable: "
                     f"{test['items_tested']} item(s) with at least {MIN_ITEM_USES} uses.")
    else:
        word = "Yes" if test["p_value"] < 0.05 else "No evidence"
        lines.append(f"- **Does net polarity differ between items beyond chance?** {word}: permutation test over "
                     f"{test['items_tested']} items with >= {MIN_ITEM_USES} uses, p {format_p(test['p_value'])} "
                     f"({test['permutations']} permutations); per-item 95% intervals in items.png and probe.json.")
    q = section["quadrants"]
    lines.append("- Quadrants of the teachers: " + ", ".join(f"{k} {v:.1%}" for k, v in q.items() if v is not None)
                 + ".")
    if section["block_shift_mean"] is not None:
        lines.append(f"- A skill block changes the student's log-prob of its own tokens by "
                     f"{section['block_shift_mean']:+.3f} nats a token on average"
                     + (f"; the control block by {section['control_shift_mean']:+.3f}."
                        if section["control_shift_mean"] is not None else "."))
    unmatched = control_mismatch(section)
    if unmatched:
        lines.append(unmatched)
    return lines


def control_mismatch(section: JSONObject) -> str | None:
    """A warning when the control block moves the student's log-probs outside the 5-95% range of what the skill
    blocks do: then it is no like-for-like block for this model (a filler the model never saw, say), and
    support against it measures the difference between the two kinds of block as much as what a skill says."""
    shift, spread = section.get("control_shift_mean"), section.get("block_shift") or {}
    low, high = spread.get("0.05"), spread.get("0.95")
    if shift is None or low is None or high is None or low <= shift <= high:
        return None
    return (f"- **The control is not matched to the skill blocks on this model:** it shifts the student's "
            f"log-probs by {shift:+.3f} nats a token, outside the skill blocks' 5-95% range [{low:+.3f}, "
            f"{high:+.3f}]; the polarity read against it mixes the two kinds of block with what a skill says.")


def teacher_rows(probes: dict[str, TeacherProbe], rollouts: Sequence[ProbeRollout],
                 teacher_ids: Sequence[Sequence[tuple[str, str]]]) -> list[JSONObject]:
    """teachers.jsonl: one row per (control, rollout, present teacher), what probe.json summarises."""

    rows = []
    for control, probe in probes.items():
        columns = {name: getattr(probe, name).tolist() for name in ("support", "polarity", "quadrant", "present",
                                                                      "block_shift", "control_shift", "counted_tokens")}
        for b, (rollout, ids) in enumerate(zip(rollouts, teacher_ids)):
            shift = columns["control_shift"][b]
            for k, (skill, mistake) in enumerate(ids):
                if not columns["present"][b][k]:
                    continue
                rows.append({"control": control, "rollout": b, "problem_id": rollout.problem_id,
                             "reward": rollout.reward, "teacher": k, "skill_id": skill, "mistake_id": mistake,
                             "support": columns["support"][b][k], "rho": columns["polarity"][b][k],
                             "quadrant": QUADRANTS[columns["quadrant"][b][k]],
                             "block_shift": columns["block_shift"][b][k],
                             "control_shift": None if math.isnan(shift) else shift,
                             "counted_tokens": columns["counted_tokens"][b]})
    return rows


def write_outputs(out: Path, result: JSONObject, probes: dict[str, TeacherProbe],
                  teachers: Sequence[JSONObject] = ()) -> None:

    out.mkdir(parents=True, exist_ok=True)
    plot_support(probes, out / "support.png")
    plot_items(result["controls"], out / "items.png")
    atomic_write_jsonl(out / "teachers.jsonl", teachers)
    atomic_write_json(out / "probe.json", result)
    lines = [f"# Teacher probe: {result['model']}", "",
             f"{result['rollouts']} rollouts (success rate {result['success_rate']:.1%}), K = {result['num_teachers']} "
             f"teachers of {result['bank']} ({result['retrieval']} retrieval), polarity test "
             f"{result['polarity_test']} (theta {result['confidence_threshold']}, z {result['polarity_z']}); "
             f"{result['seconds_per_rollout']:.2f} s a rollout "
             f"({result['scoring_seconds_per_rollout']:.2f} s scoring).", ""]
    for control, section in result["controls"].items():
        lines += [f"## Control: {control}", "", *verdict(section, control), ""]
    lines += ["![support per outcome](support.png)", "", "![net polarity per item](items.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def plot_support(probes: dict[str, TeacherProbe], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.4), squeeze=False)
    for ax, (control, probe) in zip(axes[0], probes.items()):
        success = (probe.rewards > 0)[:, None].expand_as(probe.present)
        for ok, label, color in ((False, "failed", "tab:red"), (True, "successful", "tab:green")):
            values = probe.support[probe.present & (success == ok)].tolist()
            if values:
                ax.hist(values, bins=30, alpha=0.6, color=color, label=f"{label} rollouts ({len(values)} teachers)")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"support, control {control}")
        ax.set_xlabel("clipped mean support (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_items(sections: dict[str, JSONObject], path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 0.25 * top + 1.5), squeeze=False)
    for ax, (control, section) in zip(axes[0], sections.items()):
        items = list(section["items"].items())[:top]
        names = [f"{k} ({v['uses']})" for k, v in items]
        means = [v["net_polarity"] for _, v in items]
        errors = [[m - v["interval"][0] for m, (_, v) in zip(means, items)],
                  [v["interval"][1] - m for m, (_, v) in zip(means, items)]]
        ax.errorbar(means, range(len(items)), xerr=errors, fmt="o", markersize=3)
        ax.set_yticks(range(len(items)), names, fontsize=6)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(f"net polarity per item (95% t), control {control}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

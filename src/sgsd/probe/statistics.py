"""The probe's summaries, pure: numbers in, numbers out (quadrant shares, support quantiles, net polarity
per bank item with a 95% interval, and the between-item permutation test)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sgsd.skills.bank import SkillBank
from sgsd.storage import JSONObject
from sgsd.teacher_scoring import QUADRANTS, TeacherProbe

PERMUTATIONS = 2000  # the between-item test's resamples: a p-value of 0.05 is then known to about +-0.005
MIN_ITEM_USES = 3  # items used fewer times are listed but left out of the between-item test


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:

    if not len(values):
        return {str(q): None for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    return {str(q): float(np.quantile(np.asarray(values), q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval (the mean itself twice for fewer than two values)."""
    from scipy import stats

    n = len(values)
    mean = float(sum(values) / n) if n else float("nan")
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def between_item_test(rollouts: Sequence[Sequence[tuple[Sequence[str], float]]], *,
                      permutations: int = PERMUTATIONS, seed: int = 0) -> JSONObject:
    """Does net polarity differ between items beyond what their rollouts explain?

    `rollouts`: per rollout, its teachers as (the items the teacher carries, its rho). Statistic: the
    use-weighted variance of the items' mean rho, over items with at least MIN_ITEM_USES uses. Null: within a
    rollout, which teacher got which rho does not depend on its items, so the rho values are permuted among
    the teachers of each rollout (a stratified permutation test). Permuting across rollouts instead would
    count as an item effect what is a rollout's: the teachers of one rollout share its completion and outcome
    (on a model where every block lowers the completion, all of a failed rollout's teachers are warnings), and
    retrieval gives related problems the same items, so items retrieved for hard problems would "differ" from
    items retrieved for easy ones whatever they say."""

    uses: dict[str, int] = {}
    for row in rollouts:
        for items, _ in row:
            for item in items:
                uses[item] = uses.get(item, 0) + 1
    kept = {item: index for index, item in enumerate(sorted(i for i, n in uses.items() if n >= MIN_ITEM_USES))}
    if len(kept) < 2:
        return {"items_tested": len(kept), "statistic": None, "p_value": None}
    width = max((len(row) for row in rollouts), default=0)
    values = np.zeros((len(rollouts), width))
    present = np.zeros((len(rollouts), width), dtype=bool)
    slots, labels = [], []  # one entry per (teacher slot, kept item it carries)
    for r, row in enumerate(rollouts):
        for j, (items, value) in enumerate(row):
            values[r, j], present[r, j] = value, True
            for item in items:
                if item in kept:
                    slots.append(r * width + j)
                    labels.append(kept[item])
    slot_index, item_index = np.asarray(slots), np.asarray(labels)
    counts = np.bincount(item_index, minlength=len(kept))

    def statistic(table: np.ndarray) -> float:
        x = table.reshape(-1)[slot_index]
        means = np.bincount(item_index, weights=x, minlength=len(kept)) / counts
        return float((counts * (means - x.mean()) ** 2).sum() / counts.sum())

    observed = statistic(values)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(rollouts))[:, None]
    exceed = 0
    for _ in range(permutations):
        # each rollout's teachers fill its first slots: a random order of them, the empty slots sorted last
        order = np.argsort(np.where(present, rng.random(present.shape), np.inf), axis=1)
        exceed += statistic(values[rows, order]) >= observed - 1e-12
    return {"items_tested": len(kept), "statistic": observed, "p_value": (exceed + 1) / (permutations + 1),
            "permutations": permutations, "null": "rho permuted among the teachers of each rollout"}


def summarize(probe: TeacherProbe, teacher_ids: Sequence[Sequence[tuple[str, str]]],
              bank: SkillBank) -> JSONObject:
    """probe.json's section of one control."""

    present = probe.present.tolist()
    quadrant = probe.quadrant.tolist()
    polarity = probe.polarity.tolist()
    support = probe.support.tolist()
    success = (probe.rewards > 0).tolist()
    codes = [q for row, keep in zip(quadrant, present) for q, k in zip(row, keep) if k]
    shares = {name: (sum(c == i for c in codes) / len(codes) if codes else None) for i, name in enumerate(QUADRANTS)}
    signs = []  # per rollout: the signs of its signed teachers' support
    for row_p, row_keep, ok in zip(polarity, present, success):
        signs.append([(p if ok else -p) for p, k in zip(row_p, row_keep) if k and p != 0])
    two_or_more = [s for s in signs if len(s) >= 2]
    disagree = [len(set(s)) > 1 for s in two_or_more]
    items: dict[str, JSONObject] = {}
    values: dict[str, list[float]] = {}
    teachers: list[list[tuple[tuple[str, str], float]]] = []  # per rollout: (its items, rho) of each teacher
    for row_ids, row_p, row_keep in zip(teacher_ids, polarity, present):
        teachers.append([(pair, float(p)) for pair, p, k in zip(row_ids, row_p, row_keep) if k])
        for pair, p in teachers[-1]:
            for item in pair:
                values.setdefault(item, []).append(p)
    kinds = {s.skill_id: "skill" for s in bank.general_skills} | {m.mistake_id: "mistake" for m in bank.common_mistakes}
    for item, vals in sorted(values.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        mean, low, high = mean_interval(vals)
        items[item] = {"kind": kinds.get(item, "?"), "uses": len(vals), "helpful": sum(v > 0 for v in vals),
                       "harmful": sum(v < 0 for v in vals), "net_polarity": mean, "interval": [low, high]}
    block = [b for row, keep in zip(probe.block_shift.tolist(), present) for b, k in zip(row, keep) if k]
    control_shift = [c for c in probe.control_shift.tolist() if not math.isnan(c)]
    return {
        "quadrants": shares,
        "support": {"all": _quantiles([s for row, keep in zip(support, present) for s, k in zip(row, keep) if k]),
                    "success": _quantiles([s for row, keep, ok in zip(support, present, success)
                                           for s, k in zip(row, keep) if k and ok]),
                    "failure": _quantiles([s for row, keep, ok in zip(support, present, success)
                                           for s, k in zip(row, keep) if k and not ok])},
        "sign_disagreement": {"rollouts_with_two_signed_teachers": len(two_or_more),
                              "share_with_both_signs": (sum(disagree) / len(disagree)) if disagree else None},
        "block_shift_mean": sum(block) / len(block) if block else None,
        "block_shift": _quantiles(block),
        "control_shift_mean": sum(control_shift) / len(control_shift) if control_shift else None,
        "counted_tokens_mean": float(probe.counted_tokens.float().mean()),
        "items": items,
        "between_items": between_item_test(teachers),
    }

"""Intervals over the demo's unit of replication: a warm start with its seed, evaluated on shared problems.

Each replication r (one seed: its own warm start, its own training runs) is evaluated on the same P
held-out problems, so a method's per-problem accuracies form an [R, P] grid, and so does a paired
difference of two methods (first - second, replication by replication, problem by problem). Two
sources of noise move the grid's mean: which warm start and training draw a replication got (the
largest one, docs/demo.md) and which problems were drawn. The interval resamples both.

Why a crossed two-level bootstrap (replications and problems resampled independently, Owen's
"pigeonhole" bootstrap), not a nested one (problems resampled within each replication): every
replication is scored on the same problems, so a problem's difficulty is shared by all of them. For
d[r, p] = a_r + b_p the crossed scheme's variance is var(a) / R + var(b) / P, the variance of the grid
mean under new replications and new problems; a nested scheme would give var(a) / R + var(b) / (R P),
as if every replication had had its own problems, too narrow by a factor up to R on the problem part.
The crossed scheme errs the other way on an interaction term (it counts it about three times, not
once), so its intervals are slightly conservative.

What it cannot do: with a few replications, the replication level is a bootstrap of a few values,
whose percentile interval never reaches beyond them. With R = 3, an interval that excludes 0
essentially needs all three replications on one side; that is why every comparison also says in
how many replications the sign agreed, and lists the per-replication differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from sgsd.storage import JSONObject

if TYPE_CHECKING:
    import numpy as np

RESAMPLES = 10_000


def two_level_means(grid: Sequence[Sequence[float]], *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap means of `grid` [R replications, P problems]: each resample draws R replications and P
    problems with replacement, independently, and averages the R x P cells they pick. numpy [resamples]."""
    import numpy as np

    data = np.asarray(grid, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"two_level_means: need a non-empty [replications, problems] grid, got shape {data.shape}")
    rows, cols = data.shape
    rng = np.random.default_rng(seed)
    # Multiplicities instead of index draws: the mean of the picked cells is row_counts @ data @ col_counts / (R P).
    row_counts = rng.multinomial(rows, np.full(rows, 1 / rows), size=resamples)
    col_counts = rng.multinomial(cols, np.full(cols, 1 / cols), size=resamples)
    return np.einsum("br,rp,bp->b", row_counts, data, col_counts) / (rows * cols)


def two_level_interval(grid: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the grid mean from `two_level_means`."""
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"two_level_interval: confidence={confidence} must be in (0, 1)")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(two_level_means(grid, resamples=resamples, seed=seed), [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class ReplicatedDifference:
    """first - second over the replications both have (same seeds, same problems).

    difference: mean over replications and problems; ci_low / ci_high: `two_level_interval`;
    per_replication: (seed, mean difference on the problems) in seed order; agreeing: how many
    replications have the sign of `difference` (none when it is 0)."""

    difference: float
    ci_low: float
    ci_high: float
    per_replication: tuple[tuple[int, float], ...]
    agreeing: int

    @property
    def verdict(self) -> str:
        """"ahead" / "behind" when the interval excludes 0, else "not separated"."""
        if self.ci_low > 0:
            return "ahead"
        if self.ci_high < 0:
            return "behind"
        return "not separated"

    def to_json(self) -> JSONObject:
        return {"difference": self.difference, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "per_replication": [{"seed": s, "difference": d} for s, d in self.per_replication],
                "replications": len(self.per_replication), "replications_agreeing": self.agreeing,
                "verdict": self.verdict}


def replicated_difference(first: Mapping[int, Sequence[float]], second: Mapping[int, Sequence[float]], *,
                          seed: int = 0) -> ReplicatedDifference:
    """Paired difference of two methods' per-problem accuracies, each given per replication (seed ->
    per-problem accuracies on the same problems in the same order)."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        raise ValueError(f"replicated_difference: no replication in common ({sorted(first)} and {sorted(second)})")
    grid = []
    for s in seeds:
        if len(first[s]) != len(second[s]):
            raise ValueError(f"replicated_difference: seed {s} has {len(first[s])} and {len(second[s])} problems; "
                             "need the same problems")
        grid.append([float(x) - float(y) for x, y in zip(first[s], second[s])])
    if len({len(row) for row in grid}) != 1:
        raise ValueError("replicated_difference: replications were evaluated on different numbers of problems")
    per_replication = tuple((s, sum(row) / len(row)) for s, row in zip(seeds, grid))
    difference = sum(d for _, d in per_replication) / len(per_replication)
    low, high = two_level_interval(grid, seed=seed)
    sign = (difference > 0) - (difference < 0)
    agreeing = sum(((d > 0) - (d < 0)) == sign for _, d in per_replication) if sign else 0
    return ReplicatedDifference(difference, low, high, per_replication, agreeing)

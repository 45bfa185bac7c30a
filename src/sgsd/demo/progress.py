"""The demo's progress line: where it is, and how long the whole demo still needs.

The estimate (`DemoEstimate`) is the remaining work priced at what the work done so far cost: each
stage has a count of units (warm-up steps, training runs with their evaluations, the report) and an
idle-machine cost per unit (measured on 2 idle cores, below). A stage with finished units is priced at
its own observed seconds per unit (after its first, which carries the stage's set-up, once there are
more); a stage not yet begun at its idle cost times the slowdown seen so
far (observed / idle cost of everything finished). So a machine that other work makes three times
slower shows three times the idle estimate after the first warm-up steps, not the idle figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

# Idle-machine costs (2 cores; `sgsd demo`: 4 min 23 s of which 78 s warm-up for 650 steps, 9 runs of
# 30 steps with their evaluations in the rest; `--quick`: 3 runs of 6 steps in 16 s with a cached warm
# start), per unit.
WARMUP_STEP_S = 0.12
RUN_STEP_S = 0.7  # a training run, per optimizer step, with its share of the evaluations
REPORT_S = 3.0


@dataclass
class Stage:
    name: str
    units: int
    idle_s_per_unit: float
    done: int = 0
    spent_s: float = 0.0  # wall time of the finished units
    first_s: float = 0.0  # of which the first unit's (it carries the stage's set-up: model building, first calls)

    @property
    def remaining(self) -> int:
        return max(self.units - self.done, 0)

    def observed(self) -> tuple[int, float]:
        """(units, seconds) that measure the stage's speed: without the first unit once there are more."""
        return (self.done - 1, self.spent_s - self.first_s) if self.done > 1 else (self.done, self.spent_s)


class DemoEstimate:
    """Seconds left for the whole demo. `advance(stage)` marks one unit of `stage` finished; time is
    charged to the stage whose unit was running (from the previous mark to this one)."""

    def __init__(self, stages: list[Stage], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stages = {s.name: s for s in stages}
        self.clock = clock
        self.mark = clock()

    def advance(self, stage: str, units: int = 1) -> None:
        now = self.clock()
        s = self.stages[stage]
        if s.done == 0:
            s.first_s = now - self.mark
        s.done += units
        s.spent_s += now - self.mark
        self.mark = now

    def finish(self, stage: str) -> None:
        """`stage` needs no more units."""
        self.skip(stage, self.stages[stage].remaining)

    def skip(self, stage: str, units: int) -> None:
        """`units` of `stage` will not run (e.g. a cached warm start's steps); the time since the last mark
        is charged to the stage."""
        now = self.clock()
        s = self.stages[stage]
        s.units = max(s.units - max(units, 0), s.done)
        s.spent_s += now - self.mark
        self.mark = now

    def slowdown(self) -> float:
        """Observed / idle cost of the finished units (1 before any finished)."""
        observed = [s.observed() for s in self.stages.values()]
        idle = sum(units * s.idle_s_per_unit for (units, _), s in zip(observed, self.stages.values()))
        spent = sum(seconds for units, seconds in observed if units)
        return spent / idle if idle > 0 and spent > 0 else 1.0

    def remaining_s(self) -> float:
        slowdown = self.slowdown()
        total = 0.0
        for s in self.stages.values():
            units, seconds = s.observed()
            per_unit = seconds / units if units else s.idle_s_per_unit * slowdown
            total += s.remaining * per_unit
        # the running unit has already used part of its time
        return max(total - (self.clock() - self.mark), 0.0)


def demo_stages(*, warmup_steps: int, runs: int, run_steps: int) -> list[Stage]:
    return [Stage("warmup", warmup_steps, WARMUP_STEP_S), Stage("runs", runs, RUN_STEP_S * run_steps),
            Stage("report", 1, REPORT_S)]


def format_duration(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1 h 5 min' (rounded: an estimate, not a promise)."""
    if seconds < 60:
        return f"about {max(int(round(seconds / 5.0)) * 5, 5)} s"
    minutes = int(round(seconds / 60.0))
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60} min"


class DemoProgressBar:
    """The demo's outer bar (tqdm) with the whole demo's time left in its line. Same calls as the tqdm
    bar it replaces (`update`, `set_postfix_str`, `close`), plus `warmup_step` and `warm_start_done`.
    The bar's units are the `warm_starts` warm starts (each of `warmup_steps` steps when trained, none
    when cached), then the training runs, then the report."""

    def __init__(self, estimate: DemoEstimate, *, total: int, disable: bool, warm_starts: int = 1,
                 warmup_steps: int | None = None) -> None:
        from tqdm.auto import tqdm

        self.estimate = estimate
        self.where = ""
        self.line = ""
        self.units_done = 0
        self.warm_starts = warm_starts
        stage = estimate.stages["warmup"]
        self.warmup_steps = warmup_steps if warmup_steps is not None else stage.units // max(warm_starts, 1)
        self._steps_this_warm_start = 0
        # tqdm's own rate would treat a warm start and a training run as equal units: ours replaces it
        self.bar: Any = tqdm(total=total, desc="sgsd demo", disable=disable,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")

    def _show(self) -> None:
        left = format_duration(self.estimate.remaining_s())
        self.line = f"{self.where}; whole demo: {left} left" if self.where else f"whole demo: {left} left"
        self.bar.set_postfix_str(self.line)

    def set_postfix_str(self, text: str) -> None:
        self.where = text
        self._show()

    def warmup_step(self) -> None:
        self.estimate.advance("warmup")
        self._steps_this_warm_start += 1
        if self.estimate.stages["warmup"].done % 10 == 0:
            self._show()

    def warm_start_done(self) -> None:
        """One warm start is ready: the steps it did not run (all of them, when cached) are not to come."""
        self.estimate.skip("warmup", self.warmup_steps - self._steps_this_warm_start)
        self._steps_this_warm_start = 0
        self.units_done += 1
        self.bar.update()
        self._show()

    def update(self) -> None:
        """One unit of the bar after the warm starts: a training run, the report (last)."""
        self.estimate.advance("report" if self.units_done == self.bar.total - 1 else "runs")
        self.units_done += 1
        self.bar.update()
        self._show()

    def close(self) -> None:
        self.bar.close()

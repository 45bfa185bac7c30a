"""The demo's progress line: where it is, and how long the whole demo still needs.

The estimate (`DemoEstimate`) prices the remaining work at what this run's work has cost so far, with
no figures taken from another machine: each stage has a count of units (warm-up steps, training runs
with their evaluations, the report), and a stage's remaining units cost its own measured seconds per
unit (after its first, which carries the stage's set-up, once there are more). A stage that has not
finished a unit yet has no speed, so there is no estimate until every stage still to come has one
(the warm-up after its first step, the training runs after the first run); the report, one short unit
at the end, is left out of the estimate (`Stage.estimated`). The line says that the figure is an
estimate from this run's measured speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Stage:
    name: str
    units: int
    estimated: bool = True  # False: not priced (a short last step whose speed cannot be measured before it runs)
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
    charged to the stage whose unit was running (from the previous mark to this one). `clock` is
    injectable so that tests need no real time."""

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

    def remaining_s(self) -> float | None:
        """Seconds left at each stage's measured speed; None while a stage still to come has no finished
        unit (its speed is not measured yet)."""
        total = 0.0
        for s in self.stages.values():
            if not s.estimated or not s.remaining:
                continue
            units, seconds = s.observed()
            if not units:
                return None
            total += s.remaining * seconds / units
        # the running unit has already used part of its time
        return max(total - (self.clock() - self.mark), 0.0)


def demo_stages(*, warmup_steps: int, runs: int) -> list[Stage]:
    return [Stage("warmup", warmup_steps), Stage("runs", runs), Stage("report", 1, estimated=False)]


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
        from tqdm.auto import tqdm  # not at the top: this module is on `sgsd demo --help`'s import path

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
        self.line = f"{self.where}; {self.time_left()}" if self.where else self.time_left()
        self.bar.set_postfix_str(self.line)

    def time_left(self) -> str:
        seconds = self.estimate.remaining_s()
        if seconds is None:
            waiting = [s.name for s in self.estimate.stages.values() if s.estimated and s.remaining and not s.done]
            first = "the first warm-up step" if waiting[:1] == ["warmup"] else "the first training run"
            return f"whole demo: time left measured after {first}"
        return f"whole demo: {format_duration(seconds)} left (estimated from this run's speed)"

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

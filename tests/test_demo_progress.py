"""The demo's whole-demo estimate (`sgsd.demo.progress`): idle costs before anything ran, then the
remaining work priced at the slowdown observed so far, per stage once a stage has finished units."""

import pytest

from sgsd.demo.progress import DemoEstimate, DemoProgressBar, Stage, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def estimate(clock):
    # 100 warm-up steps at 0.1 s, 4 runs at 10 s, a report of 2 s: 10 + 40 + 2 = 52 s idle
    return DemoEstimate([Stage("warmup", 100, 0.1), Stage("runs", 4, 10.0), Stage("report", 1, 2.0)], clock=clock)


def test_before_anything_ran_the_idle_costs():
    assert estimate(Clock()).remaining_s() == pytest.approx(52.0)


def test_a_slow_warm_up_scales_the_stages_not_begun():
    clock = Clock()
    est = estimate(clock)
    clock.now += 5.3  # the first step carries the set-up (building the model): 5 s
    est.advance("warmup")
    assert est.remaining_s() == pytest.approx(99 * 5.3 + 42 * 53.0)  # one unit only: all of it counts
    for _ in range(9):  # then 9 steps at 0.3 s: 3x the idle cost
        clock.now += 0.3
        est.advance("warmup")
    assert est.slowdown() == pytest.approx(3.0)  # the set-up is left out
    # 90 steps at the observed 0.3 s + (40 + 2) s idle x 3
    assert est.remaining_s() == pytest.approx(90 * 0.3 + 42 * 3.0)
    clock.now += 0.1  # a third of the running step has passed
    assert est.remaining_s() == pytest.approx(90 * 0.3 + 42 * 3.0 - 0.1)


def test_finished_runs_price_the_remaining_runs():
    clock = Clock()
    est = estimate(clock)
    clock.now += 1.0
    est.finish("warmup")  # a cached warm start: its steps never run, and cost no slowdown
    assert est.slowdown() == 1.0
    assert est.remaining_s() == pytest.approx(42.0)
    clock.now += 25.0
    est.advance("runs")  # the first run took 25 s (idle 10)
    assert est.remaining_s() == pytest.approx(3 * 25.0 + 2.0 * 2.5)
    clock.now += 20.0
    est.advance("runs")  # the second 20 s: the speed from here on
    assert est.remaining_s() == pytest.approx(2 * 20.0 + 2.0 * 2.0)


def test_the_bar_charges_each_unit_to_its_stage():
    clock = Clock()
    est = estimate(clock)
    bar = DemoProgressBar(est, total=1 + 4 + 1, disable=True)
    for _ in range(100):
        clock.now += 0.1
        bar.warmup_step()
    bar.warm_start_done()
    for _ in range(4):
        clock.now += 10.0
        bar.update()
    assert est.stages["runs"].done == 4 and est.stages["report"].done == 0
    bar.set_postfix_str("report")
    assert bar.line == "report; whole demo: about 5 s left"
    clock.now += 2.0
    bar.update()
    assert est.stages["report"].done == 1 and est.remaining_s() == 0.0
    bar.close()


@pytest.mark.parametrize("seconds, text", [(3, "about 5 s"), (42, "about 40 s"), (61, "about 1 min"),
                                           (150, "about 2 min"), (3 * 3600 + 300, "about 3 h 5 min")])
def test_durations_are_rounded_estimates(seconds, text):
    assert format_duration(seconds) == text

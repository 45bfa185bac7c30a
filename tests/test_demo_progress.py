"""The demo's whole-demo estimate (`sgsd.demo.progress`): no figure before the stages still to come have
a measured speed, then the remaining work priced at this run's measured seconds per unit, per stage.
Time is an injected clock, so nothing here depends on the machine's speed."""

import pytest

from sgsd.demo.progress import DemoEstimate, DemoProgressBar, Stage, demo_stages, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def estimate(clock):
    return DemoEstimate(demo_stages(warmup_steps=100, runs=4), clock=clock)


def test_no_estimate_before_a_speed_is_measured():
    clock = Clock()
    est = estimate(clock)
    assert est.remaining_s() is None
    clock.now += 0.2
    est.advance("warmup")  # the warm-up has a speed, the training runs not yet
    assert est.remaining_s() is None


def test_each_stage_is_priced_at_its_own_measured_speed():
    clock = Clock()
    est = estimate(clock)
    clock.now += 5.3  # the first step carries the set-up (building the model): 5 s
    est.advance("warmup")
    for _ in range(9):  # then 9 steps at 0.3 s
        clock.now += 0.3
        est.advance("warmup")
    est.finish("warmup")  # e.g. the remaining steps' warm start came from the cache
    assert est.remaining_s() is None  # no training run has finished
    clock.now += 25.0
    est.advance("runs")  # one unit only: all of it counts
    assert est.remaining_s() == pytest.approx(3 * 25.0)
    clock.now += 20.0
    est.advance("runs")  # the second run, 20 s: the speed from here on (the first carried the set-up)
    assert est.remaining_s() == pytest.approx(2 * 20.0)
    clock.now += 5.0  # a quarter of the running run has passed
    assert est.remaining_s() == pytest.approx(2 * 20.0 - 5.0)


def test_the_warm_up_speed_prices_the_remaining_warm_up_steps():
    clock = Clock()
    est = DemoEstimate([Stage("warmup", 100), Stage("runs", 2)], clock=clock)
    clock.now += 10.0
    est.advance("runs")  # (a stage's order does not matter to the estimate)
    clock.now += 5.0
    est.advance("warmup")
    for _ in range(10):
        clock.now += 0.5
        est.advance("warmup")
    assert est.remaining_s() == pytest.approx(89 * 0.5 + 1 * 10.0)


def test_the_bar_charges_each_unit_to_its_stage_and_says_where_the_figure_comes_from():
    clock = Clock()
    est = estimate(clock)
    bar = DemoProgressBar(est, total=1 + 4 + 1, disable=True)
    bar.set_postfix_str("warm start 0")
    assert bar.line == "warm start 0; whole demo: time left measured after the first warm-up step"
    for _ in range(100):
        clock.now += 0.1
        bar.warmup_step()
    bar.warm_start_done()
    assert bar.line == "warm start 0; whole demo: time left measured after the first training run"
    for _ in range(4):
        clock.now += 10.0
        bar.update()
        if est.stages["runs"].done == 2:
            assert bar.line.endswith("whole demo: about 20 s left (estimated from this run's speed)")
    assert est.stages["runs"].done == 4 and est.stages["report"].done == 0
    bar.set_postfix_str("report")
    assert bar.line == "report; whole demo: about 5 s left (estimated from this run's speed)"
    clock.now += 2.0
    bar.update()
    assert est.stages["report"].done == 1 and est.remaining_s() == 0.0
    bar.close()


@pytest.mark.parametrize("seconds, text", [(3, "about 5 s"), (42, "about 40 s"), (61, "about 1 min"),
                                           (150, "about 2 min"), (3 * 3600 + 300, "about 3 h 5 min")])
def test_durations_are_rounded_estimates(seconds, text):
    assert format_duration(seconds) == text

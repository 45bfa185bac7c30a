"""The training console (`sgsd.trainers.console`): one line per logging step on the main process, no
Hugging Face log dicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step tiny SGSD run and what the command printed."""
    out = tmp_path_factory.mktemp("finished") / "run"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout = io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    try:  # not --quiet: the console shows a progress bar and one line per logging step
        code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "2"])
    finally:
        capture.undo()
    assert code == 0
    return out, stdout.getvalue()


@pytest.mark.slow
def test_console_prints_one_line_per_logging_step(finished_run):
    _, printed = finished_run
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("reward " in line and "helpful " in line and "support " in line and "generate " in line
               for line in lines)
    assert "{'loss'" not in printed and "'sgsd/" not in printed  # no Hugging Face log dicts


def test_step_line_format_and_main_process_only(capsys):
    from types import SimpleNamespace

    from sgsd.trainers.console import StepLinePrinter, format_step_line

    logs = {"loss": 0.5, "reward": 0.25, "sgsd/helpful_fraction": 0.5, "sgsd/harmful_fraction": 0.25,
            "sgsd/neutral_fraction": 0.25, "sgsd/support_mean": -0.0123, "time/generate_s": 1.25,
            "time/teacher_s": 0.5, "time/update_s": 0.25, "epoch": 0.1}
    assert format_step_line(3, 10, logs) == ("step 3/10  reward 0.250  loss 0.5  helpful 0.50 harmful 0.25 "
                                             "neutral 0.25  support -0.0123  generate 1.2s teacher 0.5s update 0.2s")
    assert format_step_line(1, 2, {"loss": 0.1, "reward": 1.0}) == "step 1/2  reward 1.000  loss 0.1"  # GRPO
    printer = StepLinePrinter(progress=False)
    for zero in (False, True):
        printer.on_log(None, SimpleNamespace(is_world_process_zero=zero, global_step=3, max_steps=10), None, logs=logs)
    assert capsys.readouterr().out.splitlines() == [format_step_line(3, 10, logs)]

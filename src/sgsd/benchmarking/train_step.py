"""`sgsd bench train-step`: where the time of whole training steps goes (docs/performance.md).

Runs `sgsd train` in-process on a recipe (default the tiny SGSD one) for a few steps and reads the
per-step `time/*` keys the trainer writes to metrics.jsonl (`sgsd.trainers.callbacks.StepTimer`):
`time/generate_s` (TRL's generation + reward computation), `time/teacher_s` (`rollout_extras`: K
teacher forwards, retrieval, prompt rendering) and `time/update_s` (the rest: student forward and
backward, loss, optimizer step, logging, checkpointing). The reward function is wrapped to time grading
separately, so generation = generate_s - grading. The first step carries one-off costs (first model
calls, grader import) and is reported apart from the steady-state mean.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sgsd.config import load_config
from sgsd.run_dir import RunDir
from sgsd.storage import JSONObject
from sgsd.verify import AccuracyReward

STAGES = ("generate_s", "grade_s", "teacher_s", "update_s", "step_s")


@dataclass(frozen=True)
class StepTimes:
    step: int
    generate_s: float  # generation only (TRL's generate_s minus grading)
    grade_s: float
    teacher_s: float
    update_s: float
    step_s: float


@dataclass(frozen=True)
class TrainStepProfile:
    config: str
    steps: list[StepTimes]
    steady_mean: dict[str, float]  # mean over steps 2.. of each stage
    steady_fraction: dict[str, float]  # share of step_s
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'step':>4} " + " ".join(f"{name:>11}" for name in STAGES)]
        for s in self.steps:
            lines.append(f"{s.step:>4} " + " ".join(f"{getattr(s, name):11.4f}" for name in STAGES))
        lines.append("mean " + " ".join(f"{self.steady_mean[name]:11.4f}" for name in STAGES) + "   (steps 2..)")
        lines.append("share" + " ".join(f"{self.steady_fraction[name]:11.1%}" for name in STAGES))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def timed_reward(reward: Callable[..., list[float]], seconds: list[float]) -> Callable[..., list[float]]:
    """`reward` with the same name and signature, appending each call's wall time to `seconds`."""

    @functools.wraps(reward)
    def wrapper(*args: Any, **kwargs: Any) -> list[float]:
        start = time.perf_counter()
        try:
            return reward(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return wrapper


def profile_from_records(config: str, records: Sequence[JSONObject], grading: Sequence[float]) -> TrainStepProfile:
    """Per-step stage times from metrics.jsonl records and the grading time of each reward call."""
    rows = sorted((r for r in records if "time/step_s" in r), key=lambda r: int(r["step"]))
    if not rows:
        raise ValueError("no metrics record carries time/step_s: was the run's StepTimer active?")
    notes = []
    per_step = list(grading) if len(grading) == len(rows) else None
    if per_step is None:
        notes.append(f"{len(grading)} reward calls for {len(rows)} steps: grading spread evenly over steps")
        per_step = [sum(grading) / len(rows)] * len(rows)
    steps = []
    for record, grade in zip(rows, per_step):
        generate = float(record.get("time/generate_s", 0.0))
        steps.append(StepTimes(int(record["step"]), max(generate - grade, 0.0), grade,
                               float(record.get("time/teacher_s", 0.0)), float(record.get("time/update_s", 0.0)),
                               float(record["time/step_s"])))
    steady = steps[1:] or steps
    if len(steps) < 2:
        notes.append("only one step: the mean includes the warm-up step")
    mean = {name: sum(getattr(s, name) for s in steady) / len(steady) for name in STAGES}
    total = mean["step_s"] or 1.0
    fraction = {name: mean[name] / total for name in STAGES}
    return TrainStepProfile(config, steps, mean, fraction, notes)


def profile_training(config_path: str, *, steps: int = 4, overrides: Sequence[str] = (),
                     output_dir: str | None = None) -> TrainStepProfile:
    """Train `steps` steps of the recipe into `output_dir` (default: a temporary directory, removed) and profile."""
    from sgsd.trainers.run import train

    cfg = load_config(config_path, list(overrides))
    grading: list[float] = []
    temporary = output_dir is None
    out = Path(tempfile.mkdtemp(prefix="sgsd-bench-")) if temporary else Path(output_dir)
    try:
        # the HF Trainer prints its log dicts to stdout without a progress bar: keep stdout for our output
        with contextlib.redirect_stdout(sys.stderr):
            train(cfg, out / "run" if temporary else out, resume=False, max_steps=steps, progress=False,
                  reward_funcs=[timed_reward(AccuracyReward(extract=cfg.reward.extract), grading)])
        metrics = RunDir(out / "run" if temporary else out).metrics
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)
    return profile_from_records(str(config_path), records, grading)

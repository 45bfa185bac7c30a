"""Trainer callbacks: metrics.jsonl, per-step timing, EMA updates, fault injection for tests."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from sgsd.distributed import is_main_process, rank
from sgsd.run_dir import RunDir
from sgsd.storage import atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from sgsd.trl_adapter import HookedGRPOTrainer

# one metrics.jsonl record: the step and the logged values (None where a value was not finite)
Record = dict[str, float | int | None]

# TRL / HF log keys -> the project's metric keys
RENAMES = {
    "loss": "train/loss",
    "reward": "train/reward_trl",
    "reward_std": "train/reward_std",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "entropy": "train/entropy",
    "completions/mean_length": "train/completion_length_mean",
    "completions/clipped_ratio": "train/completion_clipped_ratio",
    "step_time": "time/step_s",
}


def _clean(value: float) -> float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter(TrainerCallback):
    """One JSON object per logged step in `path`, with `step`; the file is rewritten atomically.

    On resume, records after the resumed step are dropped, so a restarted run's file equals that of
    an uninterrupted run. Every rank keeps the records; only the main process writes the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[Record] = []
        if self.path.exists():
            self.records = list(read_jsonl(self.path))

    def truncate_after(self, step: int) -> None:
        self.records = [r for r in self.records if int(r.get("step", 0)) <= step]
        self._write()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        record: Record = {"step": state.global_step}
        for key, value in logs.items():
            record[RENAMES.get(key, key)] = _clean(value)
        if "train/reward_mean" not in record and "train/reward_trl" in record:
            record["train/reward_mean"] = record["train/reward_trl"]
        self.records = [r for r in self.records if r["step"] != state.global_step] + [record]
        self._write()

    def _write(self) -> None:
        if not is_main_process():
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        atomic_write_text(self.path, text)


class StepTimer(TrainerCallback):
    """time/generate_s, time/teacher_s and time/update_s (the rest of the step) of every optimizer step."""

    def __init__(self) -> None:
        self.trainer: HookedGRPOTrainer | None = None  # set by the code that builds the trainer
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self._start
        timing = self.trainer.pop_step_timing()
        self.trainer.record_metric("time/generate_s", timing["generate_s"])
        self.trainer.record_metric("time/teacher_s", timing["teacher_s"])
        self.trainer.record_metric("time/update_s", max(total - timing["generate_s"] - timing["teacher_s"], 0.0))


class EMAStep(TrainerCallback):
    """Update the EMA teacher after every optimizer step."""

    def __init__(self) -> None:
        self.trainer: HookedGRPOTrainer | None = None  # set by the code that builds the trainer

    def on_step_end(self, args, state, control, **kwargs):
        step = getattr(self.trainer, "ema_step", None)
        if step is not None:
            step()


class FaultInjection(TrainerCallback):
    """Test-only faults on one rank, enabled by `SGSD_FAULT_INJECT`; never otherwise.

    - `rank=R,step=S`: raise at the start of optimizer step S (counting from 1), to check that a failure
      on a single rank ends the whole run (nothing hangs in a collective) and leaves the last complete
      checkpoint intact; with `,signal=KILL` or `,signal=STOP` that rank instead sends itself SIGKILL (a node
      that dies without a word) or SIGSTOP (a frozen node: every thread stops, its heartbeat too);
    - `rank=R,save_delay=SEC`: after Hugging Face saved a checkpoint, that rank sleeps SEC seconds and
      then writes `late_rank<R>.txt` into it, as a rank whose files take long to write would: the
      completion marker must wait for it.
    """

    ENV = "SGSD_FAULT_INJECT"

    SIGNALS = ("KILL", "STOP")

    def __init__(self, rank: int, step: int | None = None, save_delay: float | None = None,
                 signal: str | None = None) -> None:
        self.rank, self.step, self.save_delay, self.signal = rank, step, save_delay, signal

    @classmethod
    def from_env(cls) -> "FaultInjection | None":
        spec = os.environ.get(cls.ENV)
        if not spec:
            return None
        try:
            fields = dict(part.split("=", 1) for part in spec.split(","))
            step = int(fields["step"]) if "step" in fields else None
            delay = float(fields["save_delay"]) if "save_delay" in fields else None
            signal = fields.get("signal")
            if (step is None) == (delay is None) or (signal is not None and (step is None or signal not in cls.SIGNALS)):
                raise ValueError("one of step, save_delay")
            return cls(int(fields["rank"]), step, delay, signal)
        except (KeyError, ValueError):
            from sgsd.errors import ConfigError

            raise ConfigError(f"{cls.ENV}={spec!r}: expected rank=R,step=S[,signal=KILL|STOP] or "
                              "rank=R,save_delay=SECONDS") from None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.step is not None and rank() == self.rank and state.global_step + 1 == self.step:
            if self.signal is not None:
                os.kill(os.getpid(), getattr(signal, f"SIG{self.signal}"))
            raise RuntimeError(f"fault injected by {self.ENV} on rank {self.rank} at step {self.step}")

    def on_save(self, args, state, control, **kwargs):
        if self.save_delay is not None and rank() == self.rank:
            time.sleep(self.save_delay)
            late = RunDir(Path(args.output_dir)).checkpoint(state.global_step) / f"late_rank{self.rank}.txt"
            late.write_text(f"written {self.save_delay} s after the save\n")

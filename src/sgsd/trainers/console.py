"""The training console: one compact line per logging step instead of Hugging Face's 40-key dict.

    step 3/4  reward 0.250  loss 0.0004  helpful 0.92 harmful 0.08 neutral 0.00  support -0.0054  generate 0.4s teacher 1.4s update 2.3s

Only the main process prints. Every key stays in metrics.jsonl (`MetricsWriter`); the line shows what a
researcher watches while a run goes. Keys absent for a method (GRPO has no helpful fraction) are left out.
"""

from __future__ import annotations

from typing import Mapping

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


# (label, log key, format) in the order shown; log keys are the trainer's (before MetricsWriter renames)
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward", "train/reward_mean", "{:.3f}"),
    ("loss", "loss", "{:.4g}"),
    ("helpful", "sgsd/helpful_fraction", "{:.2f}"),
    ("harmful", "sgsd/harmful_fraction", "{:.2f}"),
    ("neutral", "sgsd/neutral_fraction", "{:.2f}"),
    ("support", "sgsd/support_mean", "{:.4f}"),
)
PHASES: tuple[tuple[str, str], ...] = (("generate", "time/generate_s"), ("teacher", "time/teacher_s"),
                                       ("update", "time/update_s"))


def format_step_line(step: int, max_steps: int, logs: Mapping[str, float]) -> str:
    """`step S/M  reward R  loss L  helpful H harmful X neutral N  support S  generate Gs teacher Ts update Us`."""
    logs = {**logs}
    if "train/reward_mean" not in logs and "reward" in logs:  # GRPO / OPSD: TRL's reward mean
        logs["train/reward_mean"] = logs["reward"]
    parts = [f"step {step}/{max_steps}"]
    values = [(label, fmt.format(logs[key])) for label, key, fmt in FIELDS if _is_number(logs.get(key))]
    groups = {"reward": [], "loss": [], "fractions": [], "support": []}
    for label, text in values:
        groups["fractions" if label in ("helpful", "harmful", "neutral") else label].append(f"{label} {text}")
    parts += [" ".join(group) for group in groups.values() if group]
    phases = [f"{label} {logs[key]:.1f}s" for label, key in PHASES if _is_number(logs.get(key))]
    if phases:
        parts.append(" ".join(phases))
    return "  ".join(parts)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StepLinePrinter(TrainerCallback):
    """Prints `format_step_line` at each logging step, on the main process, above the progress bar."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        line = format_step_line(state.global_step, state.max_steps, logs)
        if self.progress:
            tqdm.write(line)  # keeps the bar intact
        else:
            print(line, flush=True)


class _BarOnly(ProgressCallback):
    """Hugging Face's progress bar without its printing of every log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def use_step_lines(trainer: Trainer, progress: bool) -> None:
    """Replace the trainer's dict printing (ProgressCallback's or PrinterCallback's) with step lines
    above the progress bar; without progress (`--quiet`, the demo, benchmarks) nothing is printed."""
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarOnly())
        trainer.add_callback(StepLinePrinter(progress))

"""What a `sgsd train` run will do, decided before anything is written.

Rerunning into an existing run directory (`plan_rerun`):
- a run whose `final/` reached `max_steps` is complete: rerunning it does nothing;
- a larger `max_steps` continues it from its newest complete checkpoint to exactly that step;
- a smaller one is refused (a finished run is never shortened or silently extended past its end);
- an interrupted run resumes from its newest complete checkpoint; one whose newest checkpoint already
  is at `max_steps` only needs its `final/` written (Hugging Face's loop would take one more step).

`final/` carries `sgsd_complete.json` with the step it was saved at (written last, as in checkpoints).
`check_problems_per_step` refuses data too small for one optimizer step: TRL's sampler yields only
full generation batches, so such a run would "finish" with zero steps.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sgsd.errors import ConfigError, DataError, UserError
from sgsd.methods import method_spec
from sgsd.trainers.checkpoints import COMPLETE_MARKER, checkpoint_step


@dataclass(frozen=True)
class Rerun:
    """`start` (nothing to continue), `resume` (from `checkpoint`), `finish` (write final/ from
    `checkpoint`, which is at max_steps) or `complete` (final/ is at max_steps: nothing to do)."""

    action: Literal["start", "resume", "finish", "complete"]
    checkpoint: Path | None = None
    finished_step: int | None = None  # the step final/ was saved at, when final/ exists


def final_step(output_dir: Path, newest_checkpoint: Path | None) -> int | None:
    """The step `final/` was saved at; None without final/. A final/ written before the marker existed
    counts as saved at the newest complete checkpoint."""
    final = output_dir / "final"
    if not final.is_dir():
        return None
    marker = final / COMPLETE_MARKER
    if marker.is_file():
        try:
            return int(json.loads(marker.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{marker}: unreadable ({err}); cannot tell how far the run got") from None
    if newest_checkpoint is None:
        raise UserError(f"output directory {output_dir}: already holds a finished run (final/) of unknown length; "
                        "use another directory")
    return checkpoint_step(newest_checkpoint)


def plan_rerun(output_dir: Path, max_steps: int, newest_checkpoint: Path | None) -> Rerun:
    """Decide what training into `output_dir` up to `max_steps` means (see the module docstring)."""
    finished = final_step(output_dir, newest_checkpoint)
    reached = checkpoint_step(newest_checkpoint) if newest_checkpoint is not None else 0
    if finished is not None:
        if max_steps < finished:
            raise UserError(f"output directory {output_dir}: complete at step {finished}; max_steps {max_steps} is "
                            "smaller and a finished run is not shortened (choose another --output-dir)")
        if max_steps == finished:
            return Rerun("complete", newest_checkpoint, finished)
        if newest_checkpoint is None:
            raise UserError(f"output directory {output_dir}: complete at step {finished} with no checkpoint to "
                            f"continue from to step {max_steps} (choose another --output-dir)")
        return Rerun("resume", newest_checkpoint, finished)
    if newest_checkpoint is None:
        return Rerun("start")
    if reached > max_steps:
        raise UserError(f"output directory {output_dir}: holds {newest_checkpoint.name}, beyond max_steps "
                        f"{max_steps}; a run is not shortened (resume it with max_steps >= {reached} or choose "
                        "another --output-dir)")
    return Rerun("finish" if reached == max_steps else "resume", newest_checkpoint)


def write_final_from_checkpoint(checkpoint: Path, staging: Path) -> None:
    """The model (or LoRA adapter) and tokenizer of `checkpoint`, in Hugging Face format, into `staging`."""
    from sgsd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(checkpoint))
    load_model(str(checkpoint), tokenizer=tokenizer).save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))


def prompts_per_step(cfg: Any, world_size: int) -> int:
    """Distinct problems one generation batch draws: prompts_per_device x processes x accumulation
    steps (TRL generates once per optimizer step by default, `sgsd.trl_adapter.make_grpo_config`)."""
    return cfg.training.prompts_per_device * world_size * cfg.training.gradient_accumulation_steps


def check_problems_per_step(cfg: Any, num_problems: int) -> None:
    """Refuse a dataset with fewer problems than one optimizer step needs (it would train 0 steps)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    needed = prompts_per_step(cfg, world_size)
    if num_problems < needed:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"{cfg.data.path}: {num_problems} usable problems, but one training step needs {needed} "
                        f"(training.prompts_per_device={cfg.training.prompts_per_device}{processes} x "
                        f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps}); "
                        "add problems or lower those settings")


def check_deepspeed_config(path: str | None) -> dict[str, Any] | None:
    """`training.deepspeed` names a readable JSON object (checked before anything is written: Hugging Face
    would read it only while building the trainer, after the model has loaded)."""
    if not path:
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"training.deepspeed: {path}: {'not a file' if file.exists() else 'no such file'}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"training.deepspeed: {path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"training.deepspeed: {path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"training.deepspeed: {path}: expected a JSON object (a DeepSpeed config), got "
                        f"{type(config).__name__}")
    return config


def zero_stage(cfg: Any) -> int | None:
    """The DeepSpeed ZeRO stage this process will train under, None without DeepSpeed: from
    `training.deepspeed`, else from what `accelerate launch` with a DeepSpeed config exported (its
    `zero_stage`, or the JSON file it names)."""
    config = check_deepspeed_config(cfg.training.deepspeed)
    if config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage and stage.isdigit():
            return int(stage)
        file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        config = json.loads(Path(file).read_text(encoding="utf-8")) if file and Path(file).is_file() else {}
    if config is None:
        return None
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) if isinstance(stage, int) or str(stage).isdigit() else None


def check_engine(cfg: Any) -> None:
    """Refuse, before the model loads, what the training engine cannot run: under DeepSpeed ZeRO-3 the
    combinations the method's registry entry names (`MethodSpec.zero3_problems`); FSDP version 1 for a
    method with its own loss (`sgsd.trl_adapter.FSDP1_REFUSAL`; FSDP2 works)."""
    spec = method_spec(cfg.method)
    if zero_stage(cfg) == 3:
        for problem in spec.zero3_problems(cfg):
            raise ConfigError(problem)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") == "1" and getattr(spec.trainer_class(), "has_method_loss", False):
        from sgsd.trl_adapter import FSDP1_REFUSAL

        raise ConfigError(FSDP1_REFUSAL)


def check_trained(global_step: int, start_step: int) -> None:
    """A run that ended without a single optimizer step is an error, never "trained 0 steps"."""
    if global_step <= start_step:
        raise UserError(f"training ended at step {global_step} without taking a step (the data loader yielded no "
                        "full batch); no final model was written")


def announce(message: str) -> None:
    """One `sgsd: ...` line on stderr, from the main process only."""
    from sgsd.distributed import is_main_process

    if is_main_process():
        print(f"sgsd: {message}", file=sys.stderr, flush=True)

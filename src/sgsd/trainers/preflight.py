"""Checks of what a user gave `sgsd train`, made before anything is written (the run directory's own
lifecycle, from the lock to `final/`, is `sgsd.run_dir`).

`check_problems_per_step` refuses data too small for one optimizer step: TRL's sampler yields only
full generation batches, so such a run would "finish" with zero steps. `check_deepspeed_config` reads
the DeepSpeed file before the model loads (Hugging Face would read it only while building the trainer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sgsd.config import RunConfig
from sgsd.errors import ConfigError, DataError, UserError
from sgsd.methods import MethodSpec, method_spec
from sgsd.storage import JSONObject, decode_utf8, parse_json
from sgsd.trl_adapter import FSDP1_REFUSAL


def prompts_per_step(cfg: "RunConfig", world_size: int) -> int:
    """Distinct problems one generation batch draws: prompts_per_device x processes x accumulation
    steps (TRL generates once per optimizer step by default, `sgsd.trl_adapter.make_grpo_config`)."""
    return cfg.training.prompts_per_device * world_size * cfg.training.gradient_accumulation_steps


def check_problems_per_step(cfg: "RunConfig", num_problems: int) -> None:
    """Refuse a dataset with fewer problems than one optimizer step needs (it would train 0 steps)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    needed = prompts_per_step(cfg, world_size)
    if num_problems < needed:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"{cfg.data.path}: {num_problems} usable problems, but one training step needs {needed} "
                        f"(training.prompts_per_device={cfg.training.prompts_per_device}{processes} x "
                        f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps}); "
                        "add problems or lower those settings")


def check_deepspeed_config(path: str | None) -> JSONObject | None:
    """`training.deepspeed` names a readable JSON object (checked before anything is written: Hugging Face
    would read it only while building the trainer, after the model has loaded)."""
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"training.deepspeed: {path}: {'not a file' if file.exists() else 'no such file'}")
    try:
        config = parse_json(decode_utf8(file.read_bytes(), str(file)), f"training.deepspeed: {path}")
    except json.JSONDecodeError as err:
        raise UserError(f"training.deepspeed: {path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"training.deepspeed: {path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"training.deepspeed: {path}: expected a JSON object (a DeepSpeed config), got "
                        f"{type(config).__name__}")
    return config


def zero_stage(cfg: "RunConfig") -> int | None:
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


def check_engine(cfg: "RunConfig", spec: MethodSpec | None = None) -> None:
    """Refuse, before the model loads, what the training engine cannot run: under DeepSpeed ZeRO-3 the
    combinations the method's registry entry names (`MethodSpec.zero3_problems`); FSDP version 1 for a
    method with its own loss (`sgsd.trl_adapter.FSDP1_REFUSAL`; FSDP2 works)."""
    spec = spec or method_spec(cfg.method)
    if zero_stage(cfg) == 3:
        for problem in spec.zero3_problems(cfg):
            raise ConfigError(problem)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") == "1" and getattr(spec.trainer_class(), "has_method_loss", False):
        raise ConfigError(FSDP1_REFUSAL)


def teachers_record(requested: RunConfig, used: RunConfig) -> JSONObject:
    """What the run's provenance records about K: {"teachers": {"requested", "used"}} when it was capped."""
    if requested.sgsd.num_teachers == used.sgsd.num_teachers:
        return {}
    return {"teachers": {"requested": requested.sgsd.num_teachers, "used": used.sgsd.num_teachers}}

"""The trainer's side of a checkpoint: the project's own state in it, and the completion marker.

Hugging Face saves the weights, optimizer, scheduler and each rank's RNG state (and, under DeepSpeed,
each rank's ZeRO shard). After that save, on every rank, `CompletionMarker.on_save` waits until all
ranks are done, then the main process writes `sgsd_state.pt` (EMA weights, skill-bank observers'
state) and LAST the marker that lists every file (`sgsd.run_dir.write_complete_marker`). So a
checkpoint is never marked complete while another rank is still writing. On resume,
`restore_extra_state` reads `sgsd_state.pt` with `weights_only=True`: the state is plain dicts, lists,
numbers, strings and tensors, and a crafted pickle in a checkpoint someone else wrote cannot run code.
Which checkpoint to resume from is decided in `sgsd.run_dir`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from sgsd.errors import UserError
from sgsd.models import load_model, load_tokenizer
from sgsd.run_dir import EXTRA_STATE, RunDir


def restore_extra_state(trainer: "Trainer", checkpoint: Path) -> None:
    """EMA weights and skill-bank observers (online bank, attribution) as they were at `checkpoint`."""
    path = checkpoint / EXTRA_STATE
    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: holds objects other than tensors and plain data, refused unread (loading it could "
                        f"run code: {first[:160]}); resume only from checkpoints sgsd wrote") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        "the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of states, got {type(state).__name__}")
    if "ema" in state and getattr(trainer, "ema", None) is not None:
        trainer.ema.load_state_dict(state["ema"])
    for observer in getattr(trainer, "observers", []):
        if observer.name in state:
            observer.load_state_dict(state[observer.name], trainer)


# classes besides tensors and plain data that DeepSpeed's own checkpoint files hold (its loss scaler, the
# ZeRO stage enum, ...): the package's own code, allowed by name prefix when its shards are checked
TRUSTED_PICKLE_MODULES = ("deepspeed.",)


def check_engine_state(checkpoint: Path, rank: int) -> None:
    """Refuse, before DeepSpeed reads them, engine files in `checkpoint` (`global_step*/*.pt`, this rank's
    shard and the shared model states) that hold anything but tensors, plain data and DeepSpeed's own
    classes. DeepSpeed loads its files with `weights_only=False`, so a crafted pickle there could run
    code; a file that passes torch's restricted unpickler (with DeepSpeed's classes allowed) names no
    other callable, so the full unpickler then builds the same objects and nothing else."""
    for path in sorted(checkpoint.glob("global_step*/*.pt")):
        if "zero_pp_rank_" in path.name and not path.name.startswith(f"zero_pp_rank_{rank}_"):
            continue  # another rank's shard: that rank checks it
        allowed: list[Any] = []
        while True:
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                break
            except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, or RuntimeError for a bad file
                name = _unsupported_global(err)
                if name is None:
                    raise UserError(f"{path}: unreadable ({str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}); "
                                    "the checkpoint is damaged") from None
                trusted = _trusted_global(name)
                if trusted is None or trusted in allowed:
                    raise UserError(f"{path}: holds {name}, which is neither a tensor, plain data nor DeepSpeed's own; "
                                    "refused unread (loading it could run code); resume only from checkpoints sgsd "
                                    "wrote") from None
                allowed.append(trusted)


def _unsupported_global(err: Exception) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _trusted_global(name: str) -> Any:
    """The object `name` ("module.attr") names, when its module is one of TRUSTED_PICKLE_MODULES."""
    if not name.startswith(TRUSTED_PICKLE_MODULES):
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def write_extra_state(trainer: "Trainer", path: Path) -> None:
    """`sgsd_state.pt` (EMA, observers) into checkpoint `path`, atomically (main process)."""
    extra: dict[str, Any] = {}
    ema = getattr(trainer, "ema", None)
    if ema is not None:
        extra["ema"] = ema.state_dict()
    for observer in getattr(trainer, "observers", []):
        extra[observer.name] = observer.state_dict()
    if extra:
        staging = path / (EXTRA_STATE + ".tmp")
        torch.save(extra, staging)
        os.replace(staging, path / EXTRA_STATE)


class CompletionMarker(TrainerCallback):
    """After Hugging Face saved a checkpoint on every rank: wait for all ranks, then (main process) the
    extra state, the marker listing every file and the number of processes, and checkpoint rotation."""

    def __init__(self, trainer: "Trainer", save_total_limit: int | None) -> None:
        self.trainer = trainer
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()  # every rank's RNG state and ZeRO shard are on disk
        if state.is_world_process_zero:
            run_dir = RunDir(Path(args.output_dir))
            write_extra_state(self.trainer, run_dir.checkpoint(state.global_step))
            run_dir.mark_complete(state.global_step, accelerator.num_processes)
            run_dir.rotate(self.save_total_limit)


def write_final_from_checkpoint(checkpoint: Path, staging: Path) -> None:
    """The model (or LoRA adapter) and tokenizer of `checkpoint`, in Hugging Face format, into `staging`."""
    tokenizer = load_tokenizer(str(checkpoint))
    load_model(str(checkpoint), tokenizer=tokenizer).save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))

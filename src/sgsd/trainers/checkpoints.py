"""The checkpoint and resume lifecycle of a run directory.

A checkpoint is complete when `sgsd_complete.json` was written into it, LAST, after HF saved the
weights, optimizer, scheduler and RNG states and after `sgsd_state.pt` (EMA weights, skill-bank
observers' state) was written; a checkpoint without the marker was interrupted and is never resumed
from (it is reported, and removed once a newer checkpoint is complete). A run resumes from its newest
complete checkpoint, under the config it was started with (only the settings in RESUME_MAY_CHANGE may
differ). Files are written by the main process; every rank reads them on resume.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sgsd.config import DEPRECATED_KEYS, RunConfig, dump_config, flatten
from sgsd.errors import UserError

COMPLETE_MARKER = "sgsd_complete.json"


def checkpoint_step(path: Path) -> int:
    """The step of `checkpoint-<step>`."""
    return int(path.name.split("-")[-1])


def write_complete_marker(path: Path, step: int) -> None:
    """The marker written LAST into a checkpoint or final/'s staging folder: `{"step": step}`."""
    from sgsd.storage import atomic_write_json

    atomic_write_json(path / COMPLETE_MARKER, {"step": step})


def complete_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints sorted by step, incomplete ones). Complete = has the marker written last."""
    complete, broken = [], []
    for path in output_dir.glob("checkpoint-*"):
        if not path.is_dir() or not path.name.split("-")[-1].isdigit():
            continue
        (complete if (path / COMPLETE_MARKER).exists() else broken).append(path)
    return sorted(complete, key=checkpoint_step), sorted(broken, key=checkpoint_step)


def check_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None. `--no-resume` only starts into an empty directory."""
    if not output_dir.exists():
        return None
    if not output_dir.is_dir():
        raise UserError(f"output directory {output_dir}: exists and is not a directory")
    contents = [p for p in output_dir.iterdir()]
    if not resume:
        if contents:
            raise UserError(f"output directory {output_dir}: not empty; --no-resume starts only into an empty "
                            "directory (choose another --output-dir or drop --no-resume to resume)")
        return None
    complete, _ = complete_checkpoints(output_dir)
    return complete[-1] if complete else None  # a finished run (final/): see preflight.plan_rerun


# Settings a resumed run may change: how long it runs and how it saves and logs, not what it trains.
RESUME_MAY_CHANGE = frozenset({"training.max_steps", "training.output_dir", "training.save_steps",
                               "training.save_total_limit", "training.logging_steps", "training.report_to"})


def check_resume_config(output_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run under a config that differs from the one it was started with.

    Compares with the run's resolved_config.yaml (keys a newer version added are not compared);
    only the settings in RESUME_MAY_CHANGE may differ. Without this, resuming with another learning
    rate, method or model would silently splice two experiments into one run.
    """
    import yaml

    saved_path = output_dir / "resolved_config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
        for old, new in DEPRECATED_KEYS.items():  # a run started before a key moved
            if old in saved and new is not None:
                saved.setdefault(new, saved.pop(old))
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{saved_path}: unreadable ({str(err).splitlines()[0]}); cannot check the run's config "
                        "before resuming") from None
    current = flatten(yaml.safe_load(dump_config(cfg)))
    changed = [key for key, value in current.items()
               if key in saved and key not in RESUME_MAY_CHANGE and saved[key] != value]
    if changed:
        shown = "; ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"output directory {output_dir}: holds a run started with another config ({shown}{more}); "
                        "resume it with its own settings or choose another --output-dir")



STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES}


@contextmanager
def storage_errors(out: Path) -> Iterator[None]:
    """A full or read-only disk while saving becomes one line; complete checkpoints are left intact."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        complete, _ = complete_checkpoints(out)
        kept = f"latest complete checkpoint: {complete[-1].name}" if complete else "no complete checkpoint yet"
        raise UserError(f"cannot write {err.filename or out}: {err.strerror or err}; {kept} "
                        "(free space and rerun the same command to resume)") from err



def restore_extra_state(trainer: Any, checkpoint: Path) -> None:
    """EMA weights and skill-bank observers (online bank, attribution) as they were at `checkpoint`."""
    import torch

    path = checkpoint / "sgsd_state.pt"
    if not path.exists():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "ema" in state and getattr(trainer, "ema", None) is not None:
        trainer.ema.load_state_dict(state["ema"])
    for observer in getattr(trainer, "observers", []):
        if observer.name in state:
            observer.load_state_dict(state[observer.name], trainer)


def completion_marker(trainer: Any, save_total_limit: int | None) -> Any:
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        """Writes the extra state and then `sgsd_complete.json` into each checkpoint after HF saved it:
        a checkpoint without the marker was interrupted while being written and is never resumed from."""

        def on_save(self, args, state, control, **kwargs):
            write_extra_state(trainer, Path(args.output_dir) / f"checkpoint-{state.global_step}", state)
            if state.is_world_process_zero:
                rotate_checkpoints(Path(args.output_dir), save_total_limit)

    return CompletionMarker()


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; drop incomplete ones older than the newest complete."""
    complete, broken = complete_checkpoints(output_dir)
    if not complete:
        return
    newest = checkpoint_step(complete[-1])
    stale = [p for p in broken if checkpoint_step(p) < newest]
    if limit is not None and limit > 0:
        stale += complete[:-limit]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def write_extra_state(trainer: Any, path: Path, state: Any) -> None:
    """`sgsd_state.pt` (EMA, observers), then the completion marker, into checkpoint `path` (main process)."""
    import torch

    if not state.is_world_process_zero:
        return
    extra: dict[str, Any] = {}
    ema = getattr(trainer, "ema", None)
    if ema is not None:
        extra["ema"] = ema.state_dict()
    for observer in getattr(trainer, "observers", []):
        extra[observer.name] = observer.state_dict()
    if extra:
        staging = path / "sgsd_state.pt.tmp"
        torch.save(extra, staging)
        os.replace(staging, path / "sgsd_state.pt")
    write_complete_marker(path, state.global_step)

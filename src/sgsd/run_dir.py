"""The run directory: its layout, its one writer, and its lifecycle from the first check to `final/`.

One module for everything a command decides about an output directory, in the order `sgsd train`
meets it:

0. **Whose directory** (`check_output_dir`, `claimed_output_dir`): every writing command writes only into a
   new or empty directory, or over its own earlier output of the same settings, recognised by the record
   `sgsd_output.json` it writes there; anything else is refused in one line (docs/safety.md).
1. **Lock** (`DirectoryLock`): every command that writes into a run or output directory holds an
   exclusive OS lock on `<dir>/.sgsd.lock` for its whole life (on several processes, the main
   process holds it). The kernel releases it when the process dies, SIGKILL included, so a lock is
   never stale; a second command on the same directory stops at once, naming the holder's pid.
2. **Plan** (`plan_rerun`): what rerunning into an existing directory means: start, resume from the
   newest intact checkpoint, only write `final/` (`finish`), or nothing (`complete`).
3. **Check** (`check_resume_config`, `check_inputs_unchanged`): a resume runs under the config and on
   the inputs (data, skill bank: content hashes) it was started with.
4. **Checkpoints** (`write_complete_marker`, `intact_checkpoints`): a checkpoint is complete when its
   marker `sgsd_complete.json` was written LAST, by the main process, after every rank finished
   writing its files (`sgsd.trainers.checkpoints` waits for all ranks). The marker lists every file
   with its size and the number of processes that wrote it, so a resume refuses a checkpoint with a
   missing or truncated file, or one another number of processes wrote (each rank's RNG state and
   ZeRO shard), and falls back to the newest checkpoint that is intact.
5. **Publish** (`publish_final`): `final/` is written to a staging folder, completed with its marker
   and model card, and renamed into place.

Storage failures while writing (`storage_errors`) become one line naming the file, whichever exception
the writer raised. The run directory must be on a file system that every node sees (as Hugging Face's
resume needs): each rank reads the same files and reaches the same verdicts without a collective.
`RUN_FILES` lists what a run directory holds (the model card and the README show it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml

from sgsd.config import flatten
from sgsd.errors import DataError, UserError, shorten
from sgsd.storage import apply_plain_modes, atomic_write_json, atomic_write_text, storage_failure

# every name in a run directory, spelled here only (tests/test_layering.py refuses them elsewhere in src);
# code outside this module reaches them through `RunDir`
FINAL = "final"
STAGING = "final.tmp"
CHECKPOINT_PREFIX = "checkpoint-"
RESOLVED_CONFIG = "resolved_config.yaml"
METRICS = "metrics.jsonl"
ATTRIBUTION = "attribution.json"
EXTRA_STATE = "sgsd_state.pt"
PROVENANCE_PREFIX = "# provenance: "
COMPLETE_MARKER = "sgsd_complete.json"
LOCK_FILE = ".sgsd.lock"
OUTPUT_RECORD = "sgsd_output.json"

# name -> what it holds; in the order a reader needs them
RUN_FILES: dict[str, str] = {
    "README.md": "this model card: method, base model, data, skill bank, key settings, final metrics",
    "resolved_config.yaml": "every setting of the run, with the git revision, package versions, number of "
                            "processes, data counts and the content hashes of its data and skill bank",
    "metrics.jsonl": "one JSON object per logged step (train/reward_mean, sgsd/helpful_fraction, time/generate_s, ...)",
    "attribution.json": "SGSD: per skill-bank item, uses and helpful / harmful / neutral counts (sgsd skills report)",
    "skills/": "SGSD with online updates: bank_step_<N>.json snapshots and latest.json (the bank in use)",
    "checkpoint-<step>/": "resumable state every training.save_steps (model, optimizer, scheduler, each rank's RNG "
                          "state, sgsd_state.pt, and sgsd_complete.json, written last, listing every file)",
    "final/": "the trained model or LoRA adapter and tokenizer in Hugging Face format, with this card and "
              "sgsd_complete.json (the step it was saved at)",
    "sgsd_output.json": "the output record: which command wrote the directory, with its settings and their "
                        "SHA-256 (a rerun with other settings is refused)",
    ".sgsd.lock": "while a command writes into the directory: its lock (with its pid; removed when it ends)",
}


# -- 1. one writer -----------------------------------------------------------------------------------


class DirectoryLocked(UserError):
    """Another command holds the directory's lock."""


class DirectoryLock:
    """An exclusive lock on `<directory>/.sgsd.lock` (`flock`; `msvcrt.locking` on Windows).

    `DirectoryLock(path, what).acquire()` creates the directory if needed and takes the lock without
    waiting: held by another process, it raises `DirectoryLocked` naming the directory and the holder's
    pid (written into the lock file). A file system that cannot lock (some network file systems)
    raises a `UserError` saying so: one writer is not silently given up. `release()` removes the lock
    file and unlocks; when this lock created the directory and nothing else was written into it, the
    directory is removed too, so a command refused by its input checks leaves nothing behind.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "output directory") -> None:
        self.directory = Path(directory).expanduser()
        self.what = what
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> "DirectoryLock":
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.what} {self.directory}: exists and is not a directory")
        self._created = not self.directory.exists()
        for _ in range(10):  # another command may unlink the file between our open and our lock: retry
            fd = self._open()
            try:
                _lock(fd)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise _in_use(self.directory, self.what, holder) from None
            except OSError as err:
                os.close(fd)
                if self._created:
                    self.path.unlink(missing_ok=True)
                self._undo_create()
                raise UserError(f"{self.what} {self.directory}: cannot lock {LOCK_FILE} ({err.strerror or err}); this "
                                "file system does not support locks, so two commands could write the directory at "
                                "once: use a local directory") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its holder removed on release: lock the one at the path now
        else:
            raise UserError(f"{self.what} {self.directory}: {LOCK_FILE} keeps changing; another command is starting "
                            "and stopping there")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{self.what} {self.directory}: cannot create {LOCK_FILE} ({err.strerror or err})") from None

    def release(self) -> None:
        """Unlock and remove the lock file (removed while still held, so no command ever holds a lock
        on a file that is no longer at the path: `acquire` checks that it is)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # Windows cannot remove an open file: it stays, unlocked
            pass
        os.close(fd)
        if self._created and not any(self.directory.iterdir()):
            self._undo_create()

    def _undo_create(self) -> None:
        if self._created:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def locked(directory: str | os.PathLike, what: str = "output directory", *, holder: bool = True) -> Iterator[None]:
    """Hold `DirectoryLock(directory)` inside the block when `holder` (on several processes: the main
    process only; the others run inside it unlocked)."""
    if not holder:
        yield
        return
    with DirectoryLock(directory, what):
        yield


@contextmanager
def waiting_lock(path: str | os.PathLike, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path`, waiting for its holder if another process has it: for a
    shared cache entry that one process builds while the others wait to read it (`DirectoryLock` refuses
    instead). `on_wait(pid)` is called once, with the holder's pid ("" if unknown), before waiting. The lock
    file stays (removing it would let a third process lock a new file beside a waiter's old one)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock(fd)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(_read_pid(fd))
            _lock(fd, wait=True)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _in_use(directory: Path, what: str, holder: str) -> DirectoryLocked:
    return DirectoryLocked(f"{what} {directory}: in use by another sgsd command{f' (pid {holder})' if holder else ''}; "
                           "wait for it to finish or choose another directory")


def refuse_if_locked(directory: Path, what: str) -> None:
    """Raise `DirectoryLocked` when another command holds `directory`'s lock (creates nothing)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR)
    except OSError:
        return
    try:
        _lock(fd)
    except BlockingIOError:
        raise _in_use(directory, what, _read_pid(fd)) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # releases our probe lock, if we got it


def _lock(fd: int, *, wait: bool = False) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError as err:
                if not wait:
                    raise BlockingIOError(str(err)) from None
            time.sleep(0.5)
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def directory_entries(directory: Path) -> list[Path]:
    """What a directory holds besides its lock file."""
    return [p for p in directory.iterdir() if p.name != LOCK_FILE]


# -- 0. the output-directory rule: whose directory is it? ------------------------------------------------


def refuse_special_dir(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """`directory` (expanded), unless it is the file-system root, the home directory or the working
    directory itself: a command would write its files among everything else there."""
    path = Path(directory).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:
        raise UserError(f"{what} {shorten(str(path))}: cannot resolve it ({err})") from None
    special = {Path.home().resolve(): "the home directory", Path.cwd().resolve(): "the working directory"}
    if resolved.parent == resolved or resolved in special:
        name = "the file-system root" if resolved.parent == resolved else special[resolved]
        raise UserError(f"{what} {shorten(str(path))}: is {name}; give a new directory for this command's files "
                        "(e.g. runs/NAME)")
    return path


def settings_digest(settings: dict[str, Any], may_differ: frozenset[str] = frozenset()) -> str:
    """SHA-256 of the settings that decide a command's output (`may_differ` left out)."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in may_differ}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str, allow_nan=True).encode("utf-8")).hexdigest()


def check_output_dir(directory: str | os.PathLike, kind: str, settings: dict[str, Any], *,
                     what: str = "output directory", may_differ: frozenset[str] = frozenset()) -> str:
    """The one output-directory rule of every writing command (`sgsd train`, `eval`, `eval compare`, `skills
    build`, `skills probe`, `skills report`, `demo`, `compare`, `models import-gguf`); reads only. A command writes into a
    directory that does not exist yet ("new"), that is empty ("empty", its lock file aside), or that holds its
    own earlier output of the same `kind` and `settings` ("own"), recognised by the record `sgsd_output.json`
    it wrote there (`settings`: flat {name: value}; keys in `may_differ` may change between reruns, e.g. a
    training run's max_steps). Anything else is a one-line `UserError` naming what is in the way: files the
    command did not write, another command's output, or its own output made with other settings (a rerun
    with other settings never writes over earlier results). The root, the home directory and the working
    directory are refused (`refuse_special_dir`)."""
    path = refuse_special_dir(directory, what)
    shown = shorten(str(path))
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise UserError(f"{what} {shown}: exists and is not a directory")
    try:
        # the record while the main process writes it (the atomic writer's temporary file): another rank of
        # the same launch checks the directory at that moment, and it is this command's own
        entries = [p for p in directory_entries(path)
                   if not (p.name.startswith(f".{OUTPUT_RECORD}.") and p.name.endswith(".tmp"))]
    except OSError as err:
        raise UserError(f"{what} {shown}: cannot list it ({err.strerror or err})") from None
    if not entries:
        return "empty"
    record = read_output_record(path, what)
    if record is None:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
        listed = ", ".join(shorten(n, 40) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{what} {shown}: holds files that `sgsd {kind}` did not write ({listed}); nothing there is "
                        "changed: choose a new or empty directory")
    if record.get("kind") != kind:
        raise UserError(f"{what} {shown}: holds the output of `sgsd {shorten(str(record.get('kind')), 40)}`; "
                        f"`sgsd {kind}` writes only into a new or empty directory or over its own: choose another")
    if record.get("settings_sha256") != settings_digest(settings, may_differ):
        saved = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        changed = [k for k in sorted(set(saved) | set(settings))
                   if k not in may_differ and json.dumps(saved.get(k), sort_keys=True, default=str)
                   != json.dumps(settings.get(k), sort_keys=True, default=str)]
        listed = "; ".join(f"{k}: {shorten(repr(saved.get(k)), 40)} -> {shorten(repr(settings.get(k)), 40)}"
                           for k in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"{what} {shown}: holds an earlier `sgsd {kind}` made with other settings "
                        f"({listed or 'another version'}); its results are kept: give a new directory for these "
                        "settings, or rerun with the earlier ones")
    return "own"


def read_output_record(directory: Path, what: str = "output directory") -> dict[str, Any] | None:
    """The directory's `sgsd_output.json` (None without one)."""
    path = directory / OUTPUT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes()[:1_000_000].decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{what} {shorten(str(directory))}: its {OUTPUT_RECORD} is unreadable "
                        f"({shorten(str(err), 80)}); choose a new directory") from None
    return record if isinstance(record, dict) else {}


def write_output_record(directory: Path, kind: str, settings: dict[str, Any],
                        may_differ: frozenset[str] = frozenset()) -> None:
    """Record whose output `directory` holds (kind, settings and their digest): `check_output_dir` reads it."""
    atomic_write_json(directory / OUTPUT_RECORD, {"kind": kind, "settings_sha256": settings_digest(settings, may_differ),
                                                  "settings": json.loads(json.dumps(settings, default=str))})


def open_output_dir(directory: str | os.PathLike, kind: str, settings: dict[str, Any], *,
                    what: str = "output directory") -> Path:
    """`directory` checked under the output-directory rule, created if needed and recorded as `sgsd kind`'s
    (for code that runs inside a command already holding the lock, as the demo and the sweep do)."""
    out = Path(directory).expanduser()
    check_output_dir(out, kind, settings, what=what)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None
    write_output_record(out, kind, settings)
    return out


@contextmanager
def claimed_output_dir(directory: str | os.PathLike, kind: str, settings: dict[str, Any], *,
                       what: str = "output directory", may_differ: frozenset[str] = frozenset(),
                       holder: bool = True) -> Iterator[Path]:
    """Hold `directory` for `sgsd kind` under the output-directory rule (`check_output_dir`): refuse it
    before anything is created there, else lock it (`DirectoryLock`), write the record and run the block.
    When the block wrote nothing (its input checks failed), the record goes again, and the directory too
    if this created it. `holder=False` (the other processes of a launch): the check only; the main process
    locks and writes. Yields the directory."""
    path = refuse_special_dir(directory, what)
    if not holder:
        check_output_dir(path, kind, settings, what=what, may_differ=may_differ)
        yield path
        return
    try:
        check_output_dir(path, kind, settings, what=what, may_differ=may_differ)  # before the lock creates anything
    except UserError:
        refuse_if_locked(path, what)  # a command writing there now: say that rather than what it has written
        raise
    with DirectoryLock(path, what):
        check_output_dir(path, kind, settings, what=what, may_differ=may_differ)  # again, under the lock
        record = path / OUTPUT_RECORD
        earlier = record.read_bytes() if record.is_file() else None
        write_output_record(path, kind, settings, may_differ)
        try:
            yield path
        except BaseException:
            if earlier is not None:  # a refused or failed rerun leaves the record as it found it
                from sgsd.storage import atomic_write_bytes

                atomic_write_bytes(record, earlier)
            raise
        finally:
            if [p.name for p in directory_entries(path)] == [OUTPUT_RECORD]:
                record.unlink(missing_ok=True)


# -- the run's record ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A run's resolved config (nested dict, as in the YAML) and provenance (git revision, versions, the
    number of processes, data counts, input hashes)."""

    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str, default: Any = None) -> Any:
        value: Any = self.config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value


def read_run_record(run_dir: str | Path) -> RunRecord | None:
    """The run's record, or None when it has no resolved_config.yaml."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        config = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    provenance: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(PROVENANCE_PREFIX):
            try:
                provenance = json.loads(line[len(PROVENANCE_PREFIX):])
            except json.JSONDecodeError:
                provenance = {}
    return RunRecord(config if isinstance(config, dict) else {}, provenance if isinstance(provenance, dict) else {})


def resolved_config_text(config_yaml: str, provenance: dict[str, Any]) -> str:
    """resolved_config.yaml: the config, then one `# provenance: {json}` line."""
    return config_yaml + "\n" + PROVENANCE_PREFIX + json.dumps(provenance, indent=None) + "\n"


# -- 2. plan: what rerunning into the directory means -------------------------------------------------


def checkpoint_step(path: Path) -> int:
    """The step of `checkpoint-<step>`."""
    return int(path.name.split("-")[-1])


@dataclass(frozen=True)
class Rerun:
    """`start` (nothing to continue), `resume` (from `checkpoint`), `finish` (write final/ from
    `checkpoint`, which is at max_steps) or `complete` (final/ is at max_steps: nothing to do)."""

    action: Literal["start", "resume", "finish", "complete"]
    checkpoint: Path | None = None
    finished_step: int | None = None  # the step final/ was saved at, when final/ exists
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over, each with why ("checkpoint-4: ... missing")


def check_no_resume(output_dir: Path, resume: bool) -> None:
    """`--no-resume` starts only into an empty directory (its lock file and record aside)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"output directory {output_dir}: exists and is not a directory")
    if not resume and [p for p in directory_entries(output_dir) if p.name != OUTPUT_RECORD]:
        raise UserError(f"output directory {output_dir}: not empty; --no-resume starts only into an empty "
                        "directory (choose another --output-dir or drop --no-resume to resume)")


def plan_rerun(output_dir: Path, max_steps: int, world_size: int) -> Rerun:
    """Decide what training into `output_dir` up to `max_steps` with `world_size` processes means.

    - a run whose `final/` reached `max_steps` is complete: rerunning it does nothing;
    - a larger `max_steps` continues it from its newest intact checkpoint to exactly that step;
    - a smaller one is refused (a finished run is never shortened or silently extended past its end);
    - an interrupted run resumes from its newest intact checkpoint; one whose newest checkpoint already
      is at `max_steps` only needs its `final/` written (Hugging Face's loop would take one more step).
    A checkpoint that is complete but not intact for `world_size` (a file missing or truncated, written
    by another number of processes) is passed over for an older intact one (`Rerun.skipped` says
    why); when none is intact, the run is refused rather than restarted.
    """
    if not output_dir.is_dir():
        return Rerun("start")
    scan = scan_checkpoints(output_dir)
    newest_complete = scan.complete[-1] if scan.complete else None
    finished = final_step(output_dir, newest_complete)
    if finished is not None:
        if max_steps < finished:
            raise UserError(f"output directory {output_dir}: complete at step {finished}; max_steps {max_steps} is "
                            "smaller and a finished run is not shortened (choose another --output-dir)")
        if max_steps == finished:
            return Rerun("complete", newest_complete, finished)
    if newest_complete is None:
        if finished is not None:
            raise UserError(f"output directory {output_dir}: complete at step {finished} with no checkpoint to "
                            f"continue from to step {max_steps} (choose another --output-dir)")
        return Rerun("start")
    reached = checkpoint_step(newest_complete)
    if finished is None and reached > max_steps:
        raise UserError(f"output directory {output_dir}: holds {newest_complete.name}, beyond max_steps "
                        f"{max_steps}; a run is not shortened (resume it with max_steps >= {reached} or choose "
                        "another --output-dir)")
    if finished is None and reached == max_steps:
        problem = checkpoint_problem(newest_complete, world_size=None)  # final/ needs the weights, not the RNG
        if problem is None:
            return Rerun("finish", newest_complete)
    skipped: list[str] = []
    for checkpoint in reversed(scan.complete):
        problem = checkpoint_problem(checkpoint, world_size)
        if problem is None:
            return Rerun("resume", checkpoint, finished, tuple(skipped))
        skipped.append(f"{checkpoint.name}: {problem}")
    raise UserError(f"output directory {output_dir}: no intact checkpoint to resume from ({skipped[0]}"
                    f"{f'; and {len(skipped) - 1} older' if len(skipped) > 1 else ''}); rerun with the number of "
                    "processes it was written by, or choose another --output-dir")


def final_step(output_dir: Path, newest_checkpoint: Path | None) -> int | None:
    """The step `final/` was saved at; None without final/. A final/ written before the marker existed
    counts as saved at the newest complete checkpoint."""
    final = output_dir / FINAL
    if not final.is_dir():
        return None
    marker = read_marker(final)
    if marker is not None:
        return marker.step
    if newest_checkpoint is None:
        raise UserError(f"output directory {output_dir}: already holds a finished run (final/) of unknown length; "
                        "use another directory")
    return checkpoint_step(newest_checkpoint)


# -- 3. check: same config, same inputs -------------------------------------------------------------


# Settings a resumed run may change: how long it runs and how it saves and logs, not what it trains.
RESUME_MAY_CHANGE = frozenset({"training.max_steps", "training.output_dir", "training.save_steps",
                               "training.save_total_limit", "training.logging_steps", "training.report_to",
                               "distributed.peer_timeout_s"})


def check_resume_config(output_dir: Path, config_yaml: str) -> None:
    """Refuse to resume a run under a config that differs from the one it was started with.

    `config_yaml`: the new run's resolved config (`sgsd.config.dump_config`). Compared with the run's
    resolved_config.yaml (keys a newer version added are not compared); only the settings in
    RESUME_MAY_CHANGE may differ. Without this, resuming with another learning rate, method or model
    would silently splice two experiments into one run.
    """
    saved_path = output_dir / RESOLVED_CONFIG
    if not saved_path.exists():
        return
    try:
        saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{saved_path}: unreadable ({str(err).splitlines()[0]}); cannot check the run's config "
                        "before resuming") from None
    current = flatten(yaml.safe_load(config_yaml))
    changed = [key for key, value in current.items()
               if key in saved and key not in RESUME_MAY_CHANGE and saved[key] != value]
    if changed:
        shown = "; ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"output directory {output_dir}: holds a run started with another config ({shown}{more}); "
                        "resume it with its own settings or choose another --output-dir")


def check_inputs_unchanged(output_dir: Path, inputs: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume when the content of an input (data, skill bank) differs from what the run
    recorded at its start (`provenance.inputs`: name -> {"source", "sha256", ...}). A run recorded
    before inputs were hashed is not compared."""
    record = read_run_record(output_dir)
    recorded = (record.provenance.get("inputs") if record else None) or {}
    changed = [name for name, now in inputs.items()
               if isinstance(recorded.get(name), dict) and recorded[name].get("sha256") != now.get("sha256")]
    if changed:
        name = changed[0]
        raise UserError(f"output directory {output_dir}: its {name} ({inputs[name].get('source')}) changed since the "
                        f"run started (sha256 {str(recorded[name].get('sha256'))[:12]} -> "
                        f"{str(inputs[name].get('sha256'))[:12]}); restore it or choose another --output-dir")


# -- 4. checkpoints: complete means every rank's files, all there -------------------------------------


@dataclass(frozen=True)
class Marker:
    """`sgsd_complete.json`: the step; the processes that wrote the checkpoint and every file with its
    size (absent in markers of older versions, which recorded only the step)."""

    step: int
    world_size: int | None = None
    files: dict[str, int] | None = None


def write_complete_marker(folder: Path, step: int, world_size: int | None = None) -> None:
    """Write the marker LAST into a checkpoint or final/'s staging folder, listing every file in it,
    after giving its files the umask's mode (safetensors writes its weights 0600)."""
    apply_plain_modes(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    atomic_write_json(folder / COMPLETE_MARKER,
                      {"step": step, **({"world_size": world_size} if world_size else {}), "files": files})


def read_marker(folder: Path) -> Marker | None:
    """The folder's marker, or None without one; an unreadable marker is a one-line error."""
    path = folder / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        step = int(data["step"])
        world = data.get("world_size")
        files = data.get("files")
        if files is not None and not (isinstance(files, dict) and all(isinstance(v, int) for v in files.values())):
            raise ValueError("'files' is not a name -> size mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable ({err}); cannot tell how far the run got") from None
    return Marker(step, int(world) if isinstance(world, int) else None, files)


@dataclass(frozen=True)
class CheckpointScan:
    complete: list[Path]  # with a marker, by step
    incomplete: list[Path]  # without one (interrupted while being written), by step


def scan_checkpoints(output_dir: Path) -> CheckpointScan:
    complete, incomplete = [], []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if not path.is_dir() or not path.name.split("-")[-1].isdigit():
            continue
        (complete if (path / COMPLETE_MARKER).is_file() else incomplete).append(path)
    return CheckpointScan(sorted(complete, key=checkpoint_step), sorted(incomplete, key=checkpoint_step))


def rank_files(world_size: int, checkpoint: Path) -> list[str]:
    """The files each of `world_size` processes writes into a checkpoint: its RNG state (Hugging Face
    names a single process's `rng_state.pth`) and, under DeepSpeed ZeRO, its optimizer shard."""
    needed = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    for zero_dir in sorted(p for p in checkpoint.glob("global_step*") if p.is_dir()):
        needed += [f"{zero_dir.name}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return needed


def checkpoint_problem(checkpoint: Path, world_size: int | None) -> str | None:
    """Why `checkpoint` cannot be resumed by `world_size` processes (None: it can). Checks the files its
    marker lists (present, same size), the number of processes that wrote it and every rank's files;
    `world_size=None` checks the files only (enough to write final/ from it)."""
    marker = read_marker(checkpoint)
    if marker is None:
        return f"no {COMPLETE_MARKER} (interrupted while being written)"
    for name, size in (marker.files or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (damaged)"
    if world_size is None:
        return None
    if marker.world_size is not None and marker.world_size != world_size:
        return f"written by {marker.world_size} processes, this run has {world_size}"
    for name in rank_files(world_size, checkpoint):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    return None


def set_aside(checkpoints: list[Path]) -> list[Path]:
    """Rename checkpoints a resume passes over to `<name>.damaged` (kept for inspection, never resumed or
    rotated; the run writes those steps again). Main process."""
    moved = []
    for path in checkpoints:
        target = path.with_name(path.name + ".damaged")
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        moved.append(target)
    return moved


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; drop incomplete ones older than the newest complete."""
    scan = scan_checkpoints(output_dir)
    if not scan.complete:
        return
    newest = checkpoint_step(scan.complete[-1])
    stale = [p for p in scan.incomplete if checkpoint_step(p) < newest]
    if limit is not None and limit > 0:
        stale += scan.complete[:-limit]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


# -- 5. publish final/ ---------------------------------------------------------------------------------


def publish_final(output_dir: Path, staging: Path, step: int, *, complete: Callable[[Path], None]) -> Path:
    """Complete final/'s staging folder (`complete(staging)` adds what the caller adds, e.g. the model
    card; the step marker goes last) and move it into place. Main process."""
    complete(staging)
    write_complete_marker(staging, step)
    final = output_dir / FINAL
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def fresh_staging(output_dir: Path) -> Path:
    """An empty `final.tmp/` (what an interrupted publish left is removed). Main process."""
    staging = output_dir / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    return staging


# -- storage failures -----------------------------------------------------------------------------------


@contextmanager
def storage_errors(output_dir: Path) -> Iterator[None]:
    """A full or read-only disk while saving becomes one line (whichever exception the writer raised:
    an OSError, torch's "file write failed", safetensors' IoError); complete checkpoints stay intact."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a storage failure
        failure = storage_failure(err)
        if failure is None:
            raise
        where, reason = failure
        complete = scan_checkpoints(output_dir).complete if output_dir.is_dir() else []
        kept = f"latest complete checkpoint: {complete[-1].name}" if complete else "no complete checkpoint yet"
        raise UserError(f"cannot write {where or output_dir}: {reason}; {kept} "
                        "(free space and rerun the same command to resume)") from err


# -- the run directory as one object ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """A training run's directory: where each of its files is, and the lifecycle steps above bound to it.

    `RunDir(out).final`, `.staging`, `.checkpoint(step)`, `.metrics`, ... name its files (the names are
    spelled in this module only); `.plan(...)`, `.claim(...)`, `.publish(...)` and the other methods are the
    module's functions for this directory. Trainers, the demo, `sgsd compare` and model loading use it.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- names
    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def staging(self) -> Path:
        """Where final/ is written before it is renamed into place."""
        return self.path / STAGING

    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}{step}"

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        """The step of a `checkpoint(step)` folder."""
        return checkpoint_step(checkpoint)

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def attribution(self) -> Path:
        return self.path / ATTRIBUTION

    @property
    def resolved_config(self) -> Path:
        return self.path / RESOLVED_CONFIG

    @property
    def is_finished(self) -> bool:
        """It holds a published final/."""
        return self.final.is_dir()

    # -- 0. whose directory, 1. one writer
    def check(self, kind: str, settings: dict[str, Any], *, may_differ: frozenset[str] = frozenset()) -> str:
        return check_output_dir(self.path, kind, settings, may_differ=may_differ)

    def claim(self, kind: str, settings: dict[str, Any], *, may_differ: frozenset[str] = frozenset(),
              holder: bool = True) -> AbstractContextManager[Path]:
        """`claimed_output_dir` for this directory (a context manager)."""
        return claimed_output_dir(self.path, kind, settings, may_differ=may_differ, holder=holder)

    def write_record(self, kind: str, settings: dict[str, Any], may_differ: frozenset[str] = frozenset()) -> None:
        write_output_record(self.path, kind, settings, may_differ)

    def lock(self, what: str = "output directory") -> DirectoryLock:
        return DirectoryLock(self.path, what)

    # -- 2. plan, 3. check
    def check_no_resume(self, resume: bool) -> None:
        check_no_resume(self.path, resume)

    def plan(self, max_steps: int, world_size: int) -> Rerun:
        return plan_rerun(self.path, max_steps, world_size)

    def check_resume_config(self, config_yaml: str) -> None:
        check_resume_config(self.path, config_yaml)

    def check_inputs_unchanged(self, inputs: dict[str, dict[str, Any]]) -> None:
        check_inputs_unchanged(self.path, inputs)

    def write_resolved_config(self, config_yaml: str, provenance: dict[str, Any]) -> None:
        atomic_write_text(self.resolved_config, resolved_config_text(config_yaml, provenance))

    # -- 4. checkpoints
    def checkpoints(self) -> CheckpointScan:
        return scan_checkpoints(self.path)

    def mark_complete(self, step: int, world_size: int | None = None) -> Path:
        """Write checkpoint(step)'s marker (last); returns the checkpoint."""
        checkpoint = self.checkpoint(step)
        write_complete_marker(checkpoint, step, world_size)
        return checkpoint

    def rotate(self, limit: int | None) -> None:
        rotate_checkpoints(self.path, limit)

    def set_aside(self, checkpoints: list[Path]) -> list[Path]:
        return set_aside(checkpoints)

    # -- 5. publish
    def fresh_staging(self) -> Path:
        return fresh_staging(self.path)

    def publish(self, staging: Path, step: int, *, complete: Callable[[Path], None]) -> Path:
        return publish_final(self.path, staging, step, complete=complete)

    def storage_errors(self) -> AbstractContextManager[None]:
        """`storage_errors` for this directory (a context manager)."""
        return storage_errors(self.path)

"""The run directory's lifecycle (`sgsd.run_dir`): one writer, complete means every rank's files, intact
checkpoints, the same inputs on resume, storage failures named, `final/` published, and a checkpoint that
cannot run code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgsd.cli import main
from sgsd.errors import UserError
from sgsd.run_dir import (
    COMPLETE_MARKER,
    LOCK_FILE,
    DirectoryLock,
    DirectoryLocked,
    checkpoint_problem,
    plan_rerun,
    write_complete_marker,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("SGSD_FAULT_INJECT", None)
    return env


# -- one writer ------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from sgsd.run_dir import DirectoryLock
lock = DirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_command_on_a_locked_directory_stops_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        started = time.monotonic()
        code = main(["train", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and time.monotonic() - started < 30  # no model was loaded, nothing trained
        assert err == (f"sgsd: error: output directory {out}: in use by another sgsd command (pid {holder.pid}); "
                       "wait for it to finish or choose another directory")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the holder's lock only
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released the kernel's lock: the stale file is no obstacle
    with DirectoryLock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert out.is_dir() and list(out.iterdir()) == []  # its file is removed; the folder was not this lock's


@pytest.mark.parametrize("command,what", [
    (["eval", "--model", "tiny", "--benchmarks", "builtin:tiny-math", "--limit", "2", "--k", "1",
      "--max-new-tokens", "4", "--quiet"], "eval: output directory"),
    (["demo", "--preset", "smoke", "--quiet"], "demo: output directory"),
    (["compare", "--configs", str(TINY / "grpo.yaml"), str(TINY / "sgsd.yaml"), "--max-steps", "1", "--quiet"],
     "compare: output directory"),
    (["skills", "build", "--problems", "builtin:tiny-math", "--max-problems", "2", "--policy", "tiny"],
     "skills build: output directory"),
    (["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--rollouts", "1"], "skills probe: output directory"),
])
def test_every_command_that_writes_an_output_directory_takes_its_lock(tmp_path, capsys, command, what):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        code = main([*command, "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and err == (f"sgsd: error: {what} {out}: in use by another sgsd command (pid {holder.pid}); "
                                 "wait for it to finish or choose another directory")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_lock_created_folder_is_removed_when_nothing_was_written(tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["train", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--quiet",
                 "data.path=" + str(tmp_path / "missing.jsonl")])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_a_file_system_without_locks_is_reported_not_ignored(tmp_path, monkeypatch):
    import errno

    from sgsd import run_dir

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir, "_lock", no_locks)
    with pytest.raises(UserError, match="cannot lock .sgsd.lock \\(No locks available\\); this file system does not "
                                        "support locks"):
        DirectoryLock(tmp_path / "nfs").acquire()
    assert not (tmp_path / "nfs").exists()


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with DirectoryLock(tmp_path / "d"):
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()}"):
            DirectoryLock(tmp_path / "d").acquire()


@pytest.mark.slow
def test_two_trainings_started_together_one_runs_the_other_is_refused(tmp_path):
    """The reported defect: two `sgsd train` into one folder both 'finished' and left a final/ without
    weights. Now one trains and its final/ loads; the other exits 2 naming the folder and the pid."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sgsd.cli", "train", "--config", str(TINY / "sgsd.yaml"), "--output-dir",
               str(out), "--quiet", "--max-steps", "4", "training.save_steps=2"]
    grpo = [sys.executable, "-m", "sgsd.cli", "train", "--config", str(TINY / "grpo.yaml"), "--output-dir",
            str(out), "--quiet"]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).exists() or not (out / LOCK_FILE).read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # the first run holds the lock; frozen (SIGSTOP) until the second has been answered, so the race is won by
    # the second command however fast the first would otherwise finish (a timing-free race)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(grpo, capture_output=True, text=True, env=_env(), timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 2
    assert f"output directory {out}: in use by another sgsd command (pid {first.pid})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert "method: sgsd" in (out / "resolved_config.yaml").read_text()
    from sgsd.models import load_model, load_tokenizer

    load_model(str(out / "final"), tokenizer=load_tokenizer(str(out / "final")))
    assert not (out / LOCK_FILE).exists()


# -- complete means every file, intact ----------------------------------------------------------------


def _checkpoint(root: Path, step: int, world_size: int, *, zero: bool = False) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 64)
    names = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    if zero:
        (path / f"global_step{step}").mkdir()
        names += [f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    for name in names:
        (path / name).write_bytes(b"r" * 8)
    write_complete_marker(path, step, world_size)
    return path


def test_the_marker_lists_every_file_with_its_size_and_the_writers(tmp_path):
    path = _checkpoint(tmp_path, 2, 2, zero=True)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2 and marker["world_size"] == 2
    assert marker["files"] == {"global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt": 8,
                               "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt": 8,
                               "model.safetensors": 64, "rng_state_0.pth": 8, "rng_state_1.pth": 8}
    assert checkpoint_problem(path, 2) is None


@pytest.mark.parametrize("damage,reason", [
    (lambda p: (p / "model.safetensors").write_bytes(b"w" * 10), "model.safetensors has 10 bytes, 64 were written"),
    (lambda p: (p / "rng_state_1.pth").unlink(), "rng_state_1.pth is missing"),
    (lambda p: (p / "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
     "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
])
def test_a_damaged_checkpoint_is_passed_over_for_the_newest_intact_one(tmp_path, damage, reason):
    _checkpoint(tmp_path, 2, 2, zero=True)
    newest = _checkpoint(tmp_path, 4, 2, zero=True)
    damage(newest)
    rerun = plan_rerun(tmp_path, 6, 2)
    assert rerun.action == "resume" and rerun.checkpoint == tmp_path / "checkpoint-2"
    assert rerun.skipped == (f"checkpoint-4: {reason}" + (" (damaged)" if "bytes" in reason else ""),)


def test_a_checkpoint_written_by_another_number_of_processes_is_refused_in_one_line(tmp_path):
    _checkpoint(tmp_path, 2, 2)
    with pytest.raises(UserError) as err:
        plan_rerun(tmp_path, 4, 1)
    assert "no intact checkpoint to resume from (checkpoint-2: written by 2 processes, this run has 1)" in str(err.value)
    assert "\n" not in str(err.value)
    assert plan_rerun(tmp_path, 4, 2).checkpoint == tmp_path / "checkpoint-2"


def test_a_marker_of_an_older_version_counts_when_the_rank_files_are_there(tmp_path):
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    (path / COMPLETE_MARKER).write_text('{"step": 3}')
    assert checkpoint_problem(path, 1) == "rng_state.pth is missing"
    (path / "rng_state.pth").write_bytes(b"r")
    assert plan_rerun(tmp_path, 5, 1).checkpoint == path


def _train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgsd.cli", "train", "--config", str(TINY / "sgsd.yaml"),
                           "--output-dir", str(out), "--quiet", *args], capture_output=True, text=True, env=_env(),
                          timeout=600)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A tiny SGSD run of 2 steps, checkpointed at 1 and 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("lifecycle") / "run"
    result = _train(out, "--max-steps", "2", "training.save_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_resume_passes_over_a_truncated_checkpoint_says_so_and_sets_it_aside(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash or a copy that stopped half way
    result = _train(out, "--max-steps", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint-2: model.safetensors has 1000 bytes" in result.stderr and "not resumed from" in result.stderr
    assert "resumed from" in result.stdout and "checkpoint-1" in result.stdout
    assert (out / "checkpoint-2.damaged").is_dir()  # kept for inspection, never resumed from
    assert json.loads((out / "final" / COMPLETE_MARKER).read_text())["step"] == 3


# -- no code runs on resume --------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(two_step_run, tmp_path):
    import torch

    out = _copy(two_step_run, tmp_path)
    checkpoint = out / "checkpoint-2"
    evidence = tmp_path / "code-ran"
    torch.save({"ema": _Payload(str(evidence))}, checkpoint / "sgsd_state.pt")
    write_complete_marker(checkpoint, 2, 1)  # whoever crafted the folder also fixed its marker
    result = _train(out, "--max-steps", "3")
    assert result.returncode == 2 and not evidence.exists()
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith(f"sgsd: error: {checkpoint / 'sgsd_state.pt'}: holds objects other than tensors and plain "
                          "data, refused unread")


# -- the same inputs on resume ------------------------------------------------------------------------------


def test_a_resume_on_a_changed_bank_is_refused_and_the_card_names_the_bank_used(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    record = (out / "resolved_config.yaml").read_text()
    used = json.loads(record.split("# provenance: ")[1])["inputs"]["skill bank"]
    assert used["skills"] == 4 and used["mistakes"] == 4 and len(used["sha256"]) == 64
    bank = json.loads((TINY / "skill_bank.json").read_text())
    bank["common_mistakes"] = bank["common_mistakes"][:2]
    changed = tmp_path / "bank.json"
    changed.write_text(json.dumps(bank))
    # the run's config names the bank's path: point it at the changed copy, as a replaced file would be
    (out / "resolved_config.yaml").write_text(record.replace(str(TINY / "skill_bank.json"), str(changed)))
    from sgsd.run_dir import OUTPUT_RECORD, RESUME_MAY_CHANGE, write_output_record

    settings = json.loads((out / OUTPUT_RECORD).read_text())["settings"]  # ... and so does its output record
    write_output_record(out, "train", {**settings, "skills.bank": str(changed)}, RESUME_MAY_CHANGE)
    result = _train(out, "--max-steps", "3", f"skills.bank={changed}")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sgsd: error: output directory {out}: its skill bank ({changed}) changed since the run "
                           f"started (sha256 {used['sha256'][:12]} -> ")
    from sgsd.trainers.model_card import render_model_card

    card = render_model_card(out, 2)  # the record now names a file that holds 2 mistakes
    assert f"`{changed}` (4 skills, 4 mistakes, version {used['version']}, sha256 {used['sha256'][:12]})" in card


def test_a_resume_on_changed_data_is_refused(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    result = _train(out, "--max-steps", "3", "data.max_problems=40")
    assert result.returncode == 2
    assert "data.max_problems: None -> 40" in result.stderr  # a config change is caught first
    record = (out / "resolved_config.yaml").read_text()
    provenance = json.loads(record.split("# provenance: ")[1])
    provenance["inputs"]["data"]["sha256"] = "0" * 64  # as if the file had held other problems at the start
    (out / "resolved_config.yaml").write_text(record.split("# provenance: ")[0] + "# provenance: "
                                              + json.dumps(provenance) + "\n")
    result = _train(out, "--max-steps", "3")
    assert result.returncode == 2
    assert "its data (builtin:tiny-math) changed since the run started (sha256 000000000000 -> " in result.stderr


# -- the marker waits for every rank --------------------------------------------------------------------------


@pytest.mark.slow
def test_the_completion_marker_waits_for_a_slow_rank(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "-m", "sgsd.cli", "train", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--quiet",
               "--max-steps", "1", "training.save_steps=1", "training.prompts_per_device=2"]
    env = {**_env(), "SGSD_FAULT_INJECT": "rank=1,save_delay=3", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-1"
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 2
    # rank 1 wrote its late file 3 s after its save; the marker, written after it, lists it
    assert "late_rank1.txt" in marker["files"] and "rng_state_1.pth" in marker["files"]
    assert (checkpoint / COMPLETE_MARKER).stat().st_mtime >= (checkpoint / "late_rank1.txt").stat().st_mtime


# -- storage failures, whichever library raised them ---------------------------------------------------------


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    OSError(28, "No space left on device", "/x/optimizer.pt"),
])
def test_a_full_disk_is_recognised_whatever_raised_it(tmp_path, error):
    from sgsd.run_dir import storage_errors

    _checkpoint(tmp_path, 2, 1)
    with pytest.raises(UserError) as err:
        with storage_errors(tmp_path):
            raise error
    text = str(err.value)
    assert text.startswith("cannot write ") and "latest complete checkpoint: checkpoint-2" in text
    assert "free space and rerun the same command to resume" in text
    with pytest.raises(ValueError):  # anything else passes through
        with storage_errors(tmp_path):
            raise ValueError("not a disk problem")


def test_train_does_not_change_the_callers_config(two_step_run, tmp_path):
    from sgsd.methods import load_run_config
    from sgsd.trainers.run import train

    out = _copy(two_step_run, tmp_path)
    cfg = load_run_config(TINY / "sgsd.yaml")
    before = cfg.training.max_steps
    train(cfg, out, max_steps=2, progress=False)  # complete at 2: nothing to do
    assert cfg.training.max_steps == before != 2


def test_deepspeed_engine_files_are_checked_before_deepspeed_unpickles_them(tmp_path):
    """DeepSpeed loads its shards with weights_only=False: a shard naming any callable but DeepSpeed's
    own classes is refused before it does, and nothing runs; DeepSpeed's own classes pass."""
    import torch

    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from sgsd.trainers.checkpoints import check_engine_state

    shards = tmp_path / "checkpoint-2" / "global_step2"
    shards.mkdir(parents=True)
    torch.save({"zero_stage": ZeroStageEnum(2), "state": {"exp_avg": torch.zeros(3)}, "ds_version": "0.19.8"},
               shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_engine_state(tmp_path / "checkpoint-2", 0)  # DeepSpeed's own enum: allowed
    evidence = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": _Payload(str(evidence))}, shards / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    check_engine_state(tmp_path / "checkpoint-2", 0)  # rank 0 reads only its own shard and the shared files
    with pytest.raises(UserError) as err:
        check_engine_state(tmp_path / "checkpoint-2", 1)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: holds io.open, which is neither a tensor" in str(err.value)
    assert not evidence.exists()

"""Resuming a training run: bit-identical after SIGKILL, incomplete checkpoints ignored, a full disk keeps the
previous checkpoint, a different config is refused."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from run_outputs import RECIPE, final_weights, metrics, train_tiny
from sgsd.cli import main
from sgsd.config import load_config


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "sgsd.cli", "train", "--config", str(RECIPE), "--output-dir", str(out),
            "--max-steps", "6", "--quiet", "training.save_steps=2"]


@pytest.mark.slow
def test_sigkill_after_step_4_then_restart_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(_command(whole), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoint-4" / "sgsd_complete.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the run never completed its step-4 checkpoint"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "final").exists()
    restart = subprocess.run(_command(killed), env=env, capture_output=True, text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert "resumed from" in restart.stdout
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3, 4, 5, 6]
    assert metrics(killed) == metrics(whole)
    a, b = final_weights(whole), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # attribution statistics continue from the checkpoint rather than restarting or double counting
    assert json.loads((killed / "attribution.json").read_text()) == json.loads((whole / "attribution.json").read_text())


@pytest.mark.slow
def test_incomplete_checkpoint_is_ignored_and_reported(tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(out, "training.save_steps=1", steps=2)
    (out / "final").rename(tmp_path / "final-first")
    half = out / "checkpoint-3"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)  # a save cut short: no completion marker
    code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "3", "--quiet",
                 "training.save_steps=1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "resumed from" in captured.out and "checkpoint-2" in captured.out
    assert "ignored incomplete checkpoints" in captured.err and "checkpoint-3" in captured.err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import transformers

    out = tmp_path / "run"
    original = transformers.Trainer._save_optimizer_and_scheduler

    def failing(self, output_dir):
        if output_dir.endswith("checkpoint-2"):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", failing)
    code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "3", "--quiet",
                 "training.save_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "No space left on device" in err and "latest complete checkpoint: checkpoint-1" in err
    assert "\n" not in err and err.startswith("sgsd: error: cannot write")
    assert (out / "checkpoint-1" / "sgsd_complete.json").exists()
    assert not (out / "checkpoint-2" / "sgsd_complete.json").exists()
    assert not (out / "final").exists()
    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", original)
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "3", "--quiet",
                 "training.save_steps=1"]) == 0  # space freed: the same command resumes from checkpoint-1
    assert "resumed from" in capsys.readouterr().out


def test_resume_refuses_a_different_config_but_allows_more_steps(tmp_path, capsys):
    from sgsd.config import config_settings, dump_config
    from sgsd.run_dir import RESUME_MAY_CHANGE, check_resume_config, write_complete_marker, write_output_record

    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "rng_state.pth").write_bytes(b"rng")
    write_complete_marker(out / "checkpoint-1", 1, world_size=1)
    started = load_config(RECIPE, ["training.learning_rate=0.001"])
    (out / "resolved_config.yaml").write_text(dump_config(started) + "# provenance: {}\n")
    write_output_record(out, "train", config_settings(started), RESUME_MAY_CHANGE)  # as the run's start wrote it
    # same settings, longer run and another save cadence: resumable
    check_resume_config(out, dump_config(load_config(RECIPE, ["training.learning_rate=0.001",
                                                              "training.max_steps=50", "training.save_steps=7"])))
    code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", "training.learning_rate=0.002"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "holds an earlier `sgsd train` made with other settings (training.learning_rate: 0.001 -> 0.002)" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "resolved_config.yaml", "sgsd_output.json"]  # nothing written

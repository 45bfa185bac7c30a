"""Issue 8: exact resume after SIGKILL, incomplete checkpoints ignored, disk full, NaN logits, online
skill bank and attribution restored on resume."""

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

from fake_llm_server import base_url, fake_llm_server
from sgsd.cli import main
from sgsd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


def _metrics(run: Path) -> list[dict]:
    # time/* are wall-clock measurements: the only keys allowed to differ between two identical runs
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


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
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3, 4, 5, 6]
    assert _metrics(killed) == _metrics(whole)
    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # attribution statistics continue from the checkpoint rather than restarting or double counting
    assert json.loads((killed / "attribution.json").read_text()) == json.loads((whole / "attribution.json").read_text())


def _train(out, *overrides, steps=2, **kwargs):
    from sgsd.trainers.run import train

    return train(load_config(RECIPE, list(overrides)), out, max_steps=steps, progress=False, **kwargs)


@pytest.mark.slow
def test_incomplete_checkpoint_is_ignored_and_reported(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "training.save_steps=1", steps=2)
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
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


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


@pytest.mark.slow
def test_nan_logits_skip_the_step_and_training_continues(tmp_path, monkeypatch):
    from sgsd import loss_phase  # the trainer's loss phase

    original = loss_phase.completion_logprobs
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        logps, entropy = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the first loss step sees NaN logits
            return logps * float("nan"), entropy * float("nan")
        return logps, entropy

    monkeypatch.setattr(loss_phase, "completion_logprobs", poisoned)
    result = _train(tmp_path / "run", steps=3)
    records = _metrics(result.output_dir)
    assert records[0].get("train/nonfinite_skipped") == 1.0 and records[0]["train/grad_norm"] == 0.0
    assert all(r["train/nonfinite_skipped"] == 0.0 and r["train/grad_norm"] > 0 for r in records[1:])
    final = _weights(result.output_dir)
    assert all(torch.isfinite(v).all() for v in final.values())


SKILL_JSON = '{"general_skills": [{"title": "Line up digits", "principle": "Align ones under ones.", "when_to_apply": "Column arithmetic."}]}'
MISTAKE_JSON = ('<think>{x}</think>{"common_mistakes": [{"description": "Dropping $\\\\{carry\\\\}$", '
                '"why_it_happens": "haste", "how_to_avoid": "Write the carry."}]}')


def _updater_reply(prompt: str) -> str:
    if "SUCCESSFUL" in prompt:
        return SKILL_JSON
    if "Merge them" in prompt:
        return "{}"  # merge declines: items kept as they are
    return MISTAKE_JSON


@pytest.mark.slow
def test_online_update_snapshots_attribution_and_resume(tmp_path):
    with fake_llm_server(_updater_reply) as server:
        overrides = ["skills.online.enabled=true", "skills.online.every_steps=2", "skills.online.success_threshold=1.0",
                     f"skills.online.llm={base_url(server)}", "skills.online.llm_model=fake", "training.save_steps=2"]
        out = tmp_path / "run"
        _train(out, *overrides, steps=2)
        assert server.requests, "the updater was never asked"
    update_step = next(r for r in _metrics(out) if r["step"] == 2)  # what the update did, per update
    assert update_step["skills/online_memories"] > 0
    assert update_step["skills/online_parse_failures"] == 0 and update_step["skills/online_truncated"] == 0
    snapshots = sorted((out / "skills").glob("bank_step_*.json"))
    assert [p.name for p in snapshots] == ["bank_step_000002.json"]
    latest = json.loads((out / "skills" / "latest.json").read_text())
    assert any(m["mistake_id"].startswith("dyn_") for m in latest["common_mistakes"])
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution  # per-item counts were recorded
    assert main(["skills", "report", str(out), "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "attribution.png").stat().st_size > 0
    state = torch.load(out / "checkpoint-2" / "sgsd_state.pt", weights_only=True)
    assert state["online_skills"]["dynamic"]["common_mistakes"] and "attribution" in state

    # resume: the trainer continues with the updated bank (dyn_ items retrievable) from the checkpoint
    from sgsd.trainers.checkpoints import restore_extra_state

    class Source:
        def __init__(self, bank):
            self.bank = bank

        def set_bank(self, bank):
            self.bank = bank

    from sgsd.skills.bank import load_bank
    from sgsd.trainers.skill_hooks import make_observers

    class FakeTrainer:
        ema = None
        teacher_source = Source(load_bank(ROOT / "configs/tiny/skill_bank.json"))
        observers = make_observers(load_config(RECIPE, overrides[:-1]), tmp_path / "resumed")

    restore_extra_state(FakeTrainer, out / "checkpoint-2")
    assert [m.mistake_id for m in FakeTrainer.teacher_source.bank.dynamic_mistakes] == \
        [m["mistake_id"] for m in latest["common_mistakes"] if m["mistake_id"].startswith("dyn_")]


def test_resume_refuses_a_different_config_but_allows_more_steps(tmp_path, capsys):
    from sgsd.config import dump_config
    from sgsd.run_dir import check_resume_config, write_complete_marker

    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "rng_state.pth").write_bytes(b"rng")
    write_complete_marker(out / "checkpoint-1", 1, world_size=1)
    started = load_config(RECIPE, ["training.learning_rate=0.001"])
    (out / "resolved_config.yaml").write_text(dump_config(started) + "# provenance: {}\n")
    # same settings, longer run and another save cadence: resumable
    check_resume_config(out, dump_config(load_config(RECIPE, ["training.learning_rate=0.001",
                                                              "training.max_steps=50", "training.save_steps=7"])))
    code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", "training.learning_rate=0.002"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "holds a run started with another config (training.learning_rate: 0.001 -> 0.002)" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "resolved_config.yaml"]  # nothing written

"""Running `sgsd train` again on a run directory: a finished run does nothing, a larger max_steps continues,
a smaller one is refused, a run interrupted before `final/` only publishes it (`sgsd.run_dir.plan_rerun`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", "training.save_steps=1", *extra])


def _snapshot(run: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `run` (what a no-op must leave untouched)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny SGSD run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(out, "--max-steps", "2") == 0
    return out


@pytest.mark.slow
def test_finished_run_rerun_does_nothing_larger_max_steps_continues_smaller_is_refused(finished_run, capsys):
    out = finished_run
    capsys.readouterr()
    before = _snapshot(out)
    assert _steps(out) == [1, 2]

    assert _train(out, "--max-steps", "2") == 0
    assert "complete at step 2; nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before  # no metrics line, attribution rollout, checkpoint or card added

    assert _train(out, "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "complete at step 2; max_steps 1 is smaller" in err and "\n" not in err
    assert _snapshot(out) == before

    assert _train(out, "--max-steps", "3") == 0  # continues to exactly step 3
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "final" / "sgsd_complete.json").read_text())["step"] == 3
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["rollouts"] == 3 * 4  # 4 prompts per step (tiny recipe), counted once each

    # interrupted after the step-3 checkpoint but before final/: only final/ is written, no 4th step
    shutil.rmtree(out / "final")
    assert _train(out, "--max-steps", "3") == 0
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "attribution.json").read_text()) == attribution
    from safetensors.torch import load_file

    final, checkpoint = load_file(out / "final" / "model.safetensors"), load_file(out / "checkpoint-3" / "model.safetensors")
    assert final.keys() == checkpoint.keys() and all((final[k] == checkpoint[k]).all() for k in final)


def test_plan_rerun_refuses_a_checkpoint_beyond_max_steps(tmp_path):
    from sgsd.errors import UserError
    from sgsd.run_dir import plan_rerun, write_complete_marker

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "rng_state.pth").write_bytes(b"rng")
    write_complete_marker(checkpoint, 4, world_size=1)
    assert plan_rerun(tmp_path, 6, 1).action == "resume"
    assert plan_rerun(tmp_path, 4, 1).action == "finish"
    with pytest.raises(UserError, match="holds checkpoint-4, beyond max_steps 2"):
        plan_rerun(tmp_path, 2, 1)

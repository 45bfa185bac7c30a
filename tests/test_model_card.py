"""The run directory's README.md is the project's model card (`sgsd.trainers.model_card`), not TRL's generic one."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny SGSD run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", "--max-steps", "2"]) == 0
    return out


@pytest.mark.slow
def test_run_directory_readme_is_the_sgsd_model_card(finished_run):
    out = finished_run
    card = (out / "README.md").read_text()
    assert "fine-tuned version of" not in card and "TRL" not in card  # not TRL's generic card
    assert "SGSD on tiny" in card and "base model | `tiny`" in card
    assert "`builtin:tiny-math`: 64 problems used of 64 rows" in card
    assert "skill_bank.json` (4 skills, 4 mistakes" in card
    assert "| `sgsd.num_teachers` | 3 |" in card
    assert "## Final metrics" in card and "`sgsd/helpful_fraction`" in card
    from sgsd.run_dir import RUN_FILES

    listed = [name for name in RUN_FILES if f"- `{name}`" in card]
    assert listed == list(RUN_FILES)
    assert (out / "final" / "README.md").read_text() == card
    readme = (ROOT / "README.md").read_text()
    assert [name for name in RUN_FILES if f"`{name}`" not in readme] == []  # the README lists every file


def test_the_cards_eval_command_is_shell_quoted(tmp_path):
    import shlex

    from sgsd.trainers.model_card import render_model_card

    run_dir = tmp_path / "my run; rm -rf x"
    run_dir.mkdir()
    line = next(l for l in render_model_card(run_dir, 1).splitlines() if l.startswith("sgsd eval"))
    assert shlex.split(line)[:4] == ["sgsd", "eval", "--model", str(run_dir)]

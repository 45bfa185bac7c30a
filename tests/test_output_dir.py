"""The output-directory rule (`sgsd.run_dir.check_output_dir`): every writing command writes only into a new or
empty directory, or over its own earlier output of the same settings; the user's files are never touched.

Each CLI case is refused before any model loads, so these tests take about a second each (one tiny `sgsd eval`
gives the second-eval case a real earlier output)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sgsd.cli import main
from sgsd.errors import UserError
from sgsd.run_dir import (
    OUTPUT_RECORD,
    DirectoryLock,
    check_output_dir,
    claimed_output_dir,
    write_output_record,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what a refused command must leave exactly as it was."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- the rule itself ------------------------------------------------------------------------------------


def test_new_empty_and_own_directories_are_accepted(tmp_path):
    settings = {"k": 4, "model": "tiny"}
    assert check_output_dir(tmp_path / "new", "eval", settings) == "new"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "eval", settings) == "empty"
    write_output_record(tmp_path / "empty", "eval", settings)
    (tmp_path / "empty" / "results.json").write_text("{}")
    assert check_output_dir(tmp_path / "empty", "eval", settings) == "own"


def test_what_is_not_the_commands_own_is_refused_by_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(UserError, match=r"holds files that `sgsd train` did not write \(README.md\); nothing there is "
                                        r"changed: choose a new or empty directory"):
        check_output_dir(out, "train", {})
    other = tmp_path / "other"
    write_output_record(other if other.mkdir() is None else other, "eval", {"k": 4})
    with pytest.raises(UserError, match=r"holds the output of `sgsd eval`"):
        check_output_dir(other, "skills build", {"k": 4})
    with pytest.raises(UserError, match=r"holds an earlier `sgsd eval` made with other settings \(k: 4 -> 2\); its "
                                        "results are kept"):
        check_output_dir(other, "eval", {"k": 2})


def test_settings_that_may_differ_do_not_count(tmp_path):
    write_output_record(tmp_path, "train", {"lr": 1.0, "max_steps": 2}, frozenset({"max_steps"}))
    assert check_output_dir(tmp_path, "train", {"lr": 1.0, "max_steps": 9}, may_differ=frozenset({"max_steps"})) == "own"
    with pytest.raises(UserError, match="lr: 1.0 -> 2.0"):
        check_output_dir(tmp_path, "train", {"lr": 2.0, "max_steps": 2}, may_differ=frozenset({"max_steps"}))


@pytest.mark.parametrize("where", ["/", "~", "."])
def test_root_home_and_working_directory_are_refused(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    name = {"/": "the file-system root", "~": "the home directory", ".": "the working directory"}[where]
    with pytest.raises(UserError, match=f"is {name}"):
        check_output_dir(where, "eval", {})


def test_a_claim_that_wrote_nothing_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for directory in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(UserError, match="bad input"):
            with claimed_output_dir(directory, "eval", {"k": 1}):
                assert (directory / OUTPUT_RECORD).is_file()
                raise UserError("bad input")
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []
    with claimed_output_dir(tmp_path / "new", "eval", {"k": 1}) as out:
        (out / "results.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["results.json", OUTPUT_RECORD]


def test_a_directory_in_use_says_so_before_what_it_holds(tmp_path):
    with claimed_output_dir(tmp_path / "run", "train", {"a": 1}):
        (tmp_path / "run" / "metrics.jsonl").write_text("")
        with pytest.raises(UserError, match=r"in use by another sgsd command \(pid \d+\)"):
            with claimed_output_dir(tmp_path / "run", "train", {"a": 2}):
                pass
    with DirectoryLock(tmp_path / "run"):  # held, its settings the same: the lock refuses
        with pytest.raises(UserError, match="in use"):
            with claimed_output_dir(tmp_path / "run", "train", {"a": 1}):
                pass


# -- every writing command ------------------------------------------------------------------------------


def _users_dir(tmp_path: Path, **files: str) -> Path:
    out = tmp_path / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


TRAIN = ["train", "--config", str(TINY / "sgsd.yaml"), "--quiet", "--output-dir"]


@pytest.mark.parametrize("files", [{"README.md": "# my project\n"},
                                   {"attribution.json": '{"mine": 1}', "metrics.jsonl": '{"loss": 1}\n'}])
def test_train_leaves_the_users_files_alone(files, tmp_path, capsys):
    out = _users_dir(tmp_path, **files)
    before = snapshot(out)
    assert main([*TRAIN, str(out)]) == 2
    assert "did not write" in one_error(capsys)
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(files)


@pytest.mark.parametrize("command", [TRAIN, ["eval", "--model", "tiny", "--benchmarks", "builtin:tiny-math",
                                             "--output-dir"]])
def test_the_root_is_not_an_output_directory(command, capsys):
    assert main([*command, "/"]) == 2
    assert "is the file-system root" in one_error(capsys)


EVAL = ["eval", "--model", "tiny", "--benchmarks", "builtin:tiny-math", "--limit", "2", "--max-new-tokens", "4",
        "--grade-workers", "1", "--quiet", "--output-dir"]


def test_eval_over_the_users_results_is_refused(tmp_path, capsys):
    out = _users_dir(tmp_path, **{"results.json": '{"mine": true}', "samples/aime24.jsonl": '{"x": 1}\n'})
    before = snapshot(out)
    assert main([*EVAL, str(out), "--k", "2"]) == 2
    assert "holds files that `sgsd eval` did not write (results.json, samples/)" in one_error(capsys)
    assert snapshot(out) == before


def test_a_second_eval_with_another_k_keeps_the_first(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main([*EVAL, str(out), "--k", "2"]) == 0
    capsys.readouterr()
    first = snapshot(out)
    assert json.loads((out / "results.json").read_text())["settings"]["k"] == 2
    assert main([*EVAL, str(out), "--k", "3"]) == 2
    assert "holds an earlier `sgsd eval` made with other settings (k: 2 -> 3)" in one_error(capsys)
    assert snapshot(out) == first
    assert main([*EVAL, str(out), "--k", "2"]) == 0  # the same settings: its own, rewritten alike


def test_skills_build_keeps_an_existing_bank(tmp_path, capsys):
    out = _users_dir(tmp_path, **{"skill_bank.json": (TINY / "skill_bank.json").read_text()})
    before = snapshot(out)
    assert main(["skills", "build", "--problems", "builtin:tiny-math", "--policy", "tiny", "--output-dir",
                 str(out)]) == 2
    assert "holds files that `sgsd skills build` did not write (skill_bank.json)" in one_error(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("command", [
    ["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir"],
    ["demo", "--preset", "smoke", "--quiet", "--output-dir"],
    ["compare", "--configs", str(TINY / "sgsd.yaml"), str(TINY / "grpo.yaml"), "--output-dir"],
])
def test_probe_demo_and_compare_leave_the_users_files_alone(command, tmp_path, capsys):
    out = _users_dir(tmp_path, **{"README.md": "mine"})
    assert main([*command, str(out)]) == 2
    assert "did not write (README.md)" in one_error(capsys)
    assert snapshot(out) == {"README.md": b"mine"}


def test_eval_compare_of_a_directory_with_itself_notes_it(tmp_path, capsys):
    from test_eval_compare import _evaluation

    base = _evaluation(tmp_path / "base", model="tiny")
    assert main(["eval", "compare", str(base), str(base)]) == 0
    out = capsys.readouterr().out
    assert f"note: {base} is the same evaluation as {base}" in out
    assert "no plot written" in out and not (Path.cwd() / "compare.png").exists()


def test_the_record_being_written_by_the_main_process_is_not_in_the_way(tmp_path):
    """Another rank of the same launch checks the directory while the main process writes its record: the
    atomic writer's temporary file is the command's own, not a file in the way (a race seen on 2 processes)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{OUTPUT_RECORD}.x1y2z3.tmp").write_text("{")
    assert check_output_dir(out, "train", {"lr": 1.0}) == "empty"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that `sgsd train` did not write \(notes.txt\)"):
        check_output_dir(out, "train", {"lr": 1.0})

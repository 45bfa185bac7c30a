"""Bad inputs are refused in one line before anything is loaded or written: data rows without an answer,
too few problems for a step, a run that takes no step, missing local paths (never looked up on the hub),
DeepSpeed configs, and `sgsd eval`'s output directory, model and bank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"
TINY_BANK = ROOT / "configs/tiny/skill_bank.json"


def _rows_file(path: Path, good: int, bad_at: int) -> Path:
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(good)]
    rows.insert(bad_at, {"problem": "What is nothing?"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_too_few_problems_for_one_step_is_an_error_and_skipped_rows_are_named(tmp_path, capsys):
    data = _rows_file(tmp_path / "three.jsonl", good=2, bad_at=1)
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "1", "--quiet",
                 f"data.path={data}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: skipped 1 of 3 rows without a problem or answer (row 2;" in err
    assert "2 usable problems, but one training step needs 4" in err
    assert not out.exists()


def test_skipped_rows_are_named_before_anything_else_happens(tmp_path, capsys):
    data = _rows_file(tmp_path / "nine.jsonl", good=8, bad_at=4)
    out = tmp_path / "run"
    # the prompt limit stops the run after data loading: the note must already have been printed
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", f"data.path={data}",
                 "prompt.max_prompt_tokens=8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"sgsd: {data}: skipped 1 of 9 rows without a problem or answer (row 5; data.bad_rows=error "
                      "refuses them instead)")
    assert "longer than prompt.max_prompt_tokens=8" in err[1]


def test_a_run_that_takes_no_step_is_an_error_not_trained_0_steps(tmp_path, capsys, monkeypatch):
    from sgsd.trainers import run as run_module

    monkeypatch.setattr(run_module, "check_problems_per_step", lambda cfg, n: None)  # only the safety net left
    data = _rows_file(tmp_path / "three.jsonl", good=2, bad_at=1)
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "1", "--quiet",
                 f"data.path={data}"]) == 2
    captured = capsys.readouterr()
    assert "without taking a step" in captured.err and "trained 0 steps" not in captured.out
    assert not (out / "final").exists()


def test_eval_checks_output_dir_and_model_before_loading_anything(tmp_path, capsys, monkeypatch):
    from sgsd.commands import evaluate

    def no_generation(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate, "_generator", no_generation)
    bench = tmp_path / "toy.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    occupied = tmp_path / "occupied"
    occupied.write_text("a file where the output directory should go")
    common = ["--benchmarks", str(bench), "--k", "1", "--max-new-tokens", "4"]
    assert main(["eval", "--model", "tiny", "--output-dir", str(occupied), *common]) == 2
    assert f"output directory {occupied}: exists and is not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--output-dir", str(occupied / "sub"), *common]) == 2
    assert f"{occupied} is a file, not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "runs" / "gone"), "--output-dir", str(tmp_path / "e"), *common]) == 2
    assert "model: no such file or directory" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--output-dir", str(tmp_path / "e"), *common, "--bank",
                 str(tmp_path / "nobank.json")]) == 2
    assert "skill bank: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_local_looking_paths_versus_hub_ids(tmp_path, monkeypatch):
    from sgsd.models import resolve_model_path
    from sgsd.paths import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("data/nope.jsonl", "./model", "/abs/model", "~/model", "runs/foo", "bank.JSON"):
        assert looks_local(spec), spec
    for spec in ("Qwen/Qwen3-1.7B", "open-r1/DAPO-Math-17k-Processed", "gsm8k", "HuggingFaceH4/MATH-500"):
        assert not looks_local(spec), spec
    assert resolve_model_path("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"  # a hub id with a dot is not a file


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", str(RECIPE), "--output-dir", "out", "data.path=data/nope.jsonl"],
     "dataset: no such file or directory: data/nope.jsonl"),
    (["train", "--config", str(RECIPE), "--output-dir", "out", "model.name_or_path=runs/foo"],
     "model: no such file or directory: runs/foo"),
    (["eval", "--model", "runs/foo", "--output-dir", "out", "--benchmarks", "bench.jsonl"],
     "model: no such file or directory: runs/foo"),
    (["eval", "--model", "tiny", "--output-dir", "out", "--benchmarks", "data/nope.jsonl"],
     "benchmark: no such file or directory: data/nope.jsonl"),
    (["skills", "build", "--problems", "data/nope.jsonl", "--output-dir", "out", "--policy", "tiny"],
     "dataset: no such file or directory: data/nope.jsonl"),
    (["skills", "retrieve", "--bank", str(TINY_BANK), "--problem", "1+1", "--embedder", "runs/minilm"],
     "embedding model: no such file or directory: runs/minilm"),
])
def test_missing_local_paths_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "bench.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sgsd: error: {message}" or (err.endswith(message) and "\n" not in err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (None, "training.deepspeed: ds.json: no such file"),
    ('{"zero_optimization": {"stage": 2},', "training.deepspeed: ds.json: invalid JSON at line 1"),
    ("[1, 2]", "training.deepspeed: ds.json: expected a JSON object (a DeepSpeed config), got list"),
])
def test_a_bad_deepspeed_config_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "ds.json").write_text(content)
    assert main(["train", "--config", str(RECIPE), "--output-dir", "out", "--quiet", "training.deepspeed=ds.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_valid_deepspeed_config_passes_the_check(tmp_path):
    from sgsd.trainers.preflight import check_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    check_deepspeed_config(str(path))  # no error
    check_deepspeed_config(None)
    check_deepspeed_config(str(Path(__file__).resolve().parents[1] / "configs/paper/deepspeed-zero2.json"))

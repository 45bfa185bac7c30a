"""End to end: `sgsd train` on the tiny SGSD recipe, offline, on CPU (issue 2 "done when")."""

import json
from pathlib import Path

import pytest
import torch

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"
REQUIRED_KEYS = ("step", "train/reward_mean", "sgsd/helpful_fraction", "sgsd/harmful_fraction",
                 "sgsd/neutral_fraction", "sgsd/support_mean", "time/generate_s", "time/teacher_s", "time/update_s")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sgsd"
    code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "4", "--quiet"])
    assert code == 0
    return out


@pytest.mark.slow
def test_every_trainable_parameter_changes(tiny_run):
    from transformers import AutoModelForCausalLM

    from sgsd.tiny import build_tiny_model, build_tokenizer

    initial = build_tiny_model(build_tokenizer(), seed=0)  # what model "tiny" starts from
    final = AutoModelForCausalLM.from_pretrained(tiny_run / "final")
    start = dict(initial.named_parameters())
    unchanged = [n for n, p in final.named_parameters() if torch.equal(p.detach(), start[n].detach())]
    assert unchanged == []


@pytest.mark.slow
def test_metrics_config_and_checkpoints_are_written(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        assert not missing
        fractions = record["sgsd/helpful_fraction"] + record["sgsd/harmful_fraction"] + record["sgsd/neutral_fraction"]
        assert fractions == pytest.approx(1.0, abs=1e-6)  # every present teacher is in exactly one class
        assert record["time/generate_s"] > 0 and record["time/teacher_s"] > 0
    resolved = (tiny_run / "resolved_config.yaml").read_text()
    assert "method: sgsd" in resolved and "git_revision" in resolved
    assert (tiny_run / "checkpoint-2" / "sgsd_complete.json").exists()
    assert (tiny_run / "checkpoint-4" / "sgsd_complete.json").exists()
    assert (tiny_run / "final" / "config.json").exists() and (tiny_run / "final" / "tokenizer.json").exists()
    assert not (tiny_run / "final.tmp").exists()


@pytest.mark.slow
def test_final_model_loads_through_the_run_directory(tiny_run):
    from sgsd.models import load_model, resolve_model_path

    assert resolve_model_path(str(tiny_run)) == str(tiny_run / "final")
    model = load_model(str(tiny_run))
    assert model.config.model_type == "qwen3"


def _run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, message", [
    (["skills.bank=/nonexistent/bank.json"], "bank.json"),
    (["model.name_or_path=/nonexistent/model"], "model: no such file or directory: /nonexistent/model"),
    (["data.path=/nonexistent/data.jsonl"], "dataset: no such file or directory: /nonexistent/data.jsonl"),
    (["prompt.max_prompt_tokens=8"], "longer than prompt.max_prompt_tokens=8"),
    (["sgsd.gate_tau=0"], "override: sgsd.gate_tau=0.0: must be a finite number > 0"),
    (["skills.bank=BROKEN"], "broken_bank.json"),
    (["data.path=builtin:nothing"], "builtin dataset 'nothing': unknown"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, override, message):
    if override == ["skills.bank=BROKEN"]:
        broken = tmp_path / "broken_bank.json"
        broken.write_text('{"general_skills": [{"skill_id": "gen_001", "title": "x"')  # truncated
        override = [f"skills.bank={broken}"]
    out = tmp_path / "run"
    code, err = _run_cli(["train", "--config", str(RECIPE), "--output-dir", str(out), *override], capsys)
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_no_resume_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    code, err = _run_cli(["train", "--config", str(RECIPE), "--output-dir", str(tmp_path), "--no-resume"], capsys)
    assert code == 2 and "holds files that `sgsd train` did not write (keep.txt)" in err
    assert (tmp_path / "keep.txt").read_text() == "user data"

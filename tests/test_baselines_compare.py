"""`sgsd compare` planning and the paper recipes (issue 5): controlled configs, commands, refusals.

No training here; the end-to-end run over the tiny recipes is in tests/test_baselines_recipes.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from sgsd.cli import main
from sgsd.config import load_config
from sgsd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs/paper"
CONTROLLED = ["sgsd", "grpo", "grpo-skill", "opsd", "opsd-skill"]


def _paper(name: str) -> str:
    return str(PAPER / f"qwen3-1.7b-{name}.yaml")


def test_controlled_paper_recipes_differ_only_in_their_method():
    from sgsd.commands.compare import config_differences

    configs = {name: load_config(_paper(name)) for name in CONTROLLED}
    assert config_differences(configs) == []
    methods = {name: cfg.method for name, cfg in configs.items()}
    assert methods == {"sgsd": "sgsd", "grpo": "grpo", "grpo-skill": "grpo", "opsd": "opsd", "opsd-skill": "opsd"}
    sgsd = configs["sgsd"]  # docs/spec.md section 6
    assert (sgsd.model.name_or_path, sgsd.model.lora.r, sgsd.model.lora.alpha) == ("Qwen/Qwen3-1.7B", 64, 128)
    assert len(sgsd.model.lora.target_modules) == 7 and sgsd.data.path == "BytedTsinghua-SIA/DAPO-Math-17k"
    assert (sgsd.generation.temperature, sgsd.generation.top_p, sgsd.generation.top_k,
            sgsd.generation.max_new_tokens) == (1.1, 0.95, 20, 1024)
    assert (sgsd.training.learning_rate, sgsd.training.max_grad_norm, sgsd.training.max_steps) == (5e-6, 0.1, 200)
    assert sgsd.training.prompts_per_device * sgsd.training.gradient_accumulation_steps * 4 == 16  # on 4 GPUs
    assert configs["grpo"].grpo.num_generations == 8 and configs["opsd"].opsd.teacher == "base"
    assert configs["grpo-skill"].grpo.skills_in_prompt and configs["opsd-skill"].opsd.skills
    assert Path(sgsd.skills.bank).is_file()


def test_paper_settings_recipes_are_the_papers_baselines():
    grpo = load_config(_paper("grpo-paper-settings"))
    assert (grpo.training.max_steps, grpo.generation.temperature, grpo.generation.max_new_tokens,
            grpo.prompt.enable_thinking) == (300, 1.2, 16384, True)
    assert grpo.training.prompts_per_device * grpo.training.gradient_accumulation_steps * 4 == 4  # x 8 completions
    opsd = load_config(_paper("opsd-paper-settings"))
    assert (opsd.training.max_steps, opsd.opsd.teacher) == (300, "base")
    assert opsd.training.prompts_per_device * opsd.training.gradient_accumulation_steps * 4 == 32
    assert load_config(_paper("grpo-skill-paper-settings")).grpo.skills_in_prompt
    assert load_config(_paper("opsd-skill-paper-settings")).opsd.skills


def test_accelerate_config_is_deepspeed_zero2():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(PAPER / "accelerate-zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 2
    import json

    assert json.loads((PAPER / "deepspeed-zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_uncontrolled_comparison_is_refused_with_the_differences(capsys, tmp_path):
    code = main(["compare", "--configs", _paper("grpo"), _paper("grpo-paper-settings"), "--output-dir",
                 str(tmp_path / "out"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "--allow-differences" in err and len(err.strip().splitlines()) == 1
    assert "generation.temperature: qwen3-1.7b-grpo=1.1, qwen3-1.7b-grpo-paper-settings=1.2" in err
    assert "prompt.enable_thinking" in err and "training.max_steps" in err
    assert main(["compare", "--configs", _paper("grpo"), _paper("grpo-paper-settings"), "--output-dir",
                 str(tmp_path / "out"), "--dry-run", "--allow-differences"]) == 0


def test_dry_run_prints_every_command_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "cmp"
    launcher = "accelerate launch --config_file configs/paper/accelerate-zero2.yaml -m sgsd.cli"
    code = main(["compare", "--configs", *[_paper(n) for n in ("sgsd", "grpo", "opsd")], "--output-dir", str(out),
                 "--base", "--base-skill", "--launcher", launcher, "--eval-args", "--k 12 --thinking", "--dry-run",
                 "training.seed=7"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and not out.exists()
    train, evals = [shlex.split(x) for x in lines[:3]], [shlex.split(x) for x in lines[3:]]
    assert len(evals) == 5
    for argv, name in zip(train, ("sgsd", "grpo", "opsd")):
        assert argv[:7] == shlex.split(launcher) + ["train"]
        assert argv[argv.index("--config") + 1] == _paper(name)
        assert argv[argv.index("--output-dir") + 1] == str(out / "runs" / f"qwen3-1.7b-{name}")
        assert argv[-1] == "training.seed=7"  # overrides reach every training run
    models = [argv[argv.index("--model") + 1] for argv in evals]
    assert models[:2] == ["Qwen/Qwen3-1.7B"] * 2
    assert models[2:] == [str(out / "runs" / f"qwen3-1.7b-{n}") for n in ("sgsd", "grpo", "opsd")]
    assert "--bank" in evals[1] and all("--bank" not in argv for argv in evals[2:])  # +Skill only for Base+Skill
    assert all(argv[-3:] == ["--k", "12", "--thinking"] for argv in evals)  # one evaluation setting for all


@pytest.mark.parametrize("extra, message", [
    (["--labels", "a"], "--labels has 1 names for 2 configs"),
    (["--labels", "a,a"], "labels must be distinct"),
    (["--labels", "base,b"], "labels must be distinct"),
    (["--eval-args", "--model other"], "--eval-args must not set --model"),
    (["--max-steps", "0"], "argument --max-steps: 0: must be a whole number >= 1"),
])
def test_bad_arguments_are_one_line_errors(capsys, tmp_path, extra, message):
    code = main(["compare", "--configs", _paper("grpo"), _paper("opsd"), "--output-dir", str(tmp_path / "o"),
                 "--dry-run", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_config_is_a_one_line_error(capsys, tmp_path):
    code = main(["compare", "--configs", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "o"), "--dry-run"])
    assert code == 2 and "nope.yaml" in capsys.readouterr().err


def test_an_in_process_stage_that_fails_names_the_stage_and_its_reason(capsys, tmp_path):
    from sgsd.commands.compare import Stage, run_stage

    missing = tmp_path / "no-such-benchmark.jsonl"
    stage = Stage("eval", "base", ("eval", "--model", "tiny", "--benchmarks", str(missing), "--output-dir",
                                   str(tmp_path / "e")), tmp_path / "e")
    with pytest.raises(UserError) as err:
        run_stage(stage, launcher=[], in_process=True)
    message = str(err.value)
    assert message.startswith("compare: eval of base failed: ") and str(missing) in message
    assert "rerun the same `sgsd compare` command" in message and "\n" not in message


def test_comparison_says_what_it_did_not_replicate():
    from sgsd.commands.compare import replication_note

    configs = {name: load_config(_paper(name)) for name in ("sgsd", "grpo")}
    configs["grpo"].training.seed = 7
    text = "\n".join(replication_note(configs))
    assert text.startswith("not replicated: each method trained once, from Qwen/Qwen3-1.7B, with training seed 7, 42;")
    assert "resample problems only" in text
    assert "rerun this command with training.seed=43, then training.seed=44" in text
    assert "independently trained starts" in text

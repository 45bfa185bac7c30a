"""The four tiny baseline recipes train 2 steps each offline and write metrics and a final model (issue 5).

All four run in this one process (module fixture). OPSD and OPSD+Skill go through the CLI with the
recipes' default grader. GRPO and GRPO+Skill go through `train()` with a parity reward: the random tiny
model never solves a problem, so the grader's rewards are all 0, every group's advantage is 0 and no
parameter could move; a reward with variance inside groups makes "parameters changed" a real check.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("grpo", "grpo-skill", "opsd", "opsd-skill")
COMMON_KEYS = ("step", "train/loss", "train/reward_mean", "train/grad_norm", "time/step_s", "time/generate_s",
               "time/teacher_s", "time/update_s")
METHOD_KEYS = {
    "grpo": ("grpo/zero_advantage_fraction", "grpo/advantage_abs_mean"),
    "opsd": ("opsd/loss", "opsd/divergence_mean", "opsd/student_entropy_mean", "opsd/teacher_entropy_mean",
             "opsd/completion_tokens"),
}


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [float(sum(ids) % 2) for ids in completion_ids]


BENCH = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "What is 4 times 6?", "answer": "24"},
         {"problem": "What is 9 - 7?", "answer": "2"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three recipes trained directly; then `sgsd compare` over all four, which skips those three (their
    final/ exists), trains opsd-skill through `sgsd train`, and evaluates Base and the four models."""
    from sgsd.cli import main
    from sgsd.config import load_config
    from sgsd.trainers.run import train

    from sgsd.cli import build_parser
    from sgsd.commands.compare import compare_settings, plan
    from sgsd.run_dir import write_output_record

    root = tmp_path_factory.mktemp("baselines")
    bench = tmp_path_factory.mktemp("bench") / "bench.jsonl"  # an input, outside the comparison's directory
    bench.write_text("".join(json.dumps(row) + "\n" for row in BENCH))
    configs = [str(ROOT / "configs/tiny" / f"{name}.yaml") for name in RECIPES]
    argv = ["compare", "--configs", *configs, "--output-dir", str(root), "--base", "--max-steps", "2",
            "--in-process", "--quiet", "--eval-args",
            f"--benchmarks {bench} --k 2 --max-new-tokens 8 --backend hf --grade-workers 1"]
    # as a comparison interrupted after its first three runs left its directory (the output-directory rule:
    # `sgsd compare` continues only its own output)
    args = build_parser(argv).parse_args(argv)
    write_output_record(root, "compare", compare_settings(args, plan(args)[1]))
    for name in RECIPES[:3]:
        config, out = ROOT / "configs/tiny" / f"{name}.yaml", root / "runs" / name
        if name.startswith("grpo"):
            train(load_config(config), out, reward_funcs=[parity_reward], max_steps=2, progress=False)
        else:
            assert main(["train", "--config", str(config), "--output-dir", str(out), "--max-steps", "2", "--quiet"]) == 0
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(argv)
    assert code == 0, errors.getvalue()[-2000:]
    return root / "runs"


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_and_writes_metrics_and_final_model(runs, name):
    from sgsd.models import load_model
    from sgsd.tiny import build_tiny_model, build_tokenizer

    out = runs / name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    expected = COMMON_KEYS + METHOD_KEYS[name.split("-")[0]]
    for record in records:
        assert [k for k in expected if k not in record] == []
        bad = {k: record[k] for k in expected if not (isinstance(record[k], (int, float)) and math.isfinite(record[k]))}
        assert bad == {}
    if name.startswith("opsd"):
        assert all(r["opsd/loss"] >= 0 and r["opsd/loss"] == pytest.approx(r["train/loss"], rel=1e-4) for r in records)
        assert all(r["time/teacher_s"] > 0 for r in records)  # the teacher runs in the loss phase
    else:
        assert all(0.0 <= r["grpo/zero_advantage_fraction"] < 1.0 for r in records)  # the parity reward varies

    resolved = (out / "resolved_config.yaml").read_text()
    assert f"method: {name.split('-')[0]}" in resolved
    assert ("skills_in_prompt: true" in resolved) == (name == "grpo-skill")
    assert ("skills: true" in resolved) == (name == "opsd-skill")

    initial = build_tiny_model(build_tokenizer(), seed=0)  # what model "tiny" starts from
    final = load_model(str(out))  # a run directory resolves to its final/
    start = dict(initial.named_parameters())
    unchanged = [n for n, p in final.named_parameters() if torch.equal(p.detach(), start[n].detach())]
    assert unchanged == []


@pytest.mark.slow
def test_compare_writes_one_table_of_every_model(runs, capsys):
    from sgsd.cli import main

    root = runs.parent
    table = (root / "comparison.txt").read_text()
    rows = {line.split()[0] for line in table.splitlines()[2:] if line and not line.startswith(("avg@k", " "))}
    assert {"base", *RECIPES} <= rows
    assert "none (controlled)" in table
    for name in RECIPES:
        assert f"  {name}: 2 steps," in table
        results = json.loads((root / "eval" / name / "results.json").read_text())
        assert results["benchmarks"]["bench"]["num_problems"] == 3
    plan = json.loads((root / "plan.json").read_text())
    assert [s["kind"] for s in plan["stages"]] == ["train"] * 4 + ["eval"] * 5
    assert (root / "comparison.png").stat().st_size > 0
    # rerunning the same command resumes: every stage is complete, so nothing is trained or evaluated again
    from sgsd.run_dir import read_output_record

    eval_args = read_output_record(root)["settings"]["eval_args"]
    capsys.readouterr()
    code = main(["compare", "--configs", *plan["configs"], "--output-dir", str(root), "--base", "--max-steps", "2",
                 "--in-process", "--quiet", "--eval-args", eval_args])
    assert code == 0
    assert capsys.readouterr().out.count("skipped") == 9

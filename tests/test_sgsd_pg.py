"""sgsd-pg (issue 14): GRPO's loss + lambda x SGSD's loss on the same rollouts.

- registry entry and validation;
- parity on one fixed batch: lambda = 0 gives exactly TRL's GRPO loss and gradient (GRPOBaselineTrainer on
  the same weights and inputs); the SGSD part alone equals `sgsd_loss` on the same inputs; lambda = 0.5
  gives pg + 0.5 sgsd in value and gradient;
- the tiny recipe trains through `sgsd train`, logs both parts, and resumes to the same result as an
  uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sgsd.config import load_config
from sgsd.errors import ConfigError
from sgsd.methods import load_run_config, method_spec

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd-pg.yaml"


def test_registry_entry_takes_grpo_and_sgsd_settings():
    cfg = load_config(RECIPE)
    spec = method_spec("sgsd-pg")
    assert spec.settings == "sgsd_pg" and spec.needs_bank(cfg) and not spec.prompt_skills(cfg)
    assert spec.grpo_settings(cfg) == {"num_generations": 4, "beta": 0.0, "vllm_importance_sampling_correction": True}
    for override, message in [
        ("sgsd_pg.lambda_sgsd=-1", "sgsd_pg.lambda_sgsd=-1.0: must be a finite number >= 0"),
        ("grpo.num_generations=1", r"grpo.num_generations=1: must be a finite number >= 2 \(GRPO needs at least 2"),
        ("sgsd.polarity_z=0", "sgsd.polarity_z=0.0: must be a finite number > 0"),
        ("grpo.skills_in_prompt=true", "grpo.skills_in_prompt: sgsd-pg gives the skills to its teachers"),
        ("sgsd_pg.lambda=1", "unknown config key 'sgsd_pg.lambda'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_run_config(RECIPE, [override])


# -- parity on one fixed batch ---------------------------------------------------------------------------


def _batch(trainer, rewards):
    """2 problems x G = 4 hand-written completions of different lengths (right-padded, as TRL returns them),
    the sgsd-pg trainer's rollout extras (teachers scored), and GRPO's group-normalised advantages."""
    from sgsd.prompts import ChatStyle, render_chat, student_prompt
    from sgsd.scoring import left_pad

    tokenizer = trainer.processing_class
    problems, answers = ["What is 12 + 7?", "What is 3 * 4?"], ["19", "12"]
    texts = [" 12 plus 7 is 19 so \\boxed{19}", " it is 20", " nineteen", " 19 \\boxed{19} done",
             " three fours make 13", " \\boxed{12}", " 3 * 4 = 12 so \\boxed{12}", " twelve or so"]
    rows = [i // 4 for i in range(8)]
    prompts = [tokenizer(render_chat(tokenizer, student_prompt(problems[r]), ChatStyle(False)),
                         add_special_tokens=False)["input_ids"] for r in rows]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(map(len, completions))
    completion_ids = torch.full((8, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros((8, width), dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    groups = rewards.view(2, 4)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "num_items_in_batch": completion_mask.sum()}
    inputs = [{"problem": problems[r], "answer": answers[r], "problem_id": str(r),
               "student_prompt": student_prompt(problems[r])} for r in rows]
    return {**output, **trainer.rollout_extras(inputs, output, rewards)}


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_lambda_zero_is_trls_grpo_and_the_sgsd_part_is_sgsd_loss(tmp_path):
    from sgsd.objectives import sgsd_loss
    from sgsd.scoring import completion_logprobs
    from sgsd.trainers.run import prepare_run

    grpo = prepare_run(load_config(ROOT / "configs/tiny/grpo.yaml"), tmp_path / "grpo", progress=False).trainer
    pg = prepare_run(load_config(RECIPE, ["sgsd_pg.lambda_sgsd=0", "skills.attribution=false"]), tmp_path / "pg",
                     progress=False).trainer
    assert all(torch.equal(a, b) for a, b in zip(grpo.model.parameters(), pg.model.parameters(), strict=True))
    accumulation = 2  # set by HF's training loop; 2 checks that each part is scaled for accumulation once
    grpo.current_gradient_accumulation_steps = pg.current_gradient_accumulation_steps = accumulation
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    batch = _batch(pg, rewards)
    records = dict(pg.records)  # each loss call hands its rollouts' records to the observers (pops them)

    # lambda = 0: TRL's GRPO loss and gradient, bit for bit (the same arithmetic on the same weights)
    grpo_loss, grpo_grads = _loss_and_grads(grpo, batch)
    pg_loss, pg_grads = _loss_and_grads(pg, batch)
    assert grpo_loss.item() != 0.0 and torch.equal(pg_loss, grpo_loss)
    assert grpo_grads.keys() == pg_grads.keys() and len(grpo_grads) > 0
    assert all(torch.equal(pg_grads[n], grpo_grads[n]) for n in grpo_grads)

    # the SGSD part alone: `sgsd_loss` on the same inputs (student log-probs of the same weights)
    def reference_sgsd():
        student = completion_logprobs(pg.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                      batch["completion_mask"])
        return sgsd_loss(student, batch["teacher_logps"], batch["sgsd_mask"], batch["rewards"],
                         batch["teacher_weights"], settings=pg.settings).loss

    pg.model.zero_grad()
    pg.records.update(records)
    part = pg.sgsd_part(pg.model, dict(batch))
    reference = reference_sgsd()
    assert reference.abs().item() > 1e-6  # teachers are not all neutral: the comparison is not 0 == 0
    # the trainer trims the padding columns before its forward: same values up to fp32 summation order
    torch.testing.assert_close(part, reference, rtol=1e-5, atol=1e-8)

    # lambda = 0.5: pg + 0.5 sgsd in value and gradient (both divided by the accumulation steps)
    pg.lambda_sgsd = 0.5
    pg.records.update(records)
    mixed_loss, mixed_grads = _loss_and_grads(pg, batch)
    torch.testing.assert_close(mixed_loss, grpo_loss + 0.5 * reference.detach() / accumulation, rtol=1e-5, atol=1e-8)
    pg.model.zero_grad()
    (0.5 * reference_sgsd() / accumulation).backward()
    # fp32 gradients of the same functions, summed in another order: 1e-4 relative, 1e-7 absolute for
    # entries near 0; a missing or doubled part would be off by O(1) relative
    moved = 0
    for name, grad in mixed_grads.items():
        sgsd_grad = dict(pg.model.named_parameters())[name].grad
        expected = grpo_grads[name] + (sgsd_grad if sgsd_grad is not None else 0.0)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7, msg=name)
        moved += sgsd_grad is not None and sgsd_grad.abs().max().item() > 0
    assert moved > 0
    logged = pg._metrics["train"]
    # logged before the accumulation scaling
    assert logged["sgsd_pg/pg_loss"][-1] == pytest.approx(grpo_loss.item() * accumulation, rel=1e-6)
    assert logged["sgsd_pg/sgsd_loss"][-1] == pytest.approx(reference.item(), rel=1e-5)


# -- the tiny recipe through the CLI, with resume ----------------------------------------------------------


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_recipe_trains_through_the_cli_and_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from sgsd.cli import main
    from sgsd.tiny import build_tiny_model, build_tokenizer

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(whole), "--quiet"]) == 0
    # interrupted at the start of step 3 (after checkpoint-2), same settings (the LR schedule depends on
    # max_steps), then started again: it resumes from checkpoint-2
    monkeypatch.setenv("SGSD_FAULT_INJECT", "rank=0,step=3")
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(split), "--quiet"]) != 0
    assert [r["step"] for r in _records(split)] == [1, 2]
    monkeypatch.delenv("SGSD_FAULT_INJECT")
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(split), "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().out
    records = _records(whole)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    keys = ("train/loss", "train/grad_norm", "train/reward_mean", "sgsd_pg/pg_loss", "sgsd_pg/sgsd_loss",
            "sgsd/helpful_fraction", "sgsd/support_mean", "train/entropy", "clip_ratio/region_mean",
            "grpo/zero_advantage_fraction")
    for record in records:
        assert all(math.isfinite(record[k]) for k in keys), record
        # the random tiny model never answers: rewards 0, every group's advantage 0, so the GRPO part is 0
        # and the step's loss is lambda (1) x the SGSD part (the parity test covers a non-zero GRPO part)
        assert record["sgsd_pg/pg_loss"] == 0.0 and record["grpo/zero_advantage_fraction"] == 1.0
        assert record["train/loss"] == pytest.approx(record["sgsd_pg/sgsd_loss"], rel=1e-6, abs=1e-9)
    assert all(r["train/grad_norm"] > 0 for r in records)
    assert "method: sgsd-pg" in (whole / "resolved_config.yaml").read_text()
    # deterministic CPU run: the resumed run ends where the uninterrupted one does
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in _records(split)] == [strip(r) for r in records]
    final, resumed = load_file(whole / "final/model.safetensors"), load_file(split / "final/model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    initial = dict(build_tiny_model(build_tokenizer(), seed=0).named_parameters())
    assert [k for k in final if k in initial and torch.equal(final[k], initial[k].detach())] == []

"""The method registry (issue 13): built-in entries, the orchestrator without per-method branches, the
worked example of docs/extending.md trained end to end, and SGSDTrainer's own loss path against an
independent per-row computation."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from sgsd.config import load_config
from sgsd.errors import ConfigError
from sgsd.methods import check_run_config, load_run_config, method_names, method_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def test_builtin_methods_and_what_they_fix():
    assert {"sgsd", "grpo", "opsd"} <= set(method_names())
    grpo = load_config(TINY / "grpo.yaml")
    assert method_spec("grpo").grpo_settings(grpo) == {
        "num_generations": 4, "beta": 0.0, "vllm_importance_sampling_correction": True}
    sgsd = load_config(TINY / "sgsd.yaml")
    assert method_spec("sgsd").grpo_settings(sgsd)["num_generations"] == 1
    assert method_spec("sgsd").needs_bank(sgsd) and not method_spec("grpo").needs_bank(grpo)
    assert method_spec("grpo").needs_bank(load_config(TINY / "grpo-skill.yaml"))
    with pytest.raises(ConfigError, match="method: expected one of .*sgsd.*got 'nope'"):
        load_run_config(TINY / "sgsd.yaml", ["method=nope"])


def test_orchestrator_never_branches_on_a_method_name():
    source = (ROOT / "src/sgsd/trainers/run.py").read_text()
    assert not re.search(r"\.method\s*(==|!=|in)\b", source)
    assert not re.search(r"['\"](sgsd|grpo|opsd)['\"]", source)


def test_a_removed_key_is_an_unknown_key_with_a_did_you_mean():
    """0.1.0 carries no compatibility spellings: the key that moved to `sgsd.num_teachers` is refused like
    any unknown key, and the refusal points to where it lives now."""
    with pytest.raises(ConfigError, match=r"unknown config key 'skills.num_teachers' \(did you mean 'sgsd.num_teachers'\?\)"):
        load_config(TINY / "sgsd.yaml", ["skills.num_teachers=5"])


def test_behaviour_check_reports_a_changed_metric_and_weight(tmp_path):
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        behaviour_check = importlib.import_module("behaviour_check")
    finally:
        sys.path.pop(0)
    for name, loss, weight in (("a", 0.5, 1.0), ("b", 0.5, 1.0), ("c", 0.25, 2.0)):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": loss, "time/step_s": loss})
                                                      + "\n")
        save_file({"w": torch.full((2,), weight)}, str(tmp_path / name / "final" / "model.safetensors"))
    assert behaviour_check.differences(tmp_path / "a", tmp_path / "b") == []
    found = behaviour_check.differences(tmp_path / "a", tmp_path / "c")
    assert len(found) == 2 and "train/loss" in found[0] and "final weights differ" in found[1]


# -- docs/extending.md's worked example, trained ------------------------------------------------------


@pytest.fixture()
def rft_module(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "extending.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "# rft_method.py" in block)
    (tmp_path / "rft_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rft_method", None)
    yield importlib.import_module("rft_method")
    sys.modules.pop("rft_method", None)


def test_rft_loss_by_hand(rft_module):
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss = rft_module.rft_loss(logps, mask, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(1.5)  # only rollout 0's two counted tokens
    loss.backward()
    assert logps.grad.tolist() == [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.slow
def test_the_extending_example_trains_through_the_orchestrator(rft_module, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from distributed_worker import fixed_rollouts

    from sgsd.data import load_problems
    from sgsd.models import load_tokenizer
    from sgsd.trainers.run import train

    cfg = load_config(TINY / "common.yaml", ["plugins=[rft_method]", "method=rft", "training.max_steps=2",
                                               "skills.attribution=false"])
    problems, _ = load_problems(cfg.data.path)
    rollout = fixed_rollouts(load_tokenizer("tiny"), {p.problem: p.answer for p in problems})
    result = train(cfg, tmp_path / "run", progress=False, rollout_func=rollout)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # kept = successful rollouts; a step with successes moves the weights
    assert all(r["rft/kept_fraction"] == r["train/reward_mean"] > 0 and r["train/grad_norm"] > 0
               and math.isfinite(r["train/loss"]) for r in records)
    assert "method: rft" in (result.output_dir / "resolved_config.yaml").read_text()


def test_the_extending_example_joins_the_demo_with_one_entry(rft_module, monkeypatch):
    from sgsd.demo import run as demo_run

    monkeypatch.setitem(demo_run.DEMO_METHODS, "rft", demo_run.DemoMethod("rft", "rft", label="RFT",
                                                                           description="rejection-sampling fine-tuning"))
    assert demo_run.parse_methods("grpo,sgsd,rft") == ("grpo", "sgsd", "rft")
    cfg = demo_run.method_config("rft", demo_run.FULL, Path("/m"), Path("/d.jsonl"), Path("/b.json"), seed=1)
    check_run_config(cfg)
    assert cfg.method == "rft" and cfg.training.prompts_per_device == demo_run.FULL.prompts_per_step
    assert demo_run.label("rft") == "RFT"


# -- SGSDTrainer's loss path against an independent computation ---------------------------------------


def test_sgsd_trainer_loss_and_gradient_equal_an_unbatched_per_row_computation(tmp_path):
    """For a fixed batch of rollouts of different lengths, the trainer's loss (batched, padded, chunked
    LM head, teachers scored in flattened rows) and its gradient equal one unbatched forward per
    (rollout, teacher) row and docs/spec.md section 4's per-token formula written out here."""
    from sgsd.prompts import ChatStyle, render_chat, student_prompt, teacher_prompt
    from sgsd.scoring import left_pad
    from sgsd.trainers.run import prepare_run

    threshold, tau, clip = 0.01, 1.0, 3.0
    cfg = load_config(TINY / "sgsd.yaml", ["skills.attribution=false", f"sgsd.confidence_threshold={threshold}"])
    trainer = prepare_run(cfg, tmp_path / "run", progress=False).trainer
    tokenizer, model = trainer.processing_class, trainer.model
    problems = ["What is 12 + 7?", "What is 3 * 4?", "What is 9 - 5?"]
    answers = ["19", "12", "4"]
    texts = [" 12 plus 7 is 19 so \\boxed{19}", " three fours make 13", " 9 minus 5 is \\boxed{4} done"]
    rewards = torch.tensor([1.0, 0.0, 1.0])
    style = ChatStyle(False)
    prompts = [tokenizer(render_chat(tokenizer, student_prompt(p), style), add_special_tokens=False)["input_ids"]
               for p in problems]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(map(len, completions))
    completion_ids = torch.full((3, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros((3, width), dtype=torch.long)
    for row, ids in enumerate(completions):  # right-padded, as TRL returns them
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask}
    inputs = [{"problem": p, "answer": a, "problem_id": str(i), "student_prompt": student_prompt(p)}
              for i, (p, a) in enumerate(zip(problems, answers))]
    extras = trainer.rollout_extras(inputs, output, rewards)
    model.zero_grad()
    loss = trainer.method_loss(model, {**output, **extras})
    loss.backward()
    trainer_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # independent: per row, no padding, full log-softmax, the formula spelled out
    def sampled_logps(prompt: list[int], completion: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]

    model.zero_grad()
    teachers = trainer.teacher_source.teachers_for(problems)
    k = trainer.teacher_source.num_teachers
    total = torch.zeros(())
    for b in range(3):
        p = sampled_logps(prompts[b], completions[b])
        counted = torch.tensor([bool(tokenizer.decode([t]).strip()) and t not in tokenizer.all_special_ids
                                for t in completions[b]], dtype=torch.float32)
        assert torch.equal(extras["sgsd_mask"][b, : len(completions[b])].float(), counted)
        n = counted.sum().clamp(min=1)
        outcome = 1.0 if rewards[b] > 0 else -1.0
        row_total = torch.zeros(())
        for j, teacher in enumerate(teachers[b][:k]):
            teacher_ids = tokenizer(render_chat(tokenizer, teacher_prompt(teacher.guidance, problems[b]), style),
                                    add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                q = sampled_logps(teacher_ids, completions[b])
            d = q - p
            support = (counted * d.detach().clamp(-clip, clip)).sum() / n
            sign = 0.0 if abs(support.item()) <= threshold else math.copysign(1.0, support.item())
            row = (counted * (math.log(2.0) - torch.nn.functional.softplus(-d.square() / (2 * tau)))).sum() / n
            row_total = row_total + teacher.weight * outcome * sign * row
        total = total + row_total / 3
    total.backward()
    # fp32: batched/padded vs unbatched matmuls and chunked vs full log-softmax agree to ~1e-6 relative
    # on log-probs near -6; the loss (a few 1e-4) and the gradients are compared within that
    torch.testing.assert_close(loss.detach(), total.detach(), rtol=1e-4, atol=1e-7)
    assert loss.abs().item() > 1e-5  # the case is not trivially zero: some teachers are not neutral
    for name, param in model.named_parameters():
        if param.grad is not None and name in trainer_grads:
            torch.testing.assert_close(trainer_grads[name], param.grad, rtol=1e-3, atol=1e-7, msg=name)


# -- the registry is the only per-method table --------------------------------------------------------


def _card_for(tmp_path, recipe: str, overrides: tuple[str, ...] = ()) -> str:
    """The model card of a run directory holding only the record a run of `recipe` writes at its start."""
    from sgsd.config import dump_config
    from sgsd.run_dir import resolved_config_text
    from sgsd.trainers.model_card import render_model_card

    cfg = load_run_config(TINY / recipe, list(overrides))
    inputs = {"skill bank": {"source": "bank.json", "skills": 4, "mistakes": 4, "version": "v1", "sha256": "ab" * 32}}
    run = tmp_path / recipe.replace(".yaml", "")
    run.mkdir()
    (run / "resolved_config.yaml").write_text(resolved_config_text(dump_config(cfg), {"inputs": inputs}))
    return render_model_card(run, 4)


def test_the_sgsd_pg_model_card_names_its_bank_lambda_group_and_sgsd_settings(tmp_path):
    card = _card_for(tmp_path, "sgsd-pg.yaml")
    assert "| method | SGSD+PG |" in card and method_spec("sgsd-pg").description in card
    assert "| skill bank | `bank.json` (4 skills, 4 mistakes, version v1, sha256 abababababab) |" in card
    for key in ("sgsd_pg.lambda_sgsd", "grpo.num_generations", "sgsd.num_teachers", "sgsd.gate_tau",
                "sgsd.confidence_threshold", "sgsd.polarity_test"):
        assert f"| `{key}` |" in card, key


@pytest.mark.parametrize("recipe,overrides,name", [
    ("grpo.yaml", (), "GRPO"), ("grpo-skill.yaml", (), "GRPO+Skill"), ("opsd-skill.yaml", (), "OPSD+Skill"),
    ("sgsd.yaml", (), "SGSD"),
])
def test_the_card_and_the_demo_take_the_method_name_from_the_registry(tmp_path, recipe, overrides, name):
    from sgsd.demo.plan import label

    card = _card_for(tmp_path, recipe, overrides)
    assert f"| method | {name} |" in card
    demo_name = {"GRPO": "grpo", "GRPO+Skill": "grpo-skill", "OPSD+Skill": "opsd-skill", "SGSD": "sgsd"}[name]
    assert label(demo_name) == name


def test_a_methods_demo_grouping_and_polarity_follow_its_registry_entry():
    from sgsd.demo.plan import DEMO_METHODS

    assert {n for n, m in DEMO_METHODS.items() if m.grouped} == {"grpo", "grpo-skill", "sgsd-pg"}
    assert {n for n, m in DEMO_METHODS.items() if m.polarity} == {"sgsd", "sgsd-z", "sgsd-z1", "sgsd-neutral",
                                                                 "sgsd-shuffled", "sgsd-pg"}
    assert all(m.grouped == method_spec(m.method).groups for m in DEMO_METHODS.values())


def test_compare_controls_the_bank_among_methods_that_use_one_and_the_grader(tmp_path):
    from sgsd.commands.compare import config_differences

    grpo, sgsd = load_run_config(TINY / "grpo.yaml"), load_run_config(TINY / "sgsd.yaml")
    assert config_differences({"grpo": grpo, "sgsd": sgsd}) == []
    other_bank = load_run_config(TINY / "grpo-skill.yaml", ["skills.bank=/elsewhere/bank.json"])
    assert config_differences({"grpo-skill": other_bank, "sgsd": sgsd}) == [
        f"skills.bank: grpo-skill='/elsewhere/bank.json', sgsd={sgsd.skills.bank!r}"]
    # GRPO without skills never reads the bank: its path may differ
    assert config_differences({"grpo": load_run_config(TINY / "grpo.yaml", ["skills.bank=x"]), "sgsd": sgsd}) == []
    flexible = load_run_config(TINY / "sgsd.yaml", ["reward.extract=flexible"])
    assert config_differences({"a": sgsd, "b": flexible}) == ["reward.extract: a='boxed', b='flexible'"]


@pytest.mark.parametrize("entry,message", [
    ("../x", "plugins: '../x' is not a module name (dotted identifiers, e.g. my_methods.rft; put its folder on "
             "PYTHONPATH)"),
    ("no_such_plugin_module", "plugins: cannot import 'no_such_plugin_module' (No module named "
                              "'no_such_plugin_module')"),
    ("broken_plugin_for_test", "plugins: importing 'broken_plugin_for_test' failed: ZeroDivisionError: division by "
                               "zero"),
])
def test_a_bad_plugins_entry_is_one_line(tmp_path, monkeypatch, capsys, entry, message):
    from sgsd.cli import main

    (tmp_path / "broken_plugin_for_test.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inherit: {TINY / 'sgsd.yaml'}\nplugins: [{json.dumps(entry)}]\n")
    assert main(["train", "--config", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"sgsd: error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_config_is_checked_once_per_command(monkeypatch):
    """The command checks its config (plugins imported, every section and method rule); `train` receives it checked
    and does not check it again. A config changed since its check is checked again."""
    import sgsd.methods as methods

    calls = {"plugins": 0, "rules": 0}
    imports, rules = methods.import_plugins, methods._run_problems

    def counting_imports(modules):
        calls["plugins"] += 1
        return imports(modules)

    def counting_rules(cfg):
        calls["rules"] += 1
        return rules(cfg)

    monkeypatch.setattr(methods, "import_plugins", counting_imports)
    monkeypatch.setattr(methods, "_run_problems", counting_rules)
    cfg = load_run_config("configs/tiny/sgsd.yaml")
    assert check_run_config(cfg) is cfg and calls == {"plugins": 1, "rules": 1}
    cfg.method = "grpo"  # changed after its check: checked again
    check_run_config(cfg)
    assert calls == {"plugins": 2, "rules": 2}
    cfg.method = "no-such-method"
    with pytest.raises(ConfigError, match="no-such-method"):
        check_run_config(cfg)

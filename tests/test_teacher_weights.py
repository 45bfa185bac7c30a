"""Teacher weights under the conditions several processes and DeepSpeed create (issue 12, defects 3-5):
an fp32 EMA shadow whatever the module's dtype, a frozen `base` copy placed like the policy, and the
skip-neutral decision scored with the student's own weights. One process, tiny model."""

from pathlib import Path

import pytest
import torch

from sgsd.config import load_config
from sgsd.trainers.teacher_weights import EMAWeights

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


def test_ema_shadow_stays_fp32_when_the_module_is_cast_to_bf16_later(tiny_model):
    # The trainer builds the EMA first; DeepSpeed then casts the module to bf16.
    ema = EMAWeights(tiny_model, decay=0.5)
    name, param = next(iter(tiny_model.named_parameters()))
    start = param.detach().clone()
    tiny_model.to(torch.bfloat16)
    with torch.no_grad():
        param.add_(2.0)
    ema.update(tiny_model)  # mixed dtypes: this used to raise in lerp_
    assert ema.shadow[name].dtype == torch.float32
    expected = torch.lerp(start, param.detach().float(), 0.5)  # the bf16 parameter, read in fp32
    torch.testing.assert_close(ema.shadow[name], expected, atol=0, rtol=0)  # one fp32 lerp: exact
    with ema.swapped_in(tiny_model):
        assert param.dtype == torch.bfloat16
        torch.testing.assert_close(param.detach(), expected.to(torch.bfloat16), atol=0, rtol=0)


def test_ema_of_a_bf16_model_with_fp32_lora_adapters_moves_by_small_steps(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model.to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # PEFT keeps LoRA in fp32
    frozen_bf16 = next(p for p in model.parameters() if not p.requires_grad)
    assert frozen_bf16.dtype == torch.bfloat16
    ema = EMAWeights(model, decay=0.99)
    name, param = next(iter(trainable.items()))
    start = ema.shadow[name].clone()
    with torch.no_grad():
        param.add_(1e-2)
    ema.update(model)
    # 0.01 * 1e-2 = 1e-4 per step: a bf16 shadow (8 mantissa bits) would round this away near 1.0
    torch.testing.assert_close(ema.shadow[name] - start, torch.full_like(start, 1e-4), atol=1e-7, rtol=0)


def test_ema_step_below_bf16_resolution_is_kept(tiny_model):
    tiny_model.to(torch.bfloat16)
    ema = EMAWeights(tiny_model, decay=0.99)
    name, param = next(iter(tiny_model.named_parameters()))
    with torch.no_grad():
        param.fill_(1.0)
    ema.shadow[name].fill_(1.0)
    with torch.no_grad():
        param.fill_(1.5)  # representable in bf16; the EMA step is 0.005 < bf16 spacing at 1.0 (2^-7)
    ema.update(tiny_model)
    expected = torch.full(param.shape, 1.005, dtype=torch.float32)  # a bf16 shadow would hold 1.0078
    torch.testing.assert_close(ema.shadow[name].float(), expected, atol=1e-6, rtol=0)  # fp32 rounding: ~1e-7


def _prepared(tmp_path, *overrides):
    from sgsd.trainers.run import prepare_run

    cfg = load_config(RECIPE, ["skills.attribution=false", *overrides])
    return prepare_run(cfg, tmp_path / "run", progress=False)


def _rollout_batch(trainer, count=4, completion_text=" 1 + 2 = 3, so \\boxed{3}"):
    """A generation batch as TRL hands it to `rollout_extras`: left-padded student prompts, completions."""
    from sgsd.data import tiny_math_problems
    from sgsd.prompts import ChatStyle, render_chat, student_prompt
    from sgsd.scoring import left_pad

    tokenizer = trainer.processing_class
    problems = tiny_math_problems(count)
    inputs = [{"problem": p.problem, "answer": p.answer, "problem_id": p.problem_id,
               "student_prompt": student_prompt(p.problem)} for p in problems]
    prompt_ids, prompt_mask = left_pad(
        [tokenizer(render_chat(tokenizer, x["student_prompt"], ChatStyle(False)), add_special_tokens=False)["input_ids"]
         for x in inputs], tokenizer.pad_token_id)
    completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    completion_ids = torch.tensor([completion] * count)
    output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": torch.ones_like(completion_ids)}
    return inputs, output, torch.tensor([1.0, 0.0] * (count // 2))


def test_frozen_base_teacher_follows_the_policy_dtype(tmp_path):
    run = _prepared(tmp_path, "sgsd.teacher=base")
    trainer = run.trainer
    assert trainer.frozen is not None  # full fine-tuning: a frozen copy of the start
    trainer.model.to(torch.bfloat16)  # as DeepSpeed does after the trainer is built
    inputs, output, rewards = _rollout_batch(trainer)
    extras = trainer.rollout_extras(inputs, output, rewards)
    policy = next(trainer.model.parameters())
    frozen = next(trainer.frozen.model.parameters())
    assert (frozen.dtype, frozen.device) == (policy.dtype, policy.device)
    assert torch.isfinite(extras["teacher_logps"]).all()


def test_frozen_copy_moves_to_the_policys_device(tiny_model):
    """DeepSpeed and accelerate move the policy after the copy is made. On a CPU-only machine the "meta"
    device stands for the accelerator: the copy must follow the policy there, not only its dtype."""
    from sgsd.trainers.teacher_weights import FrozenCopy

    frozen = FrozenCopy(tiny_model)
    policy = tiny_model.to("meta")
    placed = frozen.placed_like(policy)
    assert {p.device.type for p in placed.parameters()} == {"meta"}
    assert {p.dtype for p in placed.parameters()} == {torch.float32}


@pytest.mark.parametrize("teacher", ["base", "ema"])
def test_skip_neutral_decision_scores_the_student_with_the_students_weights(tmp_path, teacher):
    """Full fine-tuning: `base` scores on a frozen copy, `ema` swaps the shadow in. The student row of
    the skip decision must use neither: it is the live policy on its own prompt."""
    from contextlib import nullcontext

    from sgsd.objectives import teacher_polarity
    from sgsd.scoring import completion_logprobs

    threshold = 1.0
    run = _prepared(tmp_path, f"sgsd.teacher={teacher}", "sgsd.skip_neutral_rows=true",
                    f"sgsd.confidence_threshold={threshold}")
    trainer = run.trainer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the student has moved away from the teacher's weights
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    inputs, output, rewards = _rollout_batch(trainer)
    extras = trainer.rollout_extras(inputs, output, rewards)

    def decision(model, context=nullcontext()):
        with torch.no_grad(), context:
            student = completion_logprobs(model, output["prompt_ids"], output["prompt_mask"],
                                          output["completion_ids"], output["completion_mask"])
        _, polarity = teacher_polarity(student, extras["teacher_logps"], extras["sgsd_mask"], rewards,
                                       extras["teacher_weights"], settings=trainer.settings)
        return polarity.ne(0).any(dim=-1)

    with_student_weights = decision(trainer.model)
    if teacher == "base":
        with_teacher_weights = decision(trainer.frozen.model)
    else:
        with_teacher_weights = decision(trainer.model, trainer.ema.swapped_in(trainer.unwrapped_model))
    # the case discriminates: scored with the teacher's weights, the decision would differ
    assert not torch.equal(with_student_weights, with_teacher_weights)
    assert torch.equal(extras["sgsd_active"], with_student_weights)

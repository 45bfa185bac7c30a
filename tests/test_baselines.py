"""OPSD trainer math and wiring (issue 5): the chunked loss from hidden states equals `opsd_loss` on
full logits, keeps one chunk of logits alive, and the trainer's loss on a real rollout batch equals a
plain reference computed from `model(...).logits` of the student and teacher prompts.

`opsd_loss` itself against TRL's generalized JSD is tested in tests/test_opsd_loss.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sgsd.objectives import opsd_loss, opsd_sampled_token_loss
from sgsd.scoring import HeadWeights, opsd_loss_from_hidden

# fp32 throughout; the chunked and the full computation differ only in summation order over <= 40
# tokens of O(1) terms, so differences are a few ulps of fp32 (~1e-7 relative): 1e-5 leaves margin.
TOL = dict(rtol=1e-5, atol=1e-6)


def _hidden_case(n=13, h=8, v=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, h, generator=gen, requires_grad=True)
    teacher = torch.randn(n, h, generator=gen)
    head = torch.nn.Linear(h, v, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=gen))
        head.bias.copy_(torch.randn(v, generator=gen))
    return student, teacher, head


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunked_loss_equals_full_logits_loss_in_value_and_gradient(beta, chunk):
    student, teacher, head = _hidden_case()
    temperature = 1.3
    out = opsd_loss_from_hidden(student, teacher, head, beta=beta, temperature=temperature, chunk_tokens=chunk)
    grads = torch.autograd.grad(out.loss, [student, head.weight, head.bias])

    student_ref = student.detach().clone().requires_grad_(True)
    head_ref = copy.deepcopy(head)
    full = opsd_loss(head_ref(student_ref)[None], head_ref(teacher)[None].detach(), torch.ones(1, 13, dtype=torch.bool),
                     beta=beta, temperature=temperature)
    grads_ref = torch.autograd.grad(full.loss, [student_ref, head_ref.weight, head_ref.bias])

    torch.testing.assert_close(out.loss, full.loss, **TOL)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **TOL)
    for key in ("divergence_mean", "student_entropy_mean", "teacher_entropy_mean"):
        torch.testing.assert_close(out.metrics[key], full.metrics[key], **TOL)
        assert not out.metrics[key].requires_grad


def test_teacher_head_is_used_for_teacher_logits_only():
    student, teacher, head = _hidden_case()
    other = HeadWeights(torch.randn_like(head.weight), torch.randn_like(head.bias))
    out = opsd_loss_from_hidden(student, teacher, head, beta=0.0, temperature=1.0, chunk_tokens=5, teacher_head=other)
    teacher_logits = torch.nn.functional.linear(teacher, other.weight, other.bias)
    full = opsd_loss(head(student)[None], teacher_logits[None], torch.ones(1, 13, dtype=torch.bool), beta=0.0)
    torch.testing.assert_close(out.loss, full.loss, **TOL)
    (grad,) = torch.autograd.grad(out.loss, [head.weight])
    assert grad.abs().sum() > 0  # gradient reaches the student head, never the detached teacher head
    assert not other.weight.requires_grad


def _largest_saved(fn):
    """Largest tensor (elements) autograd saves for the backward while `fn()` runs, and the result."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return max(sizes), result


def test_logits_live_one_chunk_at_a_time():
    # V >> H so that any [N, V] logits tensor stands out from the [N, H] hidden states.
    student, teacher, head = _hidden_case(n=40, h=4, v=512)
    chunk = 4
    largest, out = _largest_saved(
        lambda: opsd_loss_from_hidden(student, teacher, head, beta=0.0, temperature=1.0, chunk_tokens=chunk))
    assert largest <= chunk * 512 < 40 * 512
    # the measurement does see full logits when they are kept (negative control)
    largest_full, _ = _largest_saved(lambda: opsd_loss(head(student)[None], head(teacher)[None].detach(),
                                                       torch.ones(1, 40, dtype=torch.bool), beta=0.0))
    assert largest_full >= 40 * 512
    out.loss.backward()  # and the checkpointed chunks recompute correctly
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_no_tokens_gives_a_zero_loss_with_a_gradient_path():
    student, teacher, head = _hidden_case()
    out = opsd_loss_from_hidden(student[:0], teacher[:0], head, beta=0.0, temperature=1.0)
    out.loss.backward()  # no "does not require grad" error: empty micro-batches keep DDP and accumulation in step
    assert out.loss.item() == 0.0 and student.grad.abs().sum() == 0


def test_bad_shapes_are_refused():
    student, teacher, head = _hidden_case()
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        opsd_loss_from_hidden(student, teacher[:5], head, beta=0.0, temperature=1.0)


# ---------------------------------------------------------------------------------------------
# The trainer on a hand-built rollout batch of the tiny model


ROWS = [
    {"problem": "What is 2 + 3?", "answer": "5", "problem_id": "a", "skill_block": "SKILLS-A"},
    {"problem": "Tom has 7 apples and buys 4 more. How many apples does he have?", "answer": "11",
     "problem_id": "b", "skill_block": "SKILLS-B"},
]


def _constant_reward(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def _make_trainer(tmp_path, model, tokenizer, peft_config=None, **settings):
    from datasets import Dataset

    from sgsd.config import OPSDSettings
    from sgsd.prompts import ChatStyle
    from sgsd.trainers.opsd_trainer import OPSDTrainer
    from sgsd.trl_adapter import make_grpo_config

    args = make_grpo_config(num_generations=1, output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                            per_device_train_batch_size=2, max_completion_length=8, temperature=0.7,
                            gradient_checkpointing=False, max_steps=1)
    rows = [dict(r, prompt=[{"role": "user", "content": r["problem"]}], student_prompt=r["problem"]) for r in ROWS]
    return OPSDTrainer(settings=OPSDSettings(**settings), teacher_style=ChatStyle(False), model=model,
                       reward_funcs=[_constant_reward], args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=peft_config)


def _ids(tokenizer, text):
    from sgsd.prompts import ChatStyle, render_chat

    return tokenizer(render_chat(tokenizer, text, ChatStyle(False)), add_special_tokens=False)["input_ids"]


def _rollout_batch(trainer, tokenizer):
    """Student prompts (left-padded) and completions of lengths 5 and 3 (right-padded), as TRL builds them."""
    from sgsd.prompts import student_prompt
    from sgsd.scoring import left_pad

    prompts = [_ids(tokenizer, student_prompt(r["problem"])) for r in ROWS]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(10, 200, (2, 5), generator=gen)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    completion_ids[1, 3:] = tokenizer.pad_token_id
    output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask}
    output.update(trainer.rollout_extras(ROWS, output, torch.tensor([1.0, 0.0])))
    return output, prompts


def _reference_logits(model, prompts, completion_ids, completion_mask):
    """[N, V] logits of every real completion token, one unpadded `model(...)` call per row."""
    rows = []
    for prompt, ids, mask in zip(prompts, completion_ids, completion_mask):
        completion = ids[mask.bool()].tolist()
        full = torch.tensor([prompt + completion])
        logits = model(input_ids=full).logits[0]
        rows.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)])
    return torch.cat(rows)


def _teacher_prompts(tokenizer, skills=False):
    from sgsd.prompts import opsd_teacher_prompt, reference_from_answer

    return [_ids(tokenizer, opsd_teacher_prompt(r["problem"], reference_from_answer(r["answer"]),
                                                guidance=r["skill_block"] if skills else None)) for r in ROWS]


@pytest.mark.parametrize("skills", [False, True])
def test_trainer_loss_matches_plain_reference_with_base_teacher(tmp_path, tiny_tokenizer, tiny_model, skills):
    # copied before TRL patches `model.forward` (a deep copy made after would call the original's forward)
    initial = copy.deepcopy(tiny_model)
    trainer = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, teacher="base", beta=0.5, skills=skills,
                            logprob_chunk_tokens=3)
    with torch.no_grad():  # the student moves away from the initial weights; a base teacher must not follow
        for param in tiny_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batch, student_prompts = _rollout_batch(trainer, tiny_tokenizer)
    loss = trainer.method_loss(trainer.model, batch)

    mask = batch["completion_mask"]
    student_logits = _reference_logits(tiny_model, student_prompts, batch["completion_ids"], mask)
    with torch.no_grad():
        teacher_logits = _reference_logits(initial, _teacher_prompts(tiny_tokenizer, skills),
                                           batch["completion_ids"], mask)
    reference = opsd_loss(student_logits[None], teacher_logits[None], torch.ones(1, 8, dtype=torch.bool),
                          beta=0.5, temperature=0.7)
    # padded batch vs unpadded rows: attention over padding changes summation order only
    torch.testing.assert_close(loss, reference.loss, rtol=1e-4, atol=1e-6)
    weight = tiny_model.get_input_embeddings().weight
    (got,) = torch.autograd.grad(loss, [weight])
    (want,) = torch.autograd.grad(reference.loss, [weight])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert loss.item() > 0


def test_teacher_prompt_holds_reference_and_skill_block(tmp_path, tiny_tokenizer, tiny_model):
    trainer = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, skills=True)
    text = trainer.teacher_text(ROWS[1])
    assert text.startswith("SKILLS-B\n\n") and "\\boxed{11}" in text and ROWS[1]["problem"] in text
    plain = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, skills=False).teacher_text(ROWS[1])
    assert "SKILLS-B" not in plain and "\\boxed{11}" in plain
    with pytest.raises(ValueError, match="no skill block"):
        trainer.teacher_text(dict(ROWS[0], skill_block=""))


def test_sampled_token_variant_and_live_teacher(tmp_path, tiny_tokenizer, tiny_model):
    trainer = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, teacher="live", sampled_token=True)
    batch, student_prompts = _rollout_batch(trainer, tiny_tokenizer)
    loss = trainer.method_loss(trainer.model, batch)
    mask = batch["completion_mask"].bool()
    targets = batch["completion_ids"][mask]

    def sampled(logits):
        return torch.log_softmax(logits / 0.7, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    student = sampled(_reference_logits(tiny_model, student_prompts, batch["completion_ids"], mask))
    with torch.no_grad():  # live teacher: the current weights, no gradient
        teacher = sampled(_reference_logits(tiny_model, _teacher_prompts(tiny_tokenizer), batch["completion_ids"], mask))
    reference = opsd_sampled_token_loss(student[None], teacher[None], torch.ones(1, 8, dtype=torch.bool))
    torch.testing.assert_close(loss, reference.loss, rtol=1e-4, atol=1e-6)
    weight = tiny_model.get_input_embeddings().weight
    (got,) = torch.autograd.grad(loss, [weight])
    (want,) = torch.autograd.grad(reference.loss, [weight])
    # the gradient is weighted by r_t = p_t - q_t, a difference of two ~-6 log-probs that padding perturbs
    # by ~1e-6 (fp32): compare to 1e-4 of the gradient's scale rather than element by element
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert want.abs().max() > 0


def test_ema_teacher_scores_with_ema_weights_and_restores_the_student(tmp_path, tiny_tokenizer, tiny_model):
    initial, ema_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)  # before TRL patches forward
    trainer = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, teacher="ema", ema_decay=0.5)
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    trainer.ema_step()  # ema = (initial + current) / 2
    with torch.no_grad():
        for (name, param), start in zip(ema_model.named_parameters(), initial.parameters()):
            param.copy_(0.5 * start + 0.5 * dict(tiny_model.named_parameters())[name])
    current = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    batch, student_prompts = _rollout_batch(trainer, tiny_tokenizer)
    loss = trainer.method_loss(trainer.model, batch)
    loss.backward()  # the EMA swap happened before the student forward: backward must not fail
    for name, param in tiny_model.named_parameters():
        assert torch.equal(param.detach(), current[name])
    mask = batch["completion_mask"]
    student_logits = _reference_logits(tiny_model, student_prompts, batch["completion_ids"], mask)
    with torch.no_grad():
        teacher_logits = _reference_logits(ema_model, _teacher_prompts(tiny_tokenizer), batch["completion_ids"], mask)
    reference = opsd_loss(student_logits[None], teacher_logits[None], torch.ones(1, 8, dtype=torch.bool),
                          beta=0.0, temperature=0.7)
    torch.testing.assert_close(loss.detach(), reference.loss.detach(), rtol=1e-4, atol=1e-6)


def test_base_teacher_under_lora_is_the_model_with_the_adapter_off(tmp_path, tiny_tokenizer, tiny_model):
    from peft import LoraConfig

    base = copy.deepcopy(tiny_model)  # before TRL patches forward and PEFT wraps the model
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    trainer = _make_trainer(tmp_path, tiny_model, tiny_tokenizer, peft_config=lora, teacher="base")
    policy = trainer.model
    with torch.no_grad():  # LoRA B starts at zero (adapter = identity): move it so that base != policy
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.5 * torch.randn_like(param))
    batch, student_prompts = _rollout_batch(trainer, tiny_tokenizer)
    loss = trainer.method_loss(policy, batch)
    mask = batch["completion_mask"]
    student_logits = _reference_logits(policy, student_prompts, batch["completion_ids"], mask)
    with torch.no_grad():
        teacher_logits = _reference_logits(base, _teacher_prompts(tiny_tokenizer), batch["completion_ids"], mask)
        live_teacher = _reference_logits(policy, _teacher_prompts(tiny_tokenizer), batch["completion_ids"], mask)
    assert (teacher_logits - live_teacher).abs().max() > 1e-2  # the check below can tell base from live
    reference = opsd_loss(student_logits[None], teacher_logits[None], torch.ones(1, 8, dtype=torch.bool),
                          beta=0.0, temperature=0.7)
    torch.testing.assert_close(loss, reference.loss, rtol=1e-4, atol=1e-6)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    grads = torch.autograd.grad(loss, lora_b)
    want = torch.autograd.grad(reference.loss, lora_b)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad is False for n, p in policy.named_parameters() if "lora" not in n)

"""OPSD baseline (SPEC section 5): on-policy self-distillation from a reference-answer teacher.

The student samples a completion from its plain prompt (TRL generates and grades; one rollout per
prompt). The teacher is the same model given the reference solution (on DAPO only the final answer:
"The answer is \\boxed{GT}.") and the instruction to derive the answer independently
(`sgsd.prompts.opsd_teacher_prompt`), rendered with the student's chat style. Which weights score as
teacher: `base` (adapter disabled, or a frozen copy of the initial weights under full fine-tuning; the
OPSD default), `live` (current weights, no gradient) or `ema`.

Loss (`opsd.sampled_token`):
- false: `sgsd.objectives.opsd_loss`, the generalized JSD over the full vocabulary at the sampling
  temperature (beta = 0: forward KL(teacher || student)), mean over the micro-batch's completion tokens;
- true: `sgsd.objectives.opsd_sampled_token_loss` on sampled-token log-probs.

Memory: the rollout batch holds only the teacher prompt ids ([B, L]). The teacher runs in the loss
phase, without gradient, and BEFORE the student forward (an EMA teacher swaps weights in place, which
must not happen between the student's forward and backward). Only final hidden states [N, H] of the
N completion tokens are kept; logits exist for `logprob_chunk_tokens` positions at a time, and each
chunk is recomputed in the backward (`opsd_loss_from_hidden`). Scoring in the loss phase is exact
for a live or EMA teacher whatever `steps_per_generation` is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sgsd.config import OPSDSettings
from sgsd.objectives import OPSDLossOutput, opsd_loss, opsd_sampled_token_loss
from sgsd.prompts import ChatStyle, opsd_teacher_prompt, reference_from_answer, render_chat
from sgsd.scoring import hidden_for_completion, left_pad, lm_parts, token_logprobs
from sgsd.trainers.teacher_weights import EMAWeights, FrozenCopy, is_peft, teacher_context_factory
from sgsd.trl_adapter import HookedGRPOTrainer


def _chunk_jsd(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, beta, temperature):
    student_logits = F.linear(student_hidden, weight, bias)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    rows = student_hidden.size(0)
    out = opsd_loss(student_logits[None], teacher_logits[None], student_hidden.new_ones((1, rows), dtype=torch.bool),
                    beta=beta, temperature=temperature, chunk_size=rows)
    metrics = out.metrics
    return out.loss, metrics["divergence_mean"], metrics["student_entropy_mean"], metrics["teacher_entropy_mean"]


@dataclass(frozen=True)
class HeadWeights:
    """A detached LM head (weight [V, H], bias [V] or None); usable wherever `lm_head.weight/.bias` is read."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, head: torch.nn.Module, *, copy: bool = False) -> "HeadWeights":
        bias = getattr(head, "bias", None)
        weight, bias = head.weight.detach(), bias.detach() if bias is not None else None
        if copy:
            weight, bias = weight.clone(), bias.clone() if bias is not None else None
        return cls(weight, bias)


def opsd_loss_from_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: torch.nn.Module, *,
                          beta: float, temperature: float, chunk_tokens: int = 1024,
                          teacher_head: HeadWeights | None = None) -> OPSDLossOutput:
    """`opsd_loss` over N completion tokens given final hidden states, in chunks of `chunk_tokens`.

    student_hidden [N, H] (gradient flows), teacher_hidden [N, H] (detached): one row per completion
    token that counts (padding already removed). Logits come from `lm_head` for the student and from
    `teacher_head` (default: the same head, detached) for the teacher.
    Equal in value and gradient to `opsd_loss(head(student_hidden)[None], head(teacher_hidden)[None],
    ones)`: the mean over N of per-chunk means weighted by chunk size. Each chunk is checkpointed, so
    fp32 [chunk_tokens, V] logits exist for one chunk at a time, in the forward and in the backward.
    Metrics: divergence_mean, student_entropy_mean, teacher_entropy_mean (detached, token means; 0 when N = 0).
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states must both be [N, H], got {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}")
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    teacher_head = teacher_head or HeadWeights.of(lm_head)
    teacher_hidden = teacher_hidden.detach()
    total = student_hidden.size(0)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    sums = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(4)]
    sums[0] = sums[0] + 0.0 * student_hidden.sum()  # N = 0: a zero loss still connected to the graph (DDP, GA)
    step = max(int(chunk_tokens), 1)
    for start in range(0, total, step):
        args = (student_hidden[start : start + step], teacher_hidden[start : start + step], weight, bias,
                teacher_head.weight, teacher_head.bias, beta, temperature)
        parts = checkpoint(_chunk_jsd, *args, use_reentrant=False) if needs_grad else _chunk_jsd(*args)
        share = args[0].size(0) / total
        sums = [acc + part.float() * share for acc, part in zip(sums, parts)]
    loss, divergence, student_entropy, teacher_entropy = sums
    metrics = {"divergence_mean": divergence.detach(), "student_entropy_mean": student_entropy.detach(),
               "teacher_entropy_mean": teacher_entropy.detach()}
    return OPSDLossOutput(loss=loss, metrics=metrics)


class OPSDTrainer(HookedGRPOTrainer):
    """OPSD and OPSD+Skill on TRL's GRPOTrainer (generation, PEFT, accelerate), with its own loss."""

    has_method_loss = True

    def __init__(self, *, settings: OPSDSettings, teacher_style: ChatStyle, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.teacher_style = teacher_style
        model = self.unwrapped_model
        self.ema = EMAWeights(model, settings.ema_decay) if settings.teacher == "ema" else None
        self.frozen = FrozenCopy(model) if settings.teacher == "base" and not is_peft(model) else None
        self.teacher_context = teacher_context_factory(settings.teacher, lambda: self.unwrapped_model, ema=self.ema)

    # -- generation phase -----------------------------------------------------------------------
    def teacher_text(self, row: dict[str, Any]) -> str:
        """The teacher's user turn for one dataset row (skill block first for OPSD+Skill)."""
        guidance = None
        if self.settings.skills:
            guidance = row.get("skill_block")
            if not guidance:
                raise ValueError(f"opsd.skills is set but problem {row.get('problem_id')} has no skill block")
        return opsd_teacher_prompt(row["problem"], reference_from_answer(str(row["answer"])), guidance=guidance)

    def rollout_extras(self, inputs, output, rewards):
        self.record_metric("train/reward_mean", rewards.float().mean())
        tokenizer = self.processing_class
        ids = [tokenizer(render_chat(tokenizer, self.teacher_text(row), self.teacher_style),
                         add_special_tokens=False)["input_ids"] for row in inputs]
        prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id, output["completion_ids"].device)
        return {"opsd_teacher_prompt_ids": prompt_ids, "opsd_teacher_prompt_mask": prompt_mask}

    # -- loss phase -----------------------------------------------------------------------------
    def _teacher_model(self) -> Any:
        # DeepSpeed moves and casts the policy after the frozen copy was made: follow it
        return self.model if self.frozen is None else self.frozen.placed_like(self.unwrapped_model)

    def method_loss(self, model, inputs):
        completion_mask = inputs["completion_mask"]
        length = int(completion_mask.sum(-1).max().clamp(min=1))  # trim the padding of this micro-batch
        completion_ids, completion_mask = inputs["completion_ids"][:, :length], completion_mask[:, :length]
        started = time.perf_counter()
        teacher_model = self._teacher_model()
        _, teacher_lm_head = lm_parts(teacher_model)
        with torch.no_grad(), self.teacher_context():
            teacher_hidden = hidden_for_completion(
                teacher_model, torch.cat([inputs["opsd_teacher_prompt_ids"], completion_ids], dim=1),
                torch.cat([inputs["opsd_teacher_prompt_mask"], completion_mask], dim=1), length)
            # an EMA teacher's head exists only inside the context: keep a copy if it is trainable
            teacher_head = HeadWeights.of(teacher_lm_head,
                                          copy=self.ema is not None and teacher_lm_head.weight.requires_grad)
        self.step_timing["teacher_s"] += time.perf_counter() - started
        student_hidden = hidden_for_completion(
            model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1), length)
        _, head = lm_parts(model)
        if self.settings.sampled_token:
            student_logps = token_logprobs(student_hidden, head, completion_ids, temperature=self.temperature,
                                           chunk_tokens=self.settings.logprob_chunk_tokens)
            with torch.no_grad():
                teacher_logps = token_logprobs(teacher_hidden, teacher_head, completion_ids,  # type: ignore[arg-type]
                                               temperature=self.temperature,
                                               chunk_tokens=self.settings.logprob_chunk_tokens)
            out = opsd_sampled_token_loss(student_logps, teacher_logps, completion_mask)
        else:
            counted = completion_mask.bool()
            out = opsd_loss_from_hidden(student_hidden[counted], teacher_hidden[counted], head,
                                        beta=self.settings.beta, temperature=self.temperature,
                                        chunk_tokens=self.settings.logprob_chunk_tokens,
                                        teacher_head=teacher_head)
        self.record_metric("opsd/loss", out.loss)
        for key, value in out.metrics.items():
            if key != "mask_keep_fraction":  # padding-dependent; the token count below says more
                self.record_metric(f"opsd/{key}", value)
        self.record_metric("opsd/completion_tokens", completion_mask.sum(-1).float().mean())
        return out.loss

    # -- optimizer step -------------------------------------------------------------------------
    def ema_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.unwrapped_model)


"""OPSD baseline (docs/spec.md section 5): on-policy self-distillation from a reference-answer teacher.

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
chunk is recomputed in the backward (`opsd_loss_from_hidden`). Rollouts of one problem share the
teacher prompt: with `opsd.prefix_reuse` it runs once per micro-batch
(`sgsd.scoring.teacher_completion_hidden`). Scoring in the loss phase is exact for a live or EMA teacher
whatever `steps_per_generation` is.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sgsd.config import OPSDSettings, RunConfig
from sgsd.lm_head import head_vocab_size
from sgsd.methods import TrainerContext
from sgsd.objectives import opsd_sampled_token_loss
from sgsd.prompts import ChatStyle, opsd_teacher_prompt, reference_from_answer, render_chat
from sgsd.scoring import (HeadWeights, hidden_for_completion, left_pad, lm_parts, opsd_loss_from_hidden,
                          teacher_completion_hidden, token_logprobs)
from sgsd.trainers.teacher_weights import SelfTeacher
from sgsd.trl_adapter import HookedGRPOTrainer, RolloutBatch, RolloutRow


class OPSDTrainer(SelfTeacher, HookedGRPOTrainer):
    """OPSD and OPSD+Skill on TRL's GRPOTrainer (generation, PEFT, accelerate), with its own loss."""

    has_method_loss = True

    def __init__(self, *, settings: OPSDSettings, teacher_style: ChatStyle, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.teacher_style = teacher_style
        self.setup_teacher(settings.teacher, settings.ema_decay)
        vocab = head_vocab_size(lm_parts(self.model)[1])
        self.chunk_tokens = settings.chunk_tokens(vocab)

    # -- generation phase -----------------------------------------------------------------------
    def teacher_text(self, row: RolloutRow) -> str:
        """The teacher's user turn for one dataset row (skill block first for OPSD+Skill)."""
        guidance = None
        if self.settings.skills:
            guidance = row.get("skill_block")
            if not guidance:
                raise ValueError(f"opsd.skills is set but problem {row.get('problem_id')} has no skill block")
        return opsd_teacher_prompt(row["problem"], reference_from_answer(str(row["answer"])), guidance=guidance)

    def rollout_extras(self, inputs: list[RolloutRow], output: RolloutBatch,
                       rewards: torch.Tensor) -> RolloutBatch:
        self.record_metric("train/reward_mean", rewards.float().mean())
        tokenizer = self.processing_class
        ids = [tokenizer(render_chat(tokenizer, self.teacher_text(row), self.teacher_style),
                         add_special_tokens=False)["input_ids"] for row in inputs]
        prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id, output["completion_ids"].device)
        return {"opsd_teacher_prompt_ids": prompt_ids, "opsd_teacher_prompt_mask": prompt_mask}

    # -- loss phase -----------------------------------------------------------------------------
    def method_loss(self, model: torch.nn.Module, inputs: RolloutBatch) -> torch.Tensor:
        completion_mask = inputs["completion_mask"]
        length = int(completion_mask.sum(-1).max().clamp(min=1))  # trim the padding of this micro-batch
        completion_ids, completion_mask = inputs["completion_ids"][:, :length], completion_mask[:, :length]
        started = time.perf_counter()
        teacher_model = self.teacher_scoring_model()
        _, teacher_lm_head = lm_parts(teacher_model)
        with torch.no_grad(), self.teacher_context():
            teacher_hidden = teacher_completion_hidden(
                teacher_model, inputs["opsd_teacher_prompt_ids"], inputs["opsd_teacher_prompt_mask"], completion_ids,
                completion_mask, pad_id=self.processing_class.pad_token_id, prefix_reuse=self.settings.prefix_reuse)
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
                                           chunk_tokens=self.chunk_tokens)
            with torch.no_grad():
                teacher_logps = token_logprobs(teacher_hidden, teacher_head, completion_ids,  # type: ignore[arg-type]
                                               temperature=self.temperature,
                                               chunk_tokens=self.chunk_tokens)
            out = opsd_sampled_token_loss(student_logps, teacher_logps, completion_mask)
        else:
            counted = completion_mask.bool()
            out = opsd_loss_from_hidden(student_hidden[counted], teacher_hidden[counted], head,
                                        beta=self.settings.beta, temperature=self.temperature,
                                        chunk_tokens=self.chunk_tokens,
                                        teacher_head=teacher_head)
        self.record_metric("opsd/loss", out.loss)
        for key, value in out.metrics.items():
            if key != "mask_keep_fraction":  # padding-dependent; the token count below says more
                self.record_metric(f"opsd/{key}", value)
        self.record_metric("opsd/completion_tokens", completion_mask.sum(-1).float().mean())
        return out.loss


def opsd_trainer_kwargs(cfg: "RunConfig", context: "TrainerContext") -> dict[str, Any]:
    """OPSDTrainer's own constructor arguments (the registry names this function for `opsd`)."""
    return {"settings": cfg.opsd, "teacher_style": context.teacher_style}

"""The SGSD loss phase, as the trainer runs it and as the paper's public code runs it (docs/spec.md sections 4, 9).

Both functions take the same model, `SyntheticBatch` and `SGSDSettings` (the trainer's settings object,
whole), compute the same SGSD loss (`sgsd_loss`) and leave the same gradient in the model's `.grad` (up to float summation
order: `tests/test_bench_phases.py` checks it), so timing one against the other is a fair comparison.

`real_loss_phase` is the project's path, the trainer's own functions: K teacher forwards without
gradient through `sgsd.scoring.score_teachers` (rows of (rollout, teacher) flattened, sorted by length,
batched, left padded, trimmed to each batch's longest completion, log-probs of the sampled token from
chunked logsumexp), as `SGSDTrainer.rollout_extras` calls it, then ONE student forward and backward per
rollout through `sgsd.loss_phase.sgsd_loss_phase` (chunked LM head), the function `SGSDTrainer.method_loss`
calls (full-vocabulary mode), with `skip_neutral_rows` when asked.

`naive_loss_phase` mirrors the public code's pattern (docs/spec.md section 9):
- item 1: every (rollout, teacher) pair is one row holding BOTH the student input and the teacher input;
  the student forward runs on all B x K rows with gradient, so the backward also runs K times per
  rollout (K student passes where one is needed);
- item 2: full-vocabulary logits of every position are returned by the model's own forward, and the
  log-softmax over the full vocabulary of every completion position is materialised, for the student
  rows ([B K, T, V], kept for the backward) and the teacher rows ([B K, T, V], no gradient); the
  sampled-token log-probs are gathered from them;
- item 3: prompts are right-padded to the batch's longest prompt and followed by the completion (the
  first completion token is scored at the last real prompt token);
- item 8: completions keep the full padded length T (no trimming), rows are not sorted by length.
It is batched like the public code (all rows of a micro-batch in one forward), not looped row by row,
which would only make it slower. One deliberate difference: positions are counted over real tokens
(`public_positions=False`), so the right-padding gap does not shift rotary positions (item 3's
defect) and the loss equals the real path's; the compute is the same whichever positions are used.
`public_positions=True` reproduces the public code's positions (values then differ from the real path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgsd.benchmarking.synthetic import PAD_ID, SyntheticBatch
from sgsd.loss_settings import SGSDSettings

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PhaseOutput:
    """loss: detached 0-d; polarity: [B, K] int64 rho; active_rollouts: rollouts that got a student backward."""

    loss: torch.Tensor
    polarity: torch.Tensor
    active_rollouts: int


def real_loss_phase(model: torch.nn.Module, batch: SyntheticBatch,
                    settings: SGSDSettings = SGSDSettings()) -> PhaseOutput:
    """Teacher scoring + one student forward/backward per rollout, through the trainer's own calls; calls backward.

    The generation phase of `SGSDTrainer.rollout_extras` (`score_teachers`, and with `skip_neutral_rows`
    one gradient-free student pass deciding `sgsd.loss_phase.active_rollouts`), then the loss phase of
    `SGSDTrainer.method_loss` (`sgsd.loss_phase.sgsd_loss_phase`, full-vocabulary mode).
    """
    from sgsd.loss_phase import active_rollouts, sgsd_loss_phase
    from sgsd.scoring import left_pad, lm_parts, score_teachers

    chunk_tokens = settings.chunk_tokens(lm_parts(model)[1].weight.size(0))
    logps = score_teachers(
        model, batch.teacher_prompt_ids, batch.completion_ids, batch.completion_mask, pad_id=PAD_ID,
        batch_rows=settings.teacher_batch_size, chunk_tokens=chunk_tokens, prefix_reuse=settings.prefix_reuse,
    )
    prompt_ids, prompt_mask = left_pad(batch.student_prompt_ids, PAD_ID, batch.completion_ids.device)
    tensors = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=batch.completion_ids,
                   completion_mask=batch.completion_mask, counted_mask=batch.counted_mask, rewards=batch.rewards,
                   teacher_weights=batch.teacher_weights, teacher_logps=logps)
    hyper = dict(settings=settings, chunk_tokens=chunk_tokens)
    active = active_rollouts(model, **tensors, **hyper) if settings.skip_neutral_rows else None
    phase = sgsd_loss_phase(model, **tensors, **hyper, active=active)
    if phase.loss is None:
        raise FloatingPointError("real_loss_phase: non-finite student or teacher log-probs")
    phase.loss.backward()
    return PhaseOutput(phase.loss.detach(), phase.polarity, int(phase.rows.numel()))


def right_pad_rows(sequences: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> (ids [N, L], mask [N, L]), as the public code lays out prompts."""
    from sgsd.scoring import right_pad

    return right_pad(sequences, PAD_ID, device)


def _full_vocab_logps(model: torch.nn.Module, prompts: list[list[int]], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, public_positions: bool) -> torch.Tensor:
    """[N, T] sampled-token log-probs via full logits [N, P + T, V] and log-softmax [N, T, V] (materialised)."""
    import torch

    from sgsd.scoring import position_ids_from_mask

    prompt_ids, prompt_mask = right_pad_rows(prompts, completion_ids.device)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = None if public_positions else position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    # The first completion token is predicted at each row's LAST REAL prompt token, not at the padded
    # end of the prompt block; the others at the positions just before them.
    rows = torch.arange(logits.size(0), device=logits.device)
    first = logits[rows, prompt_mask.sum(-1) - 1].unsqueeze(1)
    window = torch.cat([first, logits[:, prompt_ids.size(1) : -1]], dim=1).float()  # [N, T, V]
    log_probs = torch.log_softmax(window, dim=-1)
    return log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def naive_loss_phase(model: torch.nn.Module, batch: SyntheticBatch, settings: SGSDSettings = SGSDSettings(), *,
                     public_positions: bool = False) -> PhaseOutput:
    """The public code's pattern (module docstring): B x K rows, K student passes, full-vocabulary
    log-softmax of student and teacher rows; calls backward. The batching and chunking settings are unused."""
    import torch

    from sgsd.objectives import sgsd_loss

    b, k, t = batch.num_rollouts, batch.num_teachers, batch.completion_ids.size(1)
    completion_ids = batch.completion_ids.repeat_interleave(k, dim=0)  # [B K, T], row = (rollout, teacher)
    completion_mask = batch.completion_mask.repeat_interleave(k, dim=0)
    student_rows = [prompt for prompt in batch.student_prompt_ids for _ in range(k)]
    teacher_rows = [prompt for rows in batch.teacher_prompt_ids for prompt in rows]
    student_logps = _full_vocab_logps(model, student_rows, completion_ids, completion_mask, public_positions)
    with torch.no_grad():
        teacher_logps = _full_vocab_logps(model, teacher_rows, completion_ids, completion_mask, public_positions)
    out = sgsd_loss(
        student_logps.view(b, k, t), teacher_logps.view(b, k, t), batch.counted_mask, batch.rewards,
        batch.teacher_weights, settings=settings,
    )
    out.loss.backward()
    return PhaseOutput(out.loss.detach(), out.polarity, b)

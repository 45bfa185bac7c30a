"""SGSD's loss phase on a batch of scored rollouts: ONE student forward with gradient per rollout and
`sgsd.objectives.sgsd_loss` (docs/spec.md sections 4 and 9). `SGSDTrainer.method_loss` calls it, and so does
the benchmark (`sgsd.benchmarking.phases.real_loss_phase`), so what is timed is what trains.

Shapes: B rollouts, K teachers, T completion tokens (the batch's padded length), k' local-support
top-k. The teacher side was computed earlier without gradient (`sgsd.scoring.score_teachers` or
`score_teachers_local`, in the generation phase). Rows of rollouts whose teachers are all neutral can be
left out (`active`, decided at generation time by `active_rollouts`); the phase then runs only the
active rows, trimmed to their longest completion, and scales the loss by the active fraction so that a
skipped rollout counts as a zero-loss row of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import SGSDLossOutput, sgsd_loss, teacher_polarity
from sgsd.scoring import (completion_logprobs, completion_logprobs_and_entropy, hidden_for_completion, lm_parts,
                          local_support_student_terms)


@dataclass(frozen=True)
class SGSDLossPhase:
    """What one loss phase computed.

    rows: [A] int64 indices of the active rollouts (the student pass counts for them).
    run_rows: [R] the rows the student forward ran on: `rows`, or row 0 alone when no rollout is active
        (the graph stays connected, so DDP and gradient accumulation see every parameter).
    length: completion tokens kept, the longest completion among `run_rows` (at least 1).
    output: `sgsd_loss` of the run rows; None when a student or teacher value was not finite (the
        caller skips the step: nothing was computed from them).
    loss: 0-d, output.loss x A / B (gradient flows to the model); None with `output`.
    polarity: [B, K] int64 rho of every rollout (0 for inactive rows); None with `output`.
    support: [B, K] detached clipped support (0 for inactive rows); None with `output`.
    student_entropy: [R, length] detached token entropy of the student (full-vocabulary mode), else None.
    """

    rows: torch.Tensor
    run_rows: torch.Tensor
    length: int
    output: SGSDLossOutput | None
    loss: torch.Tensor | None
    polarity: torch.Tensor | None
    support: torch.Tensor | None
    student_entropy: torch.Tensor | None


def active_rollouts(model: torch.nn.Module, *, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    completion_ids: torch.Tensor, completion_mask: torch.Tensor, counted_mask: torch.Tensor,
                    rewards: torch.Tensor, teacher_weights: torch.Tensor, teacher_logps: torch.Tensor,
                    chunk_tokens: int, settings: SGSDSettings = SGSDSettings(),
                    control_logps: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: rollouts with at least one non-neutral teacher (`skip_neutral_rows`).

    Decided from one gradient-free pass of the student (`model` with its own weights, on its own
    prompts: tensors as for `sgsd_loss_phase`) and the same polarity rule and settings as `sgsd_loss`, so
    leaving the other rollouts out of the loss phase changes no gradient while the weights stay the same.
    """
    with torch.no_grad():
        student_logps = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            chunk_tokens=chunk_tokens)
    _, polarity = teacher_polarity(student_logps, teacher_logps, counted_mask, rewards, teacher_weights,
                                   settings=settings, control_logps=control_logps)
    return polarity.ne(0).any(dim=-1)


def sgsd_loss_phase(model: torch.nn.Module, *, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    completion_ids: torch.Tensor, completion_mask: torch.Tensor, counted_mask: torch.Tensor,
                    rewards: torch.Tensor, teacher_weights: torch.Tensor, teacher_logps: torch.Tensor,
                    active: torch.Tensor | None = None, teacher_top_logps: torch.Tensor | None = None,
                    teacher_top_ids: torch.Tensor | None = None, chunk_tokens: int,
                    settings: SGSDSettings = SGSDSettings(),
                    control_logps: torch.Tensor | None = None) -> SGSDLossPhase:
    """The student pass and the SGSD loss of one batch; does not call backward.

    prompt_ids / prompt_mask [B, P] left-padded student prompts; completion_ids / completion_mask
    [B, T] right-padded; counted_mask [B, T] bool m_t; rewards [B]; teacher_weights [B, K] (<= 0:
    absent); teacher_logps [B, K, T] (detached); active [B] bool or None (every rollout); with
    `settings.local_support_top_k` k' > 0, teacher_top_logps / teacher_top_ids [B, K, T, k'] from
    `score_teachers_local`. `chunk_tokens`: token rows per LM-head chunk. `settings` are `sgsd_loss`'s
    (docs/spec.md section 4), with its defaults; control_logps [B, T] (detached) the control teacher's,
    given exactly when `settings.polarity_control` is not "none".
    """
    batch = completion_ids.size(0)
    if active is not None:
        rows = active.nonzero().squeeze(-1)
    else:
        rows = torch.arange(batch, device=completion_ids.device)
    run_rows = rows if rows.numel() else rows.new_zeros(1)  # keep the graph connected (DDP, GA)
    length = int(completion_mask[run_rows].sum(-1).max().clamp(min=1))  # trim the padding
    prompt_ids, prompt_mask = prompt_ids[run_rows], prompt_mask[run_rows]
    comp_ids = completion_ids[run_rows, :length]
    comp_mask = completion_mask[run_rows, :length]
    teacher_logps = teacher_logps[run_rows, :, :length]
    if control_logps is not None:
        control_logps = control_logps[run_rows, :length]
    divergence = entropy = None
    top_k = settings.local_support_top_k
    if top_k > 0:
        if teacher_top_logps is None or teacher_top_ids is None:
            raise ValueError("sgsd_loss_phase: local_support_top_k > 0 needs teacher_top_logps and teacher_top_ids")
        hidden = hidden_for_completion(model, torch.cat([prompt_ids, comp_ids], 1),
                                       torch.cat([prompt_mask, comp_mask], 1), length)
        student_logps, teacher_logps, divergence = local_support_student_terms(
            hidden, lm_parts(model)[1], comp_ids, teacher_logps, teacher_top_logps[run_rows, :, :length],
            teacher_top_ids[run_rows, :, :length], top_k=top_k, chunk_tokens=chunk_tokens,
        )
    else:
        student_logps, entropy = completion_logprobs_and_entropy(model, prompt_ids, prompt_mask, comp_ids, comp_mask,
                                                                 chunk_tokens=chunk_tokens)
    values = [student_logps, teacher_logps] + [x for x in (divergence, control_logps) if x is not None]
    if not all(torch.isfinite(x).all() for x in values):
        return SGSDLossPhase(rows, run_rows, length, None, None, None, None, entropy)
    out = sgsd_loss(
        student_logps, teacher_logps, counted_mask[run_rows, :length], rewards[run_rows], teacher_weights[run_rows],
        settings=settings, token_divergence=divergence, control_logps=control_logps,
    )
    loss = out.loss * (rows.numel() / batch)
    polarity = torch.zeros_like(teacher_weights, dtype=torch.long)
    support = torch.zeros_like(teacher_weights)
    if rows.numel():
        polarity[rows], support[rows] = out.polarity, out.support
    return SGSDLossPhase(rows, run_rows, length, out, loss, polarity, support, entropy)

"""Scoring rollouts under their K teachers (and the control teacher): the one path the trainer, the probe
(`sgsd skills probe`), the demo's measurements and the real-model benchmark share.

- `score_under_teachers`: the generation phase of `SGSDTrainer.rollout_extras` (full-vocabulary mode): each
  rollout's K teacher prompts (`teacher_prompt(guidance, problem)` in the teacher's chat style), plus one
  prompt per rollout for each control teacher (the trainer: the one of `settings.polarity_control`, if any),
  scored without gradient by `sgsd.scoring.score_teachers` (one batched call: the controls are columns K,
  K + 1, ...), or with `engine` (`sgsd.teacher_engine: vllm`) by the colocated vLLM engine
  (`engine_teacher_logps`), and the token mask m_t.
- `probe_teachers`: the same, then the student's own log-probs on its plain prompt and
  `sgsd.objectives.teacher_polarity` with the run's `SGSDSettings`, once without control and once per
  control: the support and polarity that the loss phase's `sgsd_loss` computes from the same values (both
  run `_disagreement`, `_support`, `_confidence`, `_polarity`), with each teacher's quadrant (docs/spec.md
  section 4) and the counted tokens.

Shapes: B rollouts, K = settings.num_teachers teachers, T completion tokens (right-padded).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import teacher_polarity
from sgsd.prompts import ChatStyle, render_chat, student_prompt, teacher_prompt
from sgsd.scoring import (completion_logprobs, countable_token_table, counted_mask, left_pad,
                          score_teachers_and_entropy)
from sgsd.vllm_adapter import score_sequences

if TYPE_CHECKING:

    from vllm import LLM

    from sgsd.skills.teachers import Teacher

# quadrant codes of `TeacherProbe.quadrant` (index into QUADRANTS); -1: absent teacher
QUADRANTS = ("helpful", "over_suppressive", "misleading", "warning", "neutral")


@dataclass(frozen=True)
class TeacherScores:
    """teacher_logps [B, K, T] and teacher_entropy [B, K, T] (0 for absent teachers; None when the vLLM engine
    scored, which returns the sampled tokens' log-probs only), control_logps: control kind -> [B, T] (empty: no
    control), teacher_weights [B, K] (a_k, 0 = absent), counted [B, T] bool m_t; all detached."""

    teacher_logps: torch.Tensor
    teacher_entropy: torch.Tensor | None
    control_logps: dict[str, torch.Tensor]
    teacher_weights: torch.Tensor
    counted: torch.Tensor


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str, guidance: Sequence[str], style: ChatStyle,
               width: int) -> list[list[int] | None]:
    """Token ids of `teacher_prompt(g, problem)` for each guidance block, None-padded to `width` columns."""
    ids: list[list[int] | None] = []
    for text in guidance[:width]:
        ids.append(tokenizer(render_chat(tokenizer, teacher_prompt(text, problem), style),
                             add_special_tokens=False)["input_ids"])
    return ids + [None] * (width - len(ids))


def teacher_weight_matrix(teachers: Sequence[Sequence[Teacher]], k: int, device: torch.device | str) -> torch.Tensor:
    """[B, K] float32 a_k of each rollout's first K teachers, 0 for absent ones."""
    weights = torch.zeros((len(teachers), k), dtype=torch.float32, device=device)
    for row, row_teachers in enumerate(teachers):
        for col, teacher in enumerate(row_teachers[:k]):
            weights[row, col] = teacher.weight
    return weights


def engine_teacher_logps(engine: LLM, teacher_prompt_ids: Sequence[Sequence[Sequence[int] | None]],
                         completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """`sgsd.scoring.score_teachers`'s [B, W, T] log-probs (0 for absent rows and masked tokens), from the vLLM
    engine's prompt log-probs of each present row's [teacher prompt; completion] token ids (one request per row,
    all in one call; the completion is its first completion_mask.sum() tokens, as the trainer engine runs it)."""
    b, t = completion_ids.shape
    width = max((len(row) for row in teacher_prompt_ids), default=0)
    out = torch.zeros((b, width, t), dtype=torch.float32)
    lengths = completion_mask.long().sum(-1).tolist()
    completions = [ids[:n].tolist() for ids, n in zip(completion_ids.cpu(), lengths)]
    cells = [(i, j) for i in range(b) for j, ids in enumerate(teacher_prompt_ids[i]) if ids is not None]
    scores = score_sequences(engine, [list(teacher_prompt_ids[i][j]) + completions[i] for i, j in cells],
                             [len(teacher_prompt_ids[i][j]) for i, j in cells])
    for (i, j), row in zip(cells, scores, strict=True):
        out[i, j, : len(row)] = torch.tensor(row, dtype=torch.float32)
    out *= completion_mask.cpu().to(torch.float32)[:, None, :]
    return out.to(completion_ids.device)


def score_under_teachers(scoring_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[str],
                         teachers: Sequence[Sequence[Teacher]], completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, *, settings: SGSDSettings, style: ChatStyle,
                         chunk_tokens: int, controls: Mapping[str, Sequence[str]] | None = None,
                         teacher_context: Callable[[], ContextManager[object]] = nullcontext,
                         count_table: torch.Tensor | None = None, engine: LLM | None = None) -> TeacherScores:
    """The K teachers' (and the controls') log-probs of every rollout's completion, no gradient.

    problems[b], teachers[b]: rollout b's problem text and its retrieved teachers (`TeacherSource`);
    controls[kind][b]: a control's guidance block for rollout b (`TeacherSource.controls_for`).
    `scoring_model` with `teacher_context` are the teacher's weights (live, base or EMA). Each control costs
    one more teacher row per rollout, in the same batches as the teachers. `engine`: a vLLM engine holding the
    live policy's weights scores the same rows instead (`engine_teacher_logps`; no entropies).
    """
    k = settings.num_teachers
    kinds = list(controls or {})
    rows = []
    for b, (problem, row) in enumerate(zip(problems, teachers, strict=True)):
        ids = prompt_ids(tokenizer, problem, [t.guidance for t in row], style, k)
        rows.append(ids + prompt_ids(tokenizer, problem, [controls[c][b] for c in kinds], style, len(kinds)))
    entropy: torch.Tensor | None = None
    if engine is not None:
        logps = engine_teacher_logps(engine, rows, completion_ids, completion_mask)
    else:
        logps, entropy = score_teachers_and_entropy(
            scoring_model, rows, completion_ids, completion_mask, pad_id=tokenizer.pad_token_id,
            batch_rows=settings.teacher_batch_size, chunk_tokens=chunk_tokens, teacher_context=teacher_context,
            prefix_reuse=settings.prefix_reuse)
    table = countable_token_table(tokenizer) if count_table is None else count_table
    return TeacherScores(
        teacher_logps=logps[:, :k], teacher_entropy=None if entropy is None else entropy[:, :k],
        control_logps={c: logps[:, k + i] for i, c in enumerate(kinds)},
        teacher_weights=teacher_weight_matrix(teachers, k, completion_ids.device),
        counted=counted_mask(completion_ids, completion_mask, table),
    )


@dataclass(frozen=True)
class TeacherProbe:
    """What the polarity test says about each (rollout, teacher), as the loss phase would decide it.

    support [B, K]: clipped mean support (against the control when there is one, else against the student);
    polarity [B, K] int64 rho in {-1, 0, +1}; quadrant [B, K] int64 index into QUADRANTS (-1: absent teacher);
    present [B, K] bool; counted_tokens [B] int64 (sum of m_t); rewards [B];
    block_shift [B, K]: mean over the counted tokens of log q_k - log p (the skill block against no block,
    the paper's d whatever the control), and control_shift [B]: the same for the control (NaN without one).
    """

    support: torch.Tensor
    polarity: torch.Tensor
    quadrant: torch.Tensor
    present: torch.Tensor
    counted_tokens: torch.Tensor
    rewards: torch.Tensor
    block_shift: torch.Tensor
    control_shift: torch.Tensor


def quadrants(polarity: torch.Tensor, rewards: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, K] quadrant codes: the sign of the support (rho / outcome) crossed with the outcome."""
    success = (rewards > 0)[:, None].expand_as(polarity)
    sign = torch.where(success, polarity, -polarity)
    code = torch.full_like(polarity, QUADRANTS.index("neutral"))
    code[success & (sign > 0)] = QUADRANTS.index("helpful")
    code[success & (sign < 0)] = QUADRANTS.index("over_suppressive")
    code[~success & (sign > 0)] = QUADRANTS.index("misleading")
    code[~success & (sign < 0)] = QUADRANTS.index("warning")
    return torch.where(present, code, torch.full_like(code, -1))


def _masked_token_mean(values: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    mask = counted.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


@dataclass(frozen=True)
class ScoredRollouts:
    """The values a polarity is decided from: teacher (and control) scores, the student's own log-probs
    student_logps [B, T] on its plain prompt, rewards [B] float32."""

    scores: TeacherScores
    student_logps: torch.Tensor
    rewards: torch.Tensor


def score_rollouts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[str],
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards: torch.Tensor,
                   teachers: Sequence[Sequence[Teacher]], settings: SGSDSettings, *,
                   controls: Mapping[str, Sequence[str]] | None = None, student_style: ChatStyle = ChatStyle(),
                   teacher_style: ChatStyle | None = None, chunk_tokens: int = 4096,
                   teacher_context: Callable[[], ContextManager[object]] = nullcontext) -> ScoredRollouts:
    """`score_under_teachers` and the student's own pass (no gradient), for `decide`.

    completion_ids / completion_mask [B, T] right-padded completions of the student prompt of `problems`;
    rewards [B] (success iff > 0); teachers / controls as for `score_under_teachers`: the K teachers are
    scored once, each control adds one forward per rollout.
    """
    scores = score_under_teachers(model, tokenizer, problems, teachers, completion_ids, completion_mask,
                                  settings=settings, style=teacher_style or student_style, chunk_tokens=chunk_tokens,
                                  controls=controls, teacher_context=teacher_context)
    plain = [tokenizer(render_chat(tokenizer, student_prompt(p), student_style), add_special_tokens=False)["input_ids"]
             for p in problems]
    student_ids, student_mask = left_pad(plain, tokenizer.pad_token_id, completion_ids.device)
    with torch.no_grad():
        student_logps = completion_logprobs(model, student_ids, student_mask, completion_ids, completion_mask,
                                            chunk_tokens=chunk_tokens)
    return ScoredRollouts(scores, student_logps, rewards.to(torch.float32))


def decide(scored: ScoredRollouts, settings: SGSDSettings) -> dict[str, TeacherProbe]:
    """The polarity test of `settings` (`sgsd.objectives.teacher_polarity`) without a control ("none", the
    paper) and against each scored control: {"none": ..., kind: ...}. `settings.polarity_control` is not read."""
    scores, student_logps, rewards = scored.scores, scored.student_logps, scored.rewards
    present = scores.teacher_weights > 0
    block_shift = _masked_token_mean(scores.teacher_logps - student_logps[:, None, :], scores.counted[:, None, :])
    found = {}
    for kind, control_logps in [("none", None), *scores.control_logps.items()]:
        support, polarity = teacher_polarity(student_logps, scores.teacher_logps, scores.counted, rewards,
                                             scores.teacher_weights, settings=replace(settings, polarity_control=kind),
                                             control_logps=control_logps)
        control_shift = (torch.full((len(rewards),), float("nan")) if control_logps is None
                         else _masked_token_mean(control_logps - student_logps, scores.counted))
        found[kind] = TeacherProbe(support=support, polarity=polarity, quadrant=quadrants(polarity, rewards, present),
                                   present=present, counted_tokens=scores.counted.sum(-1), rewards=rewards,
                                   block_shift=block_shift, control_shift=control_shift)
    return found


def probe_teachers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[str],
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards: torch.Tensor,
                   teachers: Sequence[Sequence[Teacher]], settings: SGSDSettings, *,
                   controls: Mapping[str, Sequence[str]] | None = None, student_style: ChatStyle = ChatStyle(),
                   teacher_style: ChatStyle | None = None, chunk_tokens: int = 4096,
                   teacher_context: Callable[[], ContextManager[object]] = nullcontext) -> dict[str, TeacherProbe]:
    """Support, polarity and quadrant of each rollout's teachers (a live teacher unless `teacher_context`),
    without a control and against each of `controls`: `decide(score_rollouts(...), settings)`."""
    return decide(score_rollouts(model, tokenizer, problems, completion_ids, completion_mask, rewards, teachers,
                                 settings, controls=controls, student_style=student_style, teacher_style=teacher_style,
                                 chunk_tokens=chunk_tokens, teacher_context=teacher_context), settings)

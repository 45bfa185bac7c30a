"""Measurements of a (warm) demo model: does it read hints, and what would SGSD's teachers say?

- `hint_accuracy`: sampled accuracy on the same problems with no hint, with a helpful, an irrelevant
  or a misleading (skill, mistake) pair in an SGSD teacher prompt, and with the OPSD reference
  prompt. A model that reads hints orders them helpful > none ~ irrelevant > misleading.
- `polarity_table`: on student rollouts (student prompt, temperature 1), score every completion under
  one teacher per label (a pair of two items with that label, chosen per rollout), and report SGSD's
  support and polarity (docs/spec.md section 4, `sgsd.objectives`) per label, per outcome, for several
  thresholds theta. Shapes below: B rollouts, K teachers, T tokens.

Teacher log-probs come from the same weights as the student (a live teacher at step 0), through the
probe's core path (`sgsd.teacher_scoring.score_rollouts` / `decide`, the trainer's scoring and polarity code),
with the project's token mask m_t.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sgsd.data import Problem
from sgsd.loss_settings import SGSDSettings
from sgsd.demo.bank import HELPFUL, IRRELEVANT, LABELS, MISLEADING, item_labels
from sgsd.demo.evaluate import AccuracyEstimate, Rollouts, accuracy, is_correct, sample, student_text
from sgsd.demo.warmup import demo_chat_style, hint_prompt, reference_prompt
from sgsd.prompts import render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank
from sgsd.skills.controls import control_guidance
from sgsd.skills.teachers import Teacher
from sgsd.teacher_scoring import decide, score_rollouts


NO_HINT, REFERENCE = "none", "reference"
TEACHER_KINDS = (HELPFUL, IRRELEVANT, MISLEADING, REFERENCE)  # the prompts of `hint_accuracy`
POLARITY_KINDS = (HELPFUL, IRRELEVANT, MISLEADING)  # the SGSD teachers of `polarity_table` (one pair each)


def labelled_pair(bank: SkillBank, label: str, key: str) -> tuple[GeneralSkill, CommonMistake]:
    """A (skill, mistake) pair whose two items both carry `label`, chosen deterministically from `key`."""
    labels = item_labels()
    skills = [s for s in bank.general_skills if labels.get(s.skill_id) == label]
    mistakes = [m for m in bank.common_mistakes if labels.get(m.mistake_id) == label]
    if not skills or not mistakes:
        raise ValueError(f"seed bank has no {label} skill or mistake")
    rng = random.Random(f"sgsd-demo-pair:{label}:{key}")
    return rng.choice(skills), rng.choice(mistakes)


def labelled_teacher(bank: SkillBank, label: str, key: str, weight: float) -> Teacher:
    """An SGSD teacher (`sgsd.skills.teachers.Teacher`) of one labelled pair, as `build_teachers` renders it."""
    skill, mistake = labelled_pair(bank, label, key)
    return Teacher(skill, mistake, None, weight, render_guidance([skill], [mistake]))


def teacher_text(bank: SkillBank, kind: str, problem: Problem, key: str) -> str:
    """User text of a teacher of the given kind (a label, or "reference") for one rollout."""
    if kind == REFERENCE:
        return reference_prompt(problem)
    return hint_prompt(problem, *labelled_pair(bank, kind, key))


def hint_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
                  bank: SkillBank, *, k: int = 4, seed: int = 0) -> dict[str, AccuracyEstimate]:
    """Sampled avg@k per prompt kind: "none", "helpful", "irrelevant", "misleading", "reference"."""
    prompts: dict[str, Callable[[Problem], str]] = {NO_HINT: student_text}
    for kind in TEACHER_KINDS:
        prompts[kind] = lambda p, kind=kind: teacher_text(bank, kind, p, p.problem_id)
    return {name: accuracy(model, tokenizer, problems, k=k, prompt=fn, seed=seed) for name, fn in prompts.items()}


@dataclass(frozen=True)
class PolarityRow:
    """SGSD statistics of one teacher kind under one polarity rule, over B rollouts.

    theta: the threshold of the paper's rule, or the z value when `test` is "z" (`sgsd.polarity_test`).

    positive / neutral / negative: fractions of rollouts with rho = +1 / 0 / -1.
    *_success / *_failure: the same fractions among successful / failed rollouts (NaN when none).
    support_success / support_failure: mean clipped support among successful / failed rollouts.
    """

    teacher: str
    theta: float
    rollouts: int
    positive: float
    neutral: float
    negative: float
    positive_success: float
    negative_success: float
    positive_failure: float
    negative_failure: float
    support_success: float
    support_failure: float
    test: str = "threshold"
    control: str = "none"  # the polarity control the support is read against (`sgsd.polarity_control`)

    @property
    def rule(self) -> str:
        """"t0.05" (threshold rule) or "z1.96" (z test)."""
        return f"{'z' if self.test == 'z' else 't'}{self.theta:g}"


@dataclass(frozen=True)
class PolarityReport:
    """Polarity rows plus what the completions look like (counted tokens, success rate, where d sits).

    support: [B, K] clipped support per rollout and teacher kind (order `POLARITY_KINDS`), detached.
    rewards: [B] 1.0 for a correct rollout, else 0.0.
    rollouts: the B student rollouts that were scored.
    """

    rows: tuple[PolarityRow, ...]
    support: torch.Tensor
    rewards: torch.Tensor
    rollouts: Rollouts
    success_rate: float
    mean_counted_tokens: float
    top3_share: dict[str, float]  # per teacher kind: share of sum |d| carried by each rollout's 3 largest |d|


def _fraction(values: torch.Tensor, selector: torch.Tensor) -> float:
    return float(values[selector].float().mean()) if bool(selector.any()) else float("nan")


def polarity_table(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
                   bank: SkillBank, *, settings: SGSDSettings = SGSDSettings(),
                   thetas: Sequence[float] = (0.05, 0.02, 0.01),
                   z_values: Sequence[float] = (1.96, 1.0), max_new_tokens: int = 64, seed: int = 0,
                   controls: Sequence[str] = ()) -> PolarityReport:
    """Sample one student rollout per problem, score it under each teacher kind, tabulate SGSD polarity
    under the threshold rule at each of `thetas` and the z test at each of `z_values` (the other loss
    settings, C among them, are `settings`), against the student (control "none") and against each of
    `controls` ("neutral", "shuffled": `sgsd.skills.controls`, one more forward per rollout each)."""
    rollouts = sample(model, tokenizer, [student_text(p) for p in problems], max_new_tokens=max_new_tokens, seed=seed)
    rewards = torch.tensor([float(is_correct(text, p)) for text, p in zip(rollouts.texts, problems)])
    weight = 1.0 / len(POLARITY_KINDS)
    teachers = [[labelled_teacher(bank, kind, f"{p.problem_id}:{seed}", weight) for kind in POLARITY_KINDS]
                for p in problems]
    settings = replace(settings, num_teachers=len(POLARITY_KINDS), polarity_control="none")

    extra = {c: [control_guidance(c, problem=p.problem, teachers=row, bank=bank, tokenizer=tokenizer)
                 for p, row in zip(problems, teachers)] for c in controls}
    scored = score_rollouts(model, tokenizer, [p.problem for p in problems], rollouts.completion_ids,
                            rollouts.completion_mask, rewards, teachers, settings, controls=extra,
                            student_style=demo_chat_style())
    mask = scored.scores.counted  # [B, T] m_t
    success = rewards > 0

    rows = []
    support = decide(scored, settings)["none"].support
    rules = [("threshold", theta, replace(settings, polarity_test="threshold", confidence_threshold=theta))
             for theta in thetas]
    rules += [("z", z, replace(settings, polarity_test="z", polarity_z=z)) for z in z_values]
    for (test, theta, rule), control in [(r, c) for c in ("none", *controls) for r in rules]:
        decided = decide(scored, rule)[control]
        rho, control_support = decided.polarity, decided.support
        for k, kind in enumerate(POLARITY_KINDS):
            r, s = rho[:, k], control_support[:, k]
            rows.append(PolarityRow(
                teacher=kind, theta=theta, rollouts=len(problems), test=test, control=control,
                positive=float((r > 0).float().mean()), neutral=float((r == 0).float().mean()),
                negative=float((r < 0).float().mean()),
                positive_success=_fraction(r > 0, success), negative_success=_fraction(r < 0, success),
                positive_failure=_fraction(r > 0, ~success), negative_failure=_fraction(r < 0, ~success),
                support_success=float(s[success].mean()) if bool(success.any()) else float("nan"),
                support_failure=float(s[~success].mean()) if bool((~success).any()) else float("nan"),
            ))

    d = (scored.scores.teacher_logps - scored.student_logps[:, None, :]).abs() * mask[:, None, :]  # [B, K, T]
    top3 = d.topk(min(3, d.shape[-1]), dim=-1).values.sum(-1) / d.sum(-1).clamp_min(1e-9)  # [B, K]
    return PolarityReport(
        rows=tuple(rows),
        support=support,
        rewards=rewards,
        rollouts=rollouts,
        success_rate=float(rewards.mean()),
        mean_counted_tokens=float(mask.sum(-1).float().mean()),
        top3_share={kind: float(top3[:, k].mean()) for k, kind in enumerate(POLARITY_KINDS)},
    )


def format_polarity(report: PolarityReport) -> str:
    """A plain-text table of `polarity_table` (for logs and the report)."""
    lines = [
        f"rollouts: success rate {report.success_rate:.2f}, {report.mean_counted_tokens:.1f} counted tokens on average",
        f"{'teacher':<11} {'control':<8} {'rule':>5} {'rho+':>5} {'rho0':>5} {'rho-':>5} | {'succ+':>5} {'succ-':>5} "
        f"{'fail+':>5} {'fail-':>5} | {'sup_s':>6} {'sup_f':>6}",
    ]
    for r in report.rows:
        lines.append(
            f"{r.teacher:<11} {r.control:<8} {r.rule:>5} {r.positive:>5.2f} {r.neutral:>5.2f} {r.negative:>5.2f} | "
            f"{r.positive_success:>5.2f} {r.negative_success:>5.2f} {r.positive_failure:>5.2f} "
            f"{r.negative_failure:>5.2f} | {r.support_success:>6.3f} {r.support_failure:>6.3f}"
        )
    lines.append("share of |d| on the 3 largest tokens: " +
                 ", ".join(f"{k} {v:.2f}" for k, v in report.top3_share.items()))
    return "\n".join(lines)


__all__ = ["LABELS", "NO_HINT", "POLARITY_KINDS", "REFERENCE", "TEACHER_KINDS", "labelled_teacher", "PolarityReport", "PolarityRow", "format_polarity",
           "hint_accuracy", "labelled_pair", "polarity_table", "teacher_text"]

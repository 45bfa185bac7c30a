"""The control teacher of a controlled polarity (`sgsd.polarity_control`, docs/methods.md "Controlled polarity").

One more teacher per rollout whose guidance block says nothing about the problem, so that a skill teacher's
support can be read against the control's (log q_k - log q_control) instead of against the student's
(log q_k - log p): what a skill says, apart from the mere presence of a guidance block.

- `neutral`: the guidance preamble every skill block opens with, followed by content-free filler, with as many
  tokens as the mean token length of the rollout's K skill blocks (at most one filler word more);
- `shuffled`: a (skill, mistake) pair of the bank, rendered exactly as a skill block, that was NOT retrieved
  for the problem: the skill and the mistake are drawn uniformly from the items outside the problem's K
  teachers, with a generator seeded by the problem's text. Drawn from the bank rather than taken from another
  problem of the batch: a batch may hold one problem only (G rollouts of one prompt per device), and a draw
  keyed by the problem is the same on every rank, every step and in the probe.

Both depend on the problem (and the bank) only, so they are computed once per (bank version, problem).
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Protocol, Sequence

from sgsd.prompts import GUIDANCE_PREAMBLE, render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


NEUTRAL_FILLER = "This line is intentionally left blank and carries no guidance."


def token_length(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def neutral_guidance(tokenizer: PreTrainedTokenizerBase, target_tokens: int) -> str:
    """The preamble and filler words, the shortest such text with at least `target_tokens` tokens (the preamble
    alone when it is already that long)."""
    text = GUIDANCE_PREAMBLE
    words = NEUTRAL_FILLER.split()
    index = 0
    while token_length(tokenizer, text) < target_tokens:
        text += ("\n\n" if index == 0 else " ") + words[index % len(words)]
        index += 1
    return text


class PairTeacher(Protocol):
    """What a control reads of a teacher (`sgsd.skills.teachers.Teacher`, which imports this module)."""

    @property
    def skill(self) -> "GeneralSkill": ...

    @property
    def mistake(self) -> "CommonMistake": ...

    @property
    def guidance(self) -> str: ...


def shuffled_guidance(bank: SkillBank, teachers: Sequence[PairTeacher], problem: str) -> str:
    """One (skill, mistake) pair of the bank outside the problem's teachers, seeded by the problem's text."""
    used_skills = {t.skill.skill_id for t in teachers}
    used_mistakes = {t.mistake.mistake_id for t in teachers}
    skills = [s for s in bank.general_skills if s.skill_id not in used_skills] or list(bank.general_skills)
    mistakes = [m for m in bank.common_mistakes if m.mistake_id not in used_mistakes] or list(bank.common_mistakes)
    if not skills or not mistakes:
        raise ValueError("polarity_control=shuffled needs a bank with at least one skill and one mistake")
    rng = random.Random(int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big"))
    return render_guidance([rng.choice(skills)], [rng.choice(mistakes)])


def control_guidance(kind: str, *, problem: str, teachers: Sequence[PairTeacher], bank: SkillBank,
                     tokenizer: PreTrainedTokenizerBase) -> str:
    """The control's guidance block for one problem (`kind`: "neutral" or "shuffled")."""
    if kind == "neutral":
        lengths = [token_length(tokenizer, t.guidance) for t in teachers]
        return neutral_guidance(tokenizer, round(sum(lengths) / len(lengths)) if lengths else 0)
    if kind == "shuffled":
        return shuffled_guidance(bank, teachers, problem)
    raise ValueError(f"polarity_control: expected 'neutral' or 'shuffled' for a control teacher, got {kind!r}")

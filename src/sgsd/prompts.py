"""Prompt texts of docs/spec.md section 2: student, skill-conditioned teacher, OPSD teacher, "+Skill" blocks.

Everything here returns plain strings (the user turn); applying the chat template and the thinking
mode is done by `render_chat` so that student and teacher are rendered the same way by default
(defect 4 of the public code: a student prompt in non-thinking mode scored by a teacher in thinking
mode).

Text from others (bank items, problems, answers) goes into these prompts as data. A tokenizer turns
the literal text of its special tokens into the tokens themselves, so a bank item holding
`<|im_end|><|im_start|>system` would close the user turn and open a system turn: `refuse_special_tokens`
refuses such text when it is loaded, naming the item and the token. Refused, not escaped: any
escape changes the text the model was meant to see, and such text is almost always a mistake (a bank
exported with its chat template) or an attack, either worth a look before training on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from sgsd.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

GUIDANCE_PREAMBLE = (
    "Below are retrieved skills that may help with this problem. Use them as soft guidance only: "
    "solve the problem independently, and do not quote them."
)

OPSD_INSTRUCTION = (
    "A reference solution is given above. Use it only to check your work: derive the answer "
    "independently, step by step, rather than copying it."
)


class SkillLike(Protocol):
    skill_id: str
    title: str
    principle: str
    when_to_apply: str


class MistakeLike(Protocol):
    mistake_id: str
    description: str
    how_to_avoid: str


def student_prompt(problem: str) -> str:
    """`Problem: {problem}\\n\\n{I}` (docs/spec.md section 2)."""
    return f"Problem: {problem}\n\n{INSTRUCTION}"


def render_skill(skill: SkillLike) -> str:
    return f"**{skill.title}**: {skill.principle}\nApply when: {skill.when_to_apply}"


def render_mistake(mistake: MistakeLike) -> str:
    # `why_it_happens` is deliberately not shown (docs/spec.md section 2).
    return f"Don't: {mistake.description}\nInstead: {mistake.how_to_avoid}"


def render_guidance(skills: Sequence[SkillLike], mistakes: Sequence[MistakeLike]) -> str:
    """Guidance block: preamble, "General Principles", "Mistakes to Avoid".

    A teacher of SGSD gets ONE rank-aligned pair (one skill, one mistake); the "+Skill" baselines
    get several of each. Empty sections are left out.
    """
    parts = [GUIDANCE_PREAMBLE]
    if skills:
        parts.append("## General Principles\n" + "\n\n".join(render_skill(s) for s in skills))
    if mistakes:
        parts.append("## Mistakes to Avoid\n" + "\n\n".join(render_mistake(m) for m in mistakes))
    return "\n\n".join(parts)


def teacher_prompt(guidance: str, problem: str) -> str:
    """`{guidance_k}\\n\\nProblem: {problem}\\n\\n{I}`: the skill text comes first (docs/spec.md section 2)."""
    return f"{guidance}\n\n{student_prompt(problem)}"


def opsd_teacher_prompt(problem: str, reference: str, guidance: str | None = None) -> str:
    """OPSD teacher: the student prompt, the reference solution and an instruction to derive it.

    On DAPO only the final answer exists: pass `reference_from_answer(answer)`.
    With `guidance` (OPSD+Skill) the skill block comes first, as for SGSD teachers.
    """
    body = f"{student_prompt(problem)}\n\nReference solution:\n{reference}\n\n{OPSD_INSTRUCTION}"
    return f"{guidance}\n\n{body}" if guidance else body


def reference_from_answer(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


@dataclass(frozen=True)
class ChatStyle:
    """How a user turn becomes model input.

    enable_thinking: passed to the chat template (Qwen3 templates honour it); None leaves the
    template's default. Student and teacher share one ChatStyle unless the paper's mismatch is
    asked for (`teacher_enable_thinking` in the config).
    """

    enable_thinking: bool | None = None


def render_chat(tokenizer: PreTrainedTokenizerBase, user_text: str, style: ChatStyle = ChatStyle()) -> str:
    """Apply the tokenizer's chat template to one user turn, with the generation prompt appended."""
    messages = [{"role": "user", "content": user_text}]
    kwargs: dict[str, bool] = {"tokenize": False, "add_generation_prompt": True}
    if style.enable_thinking is not None:
        kwargs["enable_thinking"] = style.enable_thinking
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, **kwargs)
    return user_text


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (its chat template's control tokens among them)."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or ()}
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(getattr(token, "content", token)))
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def special_token_pattern(tokens: Sequence[str]) -> re.Pattern[str] | None:
    """A pattern that finds any of `tokens` (`special_tokens` of a tokenizer) in a text; None without tokens."""
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def refuse_special_tokens(tokenizer: PreTrainedTokenizerBase, *texts: Iterable[tuple[str, str]]) -> None:
    """Raise a one-line `DataError` for the first (where, text) pair whose text holds one of the
    tokenizer's special tokens (see the module docstring); `where` names the item in the message."""
    pattern = special_token_pattern(special_tokens(tokenizer))
    if pattern is None:
        return
    for group in texts:
        for where, text in group:
            match = pattern.search(text)
            if match:
                raise DataError(f"{where}: contains the tokenizer's special token {match.group(0)!r}, which would "
                                "act as a chat-template control token inside the prompt; remove it from the file")

"""Extraction and merge prompts, and strict parsing of the LLM's JSON replies (docs/spec.md section 3 (2), (3)).

A memory is one graded attempt. From a success the LLM distils 1-3 general skills, from a failure
1-3 common mistakes, as one JSON object. Replies are parsed with a JSON-aware scanner
(`jsonscan`): `<think>` blocks are removed, braces inside strings (LaTeX) do not confuse it, and the
LAST object carrying the expected list wins (a model may restate the format before answering).
Items missing a field or with a non-string field are dropped and counted; a reply with no valid item
is a parse failure, counted and reported by the caller, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from sgsd.skills.bank import MISTAKE_FIELDS, SKILL_FIELDS, CommonMistake, GeneralSkill
from sgsd.skills.jsonscan import iter_json_objects, strip_think


@dataclass(frozen=True)
class ItemKind:
    """One of the two item lists of a bank, with its fields (id excluded) and id prefixes."""

    list_key: str  # "general_skills" | "common_mistakes"
    label: str  # for prompts and messages
    fields: tuple[str, ...]  # content fields, in order
    static_prefix: str  # "gen" | "err"
    item_class: type[GeneralSkill] | type[CommonMistake]

    def make(self, item_id: str, content: dict[str, str]) -> GeneralSkill | CommonMistake:
        return self.item_class(item_id, *(content[f] for f in self.fields))

    def content(self, item: GeneralSkill | CommonMistake) -> dict[str, str]:
        return {f: getattr(item, f) for f in self.fields}


SKILLS = ItemKind("general_skills", "general skills", SKILL_FIELDS[1:], "gen", GeneralSkill)
MISTAKES = ItemKind("common_mistakes", "common mistakes", MISTAKE_FIELDS[1:], "err", CommonMistake)

_SKILL_SCHEMA = ('{"general_skills": [{"title": "a short name", "principle": "what to do and why it works", '
                 '"when_to_apply": "the kind of problem or situation where it helps"}]}')
_MISTAKE_SCHEMA = ('{"common_mistakes": [{"description": "the mistake", "why_it_happens": "its cause", '
                   '"how_to_avoid": "what to do instead"}]}')
SCHEMAS = {SKILLS.list_key: _SKILL_SCHEMA, MISTAKES.list_key: _MISTAKE_SCHEMA}

SUCCESS_PROMPT = """You are studying a SUCCESSFUL solution to a math problem in order to distil reusable problem-solving skills.

Problem:
{problem}

Solution (graded correct):
{completion}

Extract 1 to {max_items} GENERAL skills that made this solution work and that would transfer to other problems. State each skill in general terms: no numbers, names or objects specific to this problem.

Reply with one JSON object in exactly this format and nothing after it (LaTeX is allowed inside strings; escape backslashes as JSON requires):
{schema}"""

FAILURE_PROMPT = """You are studying a FAILED attempt at a math problem in order to distil common mistakes to avoid.

Problem:
{problem}

Attempt (graded wrong{answer}):
{completion}

Identify 1 to {max_items} GENERAL mistakes that made this attempt fail and that a solver could make on other problems too. State each mistake in general terms: no numbers, names or objects specific to this problem.

Reply with one JSON object in exactly this format and nothing after it (LaTeX is allowed inside strings; escape backslashes as JSON requires):
{schema}"""

MERGE_PROMPT = """Below are {count} {label} distilled from attempts at math problems.

{items}

Merge them into a smaller set: combine items that express the same idea into one general item, drop redundant items, and keep genuinely different ideas as separate items. Do not invent ideas that are not in the list. Return at most {count} items.

Reply with one JSON object in exactly this format and nothing after it:
{schema}"""


def clip_middle(text: str, max_chars: int) -> str:
    """Keep the start and the end of a long completion (where the approach and the answer are)."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters omitted ...]\n{text[-half:]}"


def extraction_prompt(problem: str, completion: str, answer: str | None, correct: bool, *, max_items: int = 3,
                      max_completion_chars: int = 8000) -> str:
    """The prompt for one memory: skills from a success, mistakes from a failure (with the gold
    answer when known)."""
    template, kind = (SUCCESS_PROMPT, SKILLS) if correct else (FAILURE_PROMPT, MISTAKES)
    answer_note = f"; the correct final answer is {answer}" if answer else ""
    return template.format(problem=problem, completion=clip_middle(completion, max_completion_chars),
                           answer=answer_note, max_items=max_items, schema=SCHEMAS[kind.list_key])


def merge_prompt(kind: ItemKind, contents: Sequence[dict[str, str]]) -> str:
    lines = "\n".join(f"[{i + 1}] {json.dumps(c, ensure_ascii=False)}" for i, c in enumerate(contents))
    return MERGE_PROMPT.format(count=len(contents), label=kind.label, items=lines, schema=SCHEMAS[kind.list_key])


@dataclass(frozen=True)
class ParsedReply:
    items: list[dict[str, str]]  # valid items (content fields only, stripped)
    dropped_items: int  # item objects with a missing, empty or non-string field
    failure: str | None  # why no item could be read ("no_json", "no_items"), else None


def parse_reply(reply: str, kind: ItemKind, *, max_items: int | None = None) -> ParsedReply:
    """Items of `kind` from an LLM reply (see module docstring); at most `max_items` kept."""
    objects = list(iter_json_objects(strip_think(reply)))
    if not objects:
        return ParsedReply([], 0, "no_json")
    # The last object with the expected list wins; otherwise bare item objects are accepted.
    candidates = next((o[kind.list_key] for o in reversed(objects) if isinstance(o.get(kind.list_key), list)), None)
    if candidates is None:
        candidates = [o for o in objects if any(f in o for f in kind.fields)]
    items, dropped = [], 0
    for candidate in candidates:
        content = _content(candidate, kind)
        if content is None:
            dropped += 1
        else:
            items.append(content)
    if max_items is not None:
        items = items[:max_items]
    return ParsedReply(items, dropped, None if items else "no_items")


def _content(candidate: Any, kind: ItemKind) -> dict[str, str] | None:
    if not isinstance(candidate, dict):
        return None
    values = {f: candidate.get(f) for f in kind.fields}
    if not all(isinstance(v, str) and v.strip() for v in values.values()):
        return None
    return {f: " ".join(v.split()) for f, v in values.items()}


def dedup_key(content: dict[str, str]) -> tuple[str, ...]:
    """Exact-duplicate key: fields case-folded with whitespace collapsed."""
    return tuple(" ".join(content[f].split()).casefold() for f in sorted(content))


def deduplicate(contents: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Drop exact duplicates (see `dedup_key`), keeping the first occurrence and the order."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for content in contents:
        key = dedup_key(content)
        if key not in seen:
            seen.add(key)
            kept.append(content)
    return kept

"""Skill bank: typed items, strict loading with one-line errors, atomic saving (docs/spec.md section 3).

The on-disk format is the paper's JSON object::

    {"general_skills": [{"skill_id", "title", "principle", "when_to_apply"}, ...],
     "task_specific_skills": {...},          # kept verbatim for compatibility, unused
     "common_mistakes": [{"mistake_id", "description", "why_it_happens", "how_to_avoid"}, ...],
     "metadata": {...}}                      # provenance, merge statistics, schema_version

Ids: `gen_###` / `err_###` for static items, `dyn_###` for items added online (in the same lists);
any other non-empty id (e.g. the raw candidates' `gen_cand_000001`) is accepted. Unknown fields of an
item or of the top level are kept in `extra` and written back, so a bank round-trips unchanged
(apart from `metadata.schema_version`, which `save_bank` sets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from sgsd.errors import DataError
from sgsd.skills.jsonscan import ends_inside_value
from sgsd.storage import JSONObject, atomic_write_json, decode_utf8, parse_json, read_input_bytes, stable_hash

SCHEMA_VERSION = 1
DYNAMIC_PREFIX = "dyn_"

SKILL_FIELDS = ("skill_id", "title", "principle", "when_to_apply")
MISTAKE_FIELDS = ("mistake_id", "description", "why_it_happens", "how_to_avoid")
_TOP_LEVEL_ORDER = ("general_skills", "task_specific_skills", "common_mistakes", "metadata")


@dataclass(frozen=True)
class GeneralSkill:
    """A general principle, distilled from successful attempts."""

    skill_id: str
    title: str
    principle: str
    when_to_apply: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def item_id(self) -> str:
        return self.skill_id

    @property
    def text(self) -> str:
        """Retrieval text: the content fields joined by ". " (docs/spec.md section 3)."""
        return ". ".join((self.title, self.principle, self.when_to_apply))

    def to_json(self) -> JSONObject:
        return {**{name: getattr(self, name) for name in SKILL_FIELDS}, **self.extra}


@dataclass(frozen=True)
class CommonMistake:
    """A mistake to avoid, distilled from failed attempts (`why_it_happens` is not shown to teachers)."""

    mistake_id: str
    description: str
    why_it_happens: str
    how_to_avoid: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def item_id(self) -> str:
        return self.mistake_id

    @property
    def text(self) -> str:
        """Retrieval text: the content fields joined by ". " (docs/spec.md section 3)."""
        return ". ".join((self.description, self.why_it_happens, self.how_to_avoid))

    def to_json(self) -> JSONObject:
        return {**{name: getattr(self, name) for name in MISTAKE_FIELDS}, **self.extra}


@dataclass(frozen=True)
class SkillBank:
    """An immutable skill bank. Change it with `dataclasses.replace` or `with_dynamic`."""

    general_skills: tuple[GeneralSkill, ...]
    common_mistakes: tuple[CommonMistake, ...]
    task_specific_skills: Any = field(default_factory=dict, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def version(self) -> str:
        """Content hash of the items (ids and text fields, in order); metadata does not count.

        Two banks with the same items have the same version in every process, so caches of item
        embeddings and retrieved teachers can be keyed by it.
        """
        content = {
            "general_skills": [[getattr(s, f) for f in SKILL_FIELDS] for s in self.general_skills],
            "common_mistakes": [[getattr(m, f) for f in MISTAKE_FIELDS] for m in self.common_mistakes],
        }
        return stable_hash(json.dumps(content, ensure_ascii=False, separators=(",", ":")))

    def skill(self, skill_id: str) -> GeneralSkill:
        for item in self.general_skills:
            if item.skill_id == skill_id:
                return item
        raise KeyError(skill_id)

    def mistake(self, mistake_id: str) -> CommonMistake:
        for item in self.common_mistakes:
            if item.mistake_id == mistake_id:
                return item
        raise KeyError(mistake_id)

    @property
    def static_skills(self) -> tuple[GeneralSkill, ...]:
        return tuple(s for s in self.general_skills if not is_dynamic(s.skill_id))

    @property
    def static_mistakes(self) -> tuple[CommonMistake, ...]:
        return tuple(m for m in self.common_mistakes if not is_dynamic(m.mistake_id))

    @property
    def dynamic_skills(self) -> tuple[GeneralSkill, ...]:
        return tuple(s for s in self.general_skills if is_dynamic(s.skill_id))

    @property
    def dynamic_mistakes(self) -> tuple[CommonMistake, ...]:
        return tuple(m for m in self.common_mistakes if is_dynamic(m.mistake_id))

    def with_dynamic(self, skills: Iterable[GeneralSkill], mistakes: Iterable[CommonMistake],
                     metadata: Mapping[str, Any] | None = None) -> "SkillBank":
        """The same static items followed by the given dynamic items (which replace the old ones)."""
        return replace(
            self,
            general_skills=self.static_skills + tuple(skills),
            common_mistakes=self.static_mistakes + tuple(mistakes),
            metadata=dict(self.metadata if metadata is None else metadata),
        )

    def texts(self, source: str) -> Iterator[tuple[str, str]]:
        """(where, text) for every text field of every item, `where` naming the bank file `source`, the
        item and the field (for `sgsd.prompts.refuse_special_tokens`)."""
        for list_name, items, fields in (("general_skills", self.general_skills, SKILL_FIELDS),
                                         ("common_mistakes", self.common_mistakes, MISTAKE_FIELDS)):
            for index, item in enumerate(items):
                for name in fields:
                    yield f"skill bank {source}: {list_name}[{index}] ({item.item_id}).{name}", getattr(item, name)

    def to_json(self) -> JSONObject:
        obj = {
            "general_skills": [s.to_json() for s in self.general_skills],
            "task_specific_skills": self.task_specific_skills,
            "common_mistakes": [m.to_json() for m in self.common_mistakes],
            "metadata": dict(self.metadata),
        }
        return {**obj, **self.extra}


def is_dynamic(item_id: str) -> bool:
    return item_id.startswith(DYNAMIC_PREFIX)


def load_bank(path: str | Path) -> SkillBank:
    """Read and validate a bank file; any defect is a one-line `DataError` naming file, item and field."""
    path = Path(path)
    where = f"skill bank {path}"
    text = decode_utf8(read_input_bytes(path, "skill bank"), where)
    if not text.strip():
        raise DataError(f"{where}: empty file")
    try:
        obj = parse_json(text, where, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        if not text[err.pos:].strip() or ends_inside_value(text):
            raise DataError(f"{where}: truncated JSON (the file ends inside a value; parser: {err.msg} "
                            f"at line {err.lineno} column {err.colno})") from None
        raise DataError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except ValueError as err:
        raise DataError(f"{where}: invalid JSON: {err}") from None
    return parse_bank(obj, source=str(path))


def parse_bank(obj: Any, source: str = "<object>") -> SkillBank:
    """Validate a decoded JSON object and build a `SkillBank` (errors as in `load_bank`)."""
    where = f"skill bank {source}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: top level: expected a JSON object, got {_type_name(obj)}")
    for key in ("general_skills", "common_mistakes"):
        if key not in obj:
            raise DataError(f"{where}: missing required top-level field '{key}'")
        if not isinstance(obj[key], list):
            raise DataError(f"{where}: {key}: expected a list, got {_type_name(obj[key])}")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: metadata: expected an object, got {_type_name(metadata)}")
    schema = metadata.get("schema_version", SCHEMA_VERSION)
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise DataError(f"{where}: metadata.schema_version: expected an integer, got {_type_name(schema)}")
    if schema > SCHEMA_VERSION:
        raise DataError(f"{where}: metadata.schema_version is {schema}, this sgsd reads up to "
                        f"{SCHEMA_VERSION}: upgrade sgsd")
    skills = tuple(_parse_items(obj["general_skills"], "general_skills", SKILL_FIELDS, GeneralSkill, where))
    mistakes = tuple(_parse_items(obj["common_mistakes"], "common_mistakes", MISTAKE_FIELDS, CommonMistake, where))
    extra = {k: v for k, v in obj.items() if k not in _TOP_LEVEL_ORDER}
    return SkillBank(skills, mistakes, obj.get("task_specific_skills", {}), metadata, extra)


def check_usable(bank: SkillBank, source: str | Path, *, pairs: bool = True) -> None:
    """Refuse, in one line, a bank that cannot do its job: teachers are rank-aligned (skill, mistake) pairs
    (docs/spec.md section 3), so with `pairs` the bank needs a general skill and a common mistake (without one
    of them every teacher is missing and the distillation loss is 0 at every step); a "+Skill" prompt
    (`pairs=False`) needs at least one item."""
    where = f"skill bank {source}"
    skills, mistakes = len(bank.general_skills), len(bank.common_mistakes)
    if pairs and not (skills and mistakes):
        missing = " and ".join(n for n, c in (("general skills", skills), ("common mistakes", mistakes)) if not c)
        raise DataError(f"{where}: no {missing} ({skills} general skills, {mistakes} common mistakes): teachers are "
                        "(skill, mistake) pairs, so a bank needs at least one of each")
    if not (skills or mistakes):
        raise DataError(f"{where}: no items (0 general skills, 0 common mistakes)")


def save_bank(bank: SkillBank, path: str | Path) -> Path:
    """Write `bank` atomically (temp file, fsync, rename) with `metadata.schema_version` set."""
    obj = bank.to_json()
    obj["metadata"] = {**obj["metadata"], "schema_version": SCHEMA_VERSION}
    return atomic_write_json(path, obj)


# The text an item may hold (all its text fields together). A teacher prompt is the problem's prompt (at most
# prompt.max_prompt_tokens tokens) plus ONE skill and ONE mistake, so this bounds what a teacher forward costs
# before any is built: a 210k-character item once made training allocate 38 GB. The reference bank's longest
# item is well under a tenth of it. `skills validate`, training, evaluation and online updates share it.
MAX_ITEM_CHARS = 4000


def item_chars(texts: Iterable[str]) -> int:
    """The characters of an item's text fields together (what `MAX_ITEM_CHARS` bounds)."""
    return sum(len(text) for text in texts)


def _parse_items(items: list, list_name: str, fields: tuple[str, ...], cls: type, where: str) -> list:
    id_field = fields[0]
    seen: dict[str, int] = {}
    parsed = []
    for index, item in enumerate(items):
        at = f"{where}: {list_name}[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at}: expected an object, got {_type_name(item)}")
        item_id = item.get(id_field)
        if isinstance(item_id, str) and item_id.strip():
            at = f"{at} ({item_id})"
        for name in fields:
            if name not in item:
                raise DataError(f"{at}: missing required field '{name}'")
            value = item[name]
            if not isinstance(value, str):
                raise DataError(f"{at}.{name}: expected a string, got {_type_name(value)}")
            if not value.strip():
                raise DataError(f"{at}.{name}: empty string")
        size = item_chars(item[name] for name in fields[1:])
        if size > MAX_ITEM_CHARS:
            raise DataError(f"{at}: {size:,} characters of text, over the bound of {MAX_ITEM_CHARS:,} an item may hold "
                            "(a teacher prompt is the problem's prompt plus one skill and one mistake); shorten it")
        if item_id != item_id.strip() or any(c.isspace() for c in item_id):
            raise DataError(f"{at}.{id_field}: ids may not contain whitespace: {item_id!r}")
        if item_id in seen:
            raise DataError(f"{at}.{id_field}: duplicate id '{item_id}' (first at {list_name}[{seen[item_id]}])")
        seen[item_id] = index
        extra = {k: v for k, v in item.items() if k not in fields}
        parsed.append(cls(*(item[name] for name in fields), extra=extra))
    return parsed


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _reject_constant(name: str) -> float:
    # NaN / Infinity are not JSON; Python accepts them by default.
    raise ValueError(f"non-standard constant {name}")


__all__ = [
    "SCHEMA_VERSION", "GeneralSkill", "CommonMistake", "SkillBank", "load_bank", "parse_bank", "save_bank",
    "is_dynamic", "check_usable",
]

"""Online skill-bank update during SGSD training (docs/spec.md section 3 (4)).

Settings: `sgsd.config.OnlineUpdateSettings` (the `skills.online` section of a run config).
Every `every_steps` steps (paper: 25), if the success rate of the rollouts of the last
`window_steps` steps is below `success_threshold` (paper: 0.8), up to `max_memories` of those
rollouts (the most recent, half successes and half failures when both exist) go through extraction;
the new items are merged with the existing `dyn_` items of their list by the LLM; at most `max_new`
(paper: 5) merge outputs that are not existing items are added, with fresh ids `dyn_###` (never
reused); a list keeps at most `capacity` (paper: 30) dynamic items, the oldest leaving first. Static
items are never touched. Each update writes `run_dir/skills/bank_step_{step:06d}.json` and
`run_dir/skills/latest.json` atomically, both stamped with the run id and step.

Differences from the public code (docs/spec.md section 9, defect 6): it saw only the current micro-batch,
parsed JSON from the first "{" to the last "}", and reloaded a stale file from an earlier run. Here the
window spans steps, parsing is JSON-aware with failures counted, and resuming goes through
`state_dict()` / `load_state_dict()` (which hold the dynamic items themselves), or `load_latest`, which
refuses a file written by another run.

In distributed training call `record` with the rollouts gathered from all ranks, and `maybe_update`
on one rank, then broadcast the bank.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from sgsd.config import OnlineUpdateSettings
from sgsd.errors import ConfigError, DataError
from sgsd.prompts import special_token_pattern
from sgsd.skills.bank import (MAX_ITEM_CHARS, CommonMistake, GeneralSkill, SkillBank, is_dynamic, item_chars, load_bank,
                              parse_bank, save_bank)
from sgsd.skills.extraction import MISTAKES, SKILLS, ItemKind, dedup_key, extraction_prompt, parse_reply
from sgsd.skills.llm import LLMClient
from sgsd.skills.merge import MergeConfig, hierarchical_merge

STATE_VERSION = 1


@dataclass(frozen=True)
class Rollout:
    step: int
    problem: str
    completion: str
    reward: float
    answer: str | None = None

    @property
    def success(self) -> bool:
        return self.reward > 0


@dataclass(frozen=True)
class UpdateOutcome:
    """What an update did: memories extracted, replies that failed to parse or were cut by the token
    limit, and the ids added to each list (`general_skills` / `common_mistakes`)."""

    memories: int
    parse_failures: int
    truncated: int
    added: Mapping[str, tuple[str, ...]]
    refused: int = 0  # new items dropped: a special token of the policy's tokenizer, or over MAX_ITEM_CHARS


@dataclass(frozen=True)
class WindowCheck:
    """One history entry: the rollout window checked at `step`; `update` is None when no update was made
    (success rate at or above the threshold, or the update did not finish)."""

    step: int
    rollouts: int
    success_rate: float
    update: UpdateOutcome | None = None

    @property
    def updated(self) -> bool:
        return self.update is not None

    def to_state(self) -> dict[str, Any]:
        """Plain data for checkpoints (loaded with `weights_only=True`), the keys the entry always had."""
        state: dict[str, Any] = {"step": self.step, "rollouts": self.rollouts, "success_rate": self.success_rate,
                                 "updated": self.updated}
        if self.update is not None:
            state.update(memories=self.update.memories, parse_failures=self.update.parse_failures,
                         truncated=self.update.truncated, added={k: list(v) for k, v in self.update.added.items()})
            if self.update.refused:  # a newer key: written only when it says something
                state["refused"] = self.update.refused
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "WindowCheck":
        update = None
        if state["updated"]:
            update = UpdateOutcome(memories=int(state["memories"]), parse_failures=int(state["parse_failures"]),
                                   truncated=int(state["truncated"]),
                                   added={k: tuple(v) for k, v in state["added"].items()},
                                   refused=int(state.get("refused", 0)))  # absent in states saved before it
        return cls(step=int(state["step"]), rollouts=int(state["rollouts"]),
                   success_rate=float(state["success_rate"]), update=update)


@dataclass
class OnlineSkillUpdater:
    config: OnlineUpdateSettings
    run_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    window: list[Rollout] = field(default_factory=list)
    next_ids: dict[str, int] = field(default_factory=lambda: {SKILLS.list_key: 1, MISTAKES.list_key: 1})
    history: list[WindowCheck] = field(default_factory=list)
    dynamic: dict[str, list[dict]] = field(default_factory=lambda: {SKILLS.list_key: [], MISTAKES.list_key: []})
    last_checked_step: int = 0
    # the policy tokenizer's special tokens (`sgsd.prompts.special_tokens`): a new item holding one would act
    # as a chat-template control token in every teacher prompt it enters, so it is dropped, not added
    forbidden_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        problems = self.config.problems("online update")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def skills_dir(self) -> Path:
        return self.run_dir / "skills"

    def record(self, step: int, problems: Sequence[str], completions: Sequence[str], rewards: Sequence[float],
               answers: Sequence[str] | None = None) -> None:
        """Add the rollouts of `step` ([B] each) to the window; rollouts older than the window are dropped."""
        if not len(problems) == len(completions) == len(rewards) or (answers is not None and len(answers) != len(problems)):
            raise ValueError(f"record: {len(problems)} problems, {len(completions)} completions, {len(rewards)} rewards"
                             + ("" if answers is None else f", {len(answers)} answers"))
        answers = [None] * len(problems) if answers is None else list(answers)
        self.window.extend(Rollout(step, p, c, float(r), a) for p, c, r, a in zip(problems, completions, rewards, answers))
        self.window = [r for r in self.window if r.step > step - self.config.window_steps]

    def is_due(self, step: int) -> bool:
        """Whether `maybe_update(step, ...)` checks the window (every `every_steps` steps, once per step)."""
        return step > 0 and step % self.config.every_steps == 0 and step > self.last_checked_step

    def maybe_update(self, step: int, bank: SkillBank, llm: LLMClient) -> SkillBank | None:
        """The updated bank when an update is due and made at `step`, else None (see module docstring).

        Each check appends a `WindowCheck` to `history`; an update's `UpdateOutcome` counts the replies that
        failed to parse (`parse_failures`) and those the LLM client reports as cut by the token limit
        (`truncated`; clients that cannot tell report none), the usual reason for parse failures.
        """
        if not self.is_due(step):
            return None
        self.last_checked_step = step
        window = [r for r in self.window if r.step > step - self.config.window_steps]
        if not window:
            return None
        success_rate = sum(r.success for r in window) / len(window)
        check = WindowCheck(step=step, rollouts=len(window), success_rate=success_rate)
        self.history.append(check)
        if success_rate >= self.config.success_threshold:
            return None
        memories = self._select(window)
        prompts = [extraction_prompt(r.problem, r.completion, r.answer, r.success,
                                     max_items=self.config.max_items_per_memory,
                                     max_completion_chars=self.config.max_completion_chars) for r in memories]
        replies = llm.complete(prompts, max_tokens=self.config.max_tokens, temperature=self.config.temperature)
        truncated = sum(bool(t) for t in getattr(llm, "last_truncated", None) or [])
        new: dict[str, list[dict[str, str]]] = {SKILLS.list_key: [], MISTAKES.list_key: []}
        parse_failures = 0
        for rollout, reply in zip(memories, replies):
            kind = SKILLS if rollout.success else MISTAKES
            parsed = parse_reply(reply, kind, max_items=self.config.max_items_per_memory)
            parse_failures += parsed.failure is not None
            new[kind.list_key].extend(parsed.items)
        lists = {kind.list_key: self._update_list(kind, bank, new[kind.list_key], llm) for kind in (SKILLS, MISTAKES)}
        self.history[-1] = replace(check, update=UpdateOutcome(
            memories=len(memories), parse_failures=parse_failures, truncated=truncated,
            added={k: tuple(i.item_id for i in v[1]) for k, v in lists.items()},
            refused=sum(v[2] for v in lists.values())))
        metadata = {**bank.metadata, "online_update": {"run_id": self.run_id, "step": step, "success_rate": success_rate,
                                                       "parse_failures": parse_failures, "truncated": truncated}}
        updated = bank.with_dynamic(lists[SKILLS.list_key][0], lists[MISTAKES.list_key][0], metadata)
        self.dynamic = {SKILLS.list_key: [s.to_json() for s in updated.dynamic_skills],
                        MISTAKES.list_key: [m.to_json() for m in updated.dynamic_mistakes]}
        save_bank(updated, self.skills_dir / f"bank_step_{step:06d}.json")
        save_bank(updated, self.skills_dir / "latest.json")
        return updated

    def current_bank(self, base: SkillBank) -> SkillBank:
        """`base` with the dynamic items of the last update (after `load_state_dict`: the resumed bank)."""
        if not any(self.dynamic.values()):
            return base

        dynamic = parse_bank({**self.dynamic, "metadata": {}}, source=f"online updater state of run {self.run_id}")
        return base.with_dynamic(dynamic.general_skills, dynamic.common_mistakes, base.metadata)

    def state_dict(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "run_id": self.run_id, "config": asdict(self.config),
                "window": [asdict(r) for r in self.window], "next_ids": dict(self.next_ids),
                "history": [check.to_state() for check in self.history],
                "dynamic": {k: list(v) for k, v in self.dynamic.items()},
                "last_checked_step": self.last_checked_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("state_version") != STATE_VERSION:
            raise DataError(f"online skill updater state version {state.get('state_version')!r}, expected {STATE_VERSION}")
        self.run_id = state["run_id"]
        self.window = [Rollout(**r) for r in state["window"]]
        self.next_ids = dict(state["next_ids"])
        self.history = [WindowCheck.from_state(c) for c in state["history"]]
        self.dynamic = {k: list(v) for k, v in state["dynamic"].items()}
        self.last_checked_step = int(state["last_checked_step"])

    def _select(self, window: list[Rollout]) -> list[Rollout]:
        """The most recent rollouts, half successes and half failures when both exist (no RNG)."""
        limit = self.config.max_memories
        successes = [r for r in reversed(window) if r.success]
        failures = [r for r in reversed(window) if not r.success]
        take_success = min(len(successes), max(limit // 2, limit - len(failures)))
        return successes[:take_success] + failures[:limit - take_success]

    def _update_list(self, kind: ItemKind, bank: SkillBank, new: list[dict[str, str]], llm: LLMClient
                     ) -> tuple[list[GeneralSkill | CommonMistake], list[GeneralSkill | CommonMistake], int]:
        """(all dynamic items of the list after the update, the ones added now, the new ones refused for a
        special token)."""
        items = bank.general_skills if kind is SKILLS else bank.common_mistakes
        existing = [x for x in items if is_dynamic(x.item_id)]
        known = {dedup_key(kind.content(x)) for x in items}
        new = [c for c in new if dedup_key(c) not in known]
        if not new or self.config.max_new == 0:
            return existing, [], 0
        contents = [kind.content(x) for x in existing] + new
        if len(contents) > 1:
            merge = MergeConfig(group_size=self.config.group_size, max_tokens=self.config.merge_max_tokens,
                                temperature=self.config.temperature)
            contents, _ = hierarchical_merge(kind, contents, llm, merge)
        by_key = {dedup_key(kind.content(x)): x for x in existing}
        kept = [by_key[dedup_key(c)] for c in contents if dedup_key(c) in by_key]
        fresh = [c for c in contents if dedup_key(c) not in by_key and dedup_key(c) not in known]
        pattern = special_token_pattern(self.forbidden_tokens)
        clean = [c for c in fresh if (pattern is None or not any(pattern.search(text) for text in c.values()))
                 and item_chars(str(text) for text in c.values()) <= MAX_ITEM_CHARS]
        refused, fresh = len(fresh) - len(clean), clean[: self.config.max_new]
        number = max([self.next_ids[kind.list_key]] + [_dyn_number(x.item_id) + 1 for x in items if is_dynamic(x.item_id)])
        added = [kind.make(f"dyn_{number + i:03d}", c) for i, c in enumerate(fresh)]
        self.next_ids[kind.list_key] = number + len(added)
        # Existing items keep their (id) order; the oldest leave first when over capacity.
        kept.sort(key=lambda x: _dyn_number(x.item_id))
        result = (kept + added)[-self.config.capacity:] if self.config.capacity else []
        return result, [x for x in added if x in result], refused


def load_latest(run_dir: str | Path, run_id: str) -> SkillBank | None:
    """`run_dir/skills/latest.json` if it was written by run `run_id`, else None (never a stale file)."""
    path = Path(run_dir) / "skills" / "latest.json"
    if not path.exists():
        return None
    bank = load_bank(path)
    stamp = bank.metadata.get("online_update")
    return bank if isinstance(stamp, dict) and stamp.get("run_id") == run_id else None


def _dyn_number(item_id: str) -> int:
    match = re.fullmatch(r"dyn_(\d+)", item_id)
    return int(match.group(1)) if match else 0

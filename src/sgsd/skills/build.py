"""Cold-start skill bank building (docs/spec.md section 3 (1)-(3)): memories -> extraction -> merge.

Stages and their files in the output folder (each stage resumes from its file: a rerun skips what is
done, so an interrupted build costs only the record in flight):

1. `memories.jsonl`: one graded attempt per line (the policy answers the student prompt; the answer
   is graded by `sgsd.verify`, the same grader as training rewards and evaluation).
2. `extractions.jsonl`: one LLM reply per memory, parsed into 1-3 general skills (success) or common
   mistakes (failure); parse failures are recorded with their reason and counted.
   -> `raw_candidates.json`: all extracted items with ids `gen_cand_000001` / `err_cand_000001`,
   in the format of the reference raw candidates.
3. `merge_journal.jsonl`: one record per merged group -> `skill_bank.json`: the merged bank with ids
   `gen_###` / `err_###` in merge-output order and per-layer statistics in its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sgsd.data import Problem
from sgsd.errors import ConfigError, DataError
from sgsd.prompts import student_prompt
from sgsd.skills.bank import SkillBank, load_bank, save_bank
from sgsd.skills.extraction import MISTAKES, SKILLS, ItemKind, extraction_prompt, parse_reply
from sgsd.skills.llm import LLMClient, chunks
from sgsd.skills.merge import MergeConfig, hierarchical_merge, layers_metadata
from sgsd.storage import append_jsonl, read_jsonl
from sgsd.verify import grade_batch


@dataclass(frozen=True)
class Memory:
    memory_id: str  # "{problem_id}#{attempt}"
    problem_id: str
    problem: str
    answer: str
    completion: str
    correct: bool
    extracted: str | None  # the boxed answer, if any
    failure: str | None  # grader failure kind (no box, parse error, timeout), if any


@dataclass(frozen=True)
class BuildConfig:
    attempts_per_problem: int = 1
    attempt_max_tokens: int = 1024
    attempt_temperature: float = 1.0
    extract_max_tokens: int = 2048
    extract_temperature: float = 0.0
    max_items: int = 3  # per memory (docs/spec.md section 3: 1-3)
    max_completion_chars: int = 8000  # of an attempt shown to the extractor (start and end kept)
    batch_size: int = 32  # prompts per LLM call in stages 1 and 2
    merge: MergeConfig = field(default_factory=MergeConfig)

    def __post_init__(self) -> None:
        if self.attempts_per_problem < 1 or self.batch_size < 1 or self.max_items < 1:
            raise ConfigError("attempts_per_problem, batch_size and max_items must be at least 1")


@dataclass(frozen=True)
class BuildReport:
    memories: int
    successes: int
    failures: int
    parse_failures: int
    dropped_items: int
    candidate_skills: int
    candidate_mistakes: int
    bank_path: Path
    bank: SkillBank


def sample_memories(problems: Sequence[Problem], policy: LLMClient, path: str | Path,
                    config: BuildConfig) -> list[Memory]:
    """Stage 1: `attempts_per_problem` graded attempts per problem, appended to `path` as they finish."""
    done = {r["memory_id"]: Memory(**r) for r in read_jsonl(path)}
    jobs = [(p, a) for p in problems for a in range(config.attempts_per_problem)
            if f"{p.problem_id}#{a}" not in done]
    for batch in chunks(jobs, config.batch_size):
        completions = policy.complete([student_prompt(p.problem) for p, _ in batch],
                                      max_tokens=config.attempt_max_tokens, temperature=config.attempt_temperature)
        grades = grade_batch(completions, [p.answer for p, _ in batch])
        for (problem, attempt), completion, grade in zip(batch, completions, grades):
            memory = Memory(f"{problem.problem_id}#{attempt}", problem.problem_id, problem.problem, problem.answer,
                            completion, bool(grade.correct), grade.extracted, grade.failure)
            append_jsonl(path, memory.__dict__)
            done[memory.memory_id] = memory
    return [done[f"{p.problem_id}#{a}"] for p in problems for a in range(config.attempts_per_problem)]


def extract_candidates(memories: Sequence[Memory], updater: LLMClient, path: str | Path,
                       config: BuildConfig) -> list[dict]:
    """Stage 2: one LLM call per memory; one record per memory appended to `path`."""
    done = {r["memory_id"]: r for r in read_jsonl(path)}
    todo = [m for m in memories if m.memory_id not in done]
    for batch in chunks(todo, config.batch_size):
        prompts = [extraction_prompt(m.problem, m.completion, m.answer, m.correct, max_items=config.max_items,
                                     max_completion_chars=config.max_completion_chars) for m in batch]
        replies = updater.complete(prompts, max_tokens=config.extract_max_tokens, temperature=config.extract_temperature)
        for memory, reply in zip(batch, replies):
            kind = SKILLS if memory.correct else MISTAKES
            parsed = parse_reply(reply, kind, max_items=config.max_items)
            record = {"memory_id": memory.memory_id, "list": kind.list_key, "items": parsed.items,
                      "dropped_items": parsed.dropped_items, "failure": parsed.failure,
                      # The reply is kept for failures only, to diagnose the prompt or the model.
                      "reply": reply if parsed.failure else None}
            append_jsonl(path, record)
            done[memory.memory_id] = record
    return [done[m.memory_id] for m in memories]


def candidates_bank(memories: Sequence[Memory], extractions: Sequence[dict], *, source: str,
                    batch_size: int) -> SkillBank:
    """All extracted items as a bank (ids gen_cand_######, err_cand_######), reference-format metadata."""
    lists: dict[str, list] = {SKILLS.list_key: [], MISTAKES.list_key: []}
    for record in extractions:
        lists[record["list"]].extend(record["items"])
    successes = sum(m.correct for m in memories)
    metadata = {
        "source": source, "generation_mode": "single_memory_parallel_candidates", "merge_recommended": True,
        "total_memories_processed": len(memories), "success_memories": successes,
        "failure_memories": len(memories) - successes, "batch_size": batch_size,
        "parse_failures": sum(r["failure"] is not None for r in extractions),
        "dropped_items": sum(r["dropped_items"] for r in extractions),
    }
    return SkillBank(_with_ids(SKILLS, lists[SKILLS.list_key], "cand_", 6),
                     _with_ids(MISTAKES, lists[MISTAKES.list_key], "cand_", 6), {}, metadata)


def merge_bank(candidates: SkillBank, updater: LLMClient, config: MergeConfig, *, journal: str | Path | None,
               source: str) -> SkillBank:
    """Stage 3: hierarchical merge of both lists; ids reassigned gen_### / err_### in output order."""
    skills, skill_layers = hierarchical_merge(SKILLS, [SKILLS.content(s) for s in candidates.general_skills],
                                              updater, config, journal=journal)
    mistakes, mistake_layers = hierarchical_merge(
        MISTAKES, [MISTAKES.content(m) for m in candidates.common_mistakes], updater, config, journal=journal)
    metadata = {
        "source": source, "merge_group_size": config.group_size, "merge_stagnation_patience": config.patience,
        "batch_size": config.batch_size,
        "input_general_skills": len(candidates.general_skills), "output_general_skills": len(skills),
        "input_common_mistakes": len(candidates.common_mistakes), "output_common_mistakes": len(mistakes),
        "general_merge_layers": layers_metadata(skill_layers),
        "common_mistake_merge_layers": layers_metadata(mistake_layers),
        "extraction": {k: v for k, v in candidates.metadata.items() if k != "source"},
    }
    return SkillBank(_with_ids(SKILLS, skills, "", 3), _with_ids(MISTAKES, mistakes, "", 3), {}, metadata)


def build_bank(problems: Sequence[Problem], policy: LLMClient, updater: LLMClient, out_dir: str | Path,
               config: BuildConfig = BuildConfig()) -> BuildReport:
    """Run (or resume) the three stages into `out_dir`; returns counts and the merged bank."""
    check_unique_ids(problems)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    memories = sample_memories(problems, policy, out / "memories.jsonl", config)
    extractions = extract_candidates(memories, updater, out / "extractions.jsonl", config)
    raw_path = out / "raw_candidates.json"
    candidates = candidates_bank(memories, extractions, batch_size=config.batch_size,
                                 source=f"single-memory extraction from {out / 'memories.jsonl'} using {updater.name}")
    save_bank(candidates, raw_path)
    bank_path = out / "skill_bank.json"
    bank = merge_bank(load_bank(raw_path), updater, config.merge, journal=out / "merge_journal.jsonl",
                      source=f"hierarchical merge from {raw_path} using {updater.name}")
    save_bank(bank, bank_path)
    return BuildReport(len(memories), sum(m.correct for m in memories), sum(not m.correct for m in memories),
                       candidates.metadata["parse_failures"], candidates.metadata["dropped_items"],
                       len(candidates.general_skills), len(candidates.common_mistakes), bank_path, load_bank(bank_path))


def check_unique_ids(problems: Sequence[Problem]) -> None:
    """Refuse two different problems with one id: memories are keyed "{problem_id}#{attempt}", so the
    second would be taken for the first's, silently (refused rather than renamed, so that every memory
    keeps the id its row has in the file)."""
    first: dict[str, Problem] = {}
    for problem in problems:
        other = first.setdefault(problem.problem_id, problem)
        if other is not problem:
            raise DataError(f"skills build: problem id {problem.problem_id!r} is given to two different problems "
                            f"({other.problem[:40]!r} and {problem.problem[:40]!r}); memories are keyed by id: make "
                            "the ids unique, or drop the id field (a hash of each problem's text is used then)")


def _with_ids(kind: ItemKind, contents: Sequence[dict], infix: str, width: int) -> tuple:
    return tuple(kind.make(f"{kind.static_prefix}_{infix}{i:0{width}d}", c) for i, c in enumerate(contents, start=1))

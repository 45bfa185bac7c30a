"""Teacher construction from a retrieval, and its precomputation for a whole dataset (SPEC section 3).

Teacher r is the rank-aligned pair (skill r, mistake r), r = 0..K-1 with K = min(#skills, #mistakes,
k). Its pair score is the mean of the two retrieval scores; the teacher weights are
a = softmax(pair scores) at temperature 1, or uniform 1/K when the retrieval has no scores (random
mode). Weights sum to 1 per problem. Each teacher's guidance renders its ONE pair
(`sgsd.prompts.render_guidance([skill], [mistake])`).

Precomputation: `precompute_teachers` retrieves for all problems in batches and, given a cache path,
stores one JSONL record per problem keyed by (SHA-256 of the problem, bank version, retriever key, k),
so training never embeds the same problem twice, and a rerun reuses what is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sgsd.errors import DataError
from sgsd.prompts import render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank
from sgsd.skills.retrieval import Retrieval, Retriever
from sgsd.storage import atomic_write_jsonl, read_jsonl, stable_hash


@dataclass(frozen=True)
class Teacher:
    skill: GeneralSkill
    mistake: CommonMistake
    score: float | None  # mean of the skill and mistake scores; None in random mode
    weight: float  # a_k: softmax over the pair scores (or 1/K); sums to 1 over a problem's teachers
    guidance: str  # the teacher's privileged-information block (one pair)


def pair_weights(scores: Sequence[float | None]) -> list[float]:
    """softmax(scores) at temperature 1 (max-subtracted, float64); uniform 1/K if any score is None."""
    if not scores:
        return []
    if any(s is None for s in scores):
        return [1.0 / len(scores)] * len(scores)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = math.fsum(exps)
    return [e / total for e in exps]


def build_teachers(retrieval: Retrieval, k: int | None = None) -> list[Teacher]:
    """The K rank-aligned teachers of one problem (K = min(len(skills), len(mistakes), k))."""
    size = min(len(retrieval.skills), len(retrieval.mistakes))
    if k is not None:
        size = min(size, k)
    pairs = list(zip(retrieval.skills[:size], retrieval.mistakes[:size]))
    scores = [None if s.score is None or m.score is None else (s.score + m.score) / 2.0 for s, m in pairs]
    weights = pair_weights(scores)
    return [
        Teacher(s.item, m.item, score, weight, render_guidance([s.item], [m.item]))
        for (s, m), score, weight in zip(pairs, scores, weights)
    ]


def problem_key(problem: str) -> str:
    """Stable key of a problem text (SHA-256 prefix; the same in every process)."""
    return stable_hash(problem, 32)


def precompute_teachers(bank: SkillBank, retriever: Retriever, problems: Sequence[str], k: int, *,
                        cache_path: str | Path | None = None, batch_size: int = 256) -> list[list[Teacher]]:
    """Teachers for every problem, in order. Problems already in the cache (same bank version,
    retriever key and k) are not retrieved again; new ones are retrieved in batches of `batch_size`
    (one embedding call per batch) and the cache is rewritten atomically once at the end."""
    if retriever.bank.version != bank.version:
        raise DataError(f"retriever is bound to bank version {retriever.bank.version}, not {bank.version}: "
                        "use retriever.rebind(bank)")
    cached = load_teacher_cache(cache_path, bank, retriever.key, k) if cache_path else {}
    keys = [problem_key(p) for p in problems]
    missing = list(dict.fromkeys(p for p, key in zip(problems, keys) if key not in cached))
    for start in range(0, len(missing), batch_size):
        for retrieval in retriever.retrieve_many(missing[start:start + batch_size], k):
            cached[problem_key(retrieval.problem)] = build_teachers(retrieval, k)
    if cache_path and missing:
        save_teacher_cache(cache_path, bank, retriever.key, k, cached)
    return [cached[key] for key in keys]


def load_teacher_cache(path: str | Path, bank: SkillBank, retriever_key: str, k: int) -> dict[str, list[Teacher]]:
    """Stored teachers that match (bank version, retriever key, k), by problem key; others are ignored."""
    result: dict[str, list[Teacher]] = {}
    skills = {s.skill_id: s for s in bank.general_skills}
    mistakes = {m.mistake_id: m for m in bank.common_mistakes}
    for record in read_jsonl(path):
        if (record.get("bank_version"), record.get("retriever"), record.get("k")) != (bank.version, retriever_key, k):
            continue
        try:
            result[record["problem_key"]] = [
                _teacher_from_record(skills[e["skill_id"]], mistakes[e["mistake_id"]], e) for e in record["teachers"]
            ]
        except (KeyError, TypeError) as err:
            raise DataError(f"teacher cache {path}: record {record.get('problem_key')!r}: bad or unknown "
                            f"field or item {err}") from None
    return result


def save_teacher_cache(path: str | Path, bank: SkillBank, retriever_key: str, k: int,
                       teachers: dict[str, list[Teacher]]) -> None:
    """Rewrite the cache atomically: records of other (bank, retriever, k) keys are kept as they were."""
    others = [r for r in read_jsonl(path)
              if (r.get("bank_version"), r.get("retriever"), r.get("k")) != (bank.version, retriever_key, k)]
    ours = [
        {"problem_key": key, "bank_version": bank.version, "retriever": retriever_key, "k": k,
         "teachers": [{"skill_id": t.skill.skill_id, "mistake_id": t.mistake.mistake_id,
                       "score": t.score, "weight": t.weight} for t in ts]}
        for key, ts in sorted(teachers.items())
    ]
    atomic_write_jsonl(path, others + ours)


def _teacher_from_record(skill: GeneralSkill, mistake: CommonMistake, entry: dict) -> Teacher:
    return Teacher(skill, mistake, entry["score"], float(entry["weight"]), render_guidance([skill], [mistake]))

"""The probe's rollouts: one graded completion of a training problem each, sampled by the probe or read
from a user's JSONL file (`--rollouts-file`), and the probe's input error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sgsd.errors import UserError
from sgsd.storage import read_input_jsonl
from sgsd.verify import grade_batch


class ProbeError(UserError):
    """Bad input of `sgsd skills probe` (config, rollouts file, options)."""


@dataclass(frozen=True)
class ProbeRollout:
    """One graded completion of a training problem."""

    problem_id: str
    problem: str
    completion: str
    reward: float
    token_ids: tuple[int, ...] = ()  # as sampled (with the end-of-sequence token); empty: tokenize `completion`
    truncated: bool = False


def read_rollouts_file(path: str | Path, problems: Sequence[Any], extract: str) -> list[ProbeRollout]:
    """JSONL rows with `completion` and the problem: its text (`problem`) or the `problem_id` of a problem of the
    config's training data (so that `sgsd eval`'s samples files can be read as they are). The reward is the row's
    `reward`, else the completion graded with the config's `reward.extract` against the row's `gold` or the
    data's answer. One-line errors name the row."""

    by_text = {p.problem: p for p in problems}
    by_id = {p.problem_id: p for p in problems}
    source = Path(path)
    if not source.is_file():
        raise ProbeError(f"--rollouts-file {path}: no such file")
    rows: list[dict[str, Any]] = []
    # bounded, regular file, UTF-8, one JSON object per line: the rule every input file from a user follows
    for number, row in read_input_jsonl(source, "--rollouts-file"):
        if not isinstance(row.get("completion"), str) or not (
                isinstance(row.get("problem"), str) or "problem_id" in row):
            raise ProbeError(f"{path}:{number}: needs a string 'completion' and a 'problem' text or a 'problem_id'")
        known = by_text.get(row["problem"]) if isinstance(row.get("problem"), str) else by_id.get(str(row["problem_id"]))
        text = row["problem"] if isinstance(row.get("problem"), str) else (known.problem if known else None)
        if text is None:
            raise ProbeError(f"{path}:{number}: problem_id {row['problem_id']!r} is not in the config's training data")
        gold = row.get("gold", known.answer if known else None)
        if "reward" not in row and gold is None:
            raise ProbeError(f"{path}:{number}: no 'reward', no 'gold' and the problem is not in the training data")
        rows.append({**row, "_text": text, "_gold": gold, "_line": number})
    if not rows:
        raise ProbeError(f"{path}: no rollouts")
    to_grade = [r for r in rows if "reward" not in r]
    grades = grade_batch([r["completion"] for r in to_grade], [r["_gold"] for r in to_grade],
                         extract=extract)  # type: ignore[arg-type]
    graded = {id(r): float(g.correct) for r, g in zip(to_grade, grades)}
    return [ProbeRollout(str(r.get("problem_id", r["_line"])), r["_text"], r["completion"],
                         float(r["reward"]) if "reward" in r else graded[id(r)],
                         truncated=bool(r.get("truncated", False))) for r in rows]

"""Training problems: DAPO-Math-17k from the hub, local JSONL/JSON/parquet, or the built-in tiny set.

Every source becomes a list of `Problem(problem_id, problem, answer)`. Field names are detected
(`problem`/`question`/`prompt`, `answer`/`ground_truth`/`reward_model.ground_truth`) or given.
DAPO's `prompt` is a chat list whose last user message wraps the problem in an "Answer: $Answer"
instruction: the wrapper is removed so the project's own prompt (docs/spec.md section 2) is used. The public
DAPO file repeats each problem 100 times: rows are deduplicated by problem text.
GSM8K-style answers (a worked solution whose last line is `#### <gold>`) keep only the gold, with
thousands separators removed, as `sgsd eval` does for the GSM8K benchmark; `LoadReport.gold_note`
says how many. Rows without a problem or answer are skipped and counted (`LoadReport.skipped_note` names the first
few, 1-based), or refused (`bad_rows: error`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sgsd.errors import DataError

BUILTIN_PREFIX = "builtin:"
PROBLEM_FIELDS = ("problem", "question", "prompt", "Problem")
ANSWER_FIELDS = ("answer", "ground_truth", "reward_model.ground_truth", "Answer", "final_answer")

_DAPO_HEAD = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.S)
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$", re.S)
# A worked solution that ends in a "#### <gold>" line (GSM8K's answer field).
_GOLD_LINE = re.compile(r"(?:^|\n)####[ \t]*(\S[^\n]*?)\s*$")


@dataclass(frozen=True)
class Problem:
    problem_id: str
    problem: str
    answer: str


SHOWN_SKIPPED_ROWS = 5  # row numbers named in the skipped-rows note; the count covers all


@dataclass(frozen=True)
class LoadReport:
    source: str
    rows: int
    kept: int
    skipped_missing: int
    duplicates: int
    skipped_rows: tuple[int, ...] = ()  # 1-based numbers of the first skipped rows (at most SHOWN_SKIPPED_ROWS)
    gold_extracted: int = 0  # answers that were worked solutions ending in "#### <gold>": only the gold was kept

    def gold_note(self) -> str | None:
        """One line saying how many answers were GSM8K-style worked solutions reduced to their gold."""
        if not self.gold_extracted:
            return None
        return (f"{self.source}: {self.gold_extracted} of {self.kept} answers were worked solutions ending in "
                "'#### <answer>'; only that answer is kept as the gold")

    def skipped_note(self) -> str | None:
        """One line naming the rows dropped for lack of a problem or answer, or None when none were."""
        if not self.skipped_missing:
            return None
        shown = ", ".join(map(str, self.skipped_rows))
        more = ", ..." if self.skipped_missing > len(self.skipped_rows) else ""
        return (f"{self.source}: skipped {self.skipped_missing} of {self.rows} rows without a problem or answer "
                f"(row {shown}{more}; data.bad_rows=error refuses them instead)")


def problem_hash(text: str) -> str:
    """Stable id of a problem text (Python's hash() is salted per process)."""
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _problem_text(value: Any) -> str | None:
    if isinstance(value, list):  # chat list: the last user message holds the problem
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        return None
    text = _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", value))
    return text.strip()


def split_gold(answer: str, marker: str) -> str:
    """The gold after the last `marker` of a worked solution, without thousands separators ("1,000" -> "1000")."""
    return answer.rsplit(marker, 1)[1].strip().replace(",", "")


def worked_solution_gold(answer: str) -> str | None:
    """The gold of a worked solution whose last line is `#### <gold>` (GSM8K), or None for any other answer."""
    return split_gold(answer, "####") if _GOLD_LINE.search(answer) else None


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def read_rows(path: str, split: str = "train") -> Iterable[dict[str, Any]]:
    local = Path(path).expanduser()
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            with local.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{local}: line {number}: invalid JSON ({err.msg})") from err
                    if not isinstance(row, dict):
                        raise DataError(f"{local}: line {number}: expected a JSON object")
                    yield row
            return
        if suffix == ".json":
            try:
                data = json.loads(local.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{local}: invalid JSON at line {err.lineno} ({err.msg})") from err
            rows = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise DataError(f"{local}: expected a list of objects (or {{'data': [...]}})")
            yield from rows
            return
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(local).to_pylist()
            return
        raise DataError(f"{local}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if local.exists():
        raise DataError(f"dataset {path}: not a file")
    from sgsd.paths import check_local_path

    check_local_path(path, "dataset", DataError)  # not a hub id: no offline-mode network error
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(f"dataset {path} (split {split}): cannot load ({str(err).splitlines()[0]})") from err
    yield from dataset


def _detect(row: dict[str, Any], candidates: tuple[str, ...], given: str | None) -> str | None:
    if given:
        return given
    return next((name for name in candidates if _get(row, name) is not None), None)


def load_problems(path: str, *, split: str = "train", problem_field: str | None = None,
                  answer_field: str | None = None, deduplicate: bool = True, max_problems: int | None = None,
                  bad_rows: str = "skip") -> tuple[list[Problem], LoadReport]:
    """Read problems from `path` (see module docstring). Raises DataError on unusable input."""
    if path.startswith(BUILTIN_PREFIX):
        return _builtin(path[len(BUILTIN_PREFIX):], max_problems)
    problems: list[Problem] = []
    seen: set[str] = set()
    rows = skipped = duplicates = golds = 0
    skipped_rows: list[int] = []
    p_field = a_field = None
    for index, row in enumerate(read_rows(path, split)):
        rows += 1
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index}: expected an object, got {type(row).__name__}")
        p_field = p_field or _detect(row, PROBLEM_FIELDS, problem_field)
        a_field = a_field or _detect(row, ANSWER_FIELDS, answer_field)
        problem = _problem_text(_get(row, p_field)) if p_field else None
        answer = _answer_text(_get(row, a_field)) if a_field else None
        if problem is None or answer is None:
            missing = "problem" if problem is None else "answer"
            if bad_rows == "error":
                raise DataError(f"{path}: row {index + 1}: no {missing} (fields tried: "
                                f"{p_field or ', '.join(PROBLEM_FIELDS)} / {a_field or ', '.join(ANSWER_FIELDS)})")
            skipped += 1
            if len(skipped_rows) < SHOWN_SKIPPED_ROWS:
                skipped_rows.append(index + 1)
            continue
        gold = worked_solution_gold(answer)
        key = problem_hash(problem)
        if deduplicate and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        problems.append(Problem(str(row.get("id", key)), problem, answer if gold is None else gold))
        golds += gold is not None
        if max_problems is not None and len(problems) >= max_problems:
            break
    if not problems:
        raise DataError(f"{path}: no usable rows ({rows} read, {skipped} without a problem or answer)")
    return problems, LoadReport(path, rows, len(problems), skipped, duplicates, tuple(skipped_rows), golds)


def _builtin(name: str, max_problems: int | None) -> tuple[list[Problem], LoadReport]:
    if name != "tiny-math":
        raise DataError(f"builtin dataset {name!r}: unknown (available: tiny-math)")
    problems = tiny_math_problems()
    if max_problems is not None:
        problems = problems[:max_problems]
    return problems, LoadReport(BUILTIN_PREFIX + name, len(problems), len(problems), 0, 0)


def tiny_math_problems(count: int = 64, seed: int = 0) -> list[Problem]:
    """A small deterministic set of arithmetic word problems for the tiny recipes and tests."""
    import random

    rng = random.Random(seed)
    templates = [
        ("What is {a} + {b}?", lambda a, b: a + b),
        ("What is {a} - {b}?", lambda a, b: a - b),
        ("What is {a} times {b}?", lambda a, b: a * b),
        ("Tom has {a} apples and buys {b} more. How many apples does he have?", lambda a, b: a + b),
    ]
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < count:
        text, fn = templates[len(out) % len(templates)]
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        problem = text.format(a=a, b=b)
        if problem not in seen:
            seen.add(problem)
            out.append(Problem(f"tiny-{len(out):03d}", problem, str(fn(a, b))))
    return out


def training_dataset(problems: list[Problem], tokenizer: Any, *, enable_thinking: bool | None, max_prompt_tokens: int,
                     skill_blocks: list[str] | None = None, source: str = "data") -> Any:
    """The rows a trainer reads (a `datasets.Dataset`): `prompt` (the chat list TRL renders),
    `problem`, `answer`, `problem_id`, `student_prompt` (docs/spec.md section 2) and `skill_block` (the "+Skill"
    block prefixed to the student prompt, "" without; OPSD+Skill gives it to the teacher too).

    A prompt longer than `max_prompt_tokens` after the chat template is refused, naming the problem.
    """
    from datasets import Dataset

    from sgsd.prompts import ChatStyle, render_chat, student_prompt

    style = ChatStyle(enable_thinking)
    rows = []
    for index, item in enumerate(problems):
        text = student_prompt(item.problem)
        if skill_blocks is not None:
            text = f"{skill_blocks[index]}\n\n{text}"
        length = len(tokenizer(render_chat(tokenizer, text, style), add_special_tokens=False)["input_ids"])
        if length > max_prompt_tokens:
            raise DataError(f"{source}: problem {item.problem_id}: prompt is {length} tokens, longer than "
                            f"prompt.max_prompt_tokens={max_prompt_tokens}")
        rows.append({"prompt": [{"role": "user", "content": text}], "problem": item.problem, "answer": item.answer,
                     "problem_id": item.problem_id, "student_prompt": text,
                     "skill_block": skill_blocks[index] if skill_blocks is not None else ""})
    return Dataset.from_list(rows)

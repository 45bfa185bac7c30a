"""Training problems: DAPO-Math-17k from the hub, local JSONL/JSON/parquet, or the built-in tiny set.

Every source becomes a list of `Problem(problem_id, problem, answer)`. Field names are detected
(`problem`/`question`/`prompt`, `answer`/`ground_truth`/`reward_model.ground_truth`) or given.
DAPO's `prompt` is a chat list whose last user message wraps the problem in an "Answer: $Answer"
instruction: the wrapper is removed so the project's own prompt (docs/spec.md section 2) is used. The public
DAPO file repeats each problem 100 times: rows are deduplicated by problem text.
GSM8K-style answers (a worked solution whose last line is `#### <gold>`) keep only the gold, with
thousands separators removed, as `sgsd eval` does for the GSM8K benchmark; `LoadReport.gold_note`
says how many. Each row is read by its own fields (the first candidate field present in that row).
A gold answer is a non-empty text or a finite number (`gold_answer`, the rule `sgsd eval`'s
benchmarks and `sgsd skills build` share): NaN, Infinity, booleans, lists and objects are no answer.
Rows without a problem or answer are skipped and counted (`LoadReport.skipped_note` names the first
few, 1-based, and what was wrong with their answers), or refused (`bad_rows: error`); a file with no
row left is refused. Local files are read with the size bound and the regular-file check of
`sgsd.storage.read_input_bytes`; text that is not UTF-8 is refused naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol

from sgsd.errors import DataError
from sgsd.paths import check_local_path
from sgsd.prompts import ChatStyle, refuse_special_tokens, render_chat, student_prompt
from sgsd.storage import check_input_file, decode_utf8, parse_json, read_input_bytes, read_input_jsonl

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

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


REFUSE_HINT = "data.bad_rows=error refuses them instead"


@dataclass(frozen=True)
class LoadReport:
    source: str
    rows: int
    kept: int
    skipped_missing: int
    duplicates: int
    skipped_rows: tuple[int, ...] = ()  # 1-based numbers of the first skipped rows (at most SHOWN_SKIPPED_ROWS)
    gold_extracted: int = 0  # answers that were worked solutions ending in "#### <gold>": only the gold was kept
    # what the skipped rows' answers were, when they were present but unusable ("NaN", "a list"), first seen first
    unusable_answers: tuple[str, ...] = ()
    refuse_hint: str | None = REFUSE_HINT  # how to refuse such rows instead, for the note (None: no such setting)

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
        details = [f"row {shown}{more}"]
        if self.unusable_answers:
            details.append(f"answers {', '.join(self.unusable_answers)} are not texts or finite numbers")
        if self.refuse_hint:
            details.append(self.refuse_hint)
        return (f"{self.source}: skipped {self.skipped_missing} of {self.rows} rows without a problem or answer "
                f"({'; '.join(details)})")


class RowSkips:
    """The rows a loader skipped: counted, the first few numbered, unusable answers described."""

    def __init__(self) -> None:
        self.count = 0
        self.rows: list[int] = []
        self.answers: list[str] = []

    def add(self, row_number: int, unusable: str | None = None) -> None:
        self.count += 1
        if len(self.rows) < SHOWN_SKIPPED_ROWS:
            self.rows.append(row_number)
        if unusable is not None and unusable not in self.answers:
            self.answers.append(unusable)

    def report(self, source: str, rows: int, kept: int, duplicates: int = 0, gold_extracted: int = 0,
               refuse_hint: str | None = REFUSE_HINT) -> LoadReport:
        return LoadReport(source, rows, kept, self.count, duplicates, tuple(self.rows), gold_extracted,
                          tuple(self.answers), refuse_hint)

    def none_left(self, source: str, rows: int) -> DataError:
        """The error for a file with no usable row."""
        shown = ", ".join(map(str, self.rows)) + (", ..." if self.count > len(self.rows) else "")
        why = f"; answers {', '.join(self.answers)} are not texts or finite numbers" if self.answers else ""
        return DataError(f"{source}: no usable rows ({rows} read, {self.count} without a problem or answer"
                         f"{': row ' + shown if self.count else ''}{why})")


def problem_texts(problems: Iterable[Problem], source: str) -> Iterator[tuple[str, str]]:
    """(where, text) for the problem and answer of every problem, `where` naming `source` and the problem
    (for `sgsd.prompts.refuse_special_tokens`)."""
    for item in problems:
        yield f"{source}: problem {item.problem_id}", item.problem
        yield f"{source}: problem {item.problem_id} (answer)", item.answer


class HasTexts(Protocol):
    """Something whose texts can be checked item by item (`sgsd.skills.bank.SkillBank`)."""

    def texts(self, source: str) -> Iterable[tuple[str, str]]: ...


def check_untrusted_text(tokenizer: PreTrainedTokenizerBase, problems: Iterable[Problem], source: str,
                         bank: HasTexts | None = None, bank_source: str | None = None) -> None:
    """Refuse problems, answers and (when given) the items of `bank` that hold the tokenizer's special
    tokens, in one line naming the item and the token (`sgsd.prompts.refuse_special_tokens`).
    bank: a `sgsd.skills.bank.SkillBank` (anything with its `texts(source)`), read from `bank_source`."""
    refuse_special_tokens(tokenizer, problem_texts(problems, source),
                          bank.texts(str(bank_source)) if bank is not None else ())


def problem_hash(text: str) -> str:
    """Stable id of a problem text (Python's hash() is salted per process)."""
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


def _get(row: dict[str, Any], dotted: str) -> object:
    value: object = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _problem_text(value: object) -> str | None:
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


def gold_answer(value: object) -> str | None:
    """The gold-answer rule of every loader (training data, benchmarks, skills build): a non-empty text
    (stripped) or a finite number, as text; None for anything else (see `answer_problem`)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    return None


def answer_problem(value: object) -> str:
    """What makes `value` no gold answer, for notes: "NaN", "Infinity", "a boolean", "a list", ..."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return "an empty text"
    names = {bool: "a boolean", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def row_field(row: dict[str, Any], candidates: tuple[str, ...], given: str | None = None) -> str | None:
    """The field a row's value is read from: `given`, else the first candidate present in THIS row."""
    if given:
        return given
    return next((name for name in candidates if _get(row, name) is not None), None)


def read_problem_answer(row: dict[str, Any], problem_fields: tuple[str, ...], answer_fields: tuple[str, ...],
                        problem_field: str | None = None, answer_field: str | None = None
                        ) -> tuple[str | None, str | None, str | None]:
    """(problem text, gold answer, why the answer is unusable) of one row, read by its own fields;
    the problem or answer is None when missing or unusable; the reason only for a present, unusable answer."""
    p_field = row_field(row, problem_fields, problem_field)
    a_field = row_field(row, answer_fields, answer_field)
    problem = _problem_text(_get(row, p_field)) if p_field else None
    raw = _get(row, a_field) if a_field else None
    answer = gold_answer(raw)
    return problem, answer, answer_problem(raw) if answer is None and raw is not None else None


def read_rows(path: str, split: str = "train", what: str = "dataset") -> Iterable[dict[str, Any]]:
    """The rows of a local .jsonl / .json / .parquet file (bounded, UTF-8, regular files only) or of a
    hub dataset; `what` names the input in errors ("dataset", "benchmark")."""
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir():
            raise DataError(f"{what} {path}: not a file")
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            yield from (row for _, row in read_input_jsonl(local, what))
            return
        if suffix == ".json":
            text = decode_utf8(read_input_bytes(local, what), str(local))
            try:
                data = parse_json(text, str(local))
            except json.JSONDecodeError as err:
                raise DataError(f"{local}: invalid JSON at line {err.lineno} ({err.msg})") from err
            rows = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise DataError(f"{local}: expected a list of objects (or {{'data': [...]}})")
            yield from rows
            return
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            check_input_file(local, what)
            try:
                table = pq.read_table(local)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{local}: cannot read as parquet ({str(err).splitlines()[0]})") from None
            yield from table.to_pylist()
            return
        check_input_file(local, what)  # a device or FIFO is named as such, not as a file type
        raise DataError(f"{local}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")

    check_local_path(path, what, DataError)  # not a hub id: no offline-mode network error
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(f"{what} {path} (split {split}): cannot load ({str(err).splitlines()[0]})") from err
    yield from dataset


def load_problems(path: str, *, split: str = "train", problem_field: str | None = None,
                  answer_field: str | None = None, deduplicate: bool = True, max_problems: int | None = None,
                  bad_rows: str = "skip", refuse_hint: str | None = REFUSE_HINT) -> tuple[list[Problem], LoadReport]:
    """Read problems from `path` (see module docstring). Raises DataError on unusable input.
    refuse_hint: the skipped-rows note's advice on refusing such rows (None where no setting does)."""
    if path.startswith(BUILTIN_PREFIX):
        return _builtin(path[len(BUILTIN_PREFIX):], max_problems)
    problems: list[Problem] = []
    seen: set[str] = set()
    rows = duplicates = golds = 0
    skips = RowSkips()
    for index, row in enumerate(read_rows(path, split)):
        rows += 1
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index}: expected an object, got {type(row).__name__}")
        problem, answer, unusable = read_problem_answer(row, PROBLEM_FIELDS, ANSWER_FIELDS, problem_field, answer_field)
        if problem is None or answer is None:
            if bad_rows == "error":
                missing = "problem" if problem is None else "answer"
                what = (f"answer is {unusable} (a gold answer is a text or a finite number)" if unusable
                        else f"no {missing}")
                tried = f"{problem_field or ', '.join(PROBLEM_FIELDS)} / {answer_field or ', '.join(ANSWER_FIELDS)}"
                raise DataError(f"{path}: row {index + 1}: {what} (fields tried: {tried})")
            skips.add(index + 1, unusable)
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
        raise skips.none_left(path, rows)
    return problems, skips.report(path, rows, len(problems), duplicates, golds, refuse_hint)


def _builtin(name: str, max_problems: int | None) -> tuple[list[Problem], LoadReport]:
    if name != "tiny-math":
        raise DataError(f"builtin dataset {name!r}: unknown (available: tiny-math)")
    problems = tiny_math_problems()
    if max_problems is not None:
        problems = problems[:max_problems]
    return problems, LoadReport(BUILTIN_PREFIX + name, len(problems), len(problems), 0, 0)


def tiny_math_problems(count: int = 64, seed: int = 0) -> list[Problem]:
    """A small deterministic set of arithmetic word problems for the tiny recipes and tests."""
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


def training_dataset(problems: list[Problem], tokenizer: PreTrainedTokenizerBase, *, enable_thinking: bool | None,
                     max_prompt_tokens: int, skill_blocks: list[str] | None = None, source: str = "data") -> Dataset:
    """The rows a trainer reads (a `datasets.Dataset`): `prompt` (the chat list TRL renders),
    `problem`, `answer`, `problem_id`, `student_prompt` (docs/spec.md section 2) and `skill_block` (the "+Skill"
    block prefixed to the student prompt, "" without; OPSD+Skill gives it to the teacher too).

    A prompt longer than `max_prompt_tokens` after the chat template is refused, naming the problem.
    """
    from datasets import Dataset

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

"""Benchmark registry and loading (docs/spec.md section 7).

A benchmark is a list of `Problem`s (id, problem text, gold answer). `load_benchmark(spec)` accepts
- a registered name (`aime24`, `aime25`, `hmmt25`, `math500`, `gsm8k`): read from the Hugging Face hub,
  or, with `data_dir`, from the local JSONL file of that name (the layout of `../shared/benchmarks/`);
- `builtin:tiny-math`, the arithmetic problems of the tiny training recipes (offline, for a smoke test);
- a path to any `.jsonl`, `.json` or `.parquet` file whose rows have a problem field (`problem` or
  `question`) and an answer field (`answer`); ids come from `id`, `problem_idx` or `unique_id`, else the
  row number.
GSM8K's answer holds the worked solution with the gold after `####`; only that gold is kept.
Rows are read by the training loader's rules (`sgsd.data.read_problem_answer`): each row by its own
fields, gold answers texts or finite numbers; other rows are skipped with the training loader's note
(`Benchmark.notes`, printed by `sgsd eval`), and a file with none left is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sgsd.data import BUILTIN_PREFIX, Problem, RowSkips, load_problems, read_problem_answer, split_gold
from sgsd.data import read_rows as read_file_rows  # .jsonl / .json / .parquet, shared with training data
from sgsd.errors import DataError, UserError
from sgsd.paths import check_local_path

PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "gold")
ID_FIELDS = ("id", "problem_idx", "unique_id", "ID", "idx")


@dataclass(frozen=True)
class BenchmarkSource:
    """Where a registered benchmark lives: its hub dataset and its local file name."""

    hub_id: str
    split: str
    local_file: str
    hub_config: str | None = None
    gold_after: str | None = None  # the gold is the text after this marker (GSM8K: "####")


BENCHMARKS: dict[str, BenchmarkSource] = {
    "aime24": BenchmarkSource("HuggingFaceH4/aime_2024", "train", "aime_2024.jsonl"),
    "aime25": BenchmarkSource("yentinglin/aime_2025", "train", "aime_2025.jsonl"),
    "hmmt25": BenchmarkSource("MathArena/hmmt_feb_2025", "train", "hmmt_feb_2025.jsonl"),
    "math500": BenchmarkSource("HuggingFaceH4/MATH-500", "test", "math_500.jsonl"),
    "gsm8k": BenchmarkSource("openai/gsm8k", "test", "gsm8k_test.jsonl", hub_config="main", gold_after="####"),
}


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # the file read or the hub id
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()  # one line each: rows skipped (see module docstring)


def load_benchmark(spec: str, *, data_dir: str | Path | None = None, limit: int | None = None) -> Benchmark:
    """Load a registered benchmark (hub, or `data_dir`) or a JSONL/JSON/parquet file; first `limit` problems."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: expected a positive number of problems")
    if spec.startswith(BUILTIN_PREFIX):
        problems, report = load_problems(spec)
        return Benchmark(spec[len(BUILTIN_PREFIX):], report.source, tuple(problems[:limit] if limit else problems))
    if spec in BENCHMARKS:
        source = BENCHMARKS[spec]
        if data_dir is not None:
            if not Path(data_dir).expanduser().is_dir():
                raise UserError(f"--data-dir: no such file or directory: {data_dir}")
            path = Path(data_dir) / source.local_file
            if not path.exists():
                raise DataError(f"benchmark {spec}: {path} not found (--data-dir must hold {source.local_file})")
            rows, origin = read_file_rows(str(path), "train", "benchmark"), str(path)
        else:
            rows, origin = _hub_rows(spec, source), source.hub_id
        problems, notes = rows_to_problems(rows, origin, gold_after=source.gold_after)
        name = spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            check_local_path(spec, "benchmark")
            known = ", ".join([*BENCHMARKS, BUILTIN_PREFIX + "tiny-math"])
            raise UserError(f"benchmark {spec!r}: not a registered name ({known}) nor an existing file")
        origin, name = str(path), path.stem
        problems, notes = rows_to_problems(read_file_rows(origin, "train", "benchmark"), origin)
    return Benchmark(name, origin, tuple(problems[:limit] if limit else problems), notes)


def rows_to_problems(rows: Iterable[Any], origin: str, *,
                     gold_after: str | None = None) -> tuple[list[Problem], tuple[str, ...]]:
    """(the problems, the skipped-rows note if any); DataError when no row is usable."""
    problems: list[Problem] = []
    seen: set[str] = set()
    skips = RowSkips()
    count = 0
    for index, row in enumerate(rows):
        count += 1
        where = f"{origin} row {index + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        problem, answer, unusable = read_problem_answer(row, PROBLEM_FIELDS, ANSWER_FIELDS)
        if problem is None or answer is None:
            skips.add(index + 1, unusable)
            continue
        if gold_after is not None:
            if gold_after not in answer:
                raise DataError(f"{where}: answer has no {gold_after!r} marker before the gold")
            answer = split_gold(answer, gold_after)
        problem_id = next((str(row[f]) for f in ID_FIELDS if row.get(f) is not None), str(index))
        if problem_id in seen:
            raise DataError(f"{where}: duplicate problem id {problem_id!r}")
        seen.add(problem_id)
        problems.append(Problem(problem_id, problem, answer))
    if not problems:
        raise skips.none_left(f"benchmark {origin}", count)
    note = skips.report(origin, count, len(problems), refuse_hint=None).skipped_note()
    return problems, (note,) if note else ()


def _hub_rows(name: str, source: BenchmarkSource) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(source.hub_id, source.hub_config, split=source.split)
    except Exception as err:  # noqa: BLE001 - offline, missing or renamed: one actionable line
        raise UserError(
            f"benchmark {name}: cannot load {source.hub_id} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"offline, pass --data-dir with {source.local_file}"
        ) from err
    return [dict(row) for row in dataset]

"""Training data: field detection, DAPO prompt unwrapping, dedup, bad rows skipped or refused."""

import json

import pytest

from sgsd.data import load_problems, problem_hash, tiny_math_problems
from sgsd.errors import DataError

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
               "Find x if 2x = 6.\n\nRemember to put your answer on its own line after \"Answer:\".")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dapo_rows_are_unwrapped_and_deduplicated(tmp_path):
    row = {"prompt": [{"role": "user", "content": DAPO_PROMPT}], "reward_model": {"ground_truth": "3"}}
    path = _write_jsonl(tmp_path / "dapo.jsonl", [row] * 100)
    problems, report = load_problems(path)
    assert [(p.problem, p.answer) for p in problems] == [("Find x if 2x = 6.", "3")]
    assert (report.rows, report.kept, report.duplicates) == (100, 1, 99)


def test_bad_rows_skipped_and_counted_or_refused(tmp_path):
    rows = [{"problem": "1+1?", "answer": 2}, {"problem": "no answer"}, {"answer": "5"}, {"problem": "", "answer": 1}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    problems, report = load_problems(path)
    assert [p.answer for p in problems] == ["2"] and report.skipped_missing == 3
    with pytest.raises(DataError, match=r"d.jsonl: row 2: no answer"):
        load_problems(path, bad_rows="error")


def test_invalid_inputs_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": 1}\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_problems(str(bad))
    with pytest.raises(DataError, match="dataset: no such file or directory: .*missing.jsonl"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not a file"):
        load_problems(str(tmp_path))
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match="no usable rows"):
        load_problems(empty)


def test_parquet_and_explicit_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["What is 2+2?"], "sol": ["4"]}), path)
    problems, _ = load_problems(str(path), problem_field="q", answer_field="sol")
    assert problems[0].problem == "What is 2+2?" and problems[0].answer == "4"


def test_builtin_tiny_math_is_deterministic_and_correct():
    a, b = tiny_math_problems(), tiny_math_problems()
    assert a == b and len({p.problem for p in a}) == len(a)
    first = a[0]
    left, right = first.problem.removeprefix("What is ").removesuffix("?").split(" + ")
    assert int(first.answer) == int(left) + int(right)
    assert problem_hash(" x ") == problem_hash("x")


def test_gsm8k_worked_solutions_keep_only_the_gold(tmp_path):
    rows = [
        {"question": "Eggs?", "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
        {"question": "Big?", "answer": "It is 1000 + 234 = 1234.\n#### 1,234"},
        {"question": "Plain?", "answer": "7"},
        {"question": "Hash inside?", "answer": "x####y"},  # not a final '#### gold' line: kept as given
        {"question": "Eggs?", "answer": "#### 18"},  # a duplicate problem: dropped, not counted
    ]
    problems, report = load_problems(_write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert [p.answer for p in problems] == ["18", "1234", "7", "x####y"]
    assert report.gold_extracted == 2 and report.duplicates == 1
    assert report.gold_note() == (f"{tmp_path / 'gsm8k.jsonl'}: 2 of 4 answers were worked solutions ending in "
                                  "'#### <answer>'; only that answer is kept as the gold")
    plain, plain_report = load_problems(_write_jsonl(tmp_path / "plain.jsonl", rows[2:4]))
    assert plain_report.gold_note() is None and [p.answer for p in plain] == ["7", "x####y"]


def test_real_gsm8k_rows_grade_against_their_gold():
    from conftest import BENCHMARKS, require_shared

    from sgsd.verify import grade

    path = require_shared(BENCHMARKS / "gsm8k_test.jsonl")
    problems, report = load_problems(str(path), max_problems=50)
    assert report.gold_extracted == len(problems) == 50
    assert all(p.answer.lstrip("-").replace(".", "", 1).isdigit() for p in problems)
    # the first problem's gold is 18 (Janet's ducks); a completion stating it is graded correct
    assert problems[0].answer == "18" and grade("She makes \\boxed{18} dollars.", problems[0].answer).correct


def test_a_missing_real_data_folder_skips_saying_what_a_clone_lacks(tmp_path):
    from conftest import require_shared

    with pytest.raises(pytest.skip.Exception) as skipped:
        require_shared(tmp_path / "shared" / "benchmarks" / "gsm8k_test.jsonl")
    message = str(skipped.value)
    assert "a clone of the repository does not include" in message
    assert "Hugging Face datasets listed there" in message and "BENCHMARKS" in message
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_shared(tmp_path / "shared" / "reference-skill-banks")
    assert "skill banks released with the paper" in str(skipped.value)
    assert require_shared(tmp_path) == tmp_path  # present: no skip

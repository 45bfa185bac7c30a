"""The grader (docs/spec.md section 7): extraction, a table of tricky pairs, pathological inputs, threads and processes."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sgsd.verify import (
    FAILURE_KINDS,
    GradeResult,
    accuracy_reward,
    check_equivalent,
    extract_answer,
    extract_boxed,
    grade,
    grade_batch,
    normalize_gold,
)

# Wall-clock slack over a check's timeout: killing the worker and scheduling on a loaded 2-core
# machine (several agents and test processes share it). The worker's restart is not timed.
SLACK_S = 2.0


_WARM_CALLS = itertools.count(1)


def warm() -> None:
    """Start (or restart) the grader process so a timed call measures the check, not sympy's import.
    A new pair each time: verdicts are cached in this process."""
    n = next(_WARM_CALLS)
    assert grade(f"\\boxed{{\\frac{{{n}}}{{{2 * n}}}}}", "0.5").correct


# ------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", ("42", None)),
        ("first \\boxed{1}, then \\boxed{2} and some text after it", ("2", None)),  # last box, text after
        ("\\boxed{\\frac{1}{2}}", ("\\frac{1}{2}", None)),  # nested braces
        ("\\fbox{7}", ("7", None)),
        ("\\boxed {7}", ("7", None)),
        ("\\boxed{\\{1,2\\}}", ("\\{1,2\\}", None)),  # escaped braces do not close the box
        ("\\boxed{ $12$ }", ("12", None)),
        ("\\boxed{12.}", ("12", None)),
        ("\\boxed{}", ("", "no_answer")),
        ("no box here: 42", (None, "no_answer")),
        ("", (None, "no_answer")),
        ("\\boxed{1} then a truncated \\boxed{\\frac{3}{", (None, "unbalanced")),
        ("\\boxed{1}}", ("1", None)),  # a stray closing brace after a closed box is just text
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_after_think():
    text = "<think>maybe \\boxed{1}</think> so \\boxed{2}"
    assert extract_boxed(text) == ("2", None)
    assert extract_boxed("<think>\\boxed{1}</think> no box after", after_think=True) == (None, "no_answer")
    assert extract_boxed("<think>\\boxed{1}</think> no box after") == ("1", None)
    # An unfinished think block (truncated) has no final answer yet.
    assert extract_boxed("<think>trying \\boxed{5} ...", after_think=True) == (None, "no_answer")
    # Without any think tags the whole text counts (non-thinking mode).
    assert extract_boxed("plain \\boxed{3}", after_think=True) == ("3", None)


def test_extract_is_linear_on_one_megabyte():
    for text in ("x" * 10**6 + "\\boxed{7}", "\\boxed{" * 100_000 + "x", "{" * 10**6, "\\" * 10**6):
        start = time.perf_counter()
        extract_boxed(text)
        assert time.perf_counter() - start < 2.0


def test_normalize_gold():
    assert normalize_gold(25) == "25"
    assert normalize_gold(" $\\frac{1}{2}$ ") == "\\frac{1}{2}"
    assert normalize_gold("The answer is \\boxed{3}") == "3"


# ------------------------------------------------------------------------------------------ tricky pairs

# (gold, boxed prediction, expected). Each row is a judgement a careful human grader would make.
TRICKY = [
    ("025", "25", True), ("25", "025", True), ("24", "25", False), ("3", "-3", False),  # AIME, off-by-one
    ("\\frac{1}{2}", "0.5", True), ("1/2", "\\dfrac{1}{2}", True), ("\\frac12", "\\tfrac{1}{2}", True),  # fractions
    ("\\frac{1}{3}", "0.333", False),  # 3 digits is not 1/3
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{8}", "2.828", False), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),  # radicals
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("3, 5, 7", "7,5,3", True),  # sets
    ("(0,1]", "(0,1]", True), ("(0,1]", "[0,1]", False), ("(-\\infty, 2)", "(-\\infty,2)", True),  # intervals
    ("(1,2)", "(2,1)", False),  # ordered pairs
    ("\\text{Evelyn}", "Evelyn", True), ("\\text{(C)}", "C", True), ("\\text{Monday}", "\\text{Tuesday}", False),  # text
    ("5", "5\\text{ cm}", True), ("18", "\\$18", True), ("18", "18.00", True),  # units, currency
    ("10\\%", "10", True), ("50\\%", "0.5", True),  # percent
    ("30^\\circ", "30", True), ("30", "30^{\\circ}", True), ("30^\\circ", "60", False),  # degrees
    ("1000", "1,000", True), ("1{,}000", "1000", True), ("1000", "1,001", False),  # commas in numbers
    ("x^2+1", "1+x^{2}", True), ("x^2+1", "x^2-1", False), ("3", "x=3", True),  # expressions, equations
    ("\\frac{\\pi}{2}", "\\pi/2", True), ("6-5i", "6 - 5i", True), ("6-5i", "6+5i", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
]


def test_tricky_pairs_table():
    golds = [gold for gold, _, _ in TRICKY]
    completions = [f"Thus the final answer is $\\boxed{{{pred}}}$." for _, pred, _ in TRICKY]
    results = grade_batch(completions, golds, workers=2)
    wrong = [(g, p, exp, r) for (g, p, exp), r in zip(TRICKY, results) if r.correct != exp]
    assert not wrong, wrong
    assert all(r.failure is None for r in results)


def test_integer_fast_path_agrees_with_math_verify():
    # The in-process integer comparison must give math-verify's verdict (checked here in-process:
    # these inputs are small and safe).
    for gold, pred in [("025", "25"), ("7", "007"), ("-3", "3"), ("0", "-0"), ("999", "998"), ("+5", "5")]:
        fast = grade(f"\\boxed{{{pred}}}", gold).correct
        assert fast == (check_equivalent(pred, gold) == "correct"), (gold, pred)


# ------------------------------------------------------------------------------------------ bounded time


def test_pathological_inputs_return_in_bounded_time():
    cases = [
        ("\\boxed{9^{9^{9^9}}}", "5"),  # unbounded for math-verify without a time limit
        ("\\boxed{" + "x" * 10**6 + "}", "3"),  # 1 MB answer
        ("y" * 10**6 + " \\boxed{3}", "3"),  # 1 MB of text before the box
        ("\\boxed{\\frac{1}{2", "1/2"),
        ("", "1"),
    ]
    timeout_s = 1.0
    for completion, gold in cases:
        warm()
        start = time.perf_counter()
        result = grade(completion, gold, timeout_s=timeout_s)
        elapsed = time.perf_counter() - start
        assert isinstance(result, GradeResult)
        assert elapsed < timeout_s + SLACK_S, (completion[:40], elapsed)
        assert result.failure in FAILURE_KINDS + (None,)
    assert grade("\\boxed{9^{9^{9^9}}}", "5", timeout_s=timeout_s).failure == "timeout"
    assert grade("y" * 10**6 + " \\boxed{3}", "3").correct
    assert grade("\\boxed{\\frac{1}{2", "1/2").failure == "unbalanced"
    assert grade("", "1").failure == "no_answer"


def test_timeout_off_the_main_thread():
    # math-verify's own signal.alarm timeout raises off the main thread; ours must not.
    warm()
    results: list[GradeResult] = []
    thread = threading.Thread(target=lambda: results.append(grade("\\boxed{9^{9^{9^9}}}", "5", timeout_s=1.0)))
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=60)
    assert results and results[0].failure == "timeout"
    assert time.perf_counter() - start < 1.0 + SLACK_S
    # and after the restart, ordinary checks work again from threads
    thread = threading.Thread(target=lambda: results.append(grade("\\boxed{\\sqrt{18}}", "3\\sqrt{2}")))
    thread.start()
    thread.join(timeout=120)
    assert results[1] == GradeResult(True, "\\sqrt{18}", None)


def test_identical_checks_in_a_batch_run_once():
    # 3 identical slow checks on 1 worker: one timeout's worth of time, not three
    warm()
    start = time.perf_counter()
    results = grade_batch(["\\boxed{9^{9^{9^9}}}"] * 3, ["5"] * 3, workers=1, timeout_s=1.0)
    assert time.perf_counter() - start < 1.0 + SLACK_S
    assert [r.failure for r in results] == ["timeout"] * 3


def _grade_in_child(pair):
    return grade(*pair, timeout_s=2.0)


def test_grading_inside_daemonic_worker_processes():
    # multiprocessing refuses to start children from daemonic pool workers; the grader uses subprocess.
    pairs = [("\\boxed{\\frac{2}{4}}", "0.5"), ("\\boxed{9^{9^{9^9}}}", "5"), ("\\boxed{026}", "25")]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.map(_grade_in_child, pairs)
    assert [(r.correct, r.failure) for r in results] == [(True, None), (False, "timeout"), (False, None)]


def test_recovers_when_a_worker_is_killed():
    from sgsd import verify

    warm()
    for worker in verify._pool().workers:
        os.kill(worker.process.pid, 9)
        worker.process.wait()
    assert grade("\\boxed{\\frac{3}{6}}", "1/2").correct


# ------------------------------------------------------------------------------------------ batch and reward


def test_batch_matches_single_grading_in_order():
    golds = ["\\frac{1}{2}", "7", "\\sqrt{2}", "x+1", "10"] * 4
    preds = ["0.5", "8", "\\sqrt2", "1+x", "\\boxed"] * 4
    completions = [f"so \\boxed{{{p}}}" if p != "\\boxed" else "no answer" for p in preds]
    batch = grade_batch(completions, golds, workers=2)
    single = [grade(c, g) for c, g in zip(completions, golds)]
    assert batch == single
    assert [r.correct for r in batch[:5]] == [True, False, True, True, False]
    assert batch[4].failure == "no_answer"
    with pytest.raises(ValueError):
        grade_batch(["a"], ["1", "2"])


def test_accuracy_reward_accepts_strings_and_messages():
    completions = [
        "\\boxed{12}",
        [{"role": "assistant", "content": "It is \\boxed{\\frac{1}{2}}"}],
        [{"role": "assistant", "content": "\\boxed{3}"}],
        "no box",
    ]
    rewards = accuracy_reward(prompts=["p"] * 4, completions=completions, answer=["12", "0.5", "4", "1"], trainer_state=None)
    assert rewards == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_worker_dies_with_a_killed_parent(tmp_path):
    # A trainer killed mid-check must not leave a grader burning CPU on 9^{9^{9^9}} for hours.
    script = (
        "import os, threading, time\n"
        "from sgsd.verify import grade, _pool\n"
        "grade('\\\\boxed{x+3}', '3+x')\n"
        "print(_pool().workers[0].process.pid, flush=True)\n"
        "threading.Thread(target=lambda: grade('\\\\boxed{9^{9^{9^9}}}', '5', timeout_s=1000)).start()\n"
        "time.sleep(1.0)\n"
        "os._exit(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, timeout=120).stdout
    pid = int(out.split()[0])

    def alive() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")  # a zombie is dead, only not yet reaped

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    orphaned = alive()
    if orphaned:
        os.kill(pid, 9)
    assert not orphaned


def test_a_grader_that_cannot_start_is_an_error_not_a_wrong_answer(monkeypatch):
    # A broken environment must not silently grade every symbolic answer as wrong.
    from sgsd import verify

    verify.shutdown()
    verify._VERDICTS.clear()  # the check below must reach a grader process
    monkeypatch.setattr(verify.sys, "executable", "/bin/false")
    try:
        with pytest.raises(verify.GraderUnavailable):
            grade("\\boxed{\\frac{7}{14}}", "0.5")
        assert grade("\\boxed{12}", "12").correct  # integers need no grader process
    finally:
        monkeypatch.undo()
    warm()  # the pool recovers once the environment is fixed


# ---------------------------------------------------------------------------------------------- flexible


@pytest.mark.parametrize("completion, expected", [
    ("So, the answer is 3.", "3"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 15,000 dollars, since 3 * 5 = 15.", "15000"),  # the statement, not the later 15
    ("First 4 + 4 = 8. The final answer is: **12**. Check: 12 - 4 = 8.", "12"),
    ("Answer: $7.50", "7.50"),
    ("2 + 3 = 5, then 5 * 2 = 10", "10"),  # no statement: the last number
    ("\\boxed{7} but the answer is 3", "7"),  # a box wins over a statement
    ("The answer is 4. Wait, the answer is 6.", "6"),  # the last statement
    ("-3 degrees at night, the answer is -3", "-3"),
    ("The answer is 40 - 5 = 25. Then 25 - 4 = 21", "25"),  # a stated calculation: its result
])
def test_flexible_extraction(completion, expected):
    assert extract_answer(completion, extract="flexible") == (expected, None)


def test_flexible_without_any_number_is_a_typed_failure():
    assert extract_answer("I do not know.", extract="flexible") == (None, "no_answer")
    assert grade("I do not know.", "3", extract="flexible").failure == "no_answer"


def test_boxed_stays_the_default_and_ignores_stated_answers():
    assert grade("So, the answer is 3.", "3").failure == "no_answer"
    assert grade("So, the answer is 3.", "3", extract="flexible").correct
    assert grade_batch(["#### 18", "\\boxed{18}"], ["18", "18"], extract="flexible")[0].correct


def test_flexible_accuracy_reward_keeps_the_reward_name():
    from sgsd.verify import AccuracyReward

    flexible = AccuracyReward(extract="flexible")
    assert flexible.__name__ == "accuracy_reward"  # TRL's reward metric keys stay the same
    completions = [[{"role": "assistant", "content": "The answer is 12."}], "\\boxed{12}", "no idea"]
    answers = ["12", "12", "12"]
    assert flexible(prompts=["p"] * 3, completions=completions, answer=answers) == [1.0, 1.0, 0.0]
    assert flexible.last_failures["no_answer"] == 1
    assert AccuracyReward()(prompts=["p"] * 3, completions=completions, answer=answers) == [0.0, 1.0, 0.0]
    flexible_rewards = accuracy_reward(prompts=["p"] * 3, completions=completions, answer=answers, extract="flexible")
    assert flexible_rewards == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="extract="):
        AccuracyReward(extract="lenient")


REAL_COMPLETIONS = Path(__file__).parent / "data" / "smollm2_gsm8k_completions.json"


def _real_completions():
    import json

    return json.loads(REAL_COMPLETIONS.read_text())["completions"]


@pytest.mark.parametrize("row", _real_completions(), ids=lambda row: f"gsm8k-{row['problem_id']}")
def test_flexible_extraction_on_real_completions(row):
    """Completions of SmolLM2-135M-Instruct on GSM8K (none writes a box), answers read by hand."""
    assert extract_boxed(row["completion"]) == (None, "no_answer")
    assert extract_answer(row["completion"], extract="flexible") == (row["expected_flexible"], None)
    result = grade(row["completion"], row["gold"], extract="flexible")
    assert result.correct == (row["expected_flexible"] == row["gold"])
    assert grade(row["completion"], row["gold"]).failure == "no_answer"


def test_real_completion_stating_the_answer_is_right_only_under_flexible_grading():
    rows = {row["problem_id"]: row for row in _real_completions()}
    blue_fiber = rows["1"]  # "So, the answer is 3." with gold 3 (the example)
    assert blue_fiber["gold"] == "3" and grade(blue_fiber["completion"], "3", extract="flexible").correct
    assert not grade(blue_fiber["completion"], "3").correct
    # a number after the final statement (and one mid-reasoning) is not the answer
    eggs = rows["18"]["completion"]
    assert eggs.rstrip().endswith("So, the final answer is 36 * 18 =")
    assert extract_answer(eggs, extract="flexible")[0] == "36"


@pytest.mark.parametrize("gold", ["3\u200b", "\ufeff3", "3\u00ad", "\u20603", "\u200c3\u200d", "\\boxed{3\u200b}"])
def test_invisible_characters_in_a_gold_never_turn_a_correct_answer_wrong(gold):
    from sgsd.verify import grade

    assert grade("so \\boxed{3}", gold) == GradeResult(True, "3", None)


@pytest.mark.parametrize("completion", ["\\boxed{3\u200b}", "\\boxed{\ufeff3}", "\\boxed{\u00ad3}"])
def test_invisible_characters_in_a_completion_are_removed_before_it_is_read(completion):
    from sgsd.verify import extract_answer, grade

    assert grade(completion, "3") == GradeResult(True, "3", None)
    assert extract_answer("the answer is 1\u200b5", extract="flexible") == ("15", None)

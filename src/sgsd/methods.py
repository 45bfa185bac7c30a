"""Training methods, registered by name (as verl registers its policy losses): one entry per method says
what the orchestrator needs to know, so `sgsd.trainers.run` never branches on a method's name.

A `MethodSpec` gives:
- `settings`: the `RunConfig` section holding the method's settings (e.g. `sgsd`), or None;
- `trainer`: its trainer class as "module:Class" (imported only when a run is built, so this module
  and `sgsd.config` stay light);
- `needs_bank(cfg)`: whether a run needs a skill bank (teachers, or a "+Skill" block in prompts);
- `prompt_skills(cfg)`: whether the retrieved "+Skill" block goes into the rollout prompt;
- `grpo_overrides(cfg)`: `GRPOConfig` settings the method fixes (generations per prompt, KL beta,
  vLLM importance-sampling correction);
- `trainer_kwargs(cfg, context)`: the method's own constructor arguments (`context` holds the loaded
  bank, retriever, chat styles and run directory);
- `validate(cfg)`: the method's own configuration problems, one message each;
- `online_updates`: whether online skill-bank updates (`skills.online`) apply to it.

Adding a method is one file that defines its trainer and calls `register_method` (see
`docs/extending.md`, whose example the tests run). Built-in methods: `sgsd`, `grpo`, `opsd`, `sgsd-pg`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from sgsd.config import RunConfig
    from sgsd.prompts import ChatStyle
    from sgsd.skills.bank import SkillBank
    from sgsd.skills.retrieval import Retriever


@dataclass(frozen=True)
class TrainerContext:
    """What a method's `trainer_kwargs` may use besides the config (loaded once by the orchestrator)."""

    bank: "SkillBank | None"
    retriever: "Retriever | None"
    student_style: "ChatStyle"
    teacher_style: "ChatStyle"
    output_dir: Path


def _no_problems(cfg: "RunConfig") -> Iterator[str]:
    return iter(())


def _no_kwargs(cfg: "RunConfig", context: TrainerContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trainer: str
    settings: str | None = None
    needs_bank: Callable[["RunConfig"], bool] = lambda cfg: False
    prompt_skills: Callable[["RunConfig"], bool] = lambda cfg: False
    grpo_overrides: Callable[["RunConfig"], dict[str, Any]] = lambda cfg: {}
    trainer_kwargs: Callable[["RunConfig", TrainerContext], dict[str, Any]] = _no_kwargs
    validate: Callable[["RunConfig"], Iterator[str]] = _no_problems
    online_updates: bool = False  # whether `skills.online` (online skill-bank updates) applies
    # what of a run cannot work under DeepSpeed ZeRO-3 (checked before the model loads, `preflight.check_engine`)
    zero3_problems: Callable[["RunConfig"], Iterator[str]] = _no_problems
    description: str = ""
    # GRPOConfig settings every method gets unless it overrides them: one rollout per prompt, no KL,
    # no importance-sampling forward (only a clipped surrogate uses those weights)
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "num_generations": 1, "beta": 0.0, "vllm_importance_sampling_correction": False})

    def grpo_settings(self, cfg: "RunConfig") -> dict[str, Any]:
        return {**self.defaults, **self.grpo_overrides(cfg)}

    def trainer_class(self) -> type:
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add (or replace, e.g. when a module is reloaded) the method `spec.name`."""
    _REGISTRY[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (registered: {', '.join(method_names())})") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# -- built-in methods ---------------------------------------------------------------------------------


def _sgsd_kwargs(cfg: "RunConfig", context: TrainerContext) -> dict[str, Any]:
    from sgsd.trainers.sgsd_trainer import TeacherSource
    from sgsd.trainers.skill_hooks import make_observers

    return {"teacher_source": TeacherSource(context.bank, context.retriever, cfg.sgsd.num_teachers),
            "settings": cfg.sgsd, "student_style": context.student_style, "teacher_style": context.teacher_style,
            "observers": make_observers(cfg, context.output_dir)}


def _sgsd_problems(cfg: "RunConfig") -> Iterator[str]:
    s = cfg.sgsd
    if s.num_teachers < 1:
        yield "sgsd.num_teachers: must be at least 1"
    if s.gate_tau <= 0:
        yield "sgsd.gate_tau: must be > 0"
    if s.clip_delta <= 0:
        yield "sgsd.clip_delta: must be > 0"
    if s.confidence_threshold < 0:
        yield "sgsd.confidence_threshold: must be >= 0"
    if not s.polarity_z > 0:
        yield "sgsd.polarity_z: must be > 0 (1.96: two-sided 5% test)"
    if s.local_support_top_k < 0:
        yield "sgsd.local_support_top_k: must be >= 0 (0 = full vocabulary)"
    if s.local_support_top_k > 0 and s.skip_neutral_rows:
        yield ("sgsd.skip_neutral_rows: not available with the local-support variant (local_support_top_k > 0); "
               "set skip_neutral_rows=false")


def _grpo_problems(cfg: "RunConfig") -> Iterator[str]:
    if cfg.grpo.num_generations < 2:
        yield "grpo.num_generations: GRPO needs at least 2 completions per prompt to form a group"


def _grpo_overrides(cfg: "RunConfig") -> dict[str, Any]:
    """G completions per prompt, KL beta, and vLLM's importance-sampling correction (the clipped surrogate uses it)."""
    return {"num_generations": cfg.grpo.num_generations, "beta": cfg.grpo.beta,
            "vllm_importance_sampling_correction": True}


def _sgsd_pg_problems(cfg: "RunConfig") -> Iterator[str]:
    yield from _sgsd_problems(cfg)
    yield from _grpo_problems(cfg)
    if not (math.isfinite(cfg.sgsd_pg.lambda_sgsd) and cfg.sgsd_pg.lambda_sgsd >= 0):
        yield "sgsd_pg.lambda_sgsd: must be a number >= 0 (0: GRPO alone, with SGSD's metrics)"
    if cfg.grpo.skills_in_prompt:
        yield "grpo.skills_in_prompt: sgsd-pg gives the skills to its teachers, not to the rollout prompt; set it to false"


ZERO2_HINT = "or DeepSpeed ZeRO-2 (configs/paper/deepspeed-zero2.json)"


def _ema_under_zero3(section: str, teacher: str) -> Iterator[str]:
    if teacher == "ema":
        yield (f"{section}.teacher=ema under DeepSpeed ZeRO-3: the EMA shadow reads and swaps whole parameters, which "
               f"ZeRO-3 partitions over the ranks; use {section}.teacher=live or base, {ZERO2_HINT}")


def _sgsd_zero3_problems(cfg: "RunConfig") -> Iterator[str]:
    yield from _ema_under_zero3("sgsd", cfg.sgsd.teacher)
    if cfg.skills.online.enabled and cfg.skills.online.llm == "policy":
        yield ("skills.online.llm=policy under DeepSpeed ZeRO-3: the main process generates the updates alone, and a "
               "ZeRO-3 forward needs every rank; give skills.online.llm an OpenAI-compatible server URL, "
               f"{ZERO2_HINT}")


def _sgsd_pg_zero3_problems(cfg: "RunConfig") -> Iterator[str]:
    yield ("method sgsd-pg under DeepSpeed ZeRO-3: TRL's GRPO loss gathers the LM head itself and breaks ZeRO-3's "
           f"parameter prefetch next to the SGSD loss; use method sgsd or opsd under ZeRO-3, {ZERO2_HINT}")
    yield from _sgsd_zero3_problems(cfg)


def _opsd_problems(cfg: "RunConfig") -> Iterator[str]:
    if not 0.0 <= cfg.opsd.beta <= 1.0:
        yield "opsd.beta: must be in [0, 1]"


register_method(MethodSpec(
    name="sgsd", settings="sgsd", trainer="sgsd.trainers.sgsd_trainer:SGSDTrainer",
    needs_bank=lambda cfg: True, trainer_kwargs=_sgsd_kwargs, validate=_sgsd_problems, online_updates=True,
    zero3_problems=_sgsd_zero3_problems, description="skill-conditioned gated self-distillation (SPEC section 4)",
))
register_method(MethodSpec(
    name="grpo", settings="grpo", trainer="sgsd.trainers.grpo_trainer:GRPOBaselineTrainer",
    needs_bank=lambda cfg: cfg.grpo.skills_in_prompt, prompt_skills=lambda cfg: cfg.grpo.skills_in_prompt,
    grpo_overrides=_grpo_overrides, validate=_grpo_problems, description="TRL's GRPO (SPEC section 5); +Skill with grpo.skills_in_prompt",
))
register_method(MethodSpec(
    name="opsd", settings="opsd", trainer="sgsd.trainers.opsd_trainer:OPSDTrainer",
    needs_bank=lambda cfg: cfg.opsd.skills, prompt_skills=lambda cfg: cfg.opsd.skills,
    trainer_kwargs=lambda cfg, context: {"settings": cfg.opsd, "teacher_style": context.teacher_style},
    validate=_opsd_problems, zero3_problems=lambda cfg: _ema_under_zero3("opsd", cfg.opsd.teacher),
    description="on-policy self-distillation from the reference answer (SPEC section 5)",
))
register_method(MethodSpec(
    name="sgsd-pg", settings="sgsd_pg", trainer="sgsd.trainers.sgsd_pg_trainer:SGSDPGTrainer",
    needs_bank=lambda cfg: True, grpo_overrides=_grpo_overrides,
    trainer_kwargs=lambda cfg, context: {**_sgsd_kwargs(cfg, context), "lambda_sgsd": cfg.sgsd_pg.lambda_sgsd},
    validate=_sgsd_pg_problems, zero3_problems=_sgsd_pg_zero3_problems,
    description="GRPO's loss plus lambda x the SGSD loss on the same rollouts (issue 14; grpo, sgsd, sgsd_pg sections)",
))

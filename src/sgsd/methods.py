"""Training methods, registered by name (as verl registers its policy losses): one entry per method says
what the orchestrator needs to know, so `sgsd.trainers.run` never branches on a method's name.

A `MethodSpec` gives:
- `settings`: the `RunConfig` section holding the method's settings (e.g. `sgsd`), or None, and
  `sections`: every section it reads, each checked with its own `problems()`;
- `trainer`: its trainer class as "module:Class", and `trainer_kwargs`: the trainer's own constructor
  arguments, `(cfg, context) -> dict` or "module:function" (imported only when a run is built, so the
  registry never imports a trainer);
- `needs_bank(cfg)`: whether a run needs a skill bank (teachers, or a "+Skill" block in prompts);
- `prompt_skills(cfg)`: whether the retrieved "+Skill" block goes into the rollout prompt;
- `grpo_overrides(cfg)`: `GRPOConfig` settings the method fixes (generations per prompt, KL beta,
  vLLM importance-sampling correction);
- `problems(cfg)`: the method's own cross-section configuration problems, one message each
  (`check_run_config` runs them with the sections' and the shared checks, after importing `plugins`);
- `online_updates`: whether online skill-bank updates (`skills.online`) apply to it;
- `groups`, `skill_teachers`: whether it samples a group of G completions per prompt, and whether it
  scores rollouts with K skill teachers (the demo's budget and polarity tables follow them);
- `description`, `label(cfg)`, `card_settings`: what the model card and the demo say about it (the
  registry is the only per-method table).

Adding a method is one file that defines its trainer and calls `register_method` (see
`docs/extending.md`, whose example the tests run). Built-in methods: `sgsd`, `grpo`, `opsd`, `sgsd-pg`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sgsd.config import RunConfig, load_config
from sgsd.errors import ConfigError
from sgsd.prompts import ChatStyle
from sgsd.skills.bank import SkillBank

if TYPE_CHECKING:
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
    settings: str | None = None  # the method's own config section, e.g. "sgsd"
    sections: tuple[str, ...] = ()  # every config section it reads (checked with their `problems()`)
    needs_bank: Callable[["RunConfig"], bool] = lambda cfg: False
    prompt_skills: Callable[["RunConfig"], bool] = lambda cfg: False
    grpo_overrides: Callable[["RunConfig"], dict[str, Any]] = lambda cfg: {}
    # the trainer's own constructor arguments: a function (cfg, context) -> dict, or "module:function"
    # (imported when a run is built, like `trainer`, so the registry does not import trainers)
    trainer_kwargs: "str | Callable[[RunConfig, TrainerContext], dict[str, Any]]" = _no_kwargs
    problems: Callable[["RunConfig"], Iterator[str]] = _no_problems
    online_updates: bool = False  # whether `skills.online` (online skill-bank updates) applies
    groups: bool = False  # samples a group of grpo.num_generations completions per prompt
    skill_teachers: bool = False  # scores its rollouts with K skill teachers (polarity, attribution)
    # what of a run cannot work under DeepSpeed ZeRO-3 (checked before the model loads, `preflight.check_engine`)
    zero3_problems: Callable[["RunConfig"], Iterator[str]] = _no_problems
    description: str = ""  # one paragraph: the model card's method text
    label: Callable[["RunConfig"], str] = lambda cfg: ""  # display name ("GRPO+Skill"); "": the name upper-cased
    card_settings: tuple[str, ...] = ()  # dotted keys the model card shows for this method
    # GRPOConfig settings every method gets unless it overrides them: one rollout per prompt, no KL,
    # no importance-sampling forward (only a clipped surrogate uses those weights)
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "num_generations": 1, "beta": 0.0, "vllm_importance_sampling_correction": False})

    def grpo_settings(self, cfg: "RunConfig") -> dict[str, Any]:
        return {**self.defaults, **self.grpo_overrides(cfg)}

    def trainer_class(self) -> type:
        return _resolve(self.trainer)

    def constructor_kwargs(self, cfg: "RunConfig", context: TrainerContext) -> dict[str, Any]:
        build = _resolve(self.trainer_kwargs) if isinstance(self.trainer_kwargs, str) else self.trainer_kwargs
        return build(cfg, context)

    def display_name(self, cfg: "RunConfig") -> str:
        return self.label(cfg) or self.name.upper()

    def config_problems(self, cfg: "RunConfig") -> Iterator[str]:
        """The method's configuration problems: its sections' own bounds, then its cross-section checks."""
        for section in self.sections:
            yield from getattr(cfg, section).problems(section)
        yield from self.problems(cfg)


def _resolve(reference: str) -> Any:
    module, _, name = reference.partition(":")
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


def import_plugins(modules: list[str]) -> None:
    """Import each module of `plugins:` (its `register_method` calls add methods); one that is not a
    module name or cannot be imported is a one-line ConfigError."""
    for name in modules:
        if not _MODULE_NAME.fullmatch(name):
            raise ConfigError(f"plugins: {name!r} is not a module name (dotted identifiers, e.g. my_methods.rft; put "
                              "its folder on PYTHONPATH)")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {name!r} ({err})") from None
        except Exception as err:  # noqa: BLE001 - a plugin's own failure, named in one line
            raise ConfigError(f"plugins: importing {name!r} failed: {type(err).__name__}: {err}") from None


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_run_config(cfg: "RunConfig") -> "RunConfig":
    """`cfg`, or a ConfigError listing every problem: the plugins are imported, then the settings every
    method shares (`RunConfig.problems`), the method's own (`MethodSpec.config_problems`) and what
    depends on the method (a skill bank, online updates). Once per command: a config checked as it is
    now (the command checks it, then hands it to `train`) is not checked again, nor its plugins imported."""
    if getattr(cfg, _CHECKED_AS, None) == cfg.to_dict():
        return cfg
    import_plugins(cfg.plugins)
    problems = list(_run_problems(cfg))
    if problems:
        raise ConfigError("; ".join(problems))
    object.__setattr__(cfg, _CHECKED_AS, cfg.to_dict())  # not a setting: outside the dataclass's fields
    return cfg


# the settings as `check_run_config` passed them (a config changed since is checked again)
_CHECKED_AS = "_sgsd_checked_as"


def load_run_config(path: "str | Path | None" = None, overrides: "list[str] | tuple[str, ...]" = ()) -> "RunConfig":
    """`sgsd.config.load_config` (defaults <- YAML <- overrides, type-checked), then `check_run_config`:
    the config a training command runs."""
    return check_run_config(load_config(path, overrides))


def _run_problems(cfg: "RunConfig") -> Iterator[str]:
    if cfg.method not in method_names():
        yield f"method: expected one of {', '.join(method_names())}, got {cfg.method!r}"
        return
    spec = method_spec(cfg.method)
    yield from cfg.problems()
    if spec.needs_bank(cfg) and not cfg.skills.bank:
        yield f"skills.bank: method {cfg.method} with skills needs a skill bank file (set skills.bank=PATH)"
    yield from spec.config_problems(cfg)
    if cfg.skills.online.enabled and not spec.online_updates:
        yield f"skills.online.enabled: online skill updates are part of SGSD, not of method {cfg.method}; " \
              "set method: sgsd or disable them"


# -- built-in methods ---------------------------------------------------------------------------------


def _grpo_overrides(cfg: "RunConfig") -> dict[str, Any]:
    """G completions per prompt, KL beta, and vLLM's importance-sampling correction (the clipped surrogate uses it)."""
    return {"num_generations": cfg.grpo.num_generations, "beta": cfg.grpo.beta,
            "vllm_importance_sampling_correction": True}


def _teacher_engine_problems(cfg: "RunConfig") -> Iterator[str]:
    """`sgsd.teacher_engine=vllm` against the generation settings (within the section: `SGSDSettings`)."""
    if cfg.sgsd.teacher_engine != "vllm":
        return
    if not cfg.generation.use_vllm:
        yield ("sgsd.teacher_engine=vllm scores the teachers in the colocated vLLM engine: set "
               "generation.use_vllm=true, or use sgsd.teacher_engine=trainer")
    elif cfg.generation.vllm_mode != "colocate":
        yield ("sgsd.teacher_engine=vllm needs the engine inside the training process: set "
               "generation.vllm_mode=colocate, or use sgsd.teacher_engine=trainer")


def _sgsd_pg_problems(cfg: "RunConfig") -> Iterator[str]:
    yield from _teacher_engine_problems(cfg)
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


SGSD_CARD_SETTINGS = ("sgsd.num_teachers", "skills.retrieval", "sgsd.teacher", "sgsd.gate_tau", "sgsd.clip_delta",
                      "sgsd.polarity_test", "sgsd.confidence_threshold", "sgsd.polarity_z", "sgsd.polarity_control",
                      "sgsd.local_support_top_k",
                      "sgsd.teacher_engine", "skills.online.enabled")
GRPO_CARD_SETTINGS = ("grpo.num_generations", "grpo.epsilon", "grpo.beta", "grpo.loss_type")

register_method(MethodSpec(
    name="sgsd", settings="sgsd", sections=("sgsd",), trainer="sgsd.trainers.sgsd_trainer:SGSDTrainer",
    trainer_kwargs="sgsd.trainers.sgsd_trainer:sgsd_trainer_kwargs",
    needs_bank=lambda cfg: True, online_updates=True, skill_teachers=True, card_settings=SGSD_CARD_SETTINGS,
    problems=_teacher_engine_problems,
    zero3_problems=_sgsd_zero3_problems,
    description=("SGSD (Skill-Conditioned Gated Self-Distillation, arXiv 2605.28791; docs/spec.md section 4): the "
                 "model, given K retrieved (skill, common mistake) pairs as privileged context, scores its own rollout "
                 "as K teachers; the verifier's verdict and a bounded gate decide, token by token, which teachers it "
                 "moves toward or away from."),
))
register_method(MethodSpec(
    name="grpo", settings="grpo", sections=("grpo",), trainer="sgsd.trainers.grpo_trainer:GRPOBaselineTrainer",
    needs_bank=lambda cfg: cfg.grpo.skills_in_prompt, prompt_skills=lambda cfg: cfg.grpo.skills_in_prompt,
    grpo_overrides=_grpo_overrides, groups=True,
    label=lambda cfg: "GRPO+Skill" if cfg.grpo.skills_in_prompt else "GRPO",
    card_settings=(*GRPO_CARD_SETTINGS, "grpo.skills_in_prompt"),
    description=("GRPO (group-relative policy optimization, TRL's GRPOTrainer; docs/spec.md section 5) with the "
                 "verifier's 0/1 reward; +Skill: retrieved skills in the rollout prompt."),
))
register_method(MethodSpec(
    name="opsd", settings="opsd", sections=("opsd",), trainer="sgsd.trainers.opsd_trainer:OPSDTrainer",
    trainer_kwargs="sgsd.trainers.opsd_trainer:opsd_trainer_kwargs",
    needs_bank=lambda cfg: cfg.opsd.skills, prompt_skills=lambda cfg: cfg.opsd.skills,
    label=lambda cfg: "OPSD+Skill" if cfg.opsd.skills else "OPSD",
    zero3_problems=lambda cfg: _ema_under_zero3("opsd", cfg.opsd.teacher),
    card_settings=("opsd.teacher", "opsd.beta", "opsd.sampled_token", "opsd.skills"),
    description=("OPSD (on-policy self-distillation; docs/spec.md section 5): the same model given the reference "
                 "answer is the teacher; the loss is a generalized JSD to it on the student's own rollouts."),
))
register_method(MethodSpec(
    name="sgsd-pg", settings="sgsd_pg", sections=("sgsd", "grpo", "sgsd_pg"),
    trainer="sgsd.trainers.sgsd_pg_trainer:SGSDPGTrainer",
    trainer_kwargs="sgsd.trainers.sgsd_pg_trainer:sgsd_pg_trainer_kwargs",
    needs_bank=lambda cfg: True, grpo_overrides=_grpo_overrides, problems=_sgsd_pg_problems, groups=True,
    skill_teachers=True, label=lambda cfg: "SGSD+PG", zero3_problems=_sgsd_pg_zero3_problems,
    card_settings=("sgsd_pg.lambda_sgsd", *GRPO_CARD_SETTINGS, *SGSD_CARD_SETTINGS),
    description=("SGSD+PG (docs/methods.md): GRPO's loss plus lambda_sgsd x the SGSD loss on the same rollouts; G "
                 "completions per prompt, each scored by its problem's K skill teachers."),
))

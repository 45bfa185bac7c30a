"""From a run config to what a run works with, built one way for every command that needs it.

`sgsd train` (and through it the demo and `sgsd compare`, which train with it) and `sgsd skills probe` turn a
`RunConfig` into the same things: the training problems, the skill bank and its retriever, the student's
and the teachers' chat styles (`load_run_inputs`), then the tokenizer and the model (`load_run_model`). The two
steps are apart so that a command checks what it read (its own inputs, the problems per step, a resumed
run's inputs) before any model loads; `check_tokenizer` runs what needs the tokenizer but not the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sgsd.data import LoadReport, Problem, check_untrusted_text, load_problems
from sgsd.distributed import announce
from sgsd.methods import MethodSpec, method_spec
from sgsd import models  # by module: a test that replaces models.load_model reaches this use
from sgsd.prompts import ChatStyle

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sgsd.config import RunConfig
    from sgsd.skills.bank import SkillBank
    from sgsd.skills.retrieval import Retriever


@dataclass(frozen=True)
class RunInputs:
    """What a run reads before its model: problems (with what loading them skipped), the skill bank and its
    retriever (None for a method without one), and the chat styles of the student's and the teachers' prompts."""

    problems: list[Problem]
    report: LoadReport
    bank: SkillBank | None
    retriever: Retriever | None
    student_style: ChatStyle
    teacher_style: ChatStyle


def load_run_inputs(cfg: RunConfig, *, with_bank: bool, teacher_pairs: bool = False,
                    on_problems: Callable[[list[Problem], LoadReport], None] | None = None) -> RunInputs:
    """The config's problems (`data`), then, `with_bank`, its skill bank (refused when it cannot serve: without
    items, or, `teacher_pairs`, without one (skill, mistake) pair) and retriever (`skills`). `on_problems` runs
    between the two (a command's checks of the problems, before the bank is read)."""
    data = cfg.data
    problems, report = load_problems(data.path, split=data.split, problem_field=data.problem_field,
                                     answer_field=data.answer_field, deduplicate=data.deduplicate,
                                     max_problems=data.max_problems, bad_rows=data.bad_rows)
    if on_problems is not None:
        on_problems(problems, report)
    bank, retriever = _load_skills(cfg, teacher_pairs) if with_bank else (None, None)
    thinking = cfg.prompt.teacher_enable_thinking
    return RunInputs(problems, report, bank, retriever, student_style=ChatStyle(cfg.prompt.enable_thinking),
                     teacher_style=ChatStyle(cfg.prompt.enable_thinking if thinking is None else thinking))


def load_run_model(cfg: RunConfig, inputs: RunInputs, *,
                   check_tokenizer: Callable[[PreTrainedTokenizerBase], None] | None = None,
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tokenizer; the problems' and the bank's texts checked against its special tokens (and `check_tokenizer`,
    a command's own texts) before the model loads; then the model (`model`: dtype, attention implementation)."""
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    check_untrusted_text(tokenizer, inputs.problems, cfg.data.path, inputs.bank, cfg.skills.bank)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    model = models.load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, tokenizer=tokenizer)
    if cfg.model.attn_implementation:
        model.config._attn_implementation = cfg.model.attn_implementation
    return model, tokenizer


def _load_skills(cfg: RunConfig, teacher_pairs: bool) -> tuple[SkillBank, Retriever]:
    from sgsd.skills.bank import check_usable, load_bank
    from sgsd.skills.retrieval import make_retriever

    bank = load_bank(cfg.skills.bank)
    check_usable(bank, cfg.skills.bank, pairs=teacher_pairs)
    retriever = make_retriever(cfg.skills.retrieval, bank, embedder=cfg.skills.embedder, seed=cfg.training.seed)
    return bank, retriever


def teachers_within_bank(cfg: RunConfig, bank: SkillBank | None, spec: MethodSpec | None = None) -> RunConfig:
    """`cfg` with `sgsd.num_teachers` capped at the (skill, mistake) pairs `bank` can form per problem
    (min(skills, mistakes), plus `skills.online.capacity` dynamic items per list when online updates may add
    them), with a one-line note: every teacher tensor is padded to K, so a K far beyond the bank costs memory
    and time for teachers that do not exist. The run records the K used (`teachers_record`)."""
    if bank is None or not (spec or method_spec(cfg.method)).skill_teachers:
        return cfg
    growth = cfg.skills.online.capacity if cfg.skills.online.enabled else 0
    pairs = min(len(bank.general_skills), len(bank.common_mistakes)) + growth
    if pairs < 1 or cfg.sgsd.num_teachers <= pairs:
        return cfg
    announce(f"note: sgsd.num_teachers={cfg.sgsd.num_teachers}: the skill bank {cfg.skills.bank} forms at most {pairs} "
             f"(skill, mistake) pairs per problem; K = {pairs} is used (resolved_config.yaml and the model card say so)")
    return dataclasses.replace(cfg, sgsd=dataclasses.replace(cfg.sgsd, num_teachers=pairs))

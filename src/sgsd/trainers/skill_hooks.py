"""Skill-bank bookkeeping during SGSD training: attribution and online updates (docs/spec.md section 3 (4)).

Observers receive two events from `SGSDTrainer`, on EVERY rank, in the same order:
- `on_rollouts(trainer, problems, completions, rewards, answers)` once per generation batch;
- `on_polarity(trainer, records, polarity [B, K], support [B, K], weights [B, K])` once per loss step
  (B may be 0 on a rank whose micro-batch was skipped; the call still happens, it holds a collective).
Each has a `name`, `state_dict()` and `load_state_dict()`; their state goes into every checkpoint
(`sgsd_state.pt`) so a resumed run continues with the same bank and statistics.

Several processes: what one rank sees is gathered from all ranks (`sgsd.distributed`), so every
rank holds the same global state, as one process given the whole batch would; decisions that cost
something (an online update's extraction and merge) are made once, on the main process, and
broadcast. Files are written by the main process only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from sgsd.config import RunConfig
from sgsd.distributed import broadcast_object, gather_objects, is_main_process
from sgsd.prompts import ChatStyle, special_tokens
from sgsd.skills.attribution import AttributionTracker
from sgsd.skills.bank import SkillBank
from sgsd.skills.llm import HFClient, LLMClient, OpenAIClient
from sgsd.skills.online import OnlineSkillUpdater

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerState


class BankHolder(Protocol):
    """Where the trainer's teachers come from (`sgsd.trainers.sgsd_trainer.TeacherSource`)."""

    bank: SkillBank

    def set_bank(self, bank: SkillBank) -> None: ...


class ObservedTrainer(Protocol):
    """What the observers use of `SGSDTrainer` (a Protocol: this module is imported by the trainer's)."""

    state: TrainerState
    teacher_source: BankHolder
    processing_class: PreTrainedTokenizerBase

    @property
    def unwrapped_model(self) -> PreTrainedModel: ...

    def record_metrics(self, values: dict[str, float | torch.Tensor]) -> None: ...


class TeacherIds(Protocol):
    """The ids of one rollout's teachers (`sgsd.trainers.sgsd_trainer.RolloutRecord`)."""

    skill_ids: Sequence[str]
    mistake_ids: Sequence[str]


class SkillObserver(Protocol):
    """What `SGSDTrainer` calls; see the module docstring for when."""

    name: str

    def on_rollouts(self, trainer: ObservedTrainer, problems: list[str], completions: list[str],
                    rewards: torch.Tensor, answers: list[str] | None = None) -> None: ...

    def on_polarity(self, trainer: ObservedTrainer, records: Sequence[TeacherIds], polarity: torch.Tensor,
                    support: torch.Tensor, weights: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], trainer: ObservedTrainer | None = None) -> None: ...


class AttributionObserver:
    """Per skill and per mistake: how often its teacher was helpful / harmful / neutral, mean support.

    Counts the rollouts of all ranks (gathered in rank order), so the totals equal those of one
    process given the whole batch; the main process writes `attribution.json`.
    """

    name = "attribution"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tracker = AttributionTracker()

    def on_rollouts(self, trainer: ObservedTrainer, problems: list[str], completions: list[str],
                    rewards: torch.Tensor, answers: list[str] | None = None) -> None:
        pass

    def on_polarity(self, trainer: ObservedTrainer, records: Sequence[TeacherIds], polarity: torch.Tensor,
                    support: torch.Tensor, weights: torch.Tensor) -> None:
        local = ([r.skill_ids for r in records], [r.mistake_ids for r in records],
                 polarity.tolist(), support.tolist(), weights.tolist())
        for skill_ids, mistake_ids, rank_polarity, rank_support, rank_weights in gather_objects(local):
            if skill_ids:
                self.tracker.update(skill_ids, mistake_ids, rank_polarity, rank_support, rank_weights)
        if is_main_process():
            self.tracker.save(self.run_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any], trainer: ObservedTrainer | None = None) -> None:
        self.tracker.load_state_dict(state)
        if is_main_process():
            self.tracker.save(self.run_dir)


class OnlineUpdateObserver:
    """Extract skills from recent rollouts every N steps when the success rate is low; swap the bank in.

    The rollout window holds the rollouts of all ranks. When an update is due, the main process runs
    extraction and merge (one set of LLM calls, not one per rank) and writes the snapshots; the
    resulting bank and updater state are broadcast, so every rank's teachers come from the same bank.
    """

    name = "online_skills"

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.updater = OnlineSkillUpdater(cfg.skills.online, run_dir=run_dir)
        # every rank must agree on the run id that stamps the snapshots
        self.updater.run_id = broadcast_object(self.updater.run_id)
        self._llm: LLMClient | None = None

    def _client(self, trainer: ObservedTrainer) -> LLMClient:
        if self._llm is None:
            online = self.cfg.skills.online
            if online.llm == "policy":  # the shared policy model serves as the updater
                self._llm = HFClient(trainer.unwrapped_model, trainer.processing_class, name="policy",
                                     chat_style=ChatStyle(online.enable_thinking))
            else:
                extra = ({"chat_template_kwargs": {"enable_thinking": online.enable_thinking}}
                         if online.enable_thinking is not None else None)
                self._llm = OpenAIClient(online.llm, model=online.llm_model or self.cfg.model.name_or_path,
                                         extra_body=extra)
        return self._llm

    def on_rollouts(self, trainer: ObservedTrainer, problems: list[str], completions: list[str],
                    rewards: torch.Tensor, answers: list[str] | None = None) -> None:
        step = trainer.state.global_step + 1  # the optimizer step these rollouts train
        local = (list(problems), list(completions), [float(r) for r in rewards.tolist()], answers)
        for rank_problems, rank_completions, rank_rewards, rank_answers in gather_objects(local):
            self.updater.record(step, rank_problems, rank_completions, rank_rewards, rank_answers)
        if not self.updater.is_due(step):
            return
        bank = None
        if is_main_process():
            self.updater.forbidden_tokens = special_tokens(trainer.processing_class)
            bank = self.updater.maybe_update(step, trainer.teacher_source.bank, self._client(trainer))
        bank, state = broadcast_object((bank, self.updater.state_dict()))
        self.updater.load_state_dict(state)
        if bank is not None:  # teachers of the next generation batch come from the updated bank
            trainer.teacher_source.set_bank(bank)
        check = self.updater.history[-1] if self.updater.history else None
        if check is not None and check.step == step and check.update is not None:
            trainer.record_metrics({"skills/online_memories": float(check.update.memories),
                                    "skills/online_parse_failures": float(check.update.parse_failures),
                                    "skills/online_truncated": float(check.update.truncated),
                                    "skills/online_refused": float(check.update.refused)})

    def on_polarity(self, trainer: ObservedTrainer, records: Sequence[TeacherIds], polarity: torch.Tensor,
                    support: torch.Tensor, weights: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any], trainer: ObservedTrainer | None = None) -> None:
        self.updater.load_state_dict(state)
        if trainer is not None:  # resume with the bank as it was at the checkpoint
            trainer.teacher_source.set_bank(self.updater.current_bank(trainer.teacher_source.bank))


def make_observers(cfg: RunConfig, run_dir: Path) -> list[SkillObserver]:
    observers: list[SkillObserver] = []
    if cfg.skills.attribution:
        observers.append(AttributionObserver(run_dir))
    if cfg.skills.online.enabled:
        observers.append(OnlineUpdateObserver(cfg, run_dir))
    return observers


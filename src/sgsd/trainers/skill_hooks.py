"""Skill-bank bookkeeping during SGSD training: attribution and online updates (SPEC section 3 (4)).

Observers receive two events from `SGSDTrainer`:
- `on_rollouts(trainer, problems, completions, rewards, answers)` once per generation batch;
- `on_polarity(trainer, records, polarity [B, K], support [B, K], weights [B, K])` once per loss step.
Each has a `name`, `state_dict()` and `load_state_dict()`; their state goes into every checkpoint
(`sgsd_state.pt`) so a resumed run continues with the same bank and statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgsd.config import RunConfig


class AttributionObserver:
    """Per skill and per mistake: how often its teacher was helpful / harmful / neutral, mean support."""

    name = "attribution"

    def __init__(self, run_dir: Path) -> None:
        from sgsd.skills.attribution import AttributionTracker

        self.run_dir = run_dir
        self.tracker = AttributionTracker()

    def on_rollouts(self, trainer: Any, problems: list[str], completions: list[str], rewards: Any,
                    answers: list[str] | None = None) -> None:
        pass

    def on_polarity(self, trainer: Any, records: list[Any], polarity: Any, support: Any, weights: Any) -> None:
        self.tracker.update([r.skill_ids for r in records], [r.mistake_ids for r in records], polarity, support,
                            weights)
        self.tracker.save(self.run_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any], trainer: Any = None) -> None:
        self.tracker.load_state_dict(state)
        self.tracker.save(self.run_dir)


class OnlineUpdateObserver:
    """Extract skills from recent rollouts every N steps when the success rate is low; swap the bank in."""

    name = "online_skills"

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        from sgsd.skills.online import OnlineSkillUpdater, OnlineUpdateConfig

        online = cfg.skills.online
        self.cfg = cfg
        self.updater = OnlineSkillUpdater(
            OnlineUpdateConfig(every_n_steps=online.every_steps, success_threshold=online.success_threshold,
                               window_steps=online.window_steps, max_new=online.max_new, capacity=online.capacity,
                               extract_max_tokens=online.max_tokens),
            run_dir=run_dir,
        )
        self.trainer: Any = None
        self._llm: Any = None

    def _client(self, trainer: Any) -> Any:
        if self._llm is None:
            from sgsd.skills.llm import HFClient, OpenAIClient

            online = self.cfg.skills.online
            if online.llm == "policy":  # the shared policy model serves as the updater
                self._llm = HFClient(trainer.unwrapped_model, trainer.processing_class, name="policy")
            else:
                self._llm = OpenAIClient(online.llm, model=online.llm_model or self.cfg.model.name_or_path)
        return self._llm

    def on_rollouts(self, trainer: Any, problems: list[str], completions: list[str], rewards: Any,
                    answers: list[str] | None = None) -> None:
        self.trainer = trainer
        step = trainer.state.global_step + 1  # the optimizer step these rollouts train
        self.updater.record(step, problems, completions, [float(r) for r in rewards.tolist()], answers)
        bank = self.updater.maybe_update(step, trainer.teacher_source.bank, self._client(trainer))
        if bank is not None:  # teachers of the next generation batch come from the updated bank
            trainer.teacher_source.set_bank(bank)

    def on_polarity(self, trainer: Any, records: list[Any], polarity: Any, support: Any, weights: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any], trainer: Any = None) -> None:
        self.updater.load_state_dict(state)
        if trainer is not None:  # resume with the bank as it was at the checkpoint
            trainer.teacher_source.set_bank(self.updater.current_bank(trainer.teacher_source.bank))


def make_observers(cfg: RunConfig, run_dir: Path) -> list[Any]:
    observers: list[Any] = []
    if cfg.skills.attribution:
        observers.append(AttributionObserver(run_dir))
    if cfg.skills.online.enabled:
        observers.append(OnlineUpdateObserver(cfg, run_dir))
    return observers

"""GRPO baseline (docs/spec.md section 5): TRL's GRPOTrainer itself, with the project's data, prompts, grader.

G completions per prompt (`grpo.num_generations`), group-normalised rewards, PPO-clipped surrogate
(`grpo.epsilon`), KL coefficient `grpo.beta` (0: none, as in the paper); the loss is TRL's own.
GRPO+Skill differs only in the rollout prompt (retrieved skill block), built by `sgsd.data.training_dataset`.
Additions: `train/reward_mean` under the project's key, and two group diagnostics under `grpo/`:
- `grpo/zero_advantage_fraction`: rollouts whose advantage is 0 (their group's rewards are all equal,
  so they carry no gradient: with a binary grader, every group all-right or all-wrong);
- `grpo/advantage_abs_mean`: mean |advantage| of this rank's rollouts.
TRL's own GRPO metrics (`clip_ratio/*`, `frac_reward_zero_std`, `kl` when beta > 0) keep TRL's names.
"""

from __future__ import annotations

import torch

from sgsd.trl_adapter import HookedGRPOTrainer, RolloutBatch, RolloutRow


def record_group_diagnostics(trainer: HookedGRPOTrainer, advantages: torch.Tensor) -> None:
    """The two `grpo/` diagnostics above, of this rank's advantages [B] (also logged by sgsd-pg)."""
    advantages = advantages.float()
    trainer.record_metric("grpo/zero_advantage_fraction", advantages.eq(0).float().mean())
    trainer.record_metric("grpo/advantage_abs_mean", advantages.abs().mean())


class GRPOBaselineTrainer(HookedGRPOTrainer):
    has_method_loss = False

    def rollout_extras(self, inputs: list[RolloutRow], output: RolloutBatch, rewards: torch.Tensor) -> RolloutBatch:
        self.record_metric("train/reward_mean", rewards.float().mean())
        record_group_diagnostics(self, output["advantages"])
        return {}

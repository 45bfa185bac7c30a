"""GRPO baseline (SPEC section 5): TRL's GRPOTrainer itself, with the project's data, prompts, grader.

GRPO+Skill differs only in the rollout prompt (retrieved skill block), built in `run.build_dataset`.
The only addition is logging `train/reward_mean` under the project's key.
"""

from __future__ import annotations

from sgsd.trl_adapter import HookedGRPOTrainer


class GRPOBaselineTrainer(HookedGRPOTrainer):
    has_method_loss = False

    def rollout_extras(self, inputs, output, rewards):
        self.record_metric("train/reward_mean", rewards.float().mean())
        return {}

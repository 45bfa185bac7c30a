"""SGSD + policy gradient (`method: sgsd-pg`): GRPO's loss and the SGSD loss on the same rollouts.

    loss = pg_loss + lambda_sgsd * sgsd_loss        (per micro-batch)

- pg_loss is TRL's own GRPO loss (`HookedGRPOTrainer.grpo_loss`, settings of the `grpo` section):
  G = grpo.num_generations completions per prompt, advantages normalised within each prompt's group
  (TRL gathers the rewards of all ranks before normalising, so a group whose completions are spread
  over several ranks gets the same advantages as on one process), PPO clip grpo.epsilon, KL grpo.beta,
  TRL's grpo.loss_type normalisation.
- sgsd_loss is SGSDTrainer's loss (docs/spec.md section 4, settings of the `sgsd` section) of the same
  rollouts: every rollout, all G of each prompt, is scored by its problem's K teachers, and its own
  binary reward decides the teachers' polarity.
lambda_sgsd = 0 is GRPO (same loss, same gradient) with SGSD's metrics logged.

Cost per step over GRPO: the K teacher forwards of every rollout at generation time, and a second
student forward and backward per micro-batch (TRL's loss and the SGSD loss each run their own forward,
so neither's code is copied); see docs/methods.md for measured times.

Logged: `sgsd_pg/pg_loss` and `sgsd_pg/sgsd_loss` (the two parts, before lambda and before the
accumulation scaling), TRL's GRPO metrics (`clip_ratio/*`, `train/entropy`, `kl` when beta > 0), the
`grpo/` group diagnostics of `GRPOBaselineTrainer`, and every `sgsd/` metric of SGSDTrainer.
"""

from __future__ import annotations

from typing import Any

import torch

from sgsd.config import RunConfig
from sgsd.methods import TrainerContext
from sgsd.trainers.grpo_trainer import record_group_diagnostics
from sgsd.trainers.sgsd_trainer import SGSDTrainer, sgsd_trainer_kwargs
from sgsd.trl_adapter import RolloutBatch, RolloutRow


class SGSDPGTrainer(SGSDTrainer):
    def __init__(self, *, lambda_sgsd: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lambda_sgsd = lambda_sgsd

    def rollout_extras(self, inputs: list[RolloutRow], output: RolloutBatch, rewards: torch.Tensor) -> RolloutBatch:
        record_group_diagnostics(self, output["advantages"])
        return super().rollout_extras(inputs, output, rewards)

    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if return_outputs:
            raise ValueError("sgsd trainers do not return outputs from compute_loss")
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1
        # both parts on every rank in the same order: each one gathers metrics over the ranks
        pg_loss = self.grpo_loss(model, inputs)  # TRL's, already divided by `accumulation`
        sgsd_loss = self.sgsd_part(model, inputs)  # None: non-finite log-probs (logged as a skip)
        finite = sgsd_loss is not None and bool(torch.isfinite(pg_loss))
        nan = float("nan")
        self.record_metrics({"sgsd_pg/pg_loss": pg_loss.detach() * accumulation if finite else nan,
                             "sgsd_pg/sgsd_loss": sgsd_loss.detach() if finite else nan})
        if not finite:
            return self.skip_nonfinite_step(model)
        return pg_loss + (self.lambda_sgsd / accumulation) * sgsd_loss


def sgsd_pg_trainer_kwargs(cfg: "RunConfig", context: "TrainerContext") -> dict[str, Any]:
    """SGSD's constructor arguments plus lambda_sgsd (the registry names this function for `sgsd-pg`)."""
    return {**sgsd_trainer_kwargs(cfg, context), "lambda_sgsd": cfg.sgsd_pg.lambda_sgsd}

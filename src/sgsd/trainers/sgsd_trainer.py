"""SGSD trainer (docs/spec.md sections 2-4): one student forward/backward per rollout, K teacher forwards
without gradient, the gated polarity loss of `sgsd.objectives.sgsd_loss`.

Per generation batch (TRL generates and grades; the seams are in `sgsd.trl_adapter`):
1. retrieve the K rank-aligned (skill, mistake) teachers of each problem (cached per bank version);
2. render each teacher prompt with the SAME chat style as the student (unless configured otherwise);
3. score the student's completion under every teacher (`sgsd.teacher_scoring.score_under_teachers`, the
   path the probe shares) with the selected teacher weights (live / base / EMA), or with
   `teacher_engine: vllm` in the colocated vLLM engine (live weights, synced before generation), storing [B, K, T]
   log-probs with the batch, and with `polarity_control` the control teacher's [B, T] (one more teacher
   row per rollout; `sgsd.skills.controls`);
4. in the loss phase, one student forward with gradient gives p_t [B, T]; `sgsd_loss` does the rest.
Rollouts whose K teachers are all neutral can skip the student forward and backward
(`skip_neutral_rows`): their polarity is decided from a gradient-free pass of the student (its own
weights and prompt, whatever the teacher weights are) at generation time, at the cost of that one
extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sgsd.config import RunConfig
from sgsd.errors import ConfigError
from sgsd.loss_settings import SGSDSettings
from sgsd.lm_head import head_vocab_size
from sgsd.loss_phase import active_rollouts, sgsd_loss_phase
from sgsd.methods import TrainerContext
from sgsd.objectives import SGSD_METRIC_KEYS, SGSDLossOutput, masked_mean
from sgsd.prompts import ChatStyle
from sgsd.scoring import countable_token_table, counted_mask, lm_parts, score_teachers_local
from sgsd.skills.teachers import TeacherSource
from sgsd.teacher_scoring import prompt_ids as teacher_prompt_ids
from sgsd.teacher_scoring import score_under_teachers, teacher_weight_matrix
from sgsd.trainers.skill_hooks import SkillObserver, make_observers
from sgsd.trainers.teacher_weights import SelfTeacher
from sgsd.trl_adapter import HookedGRPOTrainer, RolloutBatch, RolloutRow


@dataclass
class RolloutRecord:
    """What the loss phase and the skill-bank bookkeeping need to know about one rollout."""

    problem: str
    skill_ids: list[str]
    mistake_ids: list[str]


class SGSDTrainer(SelfTeacher, HookedGRPOTrainer):
    has_method_loss = True

    def __init__(self, *, teacher_source: TeacherSource, settings: SGSDSettings, student_style: ChatStyle,
                 teacher_style: ChatStyle, observers: Sequence["SkillObserver"] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher_source = teacher_source
        self.settings = settings
        self.student_style, self.teacher_style = student_style, teacher_style
        self.observers = list(observers)  # attribution, online skill updates: see `observe`
        self.count_table = countable_token_table(self.processing_class)
        vocab = head_vocab_size(lm_parts(self.model)[1])
        self.chunk_tokens = settings.chunk_tokens(vocab)
        self.setup_teacher(settings.teacher, settings.ema_decay)
        if settings.teacher_engine == "vllm" and not self.colocated_engine:
            raise ConfigError("sgsd.teacher_engine=vllm scores the teachers in the colocated vLLM engine: build the "
                              "trainer with use_vllm=true and vllm_mode=colocate, or use sgsd.teacher_engine=trainer")
        self.records: dict[int, RolloutRecord] = {}
        self._next_uid = 0

    # -- generation phase -----------------------------------------------------------------------
    def rollout_extras(self, inputs: list[RolloutRow], output: RolloutBatch, rewards: torch.Tensor) -> RolloutBatch:
        problems = [x["problem"] for x in inputs]
        teachers = self.teacher_source.teachers_for(problems)
        k = self.teacher_source.num_teachers
        device = output["completion_ids"].device
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        scoring_model = self.teacher_scoring_model()
        local: RolloutBatch = {}
        if self.settings.local_support_top_k > 0:
            weights = teacher_weight_matrix(teachers, k, device)
            prompt_ids = [teacher_prompt_ids(self.processing_class, p, [t.guidance for t in row], self.teacher_style,
                                             k) for p, row in zip(problems, teachers)]
            logps, local["teacher_top_logps"], local["teacher_top_ids"] = score_teachers_local(
                scoring_model, prompt_ids, completion_ids, completion_mask, top_k=self.settings.local_support_top_k,
                pad_id=self.processing_class.pad_token_id, batch_rows=self.settings.teacher_batch_size,
                chunk_tokens=self.chunk_tokens, teacher_context=self.teacher_context,
                prefix_reuse=self.settings.prefix_reuse)
            mask = counted_mask(completion_ids, completion_mask, self.count_table)
        else:
            control = self.settings.polarity_control
            controls = ({} if control == "none"
                        else {control: self.teacher_source.controls_for(problems, control, self.processing_class)})
            scores = score_under_teachers(
                scoring_model, self.processing_class, problems, teachers, completion_ids, completion_mask,
                settings=self.settings, style=self.teacher_style, chunk_tokens=self.chunk_tokens, controls=controls,
                teacher_context=self.teacher_context, count_table=self.count_table, engine=self.teacher_engine())
            logps, weights, mask = scores.teacher_logps, scores.teacher_weights, scores.counted
            if scores.teacher_entropy is not None:
                local["teacher_entropy"] = scores.teacher_entropy
            if control != "none":
                local["control_logps"] = scores.control_logps[control]
        uids = torch.arange(self._next_uid, self._next_uid + len(problems), device=device)
        for uid, problem, row_teachers in zip(uids.tolist(), problems, teachers):
            self.records[uid] = RolloutRecord(problem, [t.skill.skill_id for t in row_teachers[:k]],
                                              [t.mistake.mistake_id for t in row_teachers[:k]])
        self._next_uid += len(problems)
        extras: RolloutBatch = {"rewards": rewards, "teacher_logps": logps[:, :k], "teacher_weights": weights,
                  "sgsd_mask": mask, "rollout_uid": uids, **local}
        if self.settings.skip_neutral_rows:
            # decided with the STUDENT's weights on the student's own prompt (not inside the teacher
            # context, not on a frozen copy): one gradient-free pass
            extras["sgsd_active"] = active_rollouts(
                self.model, prompt_ids=output["prompt_ids"], prompt_mask=output["prompt_mask"],
                completion_ids=completion_ids, completion_mask=completion_mask, counted_mask=mask, rewards=rewards,
                teacher_weights=weights, teacher_logps=logps[:, :k], chunk_tokens=self.chunk_tokens,
                settings=self.settings, control_logps=local.get("control_logps"))
        completions = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        for observer in self.observers:
            observer.on_rollouts(self, problems, completions, rewards, [x["answer"] for x in inputs])
        return extras

    def teacher_engine(self) -> Any:
        """The vLLM engine that scores the teachers (`teacher_engine: vllm`; TRL synced the policy's weights
        into it before this generation), or None: the trainer's model scores them."""
        return self.vllm_generation.llm if self.settings.teacher_engine == "vllm" else None

    # -- loss phase ---------------------------------------------------------------------------
    def method_loss(self, model: torch.nn.Module, inputs: RolloutBatch) -> torch.Tensor:
        loss = self.sgsd_part(model, inputs)
        return self.skip_nonfinite_step(model) if loss is None else loss

    def sgsd_part(self, model: torch.nn.Module, inputs: RolloutBatch) -> torch.Tensor | None:
        """The SGSD loss of one micro-batch (not scaled for accumulation), its metrics logged; None when the
        log-probs are not finite (the skip is logged; the caller returns `skip_nonfinite_step`)."""
        phase = sgsd_loss_phase(
            model, prompt_ids=inputs["prompt_ids"], prompt_mask=inputs["prompt_mask"],
            completion_ids=inputs["completion_ids"], completion_mask=inputs["completion_mask"],
            counted_mask=inputs["sgsd_mask"], rewards=inputs["rewards"], teacher_weights=inputs["teacher_weights"],
            teacher_logps=inputs["teacher_logps"], active=inputs.get("sgsd_active"),
            teacher_top_logps=inputs.get("teacher_top_logps"), teacher_top_ids=inputs.get("teacher_top_ids"),
            chunk_tokens=self.chunk_tokens, settings=self.settings, control_logps=inputs.get("control_logps"),
        )
        if phase.output is None:
            # same keys as a normal step (all ranks gather the same list), NaN where undefined
            self.record_metrics({**dict.fromkeys(self._log_keys(), float("nan")), "train/nonfinite_skipped": 1.0})
            for uid in inputs["rollout_uid"].tolist():
                self.records.pop(uid, None)
            empty = inputs["teacher_weights"][:0].detach().cpu()
            self._observe_polarity([], empty.long(), empty, empty)  # other ranks' observers gather now
            return None
        entropies: dict[str, torch.Tensor] = {}
        if phase.student_entropy is not None:
            run_rows, length = phase.run_rows, phase.length
            counted = inputs["sgsd_mask"][run_rows, :length]
            entropies = {"sgsd/student_entropy_mean": masked_mean(phase.student_entropy, counted)}
            if "teacher_entropy" in inputs:  # not from the vLLM engine (sampled tokens' log-probs only)
                present = inputs["teacher_weights"][run_rows] > 0
                teacher_entropy = inputs["teacher_entropy"][run_rows, :, :length]
                entropies["sgsd/teacher_entropy_mean"] = masked_mean(teacher_entropy,
                                                                     counted[:, None, :] & present[:, :, None])
        self._log_step(inputs, phase.output, phase.polarity, phase.support, phase.rows.numel(), entropies)
        return phase.loss

    def _log_keys(self) -> list[str]:
        keys = [f"sgsd/{k}" for k in SGSD_METRIC_KEYS]
        keys += ["sgsd/active_rollout_fraction", "train/reward_mean"]
        if self.settings.local_support_top_k == 0:
            keys += ["sgsd/student_entropy_mean"]
            if self.settings.teacher_engine == "trainer":
                keys += ["sgsd/teacher_entropy_mean"]
        return keys

    def _log_step(self, inputs: RolloutBatch, out: SGSDLossOutput, polarity: torch.Tensor, support: torch.Tensor,
                  active_rows: int, entropies: dict[str, torch.Tensor]) -> None:
        present = inputs["teacher_weights"] > 0
        count = present.sum().clamp(min=1)
        values: dict[str, float | torch.Tensor] = {f"sgsd/{key}": value for key, value in out.metrics.items()}
        # fractions over ALL rollouts of the step (skipped rollouts are neutral by construction)
        values["sgsd/helpful_fraction"] = ((polarity == 1) & present).sum() / count
        values["sgsd/harmful_fraction"] = ((polarity == -1) & present).sum() / count
        values["sgsd/neutral_fraction"] = ((polarity == 0) & present).sum() / count
        values["sgsd/active_rollout_fraction"] = active_rows / max(polarity.size(0), 1)
        values["train/reward_mean"] = inputs["rewards"].float().mean()
        values.update(entropies)
        self.record_metrics({**{key: values[key] for key in self._log_keys()}, "train/nonfinite_skipped": 0.0})
        uids = inputs["rollout_uid"].tolist()
        records = [self.records.pop(uid) for uid in uids]
        self._observe_polarity(records, polarity.detach().cpu(), support.detach().cpu(),
                               inputs["teacher_weights"].detach().cpu())

    def _observe_polarity(self, records: list[RolloutRecord], polarity: torch.Tensor, support: torch.Tensor,
                          weights: torch.Tensor) -> None:
        """Every rank, every loss step, even with no rows: the observers gather over ranks."""
        for observer in self.observers:
            observer.on_polarity(self, records, polarity, support, weights)


def sgsd_trainer_kwargs(cfg: "RunConfig", context: "TrainerContext") -> dict[str, Any]:
    """SGSDTrainer's own constructor arguments (the registry names this function for `sgsd`)."""
    return {"teacher_source": TeacherSource(context.bank, context.retriever, cfg.sgsd.num_teachers),
            "settings": cfg.sgsd, "student_style": context.student_style, "teacher_style": context.teacher_style,
            "observers": make_observers(cfg, context.output_dir)}

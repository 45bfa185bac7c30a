"""Build a trainer from a `RunConfig` and train: the one code path for the laptop and the GPU cluster.

The orchestrator knows no method by name: the method's registry entry (`sgsd.methods`) says whether
it needs a skill bank, whether retrieved skills go into the rollout prompt, which GRPOConfig settings
it fixes and how its trainer is built. Everything the user gave is checked before the output
directory is touched (config, data, skill bank, model, prompt lengths, enough problems for one step),
so bad input leaves nothing half-written; what a rerun into an existing directory does (nothing, for a
finished run) is decided first (`sgsd.trainers.preflight`). The checkpoint and resume lifecycle is
`sgsd.trainers.checkpoints`.

The run directory holds the files of `sgsd.run_dir.RUN_FILES`: `README.md` (the model card,
`sgsd.trainers.model_card`), `resolved_config.yaml` (with the git revision and package versions),
`metrics.jsonl`, `checkpoint-<step>/` directories, skill-bank snapshots and attribution when enabled,
and `final/` (the model or LoRA adapter and tokenizer in Hugging Face format), written to a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sgsd.config import RunConfig, dump_config
from sgsd.distributed import is_main_process, rank_local, same_on_every_rank
from sgsd.errors import ConfigError
from sgsd.methods import MethodSpec, TrainerContext, method_spec
from sgsd.prompts import ChatStyle
from sgsd.provenance import provenance
from sgsd.trainers.checkpoints import (
    COMPLETE_MARKER,
    check_output_dir,
    checkpoint_step,
    check_resume_config,
    complete_checkpoints,
    completion_marker,
    restore_extra_state,
    storage_errors,
    write_complete_marker,
)
from sgsd.trainers.preflight import (Rerun, announce, check_deepspeed_config, check_problems_per_step, check_trained, plan_rerun,
                                     write_final_from_checkpoint)

__all__ = ["COMPLETE_MARKER", "PreparedRun", "TrainResult", "prepare_run", "resolve_device", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    resumed_from: str | None = None
    ignored_checkpoints: list[str] = field(default_factory=list)
    already_complete: bool = False  # final/ was at max_steps already: nothing was trained or written


def resolve_device(cfg: RunConfig) -> tuple[bool, bool]:
    """(use_cpu, bf16) from `training.device` and `training.precision`, after refusing what the training
    engine (DeepSpeed's ZeRO stage, FSDP) cannot run with this config (`preflight.check_engine`).

    bf16 means bf16 compute with fp32 master weights: autocast under DDP, DeepSpeed's bf16 mode (the
    module in bf16, fp32 weights in the optimizer) under DeepSpeed; on CUDA and on CPU alike.
    `auto` is bf16 on CUDA and fp32 on CPU.
    """
    import torch

    from sgsd.trainers.preflight import check_engine

    device = cfg.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda requested but no CUDA device is available")
    check_engine(cfg)
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    bf16 = cfg.training.precision == "bf16" or (not use_cpu and cfg.training.precision == "auto")
    return use_cpu, bf16


def train(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = True,
          reward_funcs: Sequence[Callable[..., list[float]]] | None = None, max_steps: int | None = None,
          progress: bool = True, rollout_func: Callable[..., dict[str, Any]] | None = None) -> TrainResult:
    """Train `cfg` into `output_dir` (resuming its latest complete checkpoint unless `resume=False`).

    Every process of a distributed launch (torchrun, accelerate) runs this same function. The checks
    before training read only, on every rank, and raise the same error on every rank (marked
    `same_on_every_rank`, so the CLI prints it once); the run directory is written by the main
    process after all ranks have passed them.
    rollout_func: TRL's (experimental) custom rollout hook, passed through: `(prompts, trainer) ->
    {"prompt_ids", "completion_ids", "logprobs"}`; the tests use it to train on fixed completions.
    """
    with same_on_every_rank():
        run = prepare_run(cfg, output_dir, resume=resume, reward_funcs=reward_funcs, max_steps=max_steps,
                          progress=progress, rollout_func=rollout_func)
    return run.train()


@dataclass
class PreparedRun:
    """A trainer built and restored to where the run directory left off, ready to `train()`."""

    trainer: Any
    output_dir: Path
    tokenizer: Any
    resume_from: Path | None
    broken: list[Path]
    rerun: Rerun | None = None  # a run already at max_steps (`complete`, `finish`): no trainer

    def train(self) -> TrainResult:
        if self.rerun is not None and self.rerun.action in ("complete", "finish"):
            return _finish_without_training(self.output_dir, self.rerun)
        trainer, out, resume_from = self.trainer, self.output_dir, self.resume_from
        final = out / "final"
        with rank_local(), storage_errors(out):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            check_trained(trainer.state.global_step, checkpoint_step(resume_from) if resume_from else 0)
            staging = out / "final.tmp"
            if trainer.accelerator.is_main_process and staging.exists():
                shutil.rmtree(staging)
            trainer.accelerator.wait_for_everyone()
            trainer.save_model(str(staging))  # every rank calls it (ZeRO-3 gathers); the main process writes
            if trainer.accelerator.is_main_process:
                self.tokenizer.save_pretrained(str(staging))
                _publish_final(out, staging, trainer.state.global_step)
            trainer.accelerator.wait_for_everyone()
        return TrainResult(out, final, trainer.state.global_step, str(resume_from) if resume_from else None,
                           [str(p) for p in self.broken])


def prepare_run(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = True,
                reward_funcs: Sequence[Callable[..., list[float]]] | None = None, max_steps: int | None = None,
                progress: bool = True, rollout_func: Callable[..., dict[str, Any]] | None = None) -> PreparedRun:
    """Everything `train` does before the first step: checks, run directory, trainer, restored state."""
    from transformers import set_seed

    from sgsd.data import load_problems, training_dataset
    from sgsd.models import load_model, load_tokenizer
    from sgsd.trainers.callbacks import EMAStep, FaultInjection, MetricsWriter, StepTimer

    out = Path(output_dir or cfg.training.output_dir or "").expanduser()
    if not str(out) or str(out) == ".":
        raise ConfigError("no output directory: pass --output-dir or set training.output_dir")
    if max_steps is not None:
        cfg.training.max_steps = max_steps
    cfg.validate()
    spec = method_spec(cfg.method)
    resume_from = check_output_dir(out, resume)
    rerun = plan_rerun(out, cfg.training.max_steps, resume_from) if resume else Rerun("start")
    if rerun.action != "start":
        check_resume_config(out, cfg)
    if rerun.action in ("complete", "finish"):  # nothing to train: PreparedRun.train only reports or saves
        return PreparedRun(None, out, None, rerun.checkpoint, [], rerun)
    use_cpu, bf16 = resolve_device(cfg)
    set_seed(cfg.training.seed)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # -- everything the user gave, checked before writing anything ------------------------------
    check_deepspeed_config(cfg.training.deepspeed)
    problems, report = load_problems(
        cfg.data.path, split=cfg.data.split, problem_field=cfg.data.problem_field, answer_field=cfg.data.answer_field,
        deduplicate=cfg.data.deduplicate, max_problems=cfg.data.max_problems, bad_rows=cfg.data.bad_rows,
    )
    for note in (report.skipped_note(), report.gold_note()):
        if note:
            announce(note)
    check_problems_per_step(cfg, len(problems))
    if rerun.finished_step is not None:
        announce(f"continuing {out} from {resume_from.name} (complete at step {rerun.finished_step}) to step "
                 f"{cfg.training.max_steps}; the learning-rate schedule follows max_steps={cfg.training.max_steps}")
    bank, retriever = _load_skills(cfg) if spec.needs_bank(cfg) else (None, None)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, tokenizer=tokenizer)
    if cfg.model.attn_implementation:
        model.config._attn_implementation = cfg.model.attn_implementation
    blocks = _skill_blocks(cfg, retriever, [p.problem for p in problems]) if spec.prompt_skills(cfg) else None
    dataset = training_dataset(problems, tokenizer, enable_thinking=cfg.prompt.enable_thinking,
                               max_prompt_tokens=cfg.prompt.max_prompt_tokens, skill_blocks=blocks,
                               source=cfg.data.path)
    args = _grpo_config(cfg, spec, out, use_cpu=use_cpu, bf16=bf16, progress=progress)

    # -- the run directory: written by the main process once every rank has passed the checks above
    # (the process group exists now: the GRPOConfig set it up)
    args.distributed_state.wait_for_everyone()
    if is_main_process():
        from sgsd.storage import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        resolved = dump_config(cfg) + "\n# provenance: " + json.dumps(
            {**provenance(), "data": report.__dict__}, indent=None) + "\n"
        atomic_write_text(out / "resolved_config.yaml", resolved)

    if reward_funcs is None:
        from sgsd.verify import AccuracyReward

        reward_funcs = [AccuracyReward(extract=cfg.reward.extract)]
    metrics = MetricsWriter(out / "metrics.jsonl")
    timer, ema_step = StepTimer(), EMAStep()
    callbacks: list[Any] = [metrics, timer, ema_step]
    fault = FaultInjection.from_env()
    if fault is not None:
        callbacks.append(fault)
    context = TrainerContext(bank=bank, retriever=retriever, student_style=ChatStyle(cfg.prompt.enable_thinking),
                             teacher_style=_teacher_style(cfg), output_dir=out)
    trainer = spec.trainer_class()(
        model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=_peft_config(cfg), callbacks=callbacks,
        **({"rollout_func": rollout_func} if rollout_func is not None else {}), **spec.trainer_kwargs(cfg, context))
    timer.trainer = ema_step.trainer = trainer
    trainer.add_callback(completion_marker(trainer, cfg.training.save_total_limit))
    from sgsd.trainers.console import use_step_lines
    from sgsd.trainers.model_card import ModelCardWriter

    use_step_lines(trainer, progress)  # one line per logging step; every key is in metrics.jsonl
    trainer.add_callback(ModelCardWriter(out))  # replaces TRL's generic README.md after each checkpoint

    _, broken = complete_checkpoints(out)
    if resume_from is not None:
        metrics.truncate_after(checkpoint_step(resume_from))
        restore_extra_state(trainer, resume_from)
    elif metrics.records:
        metrics.truncate_after(0)
    return PreparedRun(trainer, out, tokenizer, resume_from, broken)


def _finish_without_training(out: Path, rerun: Rerun) -> TrainResult:
    """A run already at max_steps: nothing to do (`complete`), or only final/ to write from its newest
    checkpoint (`finish`: interrupted after that checkpoint was saved)."""
    if rerun.action == "complete":
        return TrainResult(out, out / "final", int(rerun.finished_step or 0), already_complete=True)
    assert rerun.checkpoint is not None
    step = checkpoint_step(rerun.checkpoint)
    if not is_main_process():  # no collectives here: the main process alone writes final/
        return TrainResult(out, out / "final", step, str(rerun.checkpoint))
    with storage_errors(out):
        staging = out / "final.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        write_final_from_checkpoint(rerun.checkpoint, staging)
        _publish_final(out, staging, step)
    return TrainResult(out, out / "final", step, str(rerun.checkpoint))


def _publish_final(out: Path, staging: Path, step: int) -> None:
    """Complete final/'s staging folder (the step marker last, then the model card) and move it into place
    (main process)."""
    from sgsd.trainers.model_card import write_model_card

    write_complete_marker(staging, step)
    write_model_card(out, step, staging)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _load_skills(cfg: RunConfig) -> tuple[Any, Any]:
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever

    bank = load_bank(cfg.skills.bank)
    retriever = make_retriever(cfg.skills.retrieval, bank, embedder=cfg.skills.embedder, seed=cfg.training.seed)
    return bank, retriever


def _skill_blocks(cfg: RunConfig, retriever: Any, problems: Sequence[str]) -> list[str]:
    """Top skills and top mistakes rendered as one guidance block per problem ("+Skill" variants)."""
    from sgsd.prompts import render_guidance

    return [render_guidance([s.item for s in r.skills], [m.item for m in r.mistakes])
            for r in retriever.retrieve_many(list(problems), cfg.skills.prompt_top_k)]


def _teacher_style(cfg: RunConfig) -> ChatStyle:
    teacher_thinking = cfg.prompt.teacher_enable_thinking
    return ChatStyle(cfg.prompt.enable_thinking if teacher_thinking is None else teacher_thinking)


def _peft_config(cfg: RunConfig) -> Any:
    if not cfg.model.lora.enabled:
        return None
    from peft import LoraConfig

    lora = cfg.model.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="CAUSAL_LM")


def _grpo_config(cfg: RunConfig, spec: MethodSpec, out: Path, *, use_cpu: bool, bf16: bool, progress: bool) -> Any:
    """TRL's GRPOConfig from the run config; the method fixes generations per prompt, beta and
    whether vLLM's importance-sampling correction runs (an extra forward that only GRPO uses)."""
    from sgsd.trl_adapter import make_grpo_config

    fixed = spec.grpo_settings(cfg)
    training, generation = cfg.training, cfg.generation
    return make_grpo_config(
        num_generations=fixed["num_generations"],
        beta=fixed["beta"],
        vllm_importance_sampling_correction=fixed["vllm_importance_sampling_correction"],
        output_dir=str(out),
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps,
        max_grad_norm=training.max_grad_norm,
        weight_decay=training.weight_decay,
        per_device_train_batch_size=training.prompts_per_device * fixed["num_generations"],
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        seed=training.seed,
        full_determinism=training.deterministic,
        data_seed=training.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed,
        save_steps=training.save_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is complete (checkpoints.completion_marker)
        logging_steps=training.logging_steps,
        report_to=training.report_to,
        use_cpu=use_cpu,
        bf16=bf16,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        max_completion_length=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        use_vllm=generation.use_vllm,
        vllm_mode=generation.vllm_mode,
        vllm_gpu_memory_utilization=generation.vllm_gpu_memory_utilization,
        **({"vllm_server_base_url": generation.vllm_server_base_url} if generation.vllm_server_base_url else {}),
        chat_template_kwargs=({"enable_thinking": cfg.prompt.enable_thinking}
                              if cfg.prompt.enable_thinking is not None else None),
        epsilon=cfg.grpo.epsilon,
        loss_type=cfg.grpo.loss_type,
        log_completions=False,
        disable_tqdm=not progress,
        deepspeed=training.deepspeed,
        shuffle_dataset=True,
        # every parameter takes part in every loss (empty micro-batches and skipped steps included: see
        # SGSDTrainer.method_loss and skip_nonfinite_step), so DDP needs no extra graph traversal
        ddp_find_unused_parameters=False,
    )

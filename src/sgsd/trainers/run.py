"""Build a trainer from a `RunConfig` and train: the one code path for the laptop and the GPU cluster.

`train` reads top to bottom: plan what rerunning into the run directory means (`sgsd.run_dir`: start,
resume from the newest intact checkpoint, only write `final/`, or nothing), check everything the user
gave (config, data, skill bank and their content against a resumed run's, model, prompt lengths,
enough problems for one step) before the directory is written, build the trainer, train, and publish
`final/`. The main process holds the directory's lock the whole time, so no second command writes
into it. The orchestrator knows no method by name: the method's registry entry (`sgsd.methods`) says
whether it needs a skill bank, whether retrieved skills go into the rollout prompt, which GRPOConfig
settings it fixes and how its trainer is built. The trainer's own state in a checkpoint is
`sgsd.trainers.checkpoints`; the files of a run directory are listed in `sgsd.run_dir.RUN_FILES`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.utils import logging as hf_logging
from trl import GRPOConfig, GRPOTrainer

from sgsd import __version__
from sgsd.config import RunConfig, config_settings, dump_config
from sgsd.data import LoadReport, Problem, training_dataset
from sgsd.distributed import announce, is_main_process, launched_world_size, rank_local, same_on_every_rank
from sgsd.errors import ConfigError, UserError
from sgsd.models import engine_directory
from sgsd.methods import MethodSpec, TrainerContext, check_run_config, method_spec
from sgsd.prompts import render_guidance
from sgsd.peers import active_watch, code_digest, reporting_termination, watching_peers
from sgsd.provenance import package_versions, provenance
from sgsd.run_setup import load_run_inputs, load_run_model, teachers_within_bank
from sgsd.run_dir import RESUME_MAY_CHANGE, Rerun, RunDir
from sgsd.skills.bank import SkillBank
from sgsd.skills.retrieval import Retriever
from sgsd.storage import JSONObject
from sgsd.trainers.callbacks import EMAStep, FaultInjection, MetricsWriter, StepTimer
from sgsd.trainers.checkpoints import CompletionMarker, check_engine_state, restore_extra_state, write_final_from_checkpoint
from sgsd.trainers.console import use_step_lines
from sgsd.trainers.model_card import ModelCardWriter, write_model_card
from sgsd.trainers.preflight import check_deepspeed_config, check_engine, check_problems_per_step, teachers_record
from sgsd.trl_adapter import make_grpo_config
from sgsd.verify import AccuracyReward
from sgsd.vllm_adapter import generation_problems


__all__ = ["PreparedRun", "TrainResult", "prepare_run", "resolve_device", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    resumed_from: str | None = None
    ignored_checkpoints: list[str] = field(default_factory=list)
    already_complete: bool = False  # final/ was at max_steps already: nothing was trained or written


def resolve_device(cfg: RunConfig, spec: MethodSpec | None = None) -> tuple[bool, bool]:
    """(use_cpu, bf16) from `training.device` and `training.precision`, after refusing what the training
    engine (DeepSpeed's ZeRO stage, FSDP) cannot run with this config (`preflight.check_engine`).

    bf16 means bf16 compute with fp32 master weights: autocast under DDP, DeepSpeed's bf16 mode (the
    module in bf16, fp32 weights in the optimizer) under DeepSpeed; on CUDA and on CPU alike.
    `auto` is bf16 on CUDA and fp32 on CPU.
    """
    device = cfg.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda requested but no CUDA device is available")
    check_engine(cfg, spec)
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cfg.generation.use_vllm:  # this machine's vLLM, for the device the run uses (not a config check:
        # reading a GPU recipe on a machine without vLLM, as `sgsd compare --dry-run` does, is fine)
        for problem in generation_problems(vllm_mode=cfg.generation.vllm_mode, model_spec=cfg.model.name_or_path,
                                           on_cpu=use_cpu):
            raise ConfigError(problem)
    bf16 = cfg.training.precision == "bf16" or (not use_cpu and cfg.training.precision == "auto")
    return use_cpu, bf16


def train(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = True,
          reward_funcs: Sequence[Callable[..., list[float]]] | None = None, max_steps: int | None = None,
          progress: bool = True, rollout_func: Callable[..., dict[str, Any]] | None = None) -> TrainResult:
    """Train `cfg` into `output_dir` (resuming its newest intact checkpoint unless `resume=False`).

    Reads top to bottom as plan, check, build, train, publish. Every process of a distributed launch
    (torchrun, accelerate) runs this same function; the main process holds the directory's lock for
    the whole run. The checks before training read only, on every rank, and raise the same error on
    every rank (marked `same_on_every_rank`, so the CLI prints it once); the run directory is written
    by the main process after all ranks have passed them. `cfg` is not changed (`max_steps` applies to a
    copy). rollout_func: TRL's (experimental) custom rollout hook, passed through: `(prompts, trainer) ->
    {"prompt_ids", "completion_ids", "logprobs"}`; the tests use it to train on fixed completions.
    """
    with same_on_every_rank():
        check_run_config(cfg)  # once per command: a config the command checked already is not checked again
    cfg = with_max_steps(cfg, max_steps)
    out = output_directory(cfg, output_dir)
    with ExitStack() as claim:
        claim.enter_context(reporting_termination())  # a SIGTERM says so in one line, even inside a collective
        watch = claim.enter_context(watching_peers(cfg.distributed.peer_timeout_s))
        if watch is not None:  # every node runs the same code and config before any reads the output directory
            with same_on_every_rank():
                watch.agree(launch_digests(cfg, out), stage="launch")
        with same_on_every_rank():  # the output-directory rule; the main process locks and records the directory
            claim.enter_context(RunDir(out).claim("train", config_settings(cfg), may_differ=RESUME_MAY_CHANGE,
                                                  holder=is_main_process()))
        with same_on_every_rank():
            rerun = plan_run(cfg, out, resume)
        if rerun.action in ("complete", "finish"):
            return _finish_without_training(out, rerun)
        with same_on_every_rank():
            run = _build(cfg, out, rerun, reward_funcs=reward_funcs, progress=progress, rollout_func=rollout_func)
        return run.train()


def with_max_steps(cfg: RunConfig, max_steps: int | None) -> RunConfig:
    """`cfg` with `training.max_steps` replaced (a copy; `cfg` itself is unchanged)."""
    if max_steps is None:
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=max_steps))


def output_directory(cfg: RunConfig, output_dir: str | Path | None) -> Path:
    out = Path(output_dir or cfg.training.output_dir or "").expanduser()
    if not str(out) or str(out) == ".":
        raise ConfigError("no output directory: pass --output-dir or set training.output_dir")
    return out


def plan_run(cfg: RunConfig, out: Path, resume: bool) -> Rerun:
    """What this run does in `out` (start, resume, finish, complete), checked against the run it continues."""
    run_dir = RunDir(out)
    run_dir.check_no_resume(resume)
    rerun = run_dir.plan(cfg.training.max_steps, launched_world_size()) if resume else Rerun("start")
    if rerun.action != "start":
        run_dir.check_resume_config(dump_config(cfg))
    for skipped in rerun.skipped:
        announce(f"{skipped}; not resumed from")
    return rerun


@dataclass
class PreparedRun:
    """A trainer built and restored to where the run directory left off, ready to `train()`."""

    trainer: GRPOTrainer
    output_dir: Path
    tokenizer: PreTrainedTokenizerBase
    rerun: Rerun
    broken: list[Path]

    @property
    def resume_from(self) -> Path | None:
        return self.rerun.checkpoint if self.rerun.action == "resume" else None

    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.trainer.close_engine()  # a vLLM engine goes first, before the interpreter's teardown

    def _train(self) -> TrainResult:
        trainer, out, resume_from = self.trainer, RunDir(self.output_dir), self.resume_from
        with rank_local(), out.storage_errors():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            start = out.step_of(resume_from) if resume_from else 0
            if trainer.state.global_step <= start:
                raise UserError(f"training ended at step {trainer.state.global_step} without taking a step (the "
                                "data loader yielded no full batch); no final model was written")
            main = trainer.accelerator.is_main_process
            staging = out.fresh_staging() if main else out.staging
            trainer.accelerator.wait_for_everyone()
            trainer.save_model(str(staging))  # every rank calls it (ZeRO-3 gathers); the main process writes
            if main:
                self.tokenizer.save_pretrained(str(staging))
                _publish(out, staging, trainer.state.global_step)
            trainer.accelerator.wait_for_everyone()
        return TrainResult(out.path, out.final, trainer.state.global_step, str(resume_from) if resume_from else None,
                           [str(p) for p in self.broken])


def prepare_run(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = True,
                reward_funcs: Sequence[Callable[..., list[float]]] | None = None, max_steps: int | None = None,
                progress: bool = True, rollout_func: Callable[..., dict[str, Any]] | None = None) -> PreparedRun:
    """Everything `train` does before the first step (without the lock): plan, checks, run directory,
    trainer, restored state. For a run that has nothing left to train, a `UserError`."""
    check_run_config(cfg)
    cfg = with_max_steps(cfg, max_steps)
    out = output_directory(cfg, output_dir)
    RunDir(out).check("train", config_settings(cfg), may_differ=RESUME_MAY_CHANGE)
    rerun = plan_run(cfg, out, resume)
    if rerun.action in ("complete", "finish"):
        raise UserError(f"output directory {out}: nothing to train ({rerun.action}); `train` writes what is left")
    return _build(cfg, out, rerun, reward_funcs=reward_funcs, progress=progress, rollout_func=rollout_func)


def _build(cfg: RunConfig, out: Path, rerun: Rerun, *, reward_funcs: Sequence[Callable[..., list[float]]] | None,
           progress: bool, rollout_func: Callable[..., dict[str, Any]] | None) -> PreparedRun:
    """Check everything the user gave, then write the run's record and build the trainer."""
    spec = method_spec(cfg.method)
    run_dir = RunDir(out)
    resume_from = rerun.checkpoint if rerun.action == "resume" else None
    use_cpu, bf16 = resolve_device(cfg, spec)
    set_seed(cfg.training.seed)
    if not progress:
        hf_logging.disable_progress_bar()

    # -- everything the user gave, checked before writing anything ------------------------------
    check_deepspeed_config(cfg.training.deepspeed)

    def check_problems(problems: list[Problem], report: LoadReport) -> None:
        for note in (report.skipped_note(), report.gold_note()):
            if note:
                announce(note)
        check_problems_per_step(cfg, len(problems))

    run_inputs = load_run_inputs(cfg, with_bank=spec.needs_bank(cfg), teacher_pairs=spec.skill_teachers,
                                 on_problems=check_problems)
    problems, report, bank, retriever = run_inputs.problems, run_inputs.report, run_inputs.bank, run_inputs.retriever
    inputs = input_identities(cfg.data.path, problems, cfg.skills.bank, bank)
    if resume_from is not None:
        run_dir.check_inputs_unchanged(inputs)
    watch = active_watch()
    if watch is not None:  # every node runs the same code, config and inputs: checked before the model loads
        watch.agree(run_digests(cfg, out, inputs))
    used = teachers_within_bank(cfg, bank, spec)  # the config records the request, the provenance the K used
    if rerun.finished_step is not None and resume_from is not None:
        announce(f"continuing {out} from {resume_from.name} (complete at step {rerun.finished_step}) to step "
                 f"{cfg.training.max_steps}; the learning-rate schedule follows max_steps={cfg.training.max_steps}")
    model, tokenizer = load_run_model(cfg, run_inputs)
    if cfg.generation.use_vllm and cfg.generation.vllm_mode == "colocate":  # TRL's engine loads model.name_or_path
        model.name_or_path = engine_directory(cfg.model.name_or_path, model, tokenizer)
    blocks = _skill_blocks(cfg, retriever, [p.problem for p in problems]) if spec.prompt_skills(cfg) else None
    dataset = training_dataset(problems, tokenizer, enable_thinking=cfg.prompt.enable_thinking,
                               max_prompt_tokens=cfg.prompt.max_prompt_tokens, skill_blocks=blocks,
                               source=cfg.data.path)
    args = _grpo_config(cfg, spec, out, use_cpu=use_cpu, bf16=bf16, progress=progress)

    # -- the run directory: written by the main process once every rank has passed the checks above
    # (the process group exists now: the GRPOConfig set it up)
    args.distributed_state.wait_for_everyone()
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        run_dir.write_record("train", config_settings(cfg), RESUME_MAY_CHANGE)  # (again, for `prepare_run`)
        record = {**provenance(), "data": report.__dict__, "inputs": inputs, **teachers_record(cfg, used)}
        run_dir.write_resolved_config(dump_config(cfg), record)

    if reward_funcs is None:
        reward_funcs = [AccuracyReward(extract=cfg.reward.extract)]
    metrics = MetricsWriter(run_dir.metrics)
    timer, ema_step = StepTimer(), EMAStep()
    callbacks: list[TrainerCallback] = [metrics, timer, ema_step]
    fault = FaultInjection.from_env()
    if fault is not None:
        callbacks.append(fault)
    context = TrainerContext(bank=bank, retriever=retriever, student_style=run_inputs.student_style,
                             teacher_style=run_inputs.teacher_style, output_dir=out)
    trainer = spec.trainer_class()(
        model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=_peft_config(cfg), callbacks=callbacks,
        **({"rollout_func": rollout_func} if rollout_func is not None else {}), **spec.constructor_kwargs(used, context))
    timer.trainer = ema_step.trainer = trainer
    _record_base_model(trainer, cfg.model.name_or_path)
    trainer.add_callback(CompletionMarker(trainer, cfg.training.save_total_limit))

    use_step_lines(trainer, progress)  # one line per logging step; every key is in metrics.jsonl
    trainer.add_callback(ModelCardWriter(out))  # replaces TRL's generic README.md after each checkpoint

    scan = run_dir.checkpoints()
    if is_main_process():  # checkpoints newer than the resumed one were passed over: keep them aside
        newer = [p for p in scan.complete if resume_from is not None and run_dir.step_of(p) > run_dir.step_of(resume_from)]
        run_dir.set_aside(newer)
    if resume_from is not None:
        check_engine_state(resume_from, trainer.accelerator.process_index)
        metrics.truncate_after(run_dir.step_of(resume_from))
        restore_extra_state(trainer, resume_from)
    elif metrics.records:
        metrics.truncate_after(0)
    return PreparedRun(trainer, out, tokenizer, rerun, scan.incomplete)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def launch_digests(cfg: RunConfig, out: Path) -> dict[str, str]:
    """What every rank of a launch must agree on before any of them reads the output directory, by name
    (`PeerWatch.agree` names what differs): config, output directory, code, package versions."""
    return {"config": _sha(dump_config(cfg)), "output directory": _sha(str(out.expanduser().resolve())),
            "code": f"{__version__} {code_digest()}", "package versions": _sha(json.dumps(package_versions(), sort_keys=True))}


def run_digests(cfg: RunConfig, out: Path, inputs: dict[str, JSONObject]) -> dict[str, str]:
    """`launch_digests` and the inputs (data and skill bank, by content), once they are read."""
    return {**launch_digests(cfg, out), "data": str(inputs["data"]["sha256"]),
            "skill bank": str(inputs.get("skill bank", {}).get("sha256"))}


def input_identities(data_source: str, problems: Sequence[Problem], bank_source: str | None,
                     bank: SkillBank | None) -> dict[str, JSONObject]:
    """What the run trains on, by content: the data (its problems and answers, in order) and the skill
    bank (its items), each with a SHA-256, recorded at the start and compared on resume."""
    rows = [[p.problem_id, p.problem, p.answer] for p in problems]
    inputs: dict[str, JSONObject] = {"data": {
        "source": data_source, "problems": len(rows),
        "sha256": hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()}}
    if bank is not None:
        items = bank.to_json()
        content = {"general_skills": items["general_skills"], "common_mistakes": items["common_mistakes"]}
        inputs["skill bank"] = {
            "source": bank_source, "version": bank.version, "skills": len(bank.general_skills),
            "mistakes": len(bank.common_mistakes),
            "sha256": hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()}
    return inputs


def _finish_without_training(out: Path, rerun: Rerun) -> TrainResult:
    """A run already at max_steps: nothing to do (`complete`), or only final/ to write from its newest
    checkpoint (`finish`: interrupted after that checkpoint was saved)."""
    run_dir = RunDir(out)
    if rerun.action == "complete":
        return TrainResult(out, run_dir.final, int(rerun.finished_step or 0), already_complete=True)
    assert rerun.checkpoint is not None
    step = run_dir.step_of(rerun.checkpoint)
    if not is_main_process():  # no collectives here: the main process alone writes final/
        return TrainResult(out, run_dir.final, step, str(rerun.checkpoint))
    with run_dir.storage_errors():
        staging = run_dir.fresh_staging()
        write_final_from_checkpoint(rerun.checkpoint, staging)
        _publish(run_dir, staging, step)
    return TrainResult(out, run_dir.final, step, str(rerun.checkpoint))


def _publish(run_dir: RunDir, staging: Path, step: int) -> None:
    run_dir.publish(staging, step, complete=lambda folder: write_model_card(run_dir.path, step, folder))


def _skill_blocks(cfg: RunConfig, retriever: "Retriever", problems: Sequence[str]) -> list[str]:
    """Top skills and top mistakes rendered as one guidance block per problem ("+Skill" variants)."""
    return [render_guidance([s.item for s in r.skills], [m.item for m in r.mistakes])
            for r in retriever.retrieve_many(list(problems), cfg.skills.prompt_top_k)]


def _record_base_model(trainer: "GRPOTrainer", model_spec: str) -> None:
    """A LoRA run's adapter names the model it was trained on as given (`sgsd.models` loads it back, the tiny
    model included), not the engine's temporary copy nor nothing (an in-process model has no path)."""
    for peft_config in (getattr(trainer.model, "peft_config", None) or {}).values():
        peft_config.base_model_name_or_path = model_spec


def _peft_config(cfg: RunConfig) -> "LoraConfig | None":
    if not cfg.model.lora.enabled:
        return None

    lora = cfg.model.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="CAUSAL_LM")


def _grpo_config(cfg: RunConfig, spec: MethodSpec, out: Path, *, use_cpu: bool, bf16: bool, progress: bool) -> "GRPOConfig":
    """TRL's GRPOConfig from the run config; the method fixes generations per prompt, beta and
    whether vLLM's importance-sampling correction runs (an extra forward that only GRPO uses)."""
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

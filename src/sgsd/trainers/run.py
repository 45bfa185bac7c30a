"""Build a trainer from a `RunConfig` and train: the one code path for the laptop and the GPU cluster.

Everything the user gave is checked before the output directory is touched (config, data, skill
bank, model, prompt lengths), so bad input leaves nothing half-written. The run directory holds
`resolved_config.yaml` (with the git revision and package versions), `metrics.jsonl`,
`checkpoint-<step>/` directories, skill-bank snapshots and attribution when enabled, and `final/`
(the model or LoRA adapter and tokenizer in Hugging Face format), written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sgsd.config import RunConfig, dump_config, flatten
from sgsd.errors import ConfigError, DataError, UserError
from sgsd.prompts import ChatStyle, render_chat, student_prompt
from sgsd.provenance import provenance

COMPLETE_MARKER = "sgsd_complete.json"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    resumed_from: str | None = None
    ignored_checkpoints: list[str] = field(default_factory=list)


def resolve_device(cfg: RunConfig) -> tuple[bool, bool]:
    """(use_cpu, bf16) from `training.device` and `training.precision`."""
    import torch

    device = cfg.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda requested but no CUDA device is available")
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cfg.training.precision == "bf16" and use_cpu:
        raise ConfigError("training.precision: bf16 on CPU is not supported here; use fp32 or auto")
    bf16 = not use_cpu and cfg.training.precision in ("auto", "bf16")
    return use_cpu, bf16


def _skill_block(cfg: RunConfig, bank: Any, retriever: Any, problems: Sequence[str]) -> list[str]:
    """Top skills and top mistakes rendered as one guidance block per problem ("+Skill" variants)."""
    from sgsd.prompts import render_guidance

    blocks = []
    for retrieval in retriever.retrieve_many(list(problems), cfg.skills.prompt_top_k):
        blocks.append(render_guidance([s.item for s in retrieval.skills], [m.item for m in retrieval.mistakes]))
    return blocks


def load_skills(cfg: RunConfig) -> tuple[Any, Any]:
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever

    bank = load_bank(cfg.skills.bank)
    retriever = make_retriever(cfg.skills.retrieval, bank, embedder=cfg.skills.embedder, seed=cfg.training.seed)
    return bank, retriever


def build_dataset(cfg: RunConfig, tokenizer: Any, problems: Sequence[Any], skill_blocks: list[str] | None) -> Any:
    """Rows: `prompt` (chat list for TRL), `problem`, `answer`, `problem_id`, `student_prompt`, `skill_block`
    (the "+Skill" block prefixed to the student prompt, "" without; OPSD+Skill gives it to the teacher too)."""
    from datasets import Dataset

    style = ChatStyle(cfg.prompt.enable_thinking)
    limit = cfg.prompt.max_prompt_tokens
    rows = []
    for index, item in enumerate(problems):
        text = student_prompt(item.problem)
        if skill_blocks is not None:
            text = f"{skill_blocks[index]}\n\n{text}"
        length = len(tokenizer(render_chat(tokenizer, text, style), add_special_tokens=False)["input_ids"])
        if length > limit:
            raise DataError(f"{cfg.data.path}: problem {item.problem_id}: prompt is {length} tokens, longer than "
                            f"prompt.max_prompt_tokens={limit}")
        rows.append({"prompt": [{"role": "user", "content": text}], "problem": item.problem, "answer": item.answer,
                     "problem_id": item.problem_id, "student_prompt": text,
                     "skill_block": skill_blocks[index] if skill_blocks is not None else ""})
    return Dataset.from_list(rows)


def complete_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints sorted by step, incomplete ones). Complete = has the marker written last."""
    complete, broken = [], []
    for path in output_dir.glob("checkpoint-*"):
        if not path.is_dir() or not path.name.split("-")[-1].isdigit():
            continue
        (complete if (path / COMPLETE_MARKER).exists() else broken).append(path)
    key = lambda p: int(p.name.split("-")[-1])  # noqa: E731
    return sorted(complete, key=key), sorted(broken, key=key)


def check_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None. `--no-resume` only starts into an empty directory."""
    if not output_dir.exists():
        return None
    if not output_dir.is_dir():
        raise UserError(f"output directory {output_dir}: exists and is not a directory")
    contents = [p for p in output_dir.iterdir()]
    if not resume:
        if contents:
            raise UserError(f"output directory {output_dir}: not empty; --no-resume starts only into an empty "
                            "directory (choose another --output-dir or drop --no-resume to resume)")
        return None
    complete, _ = complete_checkpoints(output_dir)
    if complete:
        return complete[-1]
    if (output_dir / "final").exists():
        raise UserError(f"output directory {output_dir}: already holds a finished run (final/); use another directory")
    return None


# Settings a resumed run may change: how long it runs and how it saves and logs, not what it trains.
RESUME_MAY_CHANGE = frozenset({"training.max_steps", "training.output_dir", "training.save_steps",
                               "training.save_total_limit", "training.logging_steps", "training.report_to"})


def check_resume_config(output_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run under a config that differs from the one it was started with.

    Compares with the run's resolved_config.yaml (keys a newer version added are not compared);
    only the settings in RESUME_MAY_CHANGE may differ. Without this, resuming with another learning
    rate, method or model would silently splice two experiments into one run.
    """
    import yaml

    saved_path = output_dir / "resolved_config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{saved_path}: unreadable ({str(err).splitlines()[0]}); cannot check the run's config "
                        "before resuming") from None
    current = flatten(yaml.safe_load(dump_config(cfg)))
    changed = [key for key, value in current.items()
               if key in saved and key not in RESUME_MAY_CHANGE and saved[key] != value]
    if changed:
        shown = "; ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"output directory {output_dir}: holds a run started with another config ({shown}{more}); "
                        "resume it with its own settings or choose another --output-dir")


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


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """UserErrors raised inside are deterministic input errors, identical on every rank, until
    `rank_local()` says otherwise (training has begun): mark them so the CLI prints them once."""
    try:
        yield
    except UserError as err:
        if not getattr(err, "rank_local", False):
            err.same_on_every_rank = True  # type: ignore[attr-defined]
        raise


@contextmanager
def rank_local() -> Iterator[None]:
    """Errors raised inside may happen on one rank only (training, saving): every rank reports its own."""
    try:
        yield
    except UserError as err:
        err.rank_local = True  # type: ignore[attr-defined]
        raise


@dataclass
class PreparedRun:
    """A trainer built and restored to where the run directory left off, ready to `train()`."""

    trainer: Any
    output_dir: Path
    tokenizer: Any
    resume_from: Path | None
    broken: list[Path]

    def train(self) -> TrainResult:
        trainer, out, resume_from = self.trainer, self.output_dir, self.resume_from
        final = out / "final"
        with rank_local(), _storage_errors(out):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            staging = out / "final.tmp"
            if trainer.accelerator.is_main_process and staging.exists():
                shutil.rmtree(staging)
            trainer.accelerator.wait_for_everyone()
            trainer.save_model(str(staging))  # every rank calls it (ZeRO-3 gathers); the main process writes
            if trainer.accelerator.is_main_process:
                self.tokenizer.save_pretrained(str(staging))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
            trainer.accelerator.wait_for_everyone()
        return TrainResult(out, final, trainer.state.global_step, str(resume_from) if resume_from else None,
                           [str(p) for p in self.broken])


def prepare_run(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = True,
                reward_funcs: Sequence[Callable[..., list[float]]] | None = None, max_steps: int | None = None,
                progress: bool = True, rollout_func: Callable[..., dict[str, Any]] | None = None) -> PreparedRun:
    """Everything `train` does before the first step: checks, run directory, trainer, restored state."""
    from transformers import set_seed

    from sgsd.distributed import is_main_process

    from sgsd.data import load_problems
    from sgsd.models import load_model, load_tokenizer
    from sgsd.trainers.callbacks import EMAStep, FaultInjection, MetricsWriter, StepTimer
    from sgsd.trl_adapter import make_grpo_config

    out = Path(output_dir or cfg.training.output_dir or "").expanduser()
    if not str(out) or str(out) == ".":
        raise ConfigError("no output directory: pass --output-dir or set training.output_dir")
    if max_steps is not None:
        cfg.training.max_steps = max_steps
    cfg.validate()
    resume_from = check_output_dir(out, resume)
    if resume_from is not None:
        check_resume_config(out, cfg)
    use_cpu, bf16 = resolve_device(cfg)
    set_seed(cfg.training.seed)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # -- everything the user gave, checked before writing anything ------------------------------
    problems, report = load_problems(
        cfg.data.path, split=cfg.data.split, problem_field=cfg.data.problem_field, answer_field=cfg.data.answer_field,
        deduplicate=cfg.data.deduplicate, max_problems=cfg.data.max_problems, bad_rows=cfg.data.bad_rows,
    )
    bank = retriever = None
    if cfg.skills.bank and (cfg.method == "sgsd" or cfg.grpo.skills_in_prompt or cfg.opsd.skills):
        bank, retriever = load_skills(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, tokenizer=tokenizer)
    if cfg.model.attn_implementation:
        model.config._attn_implementation = cfg.model.attn_implementation
    prompt_skills = cfg.method == "grpo" and cfg.grpo.skills_in_prompt or cfg.method == "opsd" and cfg.opsd.skills
    blocks = _skill_block(cfg, bank, retriever, [p.problem for p in problems]) if prompt_skills else None
    dataset = build_dataset(cfg, tokenizer, problems, blocks)

    num_generations = cfg.grpo.num_generations if cfg.method == "grpo" else 1
    args = make_grpo_config(
        num_generations=num_generations,
        output_dir=str(out),
        max_steps=cfg.training.max_steps,
        learning_rate=cfg.training.learning_rate,
        lr_scheduler_type=cfg.training.lr_scheduler,
        warmup_steps=cfg.training.warmup_steps,
        max_grad_norm=cfg.training.max_grad_norm,
        weight_decay=cfg.training.weight_decay,
        per_device_train_batch_size=cfg.training.prompts_per_device * num_generations,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        seed=cfg.training.seed,
        full_determinism=cfg.training.deterministic,
        data_seed=cfg.training.seed,
        save_steps=cfg.training.save_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is complete (see _completion_marker)
        logging_steps=cfg.training.logging_steps,
        report_to=cfg.training.report_to,
        use_cpu=use_cpu,
        bf16=bf16,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        max_completion_length=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        top_k=cfg.generation.top_k,
        use_vllm=cfg.generation.use_vllm,
        # only GRPO's clipped surrogate uses importance weights; for SGSD/OPSD TRL's correction would
        # cost one more student forward per rollout for nothing
        vllm_importance_sampling_correction=cfg.method == "grpo",
        vllm_mode=cfg.generation.vllm_mode,
        vllm_gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization,
        **({"vllm_server_base_url": cfg.generation.vllm_server_base_url} if cfg.generation.vllm_server_base_url else {}),
        chat_template_kwargs=({"enable_thinking": cfg.prompt.enable_thinking}
                              if cfg.prompt.enable_thinking is not None else None),
        beta=cfg.grpo.beta if cfg.method == "grpo" else 0.0,
        epsilon=cfg.grpo.epsilon,
        loss_type=cfg.grpo.loss_type,
        log_completions=False,
        disable_tqdm=not progress,
        deepspeed=cfg.training.deepspeed,
        shuffle_dataset=True,
        # every parameter takes part in every loss (empty micro-batches and skipped steps included: see
        # SGSDTrainer.method_loss and skip_nonfinite_step), so DDP needs no extra graph traversal
        ddp_find_unused_parameters=False,
    )
    # -- the run directory: written by the main process once every rank has passed the checks above
    # (the process group exists now: the GRPOConfig set it up)
    args.distributed_state.wait_for_everyone()
    if is_main_process():
        from sgsd.storage import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        resolved = dump_config(cfg) + "\n# provenance\n" + json.dumps(
            {**provenance(), "data": report.__dict__}, indent=None) + "\n"
        atomic_write_text(out / "resolved_config.yaml", _comment_block(resolved))
    peft_config = None
    if cfg.model.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha,
                                 lora_dropout=cfg.model.lora.dropout, target_modules=cfg.model.lora.target_modules,
                                 task_type="CAUSAL_LM")
    if reward_funcs is None:
        from sgsd.verify import AccuracyReward

        reward_funcs = [AccuracyReward()]

    metrics = MetricsWriter(out / "metrics.jsonl")
    timer, ema_step = StepTimer(), EMAStep()
    callbacks: list[Any] = [metrics, timer, ema_step]
    fault = FaultInjection.from_env()
    if fault is not None:
        callbacks.append(fault)
    common = dict(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                  processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                  **({"rollout_func": rollout_func} if rollout_func is not None else {}))
    trainer = _make_trainer(cfg, common, bank, retriever, out)
    timer.trainer = ema_step.trainer = trainer
    trainer.add_callback(_completion_marker(trainer, cfg.training.save_total_limit))
    if not progress:  # HF prints every log dict when its progress bar is off; metrics.jsonl has them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)

    _, broken = complete_checkpoints(out)
    if resume_from is not None:
        metrics.truncate_after(int(resume_from.name.split("-")[-1]))
        _restore_extra_state(trainer, resume_from)
    elif metrics.records:
        metrics.truncate_after(0)
    return PreparedRun(trainer, out, tokenizer, resume_from, broken)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES}


@contextmanager
def _storage_errors(out: Path) -> Iterator[None]:
    """A full or read-only disk while saving becomes one line; complete checkpoints are left intact."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        complete, _ = complete_checkpoints(out)
        kept = f"latest complete checkpoint: {complete[-1].name}" if complete else "no complete checkpoint yet"
        raise UserError(f"cannot write {err.filename or out}: {err.strerror or err}; {kept} "
                        "(free space and rerun the same command to resume)") from err


def _comment_block(text: str) -> str:
    head, _, tail = text.partition("\n# provenance\n")
    return head + "\n# provenance: " + tail


def _make_trainer(cfg: RunConfig, common: dict[str, Any], bank: Any, retriever: Any, out: Path) -> Any:
    student_style = ChatStyle(cfg.prompt.enable_thinking)
    teacher_thinking = cfg.prompt.teacher_enable_thinking
    teacher_style = student_style if teacher_thinking is None else ChatStyle(teacher_thinking)
    if cfg.method == "sgsd":
        from sgsd.trainers.sgsd_trainer import SGSDTrainer, TeacherSource

        observers = _skill_observers(cfg, out)
        return SGSDTrainer(teacher_source=TeacherSource(bank, retriever, cfg.skills.num_teachers),
                           settings=cfg.sgsd, student_style=student_style, teacher_style=teacher_style,
                           observers=observers, **common)
    if cfg.method == "opsd":
        from sgsd.trainers.opsd_trainer import OPSDTrainer

        return OPSDTrainer(settings=cfg.opsd, teacher_style=teacher_style, **common)
    from sgsd.trainers.grpo_trainer import GRPOBaselineTrainer

    return GRPOBaselineTrainer(**common)


def _skill_observers(cfg: RunConfig, out: Path) -> list[Any]:
    observers: list[Any] = []
    if cfg.skills.attribution or cfg.skills.online.enabled:
        from sgsd.trainers.skill_hooks import make_observers

        observers.extend(make_observers(cfg, out))
    return observers


def _restore_extra_state(trainer: Any, checkpoint: Path) -> None:
    """EMA weights and skill-bank observers (online bank, attribution) as they were at `checkpoint`."""
    import torch

    path = checkpoint / "sgsd_state.pt"
    if not path.exists():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "ema" in state and getattr(trainer, "ema", None) is not None:
        trainer.ema.load_state_dict(state["ema"])
    for observer in getattr(trainer, "observers", []):
        if observer.name in state:
            observer.load_state_dict(state[observer.name], trainer)


def _completion_marker(trainer: Any, save_total_limit: int | None) -> Any:
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        """Writes the extra state and then `sgsd_complete.json` into each checkpoint after HF saved it:
        a checkpoint without the marker was interrupted while being written and is never resumed from."""

        def on_save(self, args, state, control, **kwargs):
            _write_extra_state(trainer, Path(args.output_dir) / f"checkpoint-{state.global_step}", state)
            if state.is_world_process_zero:
                _rotate_checkpoints(Path(args.output_dir), save_total_limit)

    return CompletionMarker()


def _rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; drop incomplete ones older than the newest complete."""
    complete, broken = complete_checkpoints(output_dir)
    if not complete:
        return
    newest = int(complete[-1].name.split("-")[-1])
    stale = [p for p in broken if int(p.name.split("-")[-1]) < newest]
    if limit is not None and limit > 0:
        stale += complete[:-limit]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def _write_extra_state(trainer: Any, path: Path, state: Any) -> None:

    import torch

    from sgsd.storage import atomic_write_json

    if not state.is_world_process_zero:
        return
    extra: dict[str, Any] = {}
    ema = getattr(trainer, "ema", None)
    if ema is not None:
        extra["ema"] = ema.state_dict()
    for observer in getattr(trainer, "observers", []):
        extra[observer.name] = observer.state_dict()
    if extra:
        staging = path / "sgsd_state.pt.tmp"
        torch.save(extra, staging)
        os.replace(staging, path / "sgsd_state.pt")
    atomic_write_json(path / COMPLETE_MARKER, {"step": state.global_step})

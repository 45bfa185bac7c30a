"""The one module that touches TRL's private surface (pinned: trl==1.16.0).

Everything TRL does well is used as is: generation (transformers or vLLM colocate/server with weight
sync), PEFT/LoRA, accelerate with DeepSpeed ZeRO-2/FSDP, logging, checkpoints. SGSD and OPSD need
three seams in `GRPOTrainer`, and only this module opens them:

- `_calculate_rewards`: captured, so methods see this rank's binary rewards (TRL's output dict carries
  group-normalised advantages only, and its rewards are gathered over all ranks).
- `_generate_and_score_completions`: after TRL generates and scores, `rollout_extras(...)` adds the
  method's tensors ([B, ...] leading batch dimension, so TRL's shuffle and split carry them).
- `compute_loss`: replaced by `method_loss(model, inputs)` when a method defines one, scaled for
  gradient accumulation as TRL's own `_compute_loss` does.
- `_compute_loss`: TRL's GRPO loss itself, offered to methods that add to it as `grpo_loss(model,
  inputs)` (sgsd-pg).
- One rollout per prompt: `GRPOConfig` refuses `num_generations < 2` (GRPO needs groups; SGSD and
  OPSD do not), so `make_grpo_config` validates with 2 and then sets 1. The trainer's own runtime
  handles 1 (its std falls back to zeros for groups of one).

- vLLM colocate: the engine TRL builds in `GRPOTrainer.__init__` is built with the trainer's dtype
  (`engine_options`) and started under `sgsd.vllm_adapter.engine_started_here` (what a CPU build of vLLM
  needs, and this process's threads and rank-specific random state kept: `colocated_engine`), and after each generation `check_engine_sync` scores one fixed completion in the
  engine (`vllm_generation.llm`) and in the trainer's model: `vllm/sync_logp_max_abs_diff` (max over
  tokens and ranks) shows whether the weights TRL pushed after the last optimizer step reached the engine,
  `vllm/probe_logp` (the engine's mean log-prob of that completion) that they moved.

- Several CPU processes: accelerate names each process's device `cpu:0`, and the Trainer loads the
  optimizer state with `map_location=args.device` when world_size > 1; torch cannot map storages to
  "cpu:0" and resuming crashed. `_indexed_cpu_location` teaches torch's (public) location
  registry that "cpu:N" is the CPU.

`check_trl_contract()` compares the signatures this module relies on with the installed TRL;
the trainers call it at construction and `tests/test_trl_adapter.py` pins it, so a TRL change fails
loudly instead of silently training something else.
"""

from __future__ import annotations

import inspect
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypedDict

import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.generation import vllm_generation
from trl.trainer.utils import use_adapter

from sgsd.errors import ConfigError
from sgsd.vllm_adapter import engine_started_here, score_sequences, shutdown_engine

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

TRL_VERSION = "1.16.0"

# name -> leading parameter names this module relies on (in order)
PRIVATE_HOOKS: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_get_per_token_logps_and_entropies": (
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
    ),
    "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    "_compute_loss": ("self", "model", "inputs"),
}
# keys of `_generate_and_score_completions`' output the methods read
OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
# trainer attributes the methods read
ATTRIBUTES = ("_metrics", "accelerator", "current_gradient_accumulation_steps", "reward_weights", "temperature")
# attributes of a trainer built with use_vllm=True, vllm_mode="colocate": the engine (`vllm.LLM`) is
# `vllm_generation.llm`, and TRL pushes weights with `vllm_generation.sync_weights()`
VLLM_COLOCATE_ATTRIBUTES = ("vllm_generation", "_last_loaded_step")
# metric keys of the engine sync check (`HookedGRPOTrainer.check_engine_sync`)
SYNC_DIFF_METRIC, PROBE_LOGP_METRIC = "vllm/sync_logp_max_abs_diff", "vllm/probe_logp"


# FSDP1 flattens the head's weight into a sharded FlatParameter that the chunked LM head (which reads
# the weight outside the forward) cannot gather; FSDP2's DTensors it can (`sgsd.lm_head.head_weights`)
FSDP1_REFUSAL = ("FSDP version 1 is not supported by the SGSD/OPSD loss (its chunked LM head reads the head's weight "
                 "outside the forward); set fsdp_version: 2 in the accelerate config, or use DeepSpeed ZeRO-2/3 or DDP")


class TRLContractError(RuntimeError):
    pass


def _indexed_cpu_location(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage | None:
    """torch.load deserializer for locations "cpu:N" (several CPU processes): the CPU; None otherwise."""
    if location.startswith("cpu:") and location[4:].isdigit():
        return storage
    return None


# once per process (this module is imported once); priority 11: after torch's own "cpu" (10), before
# the device backends, none of which claims "cpu:N"
torch.serialization.register_package(11, lambda obj: None, _indexed_cpu_location)


class RolloutRow(TypedDict):
    """One training row, as `sgsd.data.training_dataset` builds it and TRL passes it back to the hooks."""

    prompt: list[dict[str, str]]  # the chat messages of the student's prompt
    problem: str
    answer: str
    problem_id: str
    student_prompt: str
    skill_block: str  # the retrieved skills' text ("" when the method puts none in the prompt)


class RolloutBatch(TypedDict, total=False):
    """One rollout batch, as TRL's `_generate_and_score_completions` returns it plus each method's
    `rollout_extras` (B rollouts, P prompt tokens, T completion tokens, K teachers; masks are 1 on real
    tokens). TRL adds further keys in some settings (vLLM importance sampling, multimodal inputs); the
    trainers read only the ones below."""

    # TRL's
    prompt_ids: torch.Tensor  # [B, P], left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B]
    num_items_in_batch: torch.Tensor | int
    old_per_token_logps: torch.Tensor  # [B, T]
    ref_per_token_logps: torch.Tensor  # [B, T]
    sampling_per_token_logps: torch.Tensor  # [B, T]
    importance_sampling_ratio: torch.Tensor
    # every method's (the base class's default extras)
    rewards: torch.Tensor  # [B]
    # SGSD's (sgsd.trainers.sgsd_trainer)
    teacher_logps: torch.Tensor  # [B, K, T]
    teacher_weights: torch.Tensor  # [B, K]
    sgsd_mask: torch.Tensor  # [B, T], the counted tokens
    rollout_uid: torch.Tensor  # [B], keys of the trainer's rollout records
    sgsd_active: torch.Tensor  # [B] bool, with skip_neutral_rows
    teacher_entropy: torch.Tensor  # [B, K, T]; absent when the vLLM engine scored (sgsd.teacher_engine: vllm)
    control_logps: torch.Tensor  # [B, T], with a polarity control
    teacher_top_logps: torch.Tensor  # [B, K, T, k'], local-support scoring
    teacher_top_ids: torch.Tensor  # [B, K, T, k']
    # OPSD's (sgsd.trainers.opsd_trainer)
    opsd_teacher_prompt_ids: torch.Tensor  # [B, P'], left-padded
    opsd_teacher_prompt_mask: torch.Tensor  # [B, P']


def check_trl_contract() -> list[str]:
    """Differences between the installed TRL and what this adapter relies on (empty when compatible)."""
    problems = []
    if trl.__version__ != TRL_VERSION:
        problems.append(f"trl=={trl.__version__} installed, this adapter is written for trl=={TRL_VERSION}")
    for name, expected in PRIVATE_HOOKS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            problems.append(f"GRPOTrainer.{name} no longer exists")
            continue
        params = tuple(inspect.signature(method).parameters)[: len(expected)]
        if params != expected:
            problems.append(f"GRPOTrainer.{name} parameters are {params}, expected {expected}")
    return problems


def make_grpo_config(*, num_generations: int, **kwargs: Any) -> GRPOConfig:
    """A `GRPOConfig`, allowing one rollout per prompt (SGSD and OPSD need no groups)."""
    if num_generations >= 2:
        return GRPOConfig(num_generations=num_generations, **kwargs)
    if num_generations != 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    user_batching = "generation_batch_size" in kwargs or "steps_per_generation" in kwargs
    args = GRPOConfig(num_generations=2, num_generations_eval=2, **_even_generation_batch(kwargs))
    args.num_generations = 1
    args.num_generations_eval = 1
    if not user_batching:  # TRL's default: one generation batch per optimizer step
        args.steps_per_generation = args.gradient_accumulation_steps
        args.generation_batch_size = args.per_device_train_batch_size * args.world_size * args.steps_per_generation
    return args


def _even_generation_batch(kwargs: dict[str, Any]) -> dict[str, Any]:
    # GRPOConfig checks generation_batch_size % num_generations with the placeholder 2; an odd batch
    # would fail that check, so validate with an even one and restore TRL's batching after.
    out = dict(kwargs)
    if "generation_batch_size" not in out and "steps_per_generation" not in out:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        out["generation_batch_size"] = 2 * out.get("per_device_train_batch_size", 8) * world
    if out.get("per_device_eval_batch_size", 8) % 2:
        out["per_device_eval_batch_size"] = 2
    return out


def local_rewards(trainer: GRPOTrainer, rewards_per_func: torch.Tensor, num_local: int) -> torch.Tensor:
    """This rank's weighted rewards [B] from `_calculate_rewards`' all-rank output [N_all, F]."""
    weights = trainer.reward_weights.to(rewards_per_func.device)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    start = trainer.accelerator.process_index * num_local
    return rewards[start : start + num_local]


class HookedGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with the seams above. Subclasses override `rollout_extras` and `method_loss`."""

    #: set by subclasses that replace GRPO's loss
    has_method_loss: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        problems = check_trl_contract()
        if problems:
            raise TRLContractError("TRL changed under sgsd's adapter: " + "; ".join(problems))
        self._local_rewards: torch.Tensor | None = None
        self.step_timing: dict[str, float] = {"generate_s": 0.0, "teacher_s": 0.0}
        self._sync_probe: tuple[list[int], list[int]] | None = None
        config = kwargs.get("args")
        colocate = bool(config is not None and config.use_vllm and config.vllm_mode == "colocate")
        on_cpu = colocate and (config.use_cpu or not torch.cuda.is_available())
        with colocated_engine(on_cpu, **(engine_options(config, on_cpu) if colocate else {})):
            super().__init__(*args, **kwargs)
        self.colocated_engine = colocate
        if self.has_method_loss and getattr(self, "is_fsdp_enabled", False):
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if getattr(plugin, "fsdp_version", 1) != 2:
                raise ConfigError(FSDP1_REFUSAL)

    # -- seams ------------------------------------------------------------------------------
    def rollout_extras(self, inputs: list[RolloutRow], output: RolloutBatch,
                       rewards: torch.Tensor) -> RolloutBatch:
        """Tensors to add to the rollout batch (leading dimension B). Default: the rewards only."""
        return {"rewards": rewards}

    def method_loss(self, model: torch.nn.Module, inputs: RolloutBatch) -> torch.Tensor:
        raise NotImplementedError

    # -- private hooks (TRL 1.16) -------------------------------------------------------------
    def _calculate_rewards(self, inputs: list[RolloutRow], prompts: list[list[dict[str, str]]],
                           completions: list[list[dict[str, str]]],
                           completion_ids_list: list[list[int]]) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._local_rewards = local_rewards(self, rewards_per_func, len(prompts))
        # why rewards are 0: grader failures of this generation batch, summed over ranks
        for func in self.reward_funcs:
            failures = getattr(func, "last_failures", None)
            if failures:
                self.record_counts({f"reward/{kind}": count for kind, count in failures.items()})
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[RolloutRow]) -> RolloutBatch:
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        if self.colocated_engine and self.model.training:
            self.check_engine_sync(output)
        generated = time.perf_counter()
        output.update(self.rollout_extras(inputs, output, self._local_rewards))
        done = time.perf_counter()
        self.step_timing["generate_s"] += generated - start
        self.step_timing["teacher_s"] += done - generated
        return output

    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if not self.has_method_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError("sgsd trainers do not return outputs from compute_loss")
        loss = self.method_loss(model, inputs)
        if self.model.training:  # TRL disables HF's auto-scaling: scale for accumulation as _compute_loss does
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    @torch.no_grad()
    def check_engine_sync(self, output: RolloutBatch) -> None:
        """Score one fixed completion (this rank's first non-empty rollout of the run, kept) in the colocated
        engine, which TRL has just given the current weights, and in the trainer's model; record the largest
        difference of their token log-probs and the engine's mean (metric keys above). Under LoRA the trainer
        scores with the adapter on: the engine must hold the merged weights."""
        if self._sync_probe is None:
            rows = output["completion_mask"].sum(dim=1).nonzero()
            if len(rows):
                row = int(rows[0])
                self._sync_probe = (output["prompt_ids"][row][output["prompt_mask"][row].bool()].tolist(),
                                    output["completion_ids"][row][output["completion_mask"][row].bool()].tolist())
        difference = probe_logp = torch.tensor(float("nan"))  # a rank without a probe yet still joins the gathers
        if self._sync_probe is not None:
            prompt, completion = self._sync_probe
            engine = torch.tensor(score_sequences(self.vllm_generation.llm, [prompt + completion], [len(prompt)])[0])
            model = self.unwrapped_model
            ids = torch.tensor([prompt + completion], device=self.accelerator.device)
            was_training = model.training
            model.eval()  # no dropout: the engine has none
            try:
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            finally:
                model.train(was_training)
            trainer = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None])[:, 0].cpu()
            difference, probe_logp = (engine - trainer).abs().max(), engine.mean()
        self._record({SYNC_DIFF_METRIC: difference}, _nanmax)
        self.record_metric(PROBE_LOGP_METRIC, probe_logp)

    def close_engine(self) -> None:
        """Stop the colocated vLLM engine (after the run's last collective: see `shutdown_engine`)."""
        if self.colocated_engine:
            self.colocated_engine = False
            shutdown_engine(self.vllm_generation.llm)

    # -- helpers for methods ------------------------------------------------------------------
    def grpo_loss(self, model: torch.nn.Module, inputs: RolloutBatch) -> torch.Tensor:
        """TRL's own GRPO loss of one micro-batch (`GRPOTrainer._compute_loss`), exactly as TRL's trainer
        returns it: clipped surrogate of the batch's group advantages, KL term when beta > 0, TRL's
        `loss_type` normalisation, ALREADY divided by the gradient-accumulation steps in training.
        Logs TRL's own GRPO metrics (entropy, clip ratios, kl) as a GRPO run does."""
        return GRPOTrainer._compute_loss(self, model, inputs)

    def record_metric(self, name: str, value: float | torch.Tensor) -> None:
        """Append one scalar to TRL's metric buffer (see `record_metrics`)."""
        self.record_metrics({name: value})

    def record_metrics(self, values: dict[str, float | torch.Tensor]) -> None:
        """Append scalars to TRL's metric buffer (averaged over the logging interval).

        One collective per call: the values are stacked, gathered over ranks and averaged ignoring
        NaN. Every rank must call with the same keys in the same order; a rank with nothing to report
        for a key passes NaN.
        """
        self._record(values, lambda gathered: gathered.nanmean(dim=0))

    def record_counts(self, values: dict[str, float | int]) -> None:
        """Like `record_metrics`, for counts: summed over ranks instead of averaged."""
        self._record(values, lambda gathered: gathered.sum(dim=0))

    def _record(self, values: dict[str, float | int | torch.Tensor],
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Stack the values, gather them over ranks ([ranks, n]), `reduce` to [n], append to TRL's buffer."""
        if not values:
            return
        device = self.accelerator.device
        local = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().to(device).reshape(())
                             for v in values.values()])
        gathered = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(values))
        buffer = self._metrics["train" if self.model.training else "eval"]
        for name, value in zip(values, reduce(gathered).tolist()):
            buffer[name].append(float(value))

    def skip_nonfinite_step(self, model: torch.nn.Module) -> torch.Tensor:
        """A zero loss for a micro-step whose log-probs are NaN/inf: no parameter moves.

        The zero is built from the parameters themselves, not from the poisoned activations (0 * NaN
        in a backward is NaN), so every gradient is exactly 0 and data-parallel ranks stay in step.
        The caller logs the skip (with the same metric keys as a normal step, NaN where undefined).
        """
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * 0.0

    def pop_step_timing(self) -> dict[str, float]:
        timing, self.step_timing = self.step_timing, {"generate_s": 0.0, "teacher_s": 0.0}
        return timing

    @property
    def unwrapped_model(self) -> PreTrainedModel | PeftModel:
        return self.accelerator.unwrap_model(self.model)


def engine_options(args: GRPOConfig, on_cpu: bool) -> dict[str, Any]:
    """`vllm.LLM` options TRL 1.16 does not set for its colocated engine: the trainer's compute dtype (vLLM's
    "auto" turns an fp32 checkpoint into bf16, so an fp32 run would sample from a bf16 copy of its policy), and
    on a CPU eager execution (vLLM would torch.compile the model first: about 40 s per engine start)."""
    return {"dtype": "bfloat16" if args.bf16 else "float32", **({"enforce_eager": True} if on_cpu else {})}


@contextmanager
def colocated_engine(on_cpu: bool, **options: Any) -> Iterator[None]:
    """Inside, TRL's colocate mode builds its engine with `options` added and, on a CPU, under
    `sgsd.vllm_adapter.engine_started_here` (only the engine's construction: the random state it restores is
    the one TRL has just made rank-specific). TRL 1.16 calls the `LLM` its `trl.generation.vllm_generation`
    module imported from vLLM, which is replaced for the duration."""
    if not options:
        yield
        return

    original = vllm_generation.LLM

    def build_engine(*args: Any, **kwargs: Any) -> Any:
        with engine_started_here(on_cpu):
            return original(*args, **{**kwargs, **options})

    vllm_generation.LLM = build_engine
    try:
        yield
    finally:
        vllm_generation.LLM = original


def _nanmax(gathered: torch.Tensor) -> torch.Tensor:
    """Max over ranks ([ranks, n] -> [n]) ignoring NaN; NaN where every rank has NaN."""
    top = gathered.nan_to_num(nan=float("-inf")).amax(dim=0)
    return torch.where(torch.isneginf(top), torch.full_like(top, float("nan")), top)


@contextmanager
def adapter_disabled(model: PeftModel) -> Iterator[None]:
    """Base-model weights of a PEFT model (adapter off), through TRL's own helper."""
    with use_adapter(model, adapter_name=None):
        yield

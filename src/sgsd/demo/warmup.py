"""Warm start for the demo: a tiny Qwen3 model taught the running-sum world by a short supervised phase.

Simplified on purpose (nanochat-style): a plain torch loop on CPU, seeded, over synthetic worked
solutions generated on the fly (`sgsd.demo.world.worked_solution`). The prompt of each example is
rendered with the project's own chat path (`sgsd.prompts.render_chat`, non-thinking mode), exactly as
the trainers render theirs, in one of three kinds:

- plain: `student_prompt(problem)`; carries are forgotten at the base rate;
- hint: an SGSD teacher prompt `teacher_prompt(render_guidance([skill], [mistake]), problem)` for a
  random (skill, mistake) pair of the seed bank; the forgotten-carry rate depends on the pair's net
  effect (`sgsd.demo.bank.hint_effect`): helpful items lower it, misleading items raise it,
  irrelevant items leave it at the base rate;
- reference: the OPSD teacher prompt with the final answer as reference solution (as on DAPO); both
  mistake kinds are rare, so an OPSD teacher knows something a skill cannot tell.

Arithmetic slips happen at the same rate whatever the hint. The model therefore learns to read
hints, and a held-out student prompt gets base-rate mistakes of both kinds.

The first `early_steps` use only plain and reference prompts (the arithmetic and where the numbers
are), the rest all three kinds. Each batch holds one prompt kind: hint prompts are ~3x longer than
plain ones, and mixing them would pad every plain example to the hint length.

The result is cached (model and tokenizer via `save_pretrained`, plus `warmup.json`) under a
directory named by a hash of everything that determines it, so later runs reuse it. Measured cost
and outcome: see `sgsd.demo.presets`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sgsd import prompts, tiny
from sgsd.data import Problem
from sgsd.demo.bank import hint_effect, seed_bank
from sgsd.demo.world import MistakeRates, World, WorldConfig, make_world, worked_solution
from sgsd.errors import ConfigError
from sgsd.prompts import (ChatStyle, opsd_teacher_prompt, reference_from_answer, render_chat, render_guidance,
                          student_prompt, teacher_prompt)
from sgsd.run_dir import waiting_lock
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, parse_bank
from sgsd.storage import apply_plain_modes
from sgsd.tiny import ModelShape, build_tiny_model, build_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase
    from transformers import PreTrainedTokenizerFast


# Bump when the meaning of a cached checkpoint changes (data generation, loss, prompt kinds).
WARMUP_FORMAT_VERSION = 2
PLAIN, HINT, REFERENCE = "plain", "hint", "reference"
PROMPT_KINDS = (PLAIN, HINT, REFERENCE)


# The demo model (`sgsd.tiny.ModelShape`): 0.72 M parameters with the demo's 512-token BPE vocabulary.
DEMO_MODEL = ModelShape(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                        vocab_size=512)


@dataclass(frozen=True)
class WarmupConfig:
    """Everything that determines the warm-start checkpoint (its cache key hashes all of it).

    forget_by_effect: forgotten-carry rate for a prompt whose net hint effect is -2, -1, 0, +1, +2
        (#helpful - #misleading items; plain prompts have effect 0). One helpful item is enough to
        make carries reliable, so that a teacher built from a mixed pair still knows better.
    slip: per-column arithmetic-slip rate of plain and hint prompts (no hint changes it).
    reference_rates: mistake rates under the OPSD reference prompt.
    kind_mix: probability of a batch of each kind (plain, hint, reference).
    batch_sizes: examples per batch of each kind (plain, hint, reference): about equal tokens per
        batch, since hint prompts are ~3x longer than plain ones. Measured: learning is limited by
        the number of updates more than by examples - halving (64, 24, 40) to (32, 12, 20) gave the
        same model after 800 steps at half the time; halving again did not learn in 800 steps.
    early_steps / early_mix: the first `early_steps` steps draw batch kinds from `early_mix` instead:
        the arithmetic is learned on the short prompts first (hint prompts are ~3x longer, so ~3x
        costlier per example), hint reading afterwards. Reference prompts belong in the early mix:
        with plain prompts only, the model learns to find the operands at a fixed distance from
        the end of the prompt, a shortcut the reference prompt (problem first, then the reference)
        breaks and that is hard to unlearn later (measured on an earlier column-addition world:
        accuracy 0.00 under the reference prompt).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelShape = DEMO_MODEL
    steps: int = 800
    batch_sizes: tuple[int, int, int] = (32, 12, 20)
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.2
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    forget_by_effect: tuple[float, ...] = (0.9, 0.75, 0.25, 0.03, 0.01)
    slip: float = 0.03
    reference_rates: MistakeRates = field(default_factory=lambda: MistakeRates(forget_carry=0.02, slip=0.01))
    kind_mix: tuple[float, float, float] = (0.2, 0.55, 0.25)
    early_steps: int = 150
    early_mix: tuple[float, float, float] = (0.6, 0.0, 0.4)

    def __post_init__(self) -> None:
        if self.steps < 1 or len(self.batch_sizes) != 3 or min(self.batch_sizes) < 1:
            raise ConfigError(
                f"WarmupConfig: need steps >= 1 and 3 batch sizes >= 1, got {self.steps}, {self.batch_sizes}"
            )
        if len(self.forget_by_effect) != 5:
            raise ConfigError("WarmupConfig.forget_by_effect: need 5 rates, for net hint effects -2..+2")
        for rate in self.forget_by_effect:
            MistakeRates(rate, self.slip)  # range check with the usual message
        for name in ("kind_mix", "early_mix"):
            mix = getattr(self, name)
            if len(mix) != 3 or min(mix) < 0 or not math.isclose(sum(mix), 1.0):
                raise ConfigError(f"WarmupConfig.{name} = {mix}: need 3 non-negative probabilities summing to 1")

    def rates_for_effect(self, effect: int) -> MistakeRates:
        return MistakeRates(self.forget_by_effect[max(-2, min(2, effect)) + 2], self.slip)

    def digest(self) -> str:
        """Hash of the config, the seed bank, the prompt texts and the library versions: the cache key.

        torch and tokenizers versions are part of it: another BPE trainer or other kernels give
        another tokenizer or other weights, which must not be served under this key."""
        import tokenizers
        import torch

        payload = {
            "version": WARMUP_FORMAT_VERSION,
            "libraries": {"torch": torch.__version__, "tokenizers": tokenizers.__version__},
            "config": asdict(self),
            "bank": seed_bank(),
            "prompts": [prompts.INSTRUCTION, prompts.GUIDANCE_PREAMBLE, prompts.OPSD_INSTRUCTION, tiny.CHAT_TEMPLATE],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WarmupReport:
    """What the warm-up did: per-step losses (mean completion-token cross-entropy), time, cache use."""

    digest: str
    losses: tuple[float, ...]
    seconds: float
    num_parameters: int


@dataclass
class WarmStart:
    """A warmed-up model, its tokenizer, the world it was trained on, and where it is cached."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    world: World
    config: WarmupConfig
    path: Path
    from_cache: bool
    report: WarmupReport


def demo_chat_style() -> ChatStyle:
    return ChatStyle(enable_thinking=False)


def hint_prompt(problem: Problem, skill: GeneralSkill, mistake: CommonMistake) -> str:
    """An SGSD teacher prompt with one (skill, mistake) pair: the user text, before the chat template."""
    return teacher_prompt(render_guidance([skill], [mistake]), problem.problem)


def reference_prompt(problem: Problem) -> str:
    """The OPSD teacher prompt with the final answer as reference (docs/spec.md section 2)."""
    return opsd_teacher_prompt(problem.problem, reference_from_answer(problem.answer))


def load_seed_bank() -> SkillBank:
    """The seed bank as a `sgsd.skills.SkillBank` (typed items with the fields `render_guidance` reads)."""
    return parse_bank(seed_bank(), source="sgsd.demo seed bank")


def sample_example(problem: Problem, kind: str, config: WarmupConfig, bank: SkillBank, rng: random.Random) -> tuple[str, str]:
    """(user text, worked solution text) of one warm-up example of the given prompt kind."""
    if kind == PLAIN:
        text, rates = student_prompt(problem.problem), config.rates_for_effect(0)
    elif kind == HINT:
        skill = bank.general_skills[rng.randrange(len(bank.general_skills))]
        mistake = bank.common_mistakes[rng.randrange(len(bank.common_mistakes))]
        text = hint_prompt(problem, skill, mistake)
        rates = config.rates_for_effect(hint_effect([skill.skill_id, mistake.mistake_id]))
    elif kind == REFERENCE:
        text, rates = reference_prompt(problem), config.reference_rates
    else:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    return text, worked_solution(problem, rates, rng).text


def tokenizer_corpus(world: World, bank: SkillBank, size: int = 200) -> list[str]:
    """Texts the demo tokenizer's BPE merges are learned from (deterministic)."""
    rng = random.Random(f"sgsd-demo-corpus:{world.config.seed}")
    problems = list(world.train[:size])
    texts = [student_prompt(p.problem) for p in problems] + [reference_prompt(p) for p in problems]
    # The chat roles as rendered, so that "user" and "assistant" become single tokens.
    texts += ["<|im_start|>user\n", "<|im_start|>assistant\n"] * size
    texts += [worked_solution(p, MistakeRates(0.3, 0.05), rng).text for p in problems]
    texts += [hint_prompt(problems[0], s, m) for s in bank.general_skills for m in bank.common_mistakes]
    return texts


def encode_batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]) -> tuple[Any, Any, Any]:
    """Right-padded (input_ids, attention_mask, labels) [N, L]; labels are -100 outside completions.

    Each prompt is a user text, rendered with the chat template; each completion is followed by the
    end-of-turn token so that the model learns to stop.
    """
    import torch

    style = demo_chat_style()
    prompt_ids = tokenizer([render_chat(tokenizer, p, style) for p in prompts], add_special_tokens=False).input_ids
    completion_ids = tokenizer([c + tokenizer.eos_token for c in completions], add_special_tokens=False).input_ids
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids = torch.tensor(p + c)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, len(p) : len(ids)] = ids[len(p) :]
    return input_ids, attention_mask, labels


def _learning_rate(config: WarmupConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * learning_rate."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_demo_tokenizer(config: WarmupConfig, world: World, bank: SkillBank) -> PreTrainedTokenizerFast:
    return build_tokenizer(tokenizer_corpus(world, bank), vocab_size=config.model.vocab_size)


def build_untrained(config: WarmupConfig) -> tuple[Any, Any, World, SkillBank]:
    """(model, tokenizer, world, seed bank) before the warm-up; deterministic given `config`."""
    world = make_world(config.world)
    bank = load_seed_bank()
    tokenizer = build_demo_tokenizer(config, world, bank)
    model = build_tiny_model(tokenizer, seed=config.seed, shape=config.model)
    return model, tokenizer, world, bank


def run_warmup(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, world: World, bank: SkillBank, config: WarmupConfig, *,
               progress: Callable[[int, float], None] | None = None) -> WarmupReport:
    """The supervised warm-up loop (in place). progress(step, loss) is called after every optimizer step.

    Loss: mean cross-entropy over the completion tokens of the batch (prompt tokens are not trained).
    """
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = random.Random(f"sgsd-demo-warmup:{config.seed}")
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            mix = config.early_mix if step < config.early_steps else config.kind_mix
            kind = rng.choices(PROMPT_KINDS, weights=mix)[0]
            size = config.batch_sizes[PROMPT_KINDS.index(kind)]
            problems = [world.train[rng.randrange(len(world.train))] for _ in range(size)]
            prompts, completions = zip(*(sample_example(p, kind, config, bank, rng) for p in problems))
            input_ids, attention_mask, labels = encode_batch(tokenizer, prompts, completions)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    model.eval()
    return WarmupReport(
        digest=config.digest(), losses=tuple(losses), seconds=time.perf_counter() - start,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


def default_cache_root() -> Path:
    """`$SGSD_CACHE_DIR/demo`, else `$XDG_CACHE_HOME/sgsd/demo`, else `~/.cache/sgsd/demo`."""
    if os.environ.get("SGSD_CACHE_DIR"):
        return Path(os.environ["SGSD_CACHE_DIR"]).expanduser() / "demo"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sgsd" / "demo"


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: WarmupConfig, report: WarmupReport, target: Path) -> None:
    """Write the checkpoint into a temporary sibling folder, then rename it into place (atomic).
    `warm_start` has made and checked target's parent before training."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"config": asdict(config), "report": asdict(report)}
        (tmp / "warmup.json").write_text(json.dumps(record, indent=2) + "\n")
        apply_plain_modes(tmp)  # mkdtemp's 0700 folder, safetensors' 0600 weights: the umask's modes
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "warmup.json").exists():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, config: WarmupConfig) -> WarmStart:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    record = json.loads((path / "warmup.json").read_text())
    report = WarmupReport(**{**record["report"], "losses": tuple(record["report"]["losses"])})
    model = Qwen3ForCausalLM.from_pretrained(path)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return WarmStart(model, tokenizer, make_world(config.world), config, path, from_cache=True, report=report)


def weights_sha256(path: Path) -> str:
    """sha256 of a checkpoint's weight files (`*.safetensors`, in name order): which warm start a run
    came from, comparable across machines (the cache key names the settings, not the weights)."""
    digest = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def perturb_ulp(model: torch.nn.Module, seed: int) -> None:
    """Move every floating-point weight of `model` by one ulp, up or down at random (seeded), in place:
    the size of the difference two machines' kernels leave in a trained checkpoint."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for param in model.state_dict().values():
            if not param.is_floating_point() or param.data_ptr() in seen:
                continue  # tied weights share one tensor: moved once, not twice
            seen.add(param.data_ptr())
            up = torch.rand(param.shape, generator=generator) < 0.5
            toward = torch.where(up, torch.tensor(math.inf), torch.tensor(-math.inf)).to(param.dtype)
            param.copy_(torch.nextafter(param, toward))


ULP_SUFFIX = "-ulp"


def perturbed_warm_start(start: WarmStart) -> WarmStart:
    """`start` with one ulp of noise on every weight (`perturb_ulp`, seeded by its warm-up seed), saved
    beside it as `<digest>-ulp/` (cached like the warm start, and rebuilt when the warm start changed)."""
    target = start.path.parent / f"{start.path.name}{ULP_SUFFIX}"
    source = weights_sha256(start.path)
    marker = target / "perturbation.json"
    if marker.exists() and json.loads(marker.read_text()).get("source_sha256") == source:
        loaded = _load(target, start.config)
        return WarmStart(loaded.model, loaded.tokenizer, start.world, start.config, target, True, start.report)
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(start.path)
    perturb_ulp(model, start.config.seed)
    model.eval()
    shutil.rmtree(target, ignore_errors=True)  # a perturbation of other weights
    _save(model, start.tokenizer, start.config, start.report, target)
    marker.write_text(json.dumps({"source": str(start.path), "source_sha256": source, "noise": "one ulp per weight",
                                  "seed": start.config.seed}, indent=2) + "\n")
    return WarmStart(model, start.tokenizer, start.world, start.config, target, False, start.report)


def warm_start(config: WarmupConfig, *, cache_root: str | Path | None = None,
               progress: Callable[[int, float], None] | None = None, initial_ulp_noise: bool = False) -> WarmStart:
    """The warm-start model for `config`: loaded from the cache, or trained and cached.

    The checkpoint lives in `<cache_root>/<config.digest()>/` (model, tokenizer, warmup.json); it is a
    normal Hugging Face model directory, so trainers can start from its path. `initial_ulp_noise`: the
    initial weights move by one ulp (`perturb_ulp`) before the warm-up, which then amplifies that as it
    would another machine's last-bit differences (`python scripts/demo_noise.py`); cached as
    `<digest>-ulp-init/`.
    """
    path = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    path = path / (config.digest() + ("-ulp-init" if initial_ulp_noise else ""))
    if (path / "warmup.json").exists():
        return _load(path, config)
    try:  # before minutes of training, not after
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        from sgsd.errors import UserError

        raise UserError(f"warm-start cache {path.parent}: not a writable directory ({err.strerror or err}); "
                        "pass another --cache-dir or set SGSD_CACHE_DIR") from None

    def waiting(pid: str) -> None:
        print(f"sgsd: warm start {path}: another process{f' (pid {pid})' if pid else ''} is training it; "
              "waiting to load its result", file=sys.stderr, flush=True)

    # two demos with different output directories share the cache: one trains an entry, the other waits for it
    with waiting_lock(path.parent / f".{path.name}.lock", on_wait=waiting):
        if (path / "warmup.json").exists():
            return _load(path, config)
        model, tokenizer, world, bank = build_untrained(config)
        if initial_ulp_noise:
            perturb_ulp(model, config.seed)
        report = run_warmup(model, tokenizer, world, bank, config, progress=progress)
        _save(model, tokenizer, config, report, path)
    return WarmStart(model, tokenizer, world, config, path, from_cache=False, report=report)

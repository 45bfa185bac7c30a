"""A fixed synthetic rollout batch and a benchmark model (Qwen3 architecture, random weights).

The shapes imitate the paper's setting scaled down (docs/spec.md section 6: ~300-token student prompts,
~500-token teacher prompts, 1024 completion tokens, K = 8 teachers): for T completion tokens a student
prompt has 0.25-0.35 T tokens, a teacher prompt is its own guidance (0.15-0.25 T tokens) followed by the
student prompt (docs/spec.md section 2: the skill text comes first), and completions have T/2..T tokens with
the first rollout at the full T (a truncated rollout, as in the paper where many hit the limit).

The default model (hidden 512, 4 layers, V = 8192) keeps the paper model's balance at a size that
runs in seconds on 2 CPU cores: the LM head is ~25% of the FLOPs (Qwen3-1.7B: ~18%) and full-vocabulary
fp32 logits per token weigh about as much as the saved activations per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgsd.tiny import ModelShape, tiny_qwen3_config

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3ForCausalLM

PAD_ID = 0


# The benchmark model (`sgsd.tiny.ModelShape`): see the module docstring.
BENCH_MODEL = ModelShape(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                         vocab_size=8192)
MIN_VOCAB = 16  # synthetic token ids are drawn from [1, V): V must leave room next to the pad id


@dataclass(frozen=True)
class BatchShape:
    """B rollouts (default 1: the paper's micro-batch per device), K teachers each, T completion tokens
    (the longest completion)."""

    rollouts: int = 1
    teachers: int = 8
    completion_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rollouts < 1 or self.teachers < 1 or self.completion_tokens < 2:
            raise ValueError(f"need rollouts >= 1, teachers >= 1, completion_tokens >= 2: {self}")


@dataclass(frozen=True)
class SyntheticBatch:
    """One generation batch as the loss phase receives it.

    student_prompt_ids: B lists of token ids; teacher_prompt_ids: B x K lists (guidance_k + student prompt);
    completion_ids / completion_mask: [B, T] right-padded (mask 1 = generated token);
    counted_mask: [B, T] bool m_t (completion tokens that count; ~5% excluded like newline-only tokens);
    rewards: [B] in {0, 1} (alternating, first success); teacher_weights: [B, K] softmax of random scores.
    """

    student_prompt_ids: list[list[int]]
    teacher_prompt_ids: list[list[list[int]]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    counted_mask: torch.Tensor
    rewards: torch.Tensor
    teacher_weights: torch.Tensor

    @property
    def num_rollouts(self) -> int:
        return len(self.student_prompt_ids)

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_prompt_ids[0])

    def to(self, device: torch.device | str) -> "SyntheticBatch":
        return SyntheticBatch(
            self.student_prompt_ids, self.teacher_prompt_ids, self.completion_ids.to(device),
            self.completion_mask.to(device), self.counted_mask.to(device), self.rewards.to(device),
            self.teacher_weights.to(device),
        )


def make_batch(shape: BatchShape, vocab: int) -> SyntheticBatch:
    """The seeded synthetic batch of `shape` with token ids in [1, vocab) (0 is the pad id)."""
    import torch

    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB} (synthetic token ids avoid the pad id), got {vocab}")
    g = torch.Generator().manual_seed(shape.seed)
    t = shape.completion_tokens

    def draw(low: float, high: float) -> int:
        lo, hi = max(int(low * t), 1), max(int(high * t), 1)
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def tokens(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    students, teachers = [], []
    for _ in range(shape.rollouts):
        student = tokens(draw(0.25, 0.35))
        students.append(student)
        teachers.append([tokens(draw(0.15, 0.25)) + student for _ in range(shape.teachers)])
    lengths = [t] + [draw(0.5, 1.0) for _ in range(shape.rollouts - 1)]
    completion_ids = torch.full((shape.rollouts, t), PAD_ID, dtype=torch.long)
    completion_mask = torch.zeros((shape.rollouts, t), dtype=torch.long)
    for row, n in enumerate(lengths):
        completion_ids[row, :n] = torch.randint(1, vocab, (n,), generator=g)
        completion_mask[row, :n] = 1
    counted = completion_mask.bool() & (torch.rand((shape.rollouts, t), generator=g) > 0.05)
    rewards = torch.tensor([float(row % 2 == 0) for row in range(shape.rollouts)])
    weights = torch.randn((shape.rollouts, shape.teachers), generator=g).softmax(-1)
    return SyntheticBatch(students, teachers, completion_ids, completion_mask, counted, rewards, weights)


def build_model(shape: ModelShape, *, max_positions: int, seed: int = 0, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", init_std: float = 0.1) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM with random weights, deterministic given `seed`, in train mode.

    `init_std` is larger than Qwen3's 0.02 so that teacher prompts move the log-probs enough for
    non-trivial polarities (a near-uniform model makes every teacher neutral); it changes no cost.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(shape, max_positions=max_positions, pad_token_id=PAD_ID)
    config.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).train()


def max_sequence_length(batch: SyntheticBatch) -> int:
    """Longest prompt + completion of the batch (model position budget)."""
    prompt = max(len(p) for rows in batch.teacher_prompt_ids for p in rows)
    return prompt + int(batch.completion_ids.size(1))

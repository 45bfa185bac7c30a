"""Analytic FLOP and memory counts of the SGSD loss phase (real and naive paths), for any model size.

Counts follow the code in `sgsd.benchmarking.phases`: every token of every row the code actually runs
(padding included) passes through the decoder weights (2 FLOPs per weight and token forward, 4 more
backward for the input and weight gradients) and causal attention (2 x 2 x q_width x context / 2 per
token and layer forward); the LM head runs on the positions each path scores. The real path's student
head is checkpointed (forward, recompute, backward: 8 FLOPs per weight and token); the naive path runs
the head on every position of every row. Norms, rotary, softmax and the loss are left out (under 2%).
Used by `sgsd bench step` (achieved GFLOP/s) and `sgsd bench estimate` (paper scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sgsd.benchmarking.synthetic import SyntheticBatch
from sgsd.tiny import ModelShape

# Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B): tied embeddings, so its LM head is the embedding matrix.
QWEN3_1_7B = ModelShape(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                        vocab_size=151936)
QWEN3_1_7B_HEAD_DIM = 128  # Qwen3 uses head_dim 128 (q width 2048 = 16 x 128)


@dataclass(frozen=True)
class RowGroup:
    """`rows` sequences of `length` tokens (padding included), of which `scored` positions go through the head."""

    rows: int
    length: int
    scored: int


def _forward_flops(shape: ModelShape, group: RowGroup, *, head_positions: int | None = None) -> float:
    layer_params, head_params = shape.parameter_counts()
    q_width = shape.hidden_size  # tiny_qwen3_config: head_dim = hidden / heads
    tokens = group.rows * group.length
    # causal: QK and AV, half of the square
    attention = 2.0 * shape.num_layers * q_width * group.length * group.length * group.rows
    head = 2.0 * head_params * group.rows * (group.scored if head_positions is None else head_positions)
    return 2.0 * layer_params * tokens + attention + head


def _sgsd_groups(batch: SyntheticBatch, *, teacher_batch_rows: int) -> tuple[list[RowGroup], int, list[int]]:
    """Teacher row groups as `score_teachers` batches them; (groups, student prompt width, completion lengths)."""
    lengths = batch.completion_mask.long().sum(-1).tolist()
    rows = sorted(((len(p) + lengths[i], len(p), lengths[i]) for i, row in enumerate(batch.teacher_prompt_ids)
                   for p in row))
    groups = []
    for start in range(0, len(rows), max(teacher_batch_rows, 1)):
        chunk = rows[start : start + teacher_batch_rows]
        width, completion = max(r[1] for r in chunk), max(max(r[2] for r in chunk), 1)
        groups.append(RowGroup(len(chunk), width + completion, completion))
    return groups, max(len(p) for p in batch.student_prompt_ids), lengths


def teacher_padding_fraction(batch: SyntheticBatch, *, teacher_batch_rows: int = 16) -> float:
    """Share of the token slots of the real path's teacher forwards that are padding: the most a
    padding-free (packed) teacher batch could save of the teacher cost."""
    groups, _, lengths = _sgsd_groups(batch, teacher_batch_rows=teacher_batch_rows)
    real = sum(len(p) + lengths[i] for i, rows in enumerate(batch.teacher_prompt_ids) for p in rows)
    slots = sum(g.rows * g.length for g in groups)
    return 1.0 - real / slots if slots else 0.0


def phase_flops(shape: ModelShape, batch: SyntheticBatch, *, naive: bool, teacher_batch_rows: int = 16,
                active_rollouts: int | None = None, skip_neutral_rows: bool = False) -> float:
    """Matmul FLOPs of one loss phase on `batch` (module docstring)."""
    b, k, t = batch.num_rollouts, batch.num_teachers, int(batch.completion_ids.size(1))
    if naive:
        student_width = max(len(p) for p in batch.student_prompt_ids)
        teacher_width = max(len(p) for rows in batch.teacher_prompt_ids for p in rows)
        student = RowGroup(b * k, student_width + t, student_width + t)
        teacher = RowGroup(b * k, teacher_width + t, teacher_width + t)
        return 3.0 * _forward_flops(shape, student) + _forward_flops(shape, teacher)
    groups, student_width, lengths = _sgsd_groups(batch, teacher_batch_rows=teacher_batch_rows)
    teachers = sum(_forward_flops(shape, g) for g in groups)
    if skip_neutral_rows:  # `active_rollouts`: one gradient-free student pass over every rollout, full T
        teachers += _forward_flops(shape, RowGroup(b, student_width + t, t))
    active = b if active_rollouts is None else max(active_rollouts, 1)
    completion = max(sorted(lengths)[-active:])  # upper bound when not every rollout is active
    student = RowGroup(active, student_width + completion, completion)
    _, head_params = shape.parameter_counts()
    head_recompute = 2.0 * head_params * student.rows * student.scored  # the checkpointed head runs twice
    return 3.0 * _forward_flops(shape, student) + head_recompute + teachers


@dataclass(frozen=True)
class PaperScaleEstimate:
    """One micro-step of one rollout at paper scale (docs/spec.md section 6), FLOPs in TFLOP, memory in GB."""

    student_tflop: float  # one student forward + backward
    teachers_tflop: float  # K teacher forwards
    real_tflop: float
    naive_tflop: float
    naive_over_real: float
    naive_logits_gb: float  # full-vocabulary tensors of the naive path (list in `logit_tensors`)
    logit_tensors: Sequence[str]
    teacher_chunk_buffer_gb: float  # one fp32 [chunk, V] buffer of the real path's teacher scoring
    student_chunk_buffer_gb: float  # the same for the student's chunk (min(chunk, B x T) rows)
    head_peak_gb: float  # the chunked LM head (`sgsd.lm_head`) holds one buffer at a time: the larger one
    real_activations_gb: float  # decoder activations kept for the student backward: B rows
    naive_activations_gb: float  # the same for B x K student rows


def paper_scale_estimate(*, teachers: int = 8, completion_tokens: int = 1024, student_prompt: int = 300,
                         teacher_prompt: int = 500, rollouts: int = 1, chunk_tokens: int = 4096,
                         logit_bytes: int = 2, shape: ModelShape = QWEN3_1_7B,
                         head_dim: int = QWEN3_1_7B_HEAD_DIM) -> PaperScaleEstimate:
    """FLOPs and logit memory of the loss phase for Qwen3-1.7B-like sizes.

    FLOPs are those of full fine-tuning (with LoRA the weight-gradient half of the backward mostly
    disappears, for both paths alike). Naive memory: the model's logits in `logit_bytes` (2: bf16, the
    paper's precision) and the fp32 log-softmax of the completion positions, student and teacher rows.
    Real path: `chunk_tokens` rows of fp32 logits at a time; `sgsd.lm_head.token_logprobs` holds one
    such buffer, with and without gradient (measured on CPU, tests/test_lm_head.py).
    Activations saved for the backward: 34 x hidden bytes per token and layer (16-bit, fused attention,
    no recomputation; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", section 4.1), for the student rows only (teachers run without gradient).
    """
    attention_params = shape.hidden_size * head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    layer_params = shape.num_layers * (attention_params + 3 * shape.hidden_size * shape.intermediate_size)
    head_params = shape.hidden_size * shape.vocab_size
    q_width = head_dim * shape.num_heads

    def forward(rows: int, length: int, scored: int) -> float:
        attention = 2.0 * shape.num_layers * q_width * length * length * rows
        return 2.0 * layer_params * rows * length + attention + 2.0 * head_params * rows * scored

    t, b, k = completion_tokens, rollouts, teachers
    student = 3.0 * forward(b, student_prompt + t, t) + 2.0 * head_params * b * t
    teacher = forward(b * k, teacher_prompt + t, t)
    naive = 3.0 * forward(b * k, student_prompt + t, student_prompt + t) + forward(
        b * k, teacher_prompt + t, teacher_prompt + t)
    v4, vl = shape.vocab_size * 4.0, shape.vocab_size * float(logit_bytes)
    tensors = [
        f"student logits [B K, P_s + T, V] = {b * k} x {student_prompt + t} x {shape.vocab_size} x {logit_bytes} B",
        f"student log-softmax fp32 [B K, T, V] (saved for backward) = {b * k} x {t} x {shape.vocab_size} x 4 B",
        f"teacher logits [B K, P_t + T, V] = {b * k} x {teacher_prompt + t} x {shape.vocab_size} x {logit_bytes} B",
        f"teacher log-softmax fp32 [B K, T, V] = {b * k} x {t} x {shape.vocab_size} x 4 B",
    ]
    naive_bytes = b * k * (vl * (student_prompt + t + teacher_prompt + t) + v4 * 2 * t)
    teacher_buffer = min(chunk_tokens, b * k * t) * v4
    student_buffer = min(chunk_tokens, b * t) * v4
    activations_per_row = 34.0 * shape.hidden_size * shape.num_layers * (student_prompt + t)
    return PaperScaleEstimate(
        student_tflop=student / 1e12, teachers_tflop=teacher / 1e12, real_tflop=(student + teacher) / 1e12,
        naive_tflop=naive / 1e12, naive_over_real=naive / (student + teacher),
        naive_logits_gb=naive_bytes / 1e9, logit_tensors=tensors, teacher_chunk_buffer_gb=teacher_buffer / 1e9,
        student_chunk_buffer_gb=student_buffer / 1e9,
        head_peak_gb=max(teacher_buffer, student_buffer) / 1e9,
        real_activations_gb=b * activations_per_row / 1e9, naive_activations_gb=b * k * activations_per_row / 1e9,
    )

"""The SGSD loss's settings, beside the math that reads them (`sgsd.objectives`): one frozen, torch-free
object with the paper's defaults and the bounds that make them meaningful (docs/spec.md section 4).

The YAML section `sgsd:` is this object (same keys, `sgsd.config` builds it), and `sgsd_loss`,
`teacher_polarity`, the loss phase, the trainer, the benchmarks and the demo take it whole
(`settings=`). `problems()` lists what is wrong with a value, one message each, in the form every
settings section of the config uses.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import ClassVar, Literal

from sgsd.bounds import Bound, SettingsError, above, at_least, between, bound_problems

# how a teacher's sign is decided (`sgsd.objectives.teacher_polarity`): the paper's |support| > theta, or a z test
PolarityTest = Literal["threshold", "z"]
TeacherWeights = Literal["live", "base", "ema"]
TEACHER_WEIGHTS: tuple[str, ...] = typing.get_args(TeacherWeights)
# the control teacher (docs/methods.md, "Controlled polarity"): none = the paper; neutral: a content-free block of
# the skill blocks' token length; shuffled: a (skill, mistake) pair of the bank not retrieved for the problem
PolarityControl = Literal["none", "neutral", "shuffled"]
# which engine computes the live teacher's log-probs: the trainer's model, or the colocated vLLM engine
TeacherEngine = Literal["trainer", "vllm"]
POLARITY_CONTROLS: tuple[str, ...] = ("none", "neutral", "shuffled")


@dataclass(frozen=True)
class TeacherWeightSettings:
    """The teacher's weights and the LM-head chunking of its log-probs, declared once for every method that
    scores with a teacher (the `sgsd` and `opsd` sections): `teacher` (which weights score: the live policy,
    the base model, or an EMA of the policy with `ema_decay`), and the rows per chunk of the full-vocabulary
    log-softmax (`logprob_chunk_tokens`; 0: as many as fit one fp32 [chunk, V] buffer of `logprob_chunk_mb`
    MiB). Each section sets its own defaults (SGSD scores with the live policy, OPSD with the base model).
    """

    teacher: TeacherWeights = "live"
    ema_decay: float = 0.99
    logprob_chunk_tokens: int = 0
    logprob_chunk_mb: int = 1024

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "ema_decay": between(0, 1, high_open=True, hint="teacher: ema; 0 follows the live weights"),
        "logprob_chunk_tokens": at_least(0, "0: as many rows as fit logprob_chunk_mb"),
        "logprob_chunk_mb": at_least(1)}

    def weight_problems(self, where: str) -> list[str]:
        """What is wrong with the fields declared here besides their bounds (the teacher's name)."""
        if self.teacher not in TEACHER_WEIGHTS:
            return [f"{where}.teacher: expected 'live', 'base' or 'ema', got {self.teacher!r}"]
        return []

    def chunk_tokens(self, vocab_size: int) -> int:
        """Rows per LM-head chunk for a vocabulary of `vocab_size` (`sgsd.lm_head.resolve_chunk_tokens`)."""
        from sgsd.lm_head import resolve_chunk_tokens  # torch: this module stays torch-free

        return resolve_chunk_tokens(self.logprob_chunk_tokens, self.logprob_chunk_mb, vocab_size)


@dataclass(frozen=True)
class SGSDSettings(TeacherWeightSettings):
    """docs/spec.md section 4 (paper values).

    Loss: `gate_tau` (tau of the gate ln 2 - softplus(-d^2 / 2 tau)), `clip_delta` (C, the clip of d in
    the support), `confidence_threshold` (theta: a teacher's sign counts when |support| > theta) or,
    with `polarity_test: z`, `polarity_z` (|mean clipped d| / its standard error over the counted tokens,
    which does not depend on the completion length), `local_support_top_k` (0: full vocabulary, the
    paper; k' > 0: the local-support variant). Teachers: `num_teachers` (K rank-aligned (skill, mistake)
    pairs per problem) and `teacher` (which weights score as teacher: the live policy = paper, the base
    model, or an EMA with `ema_decay`). Cost: `teacher_batch_size` rows per teacher forward (rollouts x
    teachers flattened), LM-head chunking (`logprob_chunk_tokens` rows; 0: as many as fit one fp32
    [chunk, V] buffer of `logprob_chunk_mb`; Qwen3's V = 151,936: 1 GiB is ~1,177 rows), and
    `skip_neutral_rows` (skip the student backward of rollouts whose teachers are all neutral), and
    `prefix_reuse` (teacher rows that start with the same tokens share one forward of that prefix and its
    keys and values, `sgsd.prefix_cache`; equal up to float summation order; off by itself where not exact:
    `sgsd.prefix_cache.reuse_blocker`; false: every row runs in full). `teacher_engine` (trainer: the
    trainer's model scores the teachers; vllm: the colocated vLLM engine, which holds the policy's synced
    weights, scores the live teacher and the controls with `prompt_logprobs` on token ids; needs
    `generation.use_vllm` in colocate mode, `teacher: live` and the full-vocabulary loss; its log-probs differ
    from the trainer's by the two engines' rounding, docs/performance.md "Scoring teachers in vLLM").
    Control: `polarity_control` (none: the paper; neutral / shuffled: one more teacher forward per
    rollout whose log-probs c_t replace the student's p_t in the polarity test and in the gate's
    target, docs/methods.md "Controlled polarity").
    """

    num_teachers: int = 8
    gate_tau: float = 1.0
    clip_delta: float = 3.0
    confidence_threshold: float = 0.05
    polarity_test: PolarityTest = "threshold"
    polarity_z: float = 1.96
    local_support_top_k: int = 0
    teacher: TeacherWeights = "live"
    teacher_batch_size: int = 16
    skip_neutral_rows: bool = False
    polarity_control: PolarityControl = "none"
    prefix_reuse: bool = True
    teacher_engine: TeacherEngine = "trainer"

    BOUNDS: ClassVar[dict[str, Bound]] = {
        **TeacherWeightSettings.BOUNDS,
        "num_teachers": at_least(1), "gate_tau": above(0), "clip_delta": above(0),
        "confidence_threshold": at_least(0, "0: every nonzero support counts"),
        "polarity_z": above(0, "1.96: two-sided 5% test"), "local_support_top_k": at_least(0, "0 = full vocabulary"),
        "teacher_batch_size": at_least(1, "rows per teacher forward")}

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError("; ".join(problems))

    def problems(self, where: str = "sgsd") -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        out = bound_problems(self, where)
        if self.polarity_test not in ("threshold", "z"):
            out.append(f"{where}.polarity_test: expected 'threshold' or 'z', got {self.polarity_test!r}")
        out += self.weight_problems(where)
        if self.local_support_top_k > 0 and self.skip_neutral_rows:
            out.append(f"{where}.skip_neutral_rows: not available with the local-support variant "
                       "(local_support_top_k > 0); set skip_neutral_rows=false")
        if self.polarity_control not in POLARITY_CONTROLS:
            out.append(f"{where}.polarity_control: expected one of {', '.join(POLARITY_CONTROLS)}, "
                       f"got {self.polarity_control!r}")
        elif self.polarity_control != "none" and self.local_support_top_k > 0:
            out.append(f"{where}.polarity_control: not available with the local-support variant "
                       "(local_support_top_k > 0); set polarity_control=none or local_support_top_k=0")
        out += self.teacher_engine_problems(where)
        return out

    def teacher_engine_problems(self, where: str = "sgsd") -> list[str]:
        """What `teacher_engine` refuses within this section (the generation settings it needs are checked
        with the whole config: `sgsd.methods`)."""
        if self.teacher_engine not in ("trainer", "vllm"):
            return [f"{where}.teacher_engine: expected 'trainer' or 'vllm', got {self.teacher_engine!r}"]
        if self.teacher_engine == "trainer":
            return []
        out = []
        if self.teacher != "live":
            out.append(f"{where}.teacher_engine=vllm scores with the engine's weights, the live policy's; "
                       f"{where}.teacher={self.teacher} needs other weights: use {where}.teacher_engine=trainer "
                       f"(or {where}.teacher=live)")
        if self.local_support_top_k > 0:
            out.append(f"{where}.teacher_engine=vllm returns the sampled token's log-prob only, the local-support "
                       f"variant needs each position's top-k: use {where}.teacher_engine=trainer "
                       f"(or {where}.local_support_top_k=0)")
        return out

    def check(self, where: str = "sgsd") -> "SGSDSettings":
        """`self` (built, so checked: `__post_init__`); kept for callers of the pure functions."""
        return self

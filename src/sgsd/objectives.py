"""Pure loss functions: the SGSD objective (docs/spec.md section 4) and the OPSD baseline losses (docs/spec.md section 5).

Every function maps tensors to tensors; hyper-parameters are keyword-only with the paper's defaults (the
SGSD loss's travel whole as one `sgsd.loss_settings.SGSDSettings`, `settings=`, whose `check()` holds
their bounds). Nothing here reads a config file, logs, calls a model, synchronises with the host (`.item()`) or keeps
state, so the trainer can call the functions on chunks and the tests can call them on hand-made
tensors (the style of verl's `core_algos.py` and torchtune's `rlhf/loss/ppo.py`).

Shapes: B rollouts, K teachers, T completion tokens, V vocabulary. A completion mask is True for the
tokens that count (the caller has already excluded padding, special, think-tag and newline-only
tokens: it is the m_t of docs/spec.md section 4). Arithmetic runs in float32, or float64 when the inputs are float64
(bf16/fp16 inputs are upcast; gradients flow back in the input dtype). Values at masked-out positions
and of absent teachers are never read (they may be garbage, even inf/NaN, in the log-prob inputs).
Metrics are detached 0-d float tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sgsd.loss_settings import SGSDSettings

LN2 = math.log(2.0)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """sum(values where mask) / max(count(mask), 1) over `dim` (all dims when None).

    `mask` (bool) broadcasts against `values`. An empty mask gives 0, never NaN; positions outside
    the mask receive exactly zero gradient even if `values` is inf/NaN there.
    """
    mask = mask.expand_as(values)
    zero = values.new_zeros(())
    dims = tuple(range(values.dim())) if dim is None else dim
    total = torch.where(mask, values, zero).sum(dim=dims)
    count = mask.sum(dim=dims).clamp_min(1).to(values.dtype)
    return total / count


def gate(d: torch.Tensor, tau: float = SGSDSettings.gate_tau) -> torch.Tensor:
    """SGSD gate l(d) = ln 2 - softplus(-d^2 / (2 tau)) (docs/spec.md section 4), elementwise.

    Even, l(0) = 0, increasing in |d| towards ln 2 (never reached). dl/dd = sigmoid(-d^2/2tau) * d/tau,
    so the gradient w.r.t. the student log-prob p (d = q - p) is -sigmoid(-d^2/2tau) * d/tau: largest
    near |d| = 1.2 sqrt(tau), vanishing for both small and extreme disagreement.
    """
    if not tau > 0:
        raise ValueError(f"gate: tau must be > 0, got {tau}")
    return LN2 - F.softplus(-d.square() / (2.0 * tau))


@dataclass(frozen=True)
class SGSDLossOutput:
    """Result of `sgsd_loss`.

    loss: 0-d; gradient flows to student_logps (and token_divergence when given) only.
    polarity: [B, K] int64 rho_k in {-1, 0, +1}; 0 for absent teachers.
    support: [B, K] detached clipped mean support (0 for absent teachers).
    metrics: detached 0-d float tensors, keys listed in `SGSD_METRIC_KEYS`.
    """

    loss: torch.Tensor
    polarity: torch.Tensor
    support: torch.Tensor
    metrics: dict[str, torch.Tensor]


SGSD_METRIC_KEYS = (
    "support_mean", "support_raw_mean", "row_loss_mean", "mask_keep_fraction", "clip_fraction",
    "helpful_fraction", "harmful_fraction", "neutral_fraction", "below_threshold_fraction",
    "quadrant_helpful", "quadrant_over_suppressive", "quadrant_misleading", "quadrant_warning",
    "success_rate",
)  # fmt: skip


def _check_sgsd_shapes(student_logps, teacher_logps, completion_mask, rewards, teacher_weights) -> None:
    if teacher_logps.dim() != 3:
        raise ValueError(f"teacher_logps must be [B, K, T], got shape {tuple(teacher_logps.shape)}")
    b, k, t = teacher_logps.shape
    expected = {
        "completion_mask": ((b, t),),
        "rewards": ((b,),),
        "teacher_weights": ((b, k),),
        "student_logps": ((b, t), (b, k, t)),
    }
    given = {
        "completion_mask": completion_mask,
        "rewards": rewards,
        "teacher_weights": teacher_weights,
        "student_logps": student_logps,
    }
    for name, shapes in expected.items():
        if tuple(given[name].shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(
                f"{name} must have shape {want} (from teacher_logps [B, K, T]), got {tuple(given[name].shape)}"
            )


def _check_control(settings: SGSDSettings, control_logps, student_logps, teacher_logps) -> None:
    if (settings.polarity_control == "none") != (control_logps is None):
        raise ValueError(f"control_logps must be given exactly when settings.polarity_control is not 'none' "
                         f"(polarity_control={settings.polarity_control!r}, control_logps "
                         f"{'missing' if control_logps is None else 'given'})")
    if control_logps is None:
        return
    b, _, t = teacher_logps.shape
    if tuple(control_logps.shape) != (b, t) or student_logps.dim() != 2:
        raise ValueError(f"control_logps must have shape {(b, t)} with student_logps [B, T] (the control is not "
                         f"available in local-support mode), got {tuple(control_logps.shape)} and "
                         f"{tuple(student_logps.shape)}")


def _disagreement(student_logps, teacher_logps, completion_mask, teacher_weights, control_logps=None):
    """d = q - p as [B, K, T] in the compute dtype, zero (not garbage) outside the valid tokens.

    With `control_logps` c [B, T] (the control teacher, detached): d = (q - c) + (sg(p) - p), whose value
    is exactly q - c (sg(p) - p is exactly 0) and whose derivative in p is -1 as without the control: the
    gate then pulls p towards the contrastive target sg(p) + q - c (docs/methods.md "Controlled polarity").
    Returns (d, valid [B, K, T] = mask & teacher present, present [B, K]).
    """
    dtype = _compute_dtype(student_logps, teacher_logps)
    present = teacher_weights > 0
    mask = completion_mask.bool()
    valid = mask[:, None, :] & present[:, :, None]
    p = student_logps.to(dtype)
    p = p[:, None, :] if p.dim() == 2 else p
    zero = p.new_zeros(())
    # where() before the subtraction: padding may hold inf/NaN, and where() after an op would still
    # let a NaN local derivative poison the backward (0 * NaN).
    q = torch.where(valid, teacher_logps.detach().to(dtype), zero)
    p = torch.where(valid, p, zero)
    if control_logps is None:
        return q - p, valid, present
    c = torch.where(valid, control_logps.detach().to(dtype)[:, None, :], zero)
    return (q - c) + (p.detach() - p), valid, present


def _support(d: torch.Tensor, mask: torch.Tensor, clip_delta: float) -> torch.Tensor:
    """support_k = (1/n) sum_t m_t clip(d_kt, -C, C), n = max(sum_t m_t, 1): [B, K]."""
    return masked_mean(d.clamp(-clip_delta, clip_delta), mask[:, None, :], dim=-1)


def support_z(d: torch.Tensor, mask: torch.Tensor, clip_delta: float) -> torch.Tensor:
    """z statistic of each teacher's clipped support, [B, K], detached: |mean| / (s / sqrt(n)).

    d [B, K, T] (zero outside the valid tokens, as `_disagreement` returns it), mask [B, T] (m_t);
    mean and s are the mean and the sample standard deviation (n - 1 in the denominator) of
    clip(d_kt, -C, C) over the n counted tokens. m tokens that disagree by a among n otherwise agreeing
    ones give z = sqrt(m (n - 1) / (n - m)) >= sqrt(m), whatever n is, where the mean a m / n shrinks
    with n. Edge cases, chosen so that no sign is decided without evidence:
    - n < 2 (no or one counted token): the spread is unknown, z = 0 (neutral);
    - mean exactly 0: z = 0;
    - zero spread with a non-zero mean (every counted token has the same clipped d, e.g. all clipped at
      +C): z = +inf, the sign counts.
    """
    with torch.no_grad():
        clipped = d.clamp(-clip_delta, clip_delta)
        counted = mask[:, None, :]
        n = counted.sum(dim=-1).to(clipped.dtype)  # [B, 1]
        mean = masked_mean(clipped, counted, dim=-1)  # [B, K]
        deviation = torch.where(counted, clipped - mean[..., None], clipped.new_zeros(()))
        variance = deviation.square().sum(dim=-1) / (n - 1).clamp_min(1)
        z = mean.abs() / (variance / n.clamp_min(1)).sqrt()  # +inf when variance = 0 < |mean|, NaN for 0/0
        zero = torch.zeros_like(z)
        return torch.where((n >= 2) & (mean != 0), z, zero)


def _polarity(support, rewards, present, confident):
    """(sign_k, rho_k) as int64 [B, K]: sign(support) where `confident` [B, K] bool, else 0; both 0 for
    absent teachers."""
    sign = torch.where(confident, torch.sign(support), torch.zeros_like(support))
    sign = torch.where(present, sign, torch.zeros_like(sign)).long()
    outcome = torch.where(rewards > 0, 1, -1).to(sign.device)
    return sign, outcome[:, None] * sign


def _confidence(d, mask, support, settings: SGSDSettings):
    """[B, K] bool: whether each teacher's sign counts. threshold: |support| > theta (strict, the paper's
    rule); z: `support_z` > polarity_z (strict; theta is not used)."""
    if settings.polarity_test == "z":
        return support_z(d, mask, settings.clip_delta) > settings.polarity_z
    return support.abs() > settings.confidence_threshold


def teacher_polarity(
    student_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    settings: SGSDSettings = SGSDSettings(),
    control_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped support and polarity of each teacher (docs/spec.md section 4), without gradient.

    Args: student_logps [B, T] (or [B, K, T] local-support log-probs), teacher_logps [B, K, T],
    completion_mask [B, T] (m_t), rewards [B] (success iff > 0), teacher_weights [B, K] (<= 0 = absent).
    settings: C (`clip_delta`) and the polarity test (`polarity_test`, `confidence_threshold`,
    `polarity_z`; see `sgsd_loss`), checked with `SGSDSettings.check`. control_logps: [B, T] log-probs of
    the control teacher, given exactly when `settings.polarity_control` is not "none" (see `sgsd_loss`).
    Returns (support [B, K] float, polarity [B, K] int64 in {-1, 0, +1}), both detached. The trainer
    can call this before the student backward and skip rollouts whose polarity row is all zero.
    """
    _check_sgsd_shapes(student_logps, teacher_logps, completion_mask, rewards, teacher_weights)
    settings.check()
    _check_control(settings, control_logps, student_logps, teacher_logps)
    with torch.no_grad():
        mask = completion_mask.bool()
        d, _, present = _disagreement(student_logps, teacher_logps, completion_mask, teacher_weights, control_logps)
        support = _support(d, mask, settings.clip_delta)
        confident = _confidence(d, mask, support, settings)
        _, rho = _polarity(support, rewards, present, confident)
    return support, rho


def sgsd_loss(
    student_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    settings: SGSDSettings = SGSDSettings(),
    token_divergence: torch.Tensor | None = None,
    control_logps: torch.Tensor | None = None,
) -> SGSDLossOutput:
    """SGSD objective (docs/spec.md section 4; Huang et al., arXiv 2605.28791).

    d_kt = q_kt - p_t; n = max(sum_t m_t, 1); support_k = (1/n) sum_t m_t clip(d_kt, -C, C);
    sign_k = sign(support_k) if the polarity test passes else 0; rho_k = (+1 if reward > 0 else -1) * sign_k;
    row_k = (1/n) sum_t m_t l(d_kt) with the gate l on the UNclipped d;
    L = sum_k a_k rho_k row_k per rollout; loss = mean over the B rollouts.

    Args:
        student_logps: [B, T] log pi_theta(y_t | student prompt), or [B, K, T] in local-support mode
            (`local_support_terms`). Carries the gradient.
        teacher_logps: [B, K, T] log-probs of the same tokens under teacher k. Detached.
        completion_mask: [B, T] bool m_t (any dtype is read as != 0).
        rewards: [B]; success iff > 0.
        teacher_weights: [B, K] a_k; a_k <= 0 (or NaN) marks an absent teacher (polarity 0, no loss,
            left out of the fractions; its teacher_logps are never read).
        settings: `SGSDSettings` (checked with its `check()`); read here: `gate_tau`, `clip_delta`,
            `confidence_threshold` (tau, C, theta) and the polarity test. `polarity_test`: "threshold"
            (the paper's rule): |support_k| > theta. "z": support_z > polarity_z, with support_z =
            |mean| / (s / sqrt(n)) of the clipped d over the n counted tokens (`support_z`; n < 2 is
            neutral), so a disagreement of m tokens keeps z ~ sqrt(m) however long the completion is,
            where the mean shrinks as m / n; theta is then not used. The metric
            `below_threshold_fraction` counts the teachers whose test did not pass.
        token_divergence: optional [B, K, T] (local-support D_kt) that replaces d inside the gate;
            gradient flows through it. With it, the loss does not depend on student_logps, which then
            only decide the polarity.
        control_logps: [B, T] log c_t of the control teacher (`settings.polarity_control` neutral or
            shuffled; given exactly then, detached). d_kt becomes q_kt - c_t in the support and the
            polarity test, and the gate acts on (q_kt - c_t) + (sg(p_t) - p_t): value l(q_kt - c_t),
            gradient in p_t as without the control (docs/methods.md "Controlled polarity").
    Sign, rho, weights, mask and teacher values are constants. Rows with rho = 0 contribute exactly
    zero gradient. |loss| <= ln 2 * max_b sum_k a_bk.
    """
    _check_sgsd_shapes(student_logps, teacher_logps, completion_mask, rewards, teacher_weights)
    settings.check()
    _check_control(settings, control_logps, student_logps, teacher_logps)
    if token_divergence is not None and tuple(token_divergence.shape) != tuple(teacher_logps.shape):
        raise ValueError(
            f"token_divergence must have the shape of teacher_logps {tuple(teacher_logps.shape)}, "
            f"got {tuple(token_divergence.shape)}"
        )
    mask = completion_mask.bool()
    d, valid, present = _disagreement(student_logps, teacher_logps, completion_mask, teacher_weights, control_logps)
    dtype = d.dtype
    with torch.no_grad():
        support = _support(d, mask, settings.clip_delta)
        confident = _confidence(d, mask, support, settings)
        sign, rho = _polarity(support, rewards, present, confident)
        # threshold: the expression of the paper's rule as it always was (NaN support counts as not below)
        below = support.abs() <= settings.confidence_threshold if settings.polarity_test == "threshold" else ~confident

    if token_divergence is None:
        gate_input = d
    else:
        gate_input = torch.where(valid, token_divergence.to(dtype), d.new_zeros(()))
    rows = masked_mean(gate(gate_input, settings.gate_tau), mask[:, None, :], dim=-1)  # [B, K]
    coefficient = (teacher_weights.detach().to(dtype) * rho.to(dtype)).masked_fill(~present, 0.0)
    loss = (coefficient * rows).sum(dim=-1).mean()

    with torch.no_grad():
        metrics = _sgsd_metrics(d, valid, mask, present, support, rows, sign, rho, rewards, settings.clip_delta, below)
    return SGSDLossOutput(loss=loss, polarity=rho, support=support.detach(), metrics=metrics)


def _sgsd_metrics(d, valid, mask, present, support, rows, sign, rho, rewards, clip_delta, below):
    """docs/spec.md section 4 diagnostics; fractions are over present teachers (0 when there are none)."""
    success = (rewards > 0)[:, None].expand_as(present)
    fraction = {
        "helpful_fraction": rho > 0,
        "harmful_fraction": rho < 0,
        "neutral_fraction": rho == 0,
        "below_threshold_fraction": below,
        "quadrant_helpful": success & (sign > 0),
        "quadrant_over_suppressive": success & (sign < 0),
        "quadrant_misleading": ~success & (sign > 0),
        "quadrant_warning": ~success & (sign < 0),
    }
    metrics = {
        "support_mean": masked_mean(support, present),
        "support_raw_mean": masked_mean(masked_mean(d, mask[:, None, :], dim=-1), present),
        "row_loss_mean": masked_mean(rows.detach(), present),
        "mask_keep_fraction": mask.float().mean() if mask.numel() else mask.new_zeros((), dtype=torch.float32),
        "clip_fraction": masked_mean((d.abs() > clip_delta).to(d.dtype), valid),
        "success_rate": (rewards > 0).float().mean(),
    }
    metrics.update({name: masked_mean(flag.to(d.dtype), present) for name, flag in fraction.items()})
    return {key: metrics[key].detach().float() for key in SGSD_METRIC_KEYS}


def local_support_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    *,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local-support SGSD terms (docs/spec.md section 4, option k' > 0).

    Per position and teacher k the support set S_kt = teacher k's top-k' tokens plus the sampled token
    (counted once if already among them). Student and teacher logits are renormalised on S_kt in fp32
    (fp64 for fp64 inputs).

    Args: student_logits [B, T, V] (gradient flows), teacher_logits [B, K, T, V] (detached),
    sampled_ids [B, T] int (y_t), top_k = k' in [1, V].
    Returns (student_logps [B, K, T], teacher_logps [B, K, T], divergence [B, K, T]): the renormalised
    log-probs of y_t, and D_kt = sum_{v in S_kt} q(v) (log q(v) - log p(v)) (forward KL, teacher
    detached). Purely per position: callers may chunk over T.
    """
    if student_logits.dim() != 3 or teacher_logits.dim() != 4:
        raise ValueError(
            f"student_logits must be [B, T, V] and teacher_logits [B, K, T, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, k, t, v = teacher_logits.shape
    if tuple(student_logits.shape) != (b, t, v) or tuple(sampled_ids.shape) != (b, t):
        raise ValueError(
            f"shapes disagree: teacher_logits {tuple(teacher_logits.shape)} [B, K, T, V], student_logits "
            f"{tuple(student_logits.shape)} (want {(b, t, v)}), sampled_ids {tuple(sampled_ids.shape)} (want {(b, t)})"
        )
    if not 1 <= top_k <= v:
        raise ValueError(f"top_k must be in [1, V={v}], got {top_k}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    teacher_logits = teacher_logits.detach()
    sampled = sampled_ids.long()[:, None, :, None].expand(b, k, t, 1)
    top_ids = teacher_logits.topk(top_k, dim=-1).indices  # [B, K, T, k']
    ids = torch.cat([top_ids, sampled], dim=-1)  # the last slot is always y_t
    in_set = torch.ones_like(ids, dtype=torch.bool)
    in_set[..., -1] = ~(top_ids == sampled).any(dim=-1)  # no double counting of y_t
    teacher_sel = teacher_logits.gather(-1, ids).to(dtype)
    student_sel = student_logits[:, None].expand(b, k, t, v).gather(-1, ids).to(dtype)
    minus_inf = teacher_sel.new_tensor(float("-inf"))
    teacher_lp = teacher_sel - torch.where(in_set, teacher_sel, minus_inf).logsumexp(dim=-1, keepdim=True)
    student_lp = student_sel - torch.where(in_set, student_sel, minus_inf).logsumexp(dim=-1, keepdim=True)
    terms = teacher_lp.exp() * (teacher_lp - student_lp)
    divergence = torch.where(in_set, terms, terms.new_zeros(())).sum(dim=-1)
    return student_lp[..., -1], teacher_lp[..., -1], divergence


@dataclass(frozen=True)
class OPSDLossOutput:
    """Result of `opsd_loss` / `opsd_sampled_token_loss`: loss (0-d, gradient to the student only) and
    detached 0-d metrics (keys in `OPSD_METRIC_KEYS` / `OPSD_SAMPLED_METRIC_KEYS`)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


OPSD_METRIC_KEYS = ("divergence_mean", "student_entropy_mean", "teacher_entropy_mean", "mask_keep_fraction")
OPSD_SAMPLED_METRIC_KEYS = ("divergence_mean", "reverse_kl_k3_mean", "mask_keep_fraction")


def _token_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float):
    """Per-token generalized JSD of rows [N, V] -> ([N] divergence, [N] student entropy, [N] teacher entropy).

    Same formula, branch for branch, as TRL's `GKDTrainer.generalized_jsd_loss` (F.kl_div(input,
    target, log_target=True) = sum exp(target) (target - input)); the entropies are detached.
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_lp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_lp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student_p, teacher_p = student_lp.exp(), teacher_lp.exp()
    if beta == 0:
        divergence = (teacher_p * (teacher_lp - student_lp)).sum(-1)
    elif beta == 1:
        divergence = (student_p * (student_lp - teacher_lp)).sum(-1)
    else:
        mixture_lp = torch.logaddexp(student_lp + math.log1p(-beta), teacher_lp + math.log(beta))
        divergence = beta * (teacher_p * (teacher_lp - mixture_lp)).sum(-1) + (1 - beta) * (
            student_p * (student_lp - mixture_lp)
        ).sum(-1)
    with torch.no_grad():
        student_entropy = -(student_p * student_lp).sum(-1)
        teacher_entropy = -(teacher_p * teacher_lp).sum(-1)
    return divergence, student_entropy, teacher_entropy


def opsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> OPSDLossOutput:
    """OPSD full-vocabulary loss (docs/spec.md section 5): generalized JSD, mean over the batch's completion tokens.

    Exactly TRL's `GKDTrainer.generalized_jsd_loss` (Agarwal et al., GKD, arXiv 2306.13649, eq. 1) with
    labels = completion mask and reduction "batchmean", i.e. sum_t m_t JSD_beta(t) / max(sum m, 1), where
    both logits are divided by `temperature` first and
      beta = 0: KL(teacher || student) (forward KL, OPSD's default),
      beta = 1: KL(student || teacher) (reverse KL),
      0 < beta < 1: beta KL(teacher || M) + (1 - beta) KL(student || M), M = beta teacher + (1 - beta) student.
    (As in TRL, beta -> 0 of the mixture form tends to 0, not to the forward KL: the end points are
    special cases.)

    Args: student_logits [B, T, V] (gradient flows), teacher_logits [B, T, V] (detached),
    completion_mask [B, T] (tokens that count). Logits must be finite at every position (padding too).
    Memory: positions are processed `chunk_size` at a time and each chunk is recomputed in the backward
    (activation checkpointing), so float32 [chunk_size, V] intermediates exist for one chunk at a time;
    the only full-size tensor created is the gradient of student_logits (in its own dtype).
    """
    if student_logits.dim() != 3 or tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(
            f"student_logits and teacher_logits must both be [B, T, V], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if tuple(completion_mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"completion_mask must be [B, T] = {tuple(student_logits.shape[:2])}, got {tuple(completion_mask.shape)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)
    teacher_rows = teacher_logits.detach().reshape(-1, vocab)
    recompute = torch.is_grad_enabled() and student_logits.requires_grad
    pieces = []
    # split (not slicing in a loop): its backward concatenates the chunk gradients once instead of
    # building a zero-padded full-size gradient per chunk.
    for rows in zip(student_rows.split(chunk_size), teacher_rows.split(chunk_size), strict=True):
        if recompute:
            pieces.append(checkpoint(_token_jsd, *rows, beta, temperature, use_reentrant=False))
        else:
            pieces.append(_token_jsd(*rows, beta, temperature))
    mask = completion_mask.bool().reshape(-1)
    divergence, student_entropy, teacher_entropy = (torch.cat(parts) for parts in zip(*pieces, strict=True))
    loss = masked_mean(divergence, mask)
    metrics = {
        "divergence_mean": loss.detach(),
        "student_entropy_mean": masked_mean(student_entropy, mask),
        "teacher_entropy_mean": masked_mean(teacher_entropy, mask),
        "mask_keep_fraction": mask.float().mean(),
    }
    return OPSDLossOutput(loss=loss, metrics={key: value.detach().float() for key, value in metrics.items()})


def opsd_sampled_token_loss(
    student_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    completion_mask: torch.Tensor,
) -> OPSDLossOutput:
    """OPSD sampled-token variant (docs/spec.md section 5): per-token reverse KL as a policy-gradient signal.

    With y_t sampled from the student, r_t = log p(y_t) - log q(y_t) (teacher detached) is the single
    sample (k1) estimate of KL(student || teacher) at position t. The loss is
        loss = sum_t m_t * r_t * exp(p_t - stopgrad(p_t)) / max(sum m, 1),   r_t detached,
    whose value is the masked mean of r_t (an unbiased estimate of the per-token reverse KL) and whose
    gradient is mean m_t r_t grad log p(y_t): the REINFORCE estimator of the gradient of the per-position
    reverse KL with the prefix held fixed (E_p[grad log p] = 0 removes the direct term). This is
    on-policy distillation with the negative reverse KL as a per-token advantage and discount 0
    (Lu and Thinking Machines Lab, "On-Policy Distillation", 2025; Agarwal et al., GKD, 2024). The
    plain loss mean(p_t - q_t) would be wrong: its gradient mean(grad log p) is zero in expectation.

    Args: student_logps [B, T] (sampled-token log-probs at the sampling temperature, gradient flows),
    teacher_logps [B, T] (detached), completion_mask [B, T].
    Metrics: divergence_mean (k1 mean = loss value), reverse_kl_k3_mean (Schulman's non-negative k3
    estimator (q/p - 1) - log(q/p)), mask_keep_fraction.
    """
    if student_logps.dim() != 2 or tuple(teacher_logps.shape) != tuple(student_logps.shape):
        raise ValueError(
            f"student_logps and teacher_logps must both be [B, T], got {tuple(student_logps.shape)} and "
            f"{tuple(teacher_logps.shape)}"
        )
    if tuple(completion_mask.shape) != tuple(student_logps.shape):
        raise ValueError(
            f"completion_mask must be [B, T] = {tuple(student_logps.shape)}, got {tuple(completion_mask.shape)}"
        )
    dtype = _compute_dtype(student_logps, teacher_logps)
    mask = completion_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=student_logps.device)
    p = torch.where(mask, student_logps.to(dtype), zero)
    q = torch.where(mask, teacher_logps.detach().to(dtype), zero)
    log_ratio = (p - q).detach()
    loss = masked_mean(log_ratio * torch.exp(p - p.detach()), mask)
    with torch.no_grad():
        k3 = torch.expm1(-log_ratio) + log_ratio
        metrics = {
            "divergence_mean": masked_mean(log_ratio, mask),
            "reverse_kl_k3_mean": masked_mean(k3, mask),
            "mask_keep_fraction": mask.float().mean(),
        }
    return OPSDLossOutput(loss=loss, metrics={key: value.float() for key, value in metrics.items()})

"""SGSD objective (docs/spec.md section 4): hand-computed values, a slow reference loop, invariances, gate, local support.

Tolerances: fp64 comparisons use atol 1e-12 (a few dozen roundings of values of order 1 stay far
below it); fp32 comparisons use atol 1e-6 (fp32 epsilon 1.2e-7 times the handful of operations
between inputs and loss, on values bounded by ln 2 times a weight sum of order 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import (
    LN2,
    SGSD_METRIC_KEYS,
    gate,
    local_support_terms,
    masked_mean,
    sgsd_loss,
    teacher_polarity,
)

F64 = torch.float64


def gate_py(d: float, tau: float = 1.0) -> float:
    """l(d) = ln 2 - log(1 + exp(-d^2 / 2 tau)) in plain Python."""
    return math.log(2.0) - math.log1p(math.exp(-d * d / (2 * tau)))


def sigmoid_py(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Slow readable references (docs/spec.md section 4 transcribed loop by loop)


def reference_sgsd(p, q, mask, rewards, weights, *, tau=1.0, clip_delta=3.0, theta=0.05, divergence=None):
    """Per rollout, per teacher, per token. Uses torch 0-d ops only where gradient must flow.

    Returns (loss, polarity [B, K], metrics as Python floats)."""
    batch, teachers, length = q.shape
    total = 0.0
    polarity = torch.zeros(batch, teachers, dtype=torch.long)
    per_teacher = []  # (support, raw support, row, sign, rho, success) of each present teacher
    clipped = counted = 0
    for b in range(batch):
        kept = [t for t in range(length) if bool(mask[b, t])]
        n = max(len(kept), 1)
        outcome = 1 if float(rewards[b]) > 0 else -1
        rollout_loss = 0.0
        for k in range(teachers):
            if not float(weights[b, k]) > 0:
                continue  # absent teacher

            def student(t, b=b, k=k):
                return p[b, k, t] if p.dim() == 3 else p[b, t]

            support = sum(min(max(float(q[b, k, t]) - float(student(t)), -clip_delta), clip_delta) for t in kept) / n
            raw = sum(float(q[b, k, t]) - float(student(t)) for t in kept) / n
            sign = (1 if support > 0 else -1) if abs(support) > theta else 0
            rho = outcome * sign
            polarity[b, k] = rho
            row = 0.0
            for t in kept:
                x = divergence[b, k, t] if divergence is not None else q[b, k, t].detach() - student(t)
                row = row + (math.log(2.0) - torch.log1p(torch.exp(-x * x / (2 * tau))))
                clipped += abs(float(q[b, k, t]) - float(student(t))) > clip_delta
                counted += 1
            rollout_loss = rollout_loss + float(weights[b, k]) * rho * row / n
            per_teacher.append((support, raw, float(row) / n, sign, rho, outcome > 0))
        total = total + rollout_loss

    def share(select) -> float:
        return sum(1 for item in per_teacher if select(*item)) / max(len(per_teacher), 1)

    def mean(column: int) -> float:
        return sum(item[column] for item in per_teacher) / max(len(per_teacher), 1)

    metrics = {
        "support_mean": mean(0),
        "support_raw_mean": mean(1),
        "row_loss_mean": mean(2),
        "mask_keep_fraction": sum(bool(m) for m in mask.flatten()) / max(mask.numel(), 1),
        "clip_fraction": clipped / max(counted, 1),
        "helpful_fraction": share(lambda s, r, w, sign, rho, ok: rho == 1),
        "harmful_fraction": share(lambda s, r, w, sign, rho, ok: rho == -1),
        "neutral_fraction": share(lambda s, r, w, sign, rho, ok: rho == 0),
        "below_threshold_fraction": share(lambda s, r, w, sign, rho, ok: abs(s) <= theta),
        "quadrant_helpful": share(lambda s, r, w, sign, rho, ok: ok and sign == 1),
        "quadrant_over_suppressive": share(lambda s, r, w, sign, rho, ok: ok and sign == -1),
        "quadrant_misleading": share(lambda s, r, w, sign, rho, ok: not ok and sign == 1),
        "quadrant_warning": share(lambda s, r, w, sign, rho, ok: not ok and sign == -1),
        "success_rate": sum(float(r) > 0 for r in rewards) / batch,
    }
    return total / batch, polarity, metrics


def reference_local_terms(student_logits, teacher_logits, sampled_ids, top_k):
    """Brute force over positions: build the set by sorting, renormalise, read off y_t, sum the KL."""
    batch, teachers, length, vocab = teacher_logits.shape
    out = {"student": [], "teacher": [], "divergence": []}
    for b in range(batch):
        for k in range(teachers):
            for t in range(length):
                teacher_row = teacher_logits[b, k, t].detach()
                order = sorted(range(vocab), key=lambda v, row=teacher_row: -float(row[v]))
                members = order[:top_k]
                y = int(sampled_ids[b, t])
                if y not in members:
                    members.append(y)
                idx = torch.tensor(members)
                s_lp = student_logits[b, t, idx] - torch.logsumexp(student_logits[b, t, idx], 0)
                t_lp = teacher_row[idx] - torch.logsumexp(teacher_row[idx], 0)
                out["student"].append(s_lp[members.index(y)])
                out["teacher"].append(t_lp[members.index(y)])
                out["divergence"].append((t_lp.exp() * (t_lp - s_lp)).sum())
    return tuple(torch.stack(out[key]).reshape(batch, teachers, length) for key in ("student", "teacher", "divergence"))


def random_batch(seed, batch=5, teachers=3, length=6, dtype=F64, local=False):
    """Random inputs with padding (garbage inf/NaN there), an absent teacher, a zero-length completion,
    a below-threshold teacher, and disagreements large enough to be clipped."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, teachers, length) if local else (batch, length)
    p = -4 * torch.rand(shape, generator=g, dtype=dtype)
    base = p if local else p[:, None, :]
    q = base + 2.0 * torch.randn(batch, teachers, length, generator=g, dtype=dtype)
    mask = torch.rand(batch, length, generator=g) < 0.8
    mask[0] = False  # zero-length completion
    mask[1, -2:] = False  # right padding
    q[3, 0] = base[3, 0] + 0.01  # |support| = 0.01 <= theta
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0][:batch], dtype=dtype)
    weights = torch.softmax(torch.randn(batch, teachers, generator=g, dtype=dtype), dim=-1)
    weights[2, 1] = 0.0  # absent teacher
    q[2, 1] = float("nan")
    p = p.masked_fill(~mask if not local else ~mask[:, None, :], float("nan"))
    q = q.masked_fill(~mask[:, None, :], float("inf"))
    return p.requires_grad_(), q, mask, rewards, weights


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_gate_hand_values():
    d = torch.tensor([0.0, 2.0, -2.0, 0.5], dtype=F64)
    # l(0) = ln2 - ln(1 + e^0) = 0; l(+-2) = ln2 - ln(1 + e^-2) = 0.693147 - 0.126928 = 0.566219;
    # l(0.5) = ln2 - ln(1 + e^-0.125) = 0.693147 - 0.632600 = 0.060547 (tau = 1).
    expected = torch.tensor([0.0, 0.5662191695, 0.5662191695, 0.0605481452], dtype=F64)
    torch.testing.assert_close(gate(d), expected, atol=1e-10, rtol=0)
    # tau = 4: l(2) = ln2 - ln(1 + e^(-4/8)) = 0.693147 - 0.474077 = 0.219070 (= l(1) at tau 1).
    assert float(gate(torch.tensor(2.0, dtype=F64), tau=4.0)) == pytest.approx(0.2190701964, abs=1e-10)


def test_sgsd_loss_hand_computed_two_teachers():
    # One successful rollout, T = 3 with the last token padded (garbage there), K = 2, a = (0.6, 0.4).
    p = torch.tensor([[-1.0, -2.0, float("nan")]], dtype=F64, requires_grad=True)
    q = torch.tensor([[[-0.5, -1.0, 5.0], [-1.0, -2.02, 0.0]]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    out = sgsd_loss(p, q, mask, torch.tensor([1.0], dtype=F64), torch.tensor([[0.6, 0.4]], dtype=F64))
    # teacher 1: d = (0.5, 1.0), n = 2, support = 0.75 > 0.05 -> sign +1, rho = +1 (success).
    # teacher 2: d = (0.0, -0.02), support = -0.01, |.| <= 0.05 -> sign 0, rho = 0.
    assert out.polarity.tolist() == [[1, 0]]
    torch.testing.assert_close(out.support, torch.tensor([[0.75, -0.01]], dtype=F64), atol=1e-12, rtol=0)
    # row_1 = (l(0.5) + l(1.0)) / 2 = (0.060548 + 0.219070) / 2 = 0.139809; L = 0.6 * 0.139809 = 0.083886.
    loss = float(out.loss.detach())
    assert loss == pytest.approx(0.6 * (gate_py(0.5) + gate_py(1.0)) / 2, abs=1e-12)
    assert loss == pytest.approx(0.0838855025, abs=1e-9)
    # dL/dp_t = 0.6 * (1/2) * dl/dd * dd/dp = -0.3 * sigmoid(-d^2/2) * d:
    # t0: -0.3 * sigmoid(-0.125) * 0.5 = -0.3 * 0.468791 * 0.5 = -0.070319; t1: -0.3 * 0.377541 = -0.113262.
    (grad,) = torch.autograd.grad(out.loss, p)
    expected = torch.tensor([[-0.3 * sigmoid_py(-0.125) * 0.5, -0.3 * sigmoid_py(-0.5), 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert expected[0, 1] == pytest.approx(-0.1132622006, abs=1e-9)


def test_sgsd_metrics_hand_computed():
    # p = 0, so d = q. T = 3, last token padded. a: r0 (0.7, 0.3), r1 (1, 0: teacher 1 absent), r2 (0.25, 0.75).
    nan = float("nan")
    q = torch.tensor(
        [
            [[0.5, 1.0, nan], [-4.0, 0.0, nan]],  # success: support 0.75 (helpful), clip(-4)=-3 -> -1.5 (over-suppr.)
            [[0.02, 0.04, nan], [5.0, 5.0, nan]],  # failure: support 0.03 <= theta (neutral); absent teacher
            [[1.0, 1.0, nan], [1.0, 2.0, nan]],  # failure: supports +1 and +1.5, both misleading
        ],
        dtype=F64,
    )
    p = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False]] * 3)
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.25, 0.75]], dtype=F64)
    out = sgsd_loss(p, q, mask, rewards, weights)
    assert out.polarity.tolist() == [[1, -1], [0, 0], [-1, -1]]
    assert set(out.metrics) == set(SGSD_METRIC_KEYS)
    rows = [  # row_bk = (l(d_b k 0) + l(d_b k 1)) / 2 for the 5 present teachers
        (gate_py(0.5) + gate_py(1.0)) / 2,
        (gate_py(4.0) + 0.0) / 2,  # the gate sees the unclipped -4
        (gate_py(0.02) + gate_py(0.04)) / 2,
        gate_py(1.0),
        (gate_py(1.0) + gate_py(2.0)) / 2,
    ]
    expected = {
        # 5 present teachers: supports 0.75, -1.5, 0.03, 1, 1.5 -> mean 1.78 / 5 = 0.356
        "support_mean": 0.356,
        # unclipped means 0.75, -2, 0.03, 1, 1.5 -> 1.28 / 5 = 0.256
        "support_raw_mean": 0.256,
        "row_loss_mean": sum(rows) / 5,
        "mask_keep_fraction": 6 / 9,
        "clip_fraction": 1 / 10,  # only d = -4 among the 10 masked tokens of present teachers
        "helpful_fraction": 1 / 5,  # only r0k0 has rho = +1
        "harmful_fraction": 3 / 5,  # r0k1, r2k0, r2k1
        "neutral_fraction": 1 / 5,
        "below_threshold_fraction": 1 / 5,
        "quadrant_helpful": 1 / 5,
        "quadrant_over_suppressive": 1 / 5,
        "quadrant_misleading": 2 / 5,
        "quadrant_warning": 0.0,
        "success_rate": 1 / 3,
    }
    for key, value in expected.items():
        metric = out.metrics[key]
        assert metric.dim() == 0 and not metric.requires_grad and metric.dtype == torch.float32, key
        # metrics are float32: 1e-6 is a few fp32 ulps at these magnitudes
        assert float(metric) == pytest.approx(value, abs=1e-6), key
    # loss = (L0 + L1 + L2) / 3, L0 = 0.7 row00 - 0.3 row01, L1 = 0, L2 = -0.25 row20 - 0.75 row21
    expected_loss = (0.7 * rows[0] - 0.3 * rows[1] - 0.25 * rows[3] - 0.75 * rows[4]) / 3
    assert float(out.loss.detach()) == pytest.approx(expected_loss, abs=1e-12)


def test_non_positive_or_nan_weight_means_absent_teacher():
    p, q, mask, rewards, weights = random_batch(19)
    out = sgsd_loss(p, q, mask, rewards, weights)
    odd = weights.clone()
    odd[2, 1] = float("nan")  # was 0 (absent); its logps are NaN garbage
    odd[4, 0], odd[4, 2] = -0.5, 0.0
    kept = weights.clone()
    kept[4, 0] = kept[4, 2] = 0.0
    out_odd = sgsd_loss(p, q, mask, rewards, odd)
    out_kept = sgsd_loss(p, q, mask, rewards, kept)
    assert torch.isfinite(out_odd.loss) and (out_odd.polarity[4, [0, 2]] == 0).all()
    torch.testing.assert_close(out_odd.loss, out_kept.loss, atol=1e-12, rtol=0)
    assert not torch.equal(out_odd.polarity, out.polarity)


def test_no_present_teachers_gives_zeros_not_nan():
    p = torch.randn(2, 4, requires_grad=True)
    out = sgsd_loss(p, torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.ones(2), torch.zeros(2, 3))
    assert float(out.loss.detach()) == 0.0 and out.polarity.abs().sum() == 0
    (grad,) = torch.autograd.grad(out.loss, p)
    assert torch.equal(grad, torch.zeros_like(grad))
    for key in SGSD_METRIC_KEYS:
        if key not in ("mask_keep_fraction", "success_rate"):
            assert float(out.metrics[key]) == 0.0, key
    assert float(out.metrics["success_rate"]) == 1.0 and float(out.metrics["mask_keep_fraction"]) == 1.0


# ---------------------------------------------------------------------------------------------
# Vectorised code vs the reference loop


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hyper", [{}, {"tau": 0.5, "clip_delta": 1.0, "theta": 0.3}])
def test_sgsd_matches_reference_loop_fp64(seed, hyper):
    p, q, mask, rewards, weights = random_batch(seed)
    tau, clip_delta, theta = hyper.get("tau", 1.0), hyper.get("clip_delta", 3.0), hyper.get("theta", 0.05)
    out = sgsd_loss(p, q, mask, rewards, weights,
                    settings=SGSDSettings(gate_tau=tau, clip_delta=clip_delta, confidence_threshold=theta))
    ref_loss, ref_polarity, ref_metrics = reference_sgsd(
        p, q, mask, rewards, weights, tau=tau, clip_delta=clip_delta, theta=theta
    )
    assert torch.equal(out.polarity, ref_polarity)
    assert (out.polarity != 0).any() and (out.polarity == 0).any()  # the case mix is exercised
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(out.loss, p)
    (ref_grad,) = torch.autograd.grad(ref_loss, p)
    assert torch.isfinite(grad).all()  # padding held NaN: it must get exact zeros, not NaN
    torch.testing.assert_close(grad, ref_grad.nan_to_num(0.0), atol=1e-12, rtol=0)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert set(out.metrics) == set(ref_metrics) == set(SGSD_METRIC_KEYS)
    for key, value in ref_metrics.items():
        assert float(out.metrics[key]) == pytest.approx(value, abs=1e-6), key  # metrics are fp32


def test_sgsd_fp32_and_bf16_inputs():
    p64, q64, mask, rewards, weights = random_batch(5)
    ref_loss, _, _ = reference_sgsd(p64, q64, mask, rewards, weights)
    (ref_grad,) = torch.autograd.grad(ref_loss, p64)
    for dtype in (torch.float32, torch.bfloat16):
        # references are recomputed from the rounded inputs, so only the arithmetic precision differs
        p = p64.detach().to(dtype).requires_grad_()
        q = q64.to(dtype)
        out = sgsd_loss(p, q, mask, rewards, weights.to(dtype))
        assert out.loss.dtype == torch.float32 and out.support.dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(out.loss.double(), ref_loss, atol=1e-6, rtol=0)
            (grad,) = torch.autograd.grad(out.loss, p)
            torch.testing.assert_close(grad.double(), ref_grad.nan_to_num(0.0), atol=1e-6, rtol=0)
        else:
            # bf16 weights are rounded too (8 bits), which the double reference does not see: compare
            # against a reference on the bf16-rounded weights, fp32 arithmetic error only.
            rounded_loss, _, _ = reference_sgsd(
                p.detach().double(), q.double(), mask, rewards, weights.to(dtype).double()
            )
            torch.testing.assert_close(out.loss.double(), torch.as_tensor(rounded_loss, dtype=F64), atol=1e-6, rtol=0)
            (grad,) = torch.autograd.grad(out.loss, p)
            assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


def test_teacher_polarity_matches_loss_and_has_no_grad():
    p, q, mask, rewards, weights = random_batch(3)
    support, polarity = teacher_polarity(p, q, mask, rewards, weights,
                                         settings=SGSDSettings(clip_delta=3.0, confidence_threshold=0.05))
    out = sgsd_loss(p, q, mask, rewards, weights)
    assert not support.requires_grad and polarity.dtype == torch.long
    assert torch.equal(polarity, out.polarity) and torch.equal(support, out.support)
    assert set(polarity.unique().tolist()) <= {-1, 0, 1}


# ---------------------------------------------------------------------------------------------
# Invariances


def test_padding_does_not_change_loss():
    p, q, mask, rewards, weights = random_batch(7)
    out = sgsd_loss(p, q, mask, rewards, weights)
    (grad,) = torch.autograd.grad(out.loss, p)
    # extra right padding with garbage, and different garbage at the existing padded positions
    extra = 4
    p2 = torch.cat([p.detach().nan_to_num(-123.0), torch.full((5, extra), 7.0, dtype=F64)], dim=1).requires_grad_()
    q2 = torch.cat([q.nan_to_num(nan=1e6, posinf=-1e6), torch.full((5, 3, extra), float("nan"), dtype=F64)], dim=2)
    q2[2, 1] = float("nan")  # the absent teacher stays garbage
    mask2 = torch.cat([mask, torch.zeros(5, extra, dtype=torch.bool)], dim=1)
    out2 = sgsd_loss(p2, q2, mask2, rewards, weights)
    torch.testing.assert_close(out2.loss, out.loss, atol=1e-12, rtol=0)
    assert torch.equal(out2.polarity, out.polarity)
    (grad2,) = torch.autograd.grad(out2.loss, p2)
    torch.testing.assert_close(grad2[:, : mask.shape[1]], grad, atol=1e-12, rtol=0)
    assert torch.equal(grad2[:, mask.shape[1] :], torch.zeros(5, extra, dtype=F64))
    for key in SGSD_METRIC_KEYS:
        if key != "mask_keep_fraction":  # the only metric that counts padding, by definition
            torch.testing.assert_close(out2.metrics[key], out.metrics[key], atol=1e-6, rtol=0)


def test_permuting_rollouts_permutes_results():
    p, q, mask, rewards, weights = random_batch(11)
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = sgsd_loss(p, q, mask, rewards, weights)
    out_perm = sgsd_loss(p[perm], q[perm], mask[perm], rewards[perm], weights[perm])
    torch.testing.assert_close(out_perm.loss, out.loss, atol=1e-12, rtol=0)
    assert torch.equal(out_perm.polarity, out.polarity[perm])
    torch.testing.assert_close(out_perm.support, out.support[perm], atol=0, rtol=0)


def test_permuting_teachers_with_weights_keeps_loss():
    p, q, mask, rewards, weights = random_batch(13)
    perm = torch.tensor([2, 0, 1])
    out = sgsd_loss(p, q, mask, rewards, weights)
    out_perm = sgsd_loss(p, q[:, perm], mask, rewards, weights[:, perm])
    torch.testing.assert_close(out_perm.loss, out.loss, atol=1e-12, rtol=0)
    assert torch.equal(out_perm.polarity, out.polarity[:, perm])
    g1 = torch.autograd.grad(out.loss, p)[0]
    g2 = torch.autograd.grad(out_perm.loss, p)[0]
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def test_zero_polarity_rollouts_get_exactly_zero_gradient():
    p, q, mask, rewards, weights = random_batch(17)
    # rollout 4: all teachers below threshold; rollout 2: one absent teacher, the others below threshold
    base = p.detach().nan_to_num(0.0)
    q = q.clone()
    q[4] = base[4] + 0.04
    q[2, 0] = base[2] - 0.03
    q[2, 2] = base[2] + 0.049
    q = q.masked_fill(~mask[:, None, :], float("inf"))
    out = sgsd_loss(p, q, mask, rewards, weights)
    assert (out.polarity[[2, 4]] == 0).all() and (out.polarity[[1, 3]] != 0).any()
    (grad,) = torch.autograd.grad(out.loss, p)
    assert torch.equal(grad[[2, 4]], torch.zeros_like(grad[[2, 4]]))
    assert (grad[[1, 3]] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_threshold_is_strict(dtype):
    # n = 1 so support = d exactly; at exactly theta the teacher is neutral, just above it is not.
    def polarity(d: float, theta: float) -> int:
        q = torch.tensor([[[d]]], dtype=dtype)
        _, rho = teacher_polarity(torch.zeros(1, 1, dtype=dtype), q, torch.ones(1, 1, dtype=torch.bool),
                                  torch.ones(1), torch.ones(1, 1), settings=SGSDSettings(confidence_threshold=theta))  # fmt: skip
        return int(rho)

    assert polarity(0.05, 0.05) == 0 and polarity(-0.05, 0.05) == 0
    above = torch.nextafter(torch.tensor(0.05, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    assert polarity(float(above), 0.05) == 1 and polarity(-float(above), 0.05) == -1
    # support = mean(0.25, 0.25) = 0.25 exactly (binary fraction), theta 0.25
    q = torch.full((1, 1, 2), 0.25, dtype=dtype)
    args = (torch.zeros(1, 2, dtype=dtype), q, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), torch.ones(1, 1))
    assert int(teacher_polarity(*args, settings=SGSDSettings(confidence_threshold=0.25))[1]) == 0
    assert int(teacher_polarity(*args, settings=SGSDSettings(confidence_threshold=0.2499))[1]) == -1  # failure flips the sign
    assert int(teacher_polarity(*args, settings=SGSDSettings(confidence_threshold=0.0))[1]) == -1


# ---------------------------------------------------------------------------------------------
# Gate properties


def test_gate_even_and_bounded():
    d = torch.linspace(-5, 5, 2001, dtype=torch.float32)
    values = gate(d)
    assert torch.equal(values, gate(-d))
    assert (values >= 0).all()
    # strictly below ln 2 while softplus(-d^2/2) = 3.7e-6 at |d| = 5 is above fp32 resolution (6e-8)
    assert (values < LN2).all()
    huge = gate(torch.tensor([1e3, -1e30, float("inf")]))
    assert (huge <= LN2).all() and torch.isfinite(huge).all()


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_gate_gradient_formula_and_peak(tau):
    p = torch.zeros(4001, dtype=F64, requires_grad=True)
    d = torch.linspace(-6, 6, 4001, dtype=F64) * math.sqrt(tau) - p  # d = q - p, q the linspace
    (grad_p,) = torch.autograd.grad(gate(d, tau).sum(), p)
    # docs/spec.md section 4: gradient w.r.t. the student log-prob is -sigmoid(-d^2/2tau) * d / tau (dl/dd has the other sign)
    expected = -torch.sigmoid(-d.detach().square() / (2 * tau)) * d.detach() / tau
    torch.testing.assert_close(grad_p, expected, atol=1e-14, rtol=0)
    peak = float(d.detach()[grad_p.abs().argmax()].abs())
    # |g| ~ sqrt(x) / (1 + e^x) with x = d^2 / 2tau is largest where 2x - 1 = e^-x, x = 0.73884, so
    # |d| = sqrt(2 x tau) = 1.2156 sqrt(tau); grid step 0.003 sqrt(tau)
    assert peak / math.sqrt(tau) == pytest.approx(1.2156, abs=0.005)


def test_gate_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        gate(torch.zeros(1), tau=0.0)


def test_masked_mean_empty_and_grad():
    values = torch.tensor([[1.0, float("nan")], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    out = masked_mean(values, mask, dim=-1)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]), atol=0, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert torch.equal(grad, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_shape_errors_name_the_argument():
    p = torch.zeros(2, 4)
    q = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_weights"):
        sgsd_loss(p, q, mask, torch.ones(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="student_logps"):
        sgsd_loss(torch.zeros(2, 5), q, mask, torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="token_divergence"):
        sgsd_loss(p, q, mask, torch.ones(2), torch.ones(2, 3), token_divergence=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="clip_delta"):
        sgsd_loss(p, q, mask, torch.ones(2), torch.ones(2, 3), settings=SGSDSettings(clip_delta=0.0))


# ---------------------------------------------------------------------------------------------
# Local-support mode


def random_logits(seed, batch=2, teachers=3, length=5, vocab=9):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(batch, teachers, length, vocab, generator=g, dtype=F64)
    sampled = torch.randint(0, vocab, (batch, length), generator=g)
    sampled[0, 0] = int(teacher[0, 0, 0].argmax())  # y_t inside teacher 0's top-k: must not be counted twice
    return student, teacher, sampled


@pytest.mark.parametrize("top_k", [1, 3])
def test_local_support_terms_match_brute_force(top_k):
    student, teacher, sampled = random_logits(0)
    got = local_support_terms(student, teacher, sampled, top_k=top_k)
    ref = reference_local_terms(student, teacher, sampled, top_k)
    for name, a, b in zip(("student", "teacher", "divergence"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    assert (got[2] >= -1e-12).all()  # a KL divergence
    w = torch.randn(got[2].shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad((w * got[2]).sum() + (w * got[0]).sum(), student)[0]
    g_ref = torch.autograd.grad((w * ref[2]).sum() + (w * ref[0]).sum(), student)[0]
    torch.testing.assert_close(g_got, g_ref, atol=1e-12, rtol=0)


def test_local_support_full_vocabulary_is_plain_softmax_and_kl():
    student, teacher, sampled = random_logits(2, vocab=6)
    s_lp, t_lp, div = local_support_terms(student, teacher, sampled, top_k=6)
    full_s = torch.log_softmax(student, -1)[:, None].expand_as(teacher)
    full_t = torch.log_softmax(teacher, -1)
    index = sampled[:, None, :, None].expand(2, 3, 5, 1)
    torch.testing.assert_close(s_lp, full_s.gather(-1, index)[..., 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(t_lp, full_t.gather(-1, index)[..., 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(div, (full_t.exp() * (full_t - full_s)).sum(-1), atol=1e-12, rtol=0)


def test_local_support_is_per_position_and_detaches_teacher():
    student, teacher, sampled = random_logits(3)
    teacher.requires_grad_()
    whole = local_support_terms(student, teacher, sampled, top_k=2)
    halves = (slice(0, 2), slice(2, 5))
    parts = [local_support_terms(student[:, s], teacher[:, :, s], sampled[:, s], top_k=2) for s in halves]
    for i in range(3):
        torch.testing.assert_close(torch.cat([parts[0][i], parts[1][i]], dim=-1), whole[i], atol=0, rtol=0)
    assert torch.autograd.grad(whole[2].sum(), teacher, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="top_k"):
        local_support_terms(student, teacher, sampled, top_k=0)


def test_sgsd_local_support_mode_matches_reference():
    student, teacher, sampled = random_logits(4, batch=4, length=6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0] = False
    mask[1, 4:] = False
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=F64)
    s_lp, t_lp, div = local_support_terms(student, teacher, sampled, top_k=3)
    out = sgsd_loss(s_lp, t_lp, mask, rewards, weights, token_divergence=div,
                    settings=SGSDSettings(confidence_threshold=0.1))
    rs, rt, rd = reference_local_terms(student, teacher, sampled, 3)
    ref_loss, ref_polarity, _ = reference_sgsd(rs, rt.detach(), mask, rewards, weights, theta=0.1, divergence=rd)
    assert torch.equal(out.polarity, ref_polarity) and (ref_polarity != 0).any()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-12, rtol=0)
    g = torch.autograd.grad(out.loss, student)[0]
    g_ref = torch.autograd.grad(ref_loss, student)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    assert torch.equal(g[0], torch.zeros_like(g[0]))  # zero-length completion

"""OPSD losses (docs/spec.md section 5): generalized JSD vs TRL's GKD definition, chunking, the sampled-token estimator.

Tolerances: fp64 comparisons use atol 1e-12 (sums over a vocabulary of ~10 terms of order 1, a few
dozen roundings at 1.1e-16); fp32 ones use atol 1e-6 (same arithmetic at 6e-8 per rounding).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sgsd.objectives import OPSD_METRIC_KEYS, OPSD_SAMPLED_METRIC_KEYS, opsd_loss, opsd_sampled_token_loss

F64 = torch.float64


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def random_case(seed, dtype=F64, batch=3, length=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, length, vocab, generator=g, dtype=F64)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(batch, length, vocab, generator=g, dtype=F64)).to(dtype)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[0, -2:] = False  # padding
    mask[1] = False  # a fully truncated completion
    mask[2, 0] = True
    return student, teacher, mask


# ---------------------------------------------------------------------------------------------
# Equality with TRL's GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])  # 0.3: an asymmetric mixture
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("dtype,atol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_matches_trl_generalized_jsd_value_and_gradient(trl_generalized_jsd, beta, temperature, dtype, atol):
    student, teacher, mask = random_case(int(beta * 10 + temperature * 3), dtype)
    out = opsd_loss(student, teacher, mask, beta=beta, temperature=temperature, chunk_size=4)
    # Like with like: TRL masks with labels == -100 and, for reduction "batchmean" with labels, divides
    # the sum over kept tokens and vocabulary by the number of kept tokens (clamped to 1) - a mean over
    # completion tokens, which is our definition. (Without labels, "batchmean" would divide by B.)
    labels = torch.where(mask, 0, -100)
    expected = trl_generalized_jsd(
        student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="batchmean"
    )
    assert out.loss.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(out.loss, expected, atol=atol, rtol=0)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)
    assert grad.abs().sum() > 0


def test_trl_end_points_are_forward_and_reverse_kl(trl_generalized_jsd):
    # TRL's beta = 0 is KL(teacher || student) and beta = 1 is KL(student || teacher); check it on the
    # distributions below so a silent change upstream is noticed here.
    student = torch.tensor([[[0.0, math.log(3.0)]]], dtype=F64)  # probabilities (1/4, 3/4)
    teacher = torch.zeros(1, 1, 2, dtype=F64)  # (1/2, 1/2)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(trl_generalized_jsd(student, teacher, beta=0.0)) == pytest.approx(forward, abs=1e-12)
    assert float(trl_generalized_jsd(student, teacher, beta=1.0)) == pytest.approx(reverse, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_hand_computed_two_token_vocabulary():
    # student (1/4, 3/4), teacher (1/2, 1/2); the second position is padding with different logits.
    student = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]], dtype=F64)
    teacher = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]], dtype=F64)
    mask = torch.tensor([[True, False]])
    # beta 0: KL(t||s) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.143841
    assert float(opsd_loss(student, teacher, mask, beta=0.0).loss) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert 0.5 * math.log(4 / 3) == pytest.approx(0.1438410362, abs=1e-9)
    # beta 1: KL(s||t) = 0.25 ln(0.5) + 0.75 ln(1.5) = -0.173287 + 0.304099 = 0.130812
    assert float(opsd_loss(student, teacher, mask, beta=1.0).loss) == pytest.approx(0.1308120359, abs=1e-9)
    # beta 0.5: M = (0.375, 0.625); KL(t||M) = 0.5 ln(4/3) + 0.5 ln(0.8) = 0.032269;
    # KL(s||M) = 0.25 ln(2/3) + 0.75 ln(1.2) = 0.035375; JSD = 0.5 (0.032269 + 0.035375) = 0.033822
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    )
    assert float(opsd_loss(student, teacher, mask, beta=0.5).loss) == pytest.approx(jsd, abs=1e-12)
    assert jsd == pytest.approx(0.0338220, abs=1e-6)
    # temperature 2: the teacher (0, 0) is unchanged; the student logits become (0, ln3 / 2),
    # probabilities (1/(1+sqrt3), sqrt3/(1+sqrt3))
    s = 1 / (1 + math.sqrt(3))
    forward_t2 = 0.5 * math.log(0.5 / s) + 0.5 * math.log(0.5 / (1 - s))
    assert float(opsd_loss(student, teacher, mask, temperature=2.0).loss) == pytest.approx(forward_t2, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Chunking, masking, detaching


def test_chunk_size_does_not_change_value_or_gradient():
    student, teacher, mask = random_case(3)
    results = []
    for chunk_size in (1, 4, 7, 10**6):
        out = opsd_loss(student, teacher, mask, beta=0.3, chunk_size=chunk_size)
        results.append((out.loss, torch.autograd.grad(out.loss, student)[0], out.metrics))
    for loss, grad, metrics in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-12, rtol=0)
        for key in OPSD_METRIC_KEYS:
            torch.testing.assert_close(metrics[key], results[0][2][key], atol=1e-6, rtol=0)


class _LargestTensors(TorchDispatchMode):
    """Records the largest element count of any tensor an op produces, per dtype (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest[item.dtype] = max(self.largest.get(item.dtype, 0), item.numel())
        return out


def test_float32_intermediates_never_exceed_one_chunk():
    # bf16 logits: any float32 tensor is one of our intermediates. B T V = 1024 elements, chunks of 4 rows.
    batch, length, vocab, chunk = 2, 16, 32, 4
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, length, vocab, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(batch, length, vocab, generator=g).bfloat16()
    mask = torch.ones(batch, length, dtype=torch.bool)
    tracker = _LargestTensors()
    with tracker:
        out = opsd_loss(student, teacher, mask, beta=0.5, chunk_size=chunk)
        (grad,) = torch.autograd.grad(out.loss, student)
    assert tracker.largest[torch.float32] == chunk * vocab  # not batch * length * vocab
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    # the whole-batch case does reach full size, so the tracker sees what it should
    tracker = _LargestTensors()
    with tracker:
        opsd_loss(student, teacher, mask, beta=0.5, chunk_size=batch * length).loss.backward()
    assert tracker.largest[torch.float32] == batch * length * vocab


def test_backward_keeps_no_full_size_intermediates():
    # Tensors saved for the backward: with per-chunk recomputation only (views of) the inputs and the
    # [B*T] mask are kept, not the [B*T, V] float32 softmax intermediates of every chunk.
    student, teacher, mask = random_case(4, dtype=torch.float32, batch=4, length=8, vocab=16)
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    kept: list[int] = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = opsd_loss(student, teacher, mask, beta=0.3, chunk_size=8)
    assert sum(kept) <= 4 * 8 + 1  # the flattened mask and a scalar
    torch.autograd.grad(out.loss, student)


def test_padding_and_empty_mask():
    student, teacher, mask = random_case(5)
    out = opsd_loss(student, teacher, mask)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    other = student.detach().clone()
    other[~mask] = torch.randn_like(other[~mask]) * 10
    torch.testing.assert_close(opsd_loss(other, teacher, mask).loss, out.loss.detach(), atol=1e-12, rtol=0)
    empty = opsd_loss(student, teacher, torch.zeros_like(mask))
    assert float(empty.loss.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(empty.loss, student)[0], torch.zeros_like(student))
    assert all(torch.isfinite(value) for value in empty.metrics.values())


def test_teacher_is_detached_and_no_grad_mode_works():
    student, teacher, mask = random_case(6)
    teacher.requires_grad_()
    out = opsd_loss(student, teacher, mask, beta=0.5)
    assert torch.autograd.grad(out.loss, teacher, allow_unused=True)[0] is None
    with torch.no_grad():
        value = opsd_loss(student, teacher, mask, beta=0.5).loss
    torch.testing.assert_close(value, out.loss.detach(), atol=1e-12, rtol=0)


def test_metrics_entropies():
    student, teacher, mask = random_case(7)
    out = opsd_loss(student, teacher, mask, temperature=1.5)
    assert set(out.metrics) == set(OPSD_METRIC_KEYS)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())

    def entropy(logits):
        lp = torch.log_softmax(logits.detach() / 1.5, -1)
        return -(lp.exp() * lp).sum(-1)[mask].mean()

    # metrics are float32: atol 1e-6
    assert float(out.metrics["student_entropy_mean"]) == pytest.approx(float(entropy(student)), abs=1e-6)
    assert float(out.metrics["teacher_entropy_mean"]) == pytest.approx(float(entropy(teacher)), abs=1e-6)
    assert float(out.metrics["divergence_mean"]) == pytest.approx(float(out.loss.detach()), abs=1e-6)
    assert float(out.metrics["mask_keep_fraction"]) == pytest.approx(float(mask.float().mean()), abs=1e-7)


def test_opsd_rejects_bad_arguments():
    student, teacher, mask = random_case(8)
    with pytest.raises(ValueError, match="beta"):
        opsd_loss(student, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        opsd_loss(student, teacher[:, :, :5], mask)
    with pytest.raises(ValueError, match="completion_mask"):
        opsd_loss(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        opsd_loss(student, teacher, mask, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Sampled-token variant


def test_sampled_token_hand_values_and_gradient():
    p = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -3.0, -1.0]], dtype=F64, requires_grad=True)
    q = torch.tensor([[-1.5, -1.0, float("inf")], [-0.5, -2.0, -4.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = opsd_sampled_token_loss(p, q, mask)
    # r = p - q on kept tokens: 0.5, -1.0, 0.0, -1.0, 3.0 -> mean 1.5 / 5 = 0.3
    assert float(out.loss.detach()) == pytest.approx(0.3, abs=1e-12)
    assert float(out.metrics["divergence_mean"]) == pytest.approx(0.3, abs=1e-7)
    # gradient = r_t / n (REINFORCE with the per-token reverse KL as cost), 0 on padding
    (grad,) = torch.autograd.grad(out.loss, p)
    expected = torch.tensor([[0.5, -1.0, 0.0], [0.0, -1.0, 3.0]], dtype=F64) / 5
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=0)
    # k3 = e^(-r) - 1 + r: e^-0.5 - 0.5 = 0.106531, e^1 - 2 = 0.718282, 0, 0.718282, e^-3 + 2 = 2.049787
    k3 = [math.expm1(-r) + r for r in (0.5, -1.0, 0.0, -1.0, 3.0)]
    assert float(out.metrics["reverse_kl_k3_mean"]) == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert set(out.metrics) == set(OPSD_SAMPLED_METRIC_KEYS)


def test_sampled_token_estimator_is_unbiased_for_reverse_kl_gradient():
    # One position, exact expectation over y ~ p by enumeration of a 6-token vocabulary:
    # E_y[grad loss(y)] must equal grad_z KL(p || q) (p = softmax(z), teacher fixed).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), -1)
    student_lp = torch.log_softmax(z, -1)
    exact = torch.autograd.grad((student_lp.exp() * (student_lp - teacher_lp)).sum(), z)[0]
    probs = student_lp.detach().exp()
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected_grad = torch.zeros_like(z)
    naive_grad = torch.zeros_like(z)
    for y in range(6):
        lp = torch.log_softmax(z, -1)[y].reshape(1, 1)
        loss = opsd_sampled_token_loss(lp, teacher_lp[y].reshape(1, 1), mask).loss
        expected_grad += probs[y] * torch.autograd.grad(loss, z, retain_graph=True)[0]
        naive_grad += probs[y] * torch.autograd.grad((lp - teacher_lp[y]).sum(), z)[0]
    torch.testing.assert_close(expected_grad, exact, atol=1e-12, rtol=0)
    # the plain difference of log-probs is no estimator: its expected gradient vanishes
    torch.testing.assert_close(naive_grad, torch.zeros_like(z), atol=1e-12, rtol=0)
    assert exact.abs().max() > 1e-2


def test_sampled_token_shapes_and_dtypes():
    p = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    out = opsd_sampled_token_loss(p, torch.randn(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bool))
    assert out.loss.dtype == torch.float32
    assert torch.autograd.grad(out.loss, p)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="completion_mask"):
        opsd_sampled_token_loss(p, p.detach(), torch.ones(3, 2, dtype=torch.bool))

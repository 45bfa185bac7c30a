"""Property tests of the SGSD objective (docs/spec.md section 4) over generated batches (hypothesis).

Log-probs are drawn on a grid of multiples of 1/8 so every support sum is exact in fp64: padding or a
teacher permutation can then never flip a polarity by a rounding at the threshold, and hypothesis
still reaches supports exactly at theta. Shapes include zero-length completions (T = 0), absent
teachers (weight 0) and fully masked rows. fp64 throughout: equalities use atol 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import gate, sgsd_loss

SETTINGS = settings(max_examples=50, deadline=None)
LOGPS = st.integers(-160, 0).map(lambda i: i / 8)  # log-probs in [-20, 0] on an exact grid
WEIGHTS = st.one_of(st.just(0.0), st.floats(0.01, 2.0))


@st.composite
def batches(draw, local: bool = False):
    b, k, t = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 5))
    student_shape = (b, k, t) if local else (b, t)
    return {
        "p": torch.from_numpy(draw(hnp.arrays(np.float64, student_shape, elements=LOGPS))).requires_grad_(),
        "q": torch.from_numpy(draw(hnp.arrays(np.float64, (b, k, t), elements=LOGPS))),
        "mask": torch.from_numpy(draw(hnp.arrays(np.bool_, (b, t)))),
        "rewards": torch.from_numpy(draw(hnp.arrays(np.float64, (b,), elements=st.sampled_from([0.0, 1.0])))),
        "weights": torch.from_numpy(draw(hnp.arrays(np.float64, (b, k), elements=WEIGHTS))),
        "divergence": (
            torch.from_numpy(draw(hnp.arrays(np.float64, (b, k, t), elements=st.floats(0.0, 10.0)))).requires_grad_()
            if local
            else None
        ),
        "hyper": {
            "gate_tau": draw(st.sampled_from([0.25, 1.0, 4.0])),
            "clip_delta": draw(st.sampled_from([0.5, 3.0])),
            "confidence_threshold": draw(st.sampled_from([0.0, 0.05, 0.5])),
        },
    }


def run(batch, **changes):
    args = {**batch, **changes}
    return sgsd_loss(args["p"], args["q"], args["mask"], args["rewards"], args["weights"],
                     token_divergence=args["divergence"], settings=SGSDSettings(**args["hyper"]))  # fmt: skip


@SETTINGS
@given(batches())
def test_loss_is_bounded_by_ln2_times_weight_sum(batch):
    out = run(batch)
    bound = math.log(2.0) * float(batch["weights"].sum(dim=-1).max())
    assert torch.isfinite(out.loss) and abs(float(out.loss.detach())) <= bound + 1e-12
    assert all(torch.isfinite(value) for value in out.metrics.values())


@SETTINGS
@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=20), st.floats(0.01, 100.0))
def test_gate_is_even_and_in_range(values, tau):
    d = torch.tensor(values, dtype=torch.float64)
    l = gate(d, tau)
    assert torch.equal(l, gate(-d, tau))
    assert (l >= 0).all() and (l <= math.log(2.0)).all()


@SETTINGS
@given(batches())
def test_zero_polarity_rollouts_get_zero_gradient(batch):
    out = run(batch)
    (grad,) = torch.autograd.grad(out.loss, batch["p"], allow_unused=True)
    silent = (out.polarity == 0).all(dim=-1)
    if grad is not None:
        assert torch.equal(grad[silent], torch.zeros_like(grad[silent]))
        assert torch.equal(grad[~batch["mask"]], torch.zeros_like(grad[~batch["mask"]]))


@SETTINGS
@given(batches(local=True))
def test_local_mode_zero_polarity_teachers_get_zero_gradient(batch):
    out = run(batch)
    (grad,) = torch.autograd.grad(out.loss, batch["divergence"])
    silent = out.polarity == 0
    assert torch.equal(grad[silent], torch.zeros_like(grad[silent]))
    # student log-probs only decide the polarity in this mode: no gradient reaches them
    assert torch.autograd.grad(run(batch).loss, batch["p"], allow_unused=True)[0] is None


@SETTINGS
@given(batches(), st.integers(1, 4), st.sampled_from([float("nan"), float("inf"), -1e30, 0.0]))
def test_padding_does_not_change_anything(batch, extra, garbage):
    out = run(batch)
    b, k, _ = batch["q"].shape
    padded = {
        "p": torch.cat([batch["p"].detach(), torch.full((b, extra), garbage, dtype=torch.float64)], 1).requires_grad_(),
        "q": torch.cat([batch["q"], torch.full((b, k, extra), garbage, dtype=torch.float64)], 2),
        "mask": torch.cat([batch["mask"], torch.zeros(b, extra, dtype=torch.bool)], 1),
    }
    out_padded = run(batch, **padded)
    torch.testing.assert_close(out_padded.loss, out.loss, atol=1e-12, rtol=0)
    assert torch.equal(out_padded.polarity, out.polarity)
    torch.testing.assert_close(out_padded.support, out.support, atol=1e-12, rtol=0)
    grad = torch.autograd.grad(out.loss, batch["p"], allow_unused=True)[0]
    grad_padded = torch.autograd.grad(out_padded.loss, padded["p"], allow_unused=True)[0]
    if grad is not None:
        torch.testing.assert_close(grad_padded[:, : grad.shape[1]], grad, atol=1e-12, rtol=0)
        assert torch.equal(grad_padded[:, grad.shape[1] :], torch.zeros(b, extra, dtype=torch.float64))


@SETTINGS
@given(batches(), st.randoms(use_true_random=False))
def test_teacher_order_does_not_matter(batch, rng):
    k = batch["q"].shape[1]
    perm = torch.tensor(rng.sample(range(k), k))
    out = run(batch)
    out_perm = run(batch, q=batch["q"][:, perm], weights=batch["weights"][:, perm])
    torch.testing.assert_close(out_perm.loss, out.loss, atol=1e-12, rtol=0)
    assert torch.equal(out_perm.polarity, out.polarity[:, perm])
    for key, value in out.metrics.items():
        torch.testing.assert_close(out_perm.metrics[key], value, atol=1e-6, rtol=0, msg=key)  # fp32 metrics


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_grid_reaches_threshold_exactly(theta):
    # the grid makes |support| == theta reachable: 0.5 = 4/8; such a teacher is neutral (strict >)
    p = torch.zeros(1, 2, dtype=torch.float64)
    q = torch.full((1, 1, 2), theta, dtype=torch.float64)
    out = sgsd_loss(p, q, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, dtype=torch.float64),
                    torch.ones(1, 1, dtype=torch.float64), settings=SGSDSettings(confidence_threshold=theta))  # fmt: skip
    assert int(out.polarity) == 0

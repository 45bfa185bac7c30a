"""The length-free polarity test (issue 14, `polarity_test="z"`) and the paper's threshold rule kept as it was.

- With zero-mean noise as d, the z test's share of non-neutral teachers stays at its level at 40 and at
  4,000 tokens; the threshold rule's share collapses from about one half to zero.
- A fixed set of disagreeing tokens keeps its sign under z when padded with agreeing tokens (n from 40
  to 4,000); its mean falls below theta, so the threshold rule turns it neutral.
- `polarity_test="threshold"` returns exactly (bit for bit) what the implementation returned before the
  option existed: tests/data/sgsd_threshold_reference.pt holds inputs and outputs recorded from
  sgsd_loss / teacher_polarity at commit 4bda10f (the parent of the change that added the option).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sgsd.config import load_config
from sgsd.methods import load_run_config
from sgsd.errors import ConfigError
from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import sgsd_loss, support_z, teacher_polarity

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "sgsd_threshold_reference.pt"


def _polarity(d: torch.Tensor, rewards: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Polarity [B, K] of teachers whose disagreement with a zero student is d [B, K, T] (all tokens counted)."""
    b, k, t = d.shape
    rewards = torch.ones(b, dtype=d.dtype) if rewards is None else rewards
    return teacher_polarity(torch.zeros(b, t, dtype=d.dtype), d, torch.ones(b, t, dtype=torch.bool), rewards,
                            torch.ones(b, k, dtype=d.dtype), settings=SGSDSettings(**options))[1]


def _t_level(z: float, dof: int) -> float:
    """P(|T| > z) for Student's t with `dof` degrees of freedom (the exact level of the z rule on
    Gaussian noise: mean / (s / sqrt(n)) is t-distributed with n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(2 * t.sf(z, dof))


@pytest.mark.parametrize("n", [40, 4000])
def test_noise_is_non_neutral_at_the_tests_level_whatever_the_length(n):
    sigma = 0.5  # 500 rollouts x 4 teachers = 2,000 teachers per length
    gen = torch.Generator().manual_seed(n)
    d = sigma * torch.randn(500, 4, n, generator=gen)
    z_share = _polarity(d, polarity_test="z", polarity_z=1.96).ne(0).float().mean().item()
    # the t level: 0.057 at n = 40, 0.050 at n = 4,000 (a nominal two-sided 5% for 1.96). Binomial std over
    # 2,000 teachers: sqrt(0.05 * 0.95 / 2000) = 0.0049; 0.02 is about 4 std (a wrong level, e.g. a
    # one-sided or a population-std test, would be off by 0.05 or more)
    level = _t_level(1.96, n - 1)
    assert abs(z_share - level) < 0.02, (z_share, level)
    threshold_share = _polarity(d, confidence_threshold=0.05).ne(0).float().mean().item()
    # threshold rule: P(|mean| > 0.05) with mean ~ N(0, sigma / sqrt(n)): 0.53 at n = 40, 3e-10 at 4,000
    expected = math.erfc(0.05 / (sigma / math.sqrt(n)) / math.sqrt(2))
    assert abs(threshold_share - expected) < 0.05 + 1e-9, (threshold_share, expected)
    assert (threshold_share > 0.4) if n == 40 else (threshold_share < 0.01)


@pytest.mark.parametrize("direction, reward, expected", [(1.0, 1.0, 1), (-1.0, 1.0, -1), (1.0, 0.0, -1)])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_a_fixed_disagreement_keeps_its_sign_when_padded_with_agreeing_tokens(direction, reward, expected, noise):
    m = 9
    disagreeing = direction * torch.linspace(0.6, 1.4, m, dtype=F64)  # mean 1: the same m tokens at every n
    gen = torch.Generator().manual_seed(0)
    for n in (40, 400, 4000):
        d = torch.cat([disagreeing, noise * torch.randn(n - m, generator=gen, dtype=F64)]).reshape(1, 1, n)
        rewards = torch.tensor([reward], dtype=F64)
        assert _polarity(d, rewards, polarity_test="z").item() == expected, n
        # threshold: mean = 9 / n: 0.225 at 40 (counted), 0.0225 at 400 and 0.00225 at 4,000 (< 0.05: neutral)
        threshold = _polarity(d, rewards, confidence_threshold=0.05).item()
        assert threshold == (expected if n == 40 else 0), n


def test_z_of_m_equal_disagreements_among_n_tokens_by_hand():
    # m tokens at a, n - m at 0: mean a m / n, s^2 = a^2 m (n - m) / (n (n - 1)), z = sqrt(m (n - 1) / (n - m))
    a, m = 0.7, 5
    for n in (6, 40, 4000):
        d = torch.zeros(1, 1, n, dtype=F64)
        d[..., :m] = a
        z = support_z(d, torch.ones(1, n, dtype=torch.bool), clip_delta=3.0)
        torch.testing.assert_close(z, torch.tensor([[math.sqrt(m * (n - 1) / (n - m))]], dtype=F64),
                                   rtol=1e-12, atol=0)  # fp64 sums of a few thousand terms


def test_z_edge_cases_are_neutral_without_evidence():
    mask = torch.tensor([[True, False, False, False], [False] * 4, [True] * 4, [True] * 4, [True] * 4])
    d = torch.tensor([[2.0, 9.0, 9.0, 9.0],  # n = 1: the spread is unknown -> neutral
                      [5.0, 5.0, 5.0, 5.0],  # n = 0 -> neutral
                      [4.0, 3.5, 7.0, 3.0],  # all clipped at C = 3: zero spread, mean 3 -> z = inf, counts
                      [0.0, 0.0, 0.0, 0.0],  # zero spread, mean 0 -> neutral (not 0 / 0 = NaN)
                      [1.0, -1.0, 2.0, -2.0]], dtype=F64)[:, None, :]  # mean exactly 0 -> neutral
    z = support_z(d, mask, clip_delta=3.0)
    assert z[:, 0].tolist() == [0.0, 0.0, math.inf, 0.0, 0.0]
    b = d.shape[0]
    rewards, weights = torch.ones(b, dtype=F64), torch.ones(b, 1, dtype=F64)
    student = torch.zeros(b, 4, dtype=F64, requires_grad=True)
    out = sgsd_loss(student, d, mask, rewards, weights, settings=SGSDSettings(polarity_test="z", confidence_threshold=0.0))
    assert out.polarity[:, 0].tolist() == [0, 0, 1, 0, 0]
    # the threshold rule (theta = 0) counts the single token of row 0
    assert sgsd_loss(student, d, mask, rewards, weights,
                     settings=SGSDSettings(confidence_threshold=0.0)).polarity[0, 0].item() == 1
    # below_threshold_fraction keeps its key and counts the teachers whose test failed (4 of 5)
    assert out.metrics["below_threshold_fraction"].item() == pytest.approx(0.8)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert grad[[0, 1, 3, 4]].abs().sum().item() == 0.0 and grad[2].abs().sum().item() > 0
    # an absent teacher (weight 0) stays neutral under z as under the threshold
    absent = sgsd_loss(student, d, mask, rewards, torch.zeros(b, 1, dtype=F64), settings=SGSDSettings(polarity_test="z"))
    assert absent.polarity.abs().sum().item() == 0


def test_z_and_threshold_agree_on_the_loss_given_the_same_polarity():
    """The test decides signs only: where both rules give the same polarity, loss and metrics other than
    below_threshold_fraction are equal."""
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(4, 3, 50, generator=gen, dtype=F64) + 2.0  # clearly positive: every teacher counts in both
    p = torch.zeros(4, 50, dtype=F64)
    args = (p, d, torch.ones(4, 50, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64),
            torch.rand(4, 3, generator=gen, dtype=F64))
    z, threshold = sgsd_loss(*args, settings=SGSDSettings(polarity_test="z")), sgsd_loss(*args)
    assert torch.equal(z.polarity, threshold.polarity) and z.polarity.abs().sum().item() == 12
    assert torch.equal(z.loss, threshold.loss)
    assert z.metrics.keys() == threshold.metrics.keys()


def test_bad_polarity_options_are_refused():
    d = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="sgsd.polarity_test: expected 'threshold' or 'z', got 't'"):
        _polarity(d, polarity_test="t")
    with pytest.raises(ValueError, match=r"sgsd.polarity_z=0.0: must be a finite number > 0"):
        _polarity(d, polarity_test="z", polarity_z=0.0)
    with pytest.raises(ConfigError, match=r"sgsd.polarity_z=-1.0: must be a finite number > 0"):
        load_run_config(ROOT / "configs/tiny/sgsd-z.yaml", ["sgsd.polarity_z=-1"])
    with pytest.raises(ConfigError, match="sgsd.polarity_test: expected one of 'threshold', 'z'"):
        load_run_config(ROOT / "configs/tiny/sgsd.yaml", ["sgsd.polarity_test=t"])
    cfg = load_config(ROOT / "configs/tiny/sgsd-z.yaml")
    assert (cfg.sgsd.polarity_test, cfg.sgsd.polarity_z) == ("z", 1.0)


# -- the paper's rule, bit for bit -----------------------------------------------------------------------


def _run_recorded(inputs, **options):
    p = inputs["p"].clone().requires_grad_()
    div = None if inputs["div"] is None else inputs["div"].clone().requires_grad_()
    settings = SGSDSettings(confidence_threshold=inputs["theta"], **options)
    out = sgsd_loss(p, inputs["q"], inputs["mask"], inputs["rewards"], inputs["weights"], settings=settings,
                    token_divergence=div)
    grads = torch.autograd.grad(out.loss, [p] + ([div] if div is not None else []), allow_unused=True,
                                materialize_grads=True)
    support, polarity = teacher_polarity(inputs["p"], inputs["q"], inputs["mask"], inputs["rewards"],
                                         inputs["weights"], settings=settings)
    return dict(loss=out.loss.detach(), polarity=out.polarity, support=out.support, metrics=out.metrics,
                grads=list(grads), tp_support=support, tp_polarity=polarity)


@pytest.mark.parametrize("options", [{}, {"polarity_test": "threshold"}, {"polarity_test": "threshold", "polarity_z": 0.5}],
                         ids=["default", "threshold", "threshold-z-ignored"])
def test_threshold_rule_is_bit_identical_to_the_recorded_implementation(options):
    cases = torch.load(REFERENCE)
    assert len(cases) == 5 and sum(c["outputs"]["polarity"].abs().sum().item() for c in cases) > 0
    for index, case in enumerate(cases):
        got, want = _run_recorded(case["inputs"], **options), case["outputs"]
        for key in ("loss", "polarity", "support", "tp_support", "tp_polarity"):
            assert torch.equal(got[key], want[key]), (index, key)  # exact: same arithmetic, same order
        assert all(torch.equal(g, w) for g, w in zip(got["grads"], want["grads"], strict=True)), index
        assert got["metrics"].keys() == want["metrics"].keys()
        assert all(torch.equal(got["metrics"][k], want["metrics"][k]) for k in want["metrics"]), index


# -- the trainer passes the options everywhere it decides a polarity -------------------------------------


def test_trainer_uses_the_z_test_in_the_skip_decision_and_in_the_loss(tmp_path, monkeypatch):
    import sgsd.loss_phase
    from sgsd.trainers.run import train

    calls: dict[str, list] = {"teacher_polarity": [], "sgsd_loss": []}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            out = function(*args, **kwargs)
            polarity = out[1] if name == "teacher_polarity" else out.polarity
            calls[name].append(((kwargs["settings"].polarity_test, kwargs["settings"].polarity_z), polarity))
            return out
        return wrapped

    # the trainer's skip decision (sgsd.loss_phase.active_rollouts)
    monkeypatch.setattr(sgsd.loss_phase, "teacher_polarity", spy("teacher_polarity", teacher_polarity))
    monkeypatch.setattr(sgsd.loss_phase, "sgsd_loss", spy("sgsd_loss", sgsd_loss))  # the trainer's loss phase
    cfg = load_config(ROOT / "configs/tiny/sgsd-z.yaml", ["sgsd.skip_neutral_rows=true", "sgsd.polarity_z=1.5",
                                                                   "skills.attribution=false"])
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    (options, decided), = calls["teacher_polarity"]  # one generation batch
    (loss_options, in_loss), = calls["sgsd_loss"]  # one micro-batch
    assert options == loss_options == ("z", 1.5)
    active = decided.ne(0).any(dim=-1)
    assert 0 < active.sum() < len(active)  # the case is not trivial: some rollouts skipped, some not
    # the loss saw exactly the rollouts the skip decision kept, with the same polarity (TRL shuffles the
    # generation batch before the loss, so rows are compared as a multiset)
    assert sorted(in_loss.tolist()) == sorted(decided[active].tolist())

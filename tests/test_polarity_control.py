"""The controlled polarity (`sgsd.polarity_control`, docs/methods.md "Controlled polarity"): the math on
hand-made tensors, the control teachers' texts, the settings, and the trainer against the probe's core path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import gate, sgsd_loss, teacher_polarity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
NEUTRAL = SGSDSettings(polarity_control="neutral", confidence_threshold=0.05)


def _batch(seed: int = 0, b: int = 4, k: int = 3, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(b, t, generator=gen, dtype=F64) - 2.0).requires_grad_()
    q = torch.randn(b, k, t, generator=gen, dtype=F64) - 2.0
    c = torch.randn(b, t, generator=gen, dtype=F64) - 2.0
    mask = torch.rand(b, t, generator=gen) > 0.2
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)[:b]
    weights = torch.rand(b, k, generator=gen, dtype=F64)
    weights[0, 2] = 0.0  # an absent teacher
    return p, q, c, mask, rewards, weights


def test_control_replaces_the_student_in_the_support_and_the_test():
    p, q, c, mask, rewards, weights = _batch()
    got = teacher_polarity(p, q, mask, rewards, weights, settings=NEUTRAL, control_logps=c)
    # the polarity test against the control is the paper's test with the control in the student's place
    want = teacher_polarity(c, q, mask, rewards, weights, settings=replace(NEUTRAL, polarity_control="none"))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # exact: the same values q - c
    assert (got[1] != 0).any() and not torch.equal(got[1], teacher_polarity(p, q, mask, rewards, weights)[1])
    z = replace(NEUTRAL, polarity_test="z")
    got_z = teacher_polarity(p, q, mask, rewards, weights, settings=z, control_logps=c)[1]
    want_z = teacher_polarity(c, q, mask, rewards, weights, settings=replace(z, polarity_control="none"))[1]
    assert torch.equal(got_z, want_z)


def test_gated_loss_pulls_towards_the_contrastive_target():
    """Value: sum_k a_k rho_k mean_t l(q - c); gradient in p: -a_k rho_k l'(q - c) m_t / (n B) (a slow loop)."""
    p, q, c, mask, rewards, weights = _batch(1)
    out = sgsd_loss(p, q, mask, rewards, weights, settings=NEUTRAL, control_logps=c)
    (grad,) = torch.autograd.grad(out.loss, p)
    b, k, t = q.shape
    value, expected = 0.0, torch.zeros(b, t, dtype=F64)
    for i in range(b):
        n = max(int(mask[i].sum()), 1)
        for j in range(k):
            rho = int(out.polarity[i, j])
            a = float(weights[i, j])
            for s in range(t):
                if not mask[i, s] or a <= 0:
                    continue
                d = q[i, j, s] - c[i, s]
                value += a * rho * float(gate(d)) / n / b
                slope = float(torch.sigmoid(-d * d / 2.0) * d)  # l'(d) at tau = 1
                expected[i, s] += -a * rho * slope / n / b
    assert float(out.loss.detach()) == pytest.approx(value, abs=1e-12)  # float64 sums of < 30 terms
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert out.polarity.abs().sum() > 0


def test_a_control_equal_to_the_student_is_the_paper_bit_for_bit():
    p, q, _, mask, rewards, weights = _batch(2)
    paper = sgsd_loss(p, q, mask, rewards, weights, settings=replace(NEUTRAL, polarity_control="none"))
    same = sgsd_loss(p, q, mask, rewards, weights, settings=NEUTRAL, control_logps=p.detach())
    assert torch.equal(paper.loss, same.loss) and torch.equal(paper.polarity, same.polarity)
    assert all(torch.equal(paper.metrics[key], same.metrics[key]) for key in paper.metrics)
    (g_paper,) = torch.autograd.grad(paper.loss, p)
    (g_same,) = torch.autograd.grad(same.loss, p)
    assert torch.equal(g_paper, g_same) and g_paper.abs().sum() > 0


def test_control_and_setting_must_agree():
    p, q, c, mask, rewards, weights = _batch()
    with pytest.raises(ValueError, match="control_logps must be given exactly"):
        sgsd_loss(p, q, mask, rewards, weights, control_logps=c)  # polarity_control none
    with pytest.raises(ValueError, match="control_logps must be given exactly"):
        teacher_polarity(p, q, mask, rewards, weights, settings=NEUTRAL)
    with pytest.raises(ValueError, match="control_logps must have shape"):
        sgsd_loss(p, q, mask, rewards, weights, settings=NEUTRAL, control_logps=c[:, :3])


def test_settings_refuse_unknown_controls_and_the_local_support_variant():
    from sgsd.errors import ConfigError
    from sgsd.methods import load_run_config

    assert SGSDSettings().polarity_control == "none"
    with pytest.raises(ValueError, match="sgsd.polarity_control: expected one of none, neutral, shuffled, got 'x'"):
        SGSDSettings(polarity_control="x")  # type: ignore[arg-type]  # refused when built
    with pytest.raises(ValueError, match="local-support"):
        SGSDSettings(polarity_control="neutral", local_support_top_k=4)
    cfg = load_run_config(ROOT / "configs/tiny/sgsd.yaml", ["sgsd.polarity_control=shuffled"])
    assert cfg.sgsd.polarity_control == "shuffled"
    with pytest.raises(ConfigError, match="sgsd.polarity_control"):
        load_run_config(ROOT / "configs/tiny/sgsd.yaml", ["sgsd.polarity_control=neutral",
                                                           "sgsd.local_support_top_k=4"])


# -- the control teachers' texts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from sgsd.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def source():
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever
    from sgsd.skills.teachers import TeacherSource

    bank = load_bank(ROOT / "configs/tiny/skill_bank.json")
    return TeacherSource(bank, make_retriever("bm25", bank), 2)


def test_neutral_control_matches_the_skill_blocks_length_without_their_content(tokenizer, source):
    from sgsd.prompts import GUIDANCE_PREAMBLE
    from sgsd.skills.controls import NEUTRAL_FILLER, token_length

    problem = "What is 3 + 4?"
    (teachers,) = source.teachers_for([problem])
    (text,) = source.controls_for([problem], "neutral", tokenizer)
    target = round(sum(token_length(tokenizer, t.guidance) for t in teachers) / len(teachers))
    longest_word = max(token_length(tokenizer, " " + w) for w in NEUTRAL_FILLER.split())
    assert target <= token_length(tokenizer, text) <= target + longest_word + 1
    assert text.startswith(GUIDANCE_PREAMBLE)
    body = text[len(GUIDANCE_PREAMBLE):]
    assert all(word in NEUTRAL_FILLER.split() for word in body.split())  # no skill text


def test_shuffled_control_is_a_pair_not_retrieved_for_the_problem(tokenizer, source):
    problems = ["What is 3 + 4?", "Compute 12 * 5."]
    texts = source.controls_for(problems, "shuffled", tokenizer)
    for problem, text, teachers in zip(problems, texts, source.teachers_for(problems)):
        assert all(t.guidance != text for t in teachers)
        assert not any(t.skill.principle in text or t.mistake.description in text for t in teachers)
    again = source.controls_for(problems, "shuffled", tokenizer)
    assert again == texts  # keyed by the problem: the same on every rank and every step


# -- the trainer and the probe's core path -----------------------------------------------------------


@pytest.mark.parametrize("control", ["neutral", "shuffled"])
def test_trainer_decides_polarity_as_the_probe_does(tmp_path, control):
    """The trainer's loss phase (rollout_extras, then sgsd_part) and `sgsd.teacher_scoring.probe_teachers` on the same
    rollouts and weights give the same control log-probs and the same polarity."""
    from test_teacher_weights import _prepared, _rollout_batch

    import sgsd.loss_phase
    from sgsd.prompts import ChatStyle
    from sgsd.teacher_scoring import probe_teachers

    run = _prepared(tmp_path, f"sgsd.polarity_control={control}", "sgsd.teacher=live")
    trainer = run.trainer
    inputs, output, rewards = _rollout_batch(trainer)
    extras = trainer.rollout_extras(inputs, output, rewards)
    assert extras["control_logps"].shape == output["completion_ids"].shape
    seen = []
    original = sgsd.loss_phase.sgsd_loss

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((kwargs["control_logps"], out))
        return out

    sgsd.loss_phase.sgsd_loss = spy
    try:
        trainer.sgsd_part(trainer.model, {**output, **extras, "sgsd_mask": extras["sgsd_mask"]})
    finally:
        sgsd.loss_phase.sgsd_loss = original
    (control_in_loss, out), = seen
    assert torch.equal(control_in_loss, extras["control_logps"])

    problems = [x["problem"] for x in inputs]
    teachers = trainer.teacher_source.teachers_for(problems)
    texts = trainer.teacher_source.controls_for(problems, control, trainer.processing_class)
    found = probe_teachers(trainer.model, trainer.processing_class, problems, output["completion_ids"],
                           output["completion_mask"], rewards, teachers, trainer.settings, controls={control: texts},
                           student_style=ChatStyle(False), chunk_tokens=trainer.chunk_tokens)
    assert torch.equal(found[control].polarity, out.polarity) and out.polarity.abs().sum() > 0
    # same weights and rows; the student pass is batched alike: fp32 rounding only (1e-6 of supports ~0.1)
    torch.testing.assert_close(found[control].support, out.support, atol=1e-6, rtol=0)
    assert not torch.equal(found["none"].polarity, found[control].polarity) or \
        not torch.equal(found["none"].support, found[control].support)

"""`sgsd.loss_phase`: the loss phase SGSDTrainer.method_loss and the benchmark share. Row selection, trimming
and the active-fraction scaling against a plain run on the selected rollouts alone; non-finite inputs are
reported, not turned into a loss; the skip decision uses the student's own gradient-free pass."""

import pytest
import torch

from sgsd.benchmarking.synthetic import PAD_ID, BatchShape, build_model, make_batch
from sgsd.loss_phase import active_rollouts, sgsd_loss_phase
from sgsd.loss_settings import SGSDSettings
from sgsd.scoring import completion_logprobs, left_pad, score_teachers
from sgsd.tiny import ModelShape

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=64)
HYPER = dict(settings=SGSDSettings(gate_tau=1.0, clip_delta=3.0, confidence_threshold=0.0), chunk_tokens=7)  # 7: several chunks


@pytest.fixture(scope="module")
def model():
    return build_model(SHAPE, max_positions=64, dtype=torch.float64)  # float64: no batching rounding to tolerate


@pytest.fixture(scope="module")
def tensors(model):
    batch = make_batch(BatchShape(rollouts=4, teachers=3, completion_tokens=10, seed=7), SHAPE.vocab_size)
    prompt_ids, prompt_mask = left_pad(batch.student_prompt_ids, PAD_ID)
    logps = score_teachers(model, batch.teacher_prompt_ids, batch.completion_ids, batch.completion_mask, pad_id=PAD_ID)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=batch.completion_ids,
                completion_mask=batch.completion_mask, counted_mask=batch.counted_mask, rewards=batch.rewards,
                teacher_weights=batch.teacher_weights, teacher_logps=logps)


def _rows(tensors, rows):
    return {name: value[rows] for name, value in tensors.items()}


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_selected_rows_equal_a_run_on_those_rollouts_scaled_by_their_share(model, tensors):
    lengths = tensors["completion_mask"].sum(-1).tolist()
    rows = torch.tensor([1, 2])  # a failure and a success
    assert lengths[0] == 10 and max(lengths[1], lengths[2]) < 10  # the selection is trimmed below T
    active = torch.zeros(4, dtype=torch.bool)
    active[rows] = True
    phase = sgsd_loss_phase(model, **tensors, active=active, **HYPER)
    alone = sgsd_loss_phase(model, **_rows(tensors, rows), **HYPER)
    assert phase.rows.tolist() == [1, 2] and phase.length == max(lengths[1], lengths[2])
    assert torch.equal(phase.polarity[rows], alone.polarity) and (phase.polarity[[0, 3]] == 0).all()
    assert (phase.polarity != 0).any()
    # same rows, same arithmetic: the loss is the sub-batch mean times 2 of 4 rollouts (float64: 1e-12)
    assert float(phase.loss.detach()) == pytest.approx(float(alone.loss.detach()) * 2 / 4, abs=1e-12)
    selected, scaled = _grads(model, phase.loss), _grads(model, alone.loss * 0.5)
    assert selected.keys() == scaled.keys() and selected
    for name, grad in selected.items():
        torch.testing.assert_close(grad, scaled[name], atol=1e-12, rtol=0)


def test_every_row_active_is_the_default(model, tensors):
    full = sgsd_loss_phase(model, **tensors, **HYPER)
    flagged = sgsd_loss_phase(model, **tensors, active=torch.ones(4, dtype=torch.bool), **HYPER)
    assert float(full.loss.detach()) == float(flagged.loss.detach()) and full.length == 10
    assert full.student_entropy.shape == (4, 10) and not full.student_entropy.requires_grad


def test_non_finite_values_give_no_output(model, tensors):
    broken = dict(tensors, teacher_logps=tensors["teacher_logps"].clone())
    broken["teacher_logps"][2, 1, 0] = float("nan")
    phase = sgsd_loss_phase(model, **broken, **HYPER)
    assert phase.output is None and phase.loss is None and phase.polarity is None
    # a NaN outside the trimmed length is never read
    active = torch.tensor([False, True, False, False])
    assert sgsd_loss_phase(model, **broken, active=active, **HYPER).output is not None


def test_active_rollouts_decide_from_the_students_own_pass(model, tensors):
    def theta(value):
        return SGSDSettings(clip_delta=3.0, confidence_threshold=value)

    assert active_rollouts(model, **tensors, settings=theta(0.0), chunk_tokens=7).all()  # theta 0: none neutral
    assert not active_rollouts(model, **tensors, settings=theta(1e9), chunk_tokens=7).any()
    # a teacher that agrees exactly with the student is neutral: its rollouts are left out
    with torch.no_grad():
        student = completion_logprobs(model, tensors["prompt_ids"], tensors["prompt_mask"], tensors["completion_ids"],
                                      tensors["completion_mask"], chunk_tokens=7)
    agreeing = dict(tensors, teacher_logps=tensors["teacher_logps"].clone())
    agreeing["teacher_logps"][0] = student[0]
    assert active_rollouts(model, **agreeing, settings=theta(1e-9), chunk_tokens=7).tolist() == [False, True, True, True]

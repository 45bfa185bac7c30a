"""The benchmark's two loss phases compute the same SGSD loss and gradient (what makes timing them fair),
the naive path reproduces the public code's rotary gap on request, and the real path is the trainer's own
loss phase (the function `SGSDTrainer.method_loss` calls), not a copy of it."""

import dataclasses

import pytest
import torch

from sgsd.benchmarking.phases import naive_loss_phase, real_loss_phase
from sgsd.benchmarking.synthetic import BatchShape, SyntheticBatch, build_model, make_batch
from sgsd.loss_settings import SGSDSettings
from sgsd.tiny import ModelShape

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=64)
# theta = 0: a random model's |support| is far below the paper's 0.05 (every teacher would be neutral,
# the loss 0 and the gradient comparison empty).
SETTINGS = SGSDSettings(confidence_threshold=0.0, logprob_chunk_tokens=4096)


@pytest.fixture(scope="module")
def model():
    # float64 weights: the backbone's own rounding (different padding layouts, batch shapes) vanishes and
    # what is left is the fp32 log-softmax both paths share (each casts logits to fp32), ~1e-7 relative.
    return build_model(SHAPE, max_positions=64, dtype=torch.float64)


@pytest.fixture(scope="module")
def batch():
    # 3 rollouts of different completion lengths, 4 teachers with prompts of different lengths
    return make_batch(BatchShape(rollouts=3, teachers=4, completion_tokens=12, seed=1), SHAPE.vocab_size)


def _run(phase, model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = phase(model, batch, **kwargs)
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_batch_has_the_layout_the_comparison_needs(batch):
    lengths = batch.completion_mask.sum(-1).tolist()
    assert lengths[0] == 12 and min(lengths) < 12  # a full-length rollout and a shorter one
    assert len({len(p) for rows in batch.teacher_prompt_ids for p in rows}) > 1  # padding in both paths
    for student, rows in zip(batch.student_prompt_ids, batch.teacher_prompt_ids):
        assert all(p[-len(student):] == student for p in rows)  # guidance first, then the student prompt


def test_naive_and_real_paths_give_the_same_loss_and_gradient(model, batch):
    real, real_grads = _run(real_loss_phase, model, batch, settings=SETTINGS)
    naive, naive_grads = _run(naive_loss_phase, model, batch, settings=SETTINGS)
    assert torch.equal(real.polarity, naive.polarity)
    assert (real.polarity != 0).any() and real.loss != 0
    # fp32 log-probs of magnitude ~4 carry ~5e-7 rounding; the loss averages them: 1e-6 is tight.
    assert abs(float(real.loss) - float(naive.loss)) < 1e-6
    assert real_grads.keys() == naive_grads.keys() and len(real_grads) == len(list(model.parameters()))
    for name, grad in real_grads.items():
        scale = naive_grads[name].abs().max()
        assert scale > 0, name
        # observed max difference ~1e-6 of the tensor's largest entry (fp32 log-softmax); 1e-4 leaves room
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-4 * float(scale), rtol=0, msg=name)


def test_public_positions_shift_rotary_only_when_prompts_are_padded(model, batch):
    """docs/spec.md section 9 item 3: right padding + positions counted over all slots moves the completion."""
    plain, _ = _run(naive_loss_phase, model, batch, settings=SETTINGS)
    public, _ = _run(naive_loss_phase, model, batch, settings=SETTINGS, public_positions=True)
    # shifted positions change the teacher log-probs (here also some polarities): far above the ~1e-8
    # rounding of the loss seen below with equal layouts
    assert abs(float(plain.loss) - float(public.loss)) > 1e-6
    # equal prompt lengths: no gap, so both position schemes agree
    width = min(len(p) for rows in batch.teacher_prompt_ids for p in rows)
    short = min(len(s) for s in batch.student_prompt_ids)
    even = dataclasses.replace(
        batch, student_prompt_ids=[s[-short:] for s in batch.student_prompt_ids],
        teacher_prompt_ids=[[p[-width:] for p in rows] for rows in batch.teacher_prompt_ids])
    plain, _ = _run(naive_loss_phase, model, even, settings=SETTINGS)
    public, _ = _run(naive_loss_phase, model, even, settings=SETTINGS, public_positions=True)
    assert abs(float(plain.loss) - float(public.loss)) < 1e-9


def test_skip_neutral_rows_as_the_trainer_does(model, batch):
    base, base_grads = _run(real_loss_phase, model, batch, settings=SETTINGS)
    skip, skip_grads = _run(real_loss_phase, model, batch, settings=dataclasses.replace(SETTINGS, skip_neutral_rows=True))
    assert skip.active_rollouts == batch.num_rollouts  # theta = 0: no teacher is neutral
    assert abs(float(base.loss) - float(skip.loss)) < 1e-9
    for name, grad in base_grads.items():
        torch.testing.assert_close(skip_grads[name], grad, atol=1e-12, rtol=0)
    # every teacher neutral: no rollout is active, the trainer still runs row 0 (graph connected), zero loss
    none, none_grads = _run(real_loss_phase, model, batch,
                            settings=dataclasses.replace(SETTINGS, skip_neutral_rows=True, confidence_threshold=1e9))
    assert none.active_rollouts == 0 and float(none.loss) == 0 and (none.polarity == 0).all()
    assert none_grads and all(g.abs().max() == 0 for g in none_grads.values())


def test_real_path_runs_the_trainers_loss_phase(model, batch, monkeypatch):
    """Replacing `sgsd.loss_phase.sgsd_loss_phase` changes what the benchmark measures: it calls that function."""
    import sgsd.loss_phase

    calls = []
    original = sgsd.loss_phase.sgsd_loss_phase

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sgsd.loss_phase, "sgsd_loss_phase", recording)
    _run(real_loss_phase, model, batch, settings=SETTINGS)
    assert len(calls) == 1 and calls[0]["teacher_logps"].shape == (3, 4, 12) and calls[0]["active"] is None


def test_the_trainers_loss_is_the_same_function(monkeypatch):
    """... and so does SGSDTrainer's loss phase, with the batch's tensors and its settings."""
    from types import SimpleNamespace

    import sgsd.trainers.sgsd_trainer as trainer_module
    from sgsd.config import SGSDSettings

    class Called(Exception):
        pass

    def stub(model, **kwargs):
        raise Called(model, kwargs)

    monkeypatch.setattr(trainer_module, "sgsd_loss_phase", stub)
    settings = SGSDSettings(gate_tau=0.5, clip_delta=2.0, confidence_threshold=0.01)
    trainer = SimpleNamespace(settings=settings, chunk_tokens=7)
    inputs = {name: torch.zeros(2, 3) for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                                   "sgsd_mask", "rewards", "teacher_weights", "teacher_logps")}
    with pytest.raises(Called) as called:
        trainer_module.SGSDTrainer.sgsd_part(trainer, "model", inputs)
    model, kwargs = called.value.args
    assert model == "model" and kwargs["teacher_logps"] is inputs["teacher_logps"]
    assert kwargs["counted_mask"] is inputs["sgsd_mask"] and kwargs["active"] is None
    assert kwargs["settings"] is settings and kwargs["chunk_tokens"] == 7


def test_synthetic_batch_is_seeded():
    a = make_batch(BatchShape(rollouts=2, teachers=3, completion_tokens=16, seed=5), 100)
    b = make_batch(BatchShape(rollouts=2, teachers=3, completion_tokens=16, seed=5), 100)
    c = make_batch(BatchShape(rollouts=2, teachers=3, completion_tokens=16, seed=6), 100)
    assert a.teacher_prompt_ids == b.teacher_prompt_ids and torch.equal(a.completion_ids, b.completion_ids)
    assert a.teacher_prompt_ids != c.teacher_prompt_ids
    assert isinstance(a, SyntheticBatch) and torch.allclose(a.teacher_weights.sum(-1), torch.ones(2))
    assert int(a.completion_ids.max()) < 100 and int(a.completion_ids[a.completion_mask.bool()].min()) >= 1


@pytest.mark.parametrize("bad", [dict(hidden_size=30, num_heads=4), dict(vocab_size=0),
                                 dict(num_heads=4, num_kv_heads=3)])
def test_model_shape_rejects_inconsistent_sizes(bad):
    with pytest.raises(ValueError):
        ModelShape(**bad)


def test_synthetic_batch_needs_room_for_the_pad_id():
    with pytest.raises(ValueError, match="vocab must be at least 16"):
        make_batch(BatchShape(), 8)

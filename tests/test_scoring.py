"""Teacher scoring: chunked sampled-token log-probs equal a plain full forward; padding leaves no gap."""

import pytest
import torch

from sgsd.scoring import (
    completion_logprobs,
    countable_token_table,
    counted_mask,
    left_pad,
    position_ids_from_mask,
    score_teachers,
    token_logprobs,
    token_logprobs_and_entropy,
)

# fp32 on CPU: a batched forward with padding vs an unpadded one differs by summation order only;
# observed max |diff| ~5e-7, so 1e-5 is tight yet robust.
ATOL = 1e-5


def _reference_logps(model, prompt, completion):
    seq = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(seq).logits.float().log_softmax(-1)[0]
    start = len(prompt)
    return logits[start - 1 : -1].gather(-1, seq[0, start:, None]).squeeze(-1)


def _right_pad(completions, pad_id=0):
    t = max(len(c) for c in completions)
    ids = torch.full((len(completions), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), t), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return ids, mask


@pytest.fixture()
def batch(tiny_tokenizer):
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("Problem: What is 12 + 35?"), enc("x")]
    completions = [enc("We add 2 and 5. The answer is 47."), enc("9 9")]
    return prompts, completions


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_completion_logprobs_match_unpadded_forward(tiny_model, batch, chunk):
    prompts, completions = batch
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    comp_ids, comp_mask = _right_pad(completions)
    with torch.no_grad():
        got = completion_logprobs(tiny_model, prompt_ids, prompt_mask, comp_ids, comp_mask, chunk_tokens=chunk)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        torch.testing.assert_close(got[i, : len(c)], _reference_logps(tiny_model, p, c), atol=ATOL, rtol=0)


def test_chunked_gradient_equals_full_log_softmax(tiny_model):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, tiny_model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, tiny_model.config.vocab_size, (2, 5))
    head = tiny_model.lm_head
    chunked = token_logprobs(hidden, head, targets, chunk_tokens=3)
    full = head(hidden).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)
    g1 = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    g2 = torch.autograd.grad(full.sum(), [hidden, head.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_temperature_scales_logits(tiny_model):
    hidden = torch.randn(1, 4, tiny_model.config.hidden_size)
    targets = torch.randint(0, tiny_model.config.vocab_size, (1, 4))
    with torch.no_grad():
        got = token_logprobs(hidden, tiny_model.lm_head, targets, temperature=2.0)
        ref = (tiny_model.lm_head(hidden) / 2.0).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_score_teachers_equals_per_row_forward_and_skips_absent(tiny_model, batch, tiny_tokenizer):
    prompts, completions = batch
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    guidance = [enc("Hint: carry the one."), enc("A much longer hint about adding columns carefully, digit by digit.")]
    teacher_prompts = [[guidance[0] + prompts[0], None, guidance[1] + prompts[0]], [guidance[1] + prompts[1]]]
    comp_ids, comp_mask = _right_pad(completions)
    got = score_teachers(tiny_model, teacher_prompts, comp_ids, comp_mask, pad_id=0, batch_rows=2, chunk_tokens=5)
    assert got.shape == (2, 3, comp_ids.size(1))
    assert got[0, 1].abs().sum() == 0 and got[1, 1:].abs().sum() == 0  # absent teachers are never run
    for b, row in enumerate(teacher_prompts):
        for k, prompt in enumerate(row):
            if prompt is None:
                continue
            n = len(completions[b])
            torch.testing.assert_close(got[b, k, :n], _reference_logps(tiny_model, prompt, completions[b]),
                                       atol=ATOL, rtol=0)
            assert got[b, k, n:].abs().sum() == 0  # padding positions stay zero


def test_score_teachers_uses_the_teacher_context(tiny_model, batch):
    prompts, completions = batch
    comp_ids, comp_mask = _right_pad(completions)
    calls = []

    class Recorder:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    score_teachers(tiny_model, [[prompts[0]], [prompts[1]]], comp_ids, comp_mask, pad_id=0, teacher_context=Recorder)
    assert calls == ["enter", "exit"]


def test_counted_mask_drops_special_whitespace_and_think_tokens(tiny_tokenizer):
    table = countable_token_table(tiny_tokenizer)
    ids = tiny_tokenizer("<think>\n7</think>\n\n<|im_end|>", add_special_tokens=False)["input_ids"]
    comp = torch.tensor([ids + [tiny_tokenizer.pad_token_id]])
    mask = torch.tensor([[1] * len(ids) + [0]])
    kept = [tiny_tokenizer.decode([i]) for i, m in zip(comp[0].tolist(), counted_mask(comp, mask, table)[0]) if m]
    assert kept == ["7"]


def test_local_support_from_stored_teacher_sets_equals_full_vocabulary_terms(tiny_model):
    """The loss phase rebuilds the teacher side from top-k' + sampled log-probs: same values and gradients
    as `local_support_terms` on the full teacher logits (renormalising on the set removes the shift)."""
    from sgsd.objectives import local_support_terms
    from sgsd.scoring import local_support_student_terms

    torch.manual_seed(1)
    b, k, t, top_k = 2, 3, 5, 4
    head = tiny_model.lm_head
    v = head.weight.size(0)
    hidden = torch.randn(b, t, head.weight.size(1), requires_grad=True)
    teacher_logits = torch.randn(b, k, t, v) * 3
    sampled = torch.randint(0, v, (b, t))
    sampled[0, 0] = teacher_logits[0, 0, 0].argmax()  # a sampled token inside the teacher's top-k'
    teacher_lp = teacher_logits.log_softmax(-1)
    top = teacher_lp.topk(top_k, dim=-1)
    teacher_sampled = teacher_lp.gather(-1, sampled[:, None, :, None].expand(b, k, t, 1)).squeeze(-1)
    got = local_support_student_terms(hidden, head, sampled, teacher_sampled, top.values, top.indices,
                                      top_k=top_k, chunk_tokens=7)
    want = local_support_terms(head(hidden).float(), teacher_logits, sampled, top_k=top_k)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=ATOL, rtol=0)
    g_got = torch.autograd.grad(sum(x.sum() for x in (got[0], got[2])), hidden)[0]
    g_want = torch.autograd.grad(sum(x.sum() for x in (want[0], want[2])), hidden)[0]
    torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=0)


def test_entropy_diagnostic_matches_full_softmax(tiny_model):
    hidden = torch.randn(2, 3, tiny_model.config.hidden_size)
    targets = torch.randint(0, tiny_model.config.vocab_size, (2, 3))
    with torch.no_grad():
        logps, entropy = token_logprobs_and_entropy(hidden, tiny_model.lm_head, targets, chunk_tokens=4)
        full = tiny_model.lm_head(hidden).float().log_softmax(-1)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(logps, full.gather(-1, targets[..., None]).squeeze(-1), atol=ATOL, rtol=0)


def test_hidden_states_go_through_the_wrapper_forward(tiny_model):
    """DDP/DeepSpeed prepare gradient reduction in their forward: the model must be called through it."""
    from sgsd.scoring import hidden_for_completion

    class Wrapper(torch.nn.Module):  # the shape of DDP: `.module` and a forward that must run
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    wrapped = Wrapper(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    hidden = hidden_for_completion(wrapped, ids, torch.ones_like(ids), 2)
    assert wrapped.calls == 1 and hidden.shape == (1, 2, tiny_model.config.hidden_size)
    with torch.no_grad():
        full = tiny_model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, full[:, 2:4], atol=ATOL, rtol=0)


def test_frozen_copy_ignores_a_forward_bound_to_the_live_model(tiny_model):
    from sgsd.trainers.teacher_weights import FrozenCopy

    live_forward = tiny_model.forward
    tiny_model.forward = lambda *a, **k: live_forward(*a, **k)  # what accelerate/TRL wrapping does
    frozen = FrozenCopy(tiny_model)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)  # the live model moves on
        ids = torch.tensor([[5, 6, 7]])
        assert not torch.allclose(frozen.model(ids).logits, tiny_model(ids).logits)

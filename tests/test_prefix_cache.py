"""Prefix reuse in teacher scoring (`sgsd.prefix_cache`, `sgsd.scoring.row_batches`): the plan is found on
token ids, and scoring with shared prefixes run once equals scoring every row in full up to float summation
order: log-probs, entropies, the local-support top-k, polarity decisions, the loss and its gradient."""

from types import SimpleNamespace

import pytest
import torch

from sgsd.loss_phase import sgsd_loss_phase
from sgsd.loss_settings import SGSDSettings
from sgsd.objectives import teacher_polarity
from sgsd.prefix_cache import PrefixStore, no_checkpointing, plan_prefixes, reuse_blocker
from sgsd.prompts import ChatStyle
from sgsd.scoring import (completion_logprobs, hidden_for_completion, left_pad, right_pad, row_batches, score_teachers,
                          score_teachers_and_entropy, score_teachers_local, teacher_completion_hidden)
from sgsd.teacher_scoring import score_under_teachers

# fp32 on CPU. With reuse the same products are summed in other groupings: a prefix's keys and values come from a
# forward of other matrix shapes, and the suffix's attention spans [padded past | new] instead of one row. Each
# such sum carries a relative error of a few ulps (eps = 1.2e-7) of terms of size ~1-10 (the log-probs' scale
# here); the plain path's own padded-vs-unpadded difference is of the same kind and is bounded by 1e-5 in
# tests/test_scoring.py. Observed here: <= 1e-6.
ATOL = 1e-5


def _rng_tokens(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(5, vocab, (n,), generator=gen).tolist()


@pytest.fixture()
def rows(tiny_model):
    """Teacher prompts [header][guidance g][problem p] of 6 rollouts x 3 teachers: prefixes shared at two depths
    (header; header + guidance) and whole prompts shared by rollouts of one problem; one row shares nothing,
    one teacher is absent; completions of different lengths (right-padded)."""
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_model.config.vocab_size
    header = _rng_tokens(gen, 20, vocab)
    guidance = [_rng_tokens(gen, n, vocab) for n in (30, 45, 52, 38)]
    problems = [_rng_tokens(gen, n, vocab) for n in (12, 25, 18)]
    prompts = [[header + guidance[(b + j) % 4] + problems[b % 3] for j in range(3)] for b in range(6)]
    prompts[0][2] = _rng_tokens(gen, 40, vocab)  # shares no prefix with any row
    prompts[1][1] = None  # absent teacher
    completion_ids = torch.randint(5, vocab, (6, 25), generator=gen)
    completion_mask = torch.ones(6, 25, dtype=torch.long)
    for b in range(6):
        completion_mask[b, 10 + 3 * b :] = 0
    return prompts, completion_ids, completion_mask


def _both(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs, prefix_reuse=False), fn(*args, **kwargs, prefix_reuse=True)


# -- the plan ---------------------------------------------------------------------------------------------------


def test_plan_shares_prefixes_found_on_token_ids():
    header, g1, g2 = [1] * 40, [2] * 50, [3] * 50
    prompts = [header + g1 + [7, 8], header + g1 + [9, 10, 11], header + g2 + [7, 8], header + g2 + [7, 8],
               [4] * 30]
    plan = plan_prefixes(prompts)
    spans = [(n.start, n.end, n.parent) for n in plan.nodes]
    # the header (3 consumers), then header + g1 (2 rows) and header + g2 + [7] (two identical prompts, less
    # their last token, which runs with the row)
    assert spans == [(0, 40, -1), (40, 90, 0), (40, 91, 0)]
    assert [plan.prefix_end(r) for r in range(5)] == [90, 90, 91, 91, 0]
    assert plan.row_parent[4] == -1


def test_plan_leaves_small_savings_unshared():
    # 5 shared tokens x (2 - 1) consumers < MIN_SAVED_TOKENS: both rows run in full
    assert plan_prefixes([[1] * 5 + [2] * 10, [1] * 5 + [3] * 10]).nodes == ()
    assert len(plan_prefixes([[1] * 5 + [2] * 10, [1] * 5 + [3] * 10], min_saved_tokens=5).nodes) == 1
    assert plan_prefixes([]).nodes == ()


def test_store_frees_every_prefix_after_its_last_row(tiny_model, rows):
    import sgsd.scoring as scoring

    prompts, completion_ids, completion_mask = rows
    flat = [p for row in prompts for p in row if p is not None]
    rollout_of = [b for b, row in enumerate(prompts) for p in row if p is not None]
    stores = []
    original = PrefixStore.__init__

    def spy(self, plan):
        original(self, plan)
        stores.append(self)

    PrefixStore.__init__ = spy
    try:
        with torch.no_grad():
            seen = [r for batch in row_batches(tiny_model, flat, rollout_of, completion_ids, completion_mask,
                                               pad_id=0, batch_rows=4, prefix_reuse=True) for r in batch.rows]
    finally:
        PrefixStore.__init__ = original
    assert sorted(seen) == list(range(len(flat)))
    assert len(stores) == 1 and stores[0].kv == {} and not any(stores[0].waiting)
    assert scoring.shared_prefixes(flat) is not None  # the fixture does share prefixes


# -- exactness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_rows,chunk", [(4, 4096), (1, 3), (16, 7)])
def test_reuse_equals_full_rows(tiny_model, rows, batch_rows, chunk):
    prompts, completion_ids, completion_mask = rows
    (plain, plain_entropy), (reused, reused_entropy) = _both(
        score_teachers_and_entropy, tiny_model, prompts, completion_ids, completion_mask, pad_id=0,
        batch_rows=batch_rows, chunk_tokens=chunk)
    torch.testing.assert_close(reused, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(reused_entropy, plain_entropy, atol=ATOL, rtol=0)
    assert reused[1, 1].abs().sum() == 0  # the absent teacher is never run
    assert (reused[completion_mask[:, None, :].expand_as(reused) == 0] == 0).all()  # padding stays zero
    # and against one unpadded forward per row
    for b, row in enumerate(prompts):
        for k, prompt in enumerate(row):
            if prompt is None:
                continue
            n = int(completion_mask[b].sum())
            seq = torch.tensor([prompt + completion_ids[b, :n].tolist()])
            with torch.no_grad():
                ref = tiny_model(seq).logits.float().log_softmax(-1)[0, len(prompt) - 1 : -1]
            ref = ref.gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
            torch.testing.assert_close(reused[b, k, :n], ref, atol=ATOL, rtol=0)


def test_local_support_top_k_with_reuse(tiny_model, rows):
    prompts, completion_ids, completion_mask = rows
    plain, reused = _both(score_teachers_local, tiny_model, prompts, completion_ids, completion_mask, pad_id=0,
                          top_k=4, batch_rows=4, chunk_tokens=5)
    torch.testing.assert_close(reused[0], plain[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(reused[1], plain[1], atol=ATOL, rtol=0)
    # the top-k ids agree wherever the k-th and (k+1)-th log-probs are not tied within the tolerance
    assert (reused[2] == plain[2]).float().mean() > 0.99


def test_reuse_under_gradient_checkpointing_in_training_mode(tiny_model, rows):
    """transformers drops the cache of checkpointed layers in training mode; teacher scoring suspends
    checkpointing (no gradient flows there) and restores it."""
    prompts, completion_ids, completion_mask = rows
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    plain, reused = _both(score_teachers, tiny_model, prompts, completion_ids, completion_mask, pad_id=0, batch_rows=4)
    torch.testing.assert_close(reused, plain, atol=ATOL, rtol=0)
    assert all(layer.gradient_checkpointing for layer in tiny_model.model.layers)
    with no_checkpointing(tiny_model):
        assert not any(layer.gradient_checkpointing for layer in tiny_model.model.layers)
    assert all(layer.gradient_checkpointing for layer in tiny_model.model.layers)


def test_without_shared_prefixes_the_plain_path_runs_bit_for_bit(tiny_model):
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_model.config.vocab_size
    prompts = [[_rng_tokens(gen, n, vocab)] for n in (9, 30, 17)]
    completion_ids = torch.randint(5, vocab, (3, 8), generator=gen)
    completion_mask = torch.ones(3, 8, dtype=torch.long)
    plain, reused = _both(score_teachers, tiny_model, prompts, completion_ids, completion_mask, pad_id=0, batch_rows=2)
    assert torch.equal(plain, reused)


def test_sliding_window_models_score_in_full(tiny_model):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    assert reuse_blocker(tiny_model) is None
    config = tiny_model.config.to_dict()
    config.update(layer_types=["sliding_attention", "full_attention"], use_sliding_window=True, sliding_window=8)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    assert "sliding_attention" in reuse_blocker(model)
    header = list(range(5, 60))
    prompts = [[header + [70, 71]], [header + [72, 73, 74]]]
    completion_ids, completion_mask = torch.tensor([[80, 81], [82, 83]]), torch.ones(2, 2, dtype=torch.long)
    plain, reused = _both(score_teachers, model, prompts, completion_ids, completion_mask, pad_id=0)
    assert torch.equal(plain, reused)  # switched off: the plain path


# -- through the probe's path, with a real tokenizer's merges --------------------------------------------------


def test_bpe_merge_at_the_boundary_does_not_change_a_row(tiny_model, tiny_tokenizer):
    """Rendered prompts are tokenised whole; a prefix shared on ids never re-tokenises its pieces: where the
    guidance's last characters merge with what follows, each row is scored on its own ids."""
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("the answer") != enc("the ans") + enc("wer")  # a merge across the split point
    base = "## General Principles **Carry the one**: when a column sum exceeds 9, carry. Apply when: adding the ans"
    guidance = [base + "wer", base + "wers", base + " columns"]
    teachers = [[SimpleNamespace(guidance=g, weight=1 / 3) for g in guidance]] * 2
    problems = ["What is 12 + 35?", "What is 40 + 2?"]
    completions = [enc("We add 2 and 5. The answer is 47."), enc("9 9 carry")]
    completion_ids, completion_mask = right_pad(completions, tiny_tokenizer.pad_token_id)
    style = ChatStyle(enable_thinking=False)
    scores = {reuse: score_under_teachers(tiny_model, tiny_tokenizer, problems, teachers, completion_ids,
                                          completion_mask, settings=SGSDSettings(num_teachers=3, prefix_reuse=reuse),
                                          style=style, chunk_tokens=64)
              for reuse in (False, True)}
    torch.testing.assert_close(scores[True].teacher_logps, scores[False].teacher_logps, atol=ATOL, rtol=0)
    # the rows do share a prefix, so reuse was exercised
    from sgsd.teacher_scoring import prompt_ids

    flat = [ids for p in problems for ids in prompt_ids(tiny_tokenizer, p, guidance, style, 3)]
    plan = plan_prefixes(flat)
    assert plan.nodes
    for r, parent in enumerate(plan.row_parent):  # a row continues a prefix that is its own leading ids
        if parent >= 0:
            end = plan.prefix_end(r)
            assert flat[r][:end] == flat[plan.nodes[parent].row][:end]


# -- decisions, loss and gradient ------------------------------------------------------------------------------


def test_polarity_loss_and_gradient_agree(tiny_model, rows):
    prompts, completion_ids, completion_mask = rows
    b, k = 6, 3
    plain, reused = _both(score_teachers, tiny_model, prompts, completion_ids, completion_mask, pad_id=0, batch_rows=4)
    gen = torch.Generator().manual_seed(2)
    vocab = tiny_model.config.vocab_size
    student_prompts = [_rng_tokens(gen, n, vocab) for n in (10, 14, 9, 12, 11, 13)]
    prompt_ids, prompt_mask = left_pad(student_prompts, 0)
    weights = torch.full((b, k), 1 / k)
    weights[1, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    counted = completion_mask.bool()
    settings = SGSDSettings(num_teachers=k, confidence_threshold=0.0)
    with torch.no_grad():
        student_logps = completion_logprobs(tiny_model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    decisions = {}
    for name, teacher in (("plain", plain), ("reused", reused)):
        support, polarity = teacher_polarity(student_logps, teacher, counted, rewards, weights, settings=settings)
        decisions[name] = (support, polarity)
    # decisions identical, and not by luck: every present support is far from the threshold (0) compared
    # with the log-prob tolerance
    assert torch.equal(decisions["plain"][1], decisions["reused"][1])
    present = weights > 0
    assert decisions["plain"][0][present].abs().min() > 100 * ATOL
    grads, losses = {}, {}
    for name, teacher in (("plain", plain), ("reused", reused)):
        tiny_model.zero_grad(set_to_none=True)
        phase = sgsd_loss_phase(tiny_model, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                                completion_ids=completion_ids, completion_mask=completion_mask, counted_mask=counted,
                                rewards=rewards, teacher_weights=weights, teacher_logps=teacher, chunk_tokens=64,
                                settings=settings)
        phase.loss.backward()
        losses[name] = phase.loss.detach()
        grads[name] = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    # tolerances of the loss-phase equivalence test (tests/test_bench_phases.py): loss within 1e-6, every
    # gradient within 1e-4 of its largest entry
    torch.testing.assert_close(losses["reused"], losses["plain"], atol=1e-6, rtol=0)
    for name, grad in grads["plain"].items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (grads["reused"][name] - grad).abs().max() <= 1e-4 * scale, name


def test_opsd_teacher_hidden_with_shared_prompts(tiny_model):
    gen = torch.Generator().manual_seed(3)
    vocab = tiny_model.config.vocab_size
    shared = _rng_tokens(gen, 40, vocab)
    prompts = [shared, shared, shared + [9, 10], _rng_tokens(gen, 12, vocab)]  # one problem's rollouts and others
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    completion_ids = torch.randint(5, vocab, (4, 6), generator=gen)
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 6])
    plain, reused = _both(teacher_completion_hidden, tiny_model, prompt_ids, prompt_mask, completion_ids,
                          completion_mask, pad_id=0)
    keep = completion_mask.bool()
    torch.testing.assert_close(reused[keep], plain[keep], atol=ATOL, rtol=0)
    assert torch.equal(plain, hidden_for_completion(tiny_model, torch.cat([prompt_ids, completion_ids], 1),
                                                    torch.cat([prompt_mask, completion_mask], 1), 6))


@pytest.mark.parametrize("batch_rows", [1, 4, 100])
def test_forward_count_that_other_ranks_are_matched_to(tiny_model, rows, batch_rows):
    """Under several processes each rank pads its teacher forwards to the busiest rank's count (a ZeRO-3 / FSDP
    forward is a collective): the count `_forwards` reports must be the forwards `row_batches` makes."""
    from sgsd.scoring import _forwards, shared_prefixes

    prompts, completion_ids, completion_mask = rows
    flat = [p for row in prompts for p in row if p is not None]
    rollout_of = [b for b, row in enumerate(prompts) for p in row if p is not None]
    calls = []
    handle = tiny_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for reuse in (False, True):
            calls.clear()
            with torch.no_grad():
                for _ in row_batches(tiny_model, flat, rollout_of, completion_ids, completion_mask, pad_id=0,
                                     batch_rows=batch_rows, prefix_reuse=reuse):
                    pass
            plan = shared_prefixes(flat) if reuse else None
            assert len(calls) == _forwards(plan, len(flat), batch_rows), reuse
    finally:
        handle.remove()

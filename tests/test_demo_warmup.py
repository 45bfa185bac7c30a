"""The demo's warm-up, cache, evaluation and probes, on a very small model (seconds, not minutes)."""

from __future__ import annotations

import math
import random
import stat

import pytest

from sgsd.demo.evaluate import accuracy, estimate, sample, student_text
from sgsd.demo.warmup import (
    HINT,
    PLAIN,
    REFERENCE,
    WarmupConfig,
    encode_batch,
    load_seed_bank,
    sample_example,
    warm_start,
)
from sgsd.demo.world import WorldConfig
from sgsd.errors import ConfigError
from sgsd.tiny import ModelShape

TINY = WarmupConfig(
    world=WorldConfig(seed=1, num_train=200, num_test=12, min_terms=3, max_terms=4),
    model=ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=400),
    steps=40, early_steps=10, batch_sizes=(8, 4, 4), learning_rate=5e-3, warmup_steps=5,
)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    import torch

    # One thread: a model this small gains nothing from two, and on a busy machine the second
    # thread's barriers make every op several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield warm_start(TINY, cache_root=tmp_path_factory.mktemp("demo-cache"))
    finally:
        torch.set_num_threads(threads)


def test_warmup_lowers_the_loss_and_caches(warm, tmp_path_factory):
    losses = warm.report.losses
    assert len(losses) == TINY.steps and all(math.isfinite(x) for x in losses)
    # From ~ln(vocab) = 6 at initialisation; 40 steps on the highly regular solutions must at least
    # halve it (measured: ~6.0 -> ~2.0).
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert not warm.from_cache and (warm.path / "warmup.json").exists() and warm.path.name == TINY.digest()
    # the cache folder (made by mkdtemp, 0700) and its weights (safetensors writes 0600) get the umask's modes
    from sgsd.storage import plain_dir_mode, plain_file_mode

    assert stat.S_IMODE(warm.path.stat().st_mode) == plain_dir_mode()
    assert {stat.S_IMODE(p.stat().st_mode) for p in warm.path.iterdir()} == {plain_file_mode()}
    again = warm_start(TINY, cache_root=warm.path.parent)
    assert again.from_cache and again.report == warm.report
    assert again.tokenizer.padding_side == "left" and len(again.tokenizer) == len(warm.tokenizer)
    import torch

    for mine, cached in zip(warm.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(mine, cached)


def test_config_digest_changes_with_the_config():
    from dataclasses import replace

    assert TINY.digest() == replace(TINY).digest()
    assert TINY.digest() != replace(TINY, steps=41).digest()
    assert TINY.digest() != replace(TINY, world=replace(TINY.world, seed=2)).digest()
    with pytest.raises(ConfigError, match="kind_mix"):
        replace(TINY, kind_mix=(0.5, 0.5, 0.5))


def test_examples_use_the_project_prompts_and_hint_dependent_rates():
    from sgsd.demo.world import make_world
    from sgsd.prompts import GUIDANCE_PREAMBLE, OPSD_INSTRUCTION, student_prompt

    world, bank = make_world(TINY.world), load_seed_bank()
    rng = random.Random(0)
    problem = world.train[0]
    text, solution = sample_example(problem, PLAIN, TINY, bank, rng)
    assert text == student_prompt(problem.problem) and solution.endswith("}")
    text, _ = sample_example(problem, HINT, TINY, bank, rng)
    assert text.startswith(GUIDANCE_PREAMBLE) and text.endswith(student_prompt(problem.problem))
    text, _ = sample_example(problem, REFERENCE, TINY, bank, rng)
    assert OPSD_INSTRUCTION in text and f"\\boxed{{{problem.answer}}}" in text
    # Helpful pairs make fewer forgotten carries than misleading pairs (rates 0.02 vs 0.85).
    assert TINY.rates_for_effect(2).forget_carry < TINY.rates_for_effect(0).forget_carry < TINY.rates_for_effect(-2).forget_carry


def test_encode_batch_trains_only_on_completions(warm):
    tok = warm.tokenizer
    input_ids, attention_mask, labels = encode_batch(tok, ["Problem: What is 1 + 2?", "x"], ["1+2=3\n\\boxed{3}", "a"])
    for row in range(2):
        trained = labels[row] != -100
        text = tok.decode(input_ids[row][trained])
        assert text == ["1+2=3\n\\boxed{3}", "a"][row] + tok.eos_token
        assert attention_mask[row].sum() == (input_ids[row] != tok.pad_token_id).sum()


def test_sampled_rollouts_hold_what_the_backend_generated(warm):
    """The backend's batching and seeding are tested in tests/test_eval_harness.py; here: the [N, T] layout
    the polarity probe scores (ids up to and including the end-of-turn token, right-padded)."""
    tok = warm.tokenizer
    texts = [student_text(p) for p in warm.world.test[:3]]
    rollouts = sample(warm.model, tok, texts, num_samples=2, max_new_tokens=10, seed=5)
    assert len(rollouts.texts) == 6 and rollouts.completion_ids.shape == rollouts.completion_mask.shape
    assert rollouts.texts == sample(warm.model, tok, texts, num_samples=2, max_new_tokens=10, seed=5).texts
    for text, ids, mask in zip(rollouts.texts, rollouts.completion_ids, rollouts.completion_mask):
        kept = ids[mask.bool()].tolist()
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # ones, then padding
        assert (ids[~mask.bool()] == tok.pad_token_id).all()
        ended = kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1] if ended else kept, skip_special_tokens=True) == text
        assert ended or len(kept) == 10  # no end-of-turn token only when cut at max_new_tokens


def test_accuracy_estimate_and_interval(warm):
    result = accuracy(warm.model, warm.tokenizer, warm.world.test, k=2, max_new_tokens=40)
    assert result.num_problems == len(warm.world.test) and result.samples_per_problem == 2
    assert result.ci_low <= result.mean <= result.ci_high
    assert all(v in (0.0, 0.5, 1.0) for v in result.per_problem)


def test_estimate_is_the_mean_with_the_harness_interval():
    from sgsd.evaluation.metrics import bootstrap_ci

    est = estimate([1.0, 0.0, 1.0, 1.0], 1, seed=3)
    assert est.mean == 0.75 and (est.ci_low, est.ci_high) == bootstrap_ci([1.0, 0.0, 1.0, 1.0], seed=3)


def test_polarity_support_matches_a_plain_forward(warm):
    import torch

    from sgsd.demo.hints import POLARITY_KINDS, polarity_table, teacher_text
    from sgsd.demo.warmup import demo_chat_style
    from sgsd.prompts import render_chat
    from sgsd.scoring import countable_token_table

    problems = list(warm.world.test[:5])
    bank = load_seed_bank()
    report = polarity_table(warm.model, warm.tokenizer, problems, bank, thetas=(0.05, 0.0), max_new_tokens=30)
    assert len(report.rows) == 4 * len(POLARITY_KINDS)  # two thresholds, and the z test at 1.96 and 1.0
    for row in report.rows:
        assert math.isclose(row.positive + row.neutral + row.negative, 1.0, abs_tol=1e-6)  # float32 fractions
    # theta = 0: every teacher with nonzero support is polarised.
    assert all(r.neutral == pytest.approx(float((report.support[:, POLARITY_KINDS.index(r.teacher)] == 0).float().mean()))
               for r in report.rows if r.test == "threshold" and r.theta == 0.0)
    # a stricter z can only leave more teachers neutral
    by_rule = {(r.rule, r.teacher): r for r in report.rows}
    assert all(by_rule["z1.96", kind].neutral >= by_rule["z1", kind].neutral for kind in POLARITY_KINDS)

    # Reference: one rollout, unpadded, full-vocabulary log-softmax.
    tok, model, style = warm.tokenizer, warm.model, demo_chat_style()
    rollouts = report.rollouts
    completion = rollouts.completion_ids[0][rollouts.completion_mask[0].bool()]
    table = countable_token_table(tok)

    def logps(user_text: str) -> torch.Tensor:
        prompt = torch.tensor(tok(render_chat(tok, user_text, style), add_special_tokens=False).input_ids)
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, completion[:, None])[:, 0]

    # the misleading teacher of rollout 0 (its pair is keyed by the problem and the seed, as the table keys it)
    k = POLARITY_KINDS.index("misleading")
    key = f"{problems[0].problem_id}:0"
    d = (logps(teacher_text(bank, "misleading", problems[0], key)) - logps(student_text(problems[0]))).clamp(-3, 3)
    expected = d[table[completion]].sum() / max(int(table[completion].sum()), 1)
    # Same rollout, same weights, no padding: fp32 log-probs summed over < 40 tokens agree to 1e-4.
    assert float(report.support[0, k]) == pytest.approx(float(expected), abs=1e-4)


def test_one_ulp_perturbation_moves_every_weight_by_one_ulp_and_is_cached(warm):
    import torch
    from transformers import Qwen3ForCausalLM

    from sgsd.demo.warmup import perturbed_warm_start, weights_sha256

    noisy = perturbed_warm_start(warm)
    assert not noisy.from_cache and noisy.path.name == f"{warm.path.name}-ulp"
    assert weights_sha256(noisy.path) != weights_sha256(warm.path)
    original = Qwen3ForCausalLM.from_pretrained(warm.path).state_dict()
    moved = Qwen3ForCausalLM.from_pretrained(noisy.path).state_dict()
    ups = total = 0
    for name, before in original.items():
        after = moved[name]
        assert bool((after != before).all()), name  # every weight moved...
        assert torch.equal(torch.nextafter(after, before), before), name  # ...by exactly one ulp
        ups += int((after > before).sum())
        total += before.numel()
    # Up or down at random: tens of thousands of weights, so the share of ups is 0.5 within a few
    # thousandths (binomial standard error < 0.005 here); 0.05 cannot fail by chance.
    assert abs(ups / total - 0.5) < 0.05
    again = perturbed_warm_start(warm)
    assert again.from_cache and weights_sha256(again.path) == weights_sha256(noisy.path)


def test_a_second_process_waits_for_the_warm_up_in_progress_and_loads_it(warm, tmp_path, monkeypatch, capsys):
    """Two demos with different output directories share the cache: while one trains an entry (holding
    its lock), the other waits and then loads the result instead of training it again."""
    import shutil
    import threading

    import torch

    from sgsd.demo import warmup
    from sgsd.run_dir import waiting_lock

    entry = tmp_path / TINY.digest()
    held, go = threading.Event(), threading.Event()

    def other_process() -> None:  # flock conflicts between two open descriptions, even in one process
        with waiting_lock(tmp_path / f".{entry.name}.lock"):
            held.set()
            go.wait(10)
            shutil.copytree(warm.path, entry)  # its warm-up finished and was saved

    def trained_again(*args, **kwargs):
        raise AssertionError("the warm start was trained a second time")

    monkeypatch.setattr(warmup, "build_untrained", trained_again)
    other = threading.Thread(target=other_process)
    other.start()
    assert held.wait(10)
    threading.Timer(0.3, go.set).start()  # finish while warm_start below waits
    loaded = warm_start(TINY, cache_root=tmp_path)
    other.join()
    assert loaded.from_cache and loaded.report == warm.report
    assert all(torch.equal(a, b) for a, b in zip(warm.model.state_dict().values(), loaded.model.state_dict().values()))
    assert f"warm start {entry}: another process (pid " in capsys.readouterr().err

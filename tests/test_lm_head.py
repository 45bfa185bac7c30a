"""The chunked LM head (`sgsd.lm_head`, used by `sgsd.scoring`) equals a plain full log-softmax (values,
gradients) with one [chunk, V] buffer, and the peak-memory measurement it is judged by sees torch's
CPU allocations exactly."""

import pytest
import torch

from sgsd.benchmarking.measure import peak_memory, time_phase
from sgsd.lm_head import chunk_tokens_for_budget, token_logprobs, token_logprobs_and_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _head(vocab, hidden, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.mul_(20)  # peaked distributions: large logits exercise the max-subtraction
    return head


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_values_and_gradients_equal_full_log_softmax(chunk, temperature, bias):
    head = _head(50, 16, bias)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    upstream = torch.randn(3, 7)
    got = token_logprobs(hidden, head, targets, chunk_tokens=chunk, temperature=temperature)
    want = (head(hidden).float() / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    # both cast the (fp64) logits to fp32 before the log-softmax: values agree to fp32 rounding of
    # log-probs of magnitude up to ~100 here (~1e-5); gradients are formed in fp32 the same way
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-6)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    for g, w in zip(torch.autograd.grad((got * upstream).sum(), params),
                    torch.autograd.grad((want * upstream).sum(), params)):
        torch.testing.assert_close(g, w, atol=1e-5 * float(w.abs().max()), rtol=0)


def test_entropy_and_no_grad_path():
    head = _head(40, 8, False)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    targets = torch.randint(0, 40, (2, 5))
    logits = head(hidden).float() / 0.5
    want_logps = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    with torch.no_grad():
        logps, entropy = token_logprobs_and_entropy(hidden, head, targets, chunk_tokens=3, temperature=0.5)
    torch.testing.assert_close(logps, want_logps, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(entropy, want_entropy, atol=2e-5, rtol=1e-5)
    assert not logps.requires_grad
    empty = token_logprobs(hidden[:, :0], head, targets[:, :0])
    assert empty.shape == (2, 0)


def test_one_chunk_buffer_instead_of_several():
    """Peak tensor memory in units of one fp32 [256, 4096] buffer (4 MiB)."""
    head = _head(4096, 32, False, dtype=torch.float32)
    targets = torch.randint(0, 4096, (1, 256))
    buffer_mb = 256 * 4096 * 4 / 2**20
    frozen = torch.randn(1, 256, 32)
    trained = torch.randn(1, 256, 32, requires_grad=True)

    def no_grad():
        with torch.no_grad():
            token_logprobs(frozen, head, targets)

    def with_grad():
        token_logprobs(trained, head, targets).sum().backward()

    def reset():
        head.zero_grad(set_to_none=True)
        trained.grad = None

    peaks = (peak_memory(no_grad).peak_mb / buffer_mb, peak_memory(with_grad, before=reset).peak_mb / buffer_mb)
    # the buffer plus per-token vectors, and in the backward the [V, H] weight gradient (0.5 MiB): at most
    # 1.2 buffers (the earlier checkpointed head held 3, and 5 in the backward: docs/performance.md)
    assert peaks[0] < 1.05 and peaks[1] < 1.2


def test_peak_memory_sees_torch_cpu_allocations():
    def phase():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB: peak 12 MB with a
        del a
        c = torch.ones(500_000)  # 2 MB: 10 MB, below the peak
        return b, c

    peak = peak_memory(phase)
    assert 12_000_000 <= peak.peak_mb * 2**20 <= 12_000_000 + 4096  # a few bytes of scalars at most


def test_time_phase_runs_warmup_and_repeats_after_before():
    calls = []
    timing = time_phase(lambda: calls.append("run"), repeats=3, warmup=2, before=lambda: calls.append("before"))
    assert calls == ["before", "run"] * 5
    assert len(timing.repeats) == 3 and timing.min_s <= timing.median_s <= timing.max_s
    with pytest.raises(ValueError):
        time_phase(lambda: None, repeats=0, warmup=0)


def test_chunk_tokens_for_budget():
    # 1 GiB / (151,936 x (4 + 2) bytes) = 1,177.9 -> 1,177 rows (fp32 buffer + bf16 logits per row)
    assert chunk_tokens_for_budget(151_936, 2**30) == 1177
    assert chunk_tokens_for_budget(8192, 2**30) == 16384  # clamped to the maximum
    assert chunk_tokens_for_budget(151_936, 1) == 64  # clamped to the minimum
    with pytest.raises(ValueError):
        chunk_tokens_for_budget(0, 2**30)

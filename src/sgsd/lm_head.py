"""Sampled-token log-probs from final hidden states, one [chunk, V] fp32 buffer at a time.

log p(y_t) = z_y - logsumexp(z) (docs/spec.md section 9 item 2): no full-vocabulary log-softmax of every row is
ever materialised. Per chunk of token rows ONE fp32 buffer of logits is formed; the logsumexp is done
in place (max, subtract, exp, sum); the token entropy, when asked, comes from the same buffer:
H = log S - sum(e log e) / S with e = exp(z - max), S = sum e. With gradient a custom autograd function
saves only the hidden states and the per-token logsumexp; its backward recomputes each chunk's logits
into one buffer and turns it in place into the logits' gradient g * (onehot(y) - softmax) / temperature
before the two matmuls (hidden and weight gradients).

For Qwen3's V = 151,936 a 4096-token chunk buffer is 2.5 GB; `chunk_tokens_for_budget` picks a chunk
size from a memory budget. Measured against the earlier checkpointed head (several buffers per chunk):
equal values and gradients, 23-33% less time and ~0.2x instead of ~0.6x the naive pattern's peak memory
at V >= 65k (docs/performance.md).

The head's weight is read outside the model's forward. Under DeepSpeed ZeRO-3 it is partitioned there
(an empty tensor on every rank): `head_weights` is the one place every reader goes through, and it
returns the full weight under ZeRO-3 as well (see there).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import FunctionCtx
from torch.distributed.tensor import DTensor


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _inplace_logsumexp(logits: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logsumexp, entropy or None) over the last dim; destroys `logits`."""
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = logits.sub_(top).exp_()
    total = e.sum(dim=-1)
    lse = total.log() + top.squeeze(-1)
    if not with_entropy:
        return lse, None
    torch.xlogy(e, e, out=e)  # e log e, 0 where e underflowed to 0
    return lse, total.log() - e.sum(dim=-1) / total


def _forward_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    chunk: int, temperature: float, with_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs [N], logsumexp [N], entropy [N] or None), fp32, for hidden [N, H], targets [N]; no graph."""
    n = hidden.size(0)
    logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    with torch.no_grad():
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            logits = _chunk_logits(hidden[sl], weight, bias, temperature)
            picked = logits.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
            lse[sl], chunk_entropy = _inplace_logsumexp(logits, with_entropy)
            logps[sl] = picked - lse[sl]
            if entropy is not None:
                entropy[sl] = chunk_entropy
    return logps, lse, entropy


class LMHead(Protocol):
    """An LM head as the readers below see it: a linear layer, or `sgsd.scoring.HeadWeights`."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]


class _SampledTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden W^T + b)[y] / temperature in fp32, recomputing each chunk's logits in the backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, temperature: float,
                with_entropy: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ctx.with_entropy = with_entropy
        logps, lse, entropy = _forward_chunks(hidden, weight, bias, targets, chunk, temperature, ctx.with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
            return logps, entropy
        return logps

    @staticmethod
    def backward(ctx: FunctionCtx, grad_logps: torch.Tensor,
                 *_grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # accumulated in the weight's dtype, as autograd accumulates the chunks of the checkpointed head
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        scale = 1.0 / ctx.temperature
        for start in range(0, hidden.size(0), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            g = grad_logps[sl].float()
            with torch.no_grad():
                # d logp_y / d logits = onehot(y) - softmax; times the upstream gradient and 1/temperature
                grad_logits = _chunk_logits(hidden[sl], weight, bias, ctx.temperature)
                grad_logits.sub_(lse[sl].unsqueeze(-1)).exp_().mul_(-(g * scale).unsqueeze(-1))
                grad_logits.scatter_add_(-1, targets[sl].unsqueeze(-1), (g * scale).unsqueeze(-1))
                # back to the head's dtype (as the backward of `.float()` does), then the linear backward
                grad_logits = grad_logits.to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[sl] = (grad_logits @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), hidden[sl].to(weight.dtype))
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _is_partitioned(weight: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 owns `weight` (it tags every parameter it partitions with `ds_id`)."""
    return hasattr(weight, "ds_id")


def head_weights(head: LMHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of an LM head (a module or `sgsd.scoring.HeadWeights`), usable
    outside the model's forward, with gradient flowing to the head's parameters when enabled.

    A plain head: its own parameters. FSDP2 shards them as DTensors: `full_tensor()`, an all-gather
    whose backward reduce-scatters the gradient. Under DeepSpeed ZeRO-3 each rank holds a slice of the
    weight, and the whole is there only while the head's own module runs: with gradient, the weight is
    read by calling the module on the H x H identity (I W^T = W^T, exact: each entry is one product by 1
    plus zeros), so ZeRO-3 gathers it as for any call of the head, and in the backward gathers again and
    reduce-scatters its gradient (one [H, V] matmul and one [H, V] copy per call); without gradient
    (teacher scoring), a gathered copy. Measured against ZeRO-2 and DDP in tests/test_deepspeed.py.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor):  # FSDP2: a differentiable all-gather (its backward reduce-scatters)
        return weight.full_tensor(), bias.full_tensor() if bias is not None else None
    if not _is_partitioned(weight):
        return weight, bias
    if bias is not None:
        raise ValueError("an LM head with a bias is not supported under DeepSpeed ZeRO-3 (Qwen, Llama: no bias)")
    if not (torch.is_grad_enabled() and weight.requires_grad):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone(), None
    hidden_size = int(weight.ds_shape[1])
    identity = torch.eye(hidden_size, dtype=weight.dtype, device=weight.device)
    return head(identity).t(), None


def head_vocab_size(head: LMHead) -> int:
    """V of an LM head, whether or not ZeRO-3 has partitioned its weight."""
    weight = head.weight
    return int(weight.ds_shape[0] if _is_partitioned(weight) else weight.size(0))


def token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, target_ids: torch.Tensor, *,
                   chunk_tokens: int = 4096, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[target] in fp32, chunked over token rows.

    hidden [N, T, H], target_ids [N, T] -> [N, T] fp32; gradient flows to hidden and the head's weight
    (and bias) when enabled. One [chunk, V] fp32 buffer at a time (module docstring). With the token
    entropies too: `token_logprobs_and_entropy`.
    """
    return _token_logprobs(hidden, lm_head, target_ids, chunk_tokens=chunk_tokens, temperature=temperature,
                           with_entropy=False)[0]


def token_logprobs_and_entropy(hidden: torch.Tensor, lm_head: torch.nn.Module, target_ids: torch.Tensor, *,
                               chunk_tokens: int = 4096, temperature: float = 1.0
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(`token_logprobs`, the detached token entropy [N, T] of softmax(logits / temperature)), from the
    same chunks."""
    logps, entropy = _token_logprobs(hidden, lm_head, target_ids, chunk_tokens=chunk_tokens,
                                     temperature=temperature, with_entropy=True)
    assert entropy is not None
    return logps, entropy


def _token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, target_ids: torch.Tensor, *,
                    chunk_tokens: int, temperature: float, with_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, t, h = hidden.shape
    if n * t == 0:
        empty = hidden.new_zeros((n, t), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    flat_hidden = hidden.reshape(n * t, h)
    flat_targets = target_ids.reshape(n * t)
    weight, bias = head_weights(lm_head)
    chunk = max(int(chunk_tokens), 1)
    needs_grad = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        out = _SampledTokenLogprobs.apply(flat_hidden, weight, bias, flat_targets, chunk, temperature, with_entropy)
        logps, entropy = out if with_entropy else (out, None)
    else:
        logps, _, entropy = _forward_chunks(flat_hidden, weight, bias, flat_targets, chunk, temperature, with_entropy)
    return logps.reshape(n, t), (entropy.reshape(n, t) if with_entropy else None)


def chunk_tokens_for_budget(vocab_size: int, budget_bytes: int, *, minimum: int = 64, maximum: int = 16384) -> int:
    """Token rows per chunk so that one fp32 [chunk, V] buffer (+ a bf16 copy of the logits) fits `budget_bytes`.

    E.g. 1 GiB at V = 151,936: 1,177 rows; at V = 8,192: 16,384 (the maximum). Clamped to [minimum, maximum].
    """
    if vocab_size < 1 or budget_bytes < 1:
        raise ValueError(f"vocab_size and budget_bytes must be positive, got {vocab_size}, {budget_bytes}")
    per_row = vocab_size * (4 + 2)
    return int(min(max(budget_bytes // per_row, minimum), maximum))


def resolve_chunk_tokens(chunk_tokens: int, budget_mb: int, vocab_size: int) -> int:
    """A `logprob_chunk_tokens` setting as every method reads it: a row count, or 0 for as many rows as
    fit one fp32 [chunk, V] buffer of `budget_mb` MiB (`logprob_chunk_mb`)."""
    if chunk_tokens < 0:
        raise ValueError(f"logprob_chunk_tokens={chunk_tokens}: must be >= 0 (0 = from the memory budget)")
    return chunk_tokens or chunk_tokens_for_budget(vocab_size, budget_mb * 2**20)

"""Sampled-token log-probs without materialising full-vocabulary log-softmax, and K-teacher scoring.

docs/spec.md sections 4 and 9 (defects 1-3, 8). The student is run ONCE per rollout (with gradient, in the
loss phase); the K teachers of every rollout are run here without gradient, flattened into rows of
(rollout, teacher), sorted by length and batched, each row = [teacher prompt ; student completion].

- Log-probs of the sampled tokens are computed from the final hidden states in chunks of token rows
  (`sgsd.lm_head.token_logprobs`): one fp32 [chunk, V] buffer at a time, recomputed in the backward,
  never T x V per row.
- Prompts are left-padded and position ids come from the attention mask (cumsum - 1), so the
  completion follows its prompt with no rotary gap, whatever the padding.
- Completions are trimmed to the longest completion of each teacher batch (no compute on the
  global padding); absent teachers (weight 0) are not run at all.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedTokenizerBase

from sgsd.distributed import gather_objects, world_size
from sgsd.lm_head import head_weights, token_logprobs, token_logprobs_and_entropy
from sgsd.objectives import OPSDLossOutput, local_support_terms, opsd_loss
from sgsd.prefix_cache import PrefixPlan, PrefixStore, no_checkpointing, plan_prefixes, reuse_applies


def lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder backbone, LM head) of a causal LM, through PEFT and accelerate wrappers."""
    base = model
    if hasattr(base, "get_base_model"):  # PeftModel
        base = base.get_base_model()
    base = getattr(base, "module", base)  # DDP wrapper
    head = base.get_output_embeddings()
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return backbone, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left or inner padding leaves no gap."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_for_completion(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          num_completion_tokens: int) -> torch.Tensor:
    """Final hidden states [N, T, H] at the positions that predict the last T tokens of `input_ids`.

    The model is called through its own forward (and so through any DDP / DeepSpeed / PEFT wrapper,
    whose hooks prepare gradient reduction) with `logits_to_keep=1`, so the LM head runs on one
    position only; the output of the decoder's final norm is captured by a forward hook. The
    sampled-token log-probs are then computed from these states in chunks (`token_logprobs`).
    """
    hidden = final_hidden(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    return hidden[:, -num_completion_tokens - 1 : -1]


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
    """The decoder's final-norm output [N, L, H] at every position of `input_ids`, after the keys and values
    of `cache` (None: no past; the cache is extended in place). `attention_mask` covers past and new tokens."""
    backbone, _ = lm_parts(model)
    norm = getattr(backbone, "norm", None)
    past = {} if cache is None else {"past_key_values": cache}
    if norm is None:  # architectures without a final `norm` module: call the decoder directly
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=cache is not None, **past)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=cache is not None, logits_to_keep=1, **past)
    finally:
        handle.remove()
    return captured[-1]


def completion_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, *, chunk_tokens: int = 4096,
                        temperature: float = 1.0) -> torch.Tensor:
    """Sampled-token log-probs [B, T] of `completion_ids` after left-padded `prompt_ids` (one forward).
    With the token entropies too: `completion_logprobs_and_entropy`."""
    hidden, head = _completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return token_logprobs(hidden, head, completion_ids, chunk_tokens=chunk_tokens, temperature=temperature)


def completion_logprobs_and_entropy(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                    completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                                    chunk_tokens: int = 4096, temperature: float = 1.0
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(`completion_logprobs`, the detached token entropies [B, T]) from one forward."""
    hidden, head = _completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return token_logprobs_and_entropy(hidden, head, completion_ids, chunk_tokens=chunk_tokens, temperature=temperature)


def _completion_hidden(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    hidden = hidden_for_completion(model, input_ids, attention_mask, completion_ids.size(1))
    return hidden, lm_parts(model)[1]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists -> (ids [N, L], mask [N, L])."""
    return _pad(sequences, pad_id, device, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> (ids [N, L], mask [N, L])."""
    return _pad(sequences, pad_id, device, left=False)


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str, *, left: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            span = slice(length - len(seq), length) if left else slice(0, len(seq))
            ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, span] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class RowBatch:
    """One forward's worth of teacher rows: `rows` (indices into the caller's row list), the final hidden
    states [n, t, H] that predict their completions' first t tokens, and those tokens and their mask [n, t]."""

    rows: list[int]
    hidden: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


def row_batches(model: torch.nn.Module, prompts: Sequence[Sequence[int]], rollout_of: Sequence[int],
                completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int, batch_rows: int,
                prefix_reuse: bool) -> Iterator[RowBatch]:
    """The final hidden states of rows `[prompts[r] ; completion of rollout rollout_of[r]]`, no gradient, in
    batches of `batch_rows` rows sorted by length; each batch trimmed to its longest completion.

    With `prefix_reuse` (and `sgsd.prefix_cache.reuse_blocker(model)` silent) the shared prompt prefixes
    are run once and reused (`sgsd.prefix_cache`); where none is worth sharing, and without it, every row
    runs in full (left-padded prompt, then the completion). Call inside `torch.no_grad()` and the teacher's
    weights context.
    """
    lengths = completion_mask.long().sum(-1).tolist()
    reuse = reuse_applies(model, prefix_reuse)
    plan = shared_prefixes(prompts) if reuse else None
    forwards = _forwards(plan, len(prompts), max(batch_rows, 1))
    most = _most_forwards(forwards) if reuse else forwards  # before any forward: see `_idle_forwards`
    if plan is None:
        yield from _plain_batches(model, prompts, rollout_of, completion_ids, completion_mask, lengths,
                                  pad_id=pad_id, batch_rows=batch_rows)
    else:
        with no_checkpointing(model):
            yield from _prefix_batches(model, plan, prompts, rollout_of, completion_ids, completion_mask, lengths,
                                       pad_id=pad_id, batch_rows=batch_rows)
    _idle_forwards(model, most - forwards, completion_ids.device, pad_id)


def _forwards(plan: PrefixPlan | None, rows: int, step: int) -> int:
    """Forward calls of `row_batches` for `rows` rows in batches of `step` (nodes: per level)."""
    levels: dict[int, int] = {}
    for node in plan.nodes if plan is not None else ():
        levels[node.level] = levels.get(node.level, 0) + 1
    return sum(-(-n // step) for n in levels.values()) + -(-rows // step)


def _most_forwards(forwards: int) -> int:
    """The largest of every rank's `forwards` (this one's alone in one process). Called before any teacher
    forward: once ranks have made different numbers of forward calls, their collectives no longer pair up."""
    return forwards if world_size() == 1 else max(gather_objects(forwards))


def _idle_forwards(model: torch.nn.Module, count: int, device: torch.device, pad_id: int) -> None:
    """`count` one-token forwards, so that this rank makes as many forward calls as the busiest: a forward of
    DeepSpeed ZeRO-3 or FSDP gathers the weights (and DDP may broadcast buffers), a collective every rank must
    join, and the number of shared prefixes differs from rank to rank."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(count):
            final_hidden(model, ids, torch.ones_like(ids), torch.zeros_like(ids))


def shared_prefixes(prompts: Sequence[Sequence[int]]) -> PrefixPlan | None:
    """The prefixes of `prompts` worth running once (`sgsd.prefix_cache.plan_prefixes`), None if there are none."""
    plan = plan_prefixes(prompts)
    return plan if plan.nodes else None


def teacher_completion_hidden(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                              completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int,
                              prefix_reuse: bool) -> torch.Tensor:
    """`hidden_for_completion` [B, T, H] of `[left-padded prompt ; completion]` rows, no gradient, with the
    prompts' shared prefixes run once when `prefix_reuse` finds any (`row_batches`, all rows in one batch;
    positions past a row's batch are 0). The prompts are read back from their ids and mask, never re-tokenised."""
    t, rows = completion_ids.size(1), completion_ids.size(0)
    reuse = reuse_applies(model, prefix_reuse)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)] if reuse else []
    plan = shared_prefixes(prompts) if reuse else None
    forwards = _forwards(plan, rows, max(rows, 1))  # one forward per level of shared prefixes, then the rows
    most = _most_forwards(forwards) if reuse else forwards
    if plan is None:
        hidden = hidden_for_completion(model, torch.cat([prompt_ids, completion_ids], dim=1),
                                       torch.cat([prompt_mask, completion_mask], dim=1), t)
    else:
        lengths = completion_mask.long().sum(-1).tolist()
        hidden = None
        with no_checkpointing(model):
            for batch in _prefix_batches(model, plan, prompts, range(rows), completion_ids, completion_mask,
                                         lengths, pad_id=pad_id, batch_rows=rows):
                if hidden is None:
                    hidden = batch.hidden.new_zeros((rows, t, batch.hidden.size(-1)))
                hidden[batch.rows, : batch.hidden.size(1)] = batch.hidden
    _idle_forwards(model, most - forwards, completion_ids.device, pad_id)
    return hidden


def _completions(completion_ids: torch.Tensor, completion_mask: torch.Tensor, rollouts: Sequence[int],
                 lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollouts' completions [n, t] and masks (long), trimmed to the longest of them (at least 1)."""
    t_batch = max(max(lengths[i] for i in rollouts), 1)
    index = torch.tensor(list(rollouts), device=completion_ids.device)
    return completion_ids[index, :t_batch], completion_mask[index, :t_batch].long()


def _plain_batches(model: torch.nn.Module, prompts: Sequence[Sequence[int]], rollout_of: Sequence[int],
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, lengths: Sequence[int], *, pad_id: int,
                   batch_rows: int) -> Iterator[RowBatch]:
    # Sort by total length so each batch has little padding.
    order = sorted(range(len(prompts)), key=lambda r: (len(prompts[r]) + lengths[rollout_of[r]], r))
    device = completion_ids.device
    for start in range(0, len(order), max(batch_rows, 1)):
        batch = order[start : start + batch_rows]
        comp_ids, comp_mask = _completions(completion_ids, completion_mask, [rollout_of[r] for r in batch], lengths)
        prompt_ids, prompt_mask = left_pad([prompts[r] for r in batch], pad_id, device)
        input_ids = torch.cat([prompt_ids, comp_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, comp_mask], dim=1)
        yield RowBatch(batch, hidden_for_completion(model, input_ids, attention_mask, comp_ids.size(1)), comp_ids,
                       comp_mask)


def _prefix_batches(model: torch.nn.Module, plan: PrefixPlan, prompts: Sequence[Sequence[int]],
                    rollout_of: Sequence[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    lengths: Sequence[int], *, pad_id: int, batch_rows: int) -> Iterator[RowBatch]:
    """Every node of `plan`, level by level, then the rows, each forward after its parents' keys and values."""
    device = completion_ids.device
    store = PrefixStore(plan)
    step = max(batch_rows, 1)
    levels: dict[int, list[int]] = {}
    for i, node in enumerate(plan.nodes):
        levels.setdefault(node.level, []).append(i)
    for level in sorted(levels):
        ordered = sorted(levels[level], key=lambda i: (store.end(plan.nodes[i].parent), plan.nodes[i].end, i))
        for start in range(0, len(ordered), step):
            batch = ordered[start : start + step]
            nodes = [plan.nodes[i] for i in batch]
            cache, past_mask = store.past([n.parent for n in nodes], device)
            segments = [prompts[n.row][n.start : n.end] for n in nodes]
            ids, mask = right_pad(segments, pad_id, device)
            attention_mask = torch.cat([past_mask, mask], dim=1)
            positions = position_ids_from_mask(attention_mask)[:, past_mask.size(1) :]
            final_hidden(model, ids, attention_mask, positions, cache)
            store.keep(batch, cache, past_mask.size(1), [len(s) for s in segments])
    ends = [plan.prefix_end(r) for r in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda r: (len(prompts[r]) + lengths[rollout_of[r]], ends[r], r))
    for start in range(0, len(order), step):
        batch = order[start : start + step]
        parents = [plan.row_parent[r] for r in batch]
        comp_ids, comp_mask = _completions(completion_ids, completion_mask, [rollout_of[r] for r in batch], lengths)
        cache, past_mask = store.past(parents, device)
        tail_ids, tail_mask = left_pad([prompts[r][ends[r] :] for r in batch], pad_id, device)
        attention_mask = torch.cat([past_mask, tail_mask, comp_mask], dim=1)
        positions = position_ids_from_mask(attention_mask)[:, past_mask.size(1) :]
        hidden = final_hidden(model, torch.cat([tail_ids, comp_ids], dim=1), attention_mask, positions, cache)
        store.done(parents)
        t_batch = comp_ids.size(1)
        yield RowBatch(batch, hidden[:, -t_batch - 1 : -1], comp_ids, comp_mask)


def _teacher_rows(model: torch.nn.Module, teacher_prompt_ids: Sequence[Sequence[Sequence[int] | None]],
                  completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int, batch_rows: int,
                  teacher_context: Callable[[], ContextManager[object]],
                  per_batch: Callable[[torch.Tensor, torch.nn.Module, torch.Tensor], tuple[torch.Tensor, ...]],
                  trailing: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
                  prefix_reuse: bool) -> tuple[torch.Tensor, ...]:
    """Run every present (rollout, teacher) row without gradient; `per_batch(hidden, head, comp_ids)`
    maps a batch to tensors [n, t_batch, *trailing[i]] that are written into [B, K, T, *trailing[i]]."""
    b, t = completion_ids.shape
    k = max((len(row) for row in teacher_prompt_ids), default=0)
    device = completion_ids.device
    outs = tuple(torch.zeros((b, k, t, *shape), dtype=dtype, device=device) for shape, dtype in zip(trailing, dtypes))
    cells = [(i, j) for i in range(b) for j, ids in enumerate(teacher_prompt_ids[i]) if ids is not None]
    prompts = [teacher_prompt_ids[i][j] for i, j in cells]
    _, head = lm_parts(model)
    with torch.no_grad(), teacher_context():
        for batch in row_batches(model, prompts, [i for i, _ in cells], completion_ids, completion_mask,
                                 pad_id=pad_id, batch_rows=batch_rows, prefix_reuse=prefix_reuse):
            t_batch = batch.completion_ids.size(1)
            index = torch.tensor([cells[r][0] for r in batch.rows], device=device)
            cols = torch.tensor([cells[r][1] for r in batch.rows], device=device)
            for out, value in zip(outs, per_batch(batch.hidden, head, batch.completion_ids)):
                keep = batch.completion_mask.view(*batch.completion_mask.shape,
                                                  *([1] * (value.dim() - 2))).to(value.dtype)
                out[index, cols, :t_batch] = value * keep
    return outs


def score_teachers(model: torch.nn.Module, teacher_prompt_ids: Sequence[Sequence[Sequence[int] | None]],
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int,
                   batch_rows: int = 16, chunk_tokens: int = 4096, temperature: float = 1.0,
                   teacher_context: Callable[[], ContextManager[object]] = nullcontext,
                   prefix_reuse: bool = False) -> torch.Tensor:
    """Teacher log-probs [B, K, T] of each rollout's completion under each of its K teacher prompts
    (with their token entropies too: `score_teachers_and_entropy`).

    teacher_prompt_ids[b][k]: token ids of teacher k's rendered prompt for rollout b, or None for an
    absent teacher (its row stays 0 and is never run). completion_ids/completion_mask [B, T] are
    right-padded. No gradient. `teacher_context` selects the teacher weights (e.g. adapter disabled
    for a base-model teacher, EMA weights swapped in) around each forward. `prefix_reuse`: run shared
    prompt prefixes once (`row_batches`, `sgsd.prefix_cache`), equal up to float summation order.
    """
    return score_teachers_and_entropy(model, teacher_prompt_ids, completion_ids, completion_mask, pad_id=pad_id,
                                      batch_rows=batch_rows, chunk_tokens=chunk_tokens, temperature=temperature,
                                      teacher_context=teacher_context, prefix_reuse=prefix_reuse)[0]


def score_teachers_and_entropy(model: torch.nn.Module, teacher_prompt_ids: Sequence[Sequence[Sequence[int] | None]],
                               completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int,
                               batch_rows: int = 16, chunk_tokens: int = 4096, temperature: float = 1.0,
                               teacher_context: Callable[[], ContextManager[object]] = nullcontext,
                               prefix_reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(`score_teachers`, the teachers' token entropies [B, K, T]), from the same forwards."""
    def per_batch(hidden, head, comp_ids):
        return token_logprobs_and_entropy(hidden, head, comp_ids, chunk_tokens=chunk_tokens, temperature=temperature)

    logps, entropy = _teacher_rows(model, teacher_prompt_ids, completion_ids, completion_mask, pad_id=pad_id,
                                   batch_rows=batch_rows, teacher_context=teacher_context, per_batch=per_batch,
                                   trailing=[(), ()], dtypes=[torch.float32, torch.float32],
                                   prefix_reuse=prefix_reuse)
    return logps, entropy


def _chunk_top(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logps = torch.nn.functional.linear(hidden, weight, bias).float().log_softmax(-1)
    top = logps.topk(top_k, dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1), top.values, top.indices


def score_teachers_local(model: torch.nn.Module, teacher_prompt_ids: Sequence[Sequence[Sequence[int] | None]],
                         completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, pad_id: int, top_k: int,
                         batch_rows: int = 16, chunk_tokens: int = 4096,
                         teacher_context: Callable[[], ContextManager[object]] = nullcontext, prefix_reuse: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `score_teachers`, plus each teacher's top-k' log-probs and ids per position (local-support mode).

    Returns (sampled logps [B, K, T], top logps [B, K, T, k'], top ids [B, K, T, k'] int64): all the
    loss phase needs to rebuild the teacher side of the local support set without the full vocabulary.
    """
    def per_batch(hidden, head, comp_ids):
        n, t, h = hidden.shape
        flat_h, flat_ids = hidden.reshape(n * t, h), comp_ids.reshape(n * t)
        weight, bias = head_weights(head)
        pieces = [_chunk_top(flat_h[s : s + chunk_tokens], weight, bias, flat_ids[s : s + chunk_tokens], top_k)
                  for s in range(0, n * t, max(chunk_tokens, 1))]
        sampled, values, ids = (torch.cat(p) for p in zip(*pieces))
        return sampled.reshape(n, t), values.reshape(n, t, top_k), ids.reshape(n, t, top_k)

    return _teacher_rows(model, teacher_prompt_ids, completion_ids, completion_mask, pad_id=pad_id,
                         batch_rows=batch_rows, teacher_context=teacher_context, per_batch=per_batch,
                         trailing=[(), (top_k,), (top_k,)], dtypes=[torch.float32, torch.float32, torch.long],
                         prefix_reuse=prefix_reuse)


def _local_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sampled_ids: torch.Tensor,
                 teacher_sampled: torch.Tensor, teacher_top: torch.Tensor, teacher_top_ids: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student_logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [B, t, V]
    b, k, t, _ = teacher_top.shape
    # Teacher logits known only on its top-k' and the sampled token; -inf elsewhere. Log-probs stand
    # in for logits: renormalising on the support set removes the shift.
    teacher = student_logits.new_full((b, k, t, student_logits.size(-1)), float("-inf"))
    teacher.scatter_(-1, sampled_ids[:, None, :, None].expand(b, k, t, 1), teacher_sampled.unsqueeze(-1))
    teacher.scatter_(-1, teacher_top_ids, teacher_top)
    return local_support_terms(student_logits, teacher, sampled_ids, top_k=top_k)


def local_support_student_terms(hidden: torch.Tensor, lm_head: torch.nn.Module, sampled_ids: torch.Tensor,
                                teacher_sampled: torch.Tensor, teacher_top: torch.Tensor,
                                teacher_top_ids: torch.Tensor, *, top_k: int, chunk_tokens: int = 4096
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student side of the local-support variant, chunked over T (each chunk checkpointed with grad).

    hidden [B, T, H] (student, gradient flows), sampled_ids [B, T], teacher_* from
    `score_teachers_local`. Returns `sgsd.objectives.local_support_terms` outputs, each [B, K, T].
    """
    b, t, _ = hidden.shape
    k = teacher_top.size(1)
    step = max(1, chunk_tokens // max(b * k, 1))
    weight, bias = head_weights(lm_head)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for s in range(0, t, step):
        args = (hidden[:, s : s + step], weight, bias, sampled_ids[:, s : s + step], teacher_sampled[:, :, s : s + step],
                teacher_top[:, :, s : s + step], teacher_top_ids[:, :, s : s + step], top_k)
        pieces.append(checkpoint(_local_chunk, *args, use_reentrant=False) if needs_grad else _local_chunk(*args))
    return tuple(torch.cat(p, dim=-1) for p in zip(*pieces))  # type: ignore[return-value]


def countable_token_table(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """[V] bool: tokens that count in the SGSD mask m_t (docs/spec.md section 4).

    Excluded: special tokens, think tags, and tokens that decode to whitespace only (newlines).
    """
    size = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0))
    table = torch.ones(size, dtype=torch.bool)
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tag in ("<think>", "</think>"):
        tag_id = tokenizer.convert_tokens_to_ids(tag)
        if isinstance(tag_id, int) and tag_id != getattr(tokenizer, "unk_token_id", None):
            excluded.add(tag_id)
    for token_id in excluded:
        if 0 <= token_id < size:
            table[token_id] = False
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    for token_id, text in enumerate(texts):
        if not text.strip():
            table[token_id] = False
    return table


def counted_mask(completion_ids: torch.Tensor, completion_mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """m_t [B, T] bool: completion tokens that are not padding and count per `countable_token_table`."""
    table = table.to(completion_ids.device)
    safe = completion_ids.clamp(0, table.numel() - 1)
    return completion_mask.bool() & table[safe]


# -- OPSD: full-vocabulary divergence from final hidden states (docs/spec.md section 5) -----------------------


def _chunk_jsd(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, beta, temperature):
    student_logits = F.linear(student_hidden, weight, bias)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    rows = student_hidden.size(0)
    out = opsd_loss(student_logits[None], teacher_logits[None], student_hidden.new_ones((1, rows), dtype=torch.bool),
                    beta=beta, temperature=temperature, chunk_size=rows)
    metrics = out.metrics
    return out.loss, metrics["divergence_mean"], metrics["student_entropy_mean"], metrics["teacher_entropy_mean"]


@dataclass(frozen=True)
class HeadWeights:
    """A detached LM head (weight [V, H], bias [V] or None); usable wherever `lm_head.weight/.bias` is read."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, head: torch.nn.Module, *, copy: bool = False) -> "HeadWeights":
        weight, bias = head_weights(head)
        weight, bias = weight.detach(), bias.detach() if bias is not None else None
        if copy:
            weight, bias = weight.clone(), bias.clone() if bias is not None else None
        return cls(weight, bias)


def opsd_loss_from_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: torch.nn.Module, *,
                          beta: float, temperature: float, chunk_tokens: int = 1024,
                          teacher_head: HeadWeights | None = None) -> OPSDLossOutput:
    """`opsd_loss` over N completion tokens given final hidden states, in chunks of `chunk_tokens`.

    student_hidden [N, H] (gradient flows), teacher_hidden [N, H] (detached): one row per completion
    token that counts (padding already removed). Logits come from `lm_head` for the student and from
    `teacher_head` (default: the same head, detached) for the teacher.
    Equal in value and gradient to `opsd_loss(head(student_hidden)[None], head(teacher_hidden)[None],
    ones)`: the mean over N of per-chunk means weighted by chunk size. Each chunk is checkpointed, so
    fp32 [chunk_tokens, V] logits exist for one chunk at a time, in the forward and in the backward.
    Metrics: divergence_mean, student_entropy_mean, teacher_entropy_mean (detached, token means; 0 when N = 0).
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states must both be [N, H], got {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}")
    weight, bias = head_weights(lm_head)
    teacher_head = teacher_head or HeadWeights.of(lm_head)
    teacher_hidden = teacher_hidden.detach()
    total = student_hidden.size(0)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    sums = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(4)]
    sums[0] = sums[0] + 0.0 * student_hidden.sum()  # N = 0: a zero loss still connected to the graph (DDP, GA)
    step = max(int(chunk_tokens), 1)
    for start in range(0, total, step):
        args = (student_hidden[start : start + step], teacher_hidden[start : start + step], weight, bias,
                teacher_head.weight, teacher_head.bias, beta, temperature)
        parts = checkpoint(_chunk_jsd, *args, use_reentrant=False) if needs_grad else _chunk_jsd(*args)
        share = args[0].size(0) / total
        sums = [acc + part.float() * share for acc, part in zip(sums, parts)]
    loss, divergence, student_entropy, teacher_entropy = sums
    metrics = {"divergence_mean": divergence.detach(), "student_entropy_mean": student_entropy.detach(),
               "teacher_entropy_mean": teacher_entropy.detach()}
    return OPSDLossOutput(loss=loss, metrics=metrics)

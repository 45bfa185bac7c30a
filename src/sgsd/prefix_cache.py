"""Teacher rows that share a token prefix: each distinct prefix is run once and its keys and values reused.

A teacher row is `[chat header][guidance of one (skill, mistake) pair][problem][instruction][completion]`
(docs/spec.md section 2). Under causal attention the keys and values of a prefix do not depend on what
follows it, so rows that start with the same tokens can share them: the prefix runs once (per call, so per
weights version), and each row runs only its own suffix, attending to the prefix's cached keys and values.
docs/performance.md ("Prefix reuse") has the cost model and the measurements.

- Prefixes are found on token ids, never by re-tokenising pieces of text (a BPE merge across a boundary
  cannot change a row): the rows' prompts, less their last token, go into a radix tree (`plan_prefixes`).
  The last prompt token always runs with the row, since its final hidden state predicts the first
  completion token.
- A tree node is run on its own ("materialised") when it branches (several consumers) and the tokens it
  saves, `len x (consumers - 1)`, reach `MIN_SAVED_TOKENS`; otherwise its tokens fold into its children.
  Where nothing is worth sharing the rows take the plain path (`plain_row_batches`), bit for bit.
- Layout of every cached forward: `[past, left-padded to the batch's longest | new tokens]`. The new tokens
  of a prefix node are right-padded (only their real keys and values are kept); a row's new tokens are
  its prompt tail, left-padded, then its completion, right-padded, so its final hidden states sit at
  `[-T-1:-1]` as in the plain path. Position ids come from the combined attention mask (cumsum - 1): the
  same positions as the row without a cache, whatever the padding. The padded key/value slots are masked.
- Exactness: values equal the plain path's up to float summation order (the same products, grouped into
  other matrix shapes); tests/test_prefix_cache.py bounds the difference.

Where it applies (`reuse_blocker`, the one place that switches it off): decoder-only models whose every
layer is full attention (a sliding-window or recurrent layer's cache is not a plain prefix), with unsharded
weights (not under DeepSpeed ZeRO-3 or FSDP, where each forward is a collective whose order the ranks must
share; DDP and ZeRO-2 are fine). Gradient
checkpointing is suspended around the cached forwards (they run without gradient; transformers would
otherwise drop the cache in training mode), and a forward that did not extend the cache fails loudly.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.distributed.tensor import DTensor
from transformers import DynamicCache


log = logging.getLogger(__name__)

# A shared prefix is run on its own only when it saves at least this many token slots: below it the
# extra forward call and the copies of its keys and values cost more than they save. Speed only, not values.
MIN_SAVED_TOKENS = 32


# -- planning (token ids only) -------------------------------------------------------------------------------


@dataclass
class _TreeNode:
    start: int
    end: int
    row: int  # a row whose key holds this node's tokens at [start:end]
    children: list["_TreeNode"] = field(default_factory=list)
    ends_here: list[int] = field(default_factory=list)  # rows whose key ends at `end`


@dataclass(frozen=True)
class PrefixNode:
    """One shared prefix run on its own: tokens `[start:end]` of row `row`'s prompt, after its parent's
    (parent -1: none; then start = 0). `level` = number of materialised ancestors."""

    start: int
    end: int
    row: int
    parent: int
    level: int


@dataclass(frozen=True)
class PrefixPlan:
    """nodes: the shared prefixes (parents before children); row_parent[r]: the node row r continues
    (-1: none), so row r runs `prompt[nodes[row_parent[r]].end:]` then its completion."""

    nodes: tuple[PrefixNode, ...]
    row_parent: tuple[int, ...]

    def prefix_end(self, row: int) -> int:
        parent = self.row_parent[row]
        return self.nodes[parent].end if parent >= 0 else 0

    def prompt_tokens_run(self, prompts: Sequence[Sequence[int]]) -> int:
        """Prompt token slots run with this plan (each shared prefix once, each row's tail), without padding;
        without reuse: sum(len(p) for p in prompts)."""
        return sum(n.end - n.start for n in self.nodes) + sum(len(p) - self.prefix_end(r) for r, p in enumerate(prompts))


def _build(keys: Sequence[Sequence[int]], rows: list[int], start: int) -> _TreeNode:
    """The radix-tree node of `rows` (all equal on `[:start]`), with its subtree."""
    first = keys[rows[0]]
    end = min(len(keys[r]) for r in rows)
    for r in rows[1:]:
        key = keys[r]
        k = start
        while k < end and key[k] == first[k]:
            k += 1
        end = k
    node = _TreeNode(start, end, rows[0])
    groups: dict[int, list[int]] = {}
    for r in rows:
        if len(keys[r]) == end:
            node.ends_here.append(r)
        else:
            groups.setdefault(keys[r][end], []).append(r)
    node.children = [_build(keys, group, end) for group in groups.values()]
    return node


def plan_prefixes(prompts: Sequence[Sequence[int]], *, min_saved_tokens: int = MIN_SAVED_TOKENS) -> PrefixPlan:
    """Which shared prefixes of `prompts` (token id lists, one per row) to run once, and which row continues which.

    Keys are `prompt[:-1]`. A node (tokens shared by everything under it) is materialised when it has at
    least two consumers (child nodes or rows ending there) and `tokens since the nearest materialised
    ancestor x (consumers - 1) >= min_saved_tokens`. Rows are never split inside their last prompt token.
    """
    keys = [list(p[:-1]) for p in prompts]
    nodes: list[PrefixNode] = []
    row_parent = [-1] * len(prompts)
    if not prompts:
        return PrefixPlan((), ())
    root = _build(keys, list(range(len(keys))), 0)
    # walk the tree (iteratively: deep trees must not hit the recursion limit) carrying the nearest
    # materialised ancestor: (node, anchor index, anchor end, level)
    stack = [(root, -1, 0, 0)]
    while stack:
        node, anchor, anchor_end, level = stack.pop()
        consumers = len(node.children) + len(node.ends_here)
        if consumers >= 2 and (node.end - anchor_end) * (consumers - 1) >= min_saved_tokens:
            nodes.append(PrefixNode(anchor_end, node.end, node.row, anchor, level))
            anchor, anchor_end, level = len(nodes) - 1, node.end, level + 1
        for r in node.ends_here:
            row_parent[r] = anchor
        stack.extend((child, anchor, anchor_end, level) for child in reversed(node.children))
    # parents before children, level by level (the order the forwards run in)
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i].level, i))
    new_index = {old: new for new, old in enumerate(order)}
    nodes = [PrefixNode(n.start, n.end, n.row, new_index.get(n.parent, -1), n.level) for n in (nodes[i] for i in order)]
    return PrefixPlan(tuple(nodes), tuple(new_index.get(p, -1) for p in row_parent))


# -- where it applies ------------------------------------------------------------------------------------------


def _text_config(model: torch.nn.Module):
    base = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if hasattr(base, "get_base_model"):  # PeftModel
        base = base.get_base_model()
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config


def reuse_blocker(model: torch.nn.Module) -> str | None:
    """Why prefix reuse would not be exact or safe for `model` (None: it applies). The one place that switches
    it off."""
    param = next(iter(model.parameters()), None)
    if param is not None and hasattr(param, "ds_id"):
        # every forward gathers the weights through DeepSpeed's prefetcher, which follows the module order it
        # recorded; with each rank's own number of prefix forwards (even padded to equal counts) the ranks'
        # all-gathers stopped pairing up on 2 CPU processes (gloo: "collective mismatch")
        return "DeepSpeed ZeRO-3 shards the weights (every forward is a collective)"

    if isinstance(param, DTensor) or any(c.__name__ == "FlatParameter" for c in type(param).__mro__):
        return "FSDP shards the weights (every forward is a collective)"
    config = _text_config(model)
    if config is None:
        return "the model has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"layers other than full attention ({sorted(set(layer_types) - {'full_attention'})})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and layer_types is None:
        return "a sliding attention window"
    return None


_warned: set[str] = set()


def reuse_applies(model: torch.nn.Module, requested: bool) -> bool:
    """`requested` unless `reuse_blocker(model)` says otherwise (logged once per reason)."""
    if not requested:
        return False
    reason = reuse_blocker(model)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        log.warning("prefix reuse is off for this model: %s (teacher rows are scored in full)", reason)
    return reason is None


# -- running ---------------------------------------------------------------------------------------------------


@contextmanager
def no_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Suspend transformers' gradient checkpointing (which drops the cache in training mode) for
    gradient-free forwards; the values are the same with or without it."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def _check_extended(cache: DynamicCache, expected: int) -> None:
    got = cache.get_seq_length()
    if got != expected:
        raise RuntimeError(f"prefix reuse: the model's forward left {got} cached positions where {expected} were "
                           "expected (a model or wrapper that ignores past_key_values); set sgsd.prefix_reuse=false")


class PrefixStore:
    """Keys and values of a `PrefixPlan`'s nodes, each node's own tokens only (per layer [H_kv, len, D]), kept
    until every consumer (child node or row) has run. One store per scoring call: one weights version."""

    def __init__(self, plan: PrefixPlan) -> None:
        self.plan = plan
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.waiting = [0] * len(plan.nodes)  # rows under each node not yet run
        for parent in plan.row_parent:
            for node in self._chain(parent):
                self.waiting[node] += 1

    def end(self, node: int) -> int:
        return self.plan.nodes[node].end if node >= 0 else 0

    def _chain(self, node: int) -> list[int]:
        chain = []
        while node >= 0:
            chain.append(node)
            node = self.plan.nodes[node].parent
        return chain[::-1]

    def past(self, parents: Sequence[int], device: torch.device) -> tuple[DynamicCache, torch.Tensor]:
        """(cache [n, H_kv, P, D] per layer, mask [n, P]) of the consumers' parents, each right-aligned in
        P = the longest parent (left padding, masked); a DynamicCache the next forward extends."""
        widths = [self.end(p) for p in parents]
        width = max(widths, default=0)
        mask = torch.zeros((len(parents), width), dtype=torch.long, device=device)
        if width == 0:
            return DynamicCache(), mask
        layers = next(iter(self.kv[p] for p in parents if p >= 0))
        data = []
        for layer, (ref_k, ref_v) in enumerate(layers):
            keys = ref_k.new_zeros((len(parents), ref_k.size(0), width, ref_k.size(-1)))
            values = ref_v.new_zeros((len(parents), ref_v.size(0), width, ref_v.size(-1)))
            for b, parent in enumerate(parents):
                offset = width - widths[b]
                for node in self._chain(parent):
                    k, v = self.kv[node][layer]
                    keys[b, :, offset : offset + k.size(1)] = k
                    values[b, :, offset : offset + k.size(1)] = v
                    offset += k.size(1)
            data.append((keys, values))
        for b, w in enumerate(widths):
            mask[b, width - w :] = 1
        return DynamicCache(ddp_cache_data=data), mask

    def keep(self, nodes: Sequence[int], cache: DynamicCache, past_width: int, lengths: Sequence[int]) -> None:
        """Store each node's own keys and values from a forward that extended `cache` by right-padded segments."""
        _check_extended(cache, past_width + max(lengths))
        for b, (node, length) in enumerate(zip(nodes, lengths)):
            self.kv[node] = [(layer.keys[b, :, past_width : past_width + length].clone(),
                              layer.values[b, :, past_width : past_width + length].clone()) for layer in cache.layers]

    def done(self, parents: Sequence[int]) -> None:
        """Rows continuing `parents` have run: free the nodes no row still needs (a row needs its whole chain)."""
        for parent in parents:
            for node in self._chain(parent):
                self.waiting[node] -= 1
                if self.waiting[node] == 0:
                    del self.kv[node]

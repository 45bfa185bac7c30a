"""Hierarchical merge of skill-bank items by an LLM (docs/spec.md section 3 (3)).

Layer after layer, the current items are cut into consecutive groups of `group_size` (paper: 32) and
each group is merged by one LLM call; exact duplicates are removed after each layer. The merge stops
after the layer in which everything fitted in one group ("root_group_reached"), or when `patience`
(paper: 3) layers in a row did not shrink the list ("stagnation_patience_reached"), or at
`max_layers`. A group whose reply cannot be parsed, or which would grow, is kept as it was (counted).

Resumable: every group's result is appended to a journal keyed by (list, layer, group, hash of the
group's input); a rerun replays the journal and calls the LLM only for groups not yet merged, so it
reaches the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from sgsd.errors import ConfigError
from sgsd.skills.extraction import ItemKind, deduplicate, merge_prompt, parse_reply
from sgsd.skills.llm import LLMClient, chunks
from sgsd.storage import append_jsonl, read_jsonl, stable_hash

Content = dict[str, str]


@dataclass(frozen=True)
class MergeConfig:
    group_size: int = 32
    patience: int = 3
    max_layers: int = 64
    batch_size: int = 8  # groups sent to the LLM per call
    max_tokens: int = 4096
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"merge group_size={self.group_size}: must be at least 2")
        if self.patience < 1 or self.max_layers < 1 or self.batch_size < 1 or self.max_tokens < 1:
            raise ConfigError("merge patience, max_layers, batch_size and max_tokens must be at least 1")


@dataclass(frozen=True)
class LayerStats:
    """One merge layer; the first six fields have the names and meaning of the reference banks'."""

    layer_index: int
    input_items: int
    num_groups: int
    output_items: int
    stagnant_layers: int
    stopped_reason: str | None
    parse_failures: int
    grown_groups: int
    duplicates_removed: int


def hierarchical_merge(kind: ItemKind, contents: Sequence[Content], llm: LLMClient, config: MergeConfig, *,
                       journal: str | Path | None = None) -> tuple[list[Content], list[LayerStats]]:
    """Merge `contents` (item fields without ids) into fewer items; returns (items, per-layer stats)."""
    done = _read_journal(journal, kind) if journal else {}
    items = deduplicate(contents)
    layers: list[LayerStats] = []
    stagnant = 0
    for layer in range(config.max_layers):
        if not items:
            break
        groups = chunks(items, config.group_size)
        outputs, failures, grown = _merge_layer(kind, layer, groups, llm, config, done, journal)
        merged = [content for group_output in outputs for content in group_output]
        new_items = deduplicate(merged)
        stagnant = stagnant + 1 if len(new_items) >= len(items) else 0
        reason = None
        if len(groups) == 1:
            reason = "root_group_reached"
        elif stagnant >= config.patience:
            reason = "stagnation_patience_reached"
        elif layer == config.max_layers - 1:
            reason = "max_layers_reached"
        layers.append(LayerStats(layer, len(items), len(groups), len(new_items), stagnant, reason, failures,
                                 grown, len(merged) - len(new_items)))
        items = new_items
        if reason:
            break
    return items, layers


def layers_metadata(layers: Sequence[LayerStats]) -> list[dict]:
    return [asdict(layer) for layer in layers]


def _merge_layer(kind: ItemKind, layer: int, groups: list, llm: LLMClient, config: MergeConfig,
                 done: dict, journal: str | Path | None) -> tuple[list[list[Content]], int, int]:
    keys = [(layer, index, _group_hash(group)) for index, group in enumerate(groups)]
    todo = [i for i, key in enumerate(keys) if key not in done]
    for batch in chunks(todo, config.batch_size):
        replies = llm.complete([merge_prompt(kind, groups[i]) for i in batch],
                               max_tokens=config.max_tokens, temperature=config.temperature)
        for i, reply in zip(batch, replies):
            parsed = parse_reply(reply, kind)
            record = {"list": kind.list_key, "layer": keys[i][0], "group": keys[i][1], "input": keys[i][2],
                      "items": parsed.items, "failure": parsed.failure, "dropped_items": parsed.dropped_items}
            if journal:
                append_jsonl(journal, record)
            done[keys[i]] = record
    outputs, failures, grown = [], 0, 0
    for group, key in zip(groups, keys):
        record = done[key]
        if record["failure"] is not None:
            failures += 1
            outputs.append(list(group))
        elif len(record["items"]) > len(group):
            grown += 1
            outputs.append(list(group))
        else:
            outputs.append(record["items"])
    return outputs, failures, grown


def _group_hash(group: Sequence[Content]) -> str:
    return stable_hash(json.dumps(list(group), ensure_ascii=False, sort_keys=True), 24)


def _read_journal(journal: str | Path, kind: ItemKind) -> dict:
    return {(r["layer"], r["group"], r["input"]): r for r in read_jsonl(journal) if r.get("list") == kind.list_key}

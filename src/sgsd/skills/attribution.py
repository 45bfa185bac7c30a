"""Attribution: which skill-bank items actually helped during SGSD training.

Each teacher k of a rollout is a (skill, mistake) pair with a polarity rho_k in {-1, 0, +1}
(docs/spec.md section 4: outcome x sign of support): +1 = helpful (the verifier agreed with the teacher's
direction), -1 = harmful (misleading or over-suppressive), 0 = neutral (|support| <= theta). Both
items of the pair are credited with the teacher's polarity, support and weight. The tracker keeps,
per item, the number of uses and of helpful / harmful / neutral outcomes, and sums of support and
weight (for means). It is a plain counter: O(items) state, JSON-serialisable for checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from sgsd.errors import DataError
from sgsd.run_dir import RunDir
from sgsd.skills.bank import SkillBank
from sgsd.storage import JSONObject, atomic_write_json, decode_utf8, parse_json, read_input_bytes

if TYPE_CHECKING:
    import torch

# [B, K] per (rollout, teacher): a tensor on any device, or nested lists
Matrix = Union["torch.Tensor", Sequence[Sequence[float]]]

KINDS = ("skill", "mistake")


@dataclass
class ItemStats:
    uses: int = 0
    helpful: int = 0
    harmful: int = 0
    neutral: int = 0
    support_sum: float = 0.0
    weight_sum: float = 0.0

    @property
    def mean_support(self) -> float:
        return self.support_sum / self.uses if self.uses else 0.0

    @property
    def mean_weight(self) -> float:
        return self.weight_sum / self.uses if self.uses else 0.0

    @property
    def net(self) -> int:
        return self.helpful - self.harmful


class AttributionTracker:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], ItemStats] = {}
        self.rollouts = 0

    def update(self, skill_ids: Sequence[Sequence[str]], mistake_ids: Sequence[Sequence[str]], polarity: Matrix,
               support: Matrix, weights: Matrix) -> None:
        """Count one batch.

        skill_ids, mistake_ids: [B][K_b] ids of each rollout's teachers (K_b may vary per rollout).
        polarity, support, weights: [B, K] tensors (any device; read as Python numbers) or nested
        lists, K >= max K_b; entries beyond K_b are padding and ignored. polarity in {-1, 0, +1}.
        """
        polarity, support, weights = _rows(polarity), _rows(support), _rows(weights)
        if not len(skill_ids) == len(mistake_ids) == len(polarity) == len(support) == len(weights):
            raise ValueError(f"attribution update: batch sizes differ (skill_ids {len(skill_ids)}, mistake_ids "
                             f"{len(mistake_ids)}, polarity {len(polarity)}, support {len(support)}, weights {len(weights)})")
        for b, (skills, mistakes) in enumerate(zip(skill_ids, mistake_ids)):
            if len(skills) != len(mistakes) or len(skills) > min(len(polarity[b]), len(support[b]), len(weights[b])):
                raise ValueError(f"attribution update: rollout {b} has {len(skills)} skills, {len(mistakes)} mistakes "
                                 f"and {len(polarity[b])} polarity entries")
            self.rollouts += 1
            for k, pair in enumerate(zip(skills, mistakes)):
                rho = int(round(float(polarity[b][k])))
                if rho not in (-1, 0, 1):
                    raise ValueError(f"attribution update: polarity[{b}][{k}] = {polarity[b][k]} is not -1, 0 or +1")
                for kind, item_id in zip(KINDS, pair):
                    stats = self.items.setdefault((kind, item_id), ItemStats())
                    stats.uses += 1
                    stats.helpful += rho == 1
                    stats.harmful += rho == -1
                    stats.neutral += rho == 0
                    stats.support_sum += float(support[b][k])
                    stats.weight_sum += float(weights[b][k])

    def state_dict(self) -> JSONObject:
        return {"rollouts": self.rollouts,
                "items": [{"kind": kind, "id": item_id, **asdict(stats)}
                          for (kind, item_id), stats in sorted(self.items.items())]}

    def load_state_dict(self, state: JSONObject, source: str = "attribution state") -> None:
        """Restore from `state_dict()`; any field of the wrong type is a one-line `DataError` naming it."""
        if not isinstance(state, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(state).__name__}")
        rollouts = _count(state, "rollouts", f"{source}: rollouts")
        rows = state.get("items")
        if not isinstance(rows, list):
            raise DataError(f"{source}: items: expected a list, got {_kind(rows)}")
        items: dict[tuple[str, str], ItemStats] = {}
        for index, row in enumerate(rows):
            at = f"{source}: items[{index}]"
            if not isinstance(row, dict):
                raise DataError(f"{at}: expected an object, got {_kind(row)}")
            if row.get("kind") not in KINDS:
                raise DataError(f"{at}.kind: expected one of {', '.join(KINDS)}, got {row.get('kind')!r}")
            if not isinstance(row.get("id"), str) or not row["id"]:
                raise DataError(f"{at}.id: expected a non-empty string, got {_kind(row.get('id'))}")
            unknown = sorted(set(row) - {"kind", "id", *ItemStats.__dataclass_fields__})
            if unknown:
                raise DataError(f"{at}: unknown field {unknown[0]!r}")
            counts = {name: _count(row, name, f"{at}.{name}") for name in ("uses", "helpful", "harmful", "neutral")}
            sums = {name: _number(row, name, f"{at}.{name}") for name in ("support_sum", "weight_sum")}
            items[(row["kind"], row["id"])] = ItemStats(**counts, **sums)
        self.rollouts, self.items = rollouts, items

    def save(self, run_dir: str | Path) -> Path:
        """Write `run_dir/attribution.json` atomically."""
        return atomic_write_json(RunDir(Path(run_dir)).attribution, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "AttributionTracker":
        path = Path(path)
        if path.is_dir():
            path = RunDir(path).attribution
        if not path.exists():
            raise DataError(f"{path}: no attribution file (was the run trained with SGSD attribution on?)")
        text = decode_utf8(read_input_bytes(path, "attribution file"), str(path))
        try:
            state = parse_json(text, str(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        tracker = cls()
        tracker.load_state_dict(state, source=str(path))
        return tracker


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _count(obj: JSONObject, name: str, field: str) -> int:
    value = obj.get(name, 0 if name != "rollouts" else None)  # counts an older file lacks are 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{field}: expected a non-negative integer, got {value!r}"[:300])
    return value


def _number(obj: JSONObject, name: str, field: str) -> float:
    value = obj.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{field}: expected a finite number, got {value!r}"[:300])
    return float(value)


def harmful_items(tracker: AttributionTracker, min_uses: int) -> set[tuple[str, str]]:
    """(kind, id) of items used at least `min_uses` times and harmful more often than helpful."""
    return {key for key, s in tracker.items.items() if s.uses >= min_uses and s.harmful > s.helpful}


def prune_bank(bank: SkillBank, tracker: AttributionTracker, min_uses: int) -> tuple[SkillBank, list[str]]:
    """`bank` without its harmful items (see `harmful_items`); returns (pruned bank, removed ids)."""
    drop = harmful_items(tracker, min_uses)
    skills = tuple(s for s in bank.general_skills if ("skill", s.skill_id) not in drop)
    mistakes = tuple(m for m in bank.common_mistakes if ("mistake", m.mistake_id) not in drop)
    removed = [s.skill_id for s in bank.general_skills if ("skill", s.skill_id) in drop]
    removed += [m.mistake_id for m in bank.common_mistakes if ("mistake", m.mistake_id) in drop]
    metadata = {**bank.metadata, "pruned": {"min_uses": min_uses, "removed": removed, "rule": "harmful > helpful"}}
    return replace(bank, general_skills=skills, common_mistakes=mistakes, metadata=metadata), removed


def _rows(values: Matrix) -> list[list[float]]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    return [list(row) for row in values]

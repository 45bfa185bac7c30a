"""The sweep's grid (`sgsd sweep`, `sgsd.demo.sweep`): its worlds, skill banks, cells, the runs each cell
needs, the preset grids, and where each result lives in an output directory.

A cell is one setting: the world (the demo's, or the harder one of `sgsd.demo.presets.HARD_WARMUP`), the
skill bank SGSD's teachers draw from (`SWEEP_BANKS`: the seed bank, its helpful items only, mostly its
misleading items), K teachers per rollout, and the rollout budget (`EQUAL`: every method the demo's rollouts
per step; `PAPER`: GRPO with twice SGSD's rollouts, as in the paper, where GRPO ran 4 prompts x 8
completions and SGSD 16 prompts x 1: here GRPO keeps its prompts and samples G = 8 instead of 4).

A run depends only on what its method reads (`RunSpec`: GRPO the world and budget, OPSD the world, SGSD the
world, bank and K), so two cells that need the same run share it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from sgsd.demo.bank import seed_bank
from sgsd.demo.plan import FULL, SMOKE, DemoPlan
from sgsd.demo.presets import DEMO_WARMUP, HARD_WARMUP, warmup_config
from sgsd.demo.warmup import WarmupConfig
from sgsd.errors import UserError
from sgsd.storage import JSONObject

EQUAL, PAPER = "equal", "paper"
PAPER_FACTOR = 2  # the paper's GRPO: twice SGSD's rollouts per step (4 x 8 against 16 x 1)
METHODS = ("grpo", "opsd", "sgsd")  # the demo's default set, trained in every cell


@dataclass(frozen=True)
class SweepWorld:
    """A world of the sweep: replication 0's warm-up settings (replication s: `warmup_config(s, base=...)`),
    and how many more completion tokens it needs than the demo's world (its solutions are longer)."""

    name: str
    warmup: WarmupConfig
    extra_tokens: int
    description: str


WORLDS = {w.name: w for w in (
    SweepWorld("demo", DEMO_WARMUP, 0, "the demo's world: 4-5 single-digit addends, a carry forgotten without "
                                       "a hint at rate 0.25"),
    SweepWorld("hard", HARD_WARMUP, 16, "6-8 addends with at least 3 carries, a carry forgotten without a hint "
                                        "at rate 0.5"),
)}

_SKILL_IDS = tuple(s["skill_id"] for s in seed_bank()["general_skills"])
_MISTAKE_IDS = tuple(m["mistake_id"] for m in seed_bank()["common_mistakes"])
# The seed bank's items (sgsd.demo.bank) each sweep bank holds, per kind: the warm start knows only these
# texts, so a bank of other quality is a mix of them. A bank whose list is shorter than K repeats it whole
# (`sweep_bank`), since random retrieval draws K distinct items (K = min(#skills, #mistakes, K) otherwise).
SWEEP_BANKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # 2 helpful, 3 irrelevant, 2 misleading of each kind: the demo's bank
    "seed": (_SKILL_IDS, _MISTAKE_IDS),
    # every item helpful: every teacher's pair makes carries reliable
    "helpful": (("gen_001", "gen_002"), ("err_001", "err_002")),
    # 4 misleading (each twice), 1 helpful, 2 irrelevant of each kind: 82% of pairs hold a misleading item
    "misleading": (("gen_006", "gen_007", "gen_006", "gen_007", "gen_001", "gen_003", "gen_004"),
                   ("err_006", "err_007", "err_006", "err_007", "err_001", "err_003", "err_004")),
}


def sweep_bank(name: str, k: int) -> JSONObject:
    """Sweep bank `name` in the paper's JSON format, with at least K items of each kind: its list repeated
    whole until it reaches K (so the label mix stays), every further copy of an item under the id
    `<id>-copy<n>`. `metadata.labels` labels every id, copies included."""
    if name not in SWEEP_BANKS:
        raise UserError(f"sweep bank {name!r}: choose from {', '.join(SWEEP_BANKS)}")
    seed = seed_bank()
    labels = seed["metadata"]["labels"]

    def expand(ids: tuple[str, ...], items: list[JSONObject], id_field: str) -> list[JSONObject]:
        by_id = {item[id_field]: item for item in items}
        seen: Counter[str] = Counter()
        out = []
        for item_id in ids * math.ceil(max(k, len(ids)) / len(ids)):
            seen[item_id] += 1
            copy_id = item_id if seen[item_id] == 1 else f"{item_id}-copy{seen[item_id]}"
            out.append({**by_id[item_id], id_field: copy_id})
            new_labels[copy_id] = labels[item_id]
        return out

    new_labels: dict[str, str] = {}
    skill_ids, mistake_ids = SWEEP_BANKS[name]
    return {
        "general_skills": expand(skill_ids, seed["general_skills"], "skill_id"),
        "task_specific_skills": [],
        "common_mistakes": expand(mistake_ids, seed["common_mistakes"], "mistake_id"),
        "metadata": {"source": f"sgsd.demo.sweep: the seed bank's items, mix {name!r}, at least {k} per kind",
                     "labels": new_labels, "label_note": "labels are for the sweep report only; training never reads them"},
    }


@dataclass(frozen=True)
class Cell:
    """One setting of the grid; `purpose` says which prediction of docs/sweep.md it answers."""

    world: str
    bank: str = "seed"
    k: int = 4
    budget: str = EQUAL
    purpose: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise UserError(f"sweep cell: world {self.world!r} is not one of {', '.join(WORLDS)}")
        if self.bank not in SWEEP_BANKS:
            raise UserError(f"sweep cell: bank {self.bank!r} is not one of {', '.join(SWEEP_BANKS)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"sweep cell: K = {self.k!r} must be a positive integer")
        if self.budget not in (EQUAL, PAPER):
            raise UserError(f"sweep cell: budget {self.budget!r} is not {EQUAL!r} or {PAPER!r}")

    @property
    def name(self) -> str:
        return f"{self.world}-{self.bank}-k{self.k}-{self.budget}"


@dataclass(frozen=True)
class RunSpec:
    """One training run's settings, only those its method reads: two cells that need the same run share it."""

    method: str
    world: str
    rollouts: int  # per step
    generations: int | None = None  # GRPO's G
    bank: str | None = None  # SGSD's bank and K
    k: int | None = None

    @property
    def key(self) -> str:
        """The run's directory name under runs/<world>/ (without the seed)."""
        if self.method == "grpo":
            return f"grpo-r{self.rollouts}-g{self.generations}"
        if self.method == "sgsd":
            return f"sgsd-{self.bank}-k{self.k}-r{self.rollouts}"
        return f"{self.method}-r{self.rollouts}"


def cell_runs(cell: Cell, sizes: DemoPlan) -> dict[str, RunSpec]:
    """The GRPO, OPSD and SGSD runs of `cell`."""
    rollouts, groups = sizes.prompts_per_step, sizes.grpo_generations
    factor = PAPER_FACTOR if cell.budget == PAPER else 1
    return {"grpo": RunSpec("grpo", cell.world, rollouts * factor, generations=groups * factor),
            "opsd": RunSpec("opsd", cell.world, rollouts),
            "sgsd": RunSpec("sgsd", cell.world, rollouts, bank=cell.bank, k=cell.k)}


def reference_cell(world: str, sizes: DemoPlan) -> Cell:
    """The world's reference: the demo's own settings (seed bank, its K, equal budget)."""
    return Cell(world, "seed", sizes.num_teachers, EQUAL)


@dataclass(frozen=True)
class SweepGrid:
    """A preset grid: run sizes (a demo preset: steps, rollouts, evaluation), cells in the order they run,
    replications (seeds, each with its own warm start per world), probe rollouts per (world, bank, K, seed)."""

    name: str
    sizes: DemoPlan
    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    probe_rollouts: int

    def __post_init__(self) -> None:
        if not self.cells or not self.seeds:
            raise UserError(f"sweep grid {self.name}: needs at least one cell and one seed")
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise UserError(f"sweep grid {self.name}: a cell is listed twice ({', '.join(names)})")

    def run_plan(self, spec: RunSpec) -> DemoPlan:
        """The demo plan one run trains with (`sgsd.demo.run.method_config` reads it)."""
        return replace(self.sizes, prompts_per_step=spec.rollouts,
                       grpo_generations=spec.generations or self.sizes.grpo_generations,
                       num_teachers=spec.k or self.sizes.num_teachers,
                       max_new_tokens=self.sizes.max_new_tokens + WORLDS[spec.world].extra_tokens)

    def warmup(self, world: str, seed: int) -> WarmupConfig:
        return warmup_config(seed, self.sizes.warmup_steps, base=WORLDS[world].warmup)

    def select(self, names: Sequence[str] | None = None, seeds: int | None = None) -> SweepGrid:
        """The grid restricted to the cells named (in the grid's order) and to the first `seeds` seeds."""
        grid = self
        if names is not None:
            known = {c.name: c for c in self.cells}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UserError(f"--cells: {', '.join(unknown)} not in grid {self.name}; choose from {', '.join(known)}")
            grid = replace(grid, cells=tuple(c for c in self.cells if c.name in set(names)))
        if seeds is not None:
            if seeds < 1:
                raise UserError("--seeds: must be at least 1")
            grid = replace(grid, seeds=tuple(range(seeds)))
        return grid


# Chosen before any cell was measured (docs/sweep.md, "The cells and the predictions"), in the order they run:
# the two references first, then the cells of the predictions whose answer matters most.
FULL_GRID = SweepGrid("full", FULL, (
    Cell("demo", purpose="reference: the demo's own cell"),
    Cell("demo", "helpful", purpose="informative skills"),
    Cell("hard", purpose="sparse reward (reference of the harder world)"),
    Cell("hard", "helpful", purpose="sparse reward x informative skills"),
    Cell("demo", budget=PAPER, purpose="the paper's budget"),
    Cell("hard", budget=PAPER, purpose="the paper's budget x sparse reward"),
    Cell("demo", "misleading", purpose="informative skills (the other side)"),
    Cell("demo", k=1, purpose="teachers per rollout"),
    Cell("demo", k=8, purpose="teachers per rollout"),
    Cell("hard", "helpful", k=8, budget=PAPER, purpose="the paper's K and budget, with informative skills"),
), seeds=FULL.seeds, probe_rollouts=256)
# Checks that every part runs (tests): two worlds, shared runs, both budgets; its numbers mean nothing.
SMOKE_GRID = SweepGrid("smoke", SMOKE, (
    Cell("demo", k=2, purpose="reference"),
    Cell("demo", "helpful", k=2, budget=PAPER, purpose="bank and budget"),
    Cell("hard", k=1, purpose="the harder world"),
), seeds=(0,), probe_rollouts=16)
GRIDS = {g.name: g for g in (FULL_GRID, SMOKE_GRID)}


def sweep_record(grid: SweepGrid) -> JSONObject:
    """What the run directories depend on: the run sizes and each world's warm-up (seed 0's cache key; seed s's
    differs in its seed only), not which cells or seeds run (run directories are named by their settings)."""
    sizes = {k: v for k, v in asdict(grid.sizes).items()
             if k not in {"preset", "seeds", "methods", "tune_lr", "lr_grid", "tuning_seed", "probe_rollouts",
                          "ulp_noise", "num_teachers", "prompts_per_step", "grpo_generations", "curve_problems",
                          "eval_every"}}
    return {"sizes": sizes, "rollouts_per_step": grid.sizes.prompts_per_step, "groups": grid.sizes.grpo_generations,
            "probe_rollouts": grid.probe_rollouts,
            "worlds": {name: {"warm_start": grid.warmup(name, 0).digest(), "extra_tokens": w.extra_tokens}
                       for name, w in WORLDS.items()}}


# Where things live in a sweep's output directory (one home for each name).
SWEEP_PLAN_FILE = "sweep_plan.json"
BASES_FILE = "bases.json"  # per world: each warm start's sha256 and Base (per-problem accuracies)
TIMINGS_FILE = "timings.json"  # seconds of each training run and evaluation made by this directory's sweeps


def world_dir(out: Path, world: str) -> Path:
    return out / "worlds" / world


def run_dir(out: Path, spec: RunSpec, seed: int) -> Path:
    return out / "runs" / spec.world / f"{spec.key}-seed{seed}"


def probe_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "probes" / cell.world / f"{cell.bank}-k{cell.k}-seed{seed}"


def bank_path(out: Path, bank: str, k: int) -> Path:
    return out / "banks" / f"{bank}-k{k}.json"

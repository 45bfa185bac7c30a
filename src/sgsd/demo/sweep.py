"""`sgsd sweep`: when does SGSD beat GRPO? The demo's comparison over a grid of demo-world settings.

In each cell of a grid (`sgsd.demo.sweep_grid`: world, skill bank, K, rollout budget) GRPO, OPSD and SGSD
train from every replication's warm start with the demo's recipe (`sgsd.demo.run.method_config`, the code
path of `sgsd train`), are evaluated like the demo's final models (avg@k on held-out problems), and the cell
reports SGSD - GRPO and SGSD - OPSD with the demo's paired two-level bootstrap intervals and sign counts
(`sgsd.demo.sweep_report`). Before training, `sgsd skills probe` measures what the cell's teachers say on
each warm start's own rollouts, failures included, read against the bank's labels.

Nothing trains twice: a world's warm starts are cached like the demo's (the demo's world uses the demo's
own cache entries; the harder world has its own), and cells of one world share the GRPO and OPSD runs they
have in common. Rerunning the same command into the same output directory skips finished runs, resumes
interrupted ones from their last checkpoint, reads finished evaluations from `evaluations.json`, and
rewrites the report after every cell, so an unfinished sweep's report says which cells are measured.

What is simplified, as in the demo: a toy world, a sub-million-parameter model, 30 steps. The map says
which of the mechanism's conditions move SGSD against GRPO in this world; it does not rank the methods on
the paper's benchmarks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sgsd.data import Problem
from sgsd.demo.evaluate import accuracy, subset
from sgsd.demo.run import EvaluationCache, evaluate_dir, method_config, split_validation
from sgsd.demo.sweep_grid import (BASES_FILE, SWEEP_PLAN_FILE, TIMINGS_FILE, WORLDS, Cell, RunSpec, SweepGrid,
                                  bank_path, cell_runs, probe_dir, run_dir, sweep_bank, sweep_record, world_dir)
from sgsd.demo.sweep_report import write_sweep_report
from sgsd.config import flatten
from sgsd.demo.warmup import WarmStart, warm_start, weights_sha256
from sgsd.demo.world import write_problems
from sgsd.run_dir import RunDir, open_output_dir
from sgsd.storage import JSONObject, atomic_write_json


def read_json(path: Path) -> JSONObject:
    """A small JSON record of the output directory; missing or damaged: empty (it only costs a recomputation)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def record_base(folder: Path, seed: int, warm: WarmStart, test: Sequence[Problem], *, k: int,
                max_new_tokens: int) -> float:
    """Base avg@k of replication `seed`'s warm start on `test`, measured once per warm start (by sha256) and
    kept in `<world>/bases.json` with the warm start's provenance."""
    path = folder / BASES_FILE
    bases = read_json(path)
    sha = weights_sha256(warm.path)
    ids = [p.problem_id for p in test]
    known = bases.get(str(seed))
    if known and known["sha256"] == sha and known["problem_ids"] == ids and known["k"] == k:
        return known["mean"]
    estimate = accuracy(warm.model, warm.tokenizer, test, k=k, max_new_tokens=max_new_tokens, seed=seed)
    bases[str(seed)] = {"sha256": sha, "path": str(warm.path), "warmup_seconds": warm.report.seconds,
                        "trained_now": not warm.from_cache, "k": k, "problem_ids": ids,
                        **estimate.to_json(), "per_problem": list(estimate.per_problem)}
    atomic_write_json(path, bases)
    return estimate.mean


def record_timing(out: Path, run: str, *, train_s: float | None, eval_s: float | None) -> None:
    """Seconds spent on one run by this output directory's sweeps (timings.json), with the load average."""
    timings = read_json(out / TIMINGS_FILE)
    entry = timings.setdefault(run, {})
    if train_s is not None:
        entry["train_s"] = train_s
    if eval_s is not None:
        entry["eval_s"] = eval_s
    entry["load_average_1min"] = os.getloadavg()[0]
    atomic_write_json(out / TIMINGS_FILE, timings)


@dataclass
class WorldState:
    """A world prepared for training: its replications' warm starts, training data, test problems."""

    warms: dict[int, WarmStart]
    data: Path
    test: list[Problem]


class Sweep:
    """Runs a grid into an output directory (see the module docstring); `log` gets one line per event."""

    def __init__(self, out: Path, grid: SweepGrid, *, cache_root: str | Path | None,
                 log: Callable[[str], None]) -> None:
        self.out, self.grid, self.cache_root, self.log = out, grid, cache_root, log
        self.cache = EvaluationCache(out)
        self.worlds: dict[str, WorldState] = {}
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.started:.0f}s] {text}")

    def world(self, name: str) -> WorldState:
        """Load (or train and cache) the world's warm starts, write its data, measure Base once per warm start."""
        if name in self.worlds:
            return self.worlds[name]

        warms = {}
        for seed in self.grid.seeds:
            config = self.grid.warmup(name, seed)
            self.say(f"world {name}: warm start {seed} ({config.digest()})")
            warms[seed] = warm_start(config, cache_root=self.cache_root)
            warms[seed].model.eval()
        first = next(iter(warms.values()))
        folder = world_dir(self.out, name)
        train, _ = split_validation(first.world.train, self.grid.sizes.validation_problems)
        write_problems(train, str(folder / "train.jsonl"))
        test = subset(first.world.test, self.grid.sizes.eval_problems, seed=0)
        tokens = self.grid.sizes.max_new_tokens + WORLDS[name].extra_tokens
        for seed, warm in warms.items():
            base = record_base(folder, seed, warm, test, k=self.grid.sizes.k, max_new_tokens=tokens)
            self.say(f"world {name}: warm start {seed} Base avg@{self.grid.sizes.k} {base:.3f}"
                     + (" (cached)" if warm.from_cache else f", warm-up {warm.report.seconds:.0f} s"))
        self.worlds[name] = WorldState(warms, folder / "train.jsonl", test)
        return self.worlds[name]

    def bank(self, name: str, k: int) -> Path:
        path = bank_path(self.out, name, k)
        if not path.exists():
            atomic_write_json(path, sweep_bank(name, k))
        return path

    def run(self, spec: RunSpec, seed: int) -> None:
        """Train (unless finished) and evaluate one run of one replication."""
        from sgsd.trainers.run import train

        state = self.world(spec.world)
        plan = self.grid.run_plan(spec)
        path = run_dir(self.out, spec, seed)
        bank = self.bank(spec.bank or "seed", plan.num_teachers)
        trained = None
        if not RunDir(path).final.exists():
            began = time.perf_counter()
            train(method_config(spec.method, plan, state.warms[seed].path, state.data, bank, seed), path, progress=False)
            trained = time.perf_counter() - began
        key = self.cache.key(RunDir(path).final, state.test, k=plan.k, seed=seed, max_new_tokens=plan.max_new_tokens)
        cached = self.cache.get(key) is not None
        began = time.perf_counter()
        final = evaluate_dir(RunDir(path).final, state.warms[seed].tokenizer, state.test, plan, k=plan.k, seed=seed,
                             cache=self.cache)
        evaluated = None if cached else time.perf_counter() - began
        if trained is not None or evaluated is not None:
            record_timing(self.out, f"{spec.world}/{spec.key}-seed{seed}", train_s=trained, eval_s=evaluated)
        self.say(f"{spec.world}/{spec.key} seed {seed}: avg@{plan.k} {final.mean:.3f}"
                 + (f", trained in {trained:.0f} s" if trained is not None else " (trained before)")
                 + (f", evaluated in {evaluated:.0f} s" if evaluated is not None else ""))

    def probe(self, cell: Cell, seed: int) -> None:
        """`sgsd skills probe` of the cell's SGSD teachers on the replication's warm start (before training)."""
        from sgsd.probe.run import run_probe

        target = probe_dir(self.out, cell, seed)
        if (target / "probe.json").exists():
            return
        state = self.world(cell.world)
        plan = self.grid.run_plan(cell_runs(cell, self.grid.sizes)["sgsd"])
        began = time.perf_counter()
        config = method_config("sgsd", plan, state.warms[seed].path, state.data, self.bank(cell.bank, cell.k), seed)
        run_probe(config, target, rollouts=self.grid.probe_rollouts, controls=("none",), log=lambda line: None)
        record_timing(self.out, f"probe {target.relative_to(self.out)}", train_s=None,
                      eval_s=time.perf_counter() - began)
        self.say(f"probe {cell.world}/{cell.bank}/K{cell.k} seed {seed}: {time.perf_counter() - began:.0f} s")


def sweep_settings(grid: SweepGrid) -> JSONObject:
    """The sweep's output record (`sgsd.run_dir.check_output_dir`): its `sweep_record`, flat. Same settings:
    finished runs are reused and interrupted ones resume; other settings are refused (their runs would pass
    for this grid's)."""
    return flatten(json.loads(json.dumps(sweep_record(grid))))


def run_sweep(output_dir: str | Path, grid: SweepGrid, *, cache_root: str | Path | None = None,
              log: Callable[[str], None] | None = None) -> JSONObject:
    """Run (or resume) `grid` into `output_dir` cell by cell, rewriting the report after each; return what
    results.json holds."""
    from transformers.utils import logging as hf_logging

    record = sweep_record(grid)
    out = open_output_dir(output_dir, "sweep", sweep_settings(grid), what="sweep: output directory")
    atomic_write_json(out / SWEEP_PLAN_FILE, record)
    sweep = Sweep(out, grid, cache_root=cache_root,
                  log=log or (lambda line: print(line, file=sys.stderr, flush=True)))
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-checkpoint "Writing model shards" bars would flood the log
    try:
        for index, cell in enumerate(grid.cells, 1):
            sweep.say(f"cell {index}/{len(grid.cells)} {cell.name} ({cell.purpose})")
            for seed in grid.seeds:
                for spec in cell_runs(cell, grid.sizes).values():
                    sweep.run(spec, seed)
                sweep.probe(cell, seed)
            results = write_sweep_report(out, grid, seconds=time.perf_counter() - sweep.started)
            sweep.say(f"cell {cell.name} done; report {out / 'report.md'}")
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return results

"""`sgsd sweep [--grid full|smoke] [--cells a,b,...] [--seeds N] [--output-dir D] [--cache-dir D] [--list] [--report-only]`:
SGSD against GRPO and OPSD over a grid of demo-world settings (docs/sweep.md)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sgsd.commands.options import COUNT
from sgsd.demo.sweep import run_sweep, sweep_settings
from sgsd.demo.sweep_grid import GRIDS, SWEEP_PLAN_FILE, cell_runs, sweep_record
from sgsd.demo.sweep_report import write_sweep_report
from sgsd.errors import UserError
from sgsd.run_dir import claimed_output_dir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", choices=tuple(GRIDS), default="full",
                        help="full (10 cells, 3 replications, the full demo's run sizes; hours on 2 cores) or smoke "
                             "(3 tiny cells, checks that everything runs; its numbers mean nothing); default full")
    parser.add_argument("--cells", help="comma-separated cell names of the grid to run (default: every cell; "
                                        "--list prints them)")
    parser.add_argument("--seeds", type=COUNT, help="number of replications, each with its own warm start per world "
                                                  "(default: the grid's, 3 for full)")
    parser.add_argument("--output-dir", default="runs/sweep", help="where runs, report and figure go; rerunning "
                                                                   "into it resumes (default runs/sweep)")
    parser.add_argument("--cache-dir", help="warm-start cache (default ~/.cache/sgsd/demo, shared with sgsd demo)")
    parser.add_argument("--list", action="store_true", help="print the grid's cells and the runs each needs, and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.json, report.md and the figure from what --output-dir holds, training "
                             "nothing (also while a sweep is running there)")


def run(args: argparse.Namespace) -> int:
    names = None
    if args.cells is not None:
        names = [n.strip() for n in args.cells.split(",") if n.strip()]
        if not names:
            raise UserError("--cells: name at least one cell")
    grid = GRIDS[args.grid].select(names, args.seeds)
    if args.list:
        for cell in grid.cells:
            runs = ", ".join(spec.key for spec in cell_runs(cell, grid.sizes).values())
            print(f"{cell.name:32} {cell.purpose}: {runs}")
        return 0
    out = Path(args.output_dir).expanduser()
    if args.report_only:
        plan = out / SWEEP_PLAN_FILE
        if not plan.exists():
            raise UserError(f"--report-only: {out} holds no sweep ({SWEEP_PLAN_FILE} missing)")
        if json.loads(plan.read_text()) != json.loads(json.dumps(sweep_record(grid))):
            raise UserError(f"--report-only: {out} holds a sweep made with other settings than --grid {args.grid}")
        write_sweep_report(out, grid)
        print(f"report: {os.path.join(out, 'report.md')}")
        return 0

    # the output-directory rule; one writer: a second sweep there stops at once
    with claimed_output_dir(out, "sweep", sweep_settings(grid), what="sweep: output directory"):
        results = run_sweep(out, grid, cache_root=args.cache_dir)
    for cell in results["cells"]:
        if cell["status"] != "measured":
            print(f"{cell['name']:32} not measured ({cell['evaluated']} of {cell['needed']} evaluations)")
            continue
        text = "  ".join(f"{key.upper()} {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
                         f"{c['replications_agreeing']}/{c['replications']} {c['verdict']}"
                         for key, c in ((k, cell["comparisons"][k]) for k in ("sgsd-grpo", "sgsd-opsd")))
        print(f"{cell['name']:32} {text}")
    print(f"\nreport: {os.path.join(out, 'report.md')}")
    return 0

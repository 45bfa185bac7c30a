"""`sgsd demo [--quick | --preset P] [--methods a,b,...] [--tune-lr [--lr-grid a,b,...]] [--output-dir D] [--seeds N]`: the methods
compared in a small synthetic world, replicated over seeds, each seed with its own warm start."""

from __future__ import annotations

import argparse
import os

from sgsd.commands.options import COUNT, add_quiet
from sgsd.demo.plan import DEFAULT_METHODS, DEMO_METHODS, PRESETS, label, parse_lr_grid, parse_methods
from sgsd.errors import UserError
from sgsd.run_dir import claimed_output_dir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (the 'quick' preset)")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="full (3 seeds, 30 steps; the default), quick (= --quick) or smoke (checks that "
                             "everything runs; its numbers mean nothing)")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(DEMO_METHODS)} "
                                          f"(default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--tune-lr", action="store_true",
                        help="choose each method's learning rate from a small grid on validation problems held "
                             "out of the training split, and report both the shared and the chosen rate")
    parser.add_argument("--lr-grid", help="with --tune-lr: the learning rates to try, comma-separated "
                                          "(default 3e-5,1e-4,3e-4; smoke: 1e-4,3e-4)")
    parser.add_argument("--output-dir", default="runs/demo", help="where the report, plots and runs go")
    parser.add_argument("--seeds", type=COUNT, help="number of replications: seeds, each with its own warm start and training runs "
                                             "(default: 1 with --quick, 3 otherwise)")
    parser.add_argument("--cache-dir", help="warm-start cache (default ~/.cache/sgsd/demo)")
    add_quiet(parser, "no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds: must be at least 1")
    if args.quick and args.preset not in (None, "quick"):
        raise UserError(f"--quick and --preset {args.preset}: choose one")

    if args.lr_grid is not None and not args.tune_lr:
        raise UserError("--lr-grid: only with --tune-lr")
    from sgsd.demo.run import demo_settings, make_plan, run_demo  # the demo's training code: after --help

    preset = args.preset or ("quick" if args.quick else "full")
    methods = parse_methods(args.methods) if args.methods is not None else None
    grid = parse_lr_grid(args.lr_grid) if args.lr_grid is not None else None
    plan = make_plan(preset=preset, seeds=args.seeds, methods=methods, tune_lr=args.tune_lr, lr_grid=grid)

    # a new or empty directory, or this demo's own (same plan: it resumes); locked: a second demo stops at once
    with claimed_output_dir(args.output_dir, "demo", demo_settings(plan), what="demo: output directory"):
        results = run_demo(args.output_dir, plan=plan, cache_root=args.cache_dir, progress=not args.quiet)
    k = results["k"]
    print(f"\n{'method':11} avg@{k:<3} 95% interval" + ("   tuned lr  avg@k" if results["tuned"] else ""))
    for name, m in results["methods"].items():
        line = f"{label(name):11} {m['mean']:.3f}  [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        if name in results["tuned"]:
            t = results["tuned"][name]
            line += f"   {t['learning_rate']:<9g} {t['mean']:.3f}"
        print(line)
    print(f"\nreport: {os.path.join(args.output_dir, 'report.md')}")
    return 0

"""`sgsd demo [--quick] [--output-dir D] [--seeds N]`: SGSD vs GRPO vs OPSD in a small synthetic world."""

from __future__ import annotations

import argparse

from sgsd.commands.options import add_quiet


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (under 5 minutes on 2 cores)")
    parser.add_argument("--output-dir", default="runs/demo", help="where the report, plots and runs go")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: 1 with --quick, 3 otherwise)")
    parser.add_argument("--cache-dir", help="warm-start cache (default ~/.cache/sgsd/demo)")
    add_quiet(parser, "no progress bars")


def run(args: argparse.Namespace) -> int:
    import os

    from sgsd.errors import UserError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds: must be at least 1")
    from sgsd.demo.run import run_demo

    results = run_demo(args.output_dir, quick=args.quick, seeds=args.seeds, cache_root=args.cache_dir,
                       progress=not args.quiet)
    k = results["k"]
    print(f"\n{'method':8} avg@{k:<3} 95% interval")
    for name, m in results["methods"].items():
        print(f"{name:8} {m['mean']:.3f}  [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    print(f"\nreport: {os.path.join(args.output_dir, 'report.md')}")
    return 0

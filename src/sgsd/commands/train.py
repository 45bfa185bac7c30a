"""`sgsd train --config FILE [--output-dir DIR] [--max-steps N] [--no-resume] [--quiet] [key=value ...]`.

Rerunning the same command resumes an interrupted run, and does nothing for a finished one."""

from __future__ import annotations

import argparse
import sys

from sgsd.commands.options import COUNT, add_quiet
from sgsd.distributed import close, leave_worker, same_on_every_rank
from sgsd.methods import load_run_config


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (e.g. configs/tiny/sgsd.yaml)")
    parser.add_argument("--output-dir", help="run directory (default: training.output_dir of the config)")
    parser.add_argument("--max-steps", type=COUNT,
                        help="train to this step (default: training.max_steps of the config); on a finished run a "
                             "larger value continues it, the same value does nothing, a smaller one is refused")
    parser.add_argument("--no-resume", action="store_true",
                        help="start fresh (only into an empty directory); by default the latest complete checkpoint "
                             "in the output directory is resumed")
    add_quiet(parser, "no progress bar and no line per logging step (metrics.jsonl has every step)")
    parser.set_defaults(_resumable=True)  # the same command resumes from the newest complete checkpoint
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. training.learning_rate=1e-5 sgsd.teacher=ema "
                             "(default: none)")


def run(args: argparse.Namespace) -> int:
    from sgsd.trainers.run import train

    with same_on_every_rank():  # a bad config is found alike by every rank: printed once
        cfg = load_run_config(args.config, args.overrides)

    result = train(cfg, args.output_dir, resume=not args.no_resume, max_steps=args.max_steps,
                   progress=not args.quiet)

    close()
    leave_worker()  # a non-main rank ends here (what a user reads comes once, from the main process)
    if result.ignored_checkpoints:
        print(f"sgsd: ignored incomplete checkpoints: {', '.join(result.ignored_checkpoints)}", file=sys.stderr)
    if result.already_complete:
        print(f"sgsd: {result.output_dir}: complete at step {result.global_step}; nothing to do "
              f"(a larger --max-steps continues it)")
        return 0
    if result.resumed_from:
        print(f"sgsd: resumed from {result.resumed_from}")
    print(f"sgsd: trained {result.global_step} steps; final model in {result.final_dir}")
    return 0
